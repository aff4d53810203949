//! `cargo xtask fixtures [--check]`: the tiny Hugging Face checkpoints under `fixtures/models/`,
//! one per supported family plus two layout variants, generated deterministically from a fixed
//! seed (see fixtures/models/README.md for what each one is).
//!
//! Generation builds every file in memory; the default mode writes them (and removes files the
//! generator no longer makes), `--check` compares them byte for byte with the committed ones and
//! fails on any difference. The generator never reads the committed files to make new ones.

mod bpe;
mod families;
mod rng;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use checkpoint::dtype::{Dtype, bf16_from_f64};
use checkpoint::safetensors::{TensorEntry, write_header};
use serde_json::{Map, Value, json};

use families::{EXPERT_FF, EXPERTS, Fixture, HIDDEN, Init, LAYERS, Layout, TensorSpec};
use rng::Rng;

/// The seed of every fixture. Changing it changes every committed weight.
const SEED: u64 = 20240617;

/// Files in `fixtures/models/` that are written by hand, not generated.
const HAND_WRITTEN: [&str; 1] = ["README.md"];

pub fn run(args: &[&str]) -> anyhow::Result<()> {
    let check = match args {
        [] => false,
        ["--check"] => true,
        _ => bail!("usage: cargo xtask fixtures [--check]"),
    };
    let root = models_dir();
    let files = generate();
    if check {
        let problems = compare(&root, &files)?;
        if !problems.is_empty() {
            bail!(
                "{} fixture file(s) differ from what `cargo xtask fixtures` generates:\n  {}\nregenerate them with `cargo xtask fixtures`",
                problems.len(),
                problems.join("\n  ")
            );
        }
        eprintln!("fixtures: {} files under {} match the generator", files.len(), root.display());
        return Ok(());
    }
    for (rel, bytes) in &files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file path has a parent"))
            .with_context(|| format!("creating the folder of `{}`", path.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing `{}`", path.display()))?;
    }
    for stale in on_disk(&root)?.into_iter().filter(|p| !files.contains_key(p)) {
        std::fs::remove_file(root.join(&stale)).with_context(|| format!("removing stale `{}`", stale.display()))?;
        eprintln!("removed stale {}", stale.display());
    }
    let total: usize = files.values().map(Vec::len).sum();
    eprintln!("fixtures: wrote {} files ({:.1} MB) under {}", files.len(), total as f64 / 1e6, root.display());
    Ok(())
}

/// `fixtures/models/` of this workspace.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").join("fixtures/models")
}

/// Every generated file, by path relative to `fixtures/models/`.
pub fn generate() -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for f in families::all() {
        let values = draw(&f);
        for layout in &f.layouts {
            let dir = PathBuf::from(f.dir).join(match layout {
                Layout::Bf16Single => "bf16",
                Layout::F32Sharded => "f32",
            });
            let mut config = f.config.clone();
            let dtype_name = if *layout == Layout::Bf16Single { "bfloat16" } else { "float32" };
            config["torch_dtype"] = json!(dtype_name);
            files.insert(dir.join("config.json"), sorted_json(&config));
            files.insert(dir.join("generation_config.json"), sorted_json(&f.generation_config));
            files.insert(dir.join("tokenizer.json"), pretty(&f.tokenizer.to_json()));
            files.insert(dir.join("tokenizer_config.json"), sorted_json(&f.tokenizer_config));
            files.insert(dir.join("special_tokens_map.json"), sorted_json(&f.special_tokens_map));
            match layout {
                Layout::Bf16Single => {
                    files.insert(dir.join("model.safetensors"), safetensors(&values, Dtype::BF16));
                }
                Layout::F32Sharded => {
                    for (name, bytes) in sharded_f32(&values) {
                        files.insert(dir.join(name), bytes);
                    }
                }
            }
        }
    }
    files
}

/// One tensor's values as bf16 bit patterns, with its shape.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    bf16: Vec<u16>,
}

