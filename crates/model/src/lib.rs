//! The runtime `find` and `verify` run on: the forward pass of every supported family on the CPU, in f32
//! arithmetic, with hook sites on the residual stream, and greedy generation with a KV cache.
//!
//! - [`Model::open_with`] / [`Model::load_with`] load a validated [`checkpoint::Checkpoint`] as
//!   [`LoadOptions`] say: weights held at f32 or at their stored width ([`WeightWidth`]: bf16 and f16 stay
//!   2 bytes per parameter and widen exactly to f32 inside each matrix product, so both widths give the
//!   same bits), a memory check before anything large is allocated ([`ModelError::Memory`]), and a
//!   progress callback. Every tensor is checked against config.json before any allocation it sizes.
//!   [`Model::open`] / [`Model::load`] use the defaults ([`WeightWidth::Auto`]: f32 when it fits in half
//!   the available memory). The token embedding stays in the memory map and is decoded row by row.
//! - [`Batch`] holds prompts of different lengths *packed*, without padding: dense work (projections,
//!   norms, MLPs) runs on the real tokens only, attention runs per prompt, and position ids count real
//!   tokens, so a prompt's outputs do not depend on what it is batched with: bit for bit where the CPU
//!   has AVX-512 ([`batch_invariant`]: our own matmul kernel, one fused sum per value in a fixed order),
//!   up to matmul rounding elsewhere (`gemm`'s sums depend on the number of rows).
//! - [`Hook`]s see the residual stream at four [`Site`]s of every layer and may read or change it;
//!   [`Interventions`] (directional ablation, activation addition, method.md §7) and [`Capture`] are the
//!   ready-made ones. With no hook ([`NoHook`]) the cost is one `wants` call per site: nothing is copied.
//! - [`Model::forward_from`] resumes at any layer from a given residual (method.md §5 prefix reuse);
//!   [`Logits::Last`] computes the LM head for each prompt's last position only.
//! - [`Model::prefix`] runs a shared prompt prefix once; [`Model::forward_after`] runs prompts' remaining
//!   tokens against its keys and values (the same computation as the whole prompts).
//! - [`Model::generate`] decodes greedily, batched, stopping at end-of-turn ids, with hooks active.
//!
//! ```no_run
//! use model::{At, Batch, Capture, Chain, GenerateOptions, Interventions, LoadOptions, Logits, Model, NoHook};
//! use model::{Positions, Site, WeightWidth};
//! # fn main() -> model::Result<()> {
//! let mut shown = |done: u64, total: u64| eprint!("\rloading {}%", 100 * done / total.max(1));
//! let opts = LoadOptions { weights: WeightWidth::Stored, progress: Some(&mut shown), ..Default::default() };
//! let m = Model::open_with(std::path::Path::new("models/smollm2"), opts)?;
//! eprintln!("\nweights: {}", m.weights_info().describe()); // "bf16 (stored width), 0.2 GB"
//! let (layers, d) = (m.arch().layers, m.arch().hidden);
//! let batch = Batch::new(&[vec![1, 9690, 198], vec![1, 504]])?;
//! // The residual entering every layer at each prompt's last 2 positions, under directional ablation.
//! let mut ablate = Interventions::ablation(layers, &vec![0.5; d])?;
//! let mut capture = Capture::every_layer(layers, Site::Input, Positions::Last(2));
//! let out = m.forward(&batch, Logits::Last, &mut Chain(vec![&mut ablate, &mut capture]))?;
//! let x15 = capture.get(At { layer: 15, site: Site::Input }).unwrap(); // [2 prompts x 2 positions, d]
//! let next_token_logits = out.row(0);
//! // Greedy replies, stopping at end of turn.
//! let opts = GenerateOptions { max_new_tokens: 64, stop_tokens: vec![2] };
//! let replies = m.generate(&batch, &opts, &mut NoHook, &mut |_, _| std::ops::ControlFlow::Continue(()))?;
//! # let _ = (x15, next_token_logits, replies); Ok(()) }
//! ```
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
mod load;
mod panel_avx512;
mod prefix;
mod rope;
mod weights;

pub use arch::{Activation, Arch, AttentionKind, MoeSpec, NormKind, ScoreScale};
pub use batch::{Batch, Segment};
pub use forward::{Forward, Logits, Model};
pub use generate::{Finish, GenerateOptions, Generation, Record, Stop};
pub use hooks::{Acts, At, Capture, Chain, Hook, Interventions, NoHook, Positions, Site};
pub use kernels::log_softmax_at;
#[doc(hidden)]
pub use kernels::panel_kernel_speeds;
pub use load::{LoadOptions, WORKING_MARGIN, WeightWidth, WeightsInfo, available_memory};
pub use prefix::Prefix;
pub use rope::RopeSpec;

use std::path::PathBuf;

/// Whether every row's results are the same bits whatever it is batched with, and whether it is computed
/// in a prompt pass, by teacher forcing or in a generation step: true where the CPU has AVX-512F (the
/// runtime's own matmul kernel runs there; elsewhere `gemm`, whose rounding depends on the row count).
pub fn batch_invariant() -> bool {
    panel_avx512::available()
}

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
    #[error(
        "{what} need {:.1} GB of memory, but {:.1} GB are available{hint}",
        *need as f64 / 1e9,
        *available as f64 / 1e9
    )]
    Memory { what: String, need: u64, available: u64, hint: String },
    #[error("{0}")]
    Batch(String),
    #[error("{0}")]
    Hook(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
