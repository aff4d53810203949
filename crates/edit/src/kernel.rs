//! The one orthogonalization kernel (method.md §6), on the view `[outer, d, inner]` of a writer
//! ([`checkpoint::Writer::view`]): weights `[d, k]` are `[1, d, k]`, embeddings `[V, d]` are
//! `[V, d, 1]`, biases `[d]` are `[1, d, 1]`, fused experts `[E, d, k]` are themselves.
//!
//! For every "column" `q = (o, j)` of the view, `c_q = Σ_i u_i W[o, i, j]` is accumulated in f64,
//! in increasing `i`, from exact decodes; then `W'[o, i, j] = W[o, i, j] − s · (u_i c_q)` is formed in
//! f64 and rounded once to the stored dtype (bf16/f16 round to nearest even, directly from f64).
//!
//! The tensor is processed in chunks of whole rows `(o, i)` (a row holds `inner` elements), so
//! memory never holds a whole tensor. Every sum has a fixed order that depends neither on the
//! chunking nor on the thread count: each `c_q` is summed by one task, over `i` in order, across
//! chunks in order. Parallelism is over disjoint blocks of `q` (projection) or of rows (rewrite).

use std::ops::Range;

use checkpoint::Dtype;
use checkpoint::dtype::{bf16_from_f64, f16_from_f64};
use rayon::prelude::*;

/// `[outer, d, inner]` around the d_model axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub outer: usize,
    pub d: usize,
    pub inner: usize,
}

impl View {
    pub fn new((outer, d, inner): (usize, usize, usize)) -> View {
        View { outer, d, inner }
    }

    /// Rows `(o, i)`: `outer * d`.
    pub fn rows(&self) -> usize {
        self.outer * self.d
    }

    /// Columns `q = (o, j)`: `outer * inner`, the length of the projection `c`.
    pub fn columns(&self) -> usize {
        self.outer * self.inner
    }

    /// The columns touched by a range of rows.
    fn columns_of(&self, rows: &Range<usize>) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let o_first = rows.start / self.d;
        let o_last = (rows.end - 1) / self.d;
        o_first * self.inner..(o_last + 1) * self.inner
    }

    /// The rows of `rows` that touch columns `cols` (which lie in whole `o` blocks or inside one).
    fn rows_of(&self, cols: &Range<usize>, rows: &Range<usize>) -> Range<usize> {
        let o_first = cols.start / self.inner;
        let o_last = (cols.end - 1) / self.inner;
        rows.start.max(o_first * self.d)..rows.end.min((o_last + 1) * self.d)
    }
}

/// Columns per projection task (the split does not change any result, only the scheduling).
const COLUMN_BLOCK: usize = 512;
/// Elements per rewrite task, roughly.
const REWRITE_BLOCK: usize = 1 << 16;

/// A stored float type: exact load to f64 and one rounding on store.
trait Elem: Sync {
    const SIZE: usize;
    fn load(b: &[u8]) -> f64;
    fn store(v: f64, out: &mut [u8]);
}

struct Bf16;
struct F16;
struct F32;
struct F64;

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&bf16_from_f64(v).to_le_bytes());
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64()
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&f16_from_f64(v).to_le_bytes());
    }
}

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&(v as f32).to_le_bytes());
    }
}

impl Elem for F64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f64::from_le_bytes(b.try_into().expect("8-byte element"))
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident::<E>($($arg:expr),*)) => {
        match $dtype {
            Dtype::BF16 => $f::<Bf16>($($arg),*),
            Dtype::F16 => $f::<F16>($($arg),*),
            Dtype::F32 => $f::<F32>($($arg),*),
            Dtype::F64 => $f::<F64>($($arg),*),
            other => panic!("kernel called on {other}; plan() admits only float writers"),
        }
    };
}