/// Draws every tensor of a fixture (each from its own named stream) and rounds it once to bf16;
/// the f32 layout stores these same rounded values, so both layouts describe one model.
fn draw(f: &Fixture) -> Vec<Tensor> {
    let mut out: Vec<Tensor> = f.tensors.iter().map(|t| draw_one(f.seed_key, t)).collect();
    if f.fused_experts {
        out = fuse_experts(out);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn draw_one(seed_key: &str, t: &TensorSpec) -> Tensor {
    let mut rng = Rng::for_name(SEED, &format!("{seed_key}/{}", t.name));
    let n: usize = t.shape.iter().product();
    let bf16 = (0..n)
        .map(|_| {
            let v = match t.init {
                Init::Normal(std) => std * rng.normal(),
                Init::Around(centre, std) => centre + std * rng.normal(),
            };
            bf16_from_f64(v)
        })
        .collect();
    Tensor { name: t.name.clone(), shape: t.shape.clone(), bf16 }
}

/// transformers 5.x's expert layout: per layer `experts.gate_up_proj` [E, 2 ff, d] (each expert's
/// gate rows, then its up rows) and `experts.down_proj` [E, d, ff], replacing the per-expert
/// tensors (same values).
fn fuse_experts(tensors: Vec<Tensor>) -> Vec<Tensor> {
    let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.mlp.experts");
        if !by_name.contains_key(&format!("{p}.0.down_proj.weight")) {
            continue;
        }
        let mut gate_up = Vec::with_capacity(EXPERTS * 2 * EXPERT_FF * HIDDEN);
        let mut down = Vec::with_capacity(EXPERTS * HIDDEN * EXPERT_FF);
        for e in 0..EXPERTS {
            let mut take =
                |part: &str| by_name.remove(&format!("{p}.{e}.{part}.weight")).expect("expert tensors exist").bf16;
            gate_up.extend(take("gate_proj"));
            gate_up.extend(take("up_proj"));
            down.extend(take("down_proj"));
        }
        by_name.insert(
            format!("{p}.gate_up_proj"),
            Tensor { name: format!("{p}.gate_up_proj"), shape: vec![EXPERTS, 2 * EXPERT_FF, HIDDEN], bf16: gate_up },
        );
        by_name.insert(
            format!("{p}.down_proj"),
            Tensor { name: format!("{p}.down_proj"), shape: vec![EXPERTS, HIDDEN, EXPERT_FF], bf16: down },
        );
    }
    by_name.into_values().collect()
}

/// A safetensors file as transformers saves it: `{"format":"pt"}` metadata, tensors in name order.
fn safetensors(tensors: &[Tensor], dtype: Dtype) -> Vec<u8> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut data = Vec::new();
    for t in tensors {
        let begin = data.len();
        match dtype {
            Dtype::BF16 => t.bf16.iter().for_each(|b| data.extend_from_slice(&b.to_le_bytes())),
            Dtype::F32 => t.bf16.iter().for_each(|b| data.extend_from_slice(&(u32::from(*b) << 16).to_le_bytes())),
            _ => unreachable!("fixtures are stored in bf16 or f32"),
        }
        entries.push(TensorEntry { name: t.name.clone(), dtype, shape: t.shape.clone(), begin, end: data.len() });
    }
    let mut metadata = Map::new();
    metadata.insert("format".into(), json!("pt"));
    let mut out = write_header(Some(&metadata), &entries);
    out.extend_from_slice(&data);
    out
}

