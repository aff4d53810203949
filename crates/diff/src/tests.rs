//! Unit tests of the measurements on matrices built here, with expected values computed
//! independently (plain loops over the stored values, Gram-Schmidt for spans).

use checkpoint::Dtype;
use checkpoint::dtype::{decode_f64, encode_f64};

use super::sketch::{self, Layout, Stored};
use super::*;

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn store(dtype: Dtype, v: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_f64(dtype, v, &mut out);
    out
}

fn load(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    let mut v = vec![0f64; bytes.len() / dtype.float_size().unwrap()];
    decode_f64(dtype, bytes, &mut v);
    v
}

/// `W + Σ a_t b_tᵀ` for a `[d, k]` row-major W.
fn plus_outer(w: &[f64], k: usize, terms: &[(&[f64], &[f64])]) -> Vec<f64> {
    let mut out = w.to_vec();
    for (a, b) in terms {
        for (i, ai) in a.iter().enumerate() {
            for (j, bj) in b.iter().enumerate() {
                out[i * k + j] += ai * bj;
            }
        }
    }
    out
}

/// The norm of `r`'s projection onto span(vs) (Gram-Schmidt).
fn projection_norm(r: &[f64], vs: &[&[f64]]) -> f64 {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for v in vs {
        let mut u = v.to_vec();
        for e in &basis {
            let c = dot(&u, e);
            u.iter_mut().zip(e).for_each(|(x, y)| *x -= c * y);
        }
        basis.push(unit(&u));
    }
    basis.iter().map(|e| dot(r, e).powi(2)).sum::<f64>().sqrt()
}

/// Expected sums from the stored values, computed directly.
fn expected(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let max = a.iter().zip(b).map(|(x, y)| (y - x).abs()).fold(0.0, f64::max);
    let dw = a.iter().zip(b).map(|(x, y)| (y - x).powi(2)).sum::<f64>().sqrt();
    let wa = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    (max, dw, dw / wa)
}

fn matrix(d: usize, k: usize) -> Layout {
    Layout { outer: 1, rows: d, inner: k, per_outer: false }
}

#[test]
fn rank_one_update_along_the_direction_is_rank_one_and_aligned() {
    let (d, k) = (48, 40);
    let mut rng = Rng(7);
    let w = rng.vec(d * k);
    let r = unit(&rng.vec(d));
    let b: Vec<f64> = rng.vec(k).iter().map(|x| 0.3 * x).collect();
    let (wa, wb) = (store(Dtype::F32, &w), store(Dtype::F32, &plus_outer(&w, k, &[(&r, &b)])));
    let m = sketch::measure(
        Stored { dtype: Dtype::F32, bytes: &wa, release: None },
        Stored { dtype: Dtype::F32, bytes: &wb, release: None },
        matrix(d, k),
        Some(&r),
    )
    .unwrap();
    let (va, vb) = (load(Dtype::F32, &wa), load(Dtype::F32, &wb));
    let (max, dw, _) = expected(&va, &vb);
    assert_eq!(m.sums.max_abs, max);
    assert!((m.sums.ss_dw.sqrt() - dw).abs() <= 1e-12 * dw);
    let s = &m.slices[0];
    assert_eq!((s.rank, s.exact), (1, true), "{s:?}");
    // σ_1 = ||r̂|| ||b|| up to f32 rounding of B.
    let nb = dot(&b, &b).sqrt();
    assert!((s.singular_values[0] - nb).abs() < 1e-6 * nb, "{} vs {nb}", s.singular_values[0]);
    assert!((s.alignment.unwrap() - 1.0).abs() < 1e-6, "{:?}", s.alignment);
    // r̂ᵀW_B = r̂ᵀW_A + bᵀ, computed column by column from the stored values.
    let proj = |v: &[f64]| (0..k).map(|j| (0..d).map(|i| r[i] * v[i * k + j]).sum::<f64>().powi(2)).sum::<f64>();
    assert!((m.sums.proj_a - proj(&va)).abs() < 1e-12 * proj(&va));
    assert!((m.sums.proj_b - proj(&vb)).abs() < 1e-12 * proj(&vb));
}

