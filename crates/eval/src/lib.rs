//! What finding a direction (`find`) and verifying an edit (`verify`) both need, written once:
//!
//! - [`prompts`]: prompt files (JSON, JSON Lines, CSV, plain text) and the default prompt sets compiled
//!   into the binary ([`prompts::embedded`]);
//! - [`sample`]: CPython's `random.seed` / `random.sample`, exactly (method.md §2);
//! - [`format`]: instructions into token ids with the model's chat template and a system prompt choice,
//!   every prompt checked to end with the post-instruction tokens (method.md §1);
//! - [`run`]: batched forward passes of many prompts with hooks, their shared chat prefix computed once,
//!   last-position logits, cached residuals for prefix reuse (method.md §5);
//! - [`score`]: the refusal score (method.md §3) and first-token KL (method.md §5);
//! - [`refusal`]: refusal tokens detected from the model;
//! - [`complete`]: batched greedy completions (method.md §8);
//! - [`judge`]: the substring refusal judge.
//!
//! ```no_run
//! use eval::{BatchOptions, Formatter, Judge, Prompts, Split, System};
//! # fn main() -> eval::Result<()> {
//! let dir = std::path::Path::new("models/smollm2-refusal");
//! let chat = chat::Chat::load(dir)?;
//! let model = model::Model::open(dir)?;
//! // The default harmful validation prompts, in the model's template with its default system prompt.
//! let set = eval::prompts::embedded(Split::HarmfulVal);
//! let fmt = Formatter::new(&chat, System::TemplateDefault)?;
//! let ids = fmt.all(&set.instructions())?;
//! // Mean refusal score (token "I" = 57) under directional ablation of a direction r.
//! let r = vec![0.1f64; model.arch().hidden];
//! let mut ablate = model::Interventions::ablation(model.arch().layers, &r)?;
//! let prompts = Prompts::new(ids.clone(), BatchOptions::default())?;
//! let mut scores = Vec::new();
//! prompts.last_logits(&model, &mut ablate, &mut |_, logits| {
//!     scores.push(eval::score::refusal_score(logits, &[57]));
//!     Ok(())
//! })?;
//! let mean = eval::score::mean_f32(&scores);
//! // Greedy completions, judged.
//! let opts = eval::CompleteOptions { max_new_tokens: 64, batch_size: 32, ..Default::default() };
//! let done = eval::complete(&model, &chat, &ids, &opts, &mut ablate, &mut |_| {})?;
//! let judge = Judge::default();
//! let refused = done.iter().filter(|c| judge.is_refusal(&c.text)).count();
//! # let _ = (mean, refused); Ok(()) }
//! ```
//!
//! This crate reads prompt and judge files but never writes a file, and knows nothing of terminals or
//! command lines.

pub mod complete;
pub mod format;
pub mod judge;
pub mod prompts;
pub mod refusal;
pub mod run;
pub mod sample;
pub mod score;

use std::path::PathBuf;

pub use complete::{CompleteOptions, Completion, complete, complete_guided, first_words};
pub use format::{Formatter, System};
pub use judge::Judge;
pub use prompts::{Prompt, PromptSet, Split};
pub use refusal::{Detected, FirstTokens};
pub use run::{BatchOptions, Prompts, Residuals, shared_prefix};
pub use sample::PyRandom;

/// Everything that can go wrong. Messages name the file, line or prompt.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("prompt file `{origin}`{}: {problem}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Prompts { origin: String, line: Option<usize>, problem: String },
    #[error(transparent)]
    Chat(#[from] chat::Error),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Run(String),
    #[error("{0}")]
    Refusal(String),
    #[error("{0}")]
    Judge(String),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
