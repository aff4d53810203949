//! The `abliterate` command line: a thin layer over the library crates. This is the only crate
//! that knows clap, terminals, progress bars and JSON output.
//!
//! Exit codes: 0 success, 1 a gate failed (`diff --expect-orthogonal`, `verify`, `run`), 2 an error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod cmd;
mod progress;
mod runtime;

#[derive(Parser)]
#[command(name = "abliterate", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint: family, dimensions, shards, residual writers, and what an edit would rewrite.
    Inspect(cmd::inspect::Args),
    /// Find a model's refusal direction (Arditi et al.): candidates, scores, the choice, a report.
    Find(cmd::find::Args),
    /// Write a copy of a checkpoint in which no weight writes a direction into the residual stream.
    Edit(cmd::edit::Args),
    /// Compare two checkpoints tensor by tensor (optionally against a direction); a gate for CI.
    Diff(cmd::diff::Args),
    /// Generate a chat reply, optionally with a direction ablated or added, to preview an edit.
    Generate(cmd::generate::Args),
    /// Derive and combine direction files: projected, subspaces, per-layer, interpolated, imported, exported.
    Direction(cmd::direction::Args),
    /// Measure what an edit did: refusal, over-refusal, KL, cross-entropy, equivalence to the hooks,
    /// induced refusal; gates for CI. Without EDITED, previews --direction on hooks.
    Verify(Box<cmd::verify::Args>),
    /// find -> edit -> verify in one command: the edited model with a model card, the direction and both
    /// reports, in OUT.
    Run(Box<cmd::run::Args>),
    /// Search directions and edit variants (multi-objective TPE, evaluated with hooks, resumable), then edit
    /// and verify the chosen trial; the Pareto front of refusals against KL in OUT.
    Optimize(Box<cmd::optimize::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Find(a) => cmd::find::run(a),
        Command::Edit(a) => cmd::edit::run(a),
        Command::Diff(a) => cmd::diff::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Direction(a) => cmd::direction::run(a),
        Command::Verify(a) => cmd::verify::run(*a),
        Command::Run(a) => cmd::run::run(*a),
        Command::Optimize(a) => cmd::optimize::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `abliterate inspect m | head` must exit quietly.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
