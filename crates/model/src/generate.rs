//! Greedy decoding with a KV cache, batched: each prompt keeps its own cache, finished prompts drop out
//! of later steps, and hooks run on every step's new tokens (method.md §7: with a cache, each step sees
//! only the new token, and cached keys and values were computed from hooked residuals). Prompts may share
//! a prefix computed once ([`Prefix`]): the same computation, as in `prefix.rs`.
//!
//! Also teacher forcing ([`Model::continuation_logprobs`]): the log-probability a model gives each token
//! of given continuations, computed the way generation computes it (the prompts, then the continuations
//! against their keys and values), for the cross-entropy of method.md §8.

use std::ops::ControlFlow;

use rayon::prelude::*;

use crate::batch::Batch;
use crate::forward::{Logits, Model, RowCache};
use crate::hooks::Hook;
use crate::kernels::{argmax, log_softmax_at};
use crate::prefix::Prefix;
use crate::{ModelError, Result};

/// How long to generate and when to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// End-of-sequence and end-of-turn ids (`generation_config.json` `eos_token_id`, single or list).
    pub stop_tokens: Vec<u32>,
}

/// What [`Model::generate_after`] keeps besides the tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Each prompt's last-position logits (the distribution of its first new token).
    pub first_logits: bool,
    /// The log-probability of every chosen token (`log_softmax` in f64 from the f32 logits).
    pub logprobs: bool,
}

/// Why a prompt's generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced a stop token (the last of its tokens).
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// The caller's `on_token` asked to stop (this prompt, or every prompt).
    Stopped,
}

/// What `on_token` may ask for instead of the next token ([`std::ops::ControlFlow::Break`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// End this prompt's generation after the token (the caller has what it needs from it); the others go on.
    Prompt,
    /// End every prompt's generation after this step (e.g. the reader of a stream has gone).
    All,
}

/// One prompt's continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens, including the stop token if there was one (as transformers' `generate` returns them).
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// The prompt's last-position logits (`[vocab]`) when [`Record::first_logits`] asked for them, else empty.
    pub first_logits: Vec<f32>,
    /// `log p(token)` of each of `tokens` when [`Record::logprobs`] asked for them, else empty.
    pub logprobs: Vec<f64>,
}

/// Per-prompt caches sized for `extra` positions after each prompt (and after `prefix`), checked against
/// the model's context and the available memory. `what` names the extra positions in errors.
fn caches(model: &Model, prefix: Option<&Prefix>, batch: &Batch, extra: usize, what: &str) -> Result<Vec<RowCache>> {
    let arch = model.arch();
    let kv = arch.kv_width();
    let p = prefix.map_or(0, Prefix::len);
    let mut positions = Vec::with_capacity(batch.len());
    for s in batch.segments() {
        let n = (p + s.len).checked_add(extra).filter(|&n| n <= arch.context).ok_or_else(|| {
            ModelError::Batch(format!(
                "prompt {} has {} tokens; with {what} that is more than the model's context of {} positions \
                 (max_position_embeddings)",
                s.row,
                p + s.len,
                arch.context
            ))
        })?;
        positions.push(n);
    }
    let bytes = positions.iter().map(|&n| RowCache::bytes(arch.layers, n, kv)).fold(0u64, |a, b| a.saturating_add(b));
    if let Some(available) = crate::load::available_memory()
        && bytes > available
    {
        return Err(ModelError::Memory {
            what: format!(
                "the KV cache of {} prompts x up to {} positions",
                batch.len(),
                positions.iter().max().unwrap_or(&0)
            ),
            need: bytes,
            available,
            hint: String::new(),
        });
    }
    Ok(positions
        .iter()
        .map(|&n| match prefix {
            Some(pre) => pre.cache().extended(n, kv),
            None => RowCache::new(arch.layers, n, kv),
        })
        .collect())
}

