//! `abliterate optimize MODEL -o OUT`: a seeded multi-objective search over the direction and the edit's
//! variants (crates/optimize, docs/optimize.md), each trial measured with hooks; then the chosen trial is
//! edited and verified. OUT holds:
//!
//! - `find/`: `find`'s outputs (its candidates are what the direction index interpolates);
//! - `settings.json`, `trials.jsonl`: the search, resumed by running the same command again;
//! - `report.md`, `pareto.svg`: the Pareto front and the choice;
//! - `chosen/direction.safetensors`, `chosen/kernel.json`: the chosen edit as the files `abliterate edit`
//!   reads (`--direction`, `--kernel-table`);
//! - `model/`: the edited model with its model card (`README.md`), `verify/`: its verification.
//!
//! Progress (a bar and each new front) goes to stderr only when it is a terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chat::Chat;
use direction::{Candidates, Direction, Directions};
use eval::{Formatter, Judge, Split};
use find::{Sampling, SelectOptions};
use optimize::store::{self, Trial};
use optimize::{EvalOptions, Evaluator, Score, Space, tpe};
use serde_json::{Value, json};
use verify::EditRecord;
use verify::measure::{self, Inputs, Subject};

use crate::cmd::run::card;
use crate::cmd::verify::{self as verify_cmd, SystemOptions};
use crate::progress;
use crate::runtime::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face chat model.
    model: PathBuf,
    /// Output directory (see `docs/optimize.md`); running the same command again resumes the search.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
    /// Trials in all (a resumed search runs the missing ones; more than before extends it).
    #[arg(long, value_name = "N", default_value_t = 40)]
    trials: usize,
    /// Uniform trials before TPE takes over.
    #[arg(long, value_name = "N", default_value_t = 10)]
    startup: usize,
    /// Seed of the sampler (and of find's draws).
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Choice rule: the fewest refusals among trials with first-token KL at most this, then the smallest KL.
    #[arg(long, value_name = "KL", default_value_t = 0.1, allow_negative_numbers = true)]
    max_kl: f64,
    /// Generation length of the judged completions, in trials and in verify (late refusals appear after 64+
    /// tokens).
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten, next_help_heading = "find")]
    find_prompts: crate::cmd::find::PromptFiles,
    /// find: the paper's exact draws (seed 42) instead of --seed.
    #[arg(long, help_heading = "find")]
    paper_sampling: bool,
    /// Harmful prompts of each trial: the first N of --trial-harmful.
    #[arg(long, value_name = "N", default_value_t = 32)]
    prompts: usize,
    /// Harmful prompts for the trials (default: the embedded `harmful_val`).
    #[arg(long, value_name = "FILE")]
    trial_harmful: Option<PathBuf>,
    /// Harmless prompts for the trials' KL (default: the embedded `harmless_val`; the first --prompts).
    #[arg(long, value_name = "FILE")]
    trial_harmless: Option<PathBuf>,
    /// verify: harmful evaluation prompts (default: the embedded `harmful_eval`).
    #[arg(long, value_name = "FILE")]
    eval_harmful: Option<PathBuf>,
    /// verify: harmless evaluation prompts (default: the embedded `harmless_eval`).
    #[arg(long, value_name = "FILE")]
    eval_harmless: Option<PathBuf>,
    /// The refusal judge's phrases (one per line); default: the documented list of `eval`.
    #[arg(long, value_name = "FILE")]
    judge: Option<PathBuf>,
    /// The projected direction variant (each of find's candidates without its component along the harmless
    /// mean of its site, heretic's `orthogonalize_direction`): off, on for every trial, or search (a twelfth
    /// parameter).
    #[arg(long, value_name = "off|on|search", default_value = "off")]
    projected: optimize::Projection,
    /// Prompts per forward pass or generation batch.
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch_size: usize,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    system: SystemOptions,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Points sampled from the good-set estimator per TPE proposal (hyperopt's and Optuna's 24).
const EI_CANDIDATES: usize = 24;

