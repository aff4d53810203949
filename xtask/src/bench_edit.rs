//! `cargo xtask bench edit`: how `abliterate edit` compares with copying the same checkpoint.
//!
//! Generates Llama-shaped bf16 checkpoints (TinyLlama-1.1B's shape: hidden 2048, MLP 5632, 32
//! heads, 4 KV heads, vocabulary 32000, untied head, so input and output have the same size) at
//! two depths, in shards of about 1 GB with an index; random but valid bf16 (no NaN or inf). For
//! each size it times, alternately and several times, `cp -r MODEL OUT && sync` and
//! `abliterate edit MODEL --direction D -o OUT && sync` (release build, under `/usr/bin/time -v`
//! for peak RSS), and once a straightforward PyTorch edit (load every shard, orthogonalize the
//! writers in float32, save, sync) if `/work/pyenv/venv/bin/python` (or `$BENCH_PYTHON`) has torch.
//! Prints a Markdown table for docs/benchmarks.md and deletes the generated files.
//!
//! Options: `--layers 22,44` (depths; 22 is 2.2 GB), `--runs 5`, `--dir DIR` (default
//! `target/bench-edit`), `--no-torch`, `--keep`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host;
use anyhow::{Context, Result, bail};
use checkpoint::safetensors::{TensorEntry, write_header};
use checkpoint::{Dtype, INDEX_FILE};
use serde_json::{Map, Value, json};

const HIDDEN: usize = 2048;
const FF: usize = 5632;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const VOCAB: usize = 32000;
const SHARD_BYTES: usize = 1 << 30;

struct Opts {
    layers: Vec<usize>,
    runs: usize,
    dir: PathBuf,
    torch: bool,
    keep: bool,
}

fn parse(args: &[&str]) -> Result<Opts> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut o = Opts { layers: vec![22, 44], runs: 5, dir: root.join("target/bench-edit"), torch: true, keep: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--layers" => {
                let v = it.next().context("--layers needs a value like 22,44")?;
                o.layers = v.split(',').map(|s| s.parse()).collect::<Result<_, _>>().context("--layers")?;
            }
            "--runs" => o.runs = it.next().context("--runs needs a number")?.parse()?,
            "--dir" => o.dir = PathBuf::from(it.next().context("--dir needs a path")?),
            "--no-torch" => o.torch = false,
            "--keep" => o.keep = true,
            other => bail!("unknown option `{other}`; see xtask/src/bench_edit.rs"),
        }
    }
    Ok(o)
}

/// xorshift64*: fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `out` with valid bf16 values of magnitude about 2^-10 .. 2^-3 (never NaN or inf).
    fn fill_bf16(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_exact_mut(8) {
            let x = self.next();
            for k in 0..4 {
                let bits = (x >> (16 * k)) as u16;
                let sign = bits & 0x8000;
                let exp = 117 + ((bits >> 7) & 7); // biased exponent 117..124
                let v = sign | (exp << 7) | (bits & 0x7f);
                chunk[2 * k..2 * k + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

fn tensors(layers: usize) -> Vec<(String, Vec<usize>)> {
    let d = HIDDEN;
    let kv = KV_HEADS * (HIDDEN / HEADS);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, d])];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![d]));
        t.push((p("self_attn.q_proj.weight"), vec![d, d]));
        t.push((p("self_attn.k_proj.weight"), vec![kv, d]));
        t.push((p("self_attn.v_proj.weight"), vec![kv, d]));
        t.push((p("self_attn.o_proj.weight"), vec![d, d]));
        t.push((p("post_attention_layernorm.weight"), vec![d]));
        t.push((p("mlp.gate_proj.weight"), vec![FF, d]));
        t.push((p("mlp.up_proj.weight"), vec![FF, d]));
        t.push((p("mlp.down_proj.weight"), vec![d, FF]));
    }
    t.push(("model.norm.weight".to_string(), vec![d]));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, d]));
    t.sort();
    t
}

/// Writes the checkpoint; returns its size in bytes.
fn generate(dir: &Path, layers: usize) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let all = tensors(layers);
    // Split into shards of about SHARD_BYTES, tensors in name order (as transformers writes them).
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0usize;
    for t in all {
        let n = t.1.iter().product::<usize>() * 2;
        if size + n > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().unwrap().push(t);
    }
    let count = shards.len();
    let mut weight_map = Map::new();
    let mut total = 0u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; 8 << 20];
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let mut entries = Vec::new();
        let mut off = 0usize;
        for (t, shape) in shard {
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
        let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dir.join(&name))?);
        f.write_all(&write_header(Some(&meta), &entries))?;
        let mut left = off;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill_bf16(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n;
        }
        f.flush()?;
        total += off as u64;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(dir_size(dir))
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

fn write_direction(path: &Path) -> Result<()> {
    let mut rng = Rng(42);
    let values: Vec<f32> = (0..HIDDEN).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let entry =
        TensorEntry { name: "direction".into(), dtype: Dtype::F32, shape: vec![HIDDEN], begin: 0, end: data.len() };
    let mut meta = Map::new();
    meta.insert("source".into(), Value::String("cargo xtask bench edit (random)".into()));
    let mut bytes = write_header(Some(&meta), &[entry]);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes)?;
    Ok(())
}

