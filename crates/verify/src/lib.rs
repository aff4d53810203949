//! Verification of an edit (method.md §7-§8): what the edited model refuses and over-refuses (greedy
//! completions judged by substrings, with Wilson intervals), its refusal scores, the damage (first-token
//! KL, teacher-forced cross-entropy on the original's own answers), whether the checkpoint equals the
//! hooked intervention it claims to be, and how strongly the direction induces refusal. Gates turn the
//! numbers into a CI verdict; reports write them as JSON, Markdown and an SVG chart.
//!
//! This crate never changes a model and never prints: the CLI (`abliterate verify`, `abliterate run`) shows
//! progress and results.

pub mod chart;
pub mod equivalence;
pub mod gate;
pub mod loss;
pub mod manifest;
pub mod measure;
pub mod report;
mod streams;
pub mod wilson;

pub use equivalence::{Caveat, Claim, Equivalence, equivalence};
pub use gate::{Gates, Measured, Verdict};
pub use loss::{Loss, cross_entropy};
pub use manifest::EditRecord;
pub use report::Report;
pub use wilson::Rate;

/// Everything that can go wrong while verifying. Messages are lowercase and name the thing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Chat(#[from] chat::Error),
    #[error("{0}")]
    Input(String),
    #[error("edit manifest `{}`: {problem}", path.display())]
    Manifest { path: std::path::PathBuf, problem: String },
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("`{}`: {cause}", path.display())]
    Io { path: std::path::PathBuf, cause: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
