//! `cargo xtask bench find [--model DIR] [--runs N] [--dir DIR] [--all-scores] [--keep]`: wall time per
//! stage and peak RSS of `abliterate find` (release build, under `/usr/bin/time -v`) on the real refusing
//! model with exactly the reference's sampled prompt lists, against the paper's own pipeline on the same
//! model and machine (`../shared/reference/timings.json`: filter, candidate means, selection with its KL,
//! induce and bypass parts). Issue 11's target: the three stages at least 5x faster (under 300 s against
//! the reference's 1482 s), with the same choice (-1, 22).
//!
//! By default `find` computes what the choice needs (the shortcuts of method.md §5, the shared chat
//! prefix); `--all-scores` adds a run that scores every candidate as the reference did (180 x 3). The
//! table goes to stdout (for docs/benchmarks.md); progress to stderr.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::host;

struct Opts {
    model: Option<PathBuf>,
    runs: usize,
    dir: PathBuf,
    all_scores: bool,
    keep: bool,
}

fn parse(args: &[&str], root: &Path) -> Result<Opts> {
    let mut o = Opts { model: None, runs: 1, dir: root.join("target/bench-find"), all_scores: false, keep: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--model" => o.model = Some(PathBuf::from(it.next().context("--model needs a directory")?)),
            "--runs" => o.runs = it.next().context("--runs needs a number")?.parse()?,
            "--dir" => o.dir = PathBuf::from(it.next().context("--dir needs a path")?),
            "--all-scores" => o.all_scores = true,
            "--keep" => o.keep = true,
            other => bail!("unknown option `{other}`; see xtask/src/bench_find.rs"),
        }
    }
    Ok(o)
}

/// One configuration's runs: per-stage wall seconds (median over runs), total wall and CPU, peak RSS,
/// and the choice.
struct Measured {
    label: String,
    stages: Vec<(String, f64)>,
    wall: f64,
    cpu: f64,
    rss_kb: u64,
    choice: (i64, u64),
    rule: String,
}

fn measure(
    bin: &Path,
    model: &Path,
    lists: &Path,
    out: &Path,
    extra: &str,
    runs: usize,
    label: &str,
) -> Result<Measured> {
    let mut samples: Vec<Value> = Vec::new();
    let (mut walls, mut cpus, mut rss) = (Vec::new(), Vec::new(), 0u64);
    for i in 0..runs {
        let script = format!(
            "{} find {} -o {} --force --json --harmful {l}/harmful_train.json --harmless {l}/harmless_train.json \
             --harmful-val {l}/harmful_val.json --harmless-val {l}/harmless_val.json {extra}",
            bin.display(),
            model.display(),
            out.display(),
            l = lists.display()
        );
        let t = host::timed(&script)?;
        eprintln!(
            "{label} run {}: {:.1} s wall, {:.1} s CPU, peak RSS {} MB (load {})",
            i + 1,
            t.wall,
            t.cpu,
            t.rss / 1024,
            host::load()
        );
        walls.push(t.wall);
        cpus.push(t.cpu);
        rss = rss.max(t.rss);
        samples.push(serde_json::from_str(&t.stdout).context("`abliterate find --json` printed no JSON")?);
    }
    let names: Vec<String> = samples[0]["timings"]
        .as_array()
        .context("no timings in find's JSON")?
        .iter()
        .filter_map(|t| t["stage"].as_str().map(str::to_string))
        .collect();
    let stages = names
        .iter()
        .map(|n| {
            let v: Vec<f64> = samples
                .iter()
                .map(|s| {
                    s["timings"]
                        .as_array()
                        .and_then(|a| a.iter().find(|t| t["stage"] == n.as_str()))
                        .and_then(|t| t["seconds"].as_f64())
                        .unwrap_or(0.0)
                })
                .collect();
            (n.clone(), host::median(v))
        })
        .collect();
    let last = samples.last().expect("at least one run");
    Ok(Measured {
        label: label.to_string(),
        stages,
        wall: host::median(walls),
        cpu: host::median(cpus),
        rss_kb: rss,
        choice: (last["position"].as_i64().unwrap_or(0), last["layer"].as_u64().unwrap_or(0)),
        rule: last["rule"]["kind"].as_str().unwrap_or("?").to_string(),
    })
}

