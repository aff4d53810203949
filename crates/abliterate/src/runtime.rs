//! The options every command that runs the model shares (`--weights`, and `--threads` from
//! [`crate::args::Threads`]) and loading a model with a progress bar. Commands flatten [`RuntimeArgs`] into their own arguments and call
//! [`RuntimeArgs::load`]; the library decides everything else (`model::LoadOptions`).

use std::path::Path;

use anyhow::Result;
use model::{LoadOptions, Model, WeightWidth};

/// `--weights`: at what width the weights are held in memory (the arithmetic is f32 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    /// Decode every weight to f32 once (4 bytes per parameter).
    F32,
    /// Keep bf16/f16 weights at 2 bytes per parameter, widened exactly inside each product (same results).
    Stored,
    /// f32 when it fits in half the available memory, stored width otherwise.
    Auto,
}

impl From<Weights> for WeightWidth {
    fn from(w: Weights) -> WeightWidth {
        match w {
            Weights::F32 => WeightWidth::F32,
            Weights::Stored => WeightWidth::Stored,
            Weights::Auto => WeightWidth::Auto,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Hold the weights as f32, at their stored width (bf16/f16: half the memory, same results), or
    /// choose by the memory available.
    #[arg(long, value_name = "WIDTH", value_enum, default_value_t = Weights::Auto)]
    pub weights: Weights,
    #[command(flatten)]
    pub threads: crate::args::Threads,
}

impl RuntimeArgs {
    /// Sets the thread count for the rest of the process (call once, before any computation).
    pub fn apply_threads(&self) -> Result<()> {
        self.threads.apply()
    }

    /// Loads the model at `dir` with a progress bar on a terminal while its weights are converted.
    pub fn load(&self, dir: &Path) -> Result<Model> {
        let bar = crate::progress::bar(0, "loading", true);
        let mut progress = |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        };
        let opts = LoadOptions { weights: self.weights.into(), progress: Some(&mut progress), ..Default::default() };
        let model = Model::open_with(dir, opts);
        bar.finish_and_clear();
        Ok(model?)
    }
}
