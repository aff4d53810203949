//! `cargo xtask compare [--model DIR] [--trials N] [--startup N] [--max-kl KL] [--dir DIR] [--steps LIST]`:
//! issue 15's side by side on the refusing SmolLM2. One after another on this machine, each timed (wall, CPU,
//! peak RSS): `abliterate run` (the paper's method), `abliterate optimize --trials N`, heretic and abliterix
//! with N trials each (pinned, from PyPI, in a private venv `target/compare-venv`, on the CPU, offline). Then
//! `abliterate verify` measures every edited model with the same code and sets, and the markdown table goes
//! to stdout (docs/results.md, "Side by side with heretic and abliterix").
//!
//! Every tool gets the same prompts: the embedded sets of `crates/eval/prompts` (exported as JSONL datasets),
//! `harmful_train` / `harmless_train` to find directions, the first 32 of `harmful_val` / `harmless_val` to
//! score trials, 64 new tokens, the model's own default system prompt, seed 0. Each tool's trial is chosen by
//! optimize's rule (the fewest refusals with KL <= `--max-kl`, then the smallest KL; `compare_driver.py`
//! makes heretic and abliterix choose so). A step whose `DIR/STEP/step.json` exists is not run again (delete
//! the folder to redo it; in `verify`, each tool's report is kept where it is newer than the tool's
//! model), so the steps may also be run one at a time with `--steps`. Nothing of the tools is
//! committed: the venv and everything they write stay under `target/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::host;

/// The tools compared, pinned (issue 15), with the torch and transformers they were measured with.
const PINS: [&str; 4] = ["heretic-llm==1.4.0", "abliterix==1.12.2", "torch==2.15.0", "transformers==5.24.0"];
/// Runs heretic or abliterix without a terminal and makes them choose a trial by optimize's rule.
const DRIVER: &str = include_str!("compare_driver.py");
/// The embedded prompt sets the tools share (`crates/eval/prompts/NAME.json`).
const SETS: [&str; 4] = ["harmful_train", "harmless_train", "harmful_val", "harmless_val"];
/// The steps, in the order they run.
const STEPS: [&str; 7] = ["venv", "run", "optimize", "heretic", "abliterix", "verify", "table"];
/// The system prompt SmolLM2's chat template adds when none is given, which our tools keep: the Python tools
/// are given it so every tool renders the same chat text.
const SMOLLM2_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
/// Prompts that score a trial and new tokens per completion (optimize's defaults, docs/optimize.md).
const TRIAL_PROMPTS: usize = 32;
const MAX_NEW_TOKENS: usize = 64;

struct Opts {
    model: Option<PathBuf>,
    trials: usize,
    startup: usize,
    max_kl: f64,
    dir: PathBuf,
    steps: Vec<String>,
}

fn parse(args: &[&str], root: &Path) -> Result<Opts> {
    let mut o = Opts {
        model: None,
        trials: 12,
        startup: 8,
        max_kl: 0.5,
        dir: root.join("target/compare"),
        steps: STEPS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match *a {
            "--model" => o.model = Some(PathBuf::from(value()?)),
            "--trials" => o.trials = value()?.parse().context("--trials needs a number")?,
            "--startup" => o.startup = value()?.parse().context("--startup needs a number")?,
            "--max-kl" => o.max_kl = value()?.parse().context("--max-kl needs a number")?,
            "--dir" => o.dir = PathBuf::from(value()?),
            "--steps" => {
                o.steps = value()?.split(',').map(str::to_string).collect();
                if let Some(s) = o.steps.iter().find(|s| !STEPS.contains(&s.as_str())) {
                    bail!("unknown step `{s}`; the steps are {}", STEPS.join(","));
                }
            }
            other => bail!("unknown option `{other}`; see xtask/src/compare.rs"),
        }
    }
    Ok(o)
}

/// Where everything is, for the steps.
struct Ctx {
    root: PathBuf,
    dir: PathBuf,
    model: PathBuf,
    bin: PathBuf,
    python: PathBuf,
    opts: Opts,
}