/// Adds the rows `rows` of a tensor (their stored bytes in `bytes`) to the projection:
/// `c[q] += u_i W[o, i, j]` for each row in order, and, if given, `sq[q] += W[o, i, j]²`
/// (for `||W||_F`). `c` and `sq` span all [`View::columns`] of the tensor.
pub fn accumulate(
    dtype: Dtype,
    view: View,
    rows: Range<usize>,
    bytes: &[u8],
    unit: &[f64],
    c: &mut [f64],
    sq: Option<&mut [f64]>,
) {
    dispatch!(dtype, accumulate_typed::<E>(view, rows, bytes, unit, c, sq))
}

fn accumulate_typed<E: Elem>(
    view: View,
    rows: Range<usize>,
    bytes: &[u8],
    unit: &[f64],
    c: &mut [f64],
    sq: Option<&mut [f64]>,
) {
    assert_eq!(bytes.len(), rows.len() * view.inner * E::SIZE, "accumulate: bytes must hold exactly `rows`");
    assert_eq!(c.len(), view.columns(), "accumulate: `c` spans every column");
    assert_eq!(unit.len(), view.d, "accumulate: the unit vector has length d");
    let cols = view.columns_of(&rows);
    let c = &mut c[cols.clone()];
    let task = |k: usize, c_blk: &mut [f64], mut sq_blk: Option<&mut [f64]>| {
        let blk = cols.start + k * COLUMN_BLOCK..cols.start + k * COLUMN_BLOCK + c_blk.len();
        for r in view.rows_of(&blk, &rows) {
            let (o, i) = (r / view.d, r % view.d);
            let u = unit[i];
            // Columns of this row inside the block.
            let lo = blk.start.max(o * view.inner);
            let hi = blk.end.min((o + 1) * view.inner);
            if lo >= hi {
                continue;
            }
            let base = (r - rows.start) * view.inner + (lo - o * view.inner);
            let src = &bytes[base * E::SIZE..(base + hi - lo) * E::SIZE];
            let dst = &mut c_blk[lo - blk.start..hi - blk.start];
            match sq_blk.as_deref_mut() {
                None => {
                    for (acc, b) in dst.iter_mut().zip(src.chunks_exact(E::SIZE)) {
                        *acc += u * E::load(b);
                    }
                }
                Some(sq_blk) => {
                    let sq_dst = &mut sq_blk[lo - blk.start..hi - blk.start];
                    for ((acc, s), b) in dst.iter_mut().zip(sq_dst.iter_mut()).zip(src.chunks_exact(E::SIZE)) {
                        let w = E::load(b);
                        *acc += u * w;
                        *s += w * w;
                    }
                }
            }
        }
    };
    match sq {
        None => c.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(|(k, blk)| task(k, blk, None)),
        Some(sq) => c
            .par_chunks_mut(COLUMN_BLOCK)
            .zip(sq[cols.clone()].par_chunks_mut(COLUMN_BLOCK))
            .enumerate()
            .for_each(|(k, (blk, sq_blk))| task(k, blk, Some(sq_blk))),
    }
}

/// Rewrites rows `rows` (stored bytes `input`) into `output` (same length):
/// `W' = W − scale · (u_i c_q)`, formed in f64 and rounded once to `dtype`.
/// Returns `max |W'_stored − W|` over these rows.
#[allow(clippy::too_many_arguments)]
pub fn rewrite(
    dtype: Dtype,
    view: View,
    rows: Range<usize>,
    input: &[u8],
    unit: &[f64],
    c: &[f64],
    scale: f64,
    output: &mut [u8],
) -> f64 {
    dispatch!(dtype, rewrite_typed::<E>(view, rows, input, unit, c, scale, output))
}

