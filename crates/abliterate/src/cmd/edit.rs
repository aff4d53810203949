//! `abliterate edit MODEL --direction FILE -o OUT`: write a copy of a checkpoint in which no weight
//! writes the direction into the residual stream (method.md §6). The work is `edit::plan` and
//! `edit::write`; this file only parses options and reports.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use checkpoint::Checkpoint;
use direction::{Candidate, Directions};
use edit::{LayerKernel, LayerSet, Options, OutputTarget, Plan, Profile, Report, Tent, Tie, human_bytes};
use serde_json::{Value, json};

use crate::progress;

/// What an edit removes and where: shared with `abliterate run`, which passes them through.
#[derive(clap::Args, Clone, Debug)]
pub struct EditOptions {
    /// Remove S times the projection: 1 is the paper's edit, between 0 and 1 attenuates,
    /// 2 reflects (docs/method.md §6, scale).
    #[arg(long, value_name = "S", default_value_t = 1.0, allow_negative_numbers = true)]
    pub scale: f64,
    /// Edit only the writers of these decoder layers, e.g. `0-10,12`. The embedding belongs to no
    /// layer and is edited regardless (use --skip-embeddings to leave it).
    #[arg(long, value_name = "RANGE")]
    pub layers: Option<String>,
    /// Leave the token embedding unedited.
    #[arg(long)]
    pub skip_embeddings: bool,
    /// Copy tensors whose name matches this glob unchanged (repeatable). Also the way to accept an
    /// unknown tensor you know does not write to the residual stream. Reported in the manifest.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// With tied embeddings, keep the tie: the edit then also changes the unembedding, so the
    /// model is no longer equivalent to ablation. By default the original embedding is written as
    /// an untied lm_head.weight.
    #[arg(long)]
    pub keep_tie: bool,
    /// Restore the norm of every vector a writer adds to the residual stream after removing the
    /// direction (each column of a weight, each row of the embedding; docs/variants.md).
    #[arg(long)]
    pub norm_preserving: bool,
    /// Layer kernel for the attention output writers: PEAK,POSITION,MIN,WIDTH (heretic's tent: PEAK at
    /// layer POSITION, falling linearly to MIN at distance WIDTH, 0 beyond); multiplies --scale.
    #[arg(long, value_name = "PEAK,POS,MIN,WIDTH", allow_hyphen_values = true)]
    pub kernel_attn: Option<String>,
    /// Layer kernel for the MLP down projections (experts included), as --kernel-attn.
    #[arg(long, value_name = "PEAK,POS,MIN,WIDTH", allow_hyphen_values = true)]
    pub kernel_mlp: Option<String>,
    /// Weight of the embedding's edit (it belongs to no layer); 0 leaves it unedited.
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    pub embedding_weight: Option<f64>,
    /// Layer kernel as an explicit table: JSON {"attn": [w_0, ...], "mlp": [...], "embedding": w}.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel_attn", "kernel_mlp", "embedding_weight"])]
    pub kernel_table: Option<PathBuf>,
}

