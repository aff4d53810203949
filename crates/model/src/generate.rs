//! Greedy decoding with a KV cache, batched: each prompt keeps its own cache, finished prompts drop out
//! of later steps, and hooks run on every step's new tokens (method.md §7: with a cache, each step sees
//! only the new token, and cached keys and values were computed from hooked residuals).

use std::ops::ControlFlow;

use crate::batch::Batch;
use crate::forward::{Logits, Model, RowCache};
use crate::hooks::Hook;
use crate::kernels::argmax;
use crate::{ModelError, Result};

/// How long to generate and when to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// End-of-sequence and end-of-turn ids (`generation_config.json` `eos_token_id`, single or list).
    pub stop_tokens: Vec<u32>,
}

/// Why a prompt's generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced a stop token (the last of its tokens).
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// The caller's `on_token` asked to stop.
    Stopped,
}

/// One prompt's continuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// New tokens, including the stop token if there was one (as transformers' `generate` returns them).
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

impl Model {
    /// Greedy generation for every prompt of `batch` (argmax, the first id on ties, as `torch.argmax`).
    /// `on_token(prompt, token)` is called for each new token as soon as it is chosen, step by step;
    /// returning `ControlFlow::Break` ends generation for every prompt after that token (e.g. when the
    /// reader of a stream has gone), with [`Finish::Stopped`] for those still going.
    pub fn generate(
        &self,
        batch: &Batch,
        opts: &GenerateOptions,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Generation>> {
        let arch = self.arch();
        if let Some(&t) = opts.stop_tokens.iter().find(|&&t| t as usize >= arch.vocab) {
            return Err(ModelError::Batch(format!("stop token {t} is outside the vocabulary of {} ids", arch.vocab)));
        }
        if let Some(s) = batch.segments().iter().find(|s| s.pos0 != 0) {
            return Err(ModelError::Batch(format!("prompt {} does not start at position 0", s.row)));
        }
        let mut out: Vec<Generation> =
            batch.segments().iter().map(|_| Generation { tokens: Vec::new(), finish: Finish::Length }).collect();
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        let kv = arch.kv_width();
        // Each cache holds the prompt and every new token but the last (which is never fed back).
        let mut positions = Vec::with_capacity(batch.len());
        for s in batch.segments() {
            let n = s.len.checked_add(opts.max_new_tokens - 1).filter(|&n| n <= arch.context).ok_or_else(|| {
                ModelError::Batch(format!(
                    "prompt {} has {} tokens; with {} new tokens that is more than the model's context of {} \
                     positions (max_position_embeddings)",
                    s.row, s.len, opts.max_new_tokens, arch.context
                ))
            })?;
            positions.push(n);
        }
        let cache_bytes =
            positions.iter().map(|&n| RowCache::bytes(arch.layers, n, kv)).fold(0u64, |a, b| a.saturating_add(b));
        if let Some(available) = crate::load::available_memory()
            && cache_bytes > available
        {
            return Err(ModelError::Memory {
                what: format!(
                    "the KV cache of {} prompts x up to {} positions",
                    batch.len(),
                    positions.iter().max().unwrap_or(&0)
                ),
                need: cache_bytes,
                available,
                hint: String::new(),
            });
        }
        let mut cache: Vec<RowCache> = positions.iter().map(|&n| RowCache::new(arch.layers, n, kv)).collect();

        let mut x = self.embed(batch)?;
        self.run(&mut x, batch, 0, Some(&mut cache), hook)?;
        let mut logits = self.logits(&x, batch.segments(), Logits::Last);
        // (prompt, last token, its position) for prompts still going.
        let mut active: Vec<(usize, u32, usize)> = Vec::new();
        for (i, s) in batch.segments().iter().enumerate() {
            cache[s.row].len = s.len;
            let tok = argmax(logits.row(i)) as u32;
            active.push((s.row, tok, s.len));
        }
        loop {
            let mut next = Vec::with_capacity(active.len());
            let mut stopped = false;
            for &(row, tok, pos) in &active {
                let g = &mut out[row];
                g.tokens.push(tok);
                stopped |= on_token(row, tok).is_break();
                if opts.stop_tokens.contains(&tok) {
                    g.finish = Finish::Stop;
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
}
