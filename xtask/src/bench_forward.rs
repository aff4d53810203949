//! `cargo xtask bench forward`: the `model` runtime against transformers/PyTorch on the CPU, on the real
//! test model (SmolLM2-135M-Instruct, a bf16 checkpoint), same machine, same run, same thread count: ours
//! with the weights held as f32 and at their stored width (bf16), PyTorch in float32.
//!
//! - Prompt processing: 128 chat prompts (`harmless_val[:128]` of the paper's splits, the model's chat
//!   template with the generation prompt) in 4 batches of 32. PyTorch runs `model(**batch)` on left-padded
//!   batches (all-position logits); we run the packed batches with all-position logits too (the same
//!   output), and also with last-position logits only (what `find` needs). Tokens/s counts real tokens.
//! - Generation: the first 32 prompts in one batch, greedy, exactly 64 new tokens each (`model.generate`
//!   with `min_new_tokens = max_new_tokens = 64`; ours with no stop ids). New tokens/s.
//! - The same generation for one prompt (what `abliterate generate` does), ours only.
//! - Achieved GFLOP/s (useful work: projections, attention over real keys, the LM head rows computed)
//!   against the machine's f32 matmul peak, measured here with a 2048³ gemm (ours) and `torch.matmul`.
//! - The peak RSS of the release `abliterate generate` (64 new tokens) with `--weights f32` and `stored`.
//!
//! Each timing is the best of `--runs` runs after a warm-up (the machine may be shared). The PyTorch side is
//! `crates/model/benches/torch_forward.py`, run with `$BENCH_PYTHON` (default `/work/pyenv/venv/bin/python`).
//! Options: `--model DIR` (default: the test model under `target/test-models/`, built from `../shared` if
//! absent), `--threads 2`, `--runs 2`, `--no-torch`. Prints a Markdown table for docs/benchmarks.md.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::host;
use anyhow::{Context, Result, bail, ensure};
use model::{Arch, Batch, GenerateOptions, LoadOptions, Logits, Model, NoHook, WeightWidth};
use serde_json::Value;

struct Opts {
    model: PathBuf,
    threads: usize,
    runs: usize,
    torch: bool,
}

fn parse(args: &[&str], root: &Path) -> Result<Opts> {
    let mut o = Opts { model: root.join("target/test-models/smollm2-135m-instruct"), threads: 2, runs: 2, torch: true };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--model" => o.model = PathBuf::from(it.next().context("--model needs a directory")?),
            "--threads" => o.threads = it.next().context("--threads needs a number")?.parse()?,
            "--runs" => o.runs = it.next().context("--runs needs a number")?.parse()?,
            "--no-torch" => o.torch = false,
            other => bail!("unknown option `{other}`; see xtask/src/bench_forward.rs"),
        }
    }
    ensure!(o.threads > 0 && o.runs > 0, "--threads and --runs must be positive");
    Ok(o)
}

/// Best of `runs` timings after one warm-up.
fn best(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = f64::INFINITY;
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t = t.min(s.elapsed().as_secs_f64());
    }
    Ok(t)
}

/// Useful floating-point work of one token at position `pos` (0-based) through every layer: the
/// projections (2 flops per weight) and attention (q·k and the weighted sum over `pos + 1` keys).
fn token_flops(a: &Arch, pos: usize) -> f64 {
    let d = a.hidden as f64;
    let q = (a.heads * a.head_dim) as f64;
    let qkv = a.qkv_width() as f64;
    let ff = a.intermediate.unwrap_or(0) as f64;
    let keys = a.attention.iter().map(|k| k.window.map_or(pos + 1, |w| (pos + 1).min(w)) as f64).sum::<f64>();
    a.layers as f64 * 2.0 * (d * qkv + q * d + 3.0 * d * ff) + 4.0 * q * keys
}

fn head_flops(a: &Arch) -> f64 {
    2.0 * (a.hidden * a.vocab) as f64
}

/// f32 matmul throughput of the gemm kernels the runtime uses: a 2048³ product, best of 10.
fn matmul_peak() -> Result<f64> {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let t = best(10, || {
        // SAFETY: three n×n row-major buffers, indices within n*n.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
            )
        };
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / t / 1e9)
}

/// Seconds for each stage at one width (best of `runs`).
struct Timings {
    prompt_all: f64,
    prompt_last: f64,
    generate: f64,
    generate_one: f64,
}

fn measure(model: &Model, batches: &[Batch], gen_batch: &Batch, runs: usize) -> Result<Timings> {
    let prompt_all = best(runs, || {
        for b in batches {
            std::hint::black_box(model.forward(b, Logits::All, &mut NoHook)?);
        }
        Ok(())
    })?;
    let prompt_last = best(runs, || {
        for b in batches {
            std::hint::black_box(model.forward(b, Logits::Last, &mut NoHook)?);
        }
        Ok(())
    })?;
    let opts = GenerateOptions { max_new_tokens: 64, stop_tokens: vec![] };
    let gen_in = |batch: &Batch| {
        best(runs, || {
            let g = model.generate(batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(()))?;
            ensure!(g.iter().all(|g| g.tokens.len() == 64), "every prompt gets 64 new tokens");
            Ok(())
        })
    };
    let generate = gen_in(gen_batch)?;
    let generate_one = gen_in(&Batch::new(&[gen_batch.prompt(0)])?)?;
    Ok(Timings { prompt_all, prompt_last, generate, generate_one })
}

