//! `abliterate optimize`: a seeded, resumable multi-objective search over the edit's free parameters
//! (docs/optimize.md), each trial evaluated on the original model with the hooks its edit amounts to (no
//! checkpoint is written per trial).
//!
//! - [`space`]: the parameters (a fractional direction index between `find`'s candidates at one position,
//!   heretic's tent kernel for the attention and MLP writers, the norm-preserving switch) and their ranges;
//! - [`tpe`]: the sampler (multi-objective TPE, seeded, its own small generator);
//! - [`evaluate`]: one trial's objectives with hooks: judged refusals of greedy completions of harmful
//!   prompts, mean first-token KL on harmless ones;
//! - [`store`]: the trials in OUT (`trials.jsonl`, rewritten atomically after every trial) and the
//!   settings they were made with, so that the same command resumes;
//! - [`pareto`]: the front and the choice rule; [`report`]: the front as Markdown and SVG.
//!
//! Never prints; writes only into the OUT it is given (atomically, file by file).

pub mod evaluate;
pub mod pareto;
pub mod report;
pub mod space;
pub mod store;
pub mod tpe;

use std::path::PathBuf;

pub use evaluate::{EvalOptions, Evaluator, Outcome};
pub use pareto::{Score, choose, front};
pub use space::{Params, Projection, Space};
pub use store::{Trial, search};

/// Everything that can go wrong in a search. Messages are lowercase and name the thing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Edit(#[from] edit::Error),
    #[error(transparent)]
    Verify(#[from] verify::Error),
    #[error("{0}")]
    Space(String),
    #[error("`{}`: {problem}", path.display())]
    Store { path: PathBuf, problem: String },
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
