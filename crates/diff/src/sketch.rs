//! Streaming measurements of one changed tensor: max `|dW|`, Frobenius norms, projections on a
//! direction, and the numerical rank and column space of `dW = W_B - W_A`.
//!
//! A tensor is seen as matrices with `rows` on the left (the d_model axis for residual writers,
//! from `Writer::view`) and every other index as a column. It is never decoded whole: elements
//! are read in small pieces straight from the memory maps, so memory is `O((rows + cols) * P)`
//! whatever the tensor size.
//!
//! Rank (a randomized range finder, Halko, Martinsson and Tropp 2011, Algorithm 4.1):
//! 1. `Y = dW Ω` with `Ω` a fixed-seed Gaussian `cols x P` matrix (`P` = [`SKETCH`] columns;
//!    when `cols <= P`, `Ω = I` and the result is exact);
//! 2. `Q = orth(Y)` (faer QR), a basis of (almost all of) the column space of `dW`;
//! 3. `Z = Qᵀ dW` (`P x cols`), whose singular values are those of `dW` restricted to `Q`, and
//!    whose left singular vectors `U_Z` give those of `dW` as `Q U_Z` (faer thin SVD).
//!
//! The numerical rank counts singular values above a tolerance `τ` that covers the rounding of
//! B's stored dtype (see [`tolerance`]). Every reduction has a fixed order: work is split into
//! units chosen from the shape alone, each unit sums sequentially, and units are combined in
//! order, so results are identical for any thread count.

use checkpoint::Dtype;
use checkpoint::dtype::decode_f32;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{Mat, MatRef, Par};
use rayon::prelude::*;

/// Columns of the random sketch `Ω`.
pub const SKETCH: usize = 16;
/// Ranks up to this are reported exactly; a larger count means "more than this" (the sketch
/// keeps `SKETCH - MAX_EXACT_RANK` columns of oversampling, which makes the top singular values
/// reliable).
pub const MAX_EXACT_RANK: usize = 12;
/// The rounding-noise estimate is multiplied by this safety factor.
pub const NOISE_FACTOR: f64 = 3.0;
/// Singular values below this fraction of the largest are never counted: the f64 arithmetic
/// of the sketch does not resolve them.
pub const RESOLUTION: f64 = 1e-10;
/// Fixed seed of `Ω`: the same tensors always give the same numbers.
const SEED: u64 = 0x0ab1_17e2_a7ed_d1ff;
/// Elements decoded at a time.
const PIECE: usize = 512;
/// Work units hold at least this many elements (smaller tensors are one unit) ...
const MIN_UNIT: usize = 1 << 16;
/// ... and a slice is split into at most this many units per pass.
const MAX_UNITS: usize = 64;

/// A stored tensor: its dtype (a float type) and bytes.
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    pub dtype: Dtype,
    pub bytes: &'a [u8],
}

/// How a tensor is seen as matrices: `[outer, rows, inner]` in row-major order, each matrix
/// having `rows` rows and the `(o, i)` pairs of its slice as columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub rows: usize,
    pub inner: usize,
    /// One matrix per outer index (fused 3-D experts) instead of one over the whole tensor.
    pub per_outer: bool,
}

impl Layout {
    fn slices(&self) -> Vec<Slice> {
        if self.per_outer {
            (0..self.outer).map(|o| Slice { o0: o, n_o: 1, rows: self.rows, inner: self.inner }).collect()
        } else {
            vec![Slice { o0: 0, n_o: self.outer, rows: self.rows, inner: self.inner }]
        }
    }
}

/// One matrix: outer indices `o0..o0 + n_o`, `rows x (n_o * inner)`.
#[derive(Clone, Copy, Debug)]
struct Slice {
    o0: usize,
    n_o: usize,
    rows: usize,
    inner: usize,
}

impl Slice {
    fn cols(&self) -> usize {
        self.n_o * self.inner
    }

    /// Element range of the slice in the tensor.
    fn elements(&self) -> std::ops::Range<usize> {
        let start = self.o0 * self.rows * self.inner;
        start..start + self.n_o * self.rows * self.inner
    }
}

/// What one slice's `dW` looks like.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRank {
    /// Singular values above [`SliceRank::tolerance`] (capped: see [`SliceRank::exact`]).
    pub rank: usize,
    /// False when the count exceeded [`MAX_EXACT_RANK`]: the rank is then only known to be larger.
    pub exact: bool,
    /// The largest singular values of `dW`, descending (at most [`SKETCH`]).
    pub singular_values: Vec<f64>,
    pub tolerance: f64,
    /// `||U_kᵀ d̂||` over the `rank` left singular vectors: 1 when `dW`'s columns lie in the span
    /// of the direction. None without a direction or when the rank is 0.
    pub alignment: Option<f64>,
}

