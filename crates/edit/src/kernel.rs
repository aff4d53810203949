//! The one orthogonalization kernel (method.md §6), on the view `[outer, d, inner]` of a writer
//! ([`checkpoint::Writer::view`]): weights `[d, k]` are `[1, d, k]`, embeddings `[V, d]` are
//! `[V, d, 1]`, biases `[d]` are `[1, d, 1]`, fused experts `[E, d, k]` are themselves.
//!
//! For every "column" `q = (o, j)` of the view, `c_q = Σ_i u_i W[o, i, j]` is accumulated in f64,
//! in increasing `i`, from exact decodes; then `W'[o, i, j] = W[o, i, j] − s · (u_i c_q)` is formed in
//! f64 and rounded once to the stored dtype (bf16/f16 round to nearest even, directly from f64).
//!
//! Variants (docs/variants.md) generalize this without changing a bit of it: a subspace of `k`
//! orthonormal vectors `u_0..u_{k-1}` has one projection `c_{m,q}` per vector (each summed the same
//! way; stored plane by plane, `c[m * columns + q]`), and the rewrite is
//! `W' = f_q · (W − s · Σ_m u_{m,i} c_{m,q})`, the sum over `m` in increasing order starting from the
//! `m = 0` product, with `f_q = 1` except for norm-preserving edits ([`norm_factors`]). For `k = 1` and
//! `f = 1` this is the formula above, on the same fast path.
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
trait Elem: Sync + Sized {
    const SIZE: usize;
    fn load(b: &[u8]) -> f64;
    fn store(v: f64, out: &mut [u8]);

    /// One run of the rewrite: `out_k = round(w_k − scale · (x_k · y))`, where `x_k · y` is
    /// `u_i c_q` (either factor may be the one that varies along the run). Returns
    /// `max |stored_k − w_k|`.
    #[inline(always)]
    fn rewrite_run(inp: &[u8], out: &mut [u8], xs: &[f64], y: f64, scale: f64) -> f64 {
        rewrite_run_scalar::<Self>(inp, out, xs, y, scale)
    }
}

#[inline(always)]
fn rewrite_run_scalar<E: Elem>(inp: &[u8], out: &mut [u8], xs: &[f64], y: f64, scale: f64) -> f64 {
    let mut max_change = 0f64;
    for ((ob, ib), &x) in out.chunks_exact_mut(E::SIZE).zip(inp.chunks_exact(E::SIZE)).zip(xs) {
        let w = E::load(ib);
        E::store(w - scale * (x * y), ob);
        let change = (E::load(ob) - w).abs();
        if change > max_change {
            max_change = change;
        }
    }
    max_change
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
        out.copy_from_slice(&bf16_rne(v).to_le_bytes());
    }

    #[inline(always)]
    fn rewrite_run(inp: &[u8], out: &mut [u8], xs: &[f64], y: f64, scale: f64) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { bf16_run_avx2(inp, out, xs, y, scale) };
        }
        bf16_run(inp, out, xs, y, scale)
    }
}

/// [`bf16_run`] compiled for AVX2 (4 f64 lanes instead of 2). No FMA: every element sees the
/// same IEEE operations as on the portable path, so results are identical on every CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bf16_run_avx2(inp: &[u8], out: &mut [u8], xs: &[f64], y: f64, scale: f64) -> f64 {
    bf16_run(inp, out, xs, y, scale)
}

/// One bf16 rewrite run with the same rounding as [`bf16_rne`] but without its branch, eight
/// lanes at a time (so that it vectorizes); if any value of the run leaves bf16's normal range
/// (zero, subnormal, inf, NaN), the run is redone on the general path.
#[inline(always)]
fn bf16_run(inp: &[u8], out: &mut [u8], xs: &[f64], y: f64, scale: f64) -> f64 {
    const L: usize = 8;
    let mut lanes = [0f64; L];
    let mut normal = true;
    for ((ib, ob), x) in inp.chunks_exact(2 * L).zip(out.chunks_exact_mut(2 * L)).zip(xs.chunks_exact(L)) {
        for k in 0..L {
            let w = f32::from_bits((u16::from_le_bytes([ib[2 * k], ib[2 * k + 1]]) as u32) << 16) as f64;
            let b = (w - scale * (x[k] * y)).to_bits();
            normal &= ((b >> 52) & 0x7ff).wrapping_sub(1023 - 126) <= 253;
            let r = (b + ((1u64 << 44) - 1) + ((b >> 45) & 1)) & !((1u64 << 45) - 1);
            let h = ((f64::from_bits(r) as f32).to_bits() >> 16) as u16;
            ob[2 * k..2 * k + 2].copy_from_slice(&h.to_le_bytes());
            let change = (f32::from_bits((h as u32) << 16) as f64 - w).abs();
            lanes[k] = if change > lanes[k] { change } else { lanes[k] };
        }
    }
    if !normal {
        return rewrite_run_scalar::<Bf16>(inp, out, xs, y, scale);
    }
    let done = xs.len() / L * L;
    let tail = rewrite_run_scalar::<Bf16>(&inp[2 * done..], &mut out[2 * done..], &xs[done..], y, scale);
    lanes.iter().fold(tail, |m, &c| if c > m { c } else { m })
}

