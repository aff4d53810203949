//! `abliterate edit` (being built).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`abliterate edit` is not built yet ({})", args.model.display())
}
