use super::*;

fn write_raw(dir: &Path, name: &str, dtype: Dtype, values: &[f64]) -> PathBuf {
    let p = dir.join(name);
    write(&p, values, dtype, &Map::new()).unwrap();
    p
}

#[test]
fn loads_and_normalises() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_raw(dir.path(), "d.safetensors", Dtype::F32, &[3.0, 0.0, 4.0]);
    let d = Direction::load(&p, 3).unwrap();
    assert_eq!(d.norm(), 5.0);
    assert_eq!(d.unit(), vec![0.6, 0.0, 0.8]);
    assert_eq!(d.sha256.len(), 64);
}

#[test]
fn rejects_wrong_length_nan_inf_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    let err = |values: &[f64], n: usize| {
        let p = write_raw(dir.path(), "d.safetensors", Dtype::F64, values);
        Direction::load(&p, n).unwrap_err().to_string()
    };
    let prefix = format!("direction file `{}`: ", dir.path().join("d.safetensors").display());
    assert_eq!(err(&[1.0, 2.0], 3), format!("{prefix}`direction` has length 2 but the model's hidden_size is 3"));
    assert_eq!(err(&[1.0, f64::NAN], 2), format!("{prefix}`direction` contains NaN (at index 1)"));
    assert_eq!(err(&[f64::INFINITY, 1.0], 2), format!("{prefix}`direction` contains an infinite value (at index 0)"));
    assert_eq!(err(&[0.0, 0.0], 2), format!("{prefix}`direction` is the zero vector, which has no direction"));
}

// Issue 13: `Direction::norm` squared values without scaling, so huge finite entries overflowed to an
// infinite norm, a zero unit vector and an edit that silently did nothing.
#[test]
fn huge_finite_direction_keeps_its_unit_vector() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_raw(dir.path(), "huge.safetensors", Dtype::F64, &[3e200, 0.0, 4e200]);
    let d = Direction::load(&p, 3).unwrap();
    assert!((d.norm() / 5e200 - 1.0).abs() < 1e-15, "{}", d.norm());
    let u = d.unit();
    assert!((u[0] - 0.6).abs() < 1e-15 && u[1] == 0.0 && (u[2] - 0.8).abs() < 1e-15, "{u:?}");
    // Tiny but normal values underflowed the same way (to a zero norm).
    let p = write_raw(dir.path(), "tiny.safetensors", Dtype::F64, &[3e-200, 4e-200]);
    let d = Direction::load(&p, 2).unwrap();
    assert!((d.norm() / 5e-200 - 1.0).abs() < 1e-15);
}

#[test]
fn refuses_a_norm_that_is_not_a_normal_number() {
    let dir = tempfile::tempdir().unwrap();
    let err = |values: &[f64]| {
        let p = write_raw(dir.path(), "d.safetensors", Dtype::F64, values);
        Direction::load(&p, values.len()).unwrap_err().to_string()
    };
    let prefix = format!("direction file `{}`: ", dir.path().join("d.safetensors").display());
    assert_eq!(
        err(&[f64::MAX, f64::MAX]),
        format!(
            "{prefix}`direction` has norm inf, which is not a normal positive number, so it cannot be normalised \
             reliably (rescale the vector)"
        )
    );
    assert_eq!(
        err(&[1e-310, 0.0]),
        format!(
            "{prefix}`direction` has norm 1e-310, which is not a normal positive number, so it cannot be normalised \
             reliably (rescale the vector)"
        )
    );
}

#[test]
fn scaled_norm_is_bit_identical_to_the_plain_norm_in_range() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut values = vec![0f64; 577];
    for _ in 0..50 {
        for v in &mut values {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = (x as f64 / u64::MAX as f64 - 0.5) * 1e3;
        }
        let plain = values.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert_eq!(norm(&values).to_bits(), plain.to_bits());
        // Scaling by powers of two is exact, so the scaled path gives the same bits, scaled.
        let big: Vec<f64> = values.iter().map(|v| v * 2f64.powi(700)).collect();
        assert_eq!(norm(&big), plain * 2f64.powi(700));
        let small: Vec<f64> = values.iter().map(|v| v * 2f64.powi(-700)).collect();
        assert_eq!(norm(&small), plain * 2f64.powi(-700));
    }
    assert!(norm(&[f64::NAN, 1.0]).is_nan() && norm(&[1.0, f64::NAN]).is_nan());
    assert_eq!(norm(&[f64::NEG_INFINITY]), f64::INFINITY);
    assert_eq!(norm(&[]), 0.0);
}