/// Peak RSS (kB) of the release `abliterate generate` (64 new tokens) with f32 and with stored weights.
fn generate_rss(root: &Path, model: &Path, threads: usize) -> Result<[u64; 2]> {
    let bin = crate::host::release_abliterate(root)?;
    let mut out = [0; 2];
    for (i, width) in ["f32", "stored"].into_iter().enumerate() {
        let run = Command::new("/usr/bin/time")
            .arg("-v")
            .arg(&bin)
            .arg("generate")
            .arg(model)
            .args(["--prompt", "Write a haiku about the sea.", "--max-new-tokens", "64", "--json"])
            .args(["--weights", width, "--threads", &threads.to_string()])
            .output()
            .context("running /usr/bin/time")?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        ensure!(run.status.success(), "abliterate generate --weights {width} failed: {stderr}");
        out[i] = stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes): "))
            .and_then(|v| v.trim().parse().ok())
            .context("no peak RSS in /usr/bin/time -v output")?;
    }
    Ok(out)
}

pub fn run(args: &[&str]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let o = parse(args, &root)?;
    rayon::ThreadPoolBuilder::new().num_threads(o.threads).build_global().context("rayon thread pool")?;
    let shared = root.join("../shared");
    if !o.model.join("config.json").is_file() {
        let script = shared.join("models/build-smollm2.sh");
        ensure!(script.is_file(), "`{}` is absent and so is `{}`; pass --model", o.model.display(), script.display());
        let ok = Command::new("bash").arg(&script).arg(&o.model).status()?.success();
        ensure!(ok, "build-smollm2.sh failed");
    }
    let prompts_json = shared.join("datasets/refusal_direction/splits/harmless_val.json");
    let data: Value = serde_json::from_slice(
        &std::fs::read(&prompts_json).with_context(|| format!("reading `{}`", prompts_json.display()))?,
    )?;
    let chat = chat::Chat::load(&o.model)?;
    let mut prompts = Vec::new();
    for item in data.as_array().context("a JSON array of prompts")?.iter().take(128) {
        prompts.push(chat.prompt_ids(item["instruction"].as_str().context("`instruction`")?, None)?);
    }
    ensure!(prompts.len() == 128, "fewer than 128 prompts in `{}`", prompts_json.display());
    let start_load = host::load();

    // PyTorch first (it also checks that both sides tokenize alike).
    let torch = match (o.torch, host::python("torch, transformers")) {
        (true, Some(py)) => {
            let out = root.join("target/bench-forward-torch.json");
            eprintln!("PyTorch: running crates/model/benches/torch_forward.py (several minutes)");
            let ok = Command::new(&py)
                .arg(root.join("crates/model/benches/torch_forward.py"))
                .arg(&o.model)
                .arg(&prompts_json)
                .arg(&out)
                .arg(o.threads.to_string())
                .status()?
                .success();
            ensure!(ok, "torch_forward.py failed");
            let v: Value = serde_json::from_slice(&std::fs::read(&out)?)?;
            let theirs: Vec<Vec<u32>> = serde_json::from_value(v["prompts"].clone())?;
            ensure!(theirs == prompts, "transformers and the chat crate tokenized the prompts differently");
            Some(v["torch"].clone())
        }
        (true, None) => {
            eprintln!("PyTorch: no python with torch and transformers ($BENCH_PYTHON); skipping it");
            None
        }
        (false, _) => None,
    };

    let batches: Vec<Batch> = prompts.chunks(32).map(Batch::new).collect::<Result<_, _>>()?;
    let real: usize = prompts.iter().map(Vec::len).sum();
    let gen_batch = Batch::new(&prompts[..32])?;
    let mut ours = Vec::new();
    for width in [WeightWidth::F32, WeightWidth::Stored] {
        let model = Model::open_with(&o.model, LoadOptions { weights: width, ..Default::default() })?;
        eprintln!("abliterate ({}): prompt processing, generation", model.weights_info().describe());
        ours.push(measure(&model, &batches, &gen_batch, o.runs)?);
    }
    let a = Model::open(&o.model)?.arch().clone();
    eprintln!("abliterate: matmul peak");
    let peak = matmul_peak()?;
    eprintln!("abliterate generate: peak RSS at each width");
    let rss = generate_rss(&root, &o.model, o.threads)?;

    // Useful work.
    let body: f64 = prompts.iter().map(|p| (0..p.len()).map(|i| token_flops(&a, i)).sum::<f64>()).sum();
    let flops_all = body + real as f64 * head_flops(&a);
    let flops_last = body + prompts.len() as f64 * head_flops(&a);
    let gen_flops: f64 = prompts[..32]
        .iter()
        .map(|p| (0..p.len() + 63).map(|i| token_flops(&a, i)).sum::<f64>() + 64.0 * head_flops(&a))
        .sum();

    let mut t = String::new();
    writeln!(
        t,
        "Machine: {}; {} threads. Load average at start: {start_load}; at end: {}.",
        host::machine(),
        o.threads,
        host::load()
    )?;
    writeln!(
        t,
        "Model: `{}` (bf16 checkpoint; PyTorch in float32). Best of {} runs after a warm-up.",
        o.model.display(),
        o.runs
    )?;
    writeln!(t)?;
    let tp = |secs: f64, n: usize| n as f64 / secs;
    let (f, st) = (&ours[0], &ours[1]);
    let torch_s = torch.as_ref().map(|v| -> Result<(f64, f64)> {
        Ok((
            v["prompt_seconds"].as_f64().context("prompt_seconds")?,
            v["generate_seconds"].as_f64().context("generate_seconds")?,
        ))
    });
    let torch_s = torch_s.transpose()?;
    let padded = torch.as_ref().and_then(|v| v["padded_tokens"].as_u64()).unwrap_or(0);
    writeln!(
        t,
        "| | PyTorch (transformers, eager, f32) | abliterate, f32 weights | ratio | abliterate, bf16 weights (stored width) | ratio |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|")?;
    let row = |t: &mut String, what: &str, unit: &str, theirs: Option<f64>, f32: f64, stored: f64| -> Result<()> {
        let ratio = |x: f64| theirs.map_or(String::new(), |p| format!("**{:.2}x**", x / p));
        let theirs = theirs.map_or(String::new(), |p| format!("{p:.1} {unit}"));
        writeln!(
            t,
            "| {what} | {theirs} | {f32:.1} {unit} | {} | {stored:.1} {unit} | {} |",
            ratio(f32),
            ratio(stored)
        )?;
        Ok(())
    };
    row(
        &mut t,
        &format!("prompt processing, 128 prompts ({real} tokens; PyTorch pads to {padded}), all-position logits"),
        "tokens/s",
        torch_s.map(|(ps, _)| tp(ps, real)),
        tp(f.prompt_all, real),
        tp(st.prompt_all, real),
    )?;
    row(
        &mut t,
        "prompt processing, last-position logits only (what `find` uses)",
        "tokens/s",
        torch_s.map(|(ps, _)| tp(ps, real)),
        tp(f.prompt_last, real),
        tp(st.prompt_last, real),
    )?;
    row(
        &mut t,
        "greedy generation, 32 prompts x 64 new tokens",
        "new tokens/s",
        torch_s.map(|(_, gs)| tp(gs, 32 * 64)),
        tp(f.generate, 32 * 64),
        tp(st.generate, 32 * 64),
    )?;
    row(
        &mut t,
        "greedy generation, 1 prompt x 64 new tokens (what `generate` does)",
        "new tokens/s",
        None,
        tp(f.generate_one, 64),
        tp(st.generate_one, 64),
    )?;
    row(
        &mut t,
        "useful GFLOP/s: prompts (all logits)",
        "",
        torch_s.map(|(ps, _)| flops_all / ps / 1e9),
        flops_all / f.prompt_all / 1e9,
        flops_all / st.prompt_all / 1e9,
    )?;
    row(
        &mut t,
        "useful GFLOP/s: generation (32 x 64)",
        "",
        torch_s.map(|(_, gs)| gen_flops / gs / 1e9),
        gen_flops / f.generate / 1e9,
        gen_flops / st.generate / 1e9,
    )?;
    writeln!(
        t,
        "| peak RSS of `abliterate generate` (64 new tokens) | | {:.0} MB | | {:.0} MB | |",
        rss[0] as f64 / 1e3,
        rss[1] as f64 / 1e3
    )?;
    let torch_peak = torch.as_ref().and_then(|v| v["matmul_2048_gflops"].as_f64());
    writeln!(
        t,
        "| f32 matmul peak (2048³) | {} | {peak:.1} GFLOP/s (`gemm`) | | | |",
        torch_peak.map_or(String::new(), |p| format!("{p:.1} GFLOP/s (`torch.matmul`)"))
    )?;
    // The machine's peak: the better of the two libraries' large products.
    let machine_peak = torch_peak.unwrap_or(0.0).max(peak);
    writeln!(t)?;
    for (name, m) in [("f32", f), ("stored", st)] {
        writeln!(
            t,
            "Share of the machine's measured f32 matmul peak ({machine_peak:.0} GFLOP/s), {name} weights: prompts {:.0}% \
             (all logits), {:.0}% (last only); generation {:.0}%.",
            100.0 * flops_all / m.prompt_all / 1e9 / machine_peak,
            100.0 * flops_last / m.prompt_last / 1e9 / machine_peak,
            100.0 * gen_flops / m.generate / 1e9 / machine_peak
        )?;
    }
    println!("{t}");
    Ok(())
}