pub fn run(args: &[&str]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let o = parse(args, &root)?;
    let shared = root.join("../shared");
    let timings: Value = serde_json::from_slice(
        &std::fs::read(shared.join("reference/timings.json")).context("reading ../shared/reference/timings.json")?,
    )?;
    let prompts: Value = serde_json::from_slice(&std::fs::read(shared.join("reference/prompts.json"))?)?;
    let model = crate::host::refusing_model(&root, o.model.clone())?;
    let bin = crate::host::release_abliterate(&root)?;
    // The reference's sampled lists (128, 128, 32, 32): `find` uses a set no larger than its sample whole.
    let lists = o.dir.join("lists");
    std::fs::create_dir_all(&lists)?;
    for k in ["harmful_train", "harmless_train", "harmful_val", "harmless_val"] {
        std::fs::write(lists.join(format!("{k}.json")), serde_json::to_vec(&prompts[k])?)?;
    }
    let out = o.dir.join("out");
    let mut results = vec![measure(&bin, &model, &lists, &out, "", o.runs, "find")?];
    if o.all_scores {
        results.push(measure(&bin, &model, &lists, &out, "--all-scores", o.runs, "find --all-scores")?);
    }

    let st = |k: &str| timings["stages_s"][k].as_f64().unwrap_or(0.0);
    let reference = [
        ("filter", st("filter")),
        ("means", st("generate_directions")),
        ("baseline", st("select_direction/baseline")),
        ("kl", st("select_direction/kl")),
        ("induce", st("select_direction/induce")),
        ("bypass", st("select_direction/bypass")),
    ];
    let ref_total = st("filter") + st("generate_directions") + st("select_direction");
    let mut table = String::new();
    writeln!(table, "Machine: {}. Load average at end: {}.\n", host::machine(), host::load())?;
    write!(table, "| stage | reference (2 threads) |")?;
    for r in &results {
        write!(table, " `{}` |", r.label)?;
    }
    writeln!(table)?;
    writeln!(table, "|---|---:|{}", "---:|".repeat(results.len()))?;
    for (name, secs) in reference {
        write!(table, "| {name} | {secs:.1} s |")?;
        for r in &results {
            let ours = r.stages.iter().find(|(n, _)| n == name).map_or(0.0, |s| s.1);
            write!(table, " {ours:.1} s ({:.1}x) |", if ours > 0.0 { secs / ours } else { f64::INFINITY })?;
        }
        writeln!(table)?;
    }
    let sel_other = st("select_direction")
        - st("select_direction/baseline")
        - st("select_direction/kl")
        - st("select_direction/induce")
        - st("select_direction/bypass");
    write!(table, "| filter + means + selection | {ref_total:.1} s (incl. {sel_other:.1} s other) |")?;
    for r in &results {
        let ours: f64 = r.stages.iter().map(|s| s.1).sum();
        write!(table, " **{ours:.1} s ({:.1}x)** |", ref_total / ours)?;
    }
    writeln!(table)?;
    write!(table, "| whole command (load, hashing, writing) | — |")?;
    for r in &results {
        write!(table, " {:.1} s wall, {:.1} s CPU |", r.wall, r.cpu)?;
    }
    writeln!(table)?;
    write!(table, "| peak RSS | — |")?;
    for r in &results {
        write!(table, " {} MB |", r.rss_kb / 1024)?;
    }
    writeln!(table)?;
    write!(table, "| choice | (-1, 22) by min_kl |")?;
    for r in &results {
        write!(table, " ({}, {}) by {} |", r.choice.0, r.choice.1, r.rule)?;
    }
    writeln!(table)?;
    let same = results.iter().all(|r| r.choice == (-1, 22));
    writeln!(
        table,
        "\nTarget: filter + means + selection >= 5x faster (< 296 s) with the same choice: {}.",
        if same { "same choice" } else { "DIFFERENT CHOICE" }
    )?;
    if !o.keep {
        let _ = std::fs::remove_dir_all(&o.dir);
    }
    println!("{table}");
    Ok(())
}
