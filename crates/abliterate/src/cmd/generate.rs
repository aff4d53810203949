//! `abliterate generate MODEL --prompt TEXT`: a greedy chat reply, optionally with a direction ablated
//! everywhere (`--ablate`, method.md §7) or added at one layer (`--add`), so a user can see what a
//! direction does before editing any weight. The work is `chat` (template, tokens, decoding) and
//! `model` (forward pass, hooks, generation); this file parses options and prints.
//!
//! Human output: a progress bar on stderr while the weights load (only on a terminal), the reply on stdout,
//! streamed token by token, and a one-line summary on stderr (with the width the weights were held at).
//! `--json`: one object on stdout when done. `--weights` and `--threads` are [`RuntimeArgs`].

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chat::{Chat, Special};
use direction::{Candidate, Direction};
use model::{Batch, Finish, GenerateOptions, Hook, Interventions, NoHook};
use serde_json::{Value, json};

use crate::runtime::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face chat model (config.json, safetensors weights, tokenizer and
    /// chat template).
    model: PathBuf,
    /// The user's message.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// A system message before it (the template must accept one).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Stop after this many new tokens (generation also stops at the model's end-of-turn ids).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_new_tokens: usize,
    /// Ablate this direction everywhere: x ← x − (x·r̂)r̂ at every layer's input, attention output and
    /// MLP output (docs/method.md §7; for Gemma 2/3 after their post-norms).
    #[arg(long, value_name = "FILE", conflicts_with = "add")]
    ablate: Option<PathBuf>,
    /// Add COEFF times this (raw, unnormalised) direction to the input of layer L at every position
    /// (docs/method.md §7, activation addition).
    #[arg(long, value_name = "FILE")]
    add: Option<PathBuf>,
    /// With a candidates file (`find`'s candidates.safetensors) for --ablate or --add: which
    /// candidate, as POS,LAYER (e.g. `-1,22`); --add then defaults to its layer.
    #[arg(long, value_name = "POS,LAYER", allow_hyphen_values = true)]
    candidate: Option<Candidate>,
    /// The layer for --add (default: the `layer` recorded in the direction file).
    #[arg(long, value_name = "L", requires = "add")]
    layer: Option<usize>,
    /// The coefficient for --add: +1 induces what the direction encodes, −1 removes it.
    #[arg(long, value_name = "C", requires = "add", default_value_t = 1.0, allow_negative_numbers = true)]
    coeff: f64,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Print one JSON object (prompt tokens, new tokens, text, how it ended) instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.runtime.apply_threads()?;
    let chat = match &args.template {
        Some(t) => {
            Chat::load_with(&args.model, &chat::Options { template_file: Some(t.clone()), ..Default::default() })
        }
        None => Chat::load(&args.model),
    }?;
    let prompt = chat.prompt_ids(&args.prompt, args.system.as_deref())?;
    let loaded = Instant::now();
    let model = args.runtime.load(&args.model)?;
    let load_seconds = loaded.elapsed().as_secs_f64();
    let arch = model.arch();
    let weights = model.weights_info();

    if let (Some(c), None, None) = (args.candidate, &args.ablate, &args.add) {
        bail!("--candidate {},{} picks a candidate for --ablate or --add; pass one of them", c.position, c.layer);
    }
    let mut intervention = Value::Null;
    let mut hook: Box<dyn Hook> = Box::new(NoHook);
    if let Some(path) = &args.ablate {
        let d = Direction::open(path, arch.hidden, args.candidate)?;
        hook = Box::new(Interventions::ablation(arch.layers, &d.values)?);
        intervention = json!({"kind": "ablate", "direction": path, "sha256": d.sha256, "norm": d.norm()});
    } else if let Some(path) = &args.add {
        let d = Direction::open(path, arch.hidden, args.candidate)?;
        let layer = match (args.layer, d.meta("layer")) {
            (Some(l), _) => l,
            (None, Some(m)) => m.parse().with_context(|| {
                format!(
                    "direction file `{}`: metadata `layer` is `{m}`, not a layer index; pass --layer",
                    path.display()
                )
            })?,
            (None, None) => bail!("--add needs --layer: direction file `{}` records no layer", path.display()),
        };
        if layer >= arch.layers {
            bail!("--layer {layer} is out of range: the model has {} layers (0..={})", arch.layers, arch.layers - 1);
        }
        hook = Box::new(Interventions::activation_addition(arch.layers, layer, &d.values, args.coeff)?);
        intervention = json!({
            "kind": "add", "direction": path, "sha256": d.sha256, "norm": d.norm(), "layer": layer, "coeff": args.coeff
        });
    }

    let opts = GenerateOptions { max_new_tokens: args.max_new_tokens, stop_tokens: chat.eos_ids().to_vec() };
    let batch = Batch::new(&[&prompt])?;
    let started = Instant::now();
    let mut stream = chat.stream(Special::Skip);
    let mut stdout = std::io::stdout().lock();
    let mut write_error: Option<anyhow::Error> = None;
    let mut first_token: Option<Instant> = None;
    let generated = model.generate(&batch, &opts, hook.as_mut(), &mut |_, token| {
        first_token.get_or_insert_with(Instant::now);
        if args.json {
            return ControlFlow::Continue(());
        }
        let piece = match stream.push(token) {
            Ok(p) => p,
            Err(e) => {
                write_error = Some(e.into());
                return ControlFlow::Break(model::Stop::All);
            }
        };
        match stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e.into());
                ControlFlow::Break(model::Stop::All)
            }
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();
    // The prompt pass ends with the first token; the rest is decoding.
    let prompt_seconds = first_token.map_or(seconds, |t| (t - started).as_secs_f64());
    let decode_rate = |n: usize| {
        let d = seconds - prompt_seconds;
        if n > 1 && d > 0.0 { (n - 1) as f64 / d } else { 0.0 }
    };
    if let Some(e) = write_error {
        return Err(e);
    }
    let g = &generated[0];
    let finish = match g.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Stopped => "stopped",
    };
    if args.json {
        let text = chat.decode(&g.tokens, Special::Skip)?;
        let out = json!({
            "model": args.model,
            "prompt": args.prompt,
            "system": args.system,
            "intervention": intervention,
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "text": text,
            "finish": finish,
            "weights": {
                "requested": weights.requested.as_str(),
                "width": weights.width.as_str(),
                "dtypes": weights.dtypes,
                "bytes": weights.bytes,
                "available_bytes": weights.available,
            },
            "load_seconds": load_seconds,
            "prompt_seconds": prompt_seconds,
            "seconds": seconds,
            "decode_tokens_per_second": decode_rate(g.tokens.len()),
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        let rest = stream.finish()?;
        writeln!(stdout, "{rest}")?;
        let why = match g.finish {
            Finish::Stop => "stopped at end of turn",
            Finish::Length => "reached --max-new-tokens",
            Finish::Stopped => "stopped",
        };
        eprintln!(
            "[{} new tokens, {why}; prompt {} tokens in {prompt_seconds:.2} s, then {:.1} tokens/s; weights {}, \
             loaded in {load_seconds:.1} s]",
            g.tokens.len(),
            prompt.len(),
            decode_rate(g.tokens.len()),
            weights.describe(),
        );
    }
    Ok(ExitCode::SUCCESS)
}