#[test]
fn rank_two_update_in_bf16_with_a_random_sketch() {
    // 300 columns > SKETCH: the Gaussian sketch is used, not the identity.
    let (d, k) = (64, 300);
    let mut rng = Rng(11);
    let w = rng.vec(d * k);
    let r = unit(&rng.vec(d));
    let a1 = rng.vec(d);
    let a2 = rng.vec(d);
    let b1 = rng.vec(k);
    let b2: Vec<f64> = rng.vec(k).iter().map(|x| 0.5 * x).collect();
    let wa = store(Dtype::BF16, &w);
    let va = load(Dtype::BF16, &wa);
    let wb = store(Dtype::BF16, &plus_outer(&va, k, &[(&a1, &b1), (&a2, &b2)]));
    let m = sketch::measure(
        Stored { dtype: Dtype::BF16, bytes: &wa, release: None },
        Stored { dtype: Dtype::BF16, bytes: &wb, release: None },
        matrix(d, k),
        Some(&r),
    )
    .unwrap();
    let s = &m.slices[0];
    assert_eq!((s.rank, s.exact), (2, true), "{s:?}");
    let want = projection_norm(&r, &[&a1, &a2]);
    // bf16 rounding of B perturbs the singular vectors by about noise/σ_2.
    assert!((s.alignment.unwrap() - want).abs() < 2e-3, "{:?} vs {want}", s.alignment);
    let (max, dw, _) = expected(&va, &load(Dtype::BF16, &wb));
    assert_eq!(m.sums.max_abs, max);
    assert!((m.sums.ss_dw.sqrt() - dw).abs() <= 1e-12 * dw);
}

#[test]
fn an_orthogonalization_rounded_to_bf16_is_rank_one_aligned_with_the_direction() {
    // method.md §6: W' = W - r̂ (r̂ᵀW) in f64, rounded once to bf16.
    let (d, k) = (128, 384);
    let mut rng = Rng(3);
    let va = load(Dtype::BF16, &store(Dtype::BF16, &rng.vec(d * k)));
    let r = unit(&rng.vec(d));
    let c: Vec<f64> = (0..k).map(|j| (0..d).map(|i| r[i] * va[i * k + j]).sum()).collect();
    let minus_c: Vec<f64> = c.iter().map(|x| -x).collect();
    let (wa, wb) = (store(Dtype::BF16, &va), store(Dtype::BF16, &plus_outer(&va, k, &[(&r, &minus_c)])));
    let m = sketch::measure(
        Stored { dtype: Dtype::BF16, bytes: &wa, release: None },
        Stored { dtype: Dtype::BF16, bytes: &wb, release: None },
        matrix(d, k),
        Some(&r),
    )
    .unwrap();
    let s = &m.slices[0];
    assert_eq!(s.rank, 1, "{s:?}");
    assert!(s.alignment.unwrap() > 0.9999, "{s:?}");
    // What is left along r̂ is bf16 rounding: far below 1% of what was there.
    assert!(m.sums.proj_b.sqrt() < 0.01 * m.sums.proj_a.sqrt());
}

#[test]
fn rounding_alone_is_rank_zero() {
    // A in f32, B the same values rounded to bf16: every element changes, by rounding only.
    let (d, k) = (256, 512);
    let mut rng = Rng(5);
    let w = rng.vec(d * k);
    let (wa, wb) = (store(Dtype::F32, &w), store(Dtype::BF16, &w));
    let m = sketch::measure(
        Stored { dtype: Dtype::F32, bytes: &wa, release: None },
        Stored { dtype: Dtype::BF16, bytes: &wb, release: None },
        matrix(d, k),
        None,
    )
    .unwrap();
    let s = &m.slices[0];
    assert!(m.sums.max_abs > 0.0);
    assert_eq!(s.rank, 0, "{s:?}");
    // The largest singular value of the rounding is well inside the tolerance.
    assert!(s.singular_values[0] < s.tolerance / 2.0, "{s:?}");
}

