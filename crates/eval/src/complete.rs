//! Batched greedy completions of chat prompts (method.md §8: greedy, stop at end of turn, a cap on new
//! tokens), optionally under a hook, returned as tokens and text (`skip_special_tokens`, stripped, as
//! the paper decodes them). The tokens every prompt starts with (a chat template's system turn) are run
//! once per call and shared through their keys and values (`model::Prefix`, the same computation).
//!
//! Harmful completions are test data: callers show the judge's verdict and the first words, never the
//! whole text. Never writes a file.

use std::ops::ControlFlow;

use chat::{Chat, Special};
use model::{Batch, Finish, GenerateOptions, Hook, Model, Record, Stop};

use crate::{Judge, Result};

/// How to complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompleteOptions<'a> {
    pub max_new_tokens: usize,
    /// Prompts generated together.
    pub batch_size: usize,
    /// What to keep besides the text: first-token logits, log-probabilities of the chosen tokens.
    pub record: Record,
    /// End a completion as soon as this judge calls its text so far a refusal ([`Finish::Stopped`]):
    /// a substring judge's phrase stays in the text as it grows, so the verdict is the one the whole
    /// completion would get, and the tokens after it are not computed. For sets judged by refusal only.
    pub until_refusal: Option<&'a Judge>,
    /// With `until_refusal`: once this many completions are refusals, every completion still going ends
    /// ([`Finish::Stopped`]) and the prompts of later batches are not run (no [`Completion`] for them), so
    /// the caller sees at least this many refusals and knows the rest was not computed. For a search that
    /// only needs to know that a count reached a bound (`optimize`'s pruning).
    pub stop_at_refusals: Option<usize>,
}

impl Default for CompleteOptions<'_> {
    fn default() -> Self {
        CompleteOptions {
            max_new_tokens: 64,
            batch_size: 32,
            record: Record::default(),
            until_refusal: None,
            stop_at_refusals: None,
        }
    }
}

/// One prompt's completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// New tokens, including the end-of-turn token when generation stopped there.
    pub tokens: Vec<u32>,
    /// The decoded text without special tokens, whitespace-trimmed.
    pub text: String,
    pub finish: Finish,
    /// The prompt's last-position logits, when recorded (else empty).
    pub first_logits: Vec<f32>,
    /// `log p` of each of `tokens`, when recorded (else empty).
    pub logprobs: Vec<f64>,
}

/// The first `n` words of a text (for reports that must not print harmful completions whole).
pub fn first_words(text: &str, n: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = words[..words.len().min(n)].join(" ");
    if words.len() > n {
        out.push_str(" …");
    }
    out
}

/// Greedy completions of `prompts` (token ids), in order, stopping at the model's end-of-turn ids;
/// `done(n)` is called after each batch with the number of prompts completed so far. Fewer completions
/// than prompts only when [`CompleteOptions::stop_at_refusals`] was reached.
pub fn complete(
    model: &Model,
    chat: &Chat,
    prompts: &[Vec<u32>],
    opts: &CompleteOptions<'_>,
    hook: &mut dyn Hook,
    done: &mut dyn FnMut(usize),
) -> Result<Vec<Completion>> {
    Ok(complete_all(model, chat, prompts, None, opts, hook, done)?.0)
}

/// [`complete`] with a guess of each completion (`guides[k]` for prompt `k`, e.g. another model's
/// completion of it; `Model::generate_guided`): the same completions, computed with fewer generation
/// steps where the guesses are right, and the log-probability the model gives each guide token (teacher
/// forcing), one list per prompt.
pub fn complete_guided(
    model: &Model,
    chat: &Chat,
    prompts: &[Vec<u32>],
    guides: &[Vec<u32>],
    opts: &CompleteOptions<'_>,
    hook: &mut dyn Hook,
    done: &mut dyn FnMut(usize),
) -> Result<(Vec<Completion>, Vec<Vec<f64>>)> {
    if guides.len() != prompts.len() {
        return Err(model::ModelError::Batch(format!("{} guides for {} prompts", guides.len(), prompts.len())).into());
    }
    complete_all(model, chat, prompts, Some(guides), opts, hook, done)
}

fn complete_all(
    model: &Model,
    chat: &Chat,
    prompts: &[Vec<u32>],
    guides: Option<&[Vec<u32>]>,
    opts: &CompleteOptions<'_>,
    hook: &mut dyn Hook,
    done: &mut dyn FnMut(usize),
) -> Result<(Vec<Completion>, Vec<Vec<f64>>)> {
    let generate = GenerateOptions { max_new_tokens: opts.max_new_tokens, stop_tokens: chat.eos_ids().to_vec() };
    let shared = crate::run::shared_prefix(prompts, 1);
    let prefix = if shared == 0 { None } else { Some(model.prefix(&prompts[0][..shared], hook)?) };
    let mut out = Vec::with_capacity(prompts.len());
    let mut scored = Vec::new();
    let mut refusals = 0;
    let size = opts.batch_size.max(1);
    for (b, chunk) in prompts.chunks(size).enumerate() {
        if opts.until_refusal.is_some() && opts.stop_at_refusals.is_some_and(|n| refusals >= n) {
            break;
        }
        let rests: Vec<&[u32]> = chunk.iter().map(|p| &p[shared..]).collect();
        let batch = Batch::new(&rests)?;
        // Each prompt's tokens so far, and the first decoding error (which ends generation).
        let mut so_far = vec![Vec::new(); chunk.len()];
        let mut error = None;
        let mut on_token = |row: usize, token: u32| {
            let Some(judge) = opts.until_refusal else { return ControlFlow::Continue(()) };
            so_far[row].push(token);
            match chat.decode(&so_far[row], Special::Skip) {
                Ok(text) if judge.is_refusal(&text) => {
                    refusals += 1;
                    match opts.stop_at_refusals {
                        Some(n) if refusals >= n => ControlFlow::Break(Stop::All),
                        _ => ControlFlow::Break(Stop::Prompt),
                    }
                }
                Ok(_) => ControlFlow::Continue(()),
                Err(e) => {
                    error = Some(e);
                    ControlFlow::Break(Stop::All)
                }
            }
        };
        let gens = match guides {
            None => model.generate_after(prefix.as_ref(), &batch, &generate, opts.record, hook, &mut on_token)?,
            Some(guides) => {
                let (gens, s) = model.generate_guided(
                    prefix.as_ref(),
                    &batch,
                    &guides[b * size..b * size + chunk.len()],
                    &generate,
                    opts.record,
                    hook,
                    &mut on_token,
                )?;
                scored.extend(s);
                gens
            }
        };
        if let Some(e) = error {
            return Err(e.into());
        }
        for g in gens {
            let text = chat.decode(&g.tokens, Special::Skip)?.trim().to_string();
            out.push(Completion {
                tokens: g.tokens,
                text,
                finish: g.finish,
                first_logits: g.first_logits,
                logprobs: g.logprobs,
            });
        }
        done(out.len());
    }
    Ok((out, scored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_words_cuts_and_marks() {
        assert_eq!(first_words("I cannot help  with\nthat.", 3), "I cannot help …");
        assert_eq!(first_words("Sure.", 3), "Sure.");
        assert_eq!(first_words("", 3), "");
    }
}