fn check(args: &Args) -> Result<()> {
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    if args.prompts == 0 {
        bail!("--prompts must be at least 1");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if !args.max_kl.is_finite() || args.max_kl < 0.0 {
        bail!("--max-kl {} must be a finite number >= 0", args.max_kl);
    }
    Ok(())
}

fn front_line(trials: &[Trial]) -> String {
    let scores: Vec<Score> = trials.iter().map(Trial::score).collect();
    let f = optimize::front(&scores);
    f.iter()
        .map(|&i| {
            format!("#{} {}/{} KL {:.4}", trials[i].number, trials[i].refusals, trials[i].n_harmful, trials[i].kl)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    check(&args)?;
    args.runtime.apply_threads()?;
    let out = args.output.clone();
    edit::OutputTarget::check(&args.model, &[], &out, true)?;
    let resuming = store::check_out(&out)?;
    let chat = Chat::load(&args.model)?;
    let model = args.runtime.load(&args.model)?;
    let meta = find::output::Meta::for_checkpoint(model.checkpoint())?;
    let (layers, hidden) = (model.arch().layers, model.arch().hidden);
    let system = args.system.system();

    // find, once: a resumed search reads its outputs.
    let find_dir = out.join("find");
    let dfile = find_dir.join(find::output::DIRECTION);
    if !dfile.is_file() {
        let sets = args.find_prompts.sets()?;
        let find_opts = find::Options {
            sampling: if args.paper_sampling { Sampling::Paper } else { Sampling::Seed { seed: args.seed } },
            system: system.clone(),
            select: SelectOptions::default(),
            batch_size: args.batch_size.max(1),
            ..find::Options::default()
        };
        let found = find::find(&model, &chat, &sets, &find_opts, &find::NoProgress)?;
        std::fs::create_dir_all(&out).with_context(|| format!("creating `{}`", out.display()))?;
        find::output::write(&found, &meta, &find_dir, true)?;
    }
    let found_direction = Direction::load(&dfile, hidden)?;
    let candidates = Candidates::load(&find_dir.join(find::output::CANDIDATES), hidden)?;
    let position: i64 = found_direction
        .meta("position")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("direction file `{}` has no `position` metadata", dfile.display()))?;
    let space = Space::new(layers, position, optimize::evaluate::first_usable(&candidates, position), args.projected)?;
    let means = match args.projected {
        optimize::Projection::Off => None,
        _ => {
            let f = find_dir.join(find::output::MEANS);
            if !f.is_file() {
                bail!(
                    "--projected {} needs find's harmless means `{}`, which this find output lacks (an older \
                     abliterate wrote it); remove `{}` to run find again",
                    args.projected.label(),
                    f.display(),
                    find_dir.display()
                );
            }
            Some(Candidates::load_means(&f, hidden)?)
        }
    };

    // The trials' prompts and judge.
    let formatter = Formatter::new(&chat, system)?;
    let judge = match &args.judge {
        Some(f) => Judge::from_file(f)?,
        None => Judge::default(),
    };
    let first = |file: Option<&Path>, split| -> Result<(eval::PromptSet, Vec<Vec<u32>>)> {
        let mut p = verify_cmd::prompt_set(file, split)?;
        p.prompts.truncate(args.prompts);
        let ids = formatter.all(&p.instructions())?;
        Ok((p, ids))
    };
    let (harmful, harmful_ids) = first(args.trial_harmful.as_deref(), Split::HarmfulVal)?;
    let (harmless, harmless_ids) = first(args.trial_harmless.as_deref(), Split::HarmlessVal)?;
    let sampler =
        tpe::Sampler { dims: space.dims(), seed: args.seed, startup: args.startup, candidates: EI_CANDIDATES };
    let prompt_info = |p: &eval::PromptSet| json!({"source": p.source, "sha256": p.sha256, "first": p.len()});
    let settings = json!({
        "model_sha256": meta.model_sha256,
        "candidates_sha256": candidates.sha256,
        "means_sha256": means.as_ref().map(|m| m.sha256.clone()),
        "space": space.to_json(),
        "sampler": {"kind": "multi-objective TPE (crates/optimize/src/tpe.rs)", "seed": args.seed, "startup": args.startup, "candidates": EI_CANDIDATES},
        "objectives": ["harmful refusals (substring judge)", "mean first-token KL on harmless prompts"],
        "pruning": "a trial's completions stop once an earlier trial dominates it (optimize::pareto::dominated_at); its refusals are then lower bounds",
        "max_new_tokens": args.max_new_tokens,
        "judge": {"source": judge.source, "phrases": judge.phrases()},
        "harmful": prompt_info(&harmful),
        "harmless": prompt_info(&harmless),
        "system": formatter.system(),
    });
    let ev = Evaluator::new(
        &model,
        &chat,
        &candidates,
        means.as_ref(),
        position,
        harmful_ids,
        harmless_ids,
        &judge,
        EvalOptions { max_new_tokens: args.max_new_tokens, batch_size: args.batch_size },
    )?;

    // The search.
    let t = Instant::now();
    let bar = progress::bar(args.trials as u64, "optimize", false);
    let mut new = 0usize;
    let trials = store::search(&ev, &space, &sampler, &out, &settings, args.trials, &mut |trials: &[Trial]| {
        new += 1;
        let last = trials.last().expect("called after a trial");
        bar.set_position(trials.len() as u64);
        bar.println(format!(
            "trial {}: {}{}/{} refusals, KL {:.4}; front: {}",
            last.number,
            if last.pruned { "pruned at >= " } else { "" },
            last.refusals,
            last.n_harmful,
            last.kl,
            front_line(trials)
        ));
    })?;
    bar.finish_and_clear();
    let search_seconds = t.elapsed().as_secs_f64();
    let scores: Vec<Score> = trials.iter().map(Trial::score).collect();
    let chosen = optimize::choose(&scores, args.max_kl);
    let ctx = optimize::report::Context {
        model: &args.model.display().to_string(),
        seed: args.seed,
        startup: args.startup,
        max_kl: args.max_kl,
        max_new_tokens: args.max_new_tokens,
        judge: &judge.source,
        harmful: &format!("the first {} prompts of `{}`", harmful.len(), harmful.source),
        harmless: &format!("the first {} prompts of `{}`", harmless.len(), harmless.source),
        chosen,
    };
    store::write_atomic(&out.join("report.md"), optimize::report::markdown(&trials, &ctx).as_bytes())?;
    store::write_atomic(&out.join("pareto.svg"), optimize::report::svg(&trials, chosen, args.max_kl).as_bytes())?;
    let Some(c) = chosen else {
        let least = trials.iter().min_by(|a, b| a.kl.total_cmp(&b.kl)).expect("at least one trial");
        bail!(
            "no trial has first-token KL <= --max-kl {} (the smallest is {:.4}, trial {}); raise --max-kl (the \
             trials are kept in `{}`, so rerunning only chooses again) or run more --trials",
            args.max_kl,
            least.kl,
            least.number,
            out.join(store::TRIALS).display()
        );
    };
    let trial = &trials[c];

    // The chosen edit as the files `abliterate edit` reads, then the edit.
    let t = Instant::now();
    let chosen_dir = out.join("chosen");
    std::fs::create_dir_all(&chosen_dir).with_context(|| format!("creating `{}`", chosen_dir.display()))?;
    let cfile = chosen_dir.join("direction.safetensors");
    let kfile = chosen_dir.join("kernel.json");
    let p = &trial.params;
    let trial_candidates = ev.candidates(p)?;
    // What the trial's directions come from, in words.
    let from = if p.projected {
        "find's candidates projected (each without its component along the harmless mean of its site, \
         `means.safetensors`)"
    } else {
        "find's candidates"
    };
    let mut md = serde_json::Map::new();
    let source = if p.per_layer {
        format!(
            "abliterate optimize: trial {}, per-layer directions: block l takes the candidate of the residual it \
             writes into at position {position}, of {from} (heretic's per-layer scope, docs/variants.md)",
            trial.number
        )
    } else {
        format!(
            "abliterate optimize: trial {}, direction index {} between {from} at position {position} (heretic's \
             interpolation, docs/variants.md)",
            trial.number, p.index
        )
    };
    for (k, v) in [
        ("source", source),
        ("direction_scope", p.scope().to_string()),
        ("direction_index", p.index.to_string()),
        ("projected", p.projected.to_string()),
        ("position", position.to_string()),
        ("trial", trial.number.to_string()),
        ("candidates_sha256", trial_candidates.sha256.clone()),
        ("model_sha256", meta.model_sha256.clone()),
        ("abliterate_version", env!("CARGO_PKG_VERSION").to_string()),
    ] {
        md.insert(k.into(), Value::String(v));
    }
    if p.per_layer {
        let (rows, _) = direction::derive::per_layer(trial_candidates, position).map_err(anyhow::Error::msg)?;
        direction::set::write_per_layer(&cfile, &rows, layers, 1, None, checkpoint::Dtype::F64, &md)
    } else {
        direction::write(&cfile, &ev.direction(p)?, checkpoint::Dtype::F64, &md)
    }
    .with_context(|| format!("writing `{}`", cfile.display()))?;
    let table = serde_json::to_string_pretty(&p.kernel_table(layers))? + "\n";
    store::write_atomic(&kfile, table.as_bytes())?;
    let directions = Directions::open(&cfile, hidden, layers, None)?;
    let kernel = edit::LayerKernel::from_table(&kfile, layers)?;
    let ckpt = model.checkpoint();
    let plan =
        edit::plan(ckpt, &edit::Options { norm_preserving: p.norm_preserving, kernel, ..edit::Options::default() })?;
    let model_dir = out.join("model");
    let edited_report = edit::write_directions(
        ckpt,
        &plan,
        &directions,
        &model_dir,
        &edit::WriteOptions { force: true },
        &edit::NoProgress,
    )?;
    let edit_seconds = t.elapsed().as_secs_f64();
    // The hooks this edit equals, from the same plan and directions: verify's equivalence check.
    let edit_hooks = measure::EditHooks::of_plan(
        ckpt,
        &plan,
        &directions,
        format!(
            "the edit's own writes (`edit::Plan::write_ops`): each edited writer's output projected with its layer's \
             kernel weight as its scale{}",
            if p.per_layer { ", against its own block's direction" } else { "" }
        ),
    )?;

    // verify the chosen edit.
    let t = Instant::now();
    let edited = args.runtime.load(&model_dir)?;
    let inputs = Inputs {
        original: &model,
        original_path: args.model.display().to_string(),
        chat: &chat,
        subject: Subject::Edited {
            model: &edited,
            path: model_dir.display().to_string(),
            record: EditRecord::read(&model_dir)?.map(Box::new),
        },
        // One direction for the equivalence check; per-layer directions have none to give it.
        direction: directions.single.as_ref().map(|d| measure::Direction {
            values: d.values.clone(),
            layer: None,
            info: verify_cmd::direction_info(d, None),
        }),
        harmful: verify_cmd::eval_set(args.eval_harmful.as_deref(), Split::HarmfulEval, &formatter)?,
        harmless: verify_cmd::eval_set(args.eval_harmless.as_deref(), Split::HarmlessEval, &formatter)?,
        judge: &judge,
        refusal_tokens: verify_cmd::recorded_refusal_tokens(&found_direction),
        settings: json!({
            "system": formatter.system(),
            "template": formatter.template()?,
            "command": std::env::args().collect::<Vec<_>>(),
        }),
        edit_hooks: Some(edit_hooks),
    };
    let vopts = measure::Options {
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size.max(1),
        induce: false,
        ..measure::Options::default()
    };
    let report = measure::verify(&inputs, &vopts, &verify::Gates::default(), &mut measure::Quiet)?;
    drop(edited);
    let verify_dir = out.join("verify");
    std::fs::create_dir_all(&verify_dir).with_context(|| format!("creating `{}`", verify_dir.display()))?;
    verify_cmd::write_report(&verify_dir, &report)?;
    let verify_seconds = t.elapsed().as_secs_f64();

    let direction_row = if p.per_layer {
        format!(
            "each decoder block's own: block l takes the candidate of the residual it writes into (l + 1; the last \
             block the last candidate, the embedding block 0's) at position {position}, of {from}, heretic's per-layer \
             scope (`../chosen/direction.safetensors`, per-layer file, sha256 `{}`)",
            directions.sha256
        )
    } else {
        format!(
            "`normalize((1 − t) r̂_a + t r̂_b)` of {from} at position {position}, index {} \
             (`../chosen/direction.safetensors`, sha256 `{}`)",
            p.index, directions.sha256
        )
    };
    let extra = format!(
        "## How it was chosen (`abliterate optimize`)\n\nA multi-objective TPE search of {} trials (seed {}, {} uniform) \
         over the direction and the edit, each trial measured with hooks on the original model: harmful refusals of \
         greedy completions ({} new tokens at most, judge `{}`) on the first {} prompts of `{}`, and mean first-token KL \
         on the first {} prompts of `{}`. Chosen by the rule \"fewest refusals with KL <= {}, then the smallest KL\": \
         **trial {}** ({}/{} refusals, KL {:.4} in the search). The front and every trial: `../report.md`, \
         `../trials.jsonl`.\n\n| parameter | value |\n|---|---|\n\
         | direction | {direction_row} |\n\
         | attention-output kernel (peak,position,min,width) | {} |\n\
         | MLP-down kernel (peak,position,min,width) | {} |\n\
         | embedding weight | 1 |\n\
         | norm-preserving | {} |\n\
         | kernel as edited (`--kernel-table`) | `../chosen/kernel.json` |\n\n\
         The same edit by hand: `abliterate edit {} --direction {} --kernel-table {}{} -o {}`.\n\n",
        trials.len(),
        args.seed,
        args.startup.min(trials.len()),
        args.max_new_tokens,
        judge.source,
        harmful.len(),
        harmful.source,
        harmless.len(),
        harmless.source,
        args.max_kl,
        trial.number,
        trial.refusals,
        trial.n_harmful,
        trial.kl,
        p.attn,
        p.mlp,
        if p.norm_preserving { "yes" } else { "no" },
        args.model.display(),
        cfile.display(),
        kfile.display(),
        if p.norm_preserving { " --norm-preserving" } else { "" },
        model_dir.display(),
    );
    let card_text = card::render(&card::Card {
        model: &args.model,
        model_sha256: &meta.model_sha256,
        made_by: "abliterate optimize",
        direction: if p.per_layer {
            format!(
                "heretic's per-layer scope: each decoder block's writers are orthogonalized against the candidate \
                 (harmful minus harmless mean residual) of the residual the block writes into, at position {position}, \
                 of {from}; file `../chosen/direction.safetensors` (per-layer, sha256 `{}`).",
                directions.sha256
            )
        } else {
            format!(
                "heretic's fractional direction index {} between the candidates (harmful minus harmless mean \
                 residuals) at position {position}, of {from}: the normalised interpolation of the unit candidates \
                 entering layers {} and {}; file `../chosen/direction.safetensors` (sha256 `{}`).",
                p.index,
                p.index.floor(),
                p.index.floor() + 1.0,
                directions.sha256
            )
        },
        extra,
        manifest: &edited_report.manifest,
        report: &report,
    });
    store::write_atomic(&model_dir.join("README.md"), card_text.as_bytes())?;

    let seconds = json!({"search": search_seconds, "edit": edit_seconds, "verify": verify_seconds, "total": started.elapsed().as_secs_f64()});
    if args.json {
        let f = optimize::front(&scores);
        let v = json!({
            "model": args.model.display().to_string(),
            "output": out.display().to_string(),
            "resumed": resuming,
            "trials": trials.len(),
            "new_trials": new,
            "front": f.iter().map(|&i| trials[i].to_json()).collect::<Vec<_>>(),
            "chosen": trial.to_json(),
            "max_kl": args.max_kl,
            "report": report,
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "optimized `{}` into `{}`: {} trials ({} new, search {:.1} s), front of {}; chose trial {}: {}/{} refusals, \
             KL {:.4} (hooks); edit {:.1} s, verify {:.1} s",
            args.model.display(),
            out.display(),
            trials.len(),
            new,
            search_seconds,
            optimize::front(&scores).len(),
            trial.number,
            trial.refusals,
            trial.n_harmful,
            trial.kl,
            edit_seconds,
            verify_seconds
        );
        verify_cmd::print_summary(&report, Some(&verify_dir));
        println!(
            "  front: `{}`; model card: `{}`",
            out.join("report.md").display(),
            model_dir.join("README.md").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