/// Checks that every prompt of `batch` starts at position 0 (they are placed after the prefix here).
fn check_starts(batch: &Batch) -> Result<()> {
    match batch.segments().iter().find(|s| s.pos0 != 0) {
        Some(s) => Err(ModelError::Batch(format!("prompt {} does not start at position 0", s.row))),
        None => Ok(()),
    }
}

/// Rows of logits computed at once by teacher forcing (`HEAD_ROWS x vocab` f32 at a time).
const HEAD_ROWS: usize = 512;

impl Model {
    /// Greedy generation for every prompt of `batch` (argmax, the first id on ties, as `torch.argmax`).
    /// `on_token(prompt, token)` is called for each new token as soon as it is chosen, step by step;
    /// returning `ControlFlow::Break(Stop::Prompt)` ends that prompt's generation after the token,
    /// `Break(Stop::All)` every prompt's after this step (e.g. when the reader of a stream has gone), with
    /// [`Finish::Stopped`] for those still going (a stop token still finishes as [`Finish::Stop`]).
    pub fn generate(
        &self,
        batch: &Batch,
        opts: &GenerateOptions,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
    ) -> Result<Vec<Generation>> {
        self.generate_after(None, batch, opts, Record::default(), hook, on_token)
    }

    /// [`Model::generate`] for prompts that each continue `prefix` (`batch` holds only their own tokens;
    /// the prefix must have been computed with the same hooks), keeping what `record` asks for.
    pub fn generate_after(
        &self,
        prefix: Option<&Prefix>,
        batch: &Batch,
        opts: &GenerateOptions,
        record: Record,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
    ) -> Result<Vec<Generation>> {
        let arch = self.arch();
        if let Some(&t) = opts.stop_tokens.iter().find(|&&t| t as usize >= arch.vocab) {
            return Err(ModelError::Batch(format!("stop token {t} is outside the vocabulary of {} ids", arch.vocab)));
        }
        check_starts(batch)?;
        let mut out: Vec<Generation> = batch
            .segments()
            .iter()
            .map(|_| Generation {
                tokens: Vec::new(),
                finish: Finish::Length,
                first_logits: Vec::new(),
                logprobs: Vec::new(),
            })
            .collect();
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        // Each cache holds the prompt and every new token but the last (which is never fed back).
        let what = format!("{} new tokens", opts.max_new_tokens);
        let mut cache = caches(self, prefix, batch, opts.max_new_tokens - 1, &what)?;
        let p = prefix.map_or(0, Prefix::len);
        let batch = batch.shifted(p);

        let mut x = self.embed(&batch)?;
        self.run(&mut x, &batch, 0, Some(&mut cache), hook)?;
        let mut logits = self.logits(&x, batch.segments(), Logits::Last);
        // (prompt, last token, its position) for prompts still going.
        let mut active: Vec<(usize, u32, usize)> = Vec::new();
        for (i, s) in batch.segments().iter().enumerate() {
            cache[s.row].len = p + s.len;
            if record.first_logits {
                out[s.row].first_logits = logits.row(i).to_vec();
            }
            active.push((s.row, argmax(logits.row(i)) as u32, p + s.len));
        }
        loop {
            if record.logprobs {
                let lp: Vec<f64> = active
                    .par_iter()
                    .enumerate()
                    .map(|(i, &(_, tok, _))| log_softmax_at(logits.row(i), tok as usize))
                    .collect();
                for (&(row, ..), lp) in active.iter().zip(lp) {
                    out[row].logprobs.push(lp);
                }
            }
            let mut next = Vec::with_capacity(active.len());
            let mut stopped = false;
            for &(row, tok, pos) in &active {
                let g = &mut out[row];
                g.tokens.push(tok);
                let asked = on_token(row, tok);
                stopped |= asked == ControlFlow::Break(Stop::All);
                if opts.stop_tokens.contains(&tok) {
                    g.finish = Finish::Stop;
                } else if asked == ControlFlow::Break(Stop::Prompt) {
                    g.finish = Finish::Stopped;
                } else if g.tokens.len() < opts.max_new_tokens {
                    next.push((row, tok, pos));
                }
            }
            if stopped {
                for &(row, ..) in &next {
                    out[row].finish = Finish::Stopped;
                }
                return Ok(out);
            }
            if next.is_empty() {
                return Ok(out);
            }
            let step = Batch::step(&next);
            let mut x = self.embed(&step)?;
            self.run(&mut x, &step, 0, Some(&mut cache), hook)?;
            logits = self.logits(&x, step.segments(), Logits::Last);
            active.clear();
            for (i, &(row, _, pos)) in next.iter().enumerate() {
                cache[row].len = pos + 1;
                active.push((row, argmax(logits.row(i)) as u32, pos + 1));
            }
        }
    }