/// f64 -> bf16 bits, round to nearest even in one step: the same result as
/// [`checkpoint::dtype::bf16_from_f64`], computed on the f64 bits for values in bf16's normal range
/// (rounding the 52-bit mantissa to 7 bits, then converting exactly), which is nearly every
/// weight; zeros, subnormals, infinities and NaN take the general path.
#[inline(always)]
pub fn bf16_rne(v: f64) -> u16 {
    let b = v.to_bits();
    let exp = (b >> 52) & 0x7ff;
    if (1023 - 126..=1023 + 127).contains(&exp) {
        let lsb = (b >> 45) & 1;
        let r = (b + (1u64 << 44) - 1 + lsb) & !((1u64 << 45) - 1);
        // At most 8 significant bits and an f32 exponent: exact (or +-inf past bf16's maximum,
        // which is where round to nearest goes).
        ((f64::from_bits(r) as f32).to_bits() >> 16) as u16
    } else {
        bf16_from_f64(v)
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
    if view.inner == 1 {
        return accumulate_rows::<E>(view, rows, bytes, unit, &mut c[cols.clone()], sq.map(|sq| &mut sq[cols]));
    }
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
                None => axpy::<E>(dst, src, u),
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

/// `acc_j += u · W_j` along a row (each `acc_j` its own sum, so lanes are independent).
#[inline(always)]
fn axpy<E: Elem>(acc: &mut [f64], src: &[u8], u: f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { axpy_avx2::<E>(acc, src, u) };
    }
    axpy_portable::<E>(acc, src, u)
}

#[inline(always)]
fn axpy_portable<E: Elem>(acc: &mut [f64], src: &[u8], u: f64) {
    for (a, b) in acc.iter_mut().zip(src.chunks_exact(E::SIZE)) {
        *a += u * E::load(b);
    }
}

/// [`axpy_portable`] for AVX2; no FMA, so the same result on every CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn axpy_avx2<E: Elem>(acc: &mut [f64], src: &[u8], u: f64) {
    axpy_portable::<E>(acc, src, u)
}

/// [`accumulate`] for `inner == 1` (embeddings, biases): one column per `o`, whose rows `i` are
/// contiguous, so each `c_o` is a dot product summed in increasing `i` (continuing the previous
/// chunk's partial sum). `c` and `sq` are the columns touched by `rows`.
fn accumulate_rows<E: Elem>(
    view: View,
    rows: Range<usize>,
    bytes: &[u8],
    unit: &[f64],
    c: &mut [f64],
    sq: Option<&mut [f64]>,
) {
    let o_first = rows.start / view.d;
    let task = |k: usize, c_blk: &mut [f64], mut sq_blk: Option<&mut [f64]>| {
        for n in 0..c_blk.len() {
            let o = o_first + k * COLUMN_BLOCK + n;
            let (i0, i1) = (rows.start.max(o * view.d) - o * view.d, rows.end.min((o + 1) * view.d) - o * view.d);
            let base = o * view.d + i0 - rows.start;
            let src = &bytes[base * E::SIZE..(base + i1 - i0) * E::SIZE];
            let mut acc = c_blk[n];
            match sq_blk.as_deref_mut() {
                None => {
                    for (u, b) in unit[i0..i1].iter().zip(src.chunks_exact(E::SIZE)) {
                        acc += u * E::load(b);
                    }
                }
                Some(sq_blk) => {
                    let mut s2 = sq_blk[n];
                    for (u, b) in unit[i0..i1].iter().zip(src.chunks_exact(E::SIZE)) {
                        let w = E::load(b);
                        acc += u * w;
                        s2 += w * w;
                    }
                    sq_blk[n] = s2;
                }
            }
            c_blk[n] = acc;
        }
    };
    match sq {
        None => c.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(|(k, blk)| task(k, blk, None)),
        Some(sq) => c
            .par_chunks_mut(COLUMN_BLOCK)
            .zip(sq.par_chunks_mut(COLUMN_BLOCK))
            .enumerate()
            .for_each(|(k, (blk, sq_blk))| task(k, blk, Some(sq_blk))),
    }
}

