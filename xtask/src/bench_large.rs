//! `cargo xtask bench forward-8b`: the runtime on an 8B-class checkpoint at its stored width (issue 14).
//!
//! Generates a Llama-3-8B-shaped bf16 checkpoint (hidden 4096, 32 layers, 32 heads with 8 KV heads, MLP
//! 14336, vocabulary 128256, untied head: 8.03 billion parameters, 16.06 GB in 4 shards of about 5 GB
//! with an index). Its values are random but scaled as at initialisation (each matrix uniform with
//! standard deviation 1/sqrt(fan-in), norm gains 1), so activations stay finite through every layer.
//! Then, in a child process (so that its peak RSS is the model's own), it loads the checkpoint with
//! `--weights auto` (on a 24 GB machine: stored width) and runs a forward pass of 8 prompts of 32
//! tokens (last-position logits) and greedy generation of 8 new tokens for each, timing each stage and
//! reading the peak RSS (`VmHWM`). Prints a Markdown table for docs/benchmarks.md and deletes the
//! checkpoint.
//!
//! It writes 16 GB and needs about 17 GB of memory: it refuses to start with less than 17 GB free on
//! the disk or 18 GB of available memory. Options: `--dir DIR` (default `target/bench-8b`), `--threads N`
//! (default 2), `--keep` (keep the checkpoint), `--layers N` (fewer layers, to try the bench quickly).

use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use checkpoint::safetensors::{TensorEntry, write_header};
use checkpoint::{Dtype, INDEX_FILE};
use model::{Batch, GenerateOptions, LoadOptions, Logits, Model, NoHook};
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use crate::host;

const HIDDEN: usize = 4096;
const FF: usize = 14336;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const VOCAB: usize = 128_256;
const LAYERS: usize = 32;
const SHARD_BYTES: usize = 5 << 30;
const PROMPTS: usize = 8;
const PROMPT_TOKENS: usize = 32;
const NEW_TOKENS: usize = 8;

struct Opts {
    dir: PathBuf,
    threads: usize,
    keep: bool,
    layers: usize,
    /// The child process: measure the checkpoint in this directory.
    measure: Option<PathBuf>,
}

fn parse(args: &[&str], root: &Path) -> Result<Opts> {
    let mut o = Opts { dir: root.join("target/bench-8b"), threads: 2, keep: false, layers: LAYERS, measure: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--dir" => o.dir = PathBuf::from(it.next().context("--dir needs a directory")?),
            "--threads" => o.threads = it.next().context("--threads needs a number")?.parse()?,
            "--layers" => o.layers = it.next().context("--layers needs a number")?.parse()?,
            "--keep" => o.keep = true,
            "--measure" => o.measure = Some(PathBuf::from(it.next().context("--measure needs a directory")?)),
            other => bail!("unknown option `{other}`; see xtask/src/bench_large.rs"),
        }
    }
    ensure!(o.threads > 0 && o.layers > 0, "--threads and --layers must be positive");
    Ok(o)
}

/// splitmix64: a fast, seedable generator (each 8 MB chunk of a tensor gets its own seed, so chunks fill
/// in parallel and the bytes do not depend on the thread count).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fills `out` with bf16 values uniform in `[-a, a)` (truncated from f32).
fn fill_uniform(rng: &mut Rng, a: f32, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        let x = rng.next();
        for (k, v) in chunk.chunks_exact_mut(2).enumerate() {
            let u = ((x >> (16 * k)) & 0xFFFF) as f32 / 32768.0 - 1.0;
            v.copy_from_slice(&(((u * a).to_bits() >> 16) as u16).to_le_bytes());
        }
    }
}

/// Every tensor: name, shape and the half-width of its uniform distribution (0: a norm gain of 1).
fn tensors(layers: usize) -> Vec<(String, Vec<usize>, f32)> {
    let d = HIDDEN;
    let kv = KV_HEADS * (HIDDEN / HEADS);
    // Uniform on [-a, a) has standard deviation a / sqrt(3).
    let a = |fan_in: usize| (3.0 / fan_in as f64).sqrt() as f32;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, d], 3f32.sqrt())];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![d], 0.0));
        t.push((p("self_attn.q_proj.weight"), vec![d, d], a(d)));
        t.push((p("self_attn.k_proj.weight"), vec![kv, d], a(d)));
        t.push((p("self_attn.v_proj.weight"), vec![kv, d], a(d)));
        t.push((p("self_attn.o_proj.weight"), vec![d, d], a(d)));
        t.push((p("post_attention_layernorm.weight"), vec![d], 0.0));
        t.push((p("mlp.gate_proj.weight"), vec![FF, d], a(d)));
        t.push((p("mlp.up_proj.weight"), vec![FF, d], a(d)));
        t.push((p("mlp.down_proj.weight"), vec![d, FF], a(FF)));
    }
    t.push(("model.norm.weight".to_string(), vec![d], 0.0));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, d], a(d)));
    t
}