#[test]
fn row_units_are_thread_count_independent() {
    // [d, k] with d_model on axis 0: units are row ranges (many of them at the test unit size),
    // whose per-column projections and Z add up across units.
    let (d, k) = (96, 700);
    let mut rng = Rng(21);
    let w = rng.vec(d * k);
    let r = unit(&rng.vec(d));
    let (a1, b1, a2, b2) = (rng.vec(d), rng.vec(k), rng.vec(d), rng.vec(k));
    let (wa, wb) = (store(Dtype::BF16, &w), store(Dtype::BF16, &plus_outer(&w, k, &[(&a1, &b1), (&a2, &b2)])));
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
            sketch::measure(
                Stored { dtype: Dtype::BF16, bytes: &wa, release: None },
                Stored { dtype: Dtype::BF16, bytes: &wb, release: None },
                matrix(d, k),
                Some(&r),
            )
            .unwrap()
        })
    };
    let one = run(1);
    assert_eq!(one, run(4), "results must not depend on the thread count");
    assert_eq!(one.slices[0].rank, 2);
    let (va, vb) = (load(Dtype::BF16, &wa), load(Dtype::BF16, &wb));
    let proj = |v: &[f64]| (0..k).map(|j| (0..d).map(|i| r[i] * v[i * k + j]).sum::<f64>().powi(2)).sum::<f64>();
    assert!((one.sums.proj_a - proj(&va)).abs() < 1e-10 * proj(&va));
    assert!((one.sums.proj_b - proj(&vb)).abs() < 1e-10 * proj(&vb));
    let b_only = sketch::measure_b(Stored { dtype: Dtype::BF16, bytes: &wb, release: None }, matrix(d, k), Some(&r));
    assert_eq!((b_only.ss_b, b_only.proj_b), (one.sums.ss_b, one.sums.proj_b));
}

#[test]
fn passes_release_every_byte_they_read() {
    use std::sync::Mutex;
    let (d, k) = (64, 300);
    let mut rng = Rng(23);
    let w = rng.vec(d * k);
    let wa = store(Dtype::F32, &w);
    let wb = store(Dtype::F32, &plus_outer(&w, k, &[(&rng.vec(d), &rng.vec(k))]));
    let released: Mutex<Vec<std::ops::Range<usize>>> = Mutex::new(Vec::new());
    let release = |r: std::ops::Range<usize>| released.lock().unwrap().push(r);
    let m = sketch::measure(
        Stored { dtype: Dtype::F32, bytes: &wa, release: Some(&release) },
        Stored { dtype: Dtype::F32, bytes: &wb, release: Some(&release) },
        matrix(d, k),
        None,
    )
    .unwrap();
    assert_eq!(m.slices[0].rank, 1);
    // Two passes over A and B: every byte released four times, in whole units.
    let mut covered = vec![0u8; wa.len()];
    for r in released.lock().unwrap().iter() {
        covered[r.clone()].iter_mut().for_each(|c| *c += 1);
    }
    assert!(covered.iter().all(|&c| c == 4), "{:?}", covered.iter().position(|&c| c != 4));
}

#[test]
fn a_dense_change_is_more_than_the_exact_range() {
    let (d, k) = (40, 50);
    let mut rng = Rng(9);
    let w = rng.vec(d * k);
    let w2: Vec<f64> = w.iter().map(|x| x + 0.1 * rng.next()).collect();
    let (wa, wb) = (store(Dtype::F32, &w), store(Dtype::F32, &w2));
    let m = sketch::measure(
        Stored { dtype: Dtype::F32, bytes: &wa, release: None },
        Stored { dtype: Dtype::F32, bytes: &wb, release: None },
        matrix(d, k),
        None,
    )
    .unwrap();
    assert_eq!((m.slices[0].rank, m.slices[0].exact), (MAX_EXACT_RANK + 1, false));
}

