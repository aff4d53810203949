//! `diff --detect`: was B made from A by removing a few directions from its residual-stream writers
//! (abliteration, in any of its variants), without knowing the direction? docs/variants.md, "Detection".
//!
//! An abliteration of a writer is `ΔW = W_B − W_A = −s V (Vᵀ W_A)`: every vector the writer adds to the
//! residual stream (a column of the writer view) changes only inside `span(V)`, the same few directions for
//! every writer (or, with per-layer directions, one per layer). So:
//!
//! 1. For each changed residual writer, the top left singular vectors `u_j` and values `σ_j` of `ΔW` in the
//!    d_model space (the fixed-seed range sketch of [`crate::sketch`]), stacked as columns `σ_j u_j / ||ΔW||_F`
//!    of one `d x m` matrix `M`. The left singular vectors of `M` are the shared directions (the top
//!    eigenvectors of `Σ_t ΔW_t ΔW_tᵀ / ||ΔW_t||²`), each tensor weighing the same whatever its size.
//! 2. Exactly, in a second pass over every changed writer: the share of `||ΔW||²_F` that removing the span of
//!    the top `k` shared directions and rescaling each written vector explains (for a plain edit, exactly the
//!    share `||V_kᵀ ΔW||² / ||ΔW||²` inside the span; the rescaling covers norm-preserving edits, see [`exact`]),
//!    for `k = 1..=max_k`; the tensor's own top singular value share `σ_1² / ||ΔW||²` (rank one on its own?);
//!    and how much the norm of each written vector changed (near zero for norm-preserving edits).
//! 3. The verdict: a shared low-rank edit along `k` directions when, for the smallest such `k <= max_k`, the
//!    median changed writer has at least [`EXPLAINED`] of its change in the span and at least
//!    [`MOSTLY`] of the changed writers have at least 0.9; per-layer low-rank when every changed writer is
//!    rank one on its own ([`EXPLAINED`] of its energy in its top singular vector) but no few directions are
//!    shared; otherwise not an abliteration. Readers, norms or unknown tensors that changed are reported:
//!    weight orthogonalization never touches them (an untied `lm_head` added is not counted against it).
//!
//! Reads both checkpoints from their memory maps, one tensor pair at a time (pairs in parallel, each
//! summed sequentially, so results do not depend on the thread count). Never writes.

use checkpoint::{Checkpoint, Role, dtype::decode_f64};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{MatRef, Par};
use rayon::prelude::*;

use crate::sketch::{self, Stored};
use crate::{Error, Result, layout, natural_cmp, tensor_error};

/// The share of a writer's change that counts as "explained".
pub const EXPLAINED: f64 = 0.99;
/// The share of changed writers that must be at least 0.9 explained.
pub const MOSTLY: f64 = 0.9;

#[derive(Clone, Debug, PartialEq)]
pub struct DetectOptions {
    /// Shared directions tried, 1..=max_k.
    pub max_k: usize,
}

impl Default for DetectOptions {
    fn default() -> DetectOptions {
        DetectOptions { max_k: 3 }
    }
}

/// One changed residual writer.
#[derive(Clone, Debug, PartialEq)]
pub struct WriterChange {
    pub name: String,
    pub kind: String,
    pub layer: Option<usize>,
    /// `||ΔW||_F / ||W_A||_F`.
    pub rel_change: f64,
    /// `||V_kᵀ ΔW||² / ||ΔW||²` for k = 1..=max_k (cumulative).
    pub explained: Vec<f64>,
    /// `σ_1² / ||ΔW||²`: how rank-one the change is on its own.
    pub own_rank_one: f64,
    /// `max_q | ||b_q|| / ||a_q|| − 1 |` over the written vectors (columns of the writer view).
    pub norm_change: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No residual writer changed.
    NoWriterChanged,
    /// The changes of the writers lie in `k` directions shared across layers.
    Shared { k: usize },
    /// Every changed writer changed along one direction of its own, not shared (per-layer directions).
    PerLayer,
    /// Not a low-rank edit of the writers.
    NotLowRank,
}