/// Writes the checkpoint (layer order, as transformers writes shards); returns its size in bytes.
fn generate(dir: &Path, layers: usize) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let all = tensors(layers);
    let mut shards: Vec<Vec<(String, Vec<usize>, f32)>> = vec![Vec::new()];
    let mut size = 0usize;
    for t in all {
        let n = t.1.iter().product::<usize>() * 2;
        if size + n > SHARD_BYTES && !shards.last().expect("one shard at least").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard at least").push(t);
    }
    let count = shards.len();
    let mut weight_map = Map::new();
    let mut total = 0u64;
    const CHUNK: usize = 8 << 20;
    let mut buf = vec![0u8; 8 * CHUNK];
    let mut seed = 1u64;
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let mut entries = Vec::new();
        let mut off = 0usize;
        for (t, shape, _) in shard {
            let n = shape.iter().product::<usize>() * 2;
            entries.push(TensorEntry {
                name: t.clone(),
                dtype: Dtype::BF16,
                shape: shape.clone(),
                begin: off,
                end: off + n,
            });
            off += n;
            weight_map.insert(t.clone(), json!(name));
        }
        let mut meta = Map::new();
        meta.insert("format".into(), json!("pt"));
        let path = dir.join(&name);
        let mut f = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(&path)?);
        f.write_all(&write_header(Some(&meta), &entries))?;
        for (t, shape, a) in shard {
            let mut left = shape.iter().product::<usize>() * 2;
            while left > 0 {
                let n = left.min(buf.len());
                let part = &mut buf[..n];
                if *a == 0.0 {
                    // bf16 1.0, little-endian.
                    part.chunks_exact_mut(2).for_each(|v| v.copy_from_slice(&0x3F80u16.to_le_bytes()));
                } else {
                    part.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                        fill_uniform(&mut Rng(seed.wrapping_mul(0x1000_0001).wrapping_add(i as u64)), *a, c)
                    });
                }
                seed += 1;
                f.write_all(part).with_context(|| format!("writing `{}` ({t})", path.display()))?;
                left -= n;
            }
        }
        f.flush()?;
        total += off as u64;
        eprintln!("  wrote {name} ({:.2} GB)", off as f64 / 1e9);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128009,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(std::fs::read_dir(dir)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

/// `VmRSS` and `VmHWM` (peak) of this process, bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// The child: load, forward, generate; prints one JSON object.
fn measure(dir: &Path) -> Result<()> {
    let t = Instant::now();
    let mut last = 0;
    let mut progress = |done: u64, total: u64| {
        let pct = 100 * done / total.max(1);
        if pct >= last + 10 {
            last = pct;
            eprintln!("  loading: {pct}% ({:.1} s, RSS {:.2} GB)", t.elapsed().as_secs_f64(), rss().0 as f64 / 1e9);
        }
    };
    let model = Model::open_with(dir, LoadOptions { progress: Some(&mut progress), ..Default::default() })?;
    let load_s = t.elapsed().as_secs_f64();
    let (rss_loaded, hwm_loaded) = rss();
    eprintln!("  loaded in {load_s:.1} s: {}", model.weights_info().describe());

    let mut rng = Rng(7);
    let prompts: Vec<Vec<u32>> =
        (0..PROMPTS).map(|_| (0..PROMPT_TOKENS).map(|_| (rng.next() % VOCAB as u64) as u32).collect()).collect();
    let batch = Batch::new(&prompts)?;
    let t = Instant::now();
    let out = model.forward(&batch, Logits::Last, &mut NoHook)?;
    let forward_s = t.elapsed().as_secs_f64();
    ensure!(out.logits.iter().all(|v| v.is_finite()), "the forward pass produced a NaN or infinite logit");
    eprintln!("  forward: {forward_s:.1} s");

    let opts = GenerateOptions { max_new_tokens: NEW_TOKENS, stop_tokens: vec![] };
    let t = Instant::now();
    let mut first: Option<f64> = None;
    let g = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| {
        first.get_or_insert_with(|| t.elapsed().as_secs_f64());
        ControlFlow::Continue(())
    })?;
    let generate_s = t.elapsed().as_secs_f64();
    ensure!(g.iter().all(|g| g.tokens.len() == NEW_TOKENS), "every prompt gets {NEW_TOKENS} new tokens");
    let (rss_end, hwm) = rss();
    let info = model.weights_info();
    let out = json!({
        "weights": info.describe(), "weights_bytes": info.bytes, "load_s": load_s, "forward_s": forward_s,
        "generate_s": generate_s, "prefill_s": first.unwrap_or(0.0), "rss_loaded": rss_loaded,
        "hwm_loaded": hwm_loaded, "rss_end": rss_end, "hwm": hwm,
    });
    println!("{out}");
    Ok(())
}