/// The f32 layout: two shards split at half the bytes (tensors in name order) and the index.
fn sharded_f32(tensors: &[Tensor]) -> Vec<(String, Vec<u8>)> {
    let total: usize = tensors.iter().map(|t| 4 * t.bf16.len()).sum();
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut acc = 0;
    for t in tensors {
        if acc < total / 2 {
            first.push(t);
        } else {
            second.push(t);
        }
        acc += 4 * t.bf16.len();
    }
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut weight_map = Map::new();
    let mut out = Vec::new();
    for (name, part) in names.iter().zip([first, second]) {
        for t in &part {
            weight_map.insert(t.name.clone(), json!(name));
        }
        let owned: Vec<Tensor> = part
            .iter()
            .map(|t| Tensor { name: t.name.clone(), shape: t.shape.clone(), bf16: t.bf16.clone() })
            .collect();
        out.push((name.to_string(), safetensors(&owned, Dtype::F32)));
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    out.push(("model.safetensors.index.json".into(), sorted_json(&index)));
    out
}

/// JSON with every object's keys sorted (as transformers' `save_pretrained` writes), 2-space
/// indentation and a final newline.
fn sorted_json(v: &Value) -> Vec<u8> {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    pretty(&sort(v))
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("JSON values serialize");
    out.push(b'\n');
    out
}

/// Files under `root` (relative), except the hand-written ones.
fn on_disk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading `{}`", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                out.push(path.strip_prefix(root).expect("walk stays under root").to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, root, &mut out)?;
    }
    out.retain(|p| !HAND_WRITTEN.iter().any(|h| p == Path::new(h)));
    out.sort();
    Ok(out)
}

