//! Every edit variant (docs/variants.md) against an independent numpy computation
//! (fixtures/edit/make_variants.py, whose results are committed): subspaces, norm-preserving edits (with and
//! without a scale), per-layer directions with a layer-kernel table, and a subspace through Gemma 2's post-norms.
//!
//! numpy computes in its own order (QR for the basis, matmul for the projections, the norms of the projected
//! vectors themselves), so a value lying within about 1e-16 of a rounding tie may land one ulp away; anything
//! more is a bug. The same tolerance as tests/reference.rs.

use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype};
use edit::{Directions, LayerKernel, NoProgress, Options, WriteOptions};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/edit").join(rel)
}

fn ulps(dtype: Dtype, a: &[u8], b: &[u8]) -> u64 {
    let ordered = |bits: u64, width: u32| -> i64 {
        let sign = 1u64 << (width - 1);
        if bits & sign != 0 { -((bits & !sign) as i64) } else { bits as i64 }
    };
    let (x, y, w) = match dtype {
        Dtype::BF16 | Dtype::F16 => {
            (u16::from_le_bytes([a[0], a[1]]) as u64, u16::from_le_bytes([b[0], b[1]]) as u64, 16)
        }
        Dtype::F32 => {
            (u32::from_le_bytes(a.try_into().unwrap()) as u64, u32::from_le_bytes(b.try_into().unwrap()) as u64, 32)
        }
        other => panic!("no {other} in the variant cases"),
    };
    ordered(x, w).abs_diff(ordered(y, w))
}

fn check(case: &str) {
    let cases: Value = serde_json::from_slice(&std::fs::read(fixture("variants/cases.json")).unwrap()).unwrap();
    let c = &cases[case];
    let ckpt = Checkpoint::open(&fixture(c["input"].as_str().unwrap())).unwrap();
    let layers = ckpt.config.num_hidden_layers;
    let directions =
        Directions::open(&fixture(c["direction"].as_str().unwrap()), ckpt.config.hidden_size, layers, None).unwrap();
    let kernel = match c["kernel_table"].as_str() {
        Some(k) => LayerKernel::from_table(&fixture(k), layers).unwrap(),
        None => LayerKernel::default(),
    };
    let opts = Options {
        scale: c["scale"].as_f64().unwrap(),
        norm_preserving: c["norm_preserving"].as_bool().unwrap(),
        kernel,
        ..Options::default()
    };
    let plan = edit::plan(&ckpt, &opts).unwrap();
    assert_eq!(plan.edits.len() as u64, c["edited"].as_u64().unwrap(), "{case}: edited tensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let report =
        edit::write_directions(&ckpt, &plan, &directions, &out, &WriteOptions::default(), &NoProgress).unwrap();
    let edited = Checkpoint::open(&out).unwrap();
    let expected = checkpoint::Shard::open(&fixture(c["expected"].as_str().unwrap()), "expected").unwrap();
    let mut planned: Vec<&str> = plan.edits.iter().map(|e| e.name.as_str()).collect();
    let mut want: Vec<&str> = expected.header.tensors.iter().map(|t| t.name.as_str()).collect();
    planned.sort();
    want.sort();
    assert_eq!(planned, want, "{case}: the writers numpy edits are the ones we edit");
    let (mut exact, mut one_ulp, mut total) = (0usize, 0usize, 0usize);
    for t in &expected.header.tensors {
        let want = expected.tensor_bytes(t);
        let (r, _) = edited.get(&t.name).unwrap();
        let got = edited.bytes(r);
        let size = t.dtype.float_size().unwrap();
        for (k, (a, b)) in got.chunks_exact(size).zip(want.chunks_exact(size)).enumerate() {
            total += 1;
            match ulps(t.dtype, a, b) {
                0 => exact += 1,
                1 => one_ulp += 1,
                n => panic!("{case}: `{}` element {k} differs by {n} ulps from numpy", t.name),
            }
        }
    }
    eprintln!("{case}: {total} edited values, {exact} identical to numpy, {one_ulp} one ulp apart");
    assert!(one_ulp * 1000 <= total, "{case}: {one_ulp} of {total} values one ulp apart is too many");
    // The ledger says what it did: k vectors, and for norm-preserving edits how far the stored column norms
    // moved (rounding only: a few units of the dtype's roundoff).
    for l in &report.ledger {
        assert_eq!(l.k, directions.for_layer(l.layer).k(), "{case}: `{}`", l.name);
        match (opts.norm_preserving, l.norm_drift) {
            (true, Some(drift)) => {
                let u = Dtype::from_safetensors(&l.dtype).unwrap().unit_roundoff().unwrap();
                assert!(drift <= 4.0 * u, "{case}: `{}` column norms moved by {drift:e}", l.name);
            }
            (false, None) => {}
            other => panic!("{case}: `{}` norm drift {other:?}", l.name),
        }
    }
}

#[test]
fn norm_preserving_f32_matches_numpy() {
    check("np_llama_bias_f32");
}

#[test]
fn norm_preserving_with_a_scale_bf16_matches_numpy() {
    check("np_scale_llama_bias_bf16");
}

#[test]
fn subspace_of_three_f32_matches_numpy() {
    check("subspace_llama_bias_f32");
}

#[test]
fn norm_preserving_subspace_f16_matches_numpy() {
    check("subspace_np_llama_f16");
}

#[test]
fn per_layer_directions_with_a_kernel_table_match_numpy() {
    check("per_layer_kernel_llama_bias_bf16");
}

#[test]
fn subspace_through_gemma2_post_norms_matches_numpy() {
    check("subspace_gemma2_bf16");
}