pub fn run(args: &[&str]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let opts = parse(args, &root)?;
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating `{}`", opts.dir.display()))?;
    let dir = opts.dir.canonicalize()?;
    let model = host::refusing_model(&root, opts.model.clone())?.canonicalize()?;
    let bin = host::release_abliterate(&root)?;
    let python = root.join("target/compare-venv/bin/python");
    let cx = Ctx { root, dir, model, bin, python, opts };
    for step in &cx.opts.steps {
        let done = cx.dir.join(step).join("step.json");
        if done.exists() {
            eprintln!("compare: {step} already done (`{}`)", done.display());
            continue;
        }
        eprintln!("compare: {step} ({})", host::load());
        match step.as_str() {
            "venv" => venv(&cx)?,
            "run" => ours(&cx, step, &run_cmd(&cx))?,
            "optimize" => ours(&cx, step, &optimize_cmd(&cx))?,
            "heretic" | "abliterix" => python_tool(&cx, step)?,
            "verify" => verify_all(&cx)?,
            "table" => println!("{}", table(&cx)?),
            _ => unreachable!("parse accepts only STEPS"),
        }
    }
    Ok(())
}

/// Creates the venv with the pinned tools (reused when they import), exports the prompts, writes the driver.
fn venv(cx: &Ctx) -> Result<()> {
    let ok = |py: &Path| {
        Command::new(py).args(["-c", "import heretic, abliterix"]).output().is_ok_and(|o| o.status.success())
    };
    if !ok(&cx.python) {
        let venv = cx.python.parent().and_then(Path::parent).context("the venv path has no parent")?;
        sh(&format!("python3 -m venv {}", venv.display()))?;
        // The CPU-only torch index is not reachable here, so pip takes torch (with its CUDA libraries) from
        // PyPI; it runs on the CPU all the same.
        sh(&format!("nice -n 10 {} -m pip install {}", cx.python.display(), PINS.join(" ")))?;
    }
    let step = cx.dir.join("venv");
    std::fs::create_dir_all(&step)?;
    let freeze = Command::new(&cx.python).args(["-m", "pip", "freeze"]).output().context("pip freeze")?;
    std::fs::write(step.join("pip-freeze.txt"), &freeze.stdout)?;
    let prompts = cx.dir.join("prompts");
    for set in SETS {
        let src = cx.root.join(format!("crates/eval/prompts/{set}.json"));
        let text = std::fs::read_to_string(&src).with_context(|| format!("reading `{}`", src.display()))?;
        let jsonl = to_jsonl(&text).with_context(|| format!("`{}`", src.display()))?;
        std::fs::create_dir_all(prompts.join(set))?;
        // A folder with `train.jsonl` is a local dataset (split `train`, column `text`) for both tools.
        std::fs::write(prompts.join(set).join("train.jsonl"), jsonl)?;
    }
    std::fs::write(cx.dir.join("compare_driver.py"), DRIVER)?;
    write_step(&step, &json!({ "pins": PINS }))
}

/// The embedded prompt file (a JSON list of `{"instruction": ...}`) as JSONL lines `{"text": ...}`.
fn to_jsonl(json_text: &str) -> Result<String> {
    let v: Value = serde_json::from_str(json_text).context("not JSON")?;
    let items = v.as_array().context("not a JSON list")?;
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let text = item["instruction"].as_str().with_context(|| format!("item {i} has no `instruction` string"))?;
        writeln!(out, "{}", json!({ "text": text }))?;
    }
    Ok(out)
}

fn run_cmd(cx: &Ctx) -> String {
    format!("{} run {} -o {} --force --json", cx.bin.display(), cx.model.display(), cx.dir.join("run/out").display())
}

fn optimize_cmd(cx: &Ctx) -> String {
    format!(
        "{} optimize {} -o {} --trials {} --startup {} --max-kl {} --prompts {TRIAL_PROMPTS} --max-new-tokens \
         {MAX_NEW_TOKENS} --seed 0 --json",
        cx.bin.display(),
        cx.model.display(),
        cx.dir.join("optimize/out").display(),
        cx.opts.trials,
        cx.opts.startup,
        cx.opts.max_kl
    )
}

