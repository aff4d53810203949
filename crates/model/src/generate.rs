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
use crate::forward::{Forward, Logits, Model, RowCache};
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

/// Takes a prompt's chosen token: keeps it, asks `on_token`, and ends the generation where a stop token,
/// the caller or the length says so. Returns (the prompt goes on, the caller asked to stop every prompt).
fn take(
    g: &mut Generation,
    row: usize,
    tok: u32,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
) -> (bool, bool) {
    g.tokens.push(tok);
    let asked = on_token(row, tok);
    let all = asked == ControlFlow::Break(Stop::All);
    let goes_on = if opts.stop_tokens.contains(&tok) {
        g.finish = Finish::Stop;
        false
    } else if asked == ControlFlow::Break(Stop::Prompt) {
        g.finish = Finish::Stopped;
        false
    } else {
        g.tokens.len() < opts.max_new_tokens
    };
    (goes_on, all)
}

/// What teacher forcing computed: each prompt's last-position logits, the caches (prompt and every
/// forced token but the last), and `at(logits, token)` for each forced token, from the logits that
/// predict it.
struct Forced<T> {
    first: Forward,
    cache: Vec<RowCache>,
    rows: Vec<Vec<T>>,
}

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
        self.check_generate(batch, opts)?;
        let mut out = empty_generations(batch.len());
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
        let logits = self.logits(&x, batch.segments(), Logits::Last);
        let mut active = Vec::with_capacity(batch.len());
        for (i, s) in batch.segments().iter().enumerate() {
            cache[s.row].len = p + s.len;
            if record.first_logits {
                out[s.row].first_logits = logits.row(i).to_vec();
            }
            active.push((s.row, argmax(logits.row(i)) as u32, p + s.len));
        }
        self.decode(&mut cache, &mut out, active, logits, opts, record, hook, on_token)?;
        Ok(out)
    }

    /// [`Model::generate_after`] for prompts that come with a guess of their continuation (`guides[k]` for
    /// prompt `k` of `batch`; e.g. another model's greedy completion of it), which is also scored. The
    /// guides are teacher-forced first, in one pass, and each prompt keeps its guide's tokens for as long as
    /// they are this model's greedy choice; its generation steps start where they differ. Returns the same
    /// generations as `generate_after` (bit for bit where [`crate::batch_invariant`]: a teacher-forced row
    /// and a generation step are the same computation; elsewhere up to the rounding that batching
    /// changes), with fewer steps the better the guides are, and the log-probability of every guide token
    /// as [`Model::continuation_logprobs`] gives it. `on_token` is called for each prompt's tokens in
    /// order, but the prompts' guided tokens come first, prompt by prompt, then the generation steps: so
    /// `Break(Stop::All)` ends every prompt where it is (those not reached yet have no token).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_guided(
        &self,
        prefix: Option<&Prefix>,
        batch: &Batch,
        guides: &[Vec<u32>],
        opts: &GenerateOptions,
        record: Record,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
    ) -> Result<(Vec<Generation>, Vec<Vec<f64>>)> {
        self.check_generate(batch, opts)?;
        // Per guide token: its log-probability, and the greedy choice there with its log-probability.
        let longest = guides.iter().map(Vec::len).max().unwrap_or(0);
        let extra = opts.max_new_tokens.max(longest).saturating_sub(1);
        let what = format!("{} new tokens", opts.max_new_tokens.max(longest));
        let forced = self.force(prefix, batch, guides, extra, &what, hook, |z, t| {
            let lp = log_softmax_at(z, t as usize);
            let a = argmax(z) as u32;
            let lp_a = if a == t || !record.logprobs { lp } else { log_softmax_at(z, a as usize) };
            (lp, a, lp_a)
        })?;
        let Forced { first, mut cache, rows } = forced;
        let scored: Vec<Vec<f64>> = rows.iter().map(|r| r.iter().map(|c| c.0).collect()).collect();
        let mut out = empty_generations(batch.len());
        if opts.max_new_tokens == 0 {
            return Ok((out, scored));
        }
        let p = prefix.map_or(0, Prefix::len);
        let mut active = Vec::new();
        let mut all = false;
        for (i, s) in batch.segments().iter().enumerate() {
            if all {
                out[s.row].finish = Finish::Stopped;
                continue;
            }
            let (row, guide, choices) = (s.row, &guides[s.row], &rows[s.row]);
            let z = first.row(i);
            if record.first_logits {
                out[row].first_logits = z.to_vec();
            }
            // The choice for new token j: from the prompt's last logits (j = 0) or the guide's row j.
            let mut j = 0;
            loop {
                let (tok, lp) = match choices.get(j) {
                    Some(&(_, a, lp)) => (a, lp),
                    None => {
                        let a = argmax(z) as u32;
                        (a, if record.logprobs { log_softmax_at(z, a as usize) } else { 0.0 })
                    }
                };
                if record.logprobs {
                    out[row].logprobs.push(lp);
                }
                let (goes_on, stop_all) = take(&mut out[row], row, tok, opts, on_token);
                if stop_all {
                    all = true;
                    if goes_on {
                        out[row].finish = Finish::Stopped;
                    }
                    break;
                }
                if !goes_on {
                    break;
                }
                if guide.get(j) == Some(&tok) && j + 1 < choices.len() {
                    j += 1;
                    continue;
                }
                // Off the guide (or past it): the cache keeps the prompt and new tokens 0..j (the guide's);
                // token j is fed by the next step.
                cache[row].truncate(p + s.len + j);
                active.push((row, tok, p + s.len + j));
                break;
            }
        }
        if all {
            for &(row, ..) in &active {
                out[row].finish = Finish::Stopped;
            }
            return Ok((out, scored));
        }
        self.decode_fed(&mut cache, &mut out, active, opts, record, hook, on_token)?;
        Ok((out, scored))
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
        let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
        let what = format!("a continuation of {longest} tokens");
        let forced = self.force(prefix, batch, continuations, longest.saturating_sub(1), &what, hook, |z, t| {
            log_softmax_at(z, t as usize)
        })?;
        Ok(forced.rows)
    }

    /// Checks what every generation checks: stop tokens in the vocabulary, prompts at position 0.
    fn check_generate(&self, batch: &Batch, opts: &GenerateOptions) -> Result<()> {
        let vocab = self.arch().vocab;
        if let Some(&t) = opts.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Batch(format!("stop token {t} is outside the vocabulary of {vocab} ids")));
        }
        check_starts(batch)
    }

    /// Generation steps from `active`: each prompt's chosen token from `logits` (row `i` for `active[i]`)
    /// is taken, and those that go on are fed back, until every prompt has ended.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        cache: &mut [RowCache],
        out: &mut [Generation],
        active: Vec<(usize, u32, usize)>,
        logits: Forward,
        opts: &GenerateOptions,
        record: Record,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
    ) -> Result<()> {
        let (mut active, mut logits) = (active, logits);
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
            let mut all = false;
            for &(row, tok, pos) in &active {
                let (goes_on, stop_all) = take(&mut out[row], row, tok, opts, on_token);
                all |= stop_all;
                if goes_on {
                    next.push((row, tok, pos));
                }
            }
            if all {
                for &(row, ..) in &next {
                    out[row].finish = Finish::Stopped;
                }
                return Ok(());
            }
            if next.is_empty() {
                return Ok(());
            }
            logits = self.step(cache, &next, hook)?;
            active = next
                .iter()
                .enumerate()
                .map(|(i, &(row, _, pos))| (row, argmax(logits.row(i)) as u32, pos + 1))
                .collect();
        }
    }

    /// [`Model::decode`] for prompts whose chosen tokens were already taken (`active`: to be fed back).
    #[allow(clippy::too_many_arguments)]
    fn decode_fed(
        &self,
        cache: &mut [RowCache],
        out: &mut [Generation],
        active: Vec<(usize, u32, usize)>,
        opts: &GenerateOptions,
        record: Record,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<Stop>,
    ) -> Result<()> {
        if active.is_empty() {
            return Ok(());
        }
        let logits = self.step(cache, &active, hook)?;
        let next =
            active.iter().enumerate().map(|(i, &(row, _, pos))| (row, argmax(logits.row(i)) as u32, pos + 1)).collect();
        self.decode(cache, out, next, logits, opts, record, hook, on_token)
    }

    /// One generation step: feeds each `(prompt, token, position)` and returns the next-token logits.
    fn step(&self, cache: &mut [RowCache], fed: &[(usize, u32, usize)], hook: &mut dyn Hook) -> Result<Forward> {
        let step = Batch::step(fed);
        let mut x = self.embed(&step)?;
        self.run(&mut x, &step, 0, Some(cache), hook)?;
        for &(row, _, pos) in fed {
            cache[row].len = pos + 1;
        }
        Ok(self.logits(&x, step.segments(), Logits::Last))
    }

    /// Teacher forcing of `forced[k]` after prompt `k` of `batch` (which continues `prefix`): the prompts
    /// run first, then every forced token but the last in one pass against their keys and values, with
    /// caches sized for `extra` positions after each prompt; only rows that predict a forced token reach
    /// the LM head, where `at(logits, token)` is kept.
    #[allow(clippy::too_many_arguments)]
    fn force<T: Send>(
        &self,
        prefix: Option<&Prefix>,
        batch: &Batch,
        forced: &[Vec<u32>],
        extra: usize,
        what: &str,
        hook: &mut dyn Hook,
        at: impl Fn(&[f32], u32) -> T + Sync,
    ) -> Result<Forced<T>> {
        if forced.len() != batch.len() {
            return Err(ModelError::Batch(format!(
                "{} continuations for a batch of {} prompts",
                forced.len(),
                batch.len()
            )));
        }
        let vocab = self.arch().vocab;
        if let Some(&t) = forced.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Batch(format!("continuation token {t} is outside the vocabulary of {vocab} ids")));
        }
        check_starts(batch)?;
        let mut cache = caches(self, prefix, batch, extra, what)?;
        let p = prefix.map_or(0, Prefix::len);
        let batch = batch.shifted(p);
        let mut x = self.embed(&batch)?;
        self.run(&mut x, &batch, 0, Some(&mut cache), hook)?;
        let first = self.logits(&x, batch.segments(), Logits::Last);
        let mut rows: Vec<Vec<T>> = batch
            .segments()
            .iter()
            .enumerate()
            .map(|(i, s)| forced[s.row].first().map(|&t| vec![at(first.row(i), t)]).unwrap_or_default())
            .collect();
        for s in batch.segments() {
            cache[s.row].len = p + s.len;
        }
        // Forced tokens 0..n-1 predict tokens 1..n.
        let rests: Vec<(usize, &[u32])> = batch
            .segments()
            .iter()
            .map(|s| (s.row, &forced[s.row]))
            .filter(|(_, c)| c.len() > 1)
            .map(|(row, c)| (row, &c[..c.len() - 1]))
            .collect();
        if rests.is_empty() {
            return Ok(Forced { first, cache, rows });
        }
        let tail = Batch::continuing(&rests, |row| p + batch.segments()[row].len);
        let mut x = self.embed(&tail)?;
        self.run(&mut x, &tail, 0, Some(&mut cache), hook)?;
        for s in tail.segments() {
            cache[s.row].len = s.pos0 + s.len;
        }
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
            for s in &segs[i..j] {
                let c = &forced[s.row];
                let kept: Vec<T> = (s.start - r0..s.start - r0 + s.len)
                    .into_par_iter()
                    .zip(c[1..].par_iter())
                    .map(|(r, &t)| at(logits.row(r), t))
                    .collect();
                rows[s.row].extend(kept);
            }
            i = j;
        }
        Ok(Forced { first, cache, rows })
    }
}

/// One unfinished generation per prompt.
fn empty_generations(n: usize) -> Vec<Generation> {
    (0..n)
        .map(|_| Generation {
            tokens: Vec::new(),
            finish: Finish::Length,
            first_logits: Vec::new(),
            logprobs: Vec::new(),
        })
        .collect()
}
