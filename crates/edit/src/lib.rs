//! Weight orthogonalization (method.md §6): remove a direction from everything that writes to the
//! residual stream, streaming a checkpoint into an edited copy.
//!
//! [`plan`] decides what an edit rewrites without computing anything; [`write`] streams the
//! checkpoint into a new directory, rewriting only the planned tensors (with [`kernel`]) and
//! copying every other byte unchanged. Depends on `checkpoint` only and never runs a forward pass;
//! never opens an input file for writing.

pub mod kernel;
pub mod layer_kernel;
pub mod manifest;
pub mod output;
pub mod plan;
pub mod write;

use std::path::PathBuf;

pub use direction::{Basis, Direction, DirectionError, Directions};
pub use layer_kernel::{LayerKernel, Profile, Tent};
pub use manifest::{FileRecord, Ledger, Report};
pub use output::{OutputTarget, TempDir};
pub use plan::{
    Added, Against, ExcludeReason, Excluded, LayerSet, Options, Plan, TensorEdit, Tie, WriteOp, exact_pattern, plan,
    unknown_tensors,
};
pub use write::{MANIFEST, NoProgress, Progress, WriteOptions, write, write_directions};

/// Everything that can go wrong in an edit. Messages are lowercase and name the thing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    #[error(transparent)]
    Direction(#[from] DirectionError),
    #[error("--layers `{spec}`: {problem}")]
    Layers { spec: String, problem: String },
    #[error("--exclude `{pattern}` is not a valid glob: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error(
        "--keep-tie: config.json ties the LM head to the embedding, but `{name}` is stored too (transformers 4.57 \
         ignores it; transformers 5 reads it where it differs from the embedding), so the edited embedding would \
         be the head for some loaders and not for others; edit without --keep-tie (the head becomes the original \
         embedding, untied)"
    )]
    KeepTieStoredHead { name: String },
    #[error("{spec}: {problem}")]
    Kernel { spec: String, problem: String },
    #[error("--scale {0} is not a finite number")]
    Scale(f64),
    #[error("output `{}` is the model directory itself; the input is never modified, so choose another -o", out.display())]
    OutputIsModel { out: PathBuf },
    #[error("output `{}` is inside the model directory `{}`; choose a directory outside it", out.display(), model.display())]
    OutputInsideModel { out: PathBuf, model: PathBuf },
    #[error(
        "output `{}` contains the input `{}`, so replacing it would delete the model; choose another -o",
        out.display(), input.display()
    )]
    OutputContainsInput { out: PathBuf, input: PathBuf },
    #[error("output `{}` already exists; choose another -o, or pass --force to replace it once the edit has succeeded", out.display())]
    OutputExists { out: PathBuf },
    #[error("cannot write the output: `{}` is not writable ({cause})", dir.display())]
    NotWritable { dir: PathBuf, cause: std::io::Error },
    #[error(
        "disk full while writing `{file}` (the edited model needs {} in `{}`); nothing was left behind: \
         the temporary output was removed. Free some space or choose another -o",
        human_bytes(*need), dir.display()
    )]
    DiskFull { dir: PathBuf, file: String, need: u64 },
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `1234567` -> `"1.2 MB"` (decimal units, as disks are sold).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
