//! `abliterate run MODEL -o OUT`: find -> edit -> verify in one command, everything in OUT:
//!
//! - OUT itself is the edited model (a Hugging Face directory: config, weights, tokenizer, `abliterate.json`)
//!   with a `README.md` model card: the source model and its sha256, the direction's layer and position,
//!   what was edited, the measured rates with intervals, KL, equivalence, the tool version and the exact
//!   command;
//! - `OUT/find/`: the direction, the candidates, the scores, find's report and plots;
//! - `OUT/verify/`: report.json, report.md and refusal.svg.
//!
//! OUT is built in a temporary directory beside it and renamed into place only when everything is written: an
//! interrupted run leaves no half-written model (a killed run's temporary directory is removed by the next run
//! for the same OUT). A model that does not refuse stops at `find` with its message, before anything is
//! written. Options of the three parts pass through; one progress display (a bar per stage) runs throughout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chat::Chat;
use direction::Direction;
use eval::{Formatter, Judge, Split};
use find::{Sampling, SelectOptions, Stage};
use serde_json::json;
use verify::EditRecord;
use verify::measure::{self, Inputs, Subject};
use verify::report::DirectionInfo;

use crate::cmd::edit::EditOptions;
use crate::cmd::verify::{self as verify_cmd, SystemOptions, VerifyOptions};
use crate::progress;
use crate::runtime::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face chat model (config.json, safetensors weights, tokenizer and chat
    /// template).
    model: PathBuf,
    /// Output directory: the edited model with its model card, `find/` and `verify/`. Written beside it as
    /// a temporary directory and renamed when complete.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
    /// Replace OUT if it exists (only after the run has succeeded).
    #[arg(long)]
    force: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,

    #[command(flatten, next_help_heading = "find")]
    find_prompts: crate::cmd::find::PromptFiles,
    /// find: training prompts sampled from each set (the paper's 128).
    #[arg(long, value_name = "N", default_value_t = 128, help_heading = "find")]
    n_train: usize,
    /// find: validation prompts sampled from each set (the paper's 32).
    #[arg(long, value_name = "N", default_value_t = 32, help_heading = "find")]
    n_val: usize,
    /// find: seed of the draws.
    #[arg(long, value_name = "N", default_value_t = 42, conflicts_with = "paper_sampling", help_heading = "find")]
    seed: u64,
    /// find: the paper's exact draws (seed 42; every set must have more than N prompts).
    #[arg(long, help_heading = "find")]
    paper_sampling: bool,
    /// find: discard candidates whose KL score is above this.
    #[arg(long, value_name = "KL", default_value_t = 0.1, help_heading = "find")]
    kl_max: f64,
    /// find: only layers below int(L x F) may be chosen.
    #[arg(long, value_name = "F", default_value_t = 0.8, help_heading = "find")]
    max_layer_fraction: f64,
    /// find: discard candidates whose induce score is below this.
    #[arg(long, value_name = "S", default_value_t = 0.0, allow_negative_numbers = true, help_heading = "find")]
    min_induce: f64,
    /// find: only these positions may be chosen, e.g. `-1`.
    #[arg(long, value_name = "P,...", value_delimiter = ',', allow_negative_numbers = true, help_heading = "find")]
    positions: Option<Vec<i64>>,
    /// find: compute all three scores of every candidate.
    #[arg(long, help_heading = "find")]
    all_scores: bool,
    /// find: drop the induce filter if nothing else passes (reported).
    #[arg(long, help_heading = "find")]
    relax_induce: bool,

    /// Refusal token for find and verify (repeatable; must be one token). Default: detected by find.
    #[arg(long = "refusal-token", value_name = "TOKEN")]
    refusal_tokens: Vec<String>,
    /// Prompts per forward pass (find) and per batch (verify).
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    system: SystemOptions,

    #[command(flatten, next_help_heading = "edit")]
    edit: EditOptions,

    /// verify: harmful evaluation prompts (default: the embedded `harmful_eval`).
    #[arg(long, value_name = "FILE", help_heading = "verify")]
    eval_harmful: Option<PathBuf>,
    /// verify: harmless evaluation prompts (default: the embedded `harmless_eval`).
    #[arg(long, value_name = "FILE", help_heading = "verify")]
    eval_harmless: Option<PathBuf>,
    #[command(flatten, next_help_heading = "verify")]
    verify: VerifyOptions,

    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// One progress display for the whole run: a bar per stage, prefixed with the part.
struct Display {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Display {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<indicatif::ProgressBar>> {
        // A bar is display only: a panic elsewhere while it was held leaves nothing to protect.
        self.bar.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn start(&self, label: &str, total: u64, bytes: bool) {
        let mut bar = self.lock();
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        *bar = Some(progress::bar(total, label, bytes));
    }
    fn set(&self, done: u64) {
        if let Some(b) = &*self.lock() {
            b.set_position(done);
        }
    }
    fn inc(&self, n: u64) {
        if let Some(b) = &*self.lock() {
            b.inc(n);
        }
    }
    fn clear(&self) {
        if let Some(b) = self.lock().take() {
            b.finish_and_clear();
        }
    }
}

impl find::Progress for &Display {
    fn start(&self, stage: Stage, total: u64) {
        Display::start(self, &format!("find {}", stage.name()), total, false);
    }
    fn advance(&self, n: u64) {
        self.inc(n);
    }
    fn finish(&self, _: Stage, _: f64) {
        self.clear();
    }
}

struct EditBar<'a>(&'a Display);

impl edit::Progress for EditBar<'_> {
    fn start(&self, total_bytes: u64) {
        self.0.start("edit", total_bytes, true);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

struct VerifyBar<'a>(&'a Display);

impl measure::Progress for VerifyBar<'_> {
    fn stage(&mut self, name: &str, total: usize) {
        self.0.start(&format!("verify {name}"), total as u64, false);
    }
    fn advance(&mut self, done: usize) {
        self.0.set(done as u64);
    }
}

/// Moves every entry of `from` into `to` (same file system: renames), then removes `from`.
fn move_up(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("reading `{}`", from.display()))? {
        let e = e?;
        let dest = to.join(e.file_name());
        std::fs::rename(e.path(), &dest)
            .with_context(|| format!("moving `{}` into `{}`", e.path().display(), to.display()))?;
    }
    std::fs::remove_dir(from).with_context(|| format!("removing `{}`", from.display()))
}

