//! Teacher-forced cross-entropy of a model on given continuations (method.md §8, "CE loss", the
//! `alpaca_custom_completions` variant: the original model's own completions of harmless prompts). Only
//! the continuation's tokens are scored: the prompt predicts the first, each continuation token the next.
//!
//! Differences from the repo, deliberate: the continuation is scored as the token ids that were generated
//! (no decode and re-tokenize round trip), without the end-of-turn token, and the log-softmax is computed in
//! f64 from the f32 logits (`model::log_softmax_at`). The sum over tokens is accumulated in f64, as the repo
//! does. The tokens all prompts start with are run once (`model::Prefix`), and only rows that predict a
//! continuation token reach the LM head (`Model::continuation_logprobs`). Never changes the model.

use model::{Batch, Hook, Model};
use serde::Serialize;

use crate::{Error, Result};

/// Mean cross-entropy over every scored token.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Loss {
    /// `Σ −log p(token) / tokens`, natural log.
    pub ce: f64,
    /// `exp(ce)`.
    pub perplexity: f64,
    /// Continuation tokens scored.
    pub tokens: usize,
    /// Sequences with at least one continuation token.
    pub sequences: usize,
}

impl Loss {
    /// The loss of per-sequence token log-probabilities (sequences without tokens are not counted), summed
    /// in order in f64; None when there is no token at all.
    pub fn from_logprobs<'a>(seqs: impl IntoIterator<Item = &'a [f64]>) -> Option<Loss> {
        let (mut sum, mut tokens, mut sequences) = (0f64, 0usize, 0usize);
        for s in seqs.into_iter().filter(|s| !s.is_empty()) {
            sum -= s.iter().sum::<f64>();
            tokens += s.len();
            sequences += 1;
        }
        let ce = (tokens > 0).then(|| sum / tokens as f64)?;
        Some(Loss { ce, perplexity: ce.exp(), tokens, sequences })
    }
}

/// The cross-entropy of `model` (with `hook`) on `pairs` of (prompt ids, continuation ids), `batch_size`
/// sequences per forward pass. Empty continuations are skipped. `progress(done)` after each batch.
pub fn cross_entropy(
    model: &Model,
    hook: &mut dyn Hook,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Loss> {
    if let Some(i) = pairs.iter().position(|(p, _)| p.is_empty()) {
        return Err(Error::Input(format!("cross-entropy: prompt {i} has no tokens")));
    }
    let scored: Vec<&(Vec<u32>, Vec<u32>)> = pairs.iter().filter(|(_, c)| !c.is_empty()).collect();
    let prompts: Vec<&[u32]> = scored.iter().map(|(p, _)| p.as_slice()).collect();
    let shared = eval::shared_prefix(&prompts, 1);
    let prefix = if shared == 0 { None } else { Some(model.prefix(&prompts[0][..shared], hook)?) };
    let mut logprobs = Vec::with_capacity(scored.len());
    let mut done = 0;
    for chunk in scored.chunks(batch_size.max(1)) {
        let rests: Vec<&[u32]> = chunk.iter().map(|(p, _)| &p[shared..]).collect();
        let continuations: Vec<Vec<u32>> = chunk.iter().map(|(_, c)| c.clone()).collect();
        logprobs.extend(model.continuation_logprobs(prefix.as_ref(), &Batch::new(&rests)?, &continuations, hook)?);
        done += chunk.len();
        progress(done);
    }
    Loss::from_logprobs(logprobs.iter().map(Vec::as_slice))
        .ok_or_else(|| Error::Input("cross-entropy: every continuation is empty".into()))
}
