//! The runtime `find` and `verify` run on: the forward pass of every supported family in f32 on the CPU,
//! with hook sites on the residual stream, and greedy generation with a KV cache.
//!
//! - [`Model::load`] converts a validated [`checkpoint::Checkpoint`] (any stored float dtype) to f32 once.
//! - [`Batch`] holds prompts of different lengths *packed*, without padding: dense work (projections,
//!   norms, MLPs) runs on the real tokens only, attention runs per prompt, and position ids count real
//!   tokens, so a prompt's outputs do not depend on what it is batched with (up to matmul rounding).
//! - [`Hook`]s see the residual stream at four [`Site`]s of every layer and may read or change it;
//!   [`Interventions`] (directional ablation, activation addition, method.md §7) and [`Capture`] are the
//!   ready-made ones. With no hook ([`NoHook`]) nothing is called and nothing is copied.
//! - [`Model::generate`] decodes greedily, batched, stopping at end-of-turn ids, with hooks active.
//!
//! Results do not depend on the thread count: parallel loops split independent rows, heads or output
//! columns, and every sum has a fixed order. This crate never writes a file and never panics on input:
//! bad token ids, shapes and configs are [`ModelError`]s.

mod arch;
mod batch;
mod forward;
mod generate;
mod hooks;
mod kernels;
mod rope;
mod weights;

pub use arch::{Activation, Arch, AttentionKind, NormKind};
pub use batch::{Batch, Segment};
pub use forward::{Forward, Logits, Model};
pub use generate::{Finish, GenerateOptions, Generation};
pub use hooks::{Acts, At, Capture, Chain, Hook, Interventions, NoHook, Positions, Site};

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages name the tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    #[error("`{}`: {problem}", path.display())]
    Config { path: PathBuf, problem: String },
    #[error("tensor `{name}` is missing from the checkpoint; {why}")]
    MissingTensor { name: String, why: String },
    #[error("tensor `{name}` has shape {got:?}, but config.json implies {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}; the runtime reads float tensors only (dequantize first)")]
    Dtype { name: String, dtype: String },
    #[error("{what} is not supported by the runtime yet")]
    Unsupported { what: String },
    #[error("token id {token} (prompt {row}, position {position}) is outside the vocabulary of {vocab} ids")]
    Token { row: usize, position: usize, token: u32, vocab: usize },
    #[error("{0}")]
    Batch(String),
    #[error("{0}")]
    Hook(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