/// Differences between the generated files and those under `root`, one line each.
fn compare(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for (rel, bytes) in files {
        match std::fs::read(root.join(rel)) {
            Ok(disk) if disk == *bytes => {}
            Ok(disk) => problems.push(format!(
                "{}: differs ({} bytes committed, {} generated)",
                rel.display(),
                disk.len(),
                bytes.len()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!("{}: missing", rel.display())),
            Err(e) => return Err(e).with_context(|| format!("reading `{}`", root.join(rel).display())),
        }
    }
    for extra in on_disk(root)?.into_iter().filter(|p| !files.contains_key(p)) {
        problems.push(format!("{}: not generated (stale)", extra.display()));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::{Checkpoint, Family, Role};

    /// The committed fixtures are exactly what the generator makes (regenerate with
    /// `cargo xtask fixtures` after changing it).
    #[test]
    fn committed_fixtures_match_the_generator() {
        let files = generate();
        let problems = compare(&models_dir(), &files).unwrap();
        assert!(problems.is_empty(), "run `cargo xtask fixtures`:\n{}", problems.join("\n"));
        let total: usize = files.values().map(Vec::len).sum();
        assert!(total < 12_000_000, "fixtures grew to {total} bytes; keep them small");
    }

    #[test]
    fn check_reports_changed_missing_and_stale_files() {
        let dir = std::env::temp_dir().join(format!("xtask-fixtures-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files: BTreeMap<PathBuf, Vec<u8>> = [
            (PathBuf::from("a/config.json"), b"{}\n".to_vec()),
            (PathBuf::from("a/model.safetensors"), vec![1, 2, 3]),
            (PathBuf::from("b/config.json"), b"{}\n".to_vec()),
        ]
        .into_iter()
        .collect();
        for (rel, bytes) in &files {
            std::fs::create_dir_all(dir.join(rel).parent().unwrap()).unwrap();
            std::fs::write(dir.join(rel), bytes).unwrap();
        }
        std::fs::write(dir.join("README.md"), "hand-written").unwrap();
        assert!(compare(&dir, &files).unwrap().is_empty());
        std::fs::write(dir.join("a/model.safetensors"), [1, 2]).unwrap();
        std::fs::remove_file(dir.join("b/config.json")).unwrap();
        std::fs::write(dir.join("a/old.json"), "{}").unwrap();
        let problems = compare(&dir, &files).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            problems,
            [
                "a/model.safetensors: differs (2 bytes committed, 3 generated)",
                "b/config.json: missing",
                "a/old.json: not generated (stale)",
            ]
        );
    }

    /// Every fixture opens as a checkpoint, every tensor has a known role, and the bf16 and f32
    /// layouts hold the same values.
    #[test]
    fn fixtures_open_and_layouts_agree() {
        let root = models_dir();
        let mut seen = Vec::new();
        for f in families::all() {
            let mut decoded: Vec<BTreeMap<String, Vec<f32>>> = Vec::new();
            for layout in &f.layouts {
                let dir = root.join(f.dir).join(if *layout == Layout::Bf16Single { "bf16" } else { "f32" });
                let ck = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
                seen.push(ck.config.family);
                assert_eq!((ck.config.hidden_size, ck.config.num_hidden_layers), (HIDDEN, LAYERS));
                assert_eq!(ck.config.vocab_size, f.tokenizer.vocab.len());
                // Every tensor has a known role and every writer the shape config.json implies.
                let roles = ck.check_roles(|_| false).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
                assert!(!roles.contains(&Role::Unknown));
                assert_eq!(ck.tied(), ck.config.tie_word_embeddings);
                let mut values = BTreeMap::new();
                for (_, t) in ck.tensors() {
                    values.insert(t.name.clone(), ck.read_f32(&t.name).unwrap());
                }
                assert_eq!(ck.shards.len(), if *layout == Layout::Bf16Single { 1 } else { 2 });
                decoded.push(values);
            }
            if let [a, b] = decoded.as_slice() {
                assert!(a == b, "{}: bf16 and f32 layouts differ", f.dir);
            }
        }
        for family in Family::ALL {
            assert!(seen.contains(&family), "no fixture of {family:?}");
        }
    }

    /// The fused (transformers 5.x) layout holds qwen3_moe's expert values: expert e's gate rows,
    /// then its up rows, in `gate_up_proj[e]`, and its down matrix in `down_proj[e]`.
    #[test]
    fn fused_experts_hold_the_per_expert_values() {
        let root = models_dir();
        let split = Checkpoint::open(&root.join("qwen3_moe/bf16")).unwrap();
        let fused = Checkpoint::open(&root.join("qwen3_moe_fused/bf16")).unwrap();
        let p = "model.layers.0.mlp.experts";
        let gate_up = fused.read_f32(&format!("{p}.gate_up_proj")).unwrap();
        let down = fused.read_f32(&format!("{p}.down_proj")).unwrap();
        let (ff, d) = (EXPERT_FF, HIDDEN);
        for e in 0..EXPERTS {
            let part = |n: &str| split.read_f32(&format!("{p}.{e}.{n}.weight")).unwrap();
            let g = &gate_up[e * 2 * ff * d..][..2 * ff * d];
            assert_eq!(&g[..ff * d], part("gate_proj").as_slice(), "expert {e} gate");
            assert_eq!(&g[ff * d..], part("up_proj").as_slice(), "expert {e} up");
            assert_eq!(&down[e * d * ff..][..d * ff], part("down_proj").as_slice(), "expert {e} down");
        }
        assert!(fused.get(&format!("{p}.0.down_proj.weight")).is_none());
        assert!(fused.get("model.layers.1.mlp.down_proj.weight").is_some(), "layer 1 stays dense");
    }

    #[test]
    fn weights_have_the_intended_scale() {
        let llama = families::all().into_iter().find(|f| f.dir == "llama").unwrap();
        let t = draw(&llama);
        let get = |n: &str| -> Vec<f64> {
            t.iter()
                .find(|t| t.name == n)
                .unwrap()
                .bf16
                .iter()
                .map(|b| f64::from(f32::from_bits(u32::from(*b) << 16)))
                .collect()
        };
        let std = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
        let q = get("model.layers.0.self_attn.q_proj.weight");
        assert!((std(&q) - 0.125).abs() < 0.01, "q_proj std {}", std(&q));
        let g = get("model.layers.1.input_layernorm.weight");
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        assert!((mean - 1.0).abs() < 0.06 && g.iter().any(|x| (x - 1.0).abs() > 0.1), "norm gains {g:?}");
    }
}