fn rewrite_typed<E: Elem>(
    view: View,
    rows: Range<usize>,
    input: &[u8],
    unit: &[f64],
    c: &[f64],
    scale: f64,
    output: &mut [u8],
) -> f64 {
    assert_eq!(input.len(), rows.len() * view.inner * E::SIZE, "rewrite: input must hold exactly `rows`");
    assert_eq!(output.len(), input.len(), "rewrite: output and input have the same length");
    let rows_per_task = (REWRITE_BLOCK / view.inner.max(1)).max(1);
    let task_bytes = rows_per_task * view.inner * E::SIZE;
    if task_bytes == 0 {
        return 0.0;
    }
    output
        .par_chunks_mut(task_bytes)
        .zip(input.par_chunks(task_bytes))
        .enumerate()
        .map(|(k, (out, inp))| {
            let r0 = rows.start + k * rows_per_task;
            let mut max_change = 0f64;
            for (n, (o_row, i_row)) in
                out.chunks_exact_mut(view.inner * E::SIZE).zip(inp.chunks_exact(view.inner * E::SIZE)).enumerate()
            {
                let r = r0 + n;
                let (o, i) = (r / view.d, r % view.d);
                let u = unit[i];
                let c_row = &c[o * view.inner..(o + 1) * view.inner];
                for ((ob, ib), &cq) in o_row.chunks_exact_mut(E::SIZE).zip(i_row.chunks_exact(E::SIZE)).zip(c_row) {
                    let w = E::load(ib);
                    E::store(w - scale * (u * cq), ob);
                    let change = (E::load(ob) - w).abs();
                    if change > max_change {
                        max_change = change;
                    }
                }
            }
            max_change
        })
        .reduce(|| 0.0, f64::max)
}