/// Sums over a tensor (or the B side only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sums {
    pub max_abs: f64,
    /// `||dW||_F²`, `||W_A||_F²`, `||W_B||_F²`.
    pub ss_dw: f64,
    pub ss_a: f64,
    pub ss_b: f64,
    /// `||d̂ᵀ W_A||²` and `||d̂ᵀ W_B||²` (sums of squared column projections), with a direction.
    pub proj_a: f64,
    pub proj_b: f64,
}

impl Sums {
    fn add(&mut self, o: &Sums) {
        self.max_abs = self.max_abs.max(o.max_abs);
        self.ss_dw += o.ss_dw;
        self.ss_a += o.ss_a;
        self.ss_b += o.ss_b;
        self.proj_a += o.proj_a;
        self.proj_b += o.proj_b;
    }
}

/// The measurements of a changed tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub sums: Sums,
    /// One per matrix (one per expert for fused experts).
    pub slices: Vec<SliceRank>,
}

/// Measures `dW = B - A` for two float tensors of the same shape. `direction` (unit, length
/// `layout.rows`) adds projections and alignment.
pub fn measure(a: Stored, b: Stored, layout: Layout, direction: Option<&[f64]>) -> Result<Measured, String> {
    let results: Vec<Result<(Sums, SliceRank), String>> =
        layout.slices().into_par_iter().map(|s| measure_slice(a, b, s, direction)).collect();
    let mut sums = Sums::default();
    let mut slices = Vec::with_capacity(results.len());
    for r in results {
        let (s, rank) = r?;
        sums.add(&s);
        slices.push(rank);
    }
    Ok(Measured { sums, slices })
}

/// Sums of the B side alone (`||W_B||_F²` and `||d̂ᵀ W_B||²`): what the orthogonality gate needs
/// of a tensor that did not change.
pub fn measure_b(b: Stored, layout: Layout, direction: Option<&[f64]>) -> Sums {
    let partials: Vec<Sums> = layout
        .slices()
        .into_par_iter()
        .map(|s| {
            let unit = cols_per_unit(s.rows, s.cols());
            let units: Vec<Sums> = (0..s.cols().div_ceil(unit))
                .into_par_iter()
                .map(|u| pass2_unit(b, b, s, u, unit, direction, None).0)
                .collect();
            let mut total = Sums::default();
            units.iter().for_each(|p| total.add(p));
            total
        })
        .collect();
    let mut total = Sums::default();
    partials.iter().for_each(|p| total.add(p));
    total
}

