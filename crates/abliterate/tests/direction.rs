//! `abliterate direction ...` end to end on small files: every derived file read back and checked against its
//! definition (docs/variants.md), the llama.cpp control vector byte for byte against gguf-py's writer
//! (fixtures/directions/control_vector.gguf), round trips, and the exact error messages of bad input.

mod util;

use std::path::Path;

use checkpoint::Dtype;
use direction::{Candidates, Direction, Directions, Layout};
use serde_json::Map;
use util::{abliterate, fixture};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn meta(pairs: &[(&str, &str)]) -> Map<String, serde_json::Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect()
}

#[test]
fn export_writes_llama_cpp_control_vectors_and_import_reads_them_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // fixtures/directions/control_vector.gguf (gguf-py's bytes, which ours equal: direction crate tests) holds
    // direction.1 = [0.5, -1.25, 2.0, 0.0, 3.5] and direction.3 = [-0.75, 0.125, 1.0, -2.0, 0.25].
    let want = std::fs::read(fixture("directions/control_vector.gguf")).unwrap();
    let a = dir.join("a.safetensors");
    direction::write(&a, &[0.5, -1.25, 2.0, 0.0, 3.5], Dtype::F32, &meta(&[("layer", "2")])).unwrap();
    let out = dir.join("a.gguf");
    let r = abliterate(["direction", "export", s(&a), "-o", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("direction.[1]"), "{}", r.stdout);
    let cv = direction::interchange::ControlVector::from_gguf(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(cv.layers.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(cv.model_hint, "llama");
    // The fixture: import layer 4 (direction.3) back as a direction.
    let imported = dir.join("l4.safetensors");
    let r = abliterate([
        "direction",
        "import",
        s(&fixture("directions/control_vector.gguf")),
        "--layer",
        "4",
        "-o",
        s(&imported),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = Direction::load(&imported, 5).unwrap();
    assert_eq!(d.values, vec![-0.75, 0.125, 1.0, -2.0, 0.25]);
    assert_eq!(d.meta("layer"), Some("4"));
    // Exported back at our layers 2 and 4: direction.1 and direction.3.
    let back = dir.join("back.gguf");
    let r = abliterate(["direction", "export", s(&imported), "--layers", "2,4", "-o", s(&back)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cv = direction::interchange::ControlVector::from_gguf(&std::fs::read(&back).unwrap()).unwrap();
    assert_eq!(cv.layers.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(cv.layers[&3], vec![-0.75, 0.125, 1.0, -2.0, 0.25]);
    assert_eq!(cv.to_gguf().len(), want.len(), "the same layout as the fixture: two tensors of five floats");
    // Per-layer import needs the layer count; block 0 takes direction.1.
    let pl = dir.join("pl.safetensors");
    let r = abliterate([
        "direction",
        "import",
        s(&fixture("directions/control_vector.gguf")),
        "--layers",
        "2",
        "-o",
        s(&pl),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let set = Directions::open(&pl, 5, 2, None).unwrap();
    assert_eq!(set.layout, Layout::PerLayer);
    let r = abliterate([
        "direction",
        "import",
        s(&fixture("directions/control_vector.gguf")),
        "--layers",
        "3",
        "-o",
        s(&pl),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("has no `direction.2` (it has [1, 3])"), "{}", r.stderr);
    let r = abliterate(["direction", "export", s(&imported), "--layers", "0-1", "-o", s(&back)]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim(),
        "error: layer 0 (the residual entering the first block) cannot be written: llama.cpp has no direction.0"
    );
}

#[test]
fn orthogonalize_stack_and_interpolate_follow_their_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = dir.join("r.safetensors");
    direction::write(&r, &[3.0, 4.0, 1.0, 0.0], Dtype::F32, &meta(&[("layer", "1"), ("position", "-1")])).unwrap();
    let mu = dir.join("mu.safetensors");
    direction::write(&mu, &[0.0, 2.0, 0.0, 0.0], Dtype::F32, &Map::new()).unwrap();
    let out = dir.join("p.safetensors");
    let run = abliterate(["direction", "orthogonalize", s(&r), "--against", s(&mu), "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(Direction::load(&out, 4).unwrap().values, vec![3.0, 0.0, 1.0, 0.0]);
    // Projected against a means file at the direction's own (position, layer).
    let means = dir.join("means.safetensors");
    let m: Vec<f64> = vec![0.0, 0.0, 0.0, 0.0, /* layer 1: */ 0.0, 0.0, 5.0, 0.0];
    let mut md = Map::new();
    md.insert("positions".into(), serde_json::json!("[-1]"));
    md.insert("layers".into(), serde_json::json!("[0, 1]"));
    write_means(&means, &m, &md);
    let run = abliterate(["direction", "orthogonalize", s(&r), "--means", s(&means), "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(Direction::load(&out, 4).unwrap().values, vec![3.0, 4.0, 0.0, 0.0]);
    // Stack: MGS2 in order.
    let sub = dir.join("sub.safetensors");
    let run = abliterate(["direction", "stack", s(&r), s(&mu), "-o", s(&sub)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let set = Directions::open(&sub, 4, 3, None).unwrap();
    assert_eq!(set.layout, Layout::Subspace);
    let b = set.for_layer(Some(0));
    assert_eq!(b.k(), 2);
    let n = 26f64.sqrt();
    let want0 = [3.0 / n, 4.0 / n, 1.0 / n, 0.0];
    for (x, y) in b.vector(0).iter().zip(want0) {
        assert!((x - y).abs() < 1e-7, "{:?}", b.vector(0));
    }
    let dot: f64 = b.vector(0).iter().zip(b.vector(1)).map(|(a, b)| a * b).sum();
    assert!(dot.abs() < 1e-7);
    let run = abliterate(["direction", "stack", s(&r), s(&r), "-o", s(&sub)]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("vector 1 lies in the span of the vectors before it"), "{}", run.stderr);
    // Interpolate between candidates: index 0.25 between layers 0 and 1.
    let cands = dir.join("cands.safetensors");
    Candidates::write(&cands, &[1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0], &[-1], 2, Dtype::F32, &Map::new()).unwrap();
    let run = abliterate(["direction", "interpolate", s(&cands), "--position", "-1", "--index", "0.25", "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = Direction::load(&out, 4).unwrap().values;
    let n = (0.75f64 * 0.75 + 0.25 * 0.25).sqrt();
    assert!((v[0] - 0.75 / n).abs() < 1e-7 && (v[1] - 0.25 / n).abs() < 1e-7, "{v:?}");
    // Per-layer from candidates: block 0 <- residual 1, block 1 (the last) <- residual 1.
    let pl = dir.join("pl.safetensors");
    let run = abliterate(["direction", "per-layer", s(&cands), "--position", "-1", "-o", s(&pl)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let set = Directions::open(&pl, 4, 2, None).unwrap();
    assert_eq!(set.for_layer(Some(0)).vector(0), &[0.0, 1.0, 0.0, 0.0]);
    assert_eq!(set.for_layer(None).vector(0), &[0.0, 1.0, 0.0, 0.0]);
    // Biprojection against per-layer means.
    let bp = dir.join("bp.safetensors");
    let run = abliterate(["direction", "biproject", s(&r), "--means", s(&means), "--position", "-1", "-o", s(&bp)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let set = Directions::open(&bp, 4, 2, None).unwrap();
    let n = 25f64.sqrt();
    for l in 0..2 {
        let v = set.for_layer(Some(l)).vector(0);
        assert!((v[0] - 3.0 / n).abs() < 1e-7 && (v[1] - 4.0 / n).abs() < 1e-7 && v[2].abs() < 1e-7, "{v:?}");
    }
}

fn write_means(path: &Path, values: &[f64], md: &Map<String, serde_json::Value>) {
    // A means file is a candidates-layout file whose tensor is `means`.
    let mut data = Vec::new();
    checkpoint::dtype::encode_f64(Dtype::F32, values, &mut data);
    let entry = checkpoint::safetensors::TensorEntry {
        name: direction::MEANS_TENSOR.into(),
        dtype: Dtype::F32,
        shape: vec![1, 2, 4],
        begin: 0,
        end: data.len(),
    };
    let mut bytes = checkpoint::safetensors::write_header(Some(md), &[entry]);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn svd_and_npy_import_make_subspaces() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write_acts = |name: &str, rows: &[[f64; 3]]| {
        let p = dir.join(name);
        let v: Vec<f64> = rows.iter().flatten().copied().collect();
        direction::set::write_subspace(&p, &v, rows.len(), Dtype::F64, &Map::new()).unwrap();
        p
    };
    let harmful = write_acts("h.safetensors", &[[5.0, 1.0, 0.0], [4.0, -1.0, 0.0], [6.0, 0.5, 0.0]]);
    let harmless = write_acts("l.safetensors", &[[0.0; 3], [0.0; 3], [0.0; 3]]);
    let out = dir.join("svd.safetensors");
    let run = abliterate([
        "direction",
        "svd",
        "--harmful",
        s(&harmful),
        "--harmless",
        s(&harmless),
        "-k",
        "2",
        "-o",
        s(&out),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let set = Directions::open(&out, 3, 1, None).unwrap();
    assert_eq!(set.k(), 2);
    assert!(set.for_layer(Some(0)).vector(0)[0] > 0.99);
    // A .npy [2, 3] imported as a subspace.
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    let mut h = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    for x in [1.0f64, 0.0, 0.0, 1.0, 1.0, 0.0] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let npy = dir.join("v.npy");
    std::fs::write(&npy, &b).unwrap();
    let run = abliterate(["direction", "import", s(&npy), "-o", s(&out)]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("holds a 2-D array [2, 3]: say what it is with --as subspace|per-layer"),
        "{}",
        run.stderr
    );
    let run = abliterate(["direction", "import", s(&npy), "--as", "subspace", "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let set = Directions::open(&out, 3, 1, None).unwrap();
    assert_eq!(set.for_layer(None).vector(1), &[0.0, 1.0, 0.0]);
}

#[test]
fn edit_takes_variant_options_and_records_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixture("models/llama/f32");
    let sub = dir.join("sub.safetensors");
    let v: Vec<f64> = (0..128).map(|i| ((i * 7) % 13) as f64 - 6.0 + (i / 64) as f64).collect();
    direction::set::write_subspace(&sub, &v, 2, Dtype::F32, &Map::new()).unwrap();
    let out = dir.join("out");
    let run = abliterate([
        "edit",
        s(&model),
        "--direction",
        s(&sub),
        "--norm-preserving",
        "--kernel-attn",
        "1.0,1,0.5,1",
        "--embedding-weight",
        "0",
        "-o",
        s(&out),
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("abliterate.json")).unwrap()).unwrap();
    assert_eq!(m["options"]["norm_preserving"], true);
    assert_eq!(m["options"]["kernel"]["attn"]["tent"]["position"], 1.0);
    assert_eq!(m["direction"]["layout"], "subspace");
    assert_eq!(m["direction"]["k"], 2);
    let edited = m["edited"].as_array().unwrap();
    // The embedding has weight 0 (excluded); attention weights 0.5 at layer 0 and 1.0 at layer 1; MLPs 1.
    assert!(edited.iter().all(|e| e["kind"] != "embedding"));
    let attn0 = edited.iter().find(|e| e["kind"] == "attn_out" && e["layer"] == 0).unwrap();
    assert_eq!(
        (attn0["weight"].as_f64(), attn0["scale"].as_f64(), attn0["k"].as_u64()),
        (Some(0.5), Some(0.5), Some(2))
    );
    assert!(attn0["norm_drift"].as_f64().unwrap() < 1e-6);
    assert!(m["excluded"].as_array().unwrap().iter().any(|x| x["reason"] == "layer kernel weight 0"));
    let run = abliterate(["edit", s(&model), "--direction", s(&sub), "--kernel-mlp", "1,2", "-o", s(&dir.join("x"))]);
    assert_eq!(run.code, 2);
    assert_eq!(run.stderr.trim(), "error: --kernel-mlp 1,2: write PEAK,POSITION,MIN,WIDTH, e.g. `1.0,14,0.3,8`");
}