fn candidates_file(dir: &Path) -> PathBuf {
    // 2 positions x 3 layers x hidden 2; layer 0 is zero (degenerate), as find writes it.
    let values: Vec<f64> = (0..12).map(|i| if (i / 2) % 3 == 0 { 0.0 } else { i as f64 }).collect();
    let p = dir.join("candidates.safetensors");
    let mut meta = Map::new();
    meta.insert("model_sha256".into(), Value::String("abc".into()));
    Candidates::write(&p, &values, &[-2, -1], 3, Dtype::F32, &meta).unwrap();
    p
}

#[test]
fn candidates_round_trip_and_pick_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = candidates_file(dir.path());
    let c = Candidates::load(&p, 2).unwrap();
    assert_eq!((c.positions(), c.layers(), c.hidden()), (&[-2i64, -1][..], 3, 2));
    assert_eq!(c.get(Candidate { position: -1, layer: 2 }).unwrap(), &[10.0, 11.0]);
    assert_eq!(c.get(Candidate { position: -2, layer: 1 }).unwrap(), &[2.0, 3.0]);
    let d = Direction::open(&p, 2, Some("-1,2".parse().unwrap())).unwrap();
    assert_eq!(d.values, vec![10.0, 11.0]);
    assert_eq!((d.meta("position"), d.meta("layer"), d.meta("model_sha256")), (Some("-1"), Some("2"), Some("abc")));
    assert_eq!(d.sha256, c.sha256);
}

#[test]
fn candidate_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = candidates_file(dir.path());
    let prefix = format!("direction file `{}`: ", p.display());
    let err = |c: Option<&str>| Direction::open(&p, 2, c.map(|c| c.parse().unwrap())).unwrap_err().to_string();
    assert_eq!(
        err(None),
        format!("{prefix}is a candidates file (tensor `candidates`); choose one with --candidate POS,LAYER")
    );
    assert_eq!(err(Some("-3,1")), format!("{prefix}has no candidate at position -3 (positions: [-2, -1])"));
    assert_eq!(err(Some("-1,3")), format!("{prefix}has no candidate at layer 3 (layers 0..=2)"));
    assert_eq!(err(Some("-2,0")), format!("{prefix}candidate (-2, 0) is the zero vector, which has no direction"));
    let single = write_raw(dir.path(), "d.safetensors", Dtype::F32, &[1.0, 2.0]);
    assert_eq!(
        Direction::open(&single, 2, Some("-1,2".parse().unwrap())).unwrap_err().to_string(),
        format!(
            "direction file `{}`: holds one direction (tensor `direction`), not candidates; drop --candidate -1,2",
            single.display()
        )
    );
    assert_eq!(
        Candidates::load(&p, 3).unwrap_err().to_string(),
        format!("{prefix}`candidates` has hidden size 2 but the model's hidden_size is 3")
    );
    assert_eq!(
        "1,2".parse::<Candidate>().unwrap_err(),
        "`1,2`: the position is counted from the end of the prompt and must be negative (-1 is the last token)"
    );
    assert_eq!("-1".parse::<Candidate>().unwrap_err(), "`-1` is not POS,LAYER (e.g. `-1,22`: position -1, layer 22)");
}

#[test]
fn reads_the_reference_candidates_layout() {
    // The reference run's file (../shared/reference/candidates.safetensors) records positions and layers
    // as JSON lists in the metadata, exactly as `Candidates::write` does; a file without them gets -P..-1.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.safetensors");
    let values = vec![1.0; 3 * 2 * 4];
    write_tensor(&p, CANDIDATES_TENSOR, &values, &[3, 2, 4], Dtype::F64, &Map::new()).unwrap();
    assert_eq!(Candidates::load(&p, 4).unwrap().positions(), &[-3, -2, -1]);
    let mut meta = Map::new();
    meta.insert("positions".into(), Value::String("[-3, -2, 1]".into()));
    write_tensor(&p, CANDIDATES_TENSOR, &values, &[3, 2, 4], Dtype::F64, &meta).unwrap();
    assert_eq!(
        Candidates::load(&p, 4).unwrap_err().to_string(),
        format!(
            "direction file `{}`: metadata `positions` [-3, -2, 1] must list 3 negative positions (the first axis of \
             `candidates`)",
            p.display()
        )
    );
}