fn free_disk(dir: &Path) -> Option<u64> {
    let out = Command::new("df").args(["-B1", "--output=avail"]).arg(dir).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse().ok()
}

pub fn run(args: &[&str]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let o = parse(args, &root)?;
    rayon::ThreadPoolBuilder::new().num_threads(o.threads).build_global().context("rayon thread pool")?;
    if let Some(dir) = &o.measure {
        return measure(dir);
    }
    let params: usize = tensors(o.layers).iter().map(|t| t.1.iter().product::<usize>()).sum();
    let bytes = 2 * params as u64;
    std::fs::create_dir_all(o.dir.parent().context("--dir has a parent")?)?;
    let disk = free_disk(o.dir.parent().expect("checked")).unwrap_or(0);
    let memory = model::available_memory().unwrap_or(0);
    ensure!(
        disk > bytes + (1 << 30),
        "{:.1} GB free on the disk of `{}`; the checkpoint needs {:.1} GB",
        disk as f64 / 1e9,
        o.dir.display(),
        bytes as f64 / 1e9
    );
    ensure!(
        memory > bytes + (2 << 30),
        "{:.1} GB of memory available; the bench needs {:.1} GB",
        memory as f64 / 1e9,
        (bytes + (2 << 30)) as f64 / 1e9
    );
    let start_load = host::load();
    eprintln!("generating {} ({:.2} GB, {} layers)", o.dir.display(), bytes as f64 / 1e9, o.layers);
    let t = Instant::now();
    // Generate and measure; the checkpoint is deleted afterwards whatever happened (unless --keep).
    let result = (|| -> Result<(u64, f64, usize, Vec<u8>)> {
        let size = generate(&o.dir, o.layers)?;
        let gen_s = t.elapsed().as_secs_f64();
        let files = std::fs::read_dir(&o.dir)?.count();
        eprintln!("measuring (child process)");
        let child = Command::new(std::env::current_exe()?)
            .args(["bench", "forward-8b", "--threads", &o.threads.to_string(), "--measure"])
            .arg(&o.dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the measuring child")?;
        ensure!(child.status.success(), "the measuring child failed");
        Ok((size, gen_s, files, child.stdout))
    })();
    if !o.keep && o.dir.exists() {
        std::fs::remove_dir_all(&o.dir).with_context(|| format!("deleting `{}`", o.dir.display()))?;
    }
    let (size, gen_s, files, stdout) = result?;
    let v: Value = serde_json::from_slice(&stdout).context("the child's JSON")?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let gb = |k: &str| f(k) / 1e9;
    let target = 1.1 * size as f64 / 1e9 + 1.0;

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
        "Checkpoint: Llama-3-8B shape, {} layers, bf16, {:.2} GB in {files} files (shards, index, config; \
         generated in {gen_s:.0} s{}).",
        o.layers,
        size as f64 / 1e9,
        if o.keep { "" } else { ", deleted afterwards" }
    )?;
    writeln!(t, "Weights: {}.", v["weights"].as_str().unwrap_or("?"))?;
    writeln!(t)?;
    writeln!(t, "| stage | time | RSS after | peak RSS so far |")?;
    writeln!(t, "|---|---|---|---|")?;
    writeln!(
        t,
        "| load (check, memory check, pack every matrix) | {:.1} s | {:.2} GB | {:.2} GB |",
        f("load_s"),
        gb("rss_loaded"),
        gb("hwm_loaded")
    )?;
    let tokens = (PROMPTS * PROMPT_TOKENS) as f64;
    writeln!(
        t,
        "| forward, {PROMPTS} prompts x {PROMPT_TOKENS} tokens, last-position logits | {:.1} s ({:.1} tokens/s) | | |",
        f("forward_s"),
        tokens / f("forward_s")
    )?;
    let steps = f("generate_s") - f("prefill_s");
    writeln!(
        t,
        "| generate, {PROMPTS} prompts x {NEW_TOKENS} new tokens (prompt pass, then {} steps) | {:.1} s (prompt pass {:.1} s; \
         then {:.2} s per step, {:.1} new tokens/s) | {:.2} GB | {:.2} GB |",
        NEW_TOKENS - 1,
        f("generate_s"),
        f("prefill_s"),
        steps / (NEW_TOKENS - 1) as f64,
        (PROMPTS * (NEW_TOKENS - 1)) as f64 / steps,
        gb("rss_end"),
        gb("hwm")
    )?;
    writeln!(t)?;
    writeln!(
        t,
        "Peak RSS {:.2} GB against the target 1.1 x {:.2} GB + 1 GB = {target:.2} GB: {}.",
        gb("hwm"),
        size as f64 / 1e9,
        if gb("hwm") <= target { "met" } else { "NOT met" }
    )?;
    println!("{t}");
    Ok(())
}
