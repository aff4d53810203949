//! Equivalence: is the edited checkpoint the intervention that was evaluated? Runs the edited model and the
//! original model with directional-ablation hooks on the same prompts and compares their residual streams,
//! layer by layer, and their next-token logits (method.md §7, "Why weight orthogonalization equals
//! ablation", and where it fails).
//!
//! The metric is the reference run's (`../shared/reference/eval.json`, `equivalence`): for every layer, the
//! largest relative difference over all prompts and token positions, `||h_edit − h_hook||₂ / ||h_hook||₂`, for
//! the residual entering each decoder block and the final residual (the input of the final norm).
//!
//! The hooks are what the edit claims to be ([`Claim`]): the paper's hooks for a default edit, or, for an
//! edit restricted to some layers or scaled by `s ≠ 1`, projections of the writes it edited with the same
//! scale (method.md §6, scale variant: only the writes are scaled). Where the claim cannot hold exactly
//! ([`Caveat`]), the comparison still runs and says why its numbers are large.
//!
//! Never changes either model; runs prompts in batches, so memory grows with the batch, not the prompt set.

use model::{At, Batch, Capture, Chain, Interventions, Logits, Model, Positions, Site};
use rayon::prelude::*;
use serde::Serialize;

use crate::{Error, Result};

/// Which writes an edit projected, and by how much: the hooks an edited checkpoint should equal.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Claim {
    /// `s` of method.md §6 (1: the paper's edit).
    pub scale: f64,
    /// The token embedding was edited (the residual entering layer 0 is projected).
    pub embedding: bool,
    /// Decoder layers whose attention and MLP writes were edited, ascending.
    pub layers: Vec<usize>,
}

impl Claim {
    /// The paper's edit: every writer of every layer and the embedding, `s = 1`.
    pub fn full(layers: usize) -> Claim {
        Claim { scale: 1.0, embedding: true, layers: (0..layers).collect() }
    }

    /// Whether this is the paper's edit of a model with `layers` layers.
    pub fn is_full(&self, layers: usize) -> bool {
        self.scale == 1.0 && self.embedding && self.layers.iter().copied().eq(0..layers)
    }

    /// The hooks that implement the claim on the original model. The paper's edit gets the paper's hooks
    /// (every block input, attention output and MLP output; method.md §7). Otherwise each edited write is
    /// projected with the edit's scale, and nothing else: scaling the block inputs too would compound the
    /// factor at every layer (method.md §6).
    pub fn hooks(&self, layers: usize, direction: &[f64]) -> Result<Interventions> {
        if let Some(&l) = self.layers.iter().find(|&&l| l >= layers) {
            return Err(Error::Input(format!("the edit claims layer {l}, but the model has {layers} layers")));
        }
        if self.is_full(layers) {
            return Ok(Interventions::ablation(layers, direction)?);
        }
        let mut hooks = Interventions::new(layers, direction.len());
        if self.embedding {
            hooks.project(0, Site::Input, direction, self.scale)?;
        }
        for &l in &self.layers {
            hooks.project(l, Site::Attn, direction, self.scale)?;
            hooks.project(l, Site::Mlp, direction, self.scale)?;
        }
        Ok(hooks)
    }
}

/// The hooks that equal an edit plan with its directions, on the original model: each planned write
/// (`edit::Plan::write_ops`) becomes a projection of the same basis with the same scale and norm rule at the
/// site it writes to (the embedding's at the residual entering layer 0). Exact for layer kernels, per-layer
/// directions and subspaces; a norm-preserving plan's hooks restore each whole write's norm, which its
/// weights do not (docs/variants.md). Also returns whether every hook is a plain projection at scale 1
/// (idempotent, so the along/besides split of [`equivalence`] applies).
pub fn plan_hooks(
    ckpt: &checkpoint::Checkpoint,
    plan: &edit::Plan,
    directions: &direction::Directions,
) -> Result<(Interventions, bool)> {
    let layers = ckpt.config.num_hidden_layers;
    let bases = plan.bases(ckpt, directions).map_err(|e| Error::Input(format!("the edit's hooks: {e}")))?;
    let mut hooks = Interventions::new(layers, ckpt.config.hidden_size);
    let mut idempotent = true;
    for w in plan.write_ops(&bases) {
        let (layer, site) = match (w.layer, w.site) {
            (None, _) => (0, Site::Input),
            (Some(l), Some(checkpoint::Site::Attn)) => (l, Site::Attn),
            (Some(l), Some(checkpoint::Site::Mlp)) => (l, Site::Mlp),
            (Some(l), None) => return Err(Error::Input(format!("a writer of layer {l} has no site"))),
        };
        hooks.project_basis(layer, site, w.basis.as_slice(), w.scale, w.norm_preserving)?;
        idempotent &= w.scale == 1.0 && !w.norm_preserving;
    }
    Ok((hooks, idempotent))
}

