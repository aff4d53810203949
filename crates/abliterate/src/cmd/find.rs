//! `abliterate find MODEL -o OUT`: find the refusal direction of a chat model as Arditi et al. do
//! (method.md §2-§5) and write it with its candidates, scores, report and plots. The work is
//! `find::find` and `find::output::write`; this file parses options, shows progress and reports.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Result, bail};
use chat::Chat;
use eval::System;
use find::{Options, Sampling, SelectOptions, Sets, Stage};
use serde_json::json;

use crate::progress;
use crate::runtime::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face chat model (config.json, safetensors weights, tokenizer and
    /// chat template).
    model: PathBuf,
    /// Output directory (direction.safetensors, candidates.safetensors, scores.json, report.md, plots).
    /// Written beside it as a temporary directory and renamed when complete.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
    #[command(flatten)]
    find_prompts: PromptFiles,
    /// Training prompts sampled from each set (the paper's 128).
    #[arg(long, value_name = "N", default_value_t = 128)]
    n_train: usize,
    /// Validation prompts sampled from each set (the paper's 32).
    #[arg(long, value_name = "N", default_value_t = 32)]
    n_val: usize,
    /// Seed of the draws (CPython's random.seed + random.sample; a set no larger than N is used whole).
    #[arg(long, value_name = "N", default_value_t = 42, conflicts_with = "paper_sampling")]
    seed: u64,
    /// Reproduce the paper's exact draws (seed 42; every set must have more than N prompts).
    #[arg(long)]
    paper_sampling: bool,
    /// A system prompt for every prompt (default: the template's own default, if it has one).
    #[arg(long, value_name = "TEXT", conflicts_with = "no_system")]
    system: Option<String>,
    /// No system turn at all: a default system prompt that the template inserts is removed.
    #[arg(long)]
    no_system: bool,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Refusal token as text (must encode to one token, e.g. `I`); repeatable. Default: detected.
    #[arg(long, value_name = "TEXT")]
    refusal_token: Vec<String>,
    /// Refusal token as an id; repeatable.
    #[arg(long, value_name = "ID")]
    refusal_token_id: Vec<u32>,
    /// Discard candidates whose KL score is above this (method.md §5).
    #[arg(long, value_name = "KL", default_value_t = 0.1)]
    kl_max: f64,
    /// Only layers below int(L x F) may be chosen (the paper prunes the last 20%).
    #[arg(long, value_name = "F", default_value_t = 0.8)]
    max_layer_fraction: f64,
    /// Discard candidates whose induce score is below this.
    #[arg(long, value_name = "S", default_value_t = 0.0, allow_negative_numbers = true)]
    min_induce: f64,
    /// Only these positions may be chosen, e.g. `-1` or `-5,-1` (default: every post-instruction position).
    #[arg(long, value_name = "P,...", value_delimiter = ',', allow_negative_numbers = true)]
    positions: Option<Vec<i64>>,
    /// Keep every sampled prompt (the repo's filter_train=False, filter_val=False): for a model that does
    /// not refuse with its refusal token; the barely-refusing stop does not apply.
    #[arg(long)]
    no_filter: bool,
    /// Compute all three scores of every candidate (for the report and plots), not only what the
    /// choice needs.
    #[arg(long)]
    all_scores: bool,
    /// If no candidate passes and none has a non-negative induce score, drop the induce filter
    /// (method.md §5's optional relaxation; reported).
    #[arg(long)]
    relax_induce: bool,
    /// Prompts per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Replace OUT if it exists (only after find has succeeded).
    #[arg(long)]
    force: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

/// One bar per stage, on stderr when it is a terminal.
struct Bars(RefCell<Option<indicatif::ProgressBar>>);

impl find::Progress for Bars {
    fn start(&self, stage: Stage, total: u64) {
        if let Some(b) = self.0.borrow_mut().take() {
            b.finish_and_clear();
        }
        *self.0.borrow_mut() = Some(progress::bar(total, stage.name(), false));
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &*self.0.borrow() {
            b.inc(n);
        }
    }
    fn finish(&self, _: Stage, _: f64) {
        if let Some(b) = self.0.borrow_mut().take() {
            b.finish_and_clear();
        }
    }
}

/// find's four prompt sets as files, each replacing its embedded default; `find`, `run` and `optimize` share
/// them (flattened under a "find" heading where the command does more than find).
#[derive(clap::Args)]
pub struct PromptFiles {
    /// Harmful training prompts (JSON, JSONL, CSV or text, one per line; field `instruction`, `prompt`,
    /// `goal` or `text`). Default: the embedded set.
    #[arg(long, value_name = "FILE")]
    pub harmful: Option<PathBuf>,
    /// Harmless training prompts. Default: the embedded set.
    #[arg(long, value_name = "FILE")]
    pub harmless: Option<PathBuf>,
    /// Harmful validation prompts. Default: the embedded set.
    #[arg(long, value_name = "FILE")]
    pub harmful_val: Option<PathBuf>,
    /// Harmless validation prompts. Default: the embedded set.
    #[arg(long, value_name = "FILE")]
    pub harmless_val: Option<PathBuf>,
}

impl PromptFiles {
    /// The embedded prompt sets, with each set given as a file read instead.
    pub fn sets(&self) -> Result<Sets> {
        let mut sets = Sets::embedded();
        for (file, slot) in [
            (&self.harmful, &mut sets.harmful_train),
            (&self.harmless, &mut sets.harmless_train),
            (&self.harmful_val, &mut sets.harmful_val),
            (&self.harmless_val, &mut sets.harmless_val),
        ] {
            if let Some(path) = file {
                *slot = eval::prompts::read(path)?;
            }
        }
        Ok(sets)
    }
}

fn refusal_ids(args: &Args, chat: &Chat) -> Result<Option<Vec<u32>>> {
    let mut ids = args.refusal_token_id.clone();
    for text in &args.refusal_token {
        match chat.encode(text)?.as_slice() {
            [id] => ids.push(*id),
            other => bail!(
                "--refusal-token {text:?} encodes to {} tokens {other:?}; a refusal token must be exactly one token \
                 (e.g. `I`, without a leading space at the start of the reply), or pass its id with --refusal-token-id",
                other.len()
            ),
        }
    }
    Ok((!ids.is_empty()).then_some(ids))
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.runtime.apply_threads()?;
    if args.n_train == 0 || args.n_val == 0 {
        bail!("--n-train and --n-val must be at least 1");
    }
    if !(args.max_layer_fraction > 0.0 && args.max_layer_fraction <= 1.0) {
        bail!("--max-layer-fraction {} must be in (0, 1]", args.max_layer_fraction);
    }
    if !args.kl_max.is_finite() || !args.min_induce.is_finite() {
        bail!("--kl-max and --min-induce must be finite numbers");
    }
    find::output::check(&args.model, &args.output, args.force)?;
    let sets = args.find_prompts.sets()?;
    let chat = match &args.template {
        Some(t) => {
            Chat::load_with(&args.model, &chat::Options { template_file: Some(t.clone()), ..Default::default() })
        }
        None => Chat::load(&args.model),
    }?;
    let refusal_tokens = refusal_ids(&args, &chat)?;
    let started = Instant::now();
    let model = args.runtime.load(&args.model)?;
    let meta = find::output::Meta::for_checkpoint(model.checkpoint())?;
    let load_seconds = started.elapsed().as_secs_f64();
    let opts = Options {
        n_train: args.n_train,
        n_val: args.n_val,
        sampling: if args.paper_sampling { Sampling::Paper } else { Sampling::Seed { seed: args.seed } },
        system: match (&args.system, args.no_system) {
            (Some(t), _) => System::Text(t.clone()),
            (None, true) => System::None,
            (None, false) => System::TemplateDefault,
        },
        refusal_tokens,
        select: SelectOptions {
            kl_max: args.kl_max,
            max_layer_fraction: args.max_layer_fraction,
            min_induce: args.min_induce,
            positions: args.positions.clone(),
            all_scores: args.all_scores,
            relax_induce: args.relax_induce,
        },
        batch_size: args.batch_size.max(1),
        filter: !args.no_filter,
        ..Options::default()
    };
    let bars = Bars(RefCell::new(None));
    let found = find::find(&model, &chat, &sets, &opts, &bars)?;
    find::output::write(&found, &meta, &args.output, args.force)?;
    let seconds = started.elapsed().as_secs_f64();
    let c = found.chosen();
    let counts: Vec<(&str, usize, usize)> = found
        .kept
        .as_array()
        .into_iter()
        .zip(found.filter_scores.as_array())
        .map(|((n, k), (_, s))| (n, k.len(), s.len()))
        .collect();
    if args.json {
        let v = json!({
            "model": args.model.display().to_string(),
            "output": args.output.display().to_string(),
            "direction": args.output.join(find::output::DIRECTION).display().to_string(),
            "position": c.position,
            "layer": c.layer,
            "bypass_score": c.bypass,
            "induce_score": c.induce,
            "kl_score": c.kl,
            "norm": c.norm,
            "rule": found.choice.rule,
            "fallback_used": found.choice.rule != find::Rule::Filter,
            "margins": found.choice.margins,
            "refusal_tokens": found.refusal.ids,
            "refusal_token_texts": found.refusal.texts,
            "refusal_tokens_detected": found.refusal.detected.is_some(),
            "counts": counts.iter().map(|(n, k, s)| (n.to_string(), json!({"kept": k, "sampled": s}))).collect::<serde_json::Map<_, _>>(),
            "baseline_refusal_score": {"harmful_val": found.baseline_harmful_val, "harmless_val": found.baseline_harmless_val},
            "model_sha256": meta.model_sha256,
            "load_seconds": load_seconds,
            "seconds": seconds,
            "timings": found.timings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "found the refusal direction of `{}` in {seconds:.1} s: position {} ({:?}), layer {} of {}, norm {:.3}",
        args.model.display(),
        c.position,
        found
            .post_instruction_text
            .get(found.positions.iter().position(|&p| p == c.position).unwrap_or(0))
            .cloned()
            .unwrap_or_default(),
        c.layer,
        found.layers,
        c.norm
    );
    let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    println!(
        "  bypass {} (baseline {:.4}), induce {} (baseline {:.4}), KL {}",
        opt(c.bypass),
        found.baseline_harmful_val,
        opt(c.induce),
        found.baseline_harmless_val,
        opt(c.kl)
    );
    println!("  chosen by {}", found.choice.rule.describe());
    println!(
        "  refusal token{} {} ({})",
        if found.refusal.ids.len() == 1 { "" } else { "s" },
        found
            .refusal
            .ids
            .iter()
            .zip(&found.refusal.texts)
            .map(|(i, t)| format!("{t:?} = {i}"))
            .collect::<Vec<_>>()
            .join(", "),
        if found.refusal.detected.is_some() { "detected" } else { "given" }
    );
    println!(
        "  kept by the filter: {}",
        counts.iter().map(|(n, k, s)| format!("{n} {k}/{s}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  time: {}",
        found.timings.iter().map(|t| format!("{} {:.1} s", t.stage.name(), t.seconds)).collect::<Vec<_>>().join(", ")
    );
    println!("  wrote `{}` (direction, candidates, scores.json, report.md, plots)", args.output.display());
    println!(
        "  next: abliterate edit {} --direction {} -o EDITED",
        args.model.display(),
        args.output.join(find::output::DIRECTION).display()
    );
    Ok(ExitCode::SUCCESS)
}
