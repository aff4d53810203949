//! Edited tensors against an independent numpy computation (fixtures/edit/make_reference.py, whose
//! results are committed): bf16 and f16 must match exactly or within one ulp, f32 within one ulp.
//!
//! Both sides compute in float64 from exact decodes and round once, to nearest even. They differ
//! only in the float64 summation order of `c = r̂ᵀW` (ours: sequential in i; numpy: its matmul
//! kernels) and of `||r||`, a relative difference of about 1e-16 in `r̂_i c_j`; that can move a value
//! across a rounding boundary only when it lies within about 1e-16 of a tie, so a one-ulp
//! difference is possible but rare.

use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype};
use edit::{Direction, NoProgress, Options, WriteOptions};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/edit").join(rel)
}

/// Distance in ulps between two stored values of the same dtype (sign-magnitude as ordered ints).
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
        other => panic!("no {other} in the reference cases"),
    };
    ordered(x, w).abs_diff(ordered(y, w))
}

fn check_case(case: &str, want_edits: usize) {
    let input = fixture(&format!("inputs/{case}"));
    let ckpt = Checkpoint::open(&input).unwrap();
    let direction = Direction::load(&fixture("direction.safetensors"), ckpt.config.hidden_size).unwrap();
    let plan = edit::plan(&ckpt, &Options::default()).unwrap();
    assert_eq!(plan.edits.len(), want_edits, "{case}: edited tensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    edit::write(&ckpt, &plan, &direction, &out, &WriteOptions::default(), &NoProgress).unwrap();
    let edited = Checkpoint::open(&out).unwrap();

    let expected = checkpoint::Shard::open(&fixture(&format!("expected/{case}.safetensors")), "expected").unwrap();
    let expected_names: Vec<&str> = expected.header.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut planned: Vec<&str> = plan.edits.iter().map(|e| e.name.as_str()).collect();
    planned.sort();
    let mut sorted = expected_names.clone();
    sorted.sort();
    assert_eq!(planned, sorted, "{case}: the writers numpy edits are the ones we edit");

    let (mut exact, mut one_ulp, mut total) = (0usize, 0usize, 0usize);
    for t in &expected.header.tensors {
        let want = expected.tensor_bytes(t);
        let (r, got_entry) = edited.get(&t.name).unwrap();
        assert_eq!((got_entry.dtype, &got_entry.shape), (t.dtype, &t.shape), "{case}: `{}`", t.name);
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
    assert!(total > 0);
    // Bit-identical is the expected outcome; a handful of one-ulp ties is the most we accept.
    assert!(one_ulp * 1000 <= total, "{case}: {one_ulp} of {total} values one ulp apart is too many");
}

#[test]
fn llama_bf16_with_biases_matches_numpy() {
    // embedding, 2 o_proj + 2 o_proj.bias, 2 down_proj + 2 down_proj.bias
    check_case("llama_bias_bf16", 9);
}

#[test]
fn llama_f32_with_biases_matches_numpy() {
    check_case("llama_bias_f32", 9);
}

#[test]
fn llama_f16_matches_numpy() {
    check_case("llama_f16", 5);
}

#[test]
fn gemma2_gain_weighted_edit_matches_numpy() {
    check_case("gemma2_bf16", 5);
}

#[test]
fn qwen3_moe_fused_experts_match_numpy() {
    check_case("qwen3_moe_fused_bf16", 5);
}
