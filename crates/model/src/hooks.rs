//! Hook sites on the residual stream and the hooks that read or change it.
//!
//! Four sites per layer `l` (method.md §1, §6-7):
//! - [`Site::Input`]: the residual entering block `l` (`x^(l)`; at `l = 0` the scaled embedding output);
//! - [`Site::Attn`]: the attention output as it is added to the residual (after `o_proj`; for Gemma 2/3
//!   after `post_attention_layernorm`);
//! - [`Site::Mlp`]: the MLP/MoE output as it is added (after `down_proj`; Gemma 2/3 after
//!   `post_feedforward_layernorm`);
//! - [`Site::Output`]: the residual after block `l` (equal to `x^(l+1)` before that block's input hooks).
//!
//! The forward pass asks [`Hook::wants`] at each site and only then builds the view, so a model run with
//! [`NoHook`] does no extra work. Hooks run during generation too, on each step's new tokens.

use std::collections::BTreeMap;

use crate::batch::Segment;
use crate::{ModelError, Result};

/// Where in a layer a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    Input,
    Attn,
    Mlp,
    Output,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Input, Site::Attn, Site::Mlp, Site::Output];

    fn index(self) -> usize {
        self as usize
    }
}

/// A hook site: a layer and a site in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct At {
    pub layer: usize,
    pub site: Site,
}

/// The activations at a site: `[tokens, hidden]` rows, packed prompt by prompt as `segments` say.
pub struct Acts<'a> {
    pub data: &'a mut [f32],
    pub hidden: usize,
    pub segments: &'a [Segment],
}

impl Acts<'_> {
    /// The rows of one segment.
    pub fn segment_mut(&mut self, s: usize) -> &mut [f32] {
        let seg = self.segments[s];
        &mut self.data[seg.start * self.hidden..(seg.start + seg.len) * self.hidden]
    }
}

/// Reads or changes the residual stream at chosen sites.
pub trait Hook {
    /// Whether [`Hook::visit`] must run at this site (asked before every visit; keep it cheap).
    fn wants(&self, at: At) -> bool;
    /// Called at a wanted site with the activations of the tokens being processed.
    fn visit(&mut self, at: At, acts: Acts<'_>) -> Result<()>;
}

/// No hook at all.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHook;

impl Hook for NoHook {
    fn wants(&self, _: At) -> bool {
        false
    }
    fn visit(&mut self, _: At, _: Acts<'_>) -> Result<()> {
        Ok(())
    }
}

/// Several hooks, run in order at each site (e.g. interventions, then a capture of their result).
pub struct Chain<'a>(pub Vec<&'a mut dyn Hook>);