/// [`accumulate`] for a subspace: `units` holds `k` vectors (`[k, d]` row-major) and `c` one plane of
/// [`View::columns`] projections per vector (`c[m * columns + q]`); `sq` is summed once.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_k(
    dtype: Dtype,
    view: View,
    rows: Range<usize>,
    bytes: &[u8],
    units: &[f64],
    c: &mut [f64],
    mut sq: Option<&mut [f64]>,
) {
    let k = units.len() / view.d;
    assert_eq!(units.len(), k * view.d, "accumulate_k: units are [k, d]");
    assert_eq!(c.len(), k * view.columns(), "accumulate_k: one plane of c per vector");
    for (m, (u, c_m)) in units.chunks_exact(view.d).zip(c.chunks_exact_mut(view.columns())).enumerate() {
        let sq_m = if m == 0 { sq.as_deref_mut() } else { None };
        accumulate(dtype, view, rows.clone(), bytes, u, c_m, sq_m);
    }
}

/// Norm-preserving edits (docs/variants.md): the factor `f_q` that restores the norm of every column
/// `q` of the view (the vector the writer adds to the residual stream per unit of its input: a column
/// of a weight `[d, k]`, a row of an embedding, a bias). With `n_q = ||w_q||²` (`sq`, summed in
/// increasing `i`) and `P = I − s V Vᵀ`, `||P w_q||² = n_q − (2s − s²) Σ_m c_{m,q}²` (the sum over `m`
/// in order) and `f_q = sqrt(n_q / ||P w_q||²)`. Where nothing meaningful is left to rescale
/// (`||P w_q||² <= 2^-32 n_q`, i.e. the column lay within 2^-16 of the subspace, or `n_q = 0`),
/// `f_q = 1`.
pub fn norm_factors(sq: &[f64], c: &[f64], scale: f64) -> Vec<f64> {
    let cols = sq.len();
    let k = c.len() / cols.max(1);
    assert_eq!(c.len(), k * cols, "norm_factors: one plane of c per vector");
    let t = 2.0 * scale - scale * scale;
    (0..cols)
        .map(|q| {
            let n = sq[q];
            let mut cc = c[q] * c[q];
            for m in 1..k {
                let v = c[m * cols + q];
                cc += v * v;
            }
            let p = n - t * cc;
            if n > 0.0 && p > n * TINY_REMAINDER { (n / p).sqrt() } else { 1.0 }
        })
        .collect()
}

/// `2^-32`: below this fraction of its squared norm, what is left of a column is not rescaled.
const TINY_REMAINDER: f64 = 2.3283064365386963e-10;

/// [`rewrite`] for every variant: `k` vectors `units` (`[k, d]`), planes `c` (`[k, columns]`) and
/// optional per-column factors `factor` (norm-preserving edits). Takes the fast path of [`rewrite`]
/// when `k = 1` and there are no factors (the same bits either way).
#[allow(clippy::too_many_arguments)]
pub fn rewrite_k(
    dtype: Dtype,
    view: View,
    rows: Range<usize>,
    input: &[u8],
    units: &[f64],
    c: &[f64],
    scale: f64,
    factor: Option<&[f64]>,
    output: &mut [u8],
) -> f64 {
    let k = units.len() / view.d;
    assert_eq!(units.len(), k * view.d, "rewrite_k: units are [k, d]");
    assert_eq!(c.len(), k * view.columns(), "rewrite_k: one plane of c per vector");
    if let Some(f) = factor {
        assert_eq!(f.len(), view.columns(), "rewrite_k: one factor per column");
    }
    if k == 1 && factor.is_none() {
        return rewrite(dtype, view, rows, input, units, c, scale, output);
    }
    if factor.is_none() {
        return dispatch!(dtype, rewrite_subspace::<E>(view, rows, input, units, c, scale, output));
    }
    dispatch!(dtype, rewrite_general::<E>(view, rows, input, units, c, scale, factor, output))
}