fn measure_slice(a: Stored, b: Stored, s: Slice, direction: Option<&[f64]>) -> Result<(Sums, SliceRank), String> {
    let size_a = a.dtype.float_size().expect("callers pass float dtypes");
    let size_b = b.dtype.float_size().expect("callers pass float dtypes");
    let (rows, cols) = (s.rows, s.cols());
    let range = s.elements();
    let u_b = b.dtype.unit_roundoff().expect("float dtype");
    let empty = SliceRank { rank: 0, exact: true, singular_values: Vec::new(), tolerance: 0.0, alignment: None };
    if rows == 0 || cols == 0 {
        return Ok((Sums::default(), empty));
    }
    // Fast path: a slice whose bytes did not change (a fused expert left alone) has dW = 0.
    if a.dtype == b.dtype
        && a.bytes[range.start * size_a..range.end * size_a] == b.bytes[range.start * size_b..range.end * size_b]
    {
        let unit = cols_per_unit(rows, cols);
        let mut sums = Sums::default();
        let units: Vec<Sums> =
            (0..cols.div_ceil(unit)).into_par_iter().map(|u| pass2_unit(b, b, s, u, unit, direction, None).0).collect();
        units.iter().for_each(|p| sums.add(p));
        sums.ss_a = sums.ss_b;
        sums.proj_a = sums.proj_b;
        return Ok((sums, empty));
    }

    // 1. Y = dW Ω (rows x p), row-major; units are disjoint row ranges.
    let p = cols.min(SKETCH);
    let omega = omega(cols, p);
    let mut y = vec![0f64; rows * p];
    let row_unit = rows_per_unit(rows, cols);
    let row_noise: Vec<f64> = y
        .par_chunks_mut(row_unit * p)
        .enumerate()
        .map(|(u, chunk)| pass1_unit(a, b, s, u * row_unit, chunk, p, &omega, u_b))
        .collect();
    let max_row_noise = row_noise.into_iter().fold(0.0, f64::max);

    // 2. Q = orth(Y), rows x kq, row-major.
    let (q, kq) = orthonormal_columns(&y, rows, p);
    if kq == 0 {
        // dW Ω = 0 although bytes differ: only signed zeros (or NaNs) changed.
        let unit = cols_per_unit(rows, cols);
        let units: Vec<Sums> =
            (0..cols.div_ceil(unit)).into_par_iter().map(|u| pass2_unit(a, b, s, u, unit, direction, None).0).collect();
        let mut sums = Sums::default();
        units.iter().for_each(|p| sums.add(p));
        return Ok((sums, empty));
    }

    // 3. Z = Qᵀ dW (kq x cols, column-major), with every sum; units are disjoint column ranges.
    let col_unit = cols_per_unit(rows, cols);
    let mut z = vec![0f64; cols * kq];
    let partials: Vec<(Sums, f64)> = z
        .par_chunks_mut(col_unit * kq)
        .enumerate()
        .map(|(u, chunk)| pass2_unit(a, b, s, u, col_unit, direction, Some((&q, kq, chunk))))
        .collect();
    let mut sums = Sums::default();
    let mut max_col_noise = 0f64;
    for (p, n) in &partials {
        sums.add(p);
        max_col_noise = max_col_noise.max(*n);
    }

    let (sv, u_z) = svd_sequential(&z, kq, cols)?;
    let tol = tolerance(max_row_noise, max_col_noise, sv.first().copied().unwrap_or(0.0));
    let count = sv.iter().filter(|&&v| v > tol).count();
    // With Ω = I, or Q spanning all of R^rows, the sketch saw everything.
    let complete = p == cols || kq == rows;
    let exact = complete || count <= MAX_EXACT_RANK;
    let rank = if exact { count } else { MAX_EXACT_RANK + 1 };
    let alignment = direction.filter(|_| count > 0).map(|d| {
        // r̂ᵀ (Q U_Z[:, t]) = (Qᵀ r̂)ᵀ U_Z[:, t].
        let mut w = vec![0f64; kq];
        for k in 0..rows {
            for c in 0..kq {
                w[c] += q[k * kq + c] * d[k];
            }
        }
        let mut ss = 0f64;
        for t in 0..count {
            let proj: f64 = (0..kq).map(|c| w[c] * u_z[(c, t)]).sum();
            ss += proj * proj;
        }
        ss.sqrt()
    });
    Ok((sums, SliceRank { rank, exact, singular_values: sv, tolerance: tol, alignment }))
}

/// The rank tolerance `τ`.
///
/// `B = fl(A + Δ)` stores each element with a rounding error of at most `u|b|` (`u` the unit
/// roundoff of B's dtype: 2^-8 bf16, 2^-11 f16, 2^-24 f32, method.md §6, laws), so
/// `dW = Δ + E` with a full-rank but tiny `E`. Treating the errors as independent with variance
/// `(u b)²/3` (uniform within ±u|b|), the expected spectral norm of `E` is at most about
/// `sqrt(max row sum of variances) + sqrt(max column sum)` (Latała 2005; Bandeira and van Handel
/// 2016). `τ` is [`NOISE_FACTOR`] times that, and never below [`RESOLUTION`] `σ_1`. A pure
/// orthogonalization has `σ_1 = ||r̂ᵀW||` (about `||W||_F / sqrt(d)`), far above `τ` in any dtype.
pub fn tolerance(max_row_noise: f64, max_col_noise: f64, sigma1: f64) -> f64 {
    (NOISE_FACTOR * (max_row_noise.sqrt() + max_col_noise.sqrt())).max(RESOLUTION * sigma1)
}