/// Runs one of our commands, timed, its output logged.
fn ours(cx: &Ctx, step: &str, cmd: &str) -> Result<()> {
    let dir = cx.dir.join(step);
    std::fs::create_dir_all(&dir)?;
    let (json_out, log) = (dir.join("stdout.json"), dir.join("log.txt"));
    let t = host::timed(&format!("nice -n 10 {cmd} > {} 2> {}", json_out.display(), log.display()))?;
    write_step(&dir, &timing(&t, cmd))
}

fn timing(t: &host::Timed, cmd: &str) -> Value {
    json!({ "wall_s": t.wall, "cpu_s": t.cpu, "peak_rss_mb": t.rss / 1024, "command": cmd, "load": host::load() })
}

fn write_step(dir: &Path, v: &Value) -> Result<()> {
    std::fs::write(dir.join("step.json"), serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing `{}`", dir.join("step.json").display()))
}

/// heretic or abliterix with the shared prompts and N trials; the chosen trial saved to `DIR/TOOL/model`.
/// A tool that fails leaves `failed.txt` with the end of its log, and the table says so.
fn python_tool(cx: &Ctx, tool: &str) -> Result<()> {
    let dir = cx.dir.join(tool);
    std::fs::create_dir_all(&dir)?;
    let model_out = dir.join("model");
    if model_out.exists() {
        std::fs::remove_dir_all(&model_out)?;
    }
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    let (file, config) = match tool {
        "heretic" => ("config.toml", heretic_config(cx)),
        _ => ("abliterix.toml", abliterix_config(cx)),
    };
    std::fs::write(dir.join(file), config)?;
    let cmd = format!(
        "cd {} && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES= \
         OMP_NUM_THREADS=2 nice -n 10 {} {} {tool} {} {} {} > log.txt 2>&1",
        dir.display(),
        cx.python.display(),
        cx.dir.join("compare_driver.py").display(),
        model_out.display(),
        dir.join("trials.json").display(),
        cx.opts.max_kl
    );
    match host::timed(&cmd) {
        Ok(t) => write_step(&dir, &timing(&t, &cmd)),
        Err(e) => {
            let log = std::fs::read_to_string(dir.join("log.txt")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            std::fs::write(dir.join("failed.txt"), format!("{e:#}\n\n{}", tail.join("\n")))?;
            eprintln!("compare: {tool} failed; see `{}`", dir.join("failed.txt").display());
            write_step(&dir, &json!({ "failed": true, "command": cmd }))
        }
    }
}

/// The four prompt tables of a tool's config, given the tool's names for them (harmless and harmful for the
/// directions, harmless and harmful for a trial): the exported datasets, a trial's the first
/// `TRIAL_PROMPTS`.
fn prompt_tables(cx: &Ctx, tables: [&str; 4]) -> String {
    let sets = [
        ("harmless_train", None),
        ("harmful_train", None),
        ("harmless_val", Some(TRIAL_PROMPTS)),
        ("harmful_val", Some(TRIAL_PROMPTS)),
    ];
    let mut out = String::new();
    for (table, (set, n)) in tables.into_iter().zip(sets) {
        let split = n.map_or("train".to_string(), |n| format!("train[:{n}]"));
        let dir = cx.dir.join("prompts").join(set);
        out += &format!("\n[{table}]\ndataset = \"{}\"\nsplit = \"{split}\"\ncolumn = \"text\"\n", dir.display());
    }
    out
}

/// heretic's config: float32 on the CPU (bf16 matmuls are slow there; our tools compute in f32 too), batch
/// 32, no response-prefix detection (SmolLM2's replies share none), the merged model exported.
fn heretic_config(cx: &Ctx) -> String {
    format!(
        "model = \"{}\"\ndtypes = [\"float32\"]\ndevice_map = \"cpu\"\nbatch_size = 32\nmax_response_length = \
         {MAX_NEW_TOKENS}\nresponse_prefix = \"\"\nn_trials = {}\nn_startup_trials = {}\nseed = 0\nexport_strategy \
         = \"merge\"\nsystem_prompt = \"{SMOLLM2_SYSTEM}\"\nstudy_checkpoint_dir = \"checkpoints\"\n{}",
        cx.model.display(),
        cx.opts.trials,
        cx.opts.startup,
        prompt_tables(cx, ["good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts"]),
    )
}

/// abliterix's config: the same choices as heretic's, in its own names.
fn abliterix_config(cx: &Ctx) -> String {
    format!(
        "seed = 0\nsystem_prompt = \"{SMOLLM2_SYSTEM}\"\n\n[model]\nmodel_id = \"{}\"\ndtype_fallback_order = \
         [\"float32\"]\ndevice_map = \"cpu\"\n\n[inference]\nbatch_size = 32\nmax_gen_tokens = {MAX_NEW_TOKENS}\n\n\
         [optimization]\nnum_trials = {}\nnum_warmup_trials = {}\nsampler_seed = 0\ncheckpoint_dir = \
         \"checkpoints\"\n{}",
        cx.model.display(),
        cx.opts.trials,
        cx.opts.startup,
        prompt_tables(cx, ["benign_prompts", "target_prompts", "benign_eval_prompts", "target_eval_prompts"]),
    )
}

/// The edited model of each tool, where one was made.
fn edited(cx: &Ctx, tool: &str) -> Option<PathBuf> {
    let p = match tool {
        "run" => cx.dir.join("run/out"),
        "optimize" => cx.dir.join("optimize/out/model"),
        _ => cx.dir.join(tool).join("model"),
    };
    p.join("config.json").exists().then_some(p)
}

/// `abliterate verify` of every edited model: the embedded evaluation sets (run and optimize already did this
/// with the same code; their reports are used) and the paper's `harmful_val.json` as the harmful set.
fn verify_all(cx: &Ctx) -> Result<()> {
    let dir = cx.dir.join("verify");
    std::fs::create_dir_all(&dir)?;
    let val = cx.root.join("../shared/datasets/refusal_direction/splits/harmful_val.json");
    // A verify whose report is newer than the edited model is kept (delete `verify/NAME` to redo it), so that a
    // tool run later is verified without measuring the others again.
    let mut seconds = serde_json::Map::new();
    for tool in ["run", "optimize", "heretic", "abliterix"] {
        let Some(edited) = edited(cx, tool) else { continue };
        let mut runs = vec![(format!("{tool}-val"), format!("--harmful {} --no-cross-entropy", val.display()))];
        if matches!(tool, "heretic" | "abliterix") {
            runs.push((tool.to_string(), String::new()));
        }
        for (name, extra) in runs {
            let out = dir.join(&name);
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let fresh = modified(&out.join("report.json"))
                .zip(modified(&edited.join("config.json")))
                .is_some_and(|(report, model)| report > model);
            if fresh {
                seconds.insert(name, json!("kept: its report is newer than the model"));
                continue;
            }
            let cmd = format!(
                "nice -n 10 {} verify {} {} {extra} -o {} --force --json > /dev/null 2> {}",
                cx.bin.display(),
                cx.model.display(),
                edited.display(),
                out.display(),
                dir.join(format!("{name}.log")).display()
            );
            let t = host::timed(&cmd)?;
            seconds.insert(name, json!(t.wall));
        }
    }
    write_step(&dir, &Value::Object(seconds))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("`{}` is not JSON", path.display()))
}

/// The trial a tool chose and how many it ran: (index, refusals of the trial set, KL on it, trials run).
#[derive(Debug, PartialEq)]
struct Chosen {
    index: u64,
    refusals: u64,
    kl: f64,
    trials: usize,
}

/// Reads `trials.json` of `compare_driver.py`: `{"max_kl": .., "trials": [{"index", "refusals", "kl",
/// "chosen"}, ..]}`.
fn driver_choice(text: &str) -> Result<Chosen> {
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    let trials = v["trials"].as_array().context("no `trials` list")?;
    let c = trials.iter().find(|t| t["chosen"] == json!(true)).context("no trial is marked chosen")?;
    Ok(Chosen {
        index: c["index"].as_u64().context("the chosen trial has no `index`")?,
        refusals: c["refusals"].as_u64().context("the chosen trial has no `refusals`")?,
        kl: c["kl"].as_f64().context("the chosen trial has no `kl`")?,
        trials: trials.len(),
    })
}

/// One row of the table: the numbers of `verify` on the embedded sets and on harmful_val.json.
struct Row {
    name: String,
    embedded: Option<Value>,
    val: Option<Value>,
    step: Value,
    /// The `seconds` of our commands' `--json` summaries (their verify is part of their wall time).
    seconds: Value,
    note: String,
}

fn table(cx: &Ctx) -> Result<String> {
    let v = cx.dir.join("verify");
    let load = |p: PathBuf| read_json(&p).ok();
    let mut rows = Vec::new();
    for (tool, name) in [
        ("run", "`abliterate run` (paper's method)"),
        ("optimize", "`abliterate optimize`"),
        ("heretic", "heretic 1.4.0"),
        ("abliterix", "abliterix 1.12.2"),
    ] {
        let step = load(cx.dir.join(tool).join("step.json")).unwrap_or(Value::Null);
        let embedded = match tool {
            "run" => load(cx.dir.join("run/out/verify/report.json")),
            "optimize" => load(cx.dir.join("optimize/out/verify/report.json")),
            _ => load(v.join(tool).join("report.json")),
        };
        let val = load(v.join(format!("{tool}-val")).join("report.json"));
        let note = match tool {
            "run" => "find's direction, every writer at scale 1".to_string(),
            "optimize" => optimize_note(&cx.dir.join("optimize")).unwrap_or_else(|e| format!("{e:#}")),
            _ => match std::fs::read_to_string(cx.dir.join(tool).join("trials.json")) {
                Ok(text) => {
                    let c = driver_choice(&text).with_context(|| format!("`{tool}/trials.json`"))?;
                    format!(
                        "trial {} of {}: {}/{TRIAL_PROMPTS} refusals, KL {:.4}",
                        c.index, c.trials, c.refusals, c.kl
                    )
                }
                Err(_) if step["failed"] == json!(true) => {
                    let why = std::fs::read_to_string(cx.dir.join(tool).join("failed.txt")).unwrap_or_default();
                    format!("failed: {} (`{tool}/failed.txt`)", why.lines().next().unwrap_or("no failed.txt"))
                }
                Err(_) => "not run".to_string(),
            },
        };
        let seconds = load(cx.dir.join(tool).join("stdout.json")).map_or(Value::Null, |s| s["seconds"].clone());
        rows.push(Row { name: name.to_string(), embedded, val, step, seconds, note });
    }
    let mut t = String::new();
    writeln!(t, "Machine: {}. Load average at end: {}.\n", host::machine(), host::load())?;
    writeln!(
        t,
        "| | harmful refusal, embedded `harmful_eval` (100) | harmful refusal, `splits/harmful_val.json` (39) | \
         harmless refusal, `harmless_eval` (100) | first-token KL (harmless mean) | CE on the original's answers | \
         wall time (without our verify) | peak RSS | chosen trial (its own trial-set numbers) |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|---|---|---|")?;
    let original = rows.iter().find_map(|r| r.embedded.clone());
    if let Some(o) = &original {
        let val_o = rows.iter().find_map(|r| r.val.clone());
        writeln!(
            t,
            "| original | {} | {} | {} | 0 | {} | | | |",
            rate(&o["harmful"]["original"]["refusal"]),
            val_o.as_ref().map_or("—".into(), |v| rate(&v["harmful"]["original"]["refusal"])),
            rate(&o["harmless"]["original"]["refusal"]),
            num(&o["damage"]["ce_original"]["ce"], 3)
        )?;
    }
    for r in &rows {
        let e = r.embedded.as_ref();
        let cell = |f: &dyn Fn(&Value) -> String| e.map_or("—".to_string(), f);
        writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            cell(&|e| rate(&e["harmful"]["edited"]["refusal"])),
            r.val.as_ref().map_or("—".into(), |v| rate(&v["harmful"]["edited"]["refusal"])),
            cell(&|e| rate(&e["harmless"]["edited"]["refusal"])),
            cell(&|e| format!("{} ({} answered)", num(&e["damage"]["kl"], 4), num(&e["damage"]["kl_answered"], 4))),
            cell(&|e| num(&e["damage"]["ce_edited"]["ce"], 3)),
            wall(&r.step, &r.seconds),
            r.step["peak_rss_mb"].as_u64().map_or("—".into(), |m| format!("{m} MB")),
            r.note
        )?;
    }
    Ok(t)
}