const TORCH_EDIT: &str = r#"
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
model, direction, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(os.cpu_count())
r = load_file(direction)["direction"].double()
r_hat = (r / r.norm()).float()
os.makedirs(out)
index = json.load(open(os.path.join(model, "model.safetensors.index.json")))
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(os.path.join(model, shard))
    for name, w in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w32 = w.float()
            tensors[name] = (w32 - torch.outer(r_hat, r_hat @ w32)).to(w.dtype)
        elif name.endswith("embed_tokens.weight"):
            w32 = w.float()
            tensors[name] = (w32 - torch.outer(w32 @ r_hat, r_hat)).to(w.dtype)
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
    del tensors
for f in os.listdir(model):
    if not f.endswith(".safetensors"):
        shutil.copy(os.path.join(model, f), os.path.join(out, f))
"#;

pub fn run(args: &[&str]) -> Result<()> {
    let o = parse(args)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = crate::host::release_abliterate(&root)?;
    std::fs::create_dir_all(&o.dir)?;
    let dir = o.dir.canonicalize()?;
    let direction = dir.join("direction.safetensors");
    write_direction(&direction)?;
    let py = if o.torch { host::python("torch, safetensors") } else { None };
    let mut table = String::new();
    writeln!(table, "Machine: {}. Load average at start: {}.", host::machine(), host::load())?;
    writeln!(table)?;
    writeln!(
        table,
        "| checkpoint | runs | `cp -r` + `sync`: wall (median; all), CPU | `abliterate edit` + `sync`: wall (median; all), CPU | wall ratio | edit peak RSS (max) | PyTorch edit: wall, CPU | PyTorch peak RSS |"
    )?;
    writeln!(table, "|---|---|---|---|---|---|---|---|")?;
    for &layers in &o.layers {
        let model = dir.join(format!("llama-{layers}l"));
        let _ = std::fs::remove_dir_all(&model);
        eprintln!("generating a {layers}-layer checkpoint in {}", model.display());
        let bytes = generate(&model, layers)?;
        let shards = std::fs::read_dir(&model)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .count();
        let out = dir.join("out");
        let (m, d, b) = (model.display(), direction.display(), bin.display());
        let cp = format!("cp -r {m} {} && sync", out.display());
        let edit = format!("{b} edit {m} --direction {d} -o {} >/dev/null && sync", out.display());
        let clean = || -> Result<()> {
            let _ = std::fs::remove_dir_all(&out);
            Command::new("sync").status()?;
            Ok(())
        };
        // One warm-up of each, so both start from a warm page cache for the input.
        for script in [&cp, &edit] {
            clean()?;
            host::timed(script)?;
        }
        let (mut t_cp, mut t_edit, mut c_cp, mut c_edit, mut rss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0u64);
        for run in 0..o.runs {
            clean()?;
            let c = host::timed(&cp)?;
            clean()?;
            let e = host::timed(&edit)?;
            eprintln!(
                "  run {}: cp {:.2} s ({:.2} s CPU), edit {:.2} s ({:.2} s CPU), edit peak RSS {} MB (load {})",
                run + 1,
                c.wall,
                c.cpu,
                e.wall,
                e.cpu,
                e.rss / 1024,
                host::load()
            );
            t_cp.push(c.wall);
            c_cp.push(c.cpu);
            t_edit.push(e.wall);
            c_edit.push(e.cpu);
            rss = rss.max(e.rss);
        }
        let (mc, me) = (host::median(t_cp.clone()), host::median(t_edit.clone()));
        let torch = match &py {
            Some(py) => {
                clean()?;
                let script_path = dir.join("torch_edit.py");
                std::fs::write(&script_path, TORCH_EDIT)?;
                let t = host::timed(&format!("{py} {} {m} {d} {} && sync", script_path.display(), out.display()))?;
                eprintln!("  PyTorch: {:.2} s ({:.2} s CPU), peak RSS {} MB", t.wall, t.cpu, t.rss / 1024);
                (format!("{:.2} s, {:.2} s", t.wall, t.cpu), format!("{} MB", t.rss / 1024))
            }
            None => ("not run".into(), "-".into()),
        };
        clean()?;
        let all = |v: &[f64]| v.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(", ");
        writeln!(
            table,
            "| {layers} layers, {:.2} GB, {shards} shards | {} | {mc:.2} s ({}), {:.2} s | {me:.2} s ({}), {:.2} s | {:.2} | {} MB | {} | {} |",
            bytes as f64 / 1e9,
            o.runs,
            all(&t_cp),
            host::median(c_cp),
            all(&t_edit),
            host::median(c_edit),
            me / mc,
            rss / 1024,
            torch.0,
            torch.1
        )?;
        if !o.keep {
            std::fs::remove_dir_all(&model)?;
        }
    }
    writeln!(table, "\nLoad average at end: {}.", host::load())?;
    if !o.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{table}");
    Ok(())
}