#[test]
fn per_layer_rows_equal_the_per_layer_file_they_would_be_written_as() {
    // Two layers of width 3: layer 0 along (3, 0, 4), layer 1 along the second axis.
    let rows = [3.0, 0.0, 4.0, 0.0, 2.0, 0.0];
    let d = Directions::per_layer_rows(&rows, 2).unwrap();
    assert_eq!((d.layout, d.layers(), d.k()), (Layout::PerLayer, 2, 1));
    assert_eq!(d.for_layer(Some(0)).as_slice(), &[0.6, 0.0, 0.8]);
    assert_eq!(d.for_layer(Some(1)).as_slice(), &[0.0, 1.0, 0.0]);
    assert_eq!(d.for_layer(None).as_slice(), &[0.6, 0.0, 0.8], "the embedding takes layer 0's");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("per_layer.safetensors");
    set::write_per_layer(&p, &rows, 2, 1, None, Dtype::F64, &Map::new()).unwrap();
    let f = Directions::open(&p, 3, 2, None).unwrap();
    for l in [None, Some(0), Some(1)] {
        assert_eq!(f.for_layer(l).as_slice(), d.for_layer(l).as_slice());
    }
    assert_eq!(Directions::per_layer_rows(&[1.0, 0.0, 0.0, 0.0], 2).unwrap_err(), "layer 1: the direction is zero");
    assert_eq!(
        Directions::per_layer_rows(&[1.0, 0.0, 0.0], 2).unwrap_err(),
        "3 values are not [2, d] per-layer directions"
    );
}

#[test]
fn projected_candidates_lose_their_harmless_mean_component_site_by_site() {
    let dir = tempfile::tempdir().unwrap();
    let c = Candidates::load(&candidates_file(dir.path()), 2).unwrap();
    // Means: e0 everywhere but (-1, 1), where e1; layer 0's candidates are zero and stay so.
    let mut means = [1.0, 0.0].repeat(6);
    means[2 * 4..2 * 4 + 2].copy_from_slice(&[0.0, 2.0]);
    let mp = dir.path().join("means.safetensors");
    Candidates::write_named(&mp, MEANS_TENSOR, &means, &[-2, -1], 3, Dtype::F64, &Map::new()).unwrap();
    let m = Candidates::load_means(&mp, 2).unwrap();
    let p = c.projected(&m).unwrap();
    let at = |position, layer| p.get(Candidate { position, layer }).unwrap().to_vec();
    assert_eq!(at(-2, 0), [0.0, 0.0]);
    assert_eq!(at(-2, 1), [0.0, 3.0]);
    assert_eq!(at(-2, 2), [0.0, 5.0]);
    assert_eq!(at(-1, 1), [8.0, 0.0]);
    assert_eq!(at(-1, 2), [0.0, 11.0]);
    assert_ne!(p.sha256, c.sha256);
    assert!(p.metadata["projected"].as_str().unwrap().contains("means.safetensors"));
    // A candidate along its mean has nothing left; a means file of another layout is refused.
    means[2 * 4..2 * 4 + 2].copy_from_slice(&[16.0, 18.0]);
    Candidates::write_named(&mp, MEANS_TENSOR, &means, &[-2, -1], 3, Dtype::F64, &Map::new()).unwrap();
    let e = c.projected(&Candidates::load_means(&mp, 2).unwrap()).unwrap_err();
    assert!(e.starts_with("candidate (-1, 1): the direction lies in the span of the protected directions"), "{e}");
    Candidates::write_named(&mp, MEANS_TENSOR, &means[..8], &[-2, -1], 2, Dtype::F64, &Map::new()).unwrap();
    let e = c.projected(&Candidates::load_means(&mp, 2).unwrap()).unwrap_err();
    assert!(e.contains("(2 positions [-2, -1], 2 layers, hidden 2) does not match the candidates"), "{e}");
}
