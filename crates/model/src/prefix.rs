//! A shared prompt prefix, computed once: its keys and values are kept, and prompts that start with it
//! run only their remaining tokens against them. Attention is causal, so a prefix token's keys and
//! values do not depend on what follows, and every later token attends to the same keys and values either
//! way: this is the same computation as running each whole prompt (chat prompts all start with the same
//! template tokens, e.g. a default system prompt). Hooks run on the prefix's tokens too (pass the same
//! interventions to both calls); a capture sees only the tokens after the prefix.
//!
//! Used by `find` and `verify` to score many prompts under many interventions.

use crate::batch::Batch;
use crate::forward::{Forward, Logits, Model, RowCache};
use crate::hooks::Hook;
use crate::{ModelError, Result};

/// The keys and values of a prefix run from position 0 (with the hooks it was run with).
pub struct Prefix {
    tokens: Vec<u32>,
    cache: RowCache,
}

impl Prefix {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub(crate) fn cache(&self) -> &RowCache {
        &self.cache
    }
}

impl Model {
    /// Runs `tokens` from position 0 with `hook` and keeps their keys and values.
    pub fn prefix(&self, tokens: &[u32], hook: &mut dyn Hook) -> Result<Prefix> {
        let batch = Batch::new(&[tokens])?;
        let mut cache = vec![RowCache::new(self.arch().layers, tokens.len(), self.arch().kv_width())];
        let mut x = self.embed(&batch)?;
        self.run(&mut x, &batch, 0, Some(&mut cache), hook)?;
        let mut cache = cache.pop().expect("one row");
        cache.len = tokens.len();
        Ok(Prefix { tokens: tokens.to_vec(), cache })
    }

    /// Runs the prompts of `rest` (each the tokens that follow `prefix`, at least one) after the prefix:
    /// the result equals [`Model::forward`] on the whole prompts. Hooks see only these tokens (their
    /// segments start at position `prefix.len()`). Without a prefix, [`Model::forward`] on `rest`.
    pub fn forward_after(
        &self,
        prefix: Option<&Prefix>,
        rest: &Batch,
        logits: Logits,
        hook: &mut dyn Hook,
    ) -> Result<Forward> {
        let Some(prefix) = prefix else { return self.forward(rest, logits, hook) };
        let batch = rest.shifted(prefix.len());
        let x = self.embed(&batch)?;
        self.run_after(prefix, 0, x, &batch, logits, hook)
    }

    /// [`Model::forward_after`] from layer `layer` on, given the residual entering it for the tokens of
    /// `rest` (`[tokens, hidden]`, packed like `rest`), e.g. a cached `x^(l)` (method.md §5, prefix
    /// reuse). The prefix's keys and values must be those of the same run at every layer from `layer`
    /// on (an activation addition at `layer` changes them: compute the prefix with it). Without a prefix,
    /// [`Model::forward_from`] on `rest`.
    pub fn forward_after_from(
        &self,
        prefix: Option<&Prefix>,
        layer: usize,
        residual: Vec<f32>,
        rest: &Batch,
        logits: Logits,
        hook: &mut dyn Hook,
    ) -> Result<Forward> {
        let Some(prefix) = prefix else { return self.forward_from(layer, residual, rest, logits, hook) };
        if layer > self.arch().layers {
            return Err(ModelError::Batch(format!(
                "cannot start at layer {layer}: the model has {} layers",
                self.arch().layers
            )));
        }
        let d = self.arch().hidden;
        if residual.len() != rest.tokens().len() * d {
            return Err(ModelError::Batch(format!(
                "the residual has {} values; {} tokens x hidden size {d} need {}",
                residual.len(),
                rest.tokens().len(),
                rest.tokens().len() * d
            )));
        }
        self.run_after(prefix, layer, residual, &rest.shifted(prefix.len()), logits, hook)
    }

    fn run_after(
        &self,
        prefix: &Prefix,
        layer: usize,
        mut x: Vec<f32>,
        batch: &Batch,
        logits: Logits,
        hook: &mut dyn Hook,
    ) -> Result<Forward> {
        let mut caches: Vec<RowCache> = batch
            .segments()
            .iter()
            .map(|s| prefix.cache.extended(prefix.len() + s.len, self.arch().kv_width()))
            .collect();
        self.run(&mut x, batch, layer, Some(&mut caches), hook)?;
        Ok(self.logits(&x, batch.segments(), logits))
    }
}