/// A subspace without factors on the fast runs: per row, `t = Σ_m u_{m,i} c_{m,q}` (in increasing `m`) is
/// formed first, then the run `W − s · (t · 1)` rounds it; `t · 1 = t` exactly, so these are the bits of
/// [`rewrite_general`].
#[allow(clippy::too_many_arguments)]
fn rewrite_subspace<E: Elem>(
    view: View,
    rows: Range<usize>,
    input: &[u8],
    units: &[f64],
    c: &[f64],
    scale: f64,
    output: &mut [u8],
) -> f64 {
    assert_eq!(input.len(), rows.len() * view.inner * E::SIZE, "rewrite: input must hold exactly `rows`");
    assert_eq!(output.len(), input.len(), "rewrite: output and input have the same length");
    let (d, cols) = (view.d, view.columns());
    let k = units.len() / d;
    let row_bytes = view.inner * E::SIZE;
    if row_bytes == 0 {
        return 0.0;
    }
    let rows_per_task = (REWRITE_BLOCK / view.inner.max(1)).max(1);
    output
        .par_chunks_mut(rows_per_task * row_bytes)
        .zip(input.par_chunks(rows_per_task * row_bytes))
        .enumerate()
        .map(|(task, (out, inp))| {
            let r0 = rows.start + task * rows_per_task;
            let r1 = r0 + inp.len() / row_bytes;
            let mut max_change = 0f64;
            let mut t = Vec::new();
            let mut r = r0;
            while r < r1 {
                let (o, i0) = (r / d, r % d);
                let i1 = (i0 + r1 - r).min(d);
                let span = (r - r0) * row_bytes..(r - r0 + i1 - i0) * row_bytes;
                let (o_slab, i_slab) = (&mut out[span.clone()], &inp[span]);
                let run = if view.inner == 1 {
                    // One column (o) per slab, rows i0..i1: t_i = Σ_m u_{m,i} c_{m,o}.
                    t.clear();
                    t.extend((i0..i1).map(|i| {
                        let mut acc = units[i] * c[o];
                        for m in 1..k {
                            acc += units[m * d + i] * c[m * cols + o];
                        }
                        acc
                    }));
                    E::rewrite_run(i_slab, o_slab, &t, 1.0, scale)
                } else {
                    let mut worst = 0f64;
                    for (n, (o_row, i_row)) in
                        o_slab.chunks_exact_mut(row_bytes).zip(i_slab.chunks_exact(row_bytes)).enumerate()
                    {
                        let i = i0 + n;
                        t.clear();
                        t.extend((0..view.inner).map(|j| {
                            let q = o * view.inner + j;
                            let mut acc = units[i] * c[q];
                            for m in 1..k {
                                acc += units[m * d + i] * c[m * cols + q];
                            }
                            acc
                        }));
                        worst = worst.max(E::rewrite_run(i_row, o_row, &t, 1.0, scale));
                    }
                    worst
                };
                max_change = max_change.max(run);
                r += i1 - i0;
            }
            max_change
        })
        .reduce(|| 0.0, f64::max)
}