/// optimize's choice, from its `--json` summary (`optimize/stdout.json`).
fn optimize_note(step: &Path) -> Result<String> {
    let s = read_json(&step.join("stdout.json"))?;
    let c = &s["chosen"];
    Ok(format!(
        "trial {} (numbered from 0) of {}: {}/{} refusals, KL {}",
        c["trial"],
        s["trials"],
        c["refusals"],
        c["harmful_prompts"],
        num(&c["kl"], 4)
    ))
}

/// The step's wall time; for our commands also without the `verify` they end with (heretic and abliterix
/// do not verify).
fn wall(step: &Value, seconds: &Value) -> String {
    match (step["wall_s"].as_f64(), seconds["verify"].as_f64()) {
        (Some(w), Some(v)) => format!("{w:.0} s ({:.0} s)", w - v),
        (Some(w), None) => format!("{w:.0} s"),
        _ => "—".into(),
    }
}

/// `k/n = rate [low, high]`.
fn rate(r: &Value) -> String {
    match (r["k"].as_u64(), r["n"].as_u64(), r["rate"].as_f64()) {
        (Some(k), Some(n), Some(rate)) => format!(
            "{k}/{n} = {rate:.2} [{:.2}, {:.2}]",
            r["low"].as_f64().unwrap_or(f64::NAN),
            r["high"].as_f64().unwrap_or(f64::NAN)
        ),
        _ => "—".into(),
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.digits$}"))
}