/// Why an edited checkpoint cannot equal its hooks exactly (method.md §6-7).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Caveat {
    /// `--keep-tie`: the LM head is the edited embedding. Residual streams still agree; logits do not.
    KeptTie,
    /// Gemma 2/3: writes pass a post-norm with a per-channel gain after the writer, so the edit removes the
    /// gain-weighted direction (`ŝ`) from each writer; the hooks ablate after the norm. Close, not equal.
    GainWeighted { tensors: usize },
    /// Writers left unedited (`--exclude`, `--skip-embeddings` aside from the claim) that still write `r̂`.
    Excluded { tensors: Vec<String> },
    /// An edit variant of issue 15 (norm-preserving writers, per-layer scales from a layer kernel, several
    /// directions) whose hooks this check does not build: it compares with one projection per write.
    Variant { what: String },
    /// A norm-preserving edit compared with its own plan's hooks: the weights restore each written column's
    /// norm, the hooks each whole write's; no hook at a residual-stream site rescales columns.
    NormPreserving,
    /// The edited weights are rounded once to their stored dtype; the hooks project in f32. The difference
    /// is of the order of the dtype's unit roundoff, `2^-8` for bf16.
    Rounding { dtype: String, unit_roundoff: f64 },
}

impl Caveat {
    /// One line for reports.
    pub fn describe(&self) -> String {
        match self {
            Caveat::KeptTie => "--keep-tie: the LM head is the edited embedding, so the logits differ from the hooked \
                                model's by a rank-one term (docs/method.md §6); the residual streams still agree"
                .to_string(),
            Caveat::GainWeighted { tensors } => format!(
                "{tensors} writers pass a post-norm with a per-channel gain (Gemma 2/3) and were edited against the \
                 gain-weighted direction ŝ: no weight edit equals ablating the residual after the norm \
                 (docs/method.md §6), so the residual streams differ by design"
            ),
            Caveat::Excluded { tensors } => format!(
                "{} writer(s) left unedited still write r̂ where the hooks remove it: {}",
                tensors.len(),
                tensors.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
            ),
            Caveat::Variant { what } => format!(
                "{what}: the hooks compared here are one projection of r̂ per edited write with one scale, which is \
                 not this edit (docs/variants.md), so the difference is expected"
            ),
            Caveat::NormPreserving => "norm-preserving edit: its weights restore the norm of each written column \
                                       (each input feature of the write), the hooks that of each whole write; no \
                                       hook on the residual stream rescales columns (docs/variants.md), so the \
                                       difference is expected"
                .to_string(),
            Caveat::Rounding { dtype, unit_roundoff } => format!(
                "the edited weights are stored in {dtype} (unit roundoff {unit_roundoff:.1e}); the hooks project in \
                 f32, so the two differ by the rounding of every edited weight"
            ),
        }
    }
}

/// The comparison of an edited model with its hooks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Equivalence {
    /// `max ||h_edit − h_hook|| / ||h_hook||` over prompts and positions: entry `l < L` for the residual
    /// entering block `l`, entry `L` for the final residual. The and the reference's metric.
    pub per_layer: Vec<f64>,
    /// The largest entry of `per_layer` and its index.
    pub max: f64,
    pub worst_layer: usize,
    /// The same metric between the edited model *with* the hooks and the hooked original: neither has any
    /// component along `r̂` where the hooks act, so this is every difference besides the direction: the
    /// rounding of the edited weights to their stored dtype (f32 arithmetic alone for f32 checkpoints), or
    /// Gemma 2/3's post-norms rescaling the edited writes. Only for `s = 1`, where the hooks are idempotent.
    pub besides_direction: Option<Vec<f64>>,
    /// The same metric between the edited model and itself with the hooks: what the checkpoint still writes
    /// along `r̂` (at most `u·Σ|r̂||W|` per weight after rounding, method.md §6 law 1). Only for `s = 1`.
    pub along_direction: Option<Vec<f64>>,
    /// `max ||z_edit − z_hook|| / ||z_hook||` over prompts, `z` the last position's logits.
    pub logits_rel: f64,
    /// `max |z_edit − z_hook|` over prompts and vocabulary.
    pub logits_max_abs: f64,
    /// Prompts whose most likely next token is the same in both.
    pub top1_agree: usize,
    pub prompts: usize,
    /// Positions compared: the prompts' shared prefix (a chat template's system turn) once, then each
    /// prompt's own tokens.
    pub tokens: usize,
}

