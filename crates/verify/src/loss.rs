//! Teacher-forced cross-entropy of a model on given continuations (method.md §8, "CE loss", the
//! `alpaca_custom_completions` variant: the original model's own completions of harmless prompts). Only
//! the continuation's tokens are scored: position `i` of the prompt-plus-continuation predicts token `i + 1`,
//! and only predictions of continuation tokens count.
//!
//! Differences from the repo, deliberate: the continuation is scored as the token ids that were generated
//! (no decode and re-tokenize round trip), without the end-of-turn token, and the log-softmax is computed in
//! f64 from the f32 logits. The sum over tokens is accumulated in f64, as the repo does.
//! Never changes the model.

use model::{Batch, Hook, Logits, Model};
use rayon::prelude::*;
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

/// The cross-entropy of `model` (with `hook`) on `pairs` of (prompt ids, continuation ids), `batch_size`
/// sequences per forward pass. Empty continuations are skipped. `progress(done)` after each batch.
pub fn cross_entropy(
    model: &Model,
    hook: &mut dyn Hook,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Loss> {
    let scored: Vec<&(Vec<u32>, Vec<u32>)> = pairs.iter().filter(|(_, c)| !c.is_empty()).collect();
    if let Some(i) = pairs.iter().position(|(p, _)| p.is_empty()) {
        return Err(Error::Input(format!("cross-entropy: prompt {i} has no tokens")));
    }
    let (mut sum, mut tokens) = (0f64, 0usize);
    let mut done = 0;
    for chunk in scored.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|(p, c)| p.iter().chain(c).copied().collect()).collect();
        let batch = Batch::new(&seqs)?;
        let out = model.forward(&batch, Logits::All, hook)?;
        for ((p, c), seg) in chunk.iter().zip(batch.segments()) {
            // Row start + p.len() - 1 + i predicts continuation token i.
            let first = seg.start + p.len() - 1;
            let losses: Vec<f64> =
                c.par_iter().enumerate().map(|(i, &t)| nll(out.row(first + i), t as usize)).collect();
            sum += losses.iter().sum::<f64>();
            tokens += c.len();
        }
        done += chunk.len();
        progress(done);
    }
    if tokens == 0 {
        return Err(Error::Input("cross-entropy: every continuation is empty".into()));
    }
    let ce = sum / tokens as f64;
    Ok(Loss { ce, perplexity: ce.exp(), tokens, sequences: scored.len() })
}

/// `−log softmax(z)[t] = logsumexp(z) − z[t]`: each `exp(z_v − max)` in f32 (the logits' own precision,
/// as the repo computes the loss in the model dtype; relative error ~1e-7), summed in f64 in a fixed order.
fn nll(z: &[f32], t: usize) -> f64 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = z.iter().map(|&v| (v - max).exp() as f64).sum();
    max as f64 + sum.ln() - z[t] as f64
}
