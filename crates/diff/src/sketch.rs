//! Streaming measurements of one changed tensor: max `|dW|`, Frobenius norms, projections on a
//! direction, and the numerical rank and column space of `dW = W_B - W_A`.
//!
//! A tensor is seen as matrices with `rows` on the left (the d_model axis for residual writers,
//! from `Writer::view`) and every other index as a column. It is never decoded whole: each pass
//! walks the stored bytes in contiguous units (whole rows, or whole outer blocks), decoding small
//! pieces straight from the memory maps and releasing each unit's pages when done with it, so
//! memory is `O((rows + cols) * P)` plus a few units in flight, whatever the tensor size.
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
//! units chosen from the shape alone, each unit sums sequentially, and partial results are
//! combined in unit order, so results are identical for any thread count.

use std::ops::Range;

use checkpoint::Dtype;
use checkpoint::dtype::decode_f64;
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
/// Singular values below this fraction of the largest are never counted: the f64 arithmetic
/// of the sketch does not resolve them.
pub const RESOLUTION: f64 = 1e-10;
/// Fixed seed of `Ω`: the same tensors always give the same numbers.
const SEED: u64 = 0x0ab1_17e2_a7ed_d1ff;
/// Elements decoded at a time.
const PIECE: usize = 512;
/// Elements per work unit (rounded to whole rows or outer blocks): 2 MB of bf16, small enough
/// that a few units in flight bound the mapped pages, large enough to amortize the bookkeeping.
/// (Unit tests use small units so that every path runs with many of them.)
const UNIT: usize = if cfg!(test) { 1 << 12 } else { 1 << 20 };

/// A stored tensor: its dtype (a float type) and bytes.
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    pub dtype: Dtype,
    pub bytes: &'a [u8],
    /// Called with byte ranges of `bytes` a pass is done with, to drop their mapped pages.
    pub release: Option<&'a (dyn Fn(Range<usize>) + Sync)>,
}

impl Stored<'_> {
    fn size(&self) -> usize {
        self.dtype.float_size().expect("callers pass float dtypes")
    }

    fn done(&self, elements: Range<usize>) {
        if let Some(f) = self.release {
            f(elements.start * self.size()..elements.end * self.size());
        }
    }
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
    fn elements(&self) -> Range<usize> {
        let start = self.o0 * self.rows * self.inner;
        start..start + self.n_o * self.rows * self.inner
    }

    /// How the slice is cut into contiguous units: whole rows of its one matrix block, or whole
    /// outer blocks (the embedding `[V, d]` is V blocks of `d x 1`).
    fn units(&self) -> Units {
        if self.n_o == 1 {
            let per = (UNIT / self.inner.max(1)).clamp(1, self.rows.max(1));
            Units { by_rows: true, per, count: self.rows.div_ceil(per) }
        } else {
            let per = (UNIT / (self.rows * self.inner).max(1)).clamp(1, self.n_o);
            Units { by_rows: false, per, count: self.n_o.div_ceil(per) }
        }
    }
}

/// Contiguous work units of a slice, fixed by the shape alone.
#[derive(Clone, Copy, Debug)]
struct Units {
    /// Units are row ranges `k0..k1` of the single block (else outer ranges `ol0..ol1`).
    by_rows: bool,
    per: usize,
    count: usize,
}

/// One unit: where it starts and its element range in the tensor.
#[derive(Clone, Copy, Debug)]
struct Unit {
    /// First row (by rows) or first local outer index (by outer blocks).
    first: usize,
    /// Rows or outer indices in the unit.
    len: usize,
    by_rows: bool,
}

impl Units {
    fn get(&self, u: usize, s: &Slice) -> Unit {
        let first = u * self.per;
        let total = if self.by_rows { s.rows } else { s.n_o };
        Unit { first, len: self.per.min(total - first), by_rows: self.by_rows }
    }
}

impl Unit {
    fn elements(&self, s: &Slice) -> Range<usize> {
        let start =
            if self.by_rows { (s.o0 * s.rows + self.first) * s.inner } else { (s.o0 + self.first) * s.rows * s.inner };
        let n = if self.by_rows { self.len * s.inner } else { self.len * s.rows * s.inner };
        start..start + n
    }

    /// Columns `j = ol * inner + i` this unit covers whole (all rows), for outer-block units.
    fn cols(&self, s: &Slice) -> Range<usize> {
        self.first * s.inner..(self.first + self.len) * s.inner
    }

