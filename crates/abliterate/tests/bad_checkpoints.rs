//! One test per kind of broken checkpoint (issue 7, "Fixtures and tests"): each breaks a copy of a
//! fixture in a temp dir and asserts that `abliterate inspect` exits with 2 and prints the exact
//! error on stderr. Untrusted bytes must give an error that names the file and the problem, never a
//! panic.

mod util;

use std::path::{Path, PathBuf};

use checkpoint::safetensors::{self, TensorEntry};
use serde_json::Value;
use util::{abliterate, copy_dir, fixture};

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const UNKNOWN_TYPES: &str =
    "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe";

/// A copy of a fixture in a fresh temp dir.
struct Broken {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Broken {
    fn of(rel: &str) -> Broken {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        copy_dir(&fixture(rel), &dir);
        Broken { _tmp: tmp, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn d(&self) -> String {
        self.dir.display().to_string()
    }

    /// Runs `abliterate inspect` on the broken copy: it must fail with exit code 2 and exactly
    /// `error: {want}` on stderr, and print nothing on stdout.
    fn fails_with(&self, want: &str) {
        let run = abliterate(["inspect".as_ref(), self.dir.as_os_str()]);
        assert_eq!(run.code, 2, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.stderr, format!("error: {want}\n"));
        assert_eq!(run.stdout, "");
    }

    fn edit_json(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let p = self.path(name);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}

/// A shard's tensors with their bytes, to be changed and written back.
struct Tensors {
    metadata: Option<serde_json::Map<String, Value>>,
    list: Vec<(TensorEntry, Vec<u8>)>,
}

impl Tensors {
    fn read(path: &Path) -> Tensors {
        let bytes = std::fs::read(path).unwrap();
        let h = safetensors::parse(&bytes).unwrap();
        let start = h.data_start();
        let list = h.tensors.iter().map(|t| (t.clone(), bytes[start + t.begin..start + t.end].to_vec())).collect();
        Tensors { metadata: h.metadata, list }
    }

    fn get(&mut self, name: &str) -> &mut (TensorEntry, Vec<u8>) {
        self.list.iter_mut().find(|(t, _)| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// Writes a valid file with contiguous offsets recomputed from the byte lengths.
    fn write(&self, path: &Path) {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (t, b) in &self.list {
            entries.push(TensorEntry { begin: data.len(), end: data.len() + b.len(), ..t.clone() });
            data.extend_from_slice(b);
        }
        self.write_with(path, &entries, &data);
    }

    /// Writes the given entries (offsets as they are) over a data section.
    fn write_with(&self, path: &Path, entries: &[TensorEntry], data: &[u8]) {
        let mut out = safetensors::write_header(self.metadata.as_ref(), entries);
        out.extend_from_slice(data);
        std::fs::write(path, out).unwrap();
    }

    /// The current contiguous layout: entries and data.
    fn layout(&self) -> (Vec<TensorEntry>, Vec<u8>) {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (t, b) in &self.list {
            entries.push(TensorEntry { begin: data.len(), end: data.len() + b.len(), ..t.clone() });
            data.extend_from_slice(b);
        }
        (entries, data)
    }
}

#[test]
fn missing_config_json() {
    let m = Broken::of("models/llama/bf16");
    std::fs::remove_file(m.path("config.json")).unwrap();
    m.fails_with(&format!(
        "`{}/config.json` not found: MODEL must be a Hugging Face model directory with a config.json",
        m.d()
    ));
}

#[test]
fn config_json_is_not_json() {
    let m = Broken::of("models/llama/bf16");
    std::fs::write(m.path("config.json"), "{\"model_type\": \"llama\",").unwrap();
    m.fails_with(&format!("`{}/config.json`: not valid JSON: EOF while parsing a value at line 1 column 23", m.d()));
}

#[test]
fn unknown_model_type() {
    let m = Broken::of("models/llama/bf16");
    m.edit_json("config.json", |v| v["model_type"] = "gpt2".into());
    m.fails_with(&format!("`{}/config.json`: unsupported model_type `gpt2`; supported: {UNKNOWN_TYPES}", m.d()));
}

#[test]
fn only_a_pickle_file() {
    let m = Broken::of("models/llama/bf16");
    std::fs::rename(m.path("model.safetensors"), m.path("pytorch_model.bin")).unwrap();
    m.fails_with(&format!(
        "`{}` has only `pytorch_model.bin`, a pickle file, which is never loaded (unpickling can run arbitrary \
         code); convert it to safetensors first, e.g. in Python: \
         `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`",
        m.d()
    ));
}

#[test]
fn index_names_a_missing_shard() {
    let m = Broken::of("models/llama/f32");
    std::fs::remove_file(m.path(SHARD2)).unwrap();
    m.fails_with(&format!(
        "`model.safetensors.index.json`: names shard `{SHARD2}`, which does not exist in `{}`",
        m.d()
    ));
}

#[test]
fn shard_name_leaving_the_model_directory() {
    let m = Broken::of("models/llama/f32");
    m.edit_json("model.safetensors.index.json", |v| {
        v["weight_map"]["model.norm.weight"] = "../model-00002-of-00002.safetensors".into();
    });
    m.fails_with(
        "`model.safetensors.index.json`: shard name `../model-00002-of-00002.safetensors` leaves the model \
         directory; shards must be files inside it",
    );
}

#[test]
fn shard_name_that_is_an_absolute_path() {
    let m = Broken::of("models/llama/f32");
    m.edit_json("model.safetensors.index.json", |v| {
        v["weight_map"]["model.norm.weight"] = "/etc/passwd".into();
    });
    m.fails_with(
        "`model.safetensors.index.json`: shard name `/etc/passwd` is an absolute path; shards must be files \
         inside the model directory",
    );
}

#[test]
fn index_tensor_absent_from_its_shard() {
    let m = Broken::of("models/llama/f32");
    m.edit_json("model.safetensors.index.json", |v| {
        v["weight_map"]["model.layers.0.mlp.extra.weight"] = SHARD1.into();
    });
    m.fails_with(&format!(
        "`model.safetensors.index.json`: tensor `model.layers.0.mlp.extra.weight` is not in its shard `{SHARD1}`"
    ));
}

#[test]
fn index_puts_a_tensor_in_the_wrong_shard() {
    let m = Broken::of("models/llama/f32");
    m.edit_json("model.safetensors.index.json", |v| {
        v["weight_map"]["model.norm.weight"] = SHARD1.into();
    });
    m.fails_with(&format!(
        "`model.safetensors.index.json`: puts tensor `model.norm.weight` in `{SHARD1}`, but it is in `{SHARD2}`"
    ));
}

#[test]
fn tensor_in_two_shards() {
    let m = Broken::of("models/llama/f32");
    // Shard 2 also gets a copy of shard 1's input_layernorm.
    let one = Tensors::read(&m.path(SHARD1));
    let mut two = Tensors::read(&m.path(SHARD2));
    let copy = one.list.iter().find(|(t, _)| t.name == "model.layers.0.input_layernorm.weight").unwrap().clone();
    two.list.insert(0, copy);
    two.write(&m.path(SHARD2));
    m.fails_with(&format!("tensor `model.layers.0.input_layernorm.weight` is in both `{SHARD1}` and `{SHARD2}`"));
}

#[test]
fn header_length_larger_than_the_file() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len + 1000).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    m.fails_with(&format!("`model.safetensors`: header length {} is larger than the file ({len} bytes)", len + 1000));
}

#[test]
fn header_is_not_json() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    // Same length, but the object's opening brace is gone.
    bytes[8] = b'x';
    std::fs::write(&p, bytes).unwrap();
    m.fails_with("`model.safetensors`: header is not valid JSON: expected value at line 1 column 1");
}

#[test]
fn offsets_out_of_bounds() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let t = Tensors::read(&p);
    let (mut entries, data) = t.layout();
    // Move the first tensor far past the end of the data (a gap, so not a plain truncation).
    let e = &mut entries[0];
    let (n, name) = (e.nbytes(), e.name.clone());
    e.begin = data.len() + 4096;
    e.end = e.begin + n;
    let (begin, end) = (e.begin, e.end);
    t.write_with(&p, &entries, &data);
    m.fails_with(&format!(
        "`model.safetensors`: tensor `{name}`: data_offsets [{begin}, {end}] lie outside the data section ({} bytes)",
        data.len()
    ));
}

#[test]
fn overlapping_offsets() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let t = Tensors::read(&p);
    let (mut entries, data) = t.layout();
    // o_proj [64, 64] points at the bytes of q_proj [64, 64] of the same layer.
    let q = entries.iter().find(|e| e.name == "model.layers.0.self_attn.q_proj.weight").unwrap().clone();
    let o = entries.iter_mut().find(|e| e.name == "model.layers.0.self_attn.o_proj.weight").unwrap();
    o.begin = q.begin;
    o.end = q.end;
    t.write_with(&p, &entries, &data);
    m.fails_with(
        "`model.safetensors`: tensors `model.layers.0.self_attn.o_proj.weight` and \
         `model.layers.0.self_attn.q_proj.weight` overlap in the data section",
    );
}

#[test]
fn truncated_shard() {
    let m = Broken::of("models/llama/f32");
    let p = m.path(SHARD2);
    let bytes = std::fs::read(&p).unwrap();
    let header = safetensors::parse(&bytes).unwrap();
    let need = bytes.len() - header.data_start();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    m.fails_with(&format!(
        "`{SHARD2}`: file is truncated: its header describes {need} bytes of tensor data but only {} follow the \
         header",
        need - 100
    ));
}

#[test]
fn unsupported_dtype_on_a_writer() {
    // A writer stored as 8-bit floats, as a quantized checkpoint would.
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let mut t = Tensors::read(&p);
    let (e, b) = t.get("model.layers.1.mlp.down_proj.weight");
    e.dtype = checkpoint::Dtype::F8E4M3;
    b.truncate(b.len() / 2);
    t.write(&p);
    m.fails_with(
        "tensor `model.layers.1.mlp.down_proj.weight` in `model.safetensors`: dtype F8_E4M3 is not supported for \
         a residual writer (BF16, F16, F32 and F64 are); quantized checkpoints must be dequantized first",
    );
}

#[test]
fn writer_shape_contradicts_config_json() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let mut t = Tensors::read(&p);
    let (e, b) = t.get("model.layers.0.mlp.down_proj.weight");
    // [64, 96] stored as [64, 48].
    e.shape = vec![64, 48];
    b.truncate(b.len() / 2);
    t.write(&p);
    m.fails_with(
        "tensor `model.layers.0.mlp.down_proj.weight` in `model.safetensors`: shape [64, 48] contradicts \
         config.json (hidden_size 64, intermediate_size 96)",
    );
}