#[allow(clippy::too_many_arguments)]
fn rewrite_general<E: Elem>(
    view: View,
    rows: Range<usize>,
    input: &[u8],
    units: &[f64],
    c: &[f64],
    scale: f64,
    factor: Option<&[f64]>,
    output: &mut [u8],
) -> f64 {
    assert_eq!(input.len(), rows.len() * view.inner * E::SIZE, "rewrite: input must hold exactly `rows`");
    assert_eq!(output.len(), input.len(), "rewrite: output and input have the same length");
    let (d, cols) = (view.d, view.columns());
    let k = units.len() / d;
    let row_bytes = view.inner * E::SIZE;
    if row_bytes == 0 {
        return 0.0;
    }
    let rows_per_task = (REWRITE_BLOCK / view.inner.max(1)).max(1);
    output
        .par_chunks_mut(rows_per_task * row_bytes)
        .zip(input.par_chunks(rows_per_task * row_bytes))
        .enumerate()
        .map(|(t, (out, inp))| {
            let mut max_change = 0f64;
            for (n, (o_row, i_row)) in out.chunks_exact_mut(row_bytes).zip(inp.chunks_exact(row_bytes)).enumerate() {
                let r = rows.start + t * rows_per_task + n;
                let (o, i) = (r / d, r % d);
                for (j, (ob, ib)) in o_row.chunks_exact_mut(E::SIZE).zip(i_row.chunks_exact(E::SIZE)).enumerate() {
                    let q = o * view.inner + j;
                    let w = E::load(ib);
                    let mut acc = units[i] * c[q];
                    for m in 1..k {
                        acc += units[m * d + i] * c[m * cols + q];
                    }
                    let mut v = w - scale * acc;
                    if let Some(f) = factor {
                        v *= f[q];
                    }
                    E::store(v, ob);
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
            let r1 = r0 + inp.len() / (view.inner * E::SIZE);
            let mut max_change = 0f64;
            // Slabs of consecutive rows of one `o`: rows i0..i1, sharing c[o, ..].
            let mut r = r0;
            while r < r1 {
                let (o, i0) = (r / view.d, r % view.d);
                let i1 = (i0 + r1 - r).min(view.d);
                let span = (r - r0) * view.inner * E::SIZE..(r - r0 + i1 - i0) * view.inner * E::SIZE;
                let (o_slab, i_slab) = (&mut out[span.clone()], &inp[span]);
                let c_o = &c[o * view.inner..(o + 1) * view.inner];
                let run = if view.inner == 1 {
                    E::rewrite_run(i_slab, o_slab, &unit[i0..i1], c_o[0], scale)
                } else {
                    let row = view.inner * E::SIZE;
                    o_slab
                        .chunks_exact_mut(row)
                        .zip(i_slab.chunks_exact(row))
                        .zip(&unit[i0..i1])
                        .map(|((o_row, i_row), &u)| E::rewrite_run(i_row, o_row, c_o, u, scale))
                        .fold(0f64, f64::max)
                };
                max_change = max_change.max(run);
                r += i1 - i0;
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

    #[test]
    fn variants_do_not_depend_on_chunks_or_threads_and_k1_keeps_the_fast_path() {
        let view = View::new((2, 16, 24));
        let w: Vec<f64> = (0..view.rows() * view.inner).map(|k| ((k * 7919 % 1013) as f64 - 500.0) / 97.0).collect();
        let bytes = enc(Dtype::BF16, &w);
        let u1 = unit_of(&(0..16).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<_>>());
        let u2 = unit_of(&(0..16).map(|i| (i as f64 * 0.11).cos() - 0.3).collect::<Vec<_>>());
        // Make u2 orthogonal to u1 so that the two form a basis.
        let h: f64 = u1.iter().zip(&u2).map(|(a, b)| a * b).sum();
        let u2 = unit_of(&u2.iter().zip(&u1).map(|(b, a)| b - h * a).collect::<Vec<_>>());
        let units: Vec<f64> = u1.iter().chain(&u2).copied().collect();
        let edit = |rows_per: usize, threads: usize, units: &[f64], np: bool| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let row_bytes = view.inner * 2;
                let k = units.len() / view.d;
                let mut c = vec![0f64; k * view.columns()];
                let mut sq = vec![0f64; view.columns()];
                for r0 in (0..view.rows()).step_by(rows_per) {
                    let r = r0..(r0 + rows_per).min(view.rows());
                    let b = &bytes[r.start * row_bytes..r.end * row_bytes];
                    accumulate_k(Dtype::BF16, view, r, b, units, &mut c, Some(&mut sq));
                }
                let f = np.then(|| norm_factors(&sq, &c, 0.8));
                let mut out = vec![0u8; bytes.len()];
                for r0 in (0..view.rows()).step_by(rows_per + 2) {
                    let r = r0..(r0 + rows_per + 2).min(view.rows());
                    let span = r.start * row_bytes..r.end * row_bytes;
                    rewrite_k(Dtype::BF16, view, r, &bytes[span.clone()], units, &c, 0.8, f.as_deref(), &mut out[span]);
                }
                out
            })
        };
        for np in [false, true] {
            assert_eq!(edit(5, 1, &units, np), edit(32, 2, &units, np), "np {np}");
        }
        // k = 1 without factors takes the fast path; the general path gives the same bits.
        let fast = edit(5, 2, &u1, false);
        let mut c = vec![0f64; view.columns()];
        accumulate(Dtype::BF16, view, 0..view.rows(), &bytes, &u1, &mut c, None);
        let mut general = vec![0u8; bytes.len()];
        rewrite_general::<Bf16>(view, 0..view.rows(), &bytes, &u1, &c, 0.8, None, &mut general);
        assert_eq!(fast, general);
        // A subspace without factors takes its own fast path; the general path gives the same bits.
        let fast = edit(7, 2, &units, false);
        let mut c = vec![0f64; 2 * view.columns()];
        accumulate_k(Dtype::BF16, view, 0..view.rows(), &bytes, &units, &mut c, None);
        let mut general = vec![0u8; bytes.len()];
        rewrite_general::<Bf16>(view, 0..view.rows(), &bytes, &units, &c, 0.8, None, &mut general);
        assert_eq!(fast, general);
        // And for an embedding-like view (inner 1).
        let emb = View::new((24, 16, 1));
        let eb = &bytes[..emb.rows() * 2];
        let mut c = vec![0f64; 2 * emb.columns()];
        accumulate_k(Dtype::BF16, emb, 0..emb.rows(), eb, &units, &mut c, None);
        let (mut x, mut y) = (vec![0u8; eb.len()], vec![0u8; eb.len()]);
        rewrite_k(Dtype::BF16, emb, 0..emb.rows(), eb, &units, &c, 1.0, None, &mut x);
        rewrite_general::<Bf16>(emb, 0..emb.rows(), eb, &units, &c, 1.0, None, &mut y);
        assert_eq!(x, y);
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

    /// The spacing of a dtype's subnormals (its smallest positive value).
    fn smallest_step(dt: Dtype) -> f64 {
        match dt {
            Dtype::BF16 => 2f64.powi(-133),
            Dtype::F16 => 2f64.powi(-24),
            Dtype::F32 => 2f64.powi(-149),
            _ => 2f64.powi(-1074),
        }
    }

    #[test]
    fn fast_bf16_rounding_equals_the_general_path() {
        let edges = [
            0.0,
            -0.0,
            1.0 + 2f64.powi(-8),
            1.0 + 2f64.powi(-8) + 2f64.powi(-40),
            f64::MAX,
            3.3961e38,
            3.4e38,
            -3.4e38,
            2f64.powi(-126),
            2f64.powi(-127),
            1e-40,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ];
        for v in edges {
            assert_eq!(bf16_rne(v), bf16_from_f64(v), "{v:e}");
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if !v.is_nan() {
                assert_eq!(bf16_rne(v), bf16_from_f64(v), "{v:e}");
            }
            // Values near ties: a bf16 value plus half an ulp, plus or minus a hair.
            let b = f32::from_bits(((x >> 40) as u32 & 0x7f7f_ffff) << 8) as f64;
            for t in [
                b * (1.0 + 2f64.powi(-9)),
                b * (1.0 + 2f64.powi(-9) + 2f64.powi(-50)),
                b * (1.0 + 2f64.powi(-9) - 2f64.powi(-50)),
            ] {
                assert_eq!(bf16_rne(t), bf16_from_f64(t), "{t:e}");
            }
        }
    }

    #[test]
    fn every_bf16_path_rounds_the_same() {
        // Random weights with zeros, subnormal results, huge values and a NaN mixed in.
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in [1usize, 7, 8, 9, 64, 1000] {
            for special in [false, true] {
                let w: Vec<f64> = (0..len)
                    .map(|k| match (special, k % 5) {
                        (true, 0) => 0.0,
                        (true, 1) => 1e-39,
                        (true, 2) => 3.3e38,
                        _ => f32::from_bits((next() as u32 & 0x3fff_ffff) | 0x3000_0000) as f64,
                    })
                    .collect();
                let xs: Vec<f64> = (0..len).map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5).collect();
                let inp = enc(Dtype::BF16, &w);
                let (mut a, mut b) = (vec![0u8; inp.len()], vec![0u8; inp.len()]);
                let ma = bf16_run(&inp, &mut a, &xs, 0.75, 1.0);
                let mb = rewrite_run_scalar::<Bf16>(&inp, &mut b, &xs, 0.75, 1.0);
                assert_eq!((a.clone(), ma), (b.clone(), mb), "len {len}, special {special}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    let mut c = vec![0u8; inp.len()];
                    // SAFETY: AVX2 is present (checked above).
                    let mc = unsafe { bf16_run_avx2(&inp, &mut c, &xs, 0.75, 1.0) };
                    assert_eq!((c, mc), (b, mb));
                }
            }
        }
    }

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
                    // Half an ulp: relative for normal values, absolute (half the smallest
                    // subnormal step) below the normal range.
                    let half_ulp = (unit_roundoff * x.abs().max(y.abs())).max(smallest_step(dt) / 2.0);
                    let allowed = (u[i] * c1[o * view.inner + j]).abs() * (1.0 + 1e-9) + half_ulp;
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