#[test]
fn embedding_layout_spans_many_units_and_is_thread_count_independent() {
    // [V, d] with d_model on axis 1: Writer::view gives (V, d, 1). 4096 x 64 elements is split into
    // several units in both passes.
    let (v, d) = (4096, 64);
    let mut rng = Rng(13);
    let e = rng.vec(v * d);
    let r = unit(&rng.vec(d));
    // E' = E - (E r̂) r̂ᵀ: row t loses (e_t · r̂) r̂.
    let mut e2 = e.clone();
    for t in 0..v {
        let c = dot(&e[t * d..(t + 1) * d], &r);
        (0..d).for_each(|kk| e2[t * d + kk] -= c * r[kk]);
    }
    let (wa, wb) = (store(Dtype::F32, &e), store(Dtype::F32, &e2));
    let layout = Layout { outer: v, rows: d, inner: 1, per_outer: false };
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
            sketch::measure(
                Stored { dtype: Dtype::F32, bytes: &wa, release: None },
                Stored { dtype: Dtype::F32, bytes: &wb, release: None },
                layout,
                Some(&r),
            )
            .unwrap()
        })
    };
    let one = run(1);
    assert_eq!(one, run(3), "results must not depend on the thread count");
    assert_eq!(one.slices[0].rank, 1);
    assert!((one.slices[0].alignment.unwrap() - 1.0).abs() < 1e-6);
    let (va, vb) = (load(Dtype::F32, &wa), load(Dtype::F32, &wb));
    let (max, dw, _) = expected(&va, &vb);
    assert_eq!(one.sums.max_abs, max);
    assert!((one.sums.ss_dw.sqrt() - dw).abs() <= 1e-10 * dw);
    // E r̂ per row, from the stored values.
    let proj = |x: &[f64]| (0..v).map(|t| dot(&x[t * d..(t + 1) * d], &r).powi(2)).sum::<f64>();
    assert!((one.sums.proj_a - proj(&va)).abs() <= 1e-10 * proj(&va));
    assert!(one.sums.proj_b.sqrt() < 1e-6 * one.sums.proj_a.sqrt());
    // The B-only measurement of the gate agrees with the full one.
    let b_only = sketch::measure_b(Stored { dtype: Dtype::F32, bytes: &wb, release: None }, layout, Some(&r));
    assert_eq!((b_only.ss_b, b_only.proj_b), (one.sums.ss_b, one.sums.proj_b));
}

#[test]
fn fused_experts_are_ranked_per_expert() {
    // [E, d, k] with d_model on axis 1: expert 1 unchanged, expert 0 rank 1, expert 2 rank 2.
    let (e, d, k) = (3, 32, 24);
    let mut rng = Rng(17);
    let w = rng.vec(e * d * k);
    let mut w2 = w.clone();
    let (a1, b1, a2, b2, a3, b3) = (rng.vec(d), rng.vec(k), rng.vec(d), rng.vec(k), rng.vec(d), rng.vec(k));
    let x0 = plus_outer(&w[..d * k], k, &[(&a1, &b1)]);
    let x2 = plus_outer(&w[2 * d * k..], k, &[(&a2, &b2), (&a3, &b3)]);
    w2[..d * k].copy_from_slice(&x0);
    w2[2 * d * k..].copy_from_slice(&x2);
    let (wa, wb) = (store(Dtype::F32, &w), store(Dtype::F32, &w2));
    let m = sketch::measure(
        Stored { dtype: Dtype::F32, bytes: &wa, release: None },
        Stored { dtype: Dtype::F32, bytes: &wb, release: None },
        Layout { outer: e, rows: d, inner: k, per_outer: true },
        None,
    )
    .unwrap();
    assert_eq!(m.slices.iter().map(|s| s.rank).collect::<Vec<_>>(), [1, 0, 2]);
    let c = to_change(&m, false);
    assert_eq!((c.rank, c.rank_exact, c.alignment), (2, true, None));
}

#[test]
fn natural_order_compares_numbers_as_numbers() {
    let mut v = vec!["model.layers.10.a", "model.layers.2.b", "lm_head.weight", "model.layers.2.a", "model.embed"];
    v.sort_by(|x, y| natural_cmp(x, y));
    assert_eq!(v, ["lm_head.weight", "model.embed", "model.layers.2.a", "model.layers.2.b", "model.layers.10.a"]);
}

#[test]
fn config_changes_compare_nested_objects_key_by_key() {
    let a: Map<String, Value> =
        serde_json::from_str(r#"{"tie_word_embeddings":true,"rope":{"theta":1,"type":"x"},"scaling":null,"gone":1}"#)
            .unwrap();
    let b: Map<String, Value> = serde_json::from_str(
        r#"{"tie_word_embeddings":false,"rope":{"theta":2,"type":"x"},"scaling":{"f":8},"new":[1]}"#,
    )
    .unwrap();
    let c = config_changes(&a, &b);
    let show: Vec<String> = c.iter().map(|c| format!("{} {:?} {:?}", c.key, c.a, c.b)).collect();
    assert_eq!(
        show,
        [
            "tie_word_embeddings Some(Bool(true)) Some(Bool(false))",
            "rope.theta Some(Number(1)) Some(Number(2))",
            "scaling Some(Null) Some(Object {\"f\": Number(8)})",
            "gone Some(Number(1)) None",
            "new None Some(Array [Number(1)])",
        ]
    );
}
