//! Small synthetic checkpoints with deterministic values, for tests: a tiny Llama (single file or
//! sharded), direction files, and checks of an edited copy's layout. Panics on any I/O error (a
//! test helper); never part of a library's API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype, dtype, safetensors};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// A tensor to write: values are rounded once to `dtype`.
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Tensor {
    /// Deterministic pseudo-random values in about `[-scale, scale]`, from `seed`.
    pub fn random(name: &str, dtype: Dtype, shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let n = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor { name: name.to_string(), dtype, shape: shape.to_vec(), values }
    }
}

/// Writes a safetensors file (tensors contiguous, in the given order).
pub fn write_safetensors(path: &Path, metadata: Option<&Map<String, Value>>, tensors: &[Tensor]) {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for t in tensors {
        let begin = data.len();
        dtype::encode_f64(t.dtype, &t.values, &mut data);
        entries.push(safetensors::TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            begin,
            end: data.len(),
        });
    }
    let mut bytes = safetensors::write_header(metadata, &entries);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).expect("writing a synthetic checkpoint");
}

pub const HIDDEN: usize = 64;
pub const LAYERS: usize = 2;
pub const VOCAB: usize = 96;
pub const FF: usize = 128;

/// The tensors of a tiny Llama (hidden 64, 2 layers, 4 heads, vocab 96, ff 128).
pub fn llama_tensors(dtype: Dtype, tied: bool) -> Vec<Tensor> {
    let d = HIDDEN;
    let mut t = vec![Tensor::random("model.embed_tokens.weight", dtype, &[VOCAB, d], 1, 1.0)];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let seed = 100 * (l as u64 + 1);
        t.push(Tensor::random(&p("input_layernorm.weight"), dtype, &[d], seed, 0.1));
        t.push(Tensor::random(&p("self_attn.q_proj.weight"), dtype, &[d, d], seed + 1, 0.2));
        t.push(Tensor::random(&p("self_attn.k_proj.weight"), dtype, &[d, d], seed + 2, 0.2));
        t.push(Tensor::random(&p("self_attn.v_proj.weight"), dtype, &[d, d], seed + 3, 0.2));
        t.push(Tensor::random(&p("self_attn.o_proj.weight"), dtype, &[d, d], seed + 4, 0.2));
        t.push(Tensor::random(&p("post_attention_layernorm.weight"), dtype, &[d], seed + 5, 0.1));
        t.push(Tensor::random(&p("mlp.gate_proj.weight"), dtype, &[FF, d], seed + 6, 0.2));
        t.push(Tensor::random(&p("mlp.up_proj.weight"), dtype, &[FF, d], seed + 7, 0.2));
        t.push(Tensor::random(&p("mlp.down_proj.weight"), dtype, &[d, FF], seed + 8, 0.2));
    }
    t.push(Tensor::random("model.norm.weight", dtype, &[d], 7, 0.1));
    if !tied {
        t.push(Tensor::random("lm_head.weight", dtype, &[VOCAB, d], 9, 1.0));
    }
    t
}

pub fn llama_config(tied: bool) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    })
}

/// Writes a tiny Llama into `parent/llama-<dtype>[-tied]` (one `model.safetensors`, config.json
/// and a tokenizer stand-in) and returns its directory.
pub fn llama(parent: &Path, dtype: Dtype, tied: bool) -> PathBuf {
    let dir = parent.join(format!("llama-{}{}", dtype.as_str().to_lowercase(), if tied { "-tied" } else { "" }));
    std::fs::create_dir_all(&dir).expect("creating a synthetic model directory");
    write_config(&dir, &llama_config(tied));
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}\n").expect("writing tokenizer.json");
    let mut meta = Map::new();
    meta.insert("format".into(), json!("pt"));
    write_safetensors(&dir.join(checkpoint::SINGLE_FILE), Some(&meta), &llama_tensors(dtype, tied));
    dir
}

/// Writes the same tiny Llama as `shards` shards with an index (tensors split in order).
pub fn llama_sharded(parent: &Path, dtype: Dtype, tied: bool, shards: usize) -> PathBuf {
    let dir =
        parent.join(format!("llama-{}-sharded{}", dtype.as_str().to_lowercase(), if tied { "-tied" } else { "" }));
    std::fs::create_dir_all(&dir).expect("creating a synthetic model directory");
    write_config(&dir, &llama_config(tied));
    let tensors = llama_tensors(dtype, tied);
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = Map::new();
    let mut total = 0usize;
    let mut it = tensors.into_iter().peekable();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: Vec<Tensor> = it.by_ref().take(per).collect();
        for t in &part {
            weight_map.insert(t.name.clone(), json!(name));
            total += t.values.len() * t.dtype.float_size().expect("float");
        }
        write_safetensors(&dir.join(&name), None, &part);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(checkpoint::INDEX_FILE), serde_json::to_vec_pretty(&index).expect("json"))
        .expect("writing the index");
    dir
}

pub fn write_config(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).expect("json")).expect("config.json");
}

/// Writes a direction file of length `d` (F32, deterministic, norm about 3) and returns its path.
pub fn direction_file(parent: &Path, d: usize) -> PathBuf {
    let p = parent.join(format!("direction-{d}.safetensors"));
    let t = Tensor::random("direction", Dtype::F32, &[d], 42, 1.0);
    let mut meta = Map::new();
    meta.insert("layer".into(), json!("1"));
    meta.insert("position".into(), json!("-1"));
    meta.insert("source".into(), json!("synthetic"));
    // The direction file format: one F32 tensor `direction` and string metadata.
    write_safetensors(&p, Some(&meta), &[t]);
    p
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of every file under `dir`, by relative path.
pub fn hash_dir(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readable directory") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
                out.insert(rel, sha256_hex(&std::fs::read(&p).expect("readable file")));
            }
        }
    }
    out
}

/// Asserts that `out` holds exactly the input's tensors at the same offsets, that every byte
/// outside the edited tensors is identical (gaps and trailing bytes included), and returns the
/// names whose bytes changed.
pub fn assert_same_layout(model: &Path, out: &Path) -> Vec<String> {
    let a = Checkpoint::open(model).unwrap();
    let b = Checkpoint::open(out).unwrap();
    assert_eq!(a.shards.len(), b.shards.len());
    let mut changed = Vec::new();
    for (sa, sb) in a.shards.iter().zip(&b.shards) {
        assert_eq!(sa.file_name, sb.file_name);
        let ta = &sa.header.tensors;
        assert_eq!(&sb.header.tensors[..ta.len()], &ta[..], "same names, order, dtypes, shapes and offsets");
        let (da, db) = (&sa.bytes()[sa.header.data_start()..], &sb.bytes()[sb.header.data_start()..]);
        assert!(db.len() >= da.len());
        let mut covered = vec![false; da.len()];
        for t in ta {
            if da[t.begin..t.end] != db[t.begin..t.end] {
                changed.push(t.name.clone());
                covered[t.begin..t.end].iter_mut().for_each(|c| *c = true);
            }
        }
        for (k, c) in covered.iter().enumerate() {
            if !c {
                assert_eq!(da[k], db[k], "byte {k} of `{}` outside the edited tensors", sa.file_name);
            }
        }
        let meta = sb.metadata().unwrap();
        for (k, v) in sa.metadata().into_iter().flatten() {
            assert_eq!(meta.get(k), Some(v), "input metadata `{k}` is kept");
        }
        assert_eq!(meta["abliterate_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(meta["abliterate_direction_sha256"].as_str().unwrap().len(), 64);
    }
    changed.sort();
    changed
}
