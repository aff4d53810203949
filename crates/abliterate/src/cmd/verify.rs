//! `abliterate verify ORIGINAL [EDITED] --direction FILE`: what an edit did, measured (method.md §7-§8):
//! refusal and over-refusal rates with Wilson intervals, refusal scores, first-token KL, cross-entropy on
//! the original's own answers, equivalence of the checkpoint to the hooks it claims to be, and refusal
//! induced by adding the direction. Without EDITED it previews the direction on hooks alone. Gates make it a
//! CI check (exit 1 naming the gate, the value and the threshold). The work is `verify::measure`; this file
//! parses options, shows progress and writes the report (`-o DIR`: report.json, report.md, refusal.svg).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chat::Chat;
use direction::{Candidate, Direction, Directions};
use eval::{Formatter, Judge, PromptSet, Split, System};
use verify::measure::{self, Inputs, Set, Subject};
use verify::report::DirectionInfo;
use verify::{EditRecord, Gates, Report};

use crate::progress;
use crate::runtime::RuntimeArgs;

/// What verify measures and how: shared with `abliterate run`, which passes them through.
#[derive(clap::Args, Clone, Debug)]
pub struct VerifyOptions {
    /// Stop each greedy completion after this many new tokens (it also stops at end of turn).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// The refusal judge's phrases: one per line (`#` comments); default: the documented list of `eval`.
    #[arg(long, value_name = "FILE")]
    pub judge: Option<PathBuf>,
    /// The layer for the induced-refusal check (default: the direction file's `layer`).
    #[arg(long, value_name = "L")]
    pub layer: Option<usize>,
    /// Coefficient of the direction added for the induced-refusal check.
    #[arg(long, value_name = "C", default_value_t = 1.0, allow_negative_numbers = true)]
    pub coeff: f64,
    /// Skip the induced-refusal check.
    #[arg(long)]
    pub no_induce: bool,
    /// Skip the cross-entropy on the original's harmless completions.
    #[arg(long)]
    pub no_cross_entropy: bool,
    /// Prompts of each set (the first ones) for the equivalence check.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub equivalence_prompts: usize,
    /// Gate: fail (exit 1) if the edited model's harmful refusal rate is above this.
    #[arg(long, value_name = "RATE")]
    pub max_harmful_refusal: Option<f64>,
    /// Gate: fail if the edited model's harmless refusal rate (over-refusal) is above this.
    #[arg(long, value_name = "RATE")]
    pub max_harmless_refusal: Option<f64>,
    /// Gate: fail if the mean first-token KL(original ‖ edited) on the harmless prompts is above this.
    #[arg(long, value_name = "KL")]
    pub max_kl: Option<f64>,
    /// Gate: fail if the equivalence error (the largest relative residual difference over layers) is
    /// above this.
    #[arg(long, value_name = "ERR")]
    pub max_equivalence_error: Option<f64>,
}

/// The chat formatting options verify shares with find.
#[derive(clap::Args, Clone, Debug)]
pub struct SystemOptions {
    /// A system prompt for every prompt (default: the template's own default, if it adds one).
    #[arg(long, value_name = "TEXT", conflicts_with = "no_system")]
    pub system: Option<String>,
    /// No system turn at all (a template's default system prompt is removed).
    #[arg(long)]
    pub no_system: bool,
}