impl Verdict {
    pub fn label(self) -> String {
        match self {
            Verdict::NoWriterChanged => "no_writer_changed".into(),
            Verdict::Shared { k } => format!("shared_rank_{k}"),
            Verdict::PerLayer => "per_layer_rank_1".into(),
            Verdict::NotLowRank => "not_low_rank".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub hidden: usize,
    /// The shared directions, `[max_k, hidden]` row-major, unit vectors (sign: largest entry positive).
    pub directions: Vec<f64>,
    /// Share of the stacked matrix `M`'s energy along each shared direction (eigenvalues / their sum).
    pub strength: Vec<f64>,
    pub writers: Vec<WriterChange>,
    /// Residual writers of B identical to A's.
    pub unchanged_writers: usize,
    /// Tensors other than residual writers whose values changed (or that exist on one side only), with kind.
    pub other_changed: Vec<(String, String)>,
    pub verdict: Verdict,
    /// Median and minimum explained share at the verdict's `k` (at `max_k` when not shared).
    pub explained_median: f64,
    pub explained_min: f64,
}

impl Detection {
    /// The `k` directions of the verdict (1 when not shared).
    pub fn k(&self) -> usize {
        match self.verdict {
            Verdict::Shared { k } => k,
            _ => 1,
        }
    }

    pub fn direction(&self, m: usize) -> &[f64] {
        &self.directions[m * self.hidden..(m + 1) * self.hidden]
    }
}

struct Pair<'a> {
    name: String,
    kind: String,
    layer: Option<usize>,
    lay: sketch::Layout,
    a: Stored<'a>,
    b: Stored<'a>,
}

/// Runs the detection.
pub fn detect(a: &Checkpoint, b: &Checkpoint, opts: &DetectOptions) -> Result<Detection> {
    let hidden = b.config.hidden_size;
    if a.config.hidden_size != hidden {
        return Err(Error::HiddenSize { a: a.config.hidden_size, b: hidden });
    }
    let max_k = opts.max_k.clamp(1, hidden);
    let mut pairs = Vec::new();
    let mut other_changed = Vec::new();
    let mut unchanged_writers = 0;
    let mut names: Vec<String> = b.tensors().map(|(_, t)| t.name.clone()).collect();
    names.extend(a.tensors().filter(|(_, t)| b.get(&t.name).is_none()).map(|(_, t)| t.name.clone()));
    names.sort_by(|x, y| natural_cmp(x, y));
    for name in names {
        let (ra, rb) = (a.get(&name).map(|(r, _)| r), b.get(&name).map(|(r, _)| r));
        let role = rb.map(|r| b.role(r)).or(ra.map(|r| a.role(r))).expect("the name comes from A or B");
        let (Some(ra), Some(rb)) = (ra, rb) else {
            // An untied head added by the edit is a copy of the original embedding, not a change of weights.
            if !(ra.is_none() && name.ends_with("lm_head.weight")) {
                other_changed.push((name, role.label()));
            }
            continue;
        };
        let (ta, tb) = (a.entry(ra), b.entry(rb));
        let same = ta.dtype == tb.dtype && ta.shape == tb.shape && a.bytes(ra) == b.bytes(rb);
        match role {
            Role::Writer(w) if same => {
                let _ = w;
                unchanged_writers += 1;
            }
            Role::Writer(w) => {
                let lay = layout(&role, &tb.shape, hidden).filter(|_| ta.shape == tb.shape);
                let (Some(lay), true, true) = (lay, ta.dtype.is_float(), tb.dtype.is_float()) else {
                    other_changed.push((name, format!("{} (not comparable)", role.label())));
                    continue;
                };
                pairs.push(Pair {
                    name,
                    kind: role.label(),
                    layer: w.layer,
                    lay,
                    a: Stored { dtype: ta.dtype, bytes: a.bytes(ra), release: None },
                    b: Stored { dtype: tb.dtype, bytes: b.bytes(rb), release: None },
                });
            }
            _ if same => {}
            // A tied head: the lm_head name is the embedding's business; other tensors count.
            _ => other_changed.push((name, role.label())),
        }
    }

    // 1. Left singular factors of every changed writer, each scaled by 1/||ΔW||_F.
    let factors: Vec<(Vec<f64>, f64, f64)> = pairs
        .par_iter()
        .map(|p| -> Result<(Vec<f64>, f64, f64)> {
            let slices = sketch::left_singular(p.a, p.b, p.lay).map_err(|problem| Error::Tensor {
                name: p.name.clone(),
                file: String::new(),
                problem,
            })?;
            let ss = energy(p);
            let mut cols = Vec::new();
            let mut top = 0f64;
            for (u, sv) in &slices {
                let r = sv.len();
                top = top.max(sv.first().copied().unwrap_or(0.0));
                for (t, s) in sv.iter().enumerate() {
                    let scale = if ss > 0.0 { s / ss.sqrt() } else { 0.0 };
                    cols.extend((0..hidden).map(|k| u[k * r + t] * scale));
                }
            }
            let own = if ss > 0.0 { top * top / ss } else { 0.0 };
            Ok((cols, own, ss))
        })
        .collect::<Result<Vec<_>>>()?;
    let m: Vec<f64> = factors.iter().flat_map(|(c, _, _)| c.iter().copied()).collect();
    let n_cols = m.len() / hidden.max(1);
    let (directions, strength) = if n_cols == 0 {
        (vec![0f64; max_k * hidden], vec![0f64; max_k])
    } else {
        shared_directions(&m, hidden, n_cols, max_k)?
    };

    // 2. Exact shares, per writer.
    let writers: Vec<WriterChange> = pairs
        .par_iter()
        .zip(&factors)
        .map(|(p, (_, own, ss))| exact(p, &directions, hidden, max_k, *own, *ss))
        .collect();

    // 3. Verdict.
    let at = |k: usize| -> (f64, f64, f64) {
        let mut e: Vec<f64> = writers.iter().map(|w| w.explained[k - 1]).collect();
        e.sort_by(f64::total_cmp);
        let median = e.get(e.len() / 2).copied().unwrap_or(0.0);
        let min = e.first().copied().unwrap_or(0.0);
        let mostly = e.iter().filter(|&&x| x >= 0.9).count() as f64 / e.len().max(1) as f64;
        (median, min, mostly)
    };
    let mut verdict = if writers.is_empty() { Verdict::NoWriterChanged } else { Verdict::NotLowRank };
    let (mut median, mut min, _) = if writers.is_empty() { (0.0, 0.0, 0.0) } else { at(max_k) };
    if !writers.is_empty() {
        for k in 1..=max_k {
            let (md, mn, mostly) = at(k);
            if md >= EXPLAINED && mostly >= MOSTLY {
                verdict = Verdict::Shared { k };
                (median, min) = (md, mn);
                break;
            }
        }
        if verdict == Verdict::NotLowRank {
            let mut own: Vec<f64> = writers.iter().map(|w| w.own_rank_one).collect();
            own.sort_by(f64::total_cmp);
            if own[own.len() / 2] >= EXPLAINED
                && own.iter().filter(|&&x| x >= 0.9).count() as f64 >= MOSTLY * own.len() as f64
            {
                verdict = Verdict::PerLayer;
                (median, min) = (own[own.len() / 2], own[0]);
            }
        }
    }
    Ok(Detection {
        hidden,
        directions,
        strength,
        writers,
        unchanged_writers,
        other_changed,
        verdict,
        explained_median: median,
        explained_min: min,
    })
}

/// `||ΔW||²_F`, summed sequentially.
fn energy(p: &Pair) -> f64 {
    let mut ss = 0f64;
    visit(p, |_, _, x, y| ss += (y - x) * (y - x));
    ss
}

/// Every element in memory order as `(i, q, a, b)`: row `i` of the d_model axis and column `q` of the view.
fn visit(p: &Pair, mut f: impl FnMut(usize, usize, f64, f64)) {
    let (outer, rows, inner) = (p.lay.outer, p.lay.rows, p.lay.inner);
    let row_len = inner.max(1);
    let (sa, sb) = (p.a.dtype.float_size().expect("float"), p.b.dtype.float_size().expect("float"));
    let (mut xa, mut xb) = (vec![0f64; row_len], vec![0f64; row_len]);
    for o in 0..outer {
        for i in 0..rows {
            let e = (o * rows + i) * inner;
            decode_f64(p.a.dtype, &p.a.bytes[e * sa..(e + inner) * sa], &mut xa[..inner]);
            decode_f64(p.b.dtype, &p.b.bytes[e * sb..(e + inner) * sb], &mut xb[..inner]);
            for j in 0..inner {
                f(i, o * inner + j, xa[j], xb[j]);
            }
        }
    }
}

/// The exact shares of one writer's change. For each written vector (column `q`: `w` in A, `w'` in B) and
/// `k`, with `P_k = I − V_k V_kᵀ`, the part of the change that "remove span(V_k), then rescale the vector"
/// cannot produce is `||P_k w' − α P_k w||²` at the best `α` (`α = 1`: a plain projection; `α = f`: a
/// norm-preserving one), that is `||P_k w'||² − ⟨P_k w', P_k w⟩² / ||P_k w||²`; the share explained is one minus
/// its sum over columns divided by `||ΔW||²`. Each column needs `||w||²`, `||w'||²`, `⟨w, w'⟩` and the
/// projections `v_m·w`, `v_m·w'`, accumulated in one sequential pass.
fn exact(p: &Pair, dirs: &[f64], hidden: usize, max_k: usize, own: f64, ss: f64) -> WriterChange {
    let cols = p.lay.outer * p.lay.inner;
    let (mut pa, mut pb) = (vec![0f64; cols * max_k], vec![0f64; cols * max_k]);
    let (mut na, mut nb, mut nab) = (vec![0f64; cols], vec![0f64; cols], vec![0f64; cols]);
    visit(p, |i, q, x, y| {
        for m in 0..max_k {
            let v = dirs[m * hidden + i];
            pa[q * max_k + m] += v * x;
            pb[q * max_k + m] += v * y;
        }
        na[q] += x * x;
        nb[q] += y * y;
        nab[q] += x * y;
    });
    let mut unexplained = vec![0f64; max_k];
    for q in 0..cols {
        let (mut ra, mut rb, mut rab) = (na[q], nb[q], nab[q]);
        for m in 0..max_k {
            let (a, b) = (pa[q * max_k + m], pb[q * max_k + m]);
            ra -= a * a;
            rb -= b * b;
            rab -= a * b;
            let left = if ra > 0.0 { rb - rab * rab / ra } else { rb };
            unexplained[m] += left.max(0.0);
        }
    }
    let explained: Vec<f64> =
        unexplained.iter().map(|u| if ss > 0.0 { (1.0 - u / ss).clamp(0.0, 1.0) } else { 0.0 }).collect();
    let norm_change =
        na.iter().zip(&nb).filter(|(a, _)| **a > 0.0).map(|(a, b)| ((b / a).sqrt() - 1.0).abs()).fold(0f64, f64::max);
    let ssa: f64 = na.iter().sum();
    WriterChange {
        name: p.name.clone(),
        kind: p.kind.clone(),
        layer: p.layer,
        rel_change: if ssa > 0.0 { (ss / ssa).sqrt() } else { 0.0 },
        explained,
        own_rank_one: own,
        norm_change,
    }
}

/// The top `k` left singular vectors of `m` (`d x n` stored column by column) and their energy shares.
fn shared_directions(m: &[f64], d: usize, n: usize, k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let a = MatRef::from_column_major_slice(m, d, n);
    let size = d.min(n);
    let mut s = Diag::<f64>::zeros(size);
    let mut u = faer::Mat::<f64>::zeros(d, size);
    let par = Par::Seq;
    let scratch =
        svd::svd_scratch::<f64>(d, n, ComputeSvdVectors::Thin, ComputeSvdVectors::No, par, Default::default());
    let mut mem = MemBuffer::new(scratch);
    svd::svd(a, s.as_mut(), Some(u.as_mut()), None, par, MemStack::new(&mut mem), Default::default()).map_err(|e| {
        tensor_error(checkpoint::Error::Io {
            path: "detect".into(),
            cause: std::io::Error::other(format!("the singular value decomposition did not converge ({e:?})")),
        })
    })?;
    let sv: Vec<f64> = s.column_vector().iter().copied().collect();
    let total: f64 = sv.iter().map(|x| x * x).sum();
    let mut dirs = vec![0f64; k * d];
    let mut strength = vec![0f64; k];
    for m in 0..k.min(size) {
        let mut v: Vec<f64> = (0..d).map(|i| u[(i, m)]).collect();
        let big = v.iter().copied().fold(0f64, |b, x| if x.abs() > b.abs() { x } else { b });
        if big < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        dirs[m * d..(m + 1) * d].copy_from_slice(&v);
        strength[m] = if total > 0.0 { sv[m] * sv[m] / total } else { 0.0 };
    }
    Ok((dirs, strength))
}
