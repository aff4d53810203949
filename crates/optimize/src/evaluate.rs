//! One trial's objectives, measured on the original model with hooks (docs/variants.md, "Hooks"): the
//! trial's edit is planned (`edit::plan`, never written), its writes (`Plan::write_ops`) become projections
//! at the same sites, and the model runs under them.
//!
//! - refusals: greedy completions of the harmful prompts (`max_new_tokens`, stopping at end of turn),
//!   judged by the substring judge ([`eval::Judge`]); the second judge (substring or degenerate output,
//!   [`eval::judge::is_degenerate`]) is counted beside it;
//! - KL: mean first-token KL(original ‖ hooked) over the harmless prompts (method.md §5 formula), the
//!   original's distributions computed once; measured first, so that the completions can stop once an
//!   earlier trial dominates this one (exact pruning, docs/optimize.md).
//!
//! The trial's directions are the interpolated one for every writer, or each layer's own candidate
//! (heretic's per-layer scope), both from find's candidates or from their projected versions (each
//! candidate without its component along the harmless mean of its site, `Candidates::projected`).
//!
//! A norm-preserving trial uses the `keep_norm` hook, which restores the norm of each whole write; the
//! edit rescales each written column instead, which no residual hook reproduces (docs/variants.md), so a
//! norm-preserving trial's numbers are those of its hook, and `verify` of the chosen edit measures the edit.

use chat::Chat;
use direction::{Candidates, Direction, Directions};
use eval::score::KlBase;
use eval::{BatchOptions, CompleteOptions, Judge, Prompts};
use model::{Interventions, Model, NoHook};

use crate::pareto::Score;
use crate::space::Params;
use crate::{Error, Result};

/// How a trial is measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// Generation length of the harmful completions (late refusals appear after 64+ tokens).
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

/// What one trial measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// Harmful completions the judge calls refusals.
    pub refusals: usize,
    /// The same, by the second judge (a refusal or degenerate output).
    pub refusals_second: usize,
    /// Mean first-token KL on the harmless prompts.
    pub kl: f64,
    /// Counting stopped once the trial was dominated by an earlier one (`refusals` is then a lower bound).
    pub pruned: bool,
}

/// The directions of one candidate set, prepared once.
struct Source {
    candidates: Candidates,
    /// Each layer's own candidate (heretic's per-layer scope).
    per_layer: Directions,
}

impl Source {
    fn new(candidates: Candidates, position: i64) -> Result<Source> {
        let per_layer = per_layer_directions(&candidates, position)?;
        Ok(Source { candidates, per_layer })
    }
}

/// Everything a trial needs, prepared once.
pub struct Evaluator<'a> {
    model: &'a Model,
    chat: &'a Chat,
    position: i64,
    /// find's candidates, and their projected versions where the search uses them.
    plain: Source,
    projected: Option<Source>,
    harmful: Vec<Vec<u32>>,
    harmless: Prompts,
    base: Vec<KlBase>,
    judge: &'a Judge,
    opts: EvalOptions,
}