impl SystemOptions {
    pub fn system(&self) -> System {
        match (&self.system, self.no_system) {
            (Some(t), _) => System::Text(t.clone()),
            (None, true) => System::None,
            (None, false) => System::TemplateDefault,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The original model directory.
    original: PathBuf,
    /// The edited model directory. Without it, --direction is previewed on hooks alone (the original
    /// model with the direction ablated everywhere).
    edited: Option<PathBuf>,
    /// The direction (for equivalence and induced refusal; required without EDITED). With EDITED from
    /// `abliterate edit`, its sha256 must match the one the edit recorded.
    #[arg(long, value_name = "FILE")]
    direction: Option<PathBuf>,
    /// With a candidates file for --direction: which candidate, as POS,LAYER (e.g. `-1,22`).
    #[arg(long, value_name = "POS,LAYER", requires = "direction")]
    candidate: Option<Candidate>,
    #[command(flatten)]
    system: SystemOptions,
    /// Harmful evaluation prompts (JSON, JSONL, CSV or text; default: the embedded `harmful_eval`, 100
    /// prompts in 10 categories).
    #[arg(long, value_name = "FILE")]
    harmful: Option<PathBuf>,
    /// Harmless evaluation prompts (default: the embedded `harmless_eval`, 100 prompts).
    #[arg(long, value_name = "FILE")]
    harmless: Option<PathBuf>,
    /// Refusal token for the refusal score (repeatable; a token string such as `I`, which must be one
    /// token). Default: the direction file's, else detected from the original's first tokens.
    #[arg(long = "refusal-token", value_name = "TOKEN")]
    refusal_tokens: Vec<String>,
    /// Prompts per forward pass and per generation batch.
    #[arg(long, value_name = "N", default_value_t = 64)]
    batch_size: usize,
    #[command(flatten)]
    opts: VerifyOptions,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Write report.json, report.md and refusal.svg into this directory (created atomically).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: Option<PathBuf>,
    /// Replace DIR if it exists (only once the new report is complete).
    #[arg(long, requires = "output")]
    force: bool,
    /// Print the report as JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Progress bars per stage on stderr (only on a terminal).
pub struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl Bars {
    pub fn new() -> Bars {
        Bars { bar: None }
    }
}

impl measure::Progress for Bars {
    fn stage(&mut self, name: &str, total: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.bar = Some(progress::bar(total as u64, name, false));
    }
    fn advance(&mut self, done: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A prompt set from a file or the embedded default.
pub fn prompt_set(file: Option<&Path>, split: Split) -> Result<PromptSet> {
    match file {
        Some(f) => {
            let set = eval::prompts::read(f)?;
            if set.is_empty() {
                bail!("prompt file `{}` has no prompts", f.display());
            }
            Ok(set)
        }
        None => Ok(eval::prompts::embedded(split)),
    }
}

/// [`prompt_set`], chat-formatted: what `verify::measure` takes for each of its two sets.
pub fn eval_set(file: Option<&Path>, split: Split, formatter: &Formatter<'_>) -> Result<Set> {
    let prompts = prompt_set(file, split)?;
    let ids = formatter.all(&prompts.instructions())?;
    Ok(Set { prompts, ids })
}

/// Refusal token strings as ids: each must encode to exactly one token.
pub fn refusal_token_ids(chat: &Chat, tokens: &[String]) -> Result<Option<Vec<u32>>> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut ids = Vec::new();
    for t in tokens {
        let enc = chat.encode(t)?;
        match enc.as_slice() {
            [id] => ids.push(*id),
            _ => bail!("--refusal-token `{t}` is {} tokens ({enc:?}) for this tokenizer; give one token", enc.len()),
        }
    }
    Ok(Some(ids))
}

/// A direction's layer: the option, else its `layer` metadata.
pub fn direction_layer(d: &Direction, option: Option<usize>, layers: usize) -> Result<Option<usize>> {
    let layer = match option {
        Some(l) => Some(l),
        None => match d.meta("layer") {
            Some(m) => Some(m.parse().with_context(|| {
                format!(
                    "direction file `{}`: metadata `layer` is `{m}`, not a layer index; pass --layer",
                    d.path.display()
                )
            })?),
            None => None,
        },
    };
    if let Some(l) = layer.filter(|&l| l >= layers) {
        bail!("--layer {l} is out of range: the model has {layers} layers (0..={})", layers - 1);
    }
    Ok(layer)
}

/// `DirectionInfo` for reports.
pub fn direction_info(d: &Direction, layer: Option<usize>) -> DirectionInfo {
    DirectionInfo {
        path: d.path.display().to_string(),
        sha256: d.sha256.clone(),
        norm: d.norm(),
        layer,
        position: d.meta("position").and_then(|p| p.parse().ok()),
    }
}

/// Refusal tokens recorded in a direction file by `find` (`refusal_tokens`, a JSON list of ids).
pub fn recorded_refusal_tokens(d: &Direction) -> Option<Vec<u32>> {
    let v: serde_json::Value = serde_json::from_str(d.meta("refusal_tokens")?).ok()?;
    v.as_array()?.iter().map(|x| x.as_u64().map(|t| t as u32)).collect()
}

pub fn gates(o: &VerifyOptions) -> Gates {
    Gates {
        max_harmful_refusal: o.max_harmful_refusal,
        max_harmless_refusal: o.max_harmless_refusal,
        max_kl: o.max_kl,
        max_equivalence_error: o.max_equivalence_error,
    }
}

pub fn measure_options(o: &VerifyOptions, batch_size: usize) -> measure::Options {
    measure::Options {
        max_new_tokens: o.max_new_tokens,
        batch_size,
        equivalence_prompts: o.equivalence_prompts,
        cross_entropy: !o.no_cross_entropy,
        induce: !o.no_induce,
        coeff: o.coeff,
    }
}

/// Writes report.json, report.md and refusal.svg into `dir`.
pub fn write_report(dir: &Path, report: &Report) -> Result<()> {
    let w = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing `{}`", dir.join(name).display()))
    };
    w("report.json", &(serde_json::to_string_pretty(report)? + "\n"))?;
    w("report.md", &report.markdown())?;
    w("refusal.svg", &report.chart())
}

pub fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    args.runtime.apply_threads()?;
    if args.edited.is_none() && args.direction.is_none() {
        bail!(
            "give the edited model (abliterate verify ORIGINAL EDITED), or --direction FILE to preview a direction on hooks"
        );
    }
    if args.edited.is_none() && args.opts.max_equivalence_error.is_some() {
        bail!("--max-equivalence-error needs an edited model: a preview on hooks has nothing to compare");
    }
    let target = match &args.output {
        Some(out) => {
            let inputs: Vec<PathBuf> = args.edited.iter().cloned().collect();
            Some(edit::OutputTarget::check(&args.original, &inputs, out, args.force)?)
        }
        None => None,
    };
    let chat = Chat::load(&args.original)?;
    let formatter = Formatter::new(&chat, args.system.system())?;
    let harmful = eval_set(args.harmful.as_deref(), Split::HarmfulEval, &formatter)?;
    let harmless = eval_set(args.harmless.as_deref(), Split::HarmlessEval, &formatter)?;
    let judge = match &args.opts.judge {
        Some(f) => Judge::from_file(f)?,
        None => Judge::default(),
    };
    let original = args.runtime.load(&args.original)?;
    let arch = original.arch();
    let edited = args.edited.as_deref().map(|e| args.runtime.load(e)).transpose()?;
    let record = args.edited.as_deref().map(EditRecord::read).transpose()?.flatten();
    // Any direction-like file: a per-layer or subspace one serves the equivalence check of the edit made
    // with it; measures that need one direction (induced refusal, a preview on hooks) take a single one.
    let directions =
        args.direction.as_deref().map(|p| Directions::open(p, arch.hidden, arch.layers, args.candidate)).transpose()?;
    let direction = match &directions {
        Some(ds) if ds.single.is_none() && edited.is_none() => bail!(
            "direction file `{}` holds {} directions: a preview on hooks needs one direction",
            ds.path.display(),
            ds.layout.label()
        ),
        Some(ds) => ds.single.clone(),
        None => None,
    };
    if let (Some(r), Some(d)) = (&record, &directions)
        && r.direction_sha256 != d.sha256
    {
        bail!(
            "direction `{}` (sha256 {}) is not the one `{}` was edited with (sha256 {}, recorded in {})",
            d.path.display(),
            &d.sha256[..12],
            args.edited.as_ref().expect("a record comes from EDITED").display(),
            &r.direction_sha256[..12.min(r.direction_sha256.len())],
            r.path.display()
        );
    }
    let layer = direction.as_ref().map(|d| direction_layer(d, args.opts.layer, arch.layers)).transpose()?.flatten();
    let refusal_tokens = match refusal_token_ids(&chat, &args.refusal_tokens)? {
        Some(ids) => Some(ids),
        None => direction.as_ref().and_then(recorded_refusal_tokens),
    };
    // An edit that one direction and one scale cannot state (a layer kernel, several directions, a
    // norm-preserving edit) is compared with its own hooks, rebuilt from its manifest.
    let edit_hooks = match (&record, &directions) {
        (Some(r), Some(ds)) if r.is_variant() => Some(r.hooks(original.checkpoint(), ds)?),
        _ => None,
    };
    let subject = match (&edited, &args.edited) {
        (Some(model), Some(path)) => {
            Subject::Edited { model, path: path.display().to_string(), record: record.map(Box::new) }
        }
        _ => Subject::Hooks,
    };
    let inputs = Inputs {
        original: &original,
        original_path: args.original.display().to_string(),
        chat: &chat,
        subject,
        direction: direction.as_ref().map(|d| measure::Direction {
            values: d.values.clone(),
            layer,
            info: direction_info(d, layer),
        }),
        harmful,
        harmless,
        judge: &judge,
        refusal_tokens,
        settings: serde_json::json!({
            "system": formatter.system(),
            "template": formatter.template()?,
            "command": std::env::args().collect::<Vec<_>>(),
        }),
        edit_hooks,
    };
    let gates = gates(&args.opts);
    let mut bars = Bars::new();
    let mut report = measure::verify(&inputs, &measure_options(&args.opts, args.batch_size), &gates, &mut bars)?;
    drop(bars);
    report.seconds.insert("total".into(), started.elapsed().as_secs_f64());
    if let Some(target) = target {
        let temp = target.create_temp()?;
        write_report(temp.path(), &report)?;
        target.commit(temp)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report, args.output.as_deref());
    }
    Ok(if report.gates.iter().all(|g| g.passed) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn rate(r: &verify::Rate) -> String {
    format!("{:.2} [{:.2}, {:.2}]", r.rate, r.low, r.high)
}

/// The human summary (stdout), gate failures last.
pub fn print_summary(r: &Report, out: Option<&Path>) {
    match &r.edited {
        Some(e) => {
            println!("verified `{e}` against `{}` in {:.1} s", r.original, r.seconds.get("total").unwrap_or(&0.0))
        }
        None => println!(
            "previewed the direction on `{}` with ablation hooks in {:.1} s",
            r.original,
            r.seconds.get("total").unwrap_or(&0.0)
        ),
    }
    let e = r.edited_label();
    for s in [&r.harmful, &r.harmless] {
        println!(
            "  {} refusal ({}, {} prompts): original {} -> {e} {}",
            if s.harmful { "harmful" } else { "harmless" },
            s.source.name,
            s.source.n,
            rate(&s.original.refusal),
            rate(&s.edited.refusal)
        );
    }
    let score = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
    println!(
        "  mean refusal score: harmful {} -> {}, harmless {} -> {}",
        score(r.harmful.original.mean_score),
        score(r.harmful.edited.mean_score),
        score(r.harmless.original.mean_score),
        score(r.harmless.edited.mean_score)
    );
    if let Some(d) = &r.damage {
        let answered = d
            .kl_answered
            .map_or(String::new(), |k| format!("; mean {k:.4} on the {} the original answered", d.answered));
        println!("  first-token KL(original ‖ {e}), harmless: mean {:.4}, max {:.4}{answered}", d.kl, d.kl_max);
        if let (Some(a), Some(b)) = (&d.ce_original, &d.ce_edited) {
            println!(
                "  cross-entropy on the original's harmless completions: {:.4} -> {:.4} ({} tokens)",
                a.ce, b.ce, a.tokens
            );
        }
    }
    if let Some(i) = &r.induced {
        println!("  induced refusal, harmless + {:+} r at layer {}: {}", i.coeff, i.layer, rate(&i.arm.refusal));
    }
    if let Some(eq) = &r.equivalence {
        let q = &eq.result;
        let split = match (&q.along_direction, &q.besides_direction) {
            (Some(a), Some(b)) => format!(
                " (along r̂ {:.2e}, besides r̂ {:.2e})",
                a.iter().copied().fold(0f64, f64::max),
                b.iter().copied().fold(0f64, f64::max)
            ),
            _ => String::new(),
        };
        println!(
            "  equivalence to the hooks: max {:.2e} at {}{split}; logits {:.2e}",
            q.max,
            verify::report::layer_name(q.worst_layer, q.per_layer.len()),
            q.logits_rel
        );
        for n in &eq.caveat_notes {
            println!("    note: {n}");
        }
    }
    if let Some(o) = out {
        println!("  report: `{}` (report.json, refusal.svg)", o.join("report.md").display());
    }
    for g in &r.gates {
        println!("  gate {}: {}", if g.passed { "passed" } else { "FAILED" }, g.describe());
    }
}
