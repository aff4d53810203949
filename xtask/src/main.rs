//! Project tasks: `cargo xtask fixtures` regenerates the committed tiny checkpoints;
//! `cargo xtask bench edit|find|forward|forward-8b|kernel|run` runs the benchmarks recorded in docs/benchmarks.md;
//! `cargo xtask check-run OUT` checks the numbers of an `abliterate run` report (CI);
//! `cargo xtask compare` runs issue 15's side by side with heretic and abliterix (docs/results.md).

mod bench_edit;
mod bench_find;
mod bench_forward;
mod bench_kernel;
mod bench_large;
mod bench_run;
mod check_run;
mod compare;
mod distill;
mod fixtures;
mod host;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["fixtures", rest @ ..] => fixtures::run(rest),
        ["bench", "edit", rest @ ..] => bench_edit::run(rest),
        ["bench", "find", rest @ ..] => bench_find::run(rest),
        ["bench", "forward", rest @ ..] => bench_forward::run(rest),
        ["bench", "forward-8b", rest @ ..] => bench_large::run(rest),
        ["bench", "kernel", rest @ ..] => bench_kernel::run(rest),
        ["bench", "run", rest @ ..] => bench_run::run(rest),
        ["check-run", rest @ ..] => check_run::run(rest),
        ["compare", rest @ ..] => compare::run(rest),
        ["distill", rest @ ..] => distill::run(rest),
        _ => anyhow::bail!(
            "usage: cargo xtask fixtures [--check] | bench edit [...] | bench find [...] | bench forward [...] | bench forward-8b [...] | bench kernel | bench run [...] | check-run OUT [...] | compare [...] | distill MODEL IN.json OUT.jsonl [...]"
        ),
    }
}