    /// Visits every element of the unit in memory order as `(k, j, a, b)` (row, column of the
    /// slice, and the two values), then releases the unit's pages.
    fn visit(&self, s: &Slice, a: Stored, b: Stored, mut f: impl FnMut(usize, usize, f64, f64)) {
        let range = self.elements(s);
        let (mut ol, mut k) = if self.by_rows { (0, self.first) } else { (self.first, 0) };
        let mut i = 0usize;
        pieces(a, b, range.start, range.len(), |av, bv| {
            for (&x_a, &x_b) in av.iter().zip(bv) {
                f(k, ol * s.inner + i, x_a, x_b);
                i += 1;
                if i == s.inner {
                    i = 0;
                    k += 1;
                    if k == s.rows {
                        k = 0;
                        ol += 1;
                    }
                }
            }
        });
        a.done(range.clone());
        b.done(range);
    }
}

/// Runs `count` units in parallel, at most one group of (thread count) at a time so that the
/// partial results alive stay bounded, and hands them to `fold` in unit order (which is what
/// makes every sum independent of the thread count).
fn run_units<P: Send>(count: usize, f: impl Fn(usize) -> P + Sync, mut fold: impl FnMut(usize, P)) {
    let group = rayon::current_num_threads().max(1);
    let mut u = 0;
    while u < count {
        let end = (u + group).min(count);
        let parts: Vec<P> = (u..end).into_par_iter().map(&f).collect();
        for (i, p) in parts.into_iter().enumerate() {
            fold(u + i, p);
        }
        u = end;
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
    let partials: Vec<Sums> = layout.slices().into_par_iter().map(|s| pass2(b, b, &s, direction, None).0).collect();
    let mut total = Sums::default();
    partials.iter().for_each(|p| total.add(p));
    total
}

fn measure_slice(a: Stored, b: Stored, s: Slice, direction: Option<&[f64]>) -> Result<(Sums, SliceRank), String> {
    let (rows, cols) = (s.rows, s.cols());
    let range = s.elements();
    let empty = SliceRank { rank: 0, exact: true, singular_values: Vec::new(), tolerance: 0.0, alignment: None };
    if rows == 0 || cols == 0 {
        return Ok((Sums::default(), empty));
    }
    // Fast path: a slice whose bytes did not change (a fused expert left alone) has dW = 0.
    if a.dtype == b.dtype
        && a.bytes[range.start * a.size()..range.end * a.size()]
            == b.bytes[range.start * b.size()..range.end * b.size()]
    {
        let (mut sums, _, _) = pass2(b, b, &s, direction, None);
        sums.ss_a = sums.ss_b;
        sums.proj_a = sums.proj_b;
        return Ok((sums, empty));
    }

    // 1. Y = dW Ω (rows x p, row-major).
    let p = cols.min(SKETCH);
    let omega = omega(cols, p);
    let (y, max_row_abs) = pass1(a, b, &s, p, &omega);

    // 2. Q = orth(Y), rows x kq, row-major.
    let (q, kq) = orthonormal_columns(&y, rows, p);
    if kq == 0 {
        // dW Ω = 0 although bytes differ: only signed zeros (or NaNs) changed.
        return Ok((pass2(a, b, &s, direction, None).0, empty));
    }

    // 3. Z = Qᵀ dW (kq x cols, column-major), with every sum.
    let (sums, max_col_abs, z) = pass2(a, b, &s, direction, Some((&q, kq)));
    let z = z.expect("pass 2 with a basis returns Z");

    let (sv, u_z) = svd_sequential(&z, kq, cols)?;
    let u_b = b.dtype.unit_roundoff().expect("float dtype");
    let tol = tolerance(u_b, max_row_abs, max_col_abs, sv.first().copied().unwrap_or(0.0));
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

/// `U` (`rows x r`, row-major) and the singular values of one slice's `dW`.
pub(crate) type LeftFactor = (Vec<f64>, Vec<f64>);

/// The top left singular vectors and values of `dW` for each slice (one per matrix, one per expert of a fused
/// tensor), from the same sketch as [`measure`]: `U = Q U_Z` (`rows x r` row-major, `r <= SKETCH`) and the
/// singular values, descending. For `diff --detect` (the `detect` module), which stacks them across tensors.
pub(crate) fn left_singular(a: Stored, b: Stored, layout: Layout) -> Result<Vec<LeftFactor>, String> {
    let mut out = Vec::new();
    for s in layout.slices() {
        let (rows, cols) = (s.rows, s.cols());
        if rows == 0 || cols == 0 {
            continue;
        }
        let p = cols.min(SKETCH);
        let omega = omega(cols, p);
        let (y, _) = pass1(a, b, &s, p, &omega);
        let (q, kq) = orthonormal_columns(&y, rows, p);
        if kq == 0 {
            continue;
        }
        let (_, _, z) = pass2(a, b, &s, None, Some((&q, kq)));
        let z = z.expect("pass 2 with a basis returns Z");
        let (sv, u_z) = svd_sequential(&z, kq, cols)?;
        let r = sv.len();
        let mut u = vec![0f64; rows * r];
        for k in 0..rows {
            for t in 0..r {
                u[k * r + t] = (0..kq).map(|c| q[k * kq + c] * u_z[(c, t)]).sum();
            }
        }
        out.push((u, sv));
    }
    Ok(out)
}

/// Pass 1: `Y = dW Ω` (`rows x p`, row-major) and the largest row sum of `|B|`.
fn pass1(a: Stored, b: Stored, s: &Slice, p: usize, omega: &[f64]) -> (Vec<f64>, f64) {
    let units = s.units();
    let mut y = vec![0f64; s.rows * p];
    // Row units own their rows of Y and their row sums; outer-block units add to all of them.
    let mut row_abs = vec![0f64; s.rows];
    run_units(
        units.count,
        |u| {
            let unit = units.get(u, s);
            let (k0, n) = if unit.by_rows { (unit.first, unit.len) } else { (0, s.rows) };
            let mut y_u = vec![0f64; n * p];
            let mut abs_u = vec![0f64; n];
            unit.visit(s, a, b, |k, j, x_a, x_b| {
                abs_u[k - k0] += x_b.abs();
                let x = x_b - x_a;
                if x != 0.0 {
                    let w = &omega[j * p..][..p];
                    for (yv, wv) in y_u[(k - k0) * p..][..p].iter_mut().zip(w) {
                        *yv += x * wv;
                    }
                }
            });
            (k0, y_u, abs_u)
        },
        |_, (k0, y_u, abs_u)| {
            for (acc, v) in y[k0 * p..][..y_u.len()].iter_mut().zip(&y_u) {
                *acc += v;
            }
            for (acc, v) in row_abs[k0..][..abs_u.len()].iter_mut().zip(&abs_u) {
                *acc += v;
            }
        },
    );
    (y, row_abs.into_iter().fold(0.0, f64::max))
}

/// What one unit of pass 2 adds up.
struct Pass2Unit {
    sums: Sums,
    /// First column of the vectors below: 0 for row units (which cover every column), the unit's
    /// first column for outer-block units (which cover their columns whole).
    j0: usize,
    /// `Qᵀ dW` for the covered columns (column-major, `kq` per column), with a basis.
    z: Vec<f64>,
    /// Per column: projections of A and B on the direction, and `Σ_k |B|`.
    ca: Vec<f64>,
    cb: Vec<f64>,
    abs: Vec<f64>,
}

/// Pass 2: every sum; with a basis `(Q, kq)` also `Z = Qᵀ dW` (`kq x cols`, column-major).
/// Returns the sums, the largest column sum of `|B|`, and Z.
fn pass2(
    a: Stored,
    b: Stored,
    s: &Slice,
    direction: Option<&[f64]>,
    basis: Option<(&[f64], usize)>,
) -> (Sums, f64, Option<Vec<f64>>) {
    let units = s.units();
    let cols = s.cols();
    let kq = basis.map_or(0, |(_, kq)| kq);
    let mut z = basis.map(|_| vec![0f64; cols * kq]);
    let mut sums = Sums::default();
    // Row units each see part of every column, so the per-column vectors add up across units;
    // outer-block units see their columns whole and finish them.
    let mut ca = vec![0f64; if units.by_rows && direction.is_some() { cols } else { 0 }];
    let mut cb = ca.clone();
    let mut col_abs = vec![0f64; if units.by_rows { cols } else { 0 }];
    let mut max_abs_sum = 0f64;
    run_units(
        units.count,
        |u| {
            let unit = units.get(u, s);
            let (j0, n) = if unit.by_rows { (0, cols) } else { (unit.cols(s).start, unit.cols(s).len()) };
            let mut part = Pass2Unit {
                sums: Sums::default(),
                j0,
                z: vec![0f64; if basis.is_some() { n * kq } else { 0 }],
                ca: vec![0f64; if direction.is_some() { n } else { 0 }],
                cb: vec![0f64; if direction.is_some() { n } else { 0 }],
                abs: vec![0f64; n],
            };
            unit.visit(s, a, b, |k, j, x_a, x_b| {
                let jl = j - j0;
                let x = x_b - x_a;
                let t = &mut part.sums;
                t.max_abs = t.max_abs.max(x.abs());
                t.ss_dw += x * x;
                t.ss_a += x_a * x_a;
                t.ss_b += x_b * x_b;
                part.abs[jl] += x_b.abs();
                if let Some(d) = direction {
                    part.ca[jl] += d[k] * x_a;
                    part.cb[jl] += d[k] * x_b;
                }
                if let Some((q, kq)) = basis
                    && x != 0.0
                {
                    for (zv, qv) in part.z[jl * kq..][..kq].iter_mut().zip(&q[k * kq..][..kq]) {
                        *zv += x * qv;
                    }
                }
            });
            part
        },
        |_, part| {
            sums.add(&part.sums);
            if let Some(z) = z.as_mut() {
                for (acc, v) in z[part.j0 * kq..][..part.z.len()].iter_mut().zip(&part.z) {
                    *acc += v;
                }
            }
            if units.by_rows {
                ca.iter_mut().zip(&part.ca).for_each(|(acc, v)| *acc += v);
                cb.iter_mut().zip(&part.cb).for_each(|(acc, v)| *acc += v);
                col_abs.iter_mut().zip(&part.abs).for_each(|(acc, v)| *acc += v);
            } else {
                sums.proj_a += part.ca.iter().map(|c| c * c).sum::<f64>();
                sums.proj_b += part.cb.iter().map(|c| c * c).sum::<f64>();
                max_abs_sum = part.abs.iter().copied().fold(max_abs_sum, f64::max);
            }
        },
    );
    if units.by_rows {
        sums.proj_a = ca.iter().map(|c| c * c).sum();
        sums.proj_b = cb.iter().map(|c| c * c).sum();
        max_abs_sum = col_abs.into_iter().fold(0.0, f64::max);
    }
    (sums, max_abs_sum, z)
}

/// The rank tolerance `τ`: a bound on what rounding to B's dtype alone can do to the spectrum.
///
/// B stores `fl(A + Δ)` for some exact update `Δ`, so `dW = Δ + E` where every rounding error
/// obeys `|E_kj| <= u |B_kj|` (`u` the unit roundoff of B's dtype: 2^-8 bf16, 2^-11 f16, 2^-24
/// f32, method.md §6, laws). For any such E, `||E||_2 <= sqrt(||E||_1 ||E||_∞)
/// <= u sqrt(max_j Σ_k |B_kj| · max_k Σ_j |B_kj|)` = `τ`. By Weyl's inequality
/// `σ_{r+1}(dW) <= ||E||_2 <= τ` when `Δ` has rank r, so counting singular values above `τ`
/// never over-counts, whatever the rounding does (it is not random: in bf16 the rounding of a
/// rank-one update has a visible rank-one component of its own, about 1% of `σ_1` on a
/// 128k x 8k embedding). Components of `Δ` below `τ` are indistinguishable from rounding and
/// are not counted. `τ` is never below [`RESOLUTION`] `σ_1`, what the f64 sketch resolves.
/// For a real orthogonalization `σ_1 = ||r̂ᵀW||`, about `||W||_F / sqrt(d)` for a direction in
/// general position, while `τ` is about `0.8 u ||W||_F`. Measured in bf16: `σ_1/τ >= 3.3` and
/// `σ_2/τ <= 0.033` over the 61 writers of SmolLM2 (d = 576) edited with its real direction;
/// `σ_1/τ = 3.4`, `σ_2/τ = 0.036` on a random 128k x 8k embedding.
pub fn tolerance(u: f64, max_row_abs: f64, max_col_abs: f64, sigma1: f64) -> f64 {
    (u * (max_row_abs * max_col_abs).sqrt()).max(RESOLUTION * sigma1)
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
    let size = t.size();
    decode_f64(t.dtype, &t.bytes[start * size..(start + out.len()) * size], out);
}