impl Hook for Chain<'_> {
    fn wants(&self, at: At) -> bool {
        self.0.iter().any(|h| h.wants(at))
    }
    fn visit(&mut self, at: At, acts: Acts<'_>) -> Result<()> {
        for h in self.0.iter_mut() {
            if h.wants(at) {
                h.visit(at, Acts { data: &mut *acts.data, hidden: acts.hidden, segments: acts.segments })?;
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
enum Op {
    /// `x ← x − s (x·r̂) r̂`.
    Project { unit: Vec<f32>, scale: f32 },
    /// `x ← x − s Σ_m (x·v_m) v_m` for orthonormal `v_m` (`basis` is `[k, hidden]`), every coefficient
    /// taken from `x` before any is subtracted; with `keep_norm`, then `x ← (||x_before|| / ||x||) x`
    /// (docs/variants.md: the hook side of subspace and norm-preserving edits).
    ProjectBasis { basis: Vec<f32>, k: usize, scale: f32, keep_norm: bool },
    /// `x ← x + v` (v already `coeff * r` in f32).
    Add { vector: Vec<f32> },
}

/// Edits of the residual stream: projections (directional ablation) and additions (activation
/// addition), each at chosen layers and sites, with its own direction and scale. Several operations at
/// one site run in the order they were added.
#[derive(Clone)]
pub struct Interventions {
    hidden: usize,
    ops: Vec<[Vec<Op>; 4]>,
}

impl Interventions {
    /// No operations yet, for a model of `layers` layers and width `hidden`.
    pub fn new(layers: usize, hidden: usize) -> Interventions {
        Interventions { hidden, ops: (0..layers).map(|_| Default::default()).collect() }
    }

    fn check(&self, layer: usize, v: &[f64], what: &str) -> Result<()> {
        if layer >= self.ops.len() {
            return Err(ModelError::Hook(format!(
                "{what} at layer {layer}, but the model has {} layers",
                self.ops.len()
            )));
        }
        if v.len() != self.hidden {
            return Err(ModelError::Hook(format!(
                "{what}: the vector has length {} but the model's hidden size is {}",
                v.len(),
                self.hidden
            )));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Hook(format!("{what}: the vector has a NaN or infinite value")));
        }
        Ok(())
    }

    /// Removes `scale` times the component along `direction` at one site:
    /// `x ← x − scale (x·r̂) r̂` with `r̂ = r / (||r|| + 1e-8)` (method.md §7), formed in f64 and rounded
    /// to f32 (the activation dtype) once.
    pub fn project(&mut self, layer: usize, site: Site, direction: &[f64], scale: f64) -> Result<&mut Self> {
        self.check(layer, direction, "directional ablation")?;
        // method.md §7: the hooks divide by ||r|| + 1e-8.
        let norm = direction.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-8;
        let unit = direction.iter().map(|v| (v / norm) as f32).collect();
        self.ops[layer][site.index()].push(Op::Project { unit, scale: scale as f32 });
        Ok(self)
    }

    /// Removes `scale` times the component in the span of an orthonormal basis (`basis`, `[k, hidden]`
    /// row-major, as `direction::Basis` holds it) at one site: `x ← x − scale V Vᵀ x`, coefficients in
    /// f64, rounded to f32 once. With `keep_norm`, each row then gets its norm back (`x ← ||x₀|| x/||x||`,
    /// in f64; a row left with at most 2^-16 of its norm is not rescaled, as the edit does). This is the
    /// hook side of every edit variant at the writes it edits (docs/variants.md): for `k = 1`,
    /// `keep_norm = false` it is [`Interventions::project`] with an exact unit vector.
    pub fn project_basis(
        &mut self,
        layer: usize,
        site: Site,
        basis: &[f64],
        scale: f64,
        keep_norm: bool,
    ) -> Result<&mut Self> {
        let d = self.hidden;
        if basis.is_empty() || !basis.len().is_multiple_of(d) {
            return Err(ModelError::Hook(format!(
                "subspace projection: the basis has {} values, not k vectors of the model's hidden size {d}",
                basis.len()
            )));
        }
        for v in basis.chunks_exact(d) {
            self.check(layer, v, "subspace projection")?;
        }
        let k = basis.len() / d;
        let basis = basis.iter().map(|v| *v as f32).collect();
        self.ops[layer][site.index()].push(Op::ProjectBasis { basis, k, scale: scale as f32, keep_norm });
        Ok(self)
    }

    /// Adds `coeff * vector` at one site (method.md §7 activation addition uses the raw direction at
    /// [`Site::Input`]). The product is formed in f32, as torch does with an f32 activation.
    pub fn add(&mut self, layer: usize, site: Site, vector: &[f64], coeff: f64) -> Result<&mut Self> {
        self.check(layer, vector, "activation addition")?;
        let c = coeff as f32;
        let vector = vector.iter().map(|v| c * *v as f32).collect();
        self.ops[layer][site.index()].push(Op::Add { vector });
        Ok(self)
    }

    /// Directional ablation as the paper's hooks do it (method.md §7): the input of every block, every
    /// attention output and every MLP output.
    pub fn ablation(layers: usize, direction: &[f64]) -> Result<Interventions> {
        let mut i = Interventions::new(layers, direction.len());
        for l in 0..layers {
            for site in [Site::Input, Site::Attn, Site::Mlp] {
                i.project(l, site, direction, 1.0)?;
            }
        }
        Ok(i)
    }

    /// Activation addition (method.md §7): `x^(layer) ← x^(layer) + coeff · r` at every position.
    pub fn activation_addition(layers: usize, layer: usize, direction: &[f64], coeff: f64) -> Result<Interventions> {
        let mut i = Interventions::new(layers, direction.len());
        i.add(layer, Site::Input, direction, coeff)?;
        Ok(i)
    }

    pub fn is_empty(&self) -> bool {
        self.ops.iter().all(|l| l.iter().all(Vec::is_empty))
    }
}

/// `x ← x − s (x·u) u` on one row; the dot product accumulates in f64 (a fixed order) and is rounded once.
fn project_row(x: &mut [f32], unit: &[f32], scale: f32) {
    let c: f64 = x.iter().zip(unit).map(|(a, b)| *a as f64 * *b as f64).sum();
    let c = scale * c as f32;
    for (a, u) in x.iter_mut().zip(unit) {
        *a -= c * u;
    }
}

/// [`Op::ProjectBasis`] on one row.
fn project_basis_row(x: &mut [f32], basis: &[f32], k: usize, scale: f32, keep_norm: bool) {
    let d = x.len();
    let before: f64 = if keep_norm { x.iter().map(|a| *a as f64 * *a as f64).sum() } else { 0.0 };
    let mut c = [0f32; 8];
    let mut c_heap = Vec::new();
    let c: &mut [f32] = if k <= c.len() {
        &mut c[..k]
    } else {
        c_heap.resize(k, 0f32);
        &mut c_heap
    };
    for (m, v) in basis.chunks_exact(d).enumerate() {
        let dot: f64 = x.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
        c[m] = scale * dot as f32;
    }
    for (m, v) in basis.chunks_exact(d).enumerate() {
        for (a, u) in x.iter_mut().zip(v) {
            *a -= c[m] * u;
        }
    }
    if keep_norm {
        let after: f64 = x.iter().map(|a| *a as f64 * *a as f64).sum();
        // The edit's threshold (edit::kernel::norm_factors): 2^-32 of the squared norm.
        if before > 0.0 && after > before * 2.3283064365386963e-10 {
            let f = (before / after).sqrt();
            x.iter_mut().for_each(|a| *a = (*a as f64 * f) as f32);
        }
    }
}

impl Hook for Interventions {
    fn wants(&self, at: At) -> bool {
        self.ops.get(at.layer).is_some_and(|l| !l[at.site.index()].is_empty())
    }

    fn visit(&mut self, at: At, acts: Acts<'_>) -> Result<()> {
        if acts.hidden != self.hidden {
            return Err(ModelError::Hook(format!(
                "interventions built for hidden size {} applied to a model of hidden size {}",
                self.hidden, acts.hidden
            )));
        }
        let ops = &self.ops[at.layer][at.site.index()];
        use rayon::prelude::*;
        acts.data.par_chunks_mut(acts.hidden).with_min_len(8).for_each(|row| {
            for op in ops {
                match op {
                    Op::Project { unit, scale } => project_row(row, unit, *scale),
                    Op::ProjectBasis { basis, k, scale, keep_norm } => {
                        project_basis_row(row, basis, *k, *scale, *keep_norm)
                    }
                    Op::Add { vector } => {
                        for (a, v) in row.iter_mut().zip(vector) {
                            *a += v;
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// Which token positions of each prompt a [`Capture`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Every position.
    All,
    /// The last `n` positions of each prompt (method.md §4: the post-instruction tokens). A prompt
    /// shorter than `n` is an error.
    Last(usize),
}

/// Copies the activations at chosen sites. Each forward call appends, prompt by prompt in batch order:
/// with [`Positions::Last`]`(n)` exactly `n` rows per prompt, with [`Positions::All`] every token row.
/// During generation every step is a call whose segments hold one new token per prompt still going, so
/// a capture there should use [`Positions::All`] (a `Last(n)` with `n > 1` fails at the first step).
pub struct Capture {
    positions: Positions,
    data: BTreeMap<At, Vec<f32>>,
}

impl Capture {
    pub fn new(sites: impl IntoIterator<Item = At>, positions: Positions) -> Capture {
        Capture { positions, data: sites.into_iter().map(|at| (at, Vec::new())).collect() }
    }

    /// One site at every layer `0..layers` (e.g. `Site::Input`: the residual entering each layer).
    pub fn every_layer(layers: usize, site: Site, positions: Positions) -> Capture {
        Capture::new((0..layers).map(|layer| At { layer, site }), positions)
    }

    /// What was captured at a site: rows of `hidden` values (None if the site is not captured).
    pub fn get(&self, at: At) -> Option<&[f32]> {
        self.data.get(&at).map(Vec::as_slice)
    }

    /// Takes the rows captured at a site, leaving it empty.
    pub fn take(&mut self, at: At) -> Option<Vec<f32>> {
        self.data.get_mut(&at).map(std::mem::take)
    }
}

impl Hook for Capture {
    fn wants(&self, at: At) -> bool {
        self.data.contains_key(&at)
    }

    fn visit(&mut self, at: At, acts: Acts<'_>) -> Result<()> {
        let d = acts.hidden;
        let buf = self.data.get_mut(&at).expect("visit is called only for wanted sites");
        match self.positions {
            Positions::All => buf.extend_from_slice(acts.data),
            Positions::Last(n) => {
                for seg in acts.segments {
                    if seg.len < n {
                        return Err(ModelError::Hook(format!(
                            "prompt {} has {} tokens, fewer than the last {n} positions to capture",
                            seg.row, seg.len
                        )));
                    }
                    let end = seg.start + seg.len;
                    buf.extend_from_slice(&acts.data[(end - n) * d..end * d]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs() -> Vec<Segment> {
        vec![Segment { row: 0, start: 0, len: 2, pos0: 0 }, Segment { row: 1, start: 2, len: 1, pos0: 0 }]
    }

    #[test]
    fn ablation_removes_the_component_and_addition_adds_the_vector() {
        let mut i = Interventions::new(2, 2);
        i.project(1, Site::Attn, &[3.0, 4.0], 1.0).unwrap();
        i.add(0, Site::Input, &[1.0, -1.0], 2.0).unwrap();
        assert!(!i.wants(At { layer: 0, site: Site::Attn }) && i.wants(At { layer: 1, site: Site::Attn }));
        let segs = segs();
        let mut x = vec![3.0f32, 4.0, 4.0, -3.0, 1.0, 1.0];
        i.visit(At { layer: 1, site: Site::Attn }, Acts { data: &mut x, hidden: 2, segments: &segs }).unwrap();
        for row in x.chunks(2) {
            let along = row[0] * 0.6 + row[1] * 0.8;
            assert!(along.abs() < 1e-6, "{row:?}");
        }
        assert_eq!(&x[2..4], &[4.0, -3.0]);
        let mut y = vec![0f32; 6];
        i.visit(At { layer: 0, site: Site::Input }, Acts { data: &mut y, hidden: 2, segments: &segs }).unwrap();
        assert_eq!(y, vec![2.0, -2.0, 2.0, -2.0, 2.0, -2.0]);
    }

    #[test]
    fn a_basis_projection_removes_the_subspace_and_can_keep_the_norm() {
        // Basis e0, e1 of R^3; x = (3, 4, 12), |x| = 13.
        let mut i = Interventions::new(1, 3);
        i.project_basis(0, Site::Mlp, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 1.0, false).unwrap();
        let segs = segs();
        let mut x = vec![3.0f32, 4.0, 12.0, 3.0, 4.0, 12.0, 1.0, 1.0, 1.0];
        i.visit(At { layer: 0, site: Site::Mlp }, Acts { data: &mut x, hidden: 3, segments: &segs }).unwrap();
        assert_eq!(&x[..3], &[0.0, 0.0, 12.0]);
        let mut i = Interventions::new(1, 3);
        i.project_basis(0, Site::Mlp, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 0.5, true).unwrap();
        let mut x = vec![3.0f32, 4.0, 12.0];
        i.visit(At { layer: 0, site: Site::Mlp }, Acts { data: &mut x, hidden: 3, segments: &segs[..1] }).unwrap();
        // (1.5, 2, 12) rescaled to norm 13.
        let n = (1.5f64 * 1.5 + 4.0 + 144.0).sqrt();
        let want = [1.5 * 13.0 / n, 2.0 * 13.0 / n, 12.0 * 13.0 / n];
        for (a, b) in x.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        let e = i.project_basis(0, Site::Mlp, &[1.0, 0.0], 1.0, false).err().unwrap().to_string();
        assert_eq!(e, "subspace projection: the basis has 2 values, not k vectors of the model's hidden size 3");
    }

    #[test]
    fn interventions_check_their_inputs() {
        let mut i = Interventions::new(2, 3);
        let e = |r: Result<&mut Interventions>| r.err().unwrap().to_string();
        assert_eq!(
            e(i.project(2, Site::Input, &[1.0; 3], 1.0)),
            "directional ablation at layer 2, but the model has 2 layers"
        );
        assert_eq!(
            e(i.add(0, Site::Input, &[1.0; 2], 1.0)),
            "activation addition: the vector has length 2 but the model's hidden size is 3"
        );
        assert_eq!(
            e(i.project(0, Site::Mlp, &[f64::NAN; 3], 1.0)),
            "directional ablation: the vector has a NaN or infinite value"
        );
        assert!(i.is_empty());
    }

    #[test]
    fn capture_keeps_the_last_positions_of_each_prompt() {
        let at = At { layer: 0, site: Site::Output };
        let segs = segs();
        let mut x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut c = Capture::new([at], Positions::Last(1));
        c.visit(at, Acts { data: &mut x, hidden: 2, segments: &segs }).unwrap();
        assert_eq!(c.get(at).unwrap(), &[2.0, 3.0, 4.0, 5.0]);
        let mut c = Capture::new([at], Positions::Last(2));
        let e = c.visit(at, Acts { data: &mut x, hidden: 2, segments: &segs }).unwrap_err();
        assert_eq!(e.to_string(), "prompt 1 has 1 tokens, fewer than the last 2 positions to capture");
    }
}