fn sh(script: &str) -> Result<()> {
    if !Command::new("sh").args(["-c", script]).status()?.success() {
        bail!("`{script}` failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_choice_reads_the_marked_trial() {
        let text = r#"{"max_kl": 0.5, "trials": [
            {"index": 1, "refusals": 30, "kl": 0.01, "chosen": false},
            {"index": 2, "refusals": 3, "kl": 0.41, "chosen": true},
            {"index": 3, "refusals": 0, "kl": 0.93, "chosen": false}]}"#;
        assert_eq!(driver_choice(text).unwrap(), Chosen { index: 2, refusals: 3, kl: 0.41, trials: 3 });
    }

    #[test]
    fn driver_choice_names_what_is_missing() {
        let none = r#"{"trials": [{"index": 1, "refusals": 2, "kl": 0.1, "chosen": false}]}"#;
        assert_eq!(driver_choice(none).unwrap_err().to_string(), "no trial is marked chosen");
        let no_kl = r#"{"trials": [{"index": 1, "refusals": 2, "chosen": true}]}"#;
        assert_eq!(driver_choice(no_kl).unwrap_err().to_string(), "the chosen trial has no `kl`");
        assert_eq!(driver_choice("[").unwrap_err().to_string(), "not JSON");
    }

    #[test]
    fn prompts_become_jsonl_text_lines() {
        let jsonl = to_jsonl(r#"[{"instruction": "Say \"hi\"", "category": "x"}, {"instruction": "b"}]"#).unwrap();
        assert_eq!(jsonl, "{\"text\":\"Say \\\"hi\\\"\"}\n{\"text\":\"b\"}\n");
        assert_eq!(to_jsonl(r#"[{"prompt": "a"}]"#).unwrap_err().to_string(), "item 0 has no `instruction` string");
    }
}