impl EditOptions {
    /// The library's options for a model of `layers` decoder layers.
    pub fn to_options(&self, layers: usize) -> Result<Options> {
        if let Some(w) = self.embedding_weight.filter(|w| !w.is_finite()) {
            anyhow::bail!("--embedding-weight {w} is not a finite number");
        }
        let tent = |spec: &Option<String>, flag: &str| {
            spec.as_deref().map(|s| Tent::parse(s, flag).map(Profile::Tent)).transpose()
        };
        let kernel = match &self.kernel_table {
            Some(path) => LayerKernel::from_table(path, layers)?,
            None => LayerKernel {
                attn: tent(&self.kernel_attn, "--kernel-attn")?,
                mlp: tent(&self.kernel_mlp, "--kernel-mlp")?,
                embedding: self.embedding_weight,
            },
        };
        Ok(Options {
            scale: self.scale,
            layers: self.layers.as_deref().map(LayerSet::parse).transpose()?,
            skip_embeddings: self.skip_embeddings,
            exclude: self.exclude.clone(),
            keep_tie: self.keep_tie,
            norm_preserving: self.norm_preserving,
            kernel,
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face checkpoint (config.json and safetensors weights).
    model: PathBuf,
    /// Direction file: safetensors with a 1-D `direction` tensor of length hidden_size (any norm); or a
    /// subspace file (`direction` [k, hidden]: remove all k directions, W' = W − V Vᵀ W); or a per-layer
    /// file (`directions` [layers, hidden] or [layers, k, hidden]); see docs/variants.md and
    /// `abliterate direction`.
    #[arg(long, value_name = "FILE")]
    direction: PathBuf,
    /// With a candidates file (`find`'s candidates.safetensors): which candidate to remove, as
    /// POS,LAYER (e.g. `-1,22`: the last prompt token, the residual entering layer 22).
    #[arg(long, value_name = "POS,LAYER", allow_hyphen_values = true)]
    candidate: Option<Candidate>,
    /// Output directory. Written beside it as a temporary directory and renamed when complete.
    #[arg(short = 'o', long = "output", value_name = "OUT", required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    #[command(flatten)]
    edit: EditOptions,
    /// Print the plan (what would be rewritten, added and excluded) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace OUT if it exists (only after the new one is complete).
    #[arg(long)]
    force: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: crate::args::Threads,
}

struct Bar(indicatif::ProgressBar);

impl edit::Progress for Bar {
    fn start(&self, total_bytes: u64) {
        self.0.set_length(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.threads.apply()?;
    let ckpt = Checkpoint::open(&args.model)?;
    let layers = ckpt.config.num_hidden_layers;
    let direction = Directions::open(&args.direction, ckpt.config.hidden_size, layers, args.candidate)?;
    let opts = args.edit.to_options(layers)?;
    let plan = edit::plan(&ckpt, &opts)?;
    for p in plan.patterns.iter().filter(|p| p.matched == 0) {
        eprintln!("warning: --exclude `{}` matched no tensor", p.pattern);
    }
    if args.dry_run {
        if let Some(out) = &args.output {
            let inputs: Vec<PathBuf> = ckpt.shards.iter().map(|s| s.path.clone()).collect();
            OutputTarget::check(&ckpt.dir, &inputs, out, args.force)?;
        }
        if args.json {
            let mut v = edit::manifest::plan_json(&plan);
            v["model"] = json!(args.model.display().to_string());
            v["direction"] = edit::manifest::directions_json(&direction);
            v["dry_run"] = json!(true);
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print_plan(&args, &ckpt, &direction, &plan);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = args.output.clone().expect("clap requires -o without --dry-run");
    let bar = Bar(progress::bar(0, "edit", true));
    let started = Instant::now();
    let report =
        edit::write_directions(&ckpt, &plan, &direction, &out, &edit::WriteOptions { force: args.force }, &bar)?;
    bar.0.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&args, &out, &plan, &report, seconds))?);
    } else {
        print_summary(&args, &out, &ckpt, &plan, &report, seconds);
    }
    Ok(ExitCode::SUCCESS)
}

fn kinds(plan: &Plan) -> String {
    plan.counts_by_kind().iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

fn excluded_summary(plan: &Plan) -> Option<String> {
    if plan.excluded.is_empty() {
        return None;
    }
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for x in &plan.excluded {
        let r = x.reason.to_string();
        match reasons.iter_mut().find(|(k, _)| *k == r) {
            Some((_, n)) => *n += 1,
            None => reasons.push((r, 1)),
        }
    }
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    Some(format!("{} tensor(s) left unedited ({})", plan.excluded.len(), parts.join(", ")))
}

fn print_plan(args: &Args, ckpt: &Checkpoint, direction: &Directions, plan: &Plan) {
    let c = &ckpt.config;
    let what = match &direction.single {
        Some(d) => format!("norm {:.6}", d.norm()),
        None => format!("{}, k = {}", direction.layout.label(), direction.k()),
    };
    println!(
        "plan for `{}` ({}, {} layers, hidden {}) with `{}` ({what}, sha256 {}); nothing written",
        args.model.display(),
        c.family.name(),
        c.num_hidden_layers,
        c.hidden_size,
        args.direction.display(),
        &direction.sha256[..12]
    );
    if plan.options.norm_preserving {
        println!("  norm-preserving: every written vector keeps its norm (docs/variants.md)");
    }
    println!("  rewrite: {} tensors, {} ({})", plan.edits.len(), human_bytes(plan.edit_bytes()), kinds(plan));
    for a in &plan.added {
        println!(
            "  {}: `{}` {} `{}` ({}, a copy of the original `{}`)",
            if a.replaces.is_some() { "replace" } else { "add" },
            a.name,
            if a.replaces.is_some() { "in" } else { "to" },
            a.file,
            human_bytes(a.bytes),
            a.copy_of
        );
    }
    println!("  tie: {}", plan.tie_note());
    if let Some(x) = excluded_summary(plan) {
        println!("  excluded: {x}");
    }
    println!("  unchanged: {} tensors, {} copied bit for bit", plan.unchanged, human_bytes(plan.unchanged_bytes));
    println!("  tensors to rewrite:");
    for e in &plan.edits {
        println!(
            "    {}  {}  {} {:?}  scale {}  against {}",
            e.name,
            e.kind_label(),
            e.dtype,
            e.shape,
            e.scale,
            e.against.label()
        );
    }
    for x in &plan.excluded {
        println!("    {}  excluded by {}", x.name, x.reason);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_summary(args: &Args, out: &std::path::Path, ckpt: &Checkpoint, plan: &Plan, report: &Report, seconds: f64) {
    let total: u64 = ckpt.shards.iter().map(|s| s.len()).sum();
    println!("edited `{}` into `{}` in {seconds:.2} s", args.model.display(), out.display());
    println!(
        "  rewrote {} tensors ({}), {} of {}; {} tensors copied bit for bit",
        plan.edits.len(),
        kinds(plan),
        human_bytes(plan.edit_bytes()),
        human_bytes(total),
        plan.unchanged
    );
    if let Some(worst) = report.worst_ratio() {
        println!(
            "  |r̂ᵀW'|/|r̂ᵀW| after rounding: max {:.2e} (`{}`), median {:.2e}",
            worst.ratio(),
            worst.name,
            median(report.ledger.iter().map(|l| l.ratio()).collect())
        );
    }
    if plan.tie != Tie::NotTied {
        println!("  {}", plan.tie_note());
    }
    if let Some(x) = excluded_summary(plan) {
        println!("  excluded: {x}");
    }
    if !report.not_copied.is_empty() {
        println!("  not copied (weights in another format): {}", report.not_copied.join(", "));
    }
    println!("  manifest: `{}` (sha256 of every file, options, per-tensor ledger)", out.join(edit::MANIFEST).display());
}

fn summary_json(args: &Args, out: &std::path::Path, plan: &Plan, report: &Report, seconds: f64) -> Value {
    let worst = report.worst_ratio();
    json!({
        "model": args.model.display().to_string(),
        "output": out.display().to_string(),
        "manifest": out.join(edit::MANIFEST).display().to_string(),
        "direction_sha256": report.manifest["direction"]["sha256"],
        "edited_tensors": plan.edits.len(),
        "edited_bytes": plan.edit_bytes(),
        "edited_by_kind": plan.counts_by_kind().into_iter().map(|(k, n)| (k, json!(n))).collect::<serde_json::Map<_, _>>(),
        "unchanged_tensors": plan.unchanged,
        "added": report.manifest["added"],
        "excluded": report.manifest["excluded"],
        "tie": report.manifest["tie"],
        "tie_note": report.manifest["tie_note"],
        "bytes_written": report.bytes_written,
        "max_ratio": worst.map(|l| l.ratio()),
        "max_ratio_tensor": worst.map(|l| l.name.clone()),
        "not_copied": report.not_copied,
        "seconds": seconds,
        "ledger": report.ledger.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
    })
}