/// Sum of squares in index order, then the square root: `||c||_2` with a fixed order.
pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// A whole tensor edited in memory (tests, and small tensors): returns the new bytes.
pub fn edit_bytes(dtype: Dtype, view: View, bytes: &[u8], unit: &[f64], scale: f64) -> Vec<u8> {
    let mut c = vec![0f64; view.columns()];
    accumulate(dtype, view, 0..view.rows(), bytes, unit, &mut c, None);
    let mut out = vec![0u8; bytes.len()];
    rewrite(dtype, view, 0..view.rows(), bytes, unit, &c, scale, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::dtype::{decode_f64, encode_f64};
    use proptest::prelude::*;

    fn enc(dtype: Dtype, v: &[f64]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_f64(dtype, v, &mut b);
        b
    }

    fn dec(dtype: Dtype, b: &[u8]) -> Vec<f64> {
        let mut v = vec![0f64; b.len() / dtype.float_size().unwrap()];
        decode_f64(dtype, b, &mut v);
        v
    }

    fn unit_of(r: &[f64]) -> Vec<f64> {
        let n = norm(r);
        r.iter().map(|x| x / n).collect()
    }

    /// The projection `c_q` computed naively from the decoded tensor.
    fn naive_c(view: View, w: &[f64], u: &[f64]) -> Vec<f64> {
        let mut c = vec![0f64; view.columns()];
        for o in 0..view.outer {
            for i in 0..view.d {
                for j in 0..view.inner {
                    c[o * view.inner + j] += u[i] * w[(o * view.d + i) * view.inner + j];
                }
            }
        }
        c
    }

    #[test]
    fn matches_the_formula_on_a_small_matrix() {
        // W = [[1, 2], [3, 4]] (d = 2, k = 2), u = (0.6, 0.8): c = (3, 4.4); W' = W − u cᵀ.
        let view = View::new((1, 2, 2));
        let w = [1.0, 2.0, 3.0, 4.0];
        let out = dec(Dtype::F64, &edit_bytes(Dtype::F64, view, &enc(Dtype::F64, &w), &[0.6, 0.8], 1.0));
        let want = [1.0 - 0.6 * 3.0, 2.0 - 0.6 * 4.4, 3.0 - 0.8 * 3.0, 4.0 - 0.8 * 4.4];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{out:?} vs {want:?}");
        }
        // The embedding view [V, d, 1] projects rows: E = [[1, 2], [3, 4]], c_t = E[t]·u = (2.2, 5).
        let view = View::new((2, 2, 1));
        let out = dec(Dtype::F64, &edit_bytes(Dtype::F64, view, &enc(Dtype::F64, &w), &[0.6, 0.8], 1.0));
        let want = [1.0 - 2.2 * 0.6, 2.0 - 2.2 * 0.8, 3.0 - 5.0 * 0.6, 4.0 - 5.0 * 0.8];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn chunking_and_threads_do_not_change_a_bit() {
        let view = View::new((3, 16, 40));
        let w: Vec<f64> = (0..view.rows() * view.inner).map(|k| ((k * 7919 % 1013) as f64 - 500.0) / 97.0).collect();
        let u = unit_of(&(0..16).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<_>>());
        let bytes = enc(Dtype::BF16, &w);
        let whole = edit_bytes(Dtype::BF16, view, &bytes, &u, 1.0);
        // Same tensor in chunks of 5 rows, in a 1-thread pool.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let chunked = pool.install(|| {
            let row_bytes = view.inner * 2;
            let mut c = vec![0f64; view.columns()];
            for r0 in (0..view.rows()).step_by(5) {
                let r = r0..(r0 + 5).min(view.rows());
                accumulate(
                    Dtype::BF16,
                    view,
                    r.clone(),
                    &bytes[r.start * row_bytes..r.end * row_bytes],
                    &u,
                    &mut c,
                    None,
                );
            }
            let mut out = vec![0u8; bytes.len()];
            for r0 in (0..view.rows()).step_by(7) {
                let r = r0..(r0 + 7).min(view.rows());
                let span = r.start * row_bytes..r.end * row_bytes;
                rewrite(Dtype::BF16, view, r, &bytes[span.clone()], &u, &c, 1.0, &mut out[span]);
            }
            out
        });
        assert_eq!(whole, chunked);
        // And the projection equals the sequential-in-i naive sum bit for bit.
        let mut c = vec![0f64; view.columns()];
        accumulate(Dtype::BF16, view, 0..view.rows(), &bytes, &u, &mut c, None);
        assert_eq!(c, naive_c(view, &dec(Dtype::BF16, &bytes), &u));
    }

    /// Random tensors: a view, values of moderate range, and a direction.
    fn case() -> impl Strategy<Value = (View, Vec<f64>, Vec<f64>, f64)> {
        (1usize..3, 2usize..24, 1usize..20).prop_flat_map(|(outer, d, inner)| {
            let n = outer * d * inner;
            (
                Just(View { outer, d, inner }),
                prop::collection::vec(-4.0f64..4.0, n),
                prop::collection::vec(-1.0f64..1.0, d).prop_filter("nonzero", |r| norm(r) > 1e-3),
                prop_oneof![Just(1.0), 0.1f64..2.0],
            )
        })
    }

    const DTYPES: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

    proptest! {
        /// method.md §6 law 1: for every column, |Σ_i u_i W'_stored[i, j]| ≤ u · Σ_i |u_i| |W'[i, j]|
        /// (plus a float64 term), after rounding to the stored dtype.
        #[test]
        fn orthogonality_bound((view, w, r, _s) in case()) {
            let u = unit_of(&r);
            for dt in DTYPES {
                let input = enc(dt, &w);
                let out = dec(dt, &edit_bytes(dt, view, &input, &u, 1.0));
                let c_after = naive_c(view, &out, &u);
                let abs: Vec<f64> = out.iter().map(|x| x.abs()).collect();
                let bound = naive_c(view, &abs, &u.iter().map(|x| x.abs()).collect::<Vec<_>>());
                let unit_roundoff = dt.unit_roundoff().unwrap();
                let w_in = dec(dt, &input);
                let scale_w = w_in.iter().fold(0f64, |m, x| m.max(x.abs()));
                for (q, (ca, b)) in c_after.iter().zip(&bound).enumerate() {
                    prop_assert!(ca.abs() <= unit_roundoff * b + 1e-12 * (1.0 + scale_w) * view.d as f64,
                        "{dt} column {q}: |r̂ᵀW'| = {ca:e} > bound {b:e}");
                }
            }
        }

        /// Law 2: applying the edit again changes an entry by at most |u_i c'_q| plus half an ulp.
        #[test]
        fn idempotence_bound((view, w, r, _s) in case()) {
            let u = unit_of(&r);
            for dt in DTYPES {
                let once = edit_bytes(dt, view, &enc(dt, &w), &u, 1.0);
                let twice = edit_bytes(dt, view, &once, &u, 1.0);
                let (a, b) = (dec(dt, &once), dec(dt, &twice));
                let c1 = naive_c(view, &a, &u);
                let unit_roundoff = dt.unit_roundoff().unwrap();
                for (n, (x, y)) in a.iter().zip(&b).enumerate() {
                    let (o, i, j) = (n / view.inner / view.d, n / view.inner % view.d, n % view.inner);
                    let allowed = (u[i] * c1[o * view.inner + j]).abs() * (1.0 + 1e-9) + unit_roundoff * x.abs().max(y.abs()) + 1e-300;
                    prop_assert!((x - y).abs() <= allowed, "{dt} entry {n}: {x:e} -> {y:e}, allowed {allowed:e}");
                }
            }
        }

        /// Law 3: P W' = P W up to the rounding of W' (each stored entry is within half an ulp of
        /// the exact W − u cᵀ, whose complement part is that of W).
        #[test]
        fn complement_unchanged((view, w, r, _s) in case()) {
            let u = unit_of(&r);
            for dt in DTYPES {
                let input = enc(dt, &w);
                let (w_in, out) = (dec(dt, &input), dec(dt, &edit_bytes(dt, view, &input, &u, 1.0)));
                let unit_roundoff = dt.unit_roundoff().unwrap();
                // P x = x − u (uᵀx) per column, for W and W'.
                let (cw, co) = (naive_c(view, &w_in, &u), naive_c(view, &out, &u));
                for n in 0..w_in.len() {
                    let (o, i, j) = (n / view.inner / view.d, n / view.inner % view.d, n % view.inner);
                    let q = o * view.inner + j;
                    let pw = w_in[n] - u[i] * cw[q];
                    let po = out[n] - u[i] * co[q];
                    // Rounding error of W' (≤ u|W'| per entry) leaks into P W' through the column sum.
                    let col_err: f64 = (0..view.d).map(|k| out[(o * view.d + k) * view.inner + j].abs()).sum::<f64>() * unit_roundoff;
                    prop_assert!((pw - po).abs() <= unit_roundoff * out[n].abs() + col_err + 1e-12,
                        "{dt} entry {n}: P W = {pw:e}, P W' = {po:e}");
                }
            }
        }

        /// Law 4 and the scale variant: W − W' = s u cᵀ is rank one; in f64 storage every entry
        /// matches s u_i c_q to rounding, and each column's change lies along u.
        #[test]
        fn rank_one_and_scale((view, w, r, s) in case()) {
            let u = unit_of(&r);
            let input = enc(Dtype::F64, &w);
            let out = dec(Dtype::F64, &edit_bytes(Dtype::F64, view, &input, &u, s));
            let c = naive_c(view, &w, &u);
            for n in 0..w.len() {
                let (o, i, j) = (n / view.inner / view.d, n / view.inner % view.d, n % view.inner);
                let want = s * u[i] * c[o * view.inner + j];
                let got = w[n] - out[n];
                prop_assert!((got - want).abs() <= 1e-12 * (1.0 + w[n].abs()), "entry {n}: {got:e} vs {want:e}");
            }
            // After the edit the component along u is (1 − s) times the original.
            let c_after = naive_c(view, &out, &u);
            for (a, b) in c_after.iter().zip(&c) {
                prop_assert!((a - (1.0 - s) * b).abs() <= 1e-12 * (1.0 + b.abs()) * view.d as f64);
            }
        }
    }
}
