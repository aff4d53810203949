//! `abliterate edit` on the real test model (SmolLM2-135M-Instruct, bf16, tied) with its real
//! direction (`../shared/directions/smollm2-base-l15.safetensors`): every edited tensor matches an
//! independent f64 computation (written here, rounded to bf16 by its own routine) to within one
//! bf16 ulp, every other byte is identical, and every writer's `|r̂ᵀW'| / |r̂ᵀW|` is reported.
//! The table goes to `target/edit-real-model.md` (copied into docs/results.md).
//!
//! Skips (saying so) where `../shared` is absent.

mod util;

use std::fmt::Write as _;

use checkpoint::{Checkpoint, Role};
use serde_json::Value;
use testutil::synth;
use util::abliterate;

/// bf16 bits of an f64, round to nearest even in one step (normal range or zero only).
fn bf16_rne(v: f64) -> u16 {
    assert!(v == 0.0 || (v.is_finite() && v.abs() >= 2f64.powi(-126)), "{v:e} outside the bf16 normal range");
    let b = v.to_bits();
    let lsb = (b >> 45) & 1;
    let r = (b + (1u64 << 44) - 1 + lsb) & !((1u64 << 45) - 1);
    ((f64::from_bits(r) as f32).to_bits() >> 16) as u16
}

fn bf16_to_f32(b: &[u8]) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
}

fn ulps(a: u16, b: u16) -> u32 {
    let ord = |x: u16| if x & 0x8000 != 0 { -((x & 0x7fff) as i32) } else { x as i32 };
    ord(a).abs_diff(ord(b))
}

#[test]
#[allow(clippy::needless_range_loop)] // (o, i, j) index three arrays at once
fn real_model_edit_matches_an_independent_computation() {
    let (Some(model), Some(direction)) = (testutil::smollm2(), testutil::smollm2_direction()) else {
        return;
    };
    let before = synth::hash_dir(&model);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-edited");
    let r = abliterate([
        "edit",
        model.to_str().unwrap(),
        "--direction",
        direction.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(synth::hash_dir(&model), before, "the input changed");

    let input = Checkpoint::open(&model).unwrap();
    let edited = Checkpoint::open(&out).unwrap();
    let d = input.config.hidden_size;
    let dir = direction::Direction::load(&direction, d).unwrap();
    let norm = dir.values.iter().map(|v| v * v).sum::<f64>().sqrt();
    let r_hat: Vec<f64> = dir.values.iter().map(|v| v / norm).collect();
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("abliterate.json")).unwrap()).unwrap();
    let ledger: Vec<&Value> = manifest["edited"].as_array().unwrap().iter().collect();

    let mut table = String::from(
        "| tensor | shape | \\|r̂ᵀW\\| | \\|r̂ᵀW'\\| | ratio | \\|r̂ᵀW\\|/\\|\\|W\\|\\|_F | \\|r̂ᵀW'\\|/\\|\\|W\\|\\|_F | max \\|W'−W\\| |\n|---|---|---|---|---|---|---|---|\n",
    );
    let (mut exact, mut one_ulp, mut total) = (0usize, 0usize, 0usize);
    let mut writers = Vec::new();
    let mut ratios = Vec::new();
    let mut rows: Vec<(Option<usize>, String, String)> = Vec::new();
    for (r, t) in input.tensors() {
        let Role::Writer(w) = input.role(r) else { continue };
        writers.push(t.name.clone());
        let (outer, dd, inner) = w.view(&t.shape);
        assert_eq!(dd, d);
        let a: Vec<f64> = input.bytes(r).chunks_exact(2).map(|b| bf16_to_f32(b) as f64).collect();
        let (ro, _) = edited.get(&t.name).unwrap();
        let got = edited.bytes(ro);
        let mut c = vec![0f64; outer * inner];
        let mut frob = 0f64;
        for o in 0..outer {
            for i in 0..d {
                for j in 0..inner {
                    let v = a[(o * d + i) * inner + j];
                    c[o * inner + j] += r_hat[i] * v;
                    frob += v * v;
                }
            }
        }
        let mut c_after = vec![0f64; outer * inner];
        let mut max_change = 0f64;
        for o in 0..outer {
            for i in 0..d {
                for j in 0..inner {
                    let n = (o * d + i) * inner + j;
                    let want = bf16_rne(a[n] - r_hat[i] * c[o * inner + j]);
                    let have = u16::from_le_bytes([got[2 * n], got[2 * n + 1]]);
                    total += 1;
                    match ulps(want, have) {
                        0 => exact += 1,
                        1 => one_ulp += 1,
                        u => panic!("`{}` element {n}: {u} bf16 ulps from the independent result", t.name),
                    }
                    let v = bf16_to_f32(&got[2 * n..2 * n + 2]) as f64;
                    c_after[o * inner + j] += r_hat[i] * v;
                    max_change = max_change.max((v - a[n]).abs());
                }
            }
        }
        let n2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (pb, pa, frob) = (n2(&c), n2(&c_after), frob.sqrt());
        let l = ledger.iter().find(|l| l["name"] == t.name.as_str()).expect("every writer is in the ledger");
        for (key, mine) in
            [("proj_before", pb), ("proj_after", pa), ("frobenius", frob), ("max_abs_change", max_change)]
        {
            let theirs = l[key].as_f64().unwrap();
            assert!(
                (theirs - mine).abs() <= 1e-9 * mine.abs().max(1e-30),
                "`{}` {key}: ledger {theirs:e}, here {mine:e}",
                t.name
            );
        }
        ratios.push(pa / pb);
        let row = format!(
            "| `{}` | {:?} | {pb:.4} | {pa:.3e} | {:.2e} | {:.3e} | {:.3e} | {max_change:.3e} |",
            t.name,
            t.shape,
            pa / pb,
            pb / frob,
            pa / frob
        );
        rows.push((w.layer, w.kind.label().to_string(), row));
    }
    // Embedding first, then by layer, attention before MLP.
    rows.sort();
    for (_, _, row) in &rows {
        writeln!(table, "{row}").unwrap();
    }
    // Every other byte is identical, and exactly the writers changed.
    let mut changed = synth::assert_same_layout(&model, &out);
    changed.sort();
    writers.sort();
    assert_eq!(changed, writers);
    assert_eq!(writers.len(), 61, "embedding + 30 o_proj + 30 down_proj");
    // Untied: the head is the original embedding.
    let (ri, _) = input.get("model.embed_tokens.weight").unwrap();
    let (rh, _) = edited.get("lm_head.weight").unwrap();
    assert_eq!(edited.bytes(rh), input.bytes(ri));

    ratios.sort_by(f64::total_cmp);
    let summary = format!(
        "{total} edited bf16 values: {exact} identical to the independent computation, {one_ulp} one ulp apart; \
         |r̂ᵀW'|/|r̂ᵀW| over the 61 writers: min {:.2e}, median {:.2e}, max {:.2e}\n",
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );
    eprint!("{summary}");
    assert!(ratios[ratios.len() - 1] < 0.01);
    let report = testutil::workspace_root().join("target/edit-real-model.md");
    std::fs::write(&report, format!("{summary}\n{table}")).unwrap();
    eprintln!("table written to {}", report.display());
}
