//! Many prompts through the runtime: tokenized prompts split into packed batches, the tokens every prompt
//! shares at its start (a chat template's system turn) computed once per call and reused through its keys
//! and values (`model::Prefix`: the same computation, causal attention), last-position logits handed back
//! prompt by prompt, and hooks for interventions (which also act on the shared prefix) and for observers
//! (which see only each prompt's own tokens).
//!
//! Batches are fixed when [`Prompts`] is built, so every call runs the same matrix shapes: two calls with
//! the same hooks give the same bits, and a run resumed from a cached residual ([`Prompts::residuals`],
//! method.md §5 prefix reuse) gives the bits of the full run.

use std::ops::Range;

use model::{At, Batch, Capture, Chain, Forward, Hook, Logits, Model, NoHook, Positions, Site};

use crate::{EvalError, Result};

/// How prompts are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    /// Prompts per forward pass (the paper's is 32).
    pub batch_size: usize,
    /// Compute the tokens all prompts start with once per call.
    pub share_prefix: bool,
    /// Tokens each prompt keeps after the shared prefix (at least 1; `find` keeps the post-instruction
    /// tokens and one more, so observers see every candidate position).
    pub keep: usize,
}

impl Default for BatchOptions {
    fn default() -> BatchOptions {
        BatchOptions { batch_size: 32, share_prefix: true, keep: 1 }
    }
}

/// Tokenized prompts in fixed batches.
pub struct Prompts {
    ids: Vec<Vec<u32>>,
    prefix: Vec<u32>,
    /// Each batch: the prompt indices and the packed tokens after the prefix.
    batches: Vec<(Range<usize>, Batch)>,
}

/// The residual entering chosen layers for every prompt token after the shared prefix, per batch,
/// computed once on the unmodified model (method.md §5, prefix reuse for the induce score).
pub struct Residuals {
    layers: Vec<usize>,
    /// `[batch][layer index]`: `[tokens of the batch, hidden]`.
    rows: Vec<Vec<Vec<f32>>>,
}

impl Residuals {
    /// The residuals of one batch at `layer` (which must be one of the captured layers).
    fn get(&self, batch: usize, layer: usize) -> Option<&[f32]> {
        let i = self.layers.iter().position(|&l| l == layer)?;
        Some(&self.rows[batch][i])
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.rows.iter().flatten().map(|r| r.len() * 4).sum()
    }
}

/// The number of tokens every prompt starts with, leaving each at least `keep` of its own (0 for no prompts).
pub fn shared_prefix<P: AsRef<[u32]>>(ids: &[P], keep: usize) -> usize {
    let Some(shortest) = ids.iter().map(|p| p.as_ref().len()).min() else { return 0 };
    let mut n = 0;
    while n + keep < shortest && ids.iter().all(|p| p.as_ref()[n] == ids[0].as_ref()[n]) {
        n += 1;
    }
    n
}

impl Prompts {
    /// Batches `ids` (each at least `keep` tokens).
    pub fn new(ids: Vec<Vec<u32>>, opts: BatchOptions) -> Result<Prompts> {
        if ids.is_empty() {
            return Err(EvalError::Run("no prompts to run".to_string()));
        }
        let keep = opts.keep.max(1);
        if let Some((i, p)) = ids.iter().enumerate().find(|(_, p)| p.len() < keep) {
            return Err(EvalError::Run(format!("prompt {i} has {} tokens; at least {keep} are needed", p.len())));
        }
        let prefix_len = if opts.share_prefix { shared_prefix(&ids, keep) } else { 0 };
        let prefix = ids[0][..prefix_len].to_vec();
        let size = opts.batch_size.max(1);
        let mut batches = Vec::new();
        for start in (0..ids.len()).step_by(size) {
            let end = (start + size).min(ids.len());
            let rests: Vec<&[u32]> = ids[start..end].iter().map(|p| &p[prefix_len..]).collect();
            batches.push((start..end, Batch::new(&rests)?));
        }
        Ok(Prompts { ids, prefix, batches })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The prompts' token ids.
    pub fn ids(&self) -> &[Vec<u32>] {
        &self.ids
    }

    /// The shared prefix computed once per call (empty when not shared).
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    /// Tokens run per call, prefix once plus every prompt's own tokens.
    pub fn tokens_per_call(&self) -> usize {
        self.prefix.len() + self.batches.iter().map(|(_, b)| b.tokens().len()).sum::<usize>()
    }

    /// Runs every batch with `hook` (on the prefix and the prompts) and `observe` (on the prompts' own
    /// tokens only), computing `logits`; `each(prompts, forward)` gets each batch's prompt range and
    /// output.
    pub fn run(
        &self,
        model: &Model,
        hook: &mut dyn Hook,
        observe: &mut dyn Hook,
        logits: Logits,
        each: &mut dyn FnMut(Range<usize>, &Forward) -> Result<()>,
    ) -> Result<()> {
        let prefix = if self.prefix.is_empty() { None } else { Some(model.prefix(&self.prefix, hook)?) };
        for (range, batch) in &self.batches {
            let mut both = Chain(vec![&mut *hook, &mut *observe]);
            let out = model.forward_after(prefix.as_ref(), batch, logits, &mut both)?;
            each(range.clone(), &out)?;
        }
        Ok(())
    }

    /// The last-position logits of every prompt under `hook`, in order: `each(prompt, logits)`.
    pub fn last_logits(
        &self,
        model: &Model,
        hook: &mut dyn Hook,
        each: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.run(model, hook, &mut NoHook, Logits::Last, &mut |range, out| {
            range.enumerate().try_for_each(|(row, i)| each(i, out.row(row)))
        })
    }

    /// The residual entering each of `layers` for every prompt token after the prefix, on the
    /// unmodified model, for [`Prompts::last_logits_from`].
    pub fn residuals(&self, model: &Model, layers: &[usize]) -> Result<Residuals> {
        let sites: Vec<At> = layers.iter().map(|&layer| At { layer, site: Site::Input }).collect();
        let mut rows = Vec::with_capacity(self.batches.len());
        let prefix = if self.prefix.is_empty() { None } else { Some(model.prefix(&self.prefix, &mut NoHook)?) };
        for (_, batch) in &self.batches {
            let mut capture = Capture::new(sites.clone(), Positions::All);
            model.forward_after(prefix.as_ref(), batch, Logits::None, &mut capture)?;
            rows.push(sites.iter().map(|&at| capture.take(at).expect("captured site")).collect());
        }
        Ok(Residuals { layers: layers.to_vec(), rows })
    }

    /// [`Prompts::last_logits`] for a `hook` that changes nothing before the input of `layer` (e.g. an
    /// activation addition there): every batch resumes at `layer` from `residuals` (method.md §5,
    /// prefix reuse), which gives the bits of the full run. The shared prefix is run whole with `hook`.
    pub fn last_logits_from(
        &self,
        model: &Model,
        residuals: &Residuals,
        layer: usize,
        hook: &mut dyn Hook,
        each: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let prefix = if self.prefix.is_empty() { None } else { Some(model.prefix(&self.prefix, hook)?) };
        for (b, (range, batch)) in self.batches.iter().enumerate() {
            let x = residuals
                .get(b, layer)
                .ok_or_else(|| EvalError::Run(format!("no cached residual entering layer {layer}")))?
                .to_vec();
            let out = model.forward_after_from(prefix.as_ref(), layer, x, batch, Logits::Last, hook)?;
            for (row, i) in range.clone().enumerate() {
                each(i, out.row(row))?;
            }
        }
        Ok(())
    }
}