pub fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    args.runtime.apply_threads()?;
    if args.n_train == 0 || args.n_val == 0 {
        bail!("--n-train and --n-val must be at least 1");
    }
    if args.verify.max_equivalence_error.is_some() && args.edit.norm_preserving {
        bail!("--max-equivalence-error cannot be checked for a --norm-preserving edit (it is not a hook)");
    }
    let target = edit::OutputTarget::check(&args.model, &[], &args.output, args.force)?;
    let sets = args.find_prompts.sets()?;
    let chat = Chat::load(&args.model)?;
    let refusal_tokens = verify_cmd::refusal_token_ids(&chat, &args.refusal_tokens)?;
    let system = args.system.system();
    let display = Display { bar: Mutex::new(None) };
    let model = args.runtime.load(&args.model)?;
    let meta = find::output::Meta::for_checkpoint(model.checkpoint())?;
    let mut seconds = serde_json::Map::new();

    // find: a model that does not refuse stops here, before anything is written.
    let t = Instant::now();
    let find_opts = find::Options {
        n_train: args.n_train,
        n_val: args.n_val,
        sampling: if args.paper_sampling { Sampling::Paper } else { Sampling::Seed { seed: args.seed } },
        system: system.clone(),
        refusal_tokens: refusal_tokens.clone(),
        select: SelectOptions {
            kl_max: args.kl_max,
            max_layer_fraction: args.max_layer_fraction,
            min_induce: args.min_induce,
            positions: args.positions.clone(),
            all_scores: args.all_scores,
            relax_induce: args.relax_induce,
        },
        batch_size: args.batch_size.max(1),
        ..find::Options::default()
    };
    let found = find::find(&model, &chat, &sets, &find_opts, &&display)?;
    display.clear();
    seconds.insert("find".into(), json!(t.elapsed().as_secs_f64()));

    // edit, into the temporary OUT: the model at its top level, find's outputs in find/.
    let t = Instant::now();
    let temp = target.create_temp()?;
    let find_dir = temp.path().join("find");
    find::output::write(&found, &meta, &find_dir, false)?;
    let arch = model.arch();
    let direction = Direction::load(&find_dir.join(find::output::DIRECTION), arch.hidden)?;
    let ckpt = model.checkpoint();
    let plan = edit::plan(ckpt, &args.edit.to_options(arch.layers)?)?;
    let staging = temp.path().join(".edit");
    let edited_report =
        edit::write(ckpt, &plan, &direction, &staging, &edit::WriteOptions { force: false }, &EditBar(&display))?;
    display.clear();
    move_up(&staging, temp.path())?;
    seconds.insert("edit".into(), json!(t.elapsed().as_secs_f64()));

    // verify the edited model in place.
    let t = Instant::now();
    let edited = args.runtime.load(temp.path())?;
    let formatter = Formatter::new(&chat, system)?;
    let judge = match &args.verify.judge {
        Some(f) => Judge::from_file(f)?,
        None => Judge::default(),
    };
    let layer = found.choice.layer;
    let out_name = args.output.display().to_string();
    let inputs = Inputs {
        original: &model,
        original_path: args.model.display().to_string(),
        chat: &chat,
        subject: Subject::Edited {
            model: &edited,
            path: out_name.clone(),
            record: EditRecord::read(temp.path())?.map(Box::new),
        },
        direction: Some(measure::Direction {
            values: direction.values.clone(),
            layer: Some(args.verify.layer.unwrap_or(layer)),
            // Where the direction will be once OUT is in place, not the temporary directory it is read from.
            info: DirectionInfo {
                path: args.output.join("find").join(find::output::DIRECTION).display().to_string(),
                ..verify_cmd::direction_info(&direction, Some(layer))
            },
        }),
        harmful: verify_cmd::eval_set(args.eval_harmful.as_deref(), Split::HarmfulEval, &formatter)?,
        harmless: verify_cmd::eval_set(args.eval_harmless.as_deref(), Split::HarmlessEval, &formatter)?,
        judge: &judge,
        refusal_tokens: Some(found.refusal.ids.clone()),
        settings: json!({
            "system": formatter.system(),
            "template": formatter.template()?,
            "command": std::env::args().collect::<Vec<_>>(),
        }),
        edit_hooks: None,
    };
    let gates = verify_cmd::gates(&args.verify);
    let report = measure::verify(
        &inputs,
        &verify_cmd::measure_options(&args.verify, args.batch_size),
        &gates,
        &mut VerifyBar(&display),
    )?;
    display.clear();
    drop(edited);
    seconds.insert("verify".into(), json!(t.elapsed().as_secs_f64()));
    let verify_dir = temp.path().join("verify");
    std::fs::create_dir(&verify_dir).with_context(|| format!("creating `{}`", verify_dir.display()))?;
    verify_cmd::write_report(&verify_dir, &report)?;
    let card = card::render(&card::Card {
        model: &args.model,
        model_sha256: &meta.model_sha256,
        made_by: "abliterate run",
        direction: card::found_direction(&found, &direction),
        extra: String::new(),
        manifest: &edited_report.manifest,
        report: &report,
    });
    std::fs::write(temp.path().join("README.md"), card).context("writing the model card")?;
    target.commit(temp)?;
    seconds.insert("total".into(), json!(started.elapsed().as_secs_f64()));

    if args.json {
        let v = json!({
            "model": args.model.display().to_string(),
            "output": out_name,
            "model_sha256": meta.model_sha256,
            "direction": {"layer": layer, "position": found.choice.position, "norm": direction.norm(), "sha256": direction.sha256},
            "refusal_tokens": found.refusal.ids,
            "report": report,
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "abliterated `{}` into `{}` in {:.1} s: direction at layer {layer}, position {} (find {:.1} s, edit {:.1} s, verify {:.1} s)",
            args.model.display(),
            args.output.display(),
            started.elapsed().as_secs_f64(),
            found.choice.position,
            seconds["find"].as_f64().unwrap_or(0.0),
            seconds["edit"].as_f64().unwrap_or(0.0),
            seconds["verify"].as_f64().unwrap_or(0.0),
        );
        verify_cmd::print_summary(&report, Some(&args.output.join("verify")));
        println!("  model card: `{}`", args.output.join("README.md").display());
    }
    Ok(if report.gates.iter().all(|g| g.passed) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The model card (`OUT/README.md`; `optimize` writes one for its chosen edit too).
pub(crate) mod card {
    use std::fmt::Write as _;
    use std::path::Path;

    use direction::Direction;
    use serde_json::Value;
    use verify::Report;

    pub struct Card<'a> {
        pub model: &'a Path,
        pub model_sha256: &'a str,
        /// The command that made the model (`abliterate run`).
        pub made_by: &'a str,
        /// The paragraph of "The direction" ([`found_direction`] for `find`'s choice).
        pub direction: String,
        /// Sections (Markdown) after "What was edited": every parameter of a search, for `optimize`.
        pub extra: String,
        pub manifest: &'a Value,
        pub report: &'a Report,
    }

    /// "The direction" of a card for `find`'s chosen candidate.
    pub fn found_direction(found: &find::Found, direction: &Direction) -> String {
        let choice = &found.choice;
        format!(
            "Difference of mean residual-stream activations between harmful and harmless instructions, at the \
             residual entering **layer {} of {}**, **position {}** from the end of the prompt; norm {:.4}; chosen by \
             {}. File: `find/direction.safetensors` (sha256 `{}`); every candidate's scores, the report and the \
             plots are in `find/`.",
            choice.layer,
            found.layers,
            choice.position,
            direction.norm(),
            choice.rule.describe(),
            direction.sha256
        )
    }

    fn rate(r: &verify::Rate) -> String {
        format!("{:.2} [{:.2}, {:.2}] ({}/{})", r.rate, r.low, r.high, r.k, r.n)
    }

    pub fn render(c: &Card<'_>) -> String {
        let mut md = String::new();
        write(&mut md, c).expect("writing to a String cannot fail");
        md
    }

    fn write(md: &mut String, c: &Card<'_>) -> std::fmt::Result {
        let r = c.report;
        let name = c.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        writeln!(md, "---\ntags:\n- abliterate\n- refusal-direction\n- weight-orthogonalization\n---\n")?;
        writeln!(md, "# {name}, with its refusal direction removed\n")?;
        writeln!(
            md,
            "This is `{}` (weights sha256 `{}`) with the direction that mediates its refusals removed from every \
             weight that writes to the residual stream (Arditi et al. 2024, *Refusal in Language Models Is Mediated \
             by a Single Direction*), made by `abliterate` {} with `{}`. It refuses far less often, \
             harmful requests included: use it for research on refusal and safety, not to deploy.\n",
            c.model.display(),
            c.model_sha256,
            env!("CARGO_PKG_VERSION"),
            c.made_by
        )?;
        writeln!(md, "## The direction\n")?;
        writeln!(md, "{}\n", c.direction)?;
        writeln!(md, "## What was edited\n")?;
        let m = c.manifest;
        let edited = m["edited"].as_array().map_or(0, Vec::len);
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for e in m["edited"].as_array().into_iter().flatten() {
            let k = e["kind"].as_str().unwrap_or("?").to_string();
            match kinds.iter_mut().find(|(n, _)| *n == k) {
                Some((_, n)) => *n += 1,
                None => kinds.push((k, 1)),
            }
        }
        writeln!(
            md,
            "{edited} tensors orthogonalized against the direction, `W' = W − s r̂ r̂ᵀ W` (each tensor's scale `s` \
             is in the manifest: 1 unless `--scale` or a layer kernel set it) computed in f64 and rounded once \
             to the stored dtype ({}). {}. Per-tensor ledger, options and the sha256 of every file: \
             `abliterate.json`.\n",
            kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
            m["tie_note"].as_str().unwrap_or("")
        )?;
        md.push_str(&c.extra);
        writeln!(md, "## Measured (`verify/report.md`)\n")?;
        writeln!(
            md,
            "Greedy completions (at most {} new tokens, stopping at end of turn), judged by substring matching; rates \
             with 95% Wilson intervals.\n",
            r.settings["max_new_tokens"]
        )?;
        writeln!(md, "| | original | edited |\n|---|---|---|")?;
        for s in [&r.harmful, &r.harmless] {
            writeln!(
                md,
                "| {} refusal rate ({}, {} prompts) | {} | {} |",
                if s.harmful { "harmful" } else { "harmless" },
                s.source.name,
                s.source.n,
                rate(&s.original.refusal),
                rate(&s.edited.refusal)
            )?;
        }
        if let Some(d) = &r.damage {
            writeln!(md, "| first-token KL(original ‖ edited), harmless prompts, mean | — | {:.4} |", d.kl)?;
            if let Some(k) = d.kl_answered {
                writeln!(
                    md,
                    "| the same, on the {} harmless prompts the original answered | — | {k:.4} |",
                    d.answered
                )?;
            }
            if let (Some(a), Some(b)) = (&d.ce_original, &d.ce_edited) {
                writeln!(md, "| cross-entropy on the original's own harmless answers | {:.4} | {:.4} |", a.ce, b.ce)?;
            }
        }
        if let Some(i) = &r.induced {
            writeln!(
                md,
                "| harmless refusal with the direction added at layer {} (activation addition) | {} | {} |",
                i.layer,
                rate(&r.harmless.original.refusal),
                rate(&i.arm.refusal)
            )?;
        }
        if let Some(eq) = &r.equivalence {
            writeln!(
                md,
                "\nEquivalence to directional ablation (the edited residual stream against the original's under the \
                 ablation hooks): largest relative difference {:.2e} over layers.{}",
                eq.result.max,
                if eq.caveat_notes.is_empty() { String::new() } else { format!(" {}", eq.caveat_notes.join("; ")) }
            )?;
        }
        writeln!(md, "\n## Reproduce\n")?;
        let argv: Vec<String> = r.settings["command"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(shell_word)).collect())
            .unwrap_or_default();
        writeln!(md, "```sh\n{}\n```\n\nabliterate {}.", argv.join(" "), env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }

    /// A word as a POSIX shell would need it quoted.
    fn shell_word(w: &str) -> String {
        if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c)) {
            w.to_string()
        } else {
            format!("'{}'", w.replace('\'', "'\\''"))
        }
    }
}