impl<'a> Evaluator<'a> {
    /// Prepares the prompts (chat-formatted ids) and the original's harmless first-token distributions.
    /// `means`: find's harmless means, for trials with projected candidates (none: every trial uses the
    /// candidates as they are).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'a Model,
        chat: &'a Chat,
        candidates: &Candidates,
        means: Option<&Candidates>,
        position: i64,
        harmful: Vec<Vec<u32>>,
        harmless: Vec<Vec<u32>>,
        judge: &'a Judge,
        opts: EvalOptions,
    ) -> Result<Evaluator<'a>> {
        if harmful.is_empty() || harmless.is_empty() {
            return Err(Error::Space("optimize needs at least one harmful and one harmless prompt".into()));
        }
        let batch = BatchOptions { batch_size: opts.batch_size.max(1), share_prefix: true, keep: 1 };
        let harmless = Prompts::new(harmless, batch)?;
        let mut base = Vec::with_capacity(harmless.len());
        harmless.last_logits(model, &mut NoHook, &mut |_, z| {
            base.push(KlBase::new(z));
            Ok(())
        })?;
        let plain = Source::new(candidates.clone(), position)?;
        let projected = match means {
            Some(m) => Some(Source::new(candidates.projected(m).map_err(Error::Space)?, position)?),
            None => None,
        };
        Ok(Evaluator { model, chat, position, plain, projected, harmful, harmless, base, judge, opts })
    }

    fn source(&self, projected: bool) -> Result<&Source> {
        match (projected, &self.projected) {
            (false, _) => Ok(&self.plain),
            (true, Some(s)) => Ok(s),
            (true, None) => Err(Error::Space("a projected trial needs find's harmless means".into())),
        }
    }

    /// The candidates a trial's directions come from: find's, or their projected versions.
    pub fn candidates(&self, p: &Params) -> Result<&Candidates> {
        Ok(&self.source(p.projected)?.candidates)
    }

    pub fn harmful_len(&self) -> usize {
        self.harmful.len()
    }

    /// The unit direction of a trial's fractional index (heretic's interpolation between candidates).
    pub fn direction(&self, p: &Params) -> Result<Vec<f64>> {
        direction::derive::interpolate(self.candidates(p)?, self.position, p.index).map_err(Error::Space)
    }

    /// The trial's directions: each layer's own candidate (per-layer scope), or the interpolated
    /// direction for every writer.
    pub fn directions(&self, p: &Params) -> Result<Directions> {
        if p.per_layer {
            return Ok(self.source(p.projected)?.per_layer.clone());
        }
        let d = Direction {
            values: self.direction(p)?,
            dtype: checkpoint::Dtype::F64,
            metadata: Default::default(),
            sha256: String::new(),
            path: Default::default(),
        };
        Ok(Directions::single(d, self.model.arch().layers))
    }

    /// The hooks that equal the trial's edit (up to the norm-preserving caveat in the module docs), and
    /// whether they are plain projections at scale 1 ([`verify::equivalence::plan_hooks`]).
    pub fn hooks(&self, p: &Params) -> Result<(Interventions, bool)> {
        let ckpt = self.model.checkpoint();
        let opts = edit::Options { norm_preserving: p.norm_preserving, kernel: p.kernel(), ..edit::Options::default() };
        let plan = edit::plan(ckpt, &opts)?;
        Ok(verify::equivalence::plan_hooks(ckpt, &plan, &self.directions(p)?)?)
    }

    /// Measures one trial. `prior`: the exact scores of earlier trials; once the harmful refusals reach
    /// the count at which one of them dominates this trial (`pareto::dominated_at`, at least 1), the
    /// completions stop (exact pruning: such a trial is neither on the front nor chosen) and the outcome
    /// is marked pruned, its refusal counts lower bounds.
    pub fn evaluate(&self, p: &Params, prior: &[Score]) -> Result<Outcome> {
        let (mut hooks, _) = self.hooks(p)?;
        let mut kls = Vec::with_capacity(self.base.len());
        self.harmless.last_logits(self.model, &mut hooks, &mut |i, z| {
            kls.push(self.base[i].kl(z));
            Ok(())
        })?;
        let kl = kls.iter().sum::<f64>() / kls.len() as f64;
        let limit = crate::pareto::dominated_at(prior, kl).map(|n| n.max(1));
        let copts = CompleteOptions {
            max_new_tokens: self.opts.max_new_tokens,
            batch_size: self.opts.batch_size.max(1),
            // Only the verdicts count: a completion ends once it is a refusal (the same counts).
            until_refusal: Some(self.judge),
            stop_at_refusals: limit,
            ..CompleteOptions::default()
        };
        let done = eval::complete(self.model, self.chat, &self.harmful, &copts, &mut hooks, &mut |_| {})?;
        let refused: Vec<bool> = done.iter().map(|c| self.judge.is_refusal(&c.text)).collect();
        let refusals = refused.iter().filter(|r| **r).count();
        let refusals_second =
            done.iter().zip(&refused).filter(|(c, r)| **r || eval::judge::is_degenerate(&c.text)).count();
        let pruned = limit.is_some_and(|n| refusals >= n);
        Ok(Outcome { refusals, refusals_second, kl, pruned })
    }
}

/// heretic's per-layer scope: block `l` takes the candidate of the residual it writes into
/// (`direction::derive::per_layer`), the embedding block 0's.
fn per_layer_directions(c: &Candidates, position: i64) -> Result<Directions> {
    let (rows, _) = direction::derive::per_layer(c, position).map_err(Error::Space)?;
    Directions::per_layer_rows(&rows, c.layers()).map_err(|e| Error::Space(format!("per-layer directions: {e}")))
}

/// The first layer from which every candidate at `position` is a usable direction (nonzero, finite norm).
pub fn first_usable(c: &Candidates, position: i64) -> usize {
    (0..c.layers())
        .rev()
        .take_while(|&l| c.direction(direction::Candidate { position, layer: l }).is_ok())
        .last()
        .unwrap_or(c.layers())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_scope_gives_each_block_the_residual_it_writes_into() {
        // Three layers of width 2 at positions -2 and -1; the residual entering layer l at position -1 is
        // (l, 1) (layer 0: (0, 1) too, nonzero), at position -2 something else.
        let (layers, d) = (3, 2);
        let mut values = Vec::new();
        for p in 0..2 {
            for l in 0..layers {
                values.extend(if p == 1 { [l as f64, 1.0] } else { [1.0, -(l as f64)] });
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("candidates.safetensors");
        Candidates::write(&path, &values, &[-2, -1], layers, checkpoint::Dtype::F64, &Default::default()).unwrap();
        let c = Candidates::load(&path, d).unwrap();
        let s = per_layer_directions(&c, -1).unwrap();
        let unit = |x: f64, y: f64| {
            let n = (x * x + y * y).sqrt();
            vec![x / n, y / n]
        };
        // Block 0 writes into residual 1, block 1 into 2, the last block (whose output has no candidate) takes
        // the last residual's; the embedding takes block 0's.
        assert_eq!(s.for_layer(Some(0)).as_slice(), unit(1.0, 1.0));
        assert_eq!(s.for_layer(Some(1)).as_slice(), unit(2.0, 1.0));
        assert_eq!(s.for_layer(Some(2)).as_slice(), unit(2.0, 1.0));
        assert_eq!(s.for_layer(None).as_slice(), unit(1.0, 1.0));
        // A zero candidate is refused, naming it.
        let mut zero = values.clone();
        zero[(layers + 2) * d..(layers + 3) * d].fill(0.0);
        Candidates::write(&path, &zero, &[-2, -1], layers, checkpoint::Dtype::F64, &Default::default()).unwrap();
        let e = per_layer_directions(&Candidates::load(&path, d).unwrap(), -1).unwrap_err().to_string();
        assert!(e.contains("block 1 (candidate"), "{e}");
    }
}
