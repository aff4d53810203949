//! Options shared by several commands, defined once so that every command spells and documents
//! them alike. A command flattens the struct into its own `Args` (`#[command(flatten)]`) and calls
//! its `apply` before computing anything.

use std::num::NonZeroUsize;

use anyhow::{Context, Result};

/// `--threads N`: for every command that computes (edit, diff, and the commands that run the model
/// through [`crate::runtime::RuntimeArgs`]). Results never depend on it: reductions have a fixed
/// order and threads only split independent rows, columns or tensors.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct Threads {
    /// Compute threads (default: one per core). Results do not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

impl Threads {
    /// Sizes rayon's global pool (call once, before any computation; without `--threads` rayon's
    /// default, one thread per core or `RAYON_NUM_THREADS`, stays).
    pub fn apply(&self) -> Result<()> {
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new().num_threads(n.get()).build_global().context("setting --threads")?;
        }
        Ok(())
    }
}