/// Residual streams of the edited model against the original with `hooks`, on `prompts` (token ids),
/// `batch_size` prompts per forward pass. With `split` (only meaningful when the claim's scale is 1), also
/// the edited model with the same hooks, to separate the two parts of any difference (see [`Equivalence`]).
/// `progress(done)` is called after each batch.
pub fn equivalence(
    original: &Model,
    edited: &Model,
    hooks: &mut Interventions,
    split: bool,
    prompts: &[Vec<u32>],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Equivalence> {
    let (a, b) = (original.arch(), edited.arch());
    if (a.layers, a.hidden, a.vocab) != (b.layers, b.hidden, b.vocab) {
        return Err(Error::Input(format!(
            "the edited model ({} layers, hidden {}, vocab {}) does not have the original's shape ({} layers, hidden \
             {}, vocab {})",
            b.layers, b.hidden, b.vocab, a.layers, a.hidden, a.vocab
        )));
    }
    if prompts.is_empty() {
        return Err(Error::Input("equivalence needs at least one prompt".into()));
    }
    let (layers, d) = (a.layers, a.hidden);
    // The residual entering every block, then the one leaving the last (the final norm's input).
    let sites: Vec<At> = (0..layers)
        .map(|layer| At { layer, site: Site::Input })
        .chain([At { layer: layers - 1, site: Site::Output }])
        .collect();
    let worst = |x: &[f32], y: &[f32]| -> f64 {
        x.par_chunks(d).zip(y.par_chunks(d)).map(|(x, y)| relative(x, y)).reduce(|| 0.0, f64::max)
    };
    let mut per_layer = vec![0f64; layers + 1];
    let mut besides = vec![0f64; layers + 1];
    let mut along = vec![0f64; layers + 1];
    let capture = || Capture::new(sites.iter().copied(), Positions::All);
    // Folds one pass's captures (the hooked original's, the edited model's, the edited model's under the
    // hooks) into the per-layer maxima.
    let mut compare = |hooked: &mut Capture, plain: &mut Capture, both: &mut Capture| {
        for (l, &at) in sites.iter().enumerate() {
            let take = |c: &mut Capture| c.take(at).expect("every site is captured");
            let (h, e) = (take(hooked), take(plain));
            per_layer[l] = per_layer[l].max(worst(&e, &h));
            if split {
                let eh = take(both);
                besides[l] = besides[l].max(worst(&eh, &h));
                along[l] = along[l].max(worst(&e, &eh));
            }
        }
    };
    // The tokens every prompt starts with (a chat template's system turn) run once in each of the passes,
    // and are compared once: the metric is a maximum over positions, which repeats do not change.
    let shared = eval::shared_prefix(prompts, 1);
    let (hooked_pre, plain_pre, both_pre) = if shared > 0 {
        let tokens = &prompts[0][..shared];
        let (mut hooked, mut plain, mut both) = (capture(), capture(), capture());
        let h = original.prefix(tokens, &mut Chain(vec![&mut *hooks, &mut hooked]))?;
        let e = edited.prefix(tokens, &mut plain)?;
        let eh = if split { Some(edited.prefix(tokens, &mut Chain(vec![&mut *hooks, &mut both]))?) } else { None };
        compare(&mut hooked, &mut plain, &mut both);
        (Some(h), Some(e), eh)
    } else {
        (None, None, None)
    };
    let (mut logits_rel, mut logits_max_abs, mut top1_agree, mut tokens) = (0f64, 0f64, 0, shared);
    let mut done = 0;
    for chunk in prompts.chunks(batch_size.max(1)) {
        let rests: Vec<&[u32]> = chunk.iter().map(|p| &p[shared..]).collect();
        let batch = Batch::new(&rests)?;
        tokens += batch.tokens().len();
        let (mut hooked, mut plain, mut both) = (capture(), capture(), capture());
        let z_hooked = original.forward_after(
            hooked_pre.as_ref(),
            &batch,
            Logits::Last,
            &mut Chain(vec![&mut *hooks, &mut hooked]),
        )?;
        let z_edited = edited.forward_after(plain_pre.as_ref(), &batch, Logits::Last, &mut plain)?;
        if split {
            edited.forward_after(both_pre.as_ref(), &batch, Logits::None, &mut Chain(vec![&mut *hooks, &mut both]))?;
        }
        compare(&mut hooked, &mut plain, &mut both);
        for p in 0..chunk.len() {
            let (zh, ze) = (z_hooked.row(p), z_edited.row(p));
            logits_rel = logits_rel.max(relative(ze, zh));
            logits_max_abs = zh.iter().zip(ze).map(|(a, b)| (a - b).abs() as f64).fold(logits_max_abs, f64::max);
            top1_agree += (argmax(zh) == argmax(ze)) as usize;
        }
        done += chunk.len();
        progress(done);
    }
    let (worst_layer, max) = per_layer
        .iter()
        .copied()
        .enumerate()
        .fold((0, 0f64), |(bl, bv), (l, v)| if v > bv { (l, v) } else { (bl, bv) });
    Ok(Equivalence {
        per_layer,
        max,
        worst_layer,
        besides_direction: split.then_some(besides),
        along_direction: split.then_some(along),
        logits_rel,
        logits_max_abs,
        top1_agree,
        prompts: prompts.len(),
        tokens,
    })
}

/// `||a − b|| / ||b||` in f64 (0 when both are 0).
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() }
}

/// The first index of the largest value (as `torch.argmax`).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}