    /// Teacher forcing: `log p(c_i | prompt, c_<i)` for every token of each prompt's continuation
    /// (`continuations[k]` follows prompt `k` of `batch`, which continues `prefix` if given), under `hook`.
    /// The prompts run first, then all continuation tokens but the last in one pass against the prompts'
    /// keys and values: only the rows that predict a continuation token reach the LM head.
    pub fn continuation_logprobs(
        &self,
        prefix: Option<&Prefix>,
        batch: &Batch,
        continuations: &[Vec<u32>],
        hook: &mut dyn Hook,
    ) -> Result<Vec<Vec<f64>>> {
        if continuations.len() != batch.len() {
            return Err(ModelError::Batch(format!(
                "{} continuations for a batch of {} prompts",
                continuations.len(),
                batch.len()
            )));
        }
        let vocab = self.arch().vocab;
        if let Some(&t) = continuations.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Batch(format!("continuation token {t} is outside the vocabulary of {vocab} ids")));
        }
        check_starts(batch)?;
        let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
        let what = format!("a continuation of {longest} tokens");
        let mut cache = caches(self, prefix, batch, longest.saturating_sub(1), &what)?;
        let p = prefix.map_or(0, Prefix::len);
        let batch = batch.shifted(p);
        let mut x = self.embed(&batch)?;
        self.run(&mut x, &batch, 0, Some(&mut cache), hook)?;
        let first = self.logits(&x, batch.segments(), Logits::Last);
        let mut out: Vec<Vec<f64>> = continuations
            .iter()
            .enumerate()
            .map(|(k, c)| c.first().map(|&t| vec![log_softmax_at(first.row(k), t as usize)]).unwrap_or_default())
            .collect();
        for s in batch.segments() {
            cache[s.row].len = p + s.len;
        }
        // Continuation tokens 0..n-1 predict tokens 1..n.
        let rests: Vec<(usize, &[u32])> = batch
            .segments()
            .iter()
            .zip(continuations)
            .filter(|(_, c)| c.len() > 1)
            .map(|(s, c)| (s.row, &c[..c.len() - 1]))
            .collect();
        if rests.is_empty() {
            return Ok(out);
        }
        let tail = Batch::continuing(&rests, |row| p + batch.segments()[row].len);
        let mut x = self.embed(&tail)?;
        self.run(&mut x, &tail, 0, Some(&mut cache), hook)?;
        // The LM head a few hundred rows at a time: all rows' logits at once would be `[tokens, vocab]`.
        let d = self.arch().hidden;
        let segs = tail.segments();
        let mut i = 0;
        while i < segs.len() {
            let mut j = i + 1;
            while j < segs.len() && segs[j].start + segs[j].len - segs[i].start <= HEAD_ROWS {
                j += 1;
            }
            let (r0, r1) = (segs[i].start, segs[j - 1].start + segs[j - 1].len);
            let logits = self.logits(&x[r0 * d..r1 * d], &segs[i..j], Logits::All);
            for (s, &(row, _)) in segs[i..j].iter().zip(&rests[i..j]) {
                let c = &continuations[row];
                let lp: Vec<f64> = (s.start - r0..s.start - r0 + s.len)
                    .into_par_iter()
                    .zip(c[1..].par_iter())
                    .map(|(r, &t)| log_softmax_at(logits.row(r), t as usize))
                    .collect();
                out[row].extend(lp);
            }
            i = j;
        }
        Ok(out)
    }
}