#[test]
fn unknown_tensor() {
    let m = Broken::of("models/llama/bf16");
    let p = m.path("model.safetensors");
    let mut t = Tensors::read(&p);
    let norm = t.get("model.norm.weight").clone();
    let mut extra = norm;
    extra.0.name = "model.layers.1.adapter.weight".into();
    t.list.push(extra);
    t.write(&p);
    // Issue 13: inspect lists unknown tensors and says what edit does about them, instead of failing.
    let run = abliterate(["inspect".as_ref(), m.dir.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().filter(|l| l.contains("unknown") || l.contains("adapter")).collect();
    assert_eq!(
        lines,
        [
            "other tensors: 16 (attn_in 6, final_norm 1, mlp_in 4, pre_norm 4, unknown 1)",
            "unknown tensors: 1; edit refuses them: abliterate does not know whether they write to the residual \
             stream",
            "  `model.layers.1.adapter.weight` [64] BF16 in `model.safetensors`",
            "edit (default options): refuses the unknown tensor; with it excluded, rewrites 5 tensors (106.5 kB), \
             adds `lm_head.weight` (65.5 kB), copies 16 unchanged (82.7 kB)",
        ],
        "{}",
        run.stdout
    );
    let run = abliterate(["inspect".as_ref(), m.dir.as_os_str(), "--json".as_ref()]);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        v["unknown_tensors"],
        serde_json::json!([{"name": "model.layers.1.adapter.weight", "file": "model.safetensors", "dtype": "BF16", "shape": [64]}])
    );
    assert_eq!(
        (&v["edit"]["refused_unknown"], &v["edit"]["excluded"]),
        (&serde_json::json!(1), &serde_json::json!([]))
    );
    // edit refuses it, with the message inspect's advice answers.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = fixture("directions/llama.safetensors");
    let run = abliterate([
        "edit".as_ref(),
        m.dir.as_os_str(),
        "--direction".as_ref(),
        dir.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 2);
    assert_eq!(
        run.stderr,
        "error: 1 unknown tensor in `model.safetensors`: `model.layers.1.adapter.weight`; abliterate does not know \
         whether it writes to the residual stream. Exclude it explicitly with --exclude if it is safe to leave \
         unedited\n"
    );
    // Excluding it explicitly is the way out.
    let run = abliterate(["inspect".as_ref(), m.dir.as_os_str(), "--exclude".as_ref(), "*.adapter.*".as_ref()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.contains("unknown tensors:"), "{}", run.stdout);
    assert!(
        run.stdout.contains("  excluded: `model.layers.1.adapter.weight` (--exclude `*.adapter.*`)\n"),
        "{}",
        run.stdout
    );
}

/// Issue 13: `head_dim` had two defaults (hidden / heads in `checkpoint`, 256 for Gemma in the
/// runtime), so `edit` accepted a Gemma checkpoint without `head_dim` that `generate` then refused.
/// One definition now: both read head_dim 256 and both refuse its [64, 64] attention.
#[test]
fn gemma_without_head_dim_gets_transformers_default_everywhere() {
    let m = Broken::of("models/gemma/bf16");
    m.edit_json("config.json", |v| {
        v.as_object_mut().unwrap().remove("head_dim");
    });
    m.fails_with(
        "tensor `model.layers.0.self_attn.o_proj.weight` in `model.safetensors`: shape [64, 64] contradicts \
         config.json (hidden_size 64, num_attention_heads 4 x head_dim 256)",
    );
    let run = abliterate(["generate", &m.d(), "--prompt", "hi", "--max-new-tokens", "1"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("[1024, 64]"), "{}", run.stderr);
}