/// An orthonormal basis of the columns of `y` (`rows x p`, row-major) by classical Gram-Schmidt
/// with reorthogonalization (CGS2, accurate to working precision). Columns that vanish are
/// dropped. Returns the basis (`rows x kq`, row-major) and `kq`. Sequential, so deterministic.
fn orthonormal_columns(y: &[f64], rows: usize, p: usize) -> (Vec<f64>, usize) {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(p);
    let scale = (0..p).map(|c| (0..rows).map(|k| y[k * p + c] * y[k * p + c]).sum::<f64>()).fold(0.0, f64::max).sqrt();
    for c in 0..p {
        let mut v: Vec<f64> = (0..rows).map(|k| y[k * p + c]).collect();
        for _ in 0..2 {
            for e in &basis {
                let h: f64 = v.iter().zip(e).map(|(x, y)| x * y).sum();
                v.iter_mut().zip(e).for_each(|(x, y)| *x -= h * y);
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        // What is left of a column inside the span of the others is rounding; keep only
        // directions that carry signal, and never more than `rows` of them.
        if n > 1e-14 * scale && basis.len() < rows {
            v.iter_mut().for_each(|x| *x /= n);
            basis.push(v);
        }
    }
    let kq = basis.len();
    let mut q = vec![0f64; rows * kq];
    for (c, e) in basis.iter().enumerate() {
        for k in 0..rows {
            q[k * kq + c] = e[k];
        }
    }
    (q, kq)
}

/// Singular values (descending) and left singular vectors of `z` (`kq x cols`, column-major),
/// computed by faer without threads so that the result never depends on the thread count.
fn svd_sequential(z: &[f64], kq: usize, cols: usize) -> Result<(Vec<f64>, Mat<f64>), String> {
    let a = MatRef::from_column_major_slice(z, kq, cols);
    let size = kq.min(cols);
    let mut s = Diag::<f64>::zeros(size);
    let mut u = Mat::<f64>::zeros(kq, size);
    let par = Par::Seq;
    let scratch =
        svd::svd_scratch::<f64>(kq, cols, ComputeSvdVectors::Thin, ComputeSvdVectors::No, par, Default::default());
    let mut mem = MemBuffer::new(scratch);
    svd::svd(a, s.as_mut(), Some(u.as_mut()), None, par, MemStack::new(&mut mem), Default::default())
        .map_err(|e| format!("the singular value decomposition did not converge ({e:?})"))?;
    Ok((s.column_vector().iter().copied().collect(), u))
}

/// Rows per unit of pass 1 (fixed by the shape, never by the thread count).
fn rows_per_unit(rows: usize, cols: usize) -> usize {
    rows.div_ceil(MAX_UNITS).max(MIN_UNIT.div_ceil(cols.max(1))).clamp(1, rows.max(1))
}

/// Columns per unit of pass 2.
fn cols_per_unit(rows: usize, cols: usize) -> usize {
    cols.div_ceil(MAX_UNITS).max(MIN_UNIT.div_ceil(rows.max(1))).clamp(1, cols.max(1))
}

/// `Ω` (`cols x p`, row-major): the identity when `p == cols`, else fixed-seed standard normals.
fn omega(cols: usize, p: usize) -> Vec<f64> {
    let mut w = vec![0f64; cols * p];
    if p == cols {
        (0..p).for_each(|i| w[i * p + i] = 1.0);
    } else {
        w.par_chunks_mut(p).enumerate().for_each(|(j, row)| {
            for (q, v) in row.iter_mut().enumerate() {
                *v = gaussian(j as u64, q as u64);
            }
        });
    }
    w
}

/// A standard normal from a counter (Box-Muller on two splitmix64 hashes of `(j, q)`).
fn gaussian(j: u64, q: u64) -> f64 {
    let h1 = splitmix64(SEED ^ splitmix64(j.wrapping_mul(SKETCH as u64).wrapping_add(q)));
    let h2 = splitmix64(h1);
    let scale = 1.0 / (1u64 << 53) as f64;
    let u1 = ((h1 >> 11) as f64 + 0.5) * scale; // in (0, 1): ln is finite
    let u2 = (h2 >> 11) as f64 * scale;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pass 1 over rows `k0..k0 + chunk.len()/p` of a slice: `Y[k] += dW[k, j] Ω[j]`. Returns the
/// largest row sum of rounding variances of B.
#[allow(clippy::too_many_arguments)]
fn pass1_unit(a: Stored, b: Stored, s: Slice, k0: usize, y: &mut [f64], p: usize, omega: &[f64], u_b: f64) -> f64 {
    let k1 = k0 + y.len() / p;
    let inner = s.inner;
    let mut row_noise = vec![0f64; k1 - k0];
    for ol in 0..s.n_o {
        let start = ((s.o0 + ol) * s.rows + k0) * inner;
        let (mut k, mut i) = (k0, 0usize);
        pieces(a, b, start, (k1 - k0) * inner, |av, bv| {
            for (&x_a, &x_b) in av.iter().zip(bv) {
                let x = x_b - x_a;
                let e = u_b * x_b;
                row_noise[k - k0] += e * e / 3.0;
                if x != 0.0 {
                    let w = &omega[(ol * inner + i) * p..][..p];
                    let yk = &mut y[(k - k0) * p..][..p];
                    for (yv, wv) in yk.iter_mut().zip(w) {
                        *yv += x * wv;
                    }
                }
                i += 1;
                if i == inner {
                    i = 0;
                    k += 1;
                }
            }
        });
    }
    row_noise.into_iter().fold(0.0, f64::max)
}

/// Pass 2 over columns `u*unit .. (u+1)*unit` of a slice: every sum, and with `sketch`
/// `Z[:, j] += Q[k] dW[k, j]`. Returns the sums and the largest column sum of rounding variances.
fn pass2_unit(
    a: Stored,
    b: Stored,
    s: Slice,
    u: usize,
    unit: usize,
    direction: Option<&[f64]>,
    mut sketch: Option<(&[f64], usize, &mut [f64])>,
) -> (Sums, f64) {
    let (rows, inner) = (s.rows, s.inner);
    let j0 = u * unit;
    let j1 = (j0 + unit).min(s.cols());
    let n = j1 - j0;
    let u_b = b.dtype.unit_roundoff().expect("float dtype");
    let mut sums = Sums::default();
    let mut ca = vec![0f64; if direction.is_some() { n } else { 0 }];
    let mut cb = ca.clone();
    let mut col_noise = vec![0f64; n];
    // Accumulates element (k, column j) for j in j0..j1.
    let mut visit = |k: usize, jl: usize, x_a: f64, x_b: f64| {
        let x = x_b - x_a;
        sums.max_abs = sums.max_abs.max(x.abs());
        sums.ss_dw += x * x;
        sums.ss_a += x_a * x_a;
        sums.ss_b += x_b * x_b;
        let e = u_b * x_b;
        col_noise[jl] += e * e / 3.0;
        if let Some(d) = direction {
            ca[jl] += d[k] * x_a;
            cb[jl] += d[k] * x_b;
        }
        if let Some((q, kq, z)) = sketch.as_mut()
            && x != 0.0
        {
            let qk = &q[k * *kq..][..*kq];
            for (zv, qv) in z[jl * *kq..][..*kq].iter_mut().zip(qk) {
                *zv += x * qv;
            }
        }
    };
    let mut j = j0;
    while j < j1 {
        let ol = j / inner;
        let i0 = j % inner;
        let i1 = inner.min(i0 + (j1 - j));
        let base = (s.o0 + ol) * rows * inner;
        let jl0 = j - j0;
        if i0 == 0 && i1 == inner {
            // The whole d x inner block of this outer index is contiguous.
            let (mut k, mut i) = (0usize, 0usize);
            pieces(a, b, base, rows * inner, |av, bv| {
                for (&x_a, &x_b) in av.iter().zip(bv) {
                    visit(k, jl0 + i, x_a, x_b);
                    i += 1;
                    if i == inner {
                        i = 0;
                        k += 1;
                    }
                }
            });
        } else {
            for k in 0..rows {
                let mut i = 0usize;
                pieces(a, b, base + k * inner + i0, i1 - i0, |av, bv| {
                    for (&x_a, &x_b) in av.iter().zip(bv) {
                        visit(k, jl0 + i, x_a, x_b);
                        i += 1;
                    }
                });
            }
        }
        j += i1 - i0;
    }
    sums.proj_a = ca.iter().map(|c| c * c).sum();
    sums.proj_b = cb.iter().map(|c| c * c).sum();
    (sums, col_noise.into_iter().fold(0.0, f64::max))
}

/// Decodes elements `start..start + len` of both tensors in pieces and hands them to `f`.
fn pieces(a: Stored, b: Stored, start: usize, len: usize, mut f: impl FnMut(&[f64], &[f64])) {
    let mut buf_a = [0f64; PIECE];
    let mut buf_b = [0f64; PIECE];
    let mut off = 0;
    while off < len {
        let n = PIECE.min(len - off);
        decode(a, start + off, &mut buf_a[..n]);
        decode(b, start + off, &mut buf_b[..n]);
        f(&buf_a[..n], &buf_b[..n]);
        off += n;
    }
}

/// Decodes `out.len()` elements of `t` from element `start`, exactly, into f64.
fn decode(t: Stored, start: usize, out: &mut [f64]) {
    let size = t.dtype.float_size().expect("callers pass float dtypes");
    let bytes = &t.bytes[start * size..(start + out.len()) * size];
    if t.dtype == Dtype::F64 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = f64::from_le_bytes(c.try_into().expect("chunks_exact(8)"));
        }
    } else {
        let mut tmp = [0f32; PIECE];
        decode_f32(t.dtype, bytes, &mut tmp[..out.len()]);
        for (o, v) in out.iter_mut().zip(&tmp) {
            *o = *v as f64;
        }
    }
}
