//! `cargo xtask bench run [--model DIR] [--runs N] [--dir DIR] [--keep] [-- RUN_ARGS...]`: end-to-end wall
//! time and peak RSS of `abliterate run MODEL -o OUT [RUN_ARGS]` (find, edit, verify; release build, under
//! `/usr/bin/time -v`) on the real refusing model, against the paper's own pipeline on the same model and
//! machine (`../shared/reference/timings.json`). Issue 12's target: at least 5x faster end to end.
//!
//! The reference ran stages that `run` replaces one for one: filtering, candidate means, selection, the
//! untied orthogonalization, completions of the harmful and harmless evaluation sets before and after (and
//! harmless under activation addition), and the equivalence check. Its other stages (completions under the
//! ablation hooks and for the tied variant) `run` does not need; both totals are shown. `run` also does work
//! the reference did not (over-refusal of the edited model, cross-entropy, SHA-256 of every file).
//! The table goes to stdout (for docs/benchmarks.md); progress to stderr.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::host;

/// Reference stages `run` replaces (keys of `timings.json` `stages_s`).
const MATCHED: [&str; 11] = [
    "load_model",
    "filter",
    "generate_directions",
    "select_direction",
    "orthogonalize/untied",
    "completions/jailbreakbench/baseline",
    "completions/jailbreakbench/ortho_untied",
    "completions/harmless/baseline",
    "completions/harmless/actadd",
    "equivalence/hooked_reference",
    "equivalence/untied",
];

struct Opts {
    model: Option<PathBuf>,
    runs: usize,
    dir: PathBuf,
    keep: bool,
    /// Passed to `abliterate run` after `-o OUT --force --json` (e.g. the paper's prompt files).
    extra: Vec<String>,
}

fn parse(args: &[&str], root: &Path) -> Result<Opts> {
    let mut o = Opts { model: None, runs: 1, dir: root.join("target/bench-run"), keep: false, extra: Vec::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--model" => o.model = Some(PathBuf::from(it.next().context("--model needs a directory")?)),
            "--runs" => o.runs = it.next().context("--runs needs a number")?.parse()?,
            "--dir" => o.dir = PathBuf::from(it.next().context("--dir needs a path")?),
            "--keep" => o.keep = true,
            "--" => o.extra = it.by_ref().map(|a| a.to_string()).collect(),
            other => bail!("unknown option `{other}`; see xtask/src/bench_run.rs"),
        }
    }
    Ok(o)
}

pub fn run(args: &[&str]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let o = parse(args, &root)?;
    let shared = root.join("../shared");
    let timings: Value = serde_json::from_slice(
        &std::fs::read(shared.join("reference/timings.json")).context("reading ../shared/reference/timings.json")?,
    )?;
    let stage = |k: &str| timings["stages_s"][k].as_f64();
    let ref_total = stage("total").context("timings.json has no stages_s.total")?;
    let ref_matched: f64 = MATCHED.iter().map(|k| stage(k).unwrap_or(0.0)).sum();
    let model = crate::host::refusing_model(&root, o.model.clone())?;
    let bin = crate::host::release_abliterate(&root)?;
    std::fs::create_dir_all(&o.dir)?;
    let out = o.dir.join("out");
    let mut walls = Vec::new();
    let (mut rss, mut cpu, mut last) = (0u64, Vec::new(), Value::Null);
    for i in 0..o.runs {
        let extra = o.extra.join(" ");
        let t = host::timed(&format!(
            "{} run {} -o {} --force --json {extra}",
            bin.display(),
            model.display(),
            out.display()
        ))?;
        eprintln!(
            "run {}: {:.1} s wall, {:.1} s CPU, peak RSS {} MB (load {})",
            i + 1,
            t.wall,
            t.cpu,
            t.rss / 1024,
            host::load()
        );
        walls.push(t.wall);
        cpu.push(t.cpu);
        rss = rss.max(t.rss);
        last = serde_json::from_str(&t.stdout).context("`abliterate run --json` printed no JSON")?;
    }
    let wall = host::median(walls.clone());
    let mut table = String::new();
    writeln!(table, "Machine: {}. Load average at end: {}.\n", host::machine(), host::load())?;
    writeln!(table, "| | wall | CPU | peak RSS |\n|---|---|---|---|")?;
    let all = walls.iter().map(|w| format!("{w:.1}")).collect::<Vec<_>>().join(", ");
    writeln!(
        table,
        "| `abliterate run` (median of {}: {all} s) | {wall:.1} s | {:.1} s | {} MB |",
        o.runs,
        host::median(cpu),
        rss / 1024
    )?;
    writeln!(
        table,
        "| reference pipeline, stages `run` replaces | {ref_matched:.1} s | {:.1} s | — |",
        MATCHED.iter().map(|k| timings["stages_cpu_s"][k].as_f64().unwrap_or(0.0)).sum::<f64>()
    )?;
    writeln!(
        table,
        "| reference pipeline, all stages | {ref_total:.1} s | {:.1} s | — |",
        timings["stages_cpu_s"]["total"].as_f64().unwrap_or(0.0)
    )?;
    writeln!(
        table,
        "\nSpeed-up: **{:.1}x** against the matched stages, {:.1}x against the whole reference run (target >= 5x).",
        ref_matched / wall,
        ref_total / wall
    )?;
    if let Some(stages) = last["seconds"].as_object() {
        writeln!(table, "\nStages of the last run (seconds):\n")?;
        for (k, v) in stages {
            writeln!(table, "- {k}: {:.1}", v.as_f64().unwrap_or(0.0))?;
        }
    }
    if !o.keep {
        let _ = std::fs::remove_dir_all(&o.dir);
    }
    println!("{table}");
    Ok(())
}
