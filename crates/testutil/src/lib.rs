//! Test helpers shared by every crate's tests: where the workspace, its fixtures and the shared
//! material are, and the real test model (SmolLM2-135M-Instruct), built once and cached.
//!
//! The real model comes from `../shared/models/build-smollm2.sh`. In a user's fresh clone there is
//! no `../shared`; tests that need it then say so plainly on stderr and skip.
//!
//! [`synth`] writes small synthetic checkpoints and direction files for tests; [`reference`] reads the
//! reference tensors that the committed Python scripts wrote.

pub mod reference;
pub mod synth;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the folder with the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root exists")
}

/// `fixtures/` of the workspace.
pub fn fixtures() -> PathBuf {
    workspace_root().join("fixtures")
}

/// The shared material folder (`../shared` beside the checkout), if present.
pub fn shared() -> Option<PathBuf> {
    let p = workspace_root().join("../shared");
    p.join("models/build-smollm2.sh").is_file().then(|| p.canonicalize().expect("exists"))
}

/// The real test model directory, built on first use and cached under `target/test-models/`.
/// Returns None (after saying why on stderr) where `../shared` is absent.
pub fn smollm2() -> Option<PathBuf> {
    static MODEL: OnceLock<Option<PathBuf>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Some(shared) = shared() else {
                eprintln!("skipping: ../shared is absent (a fresh clone), so the real test model cannot be built");
                return None;
            };
            let out = workspace_root().join("target/test-models/smollm2-135m-instruct");
            let status =
                Command::new("bash").arg(shared.join("models/build-smollm2.sh")).arg(&out).status().expect("bash runs");
            assert!(status.success(), "build-smollm2.sh failed ({status}); see its output above");
            Some(out)
        })
        .clone()
}

/// The real test model's tokenizer, chat template and configs without its weights
/// (`fixtures/smollm2/tokenizer/`, committed): what the tokenizer and template tests need, so that
/// they run in every clone. A test in this crate checks they are the built model's own files.
pub fn smollm2_tokenizer() -> PathBuf {
    fixtures().join("smollm2/tokenizer")
}

/// The real direction of the shared model (`../shared/directions/smollm2-base-l15.safetensors`).
pub fn smollm2_direction() -> Option<PathBuf> {
    shared().map(|s| s.join("directions/smollm2-base-l15.safetensors"))
}

/// The refusing variant of the real test model (`../shared/models/build-smollm2-refusal.sh`: SmolLM2 with a
/// safety fine-tune merged in; `find`, `verify` and `run` are proven on it), built on first use and cached
/// under `target/test-models/`. Returns None (after saying why on stderr) where `../shared` is absent.
pub fn smollm2_refusal() -> Option<PathBuf> {
    static MODEL: OnceLock<Option<PathBuf>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Some(shared) = shared() else {
                eprintln!("skipping: ../shared is absent (a fresh clone), so the refusing test model cannot be built");
                return None;
            };
            let out = workspace_root().join("target/test-models/smollm2-135m-refusal");
            let status = Command::new("bash")
                .arg(shared.join("models/build-smollm2-refusal.sh"))
                .arg(&out)
                .status()
                .expect("bash runs");
            assert!(status.success(), "build-smollm2-refusal.sh failed ({status}); see its output above");
            Some(out)
        })
        .clone()
}

/// An f32 copy of a model directory (every float tensor widened exactly, one `model.safetensors`,
/// `torch_dtype` float32; other files copied), made once and cached as `target/test-models/<name>`. The
/// same model numerically, so that an edit of it rounds in f32 (method.md §7, rounding).
pub fn f32_copy(src: &Path, name: &str) -> PathBuf {
    use checkpoint::{Checkpoint, Dtype, safetensors};
    let out = workspace_root().join("target/test-models").join(name);
    if out.join("config.json").is_file() {
        return out;
    }
    let ckpt = Checkpoint::open(src).expect("the source model opens");
    let tmp = workspace_root().join(format!("target/test-models/.{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (mut entries, mut data) = (Vec::new(), Vec::new());
    let mut tensors: Vec<_> = ckpt.tensors().collect();
    tensors.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    for (r, t) in tensors {
        let begin = data.len();
        if t.dtype.is_float() && t.dtype != Dtype::F64 {
            let mut v = vec![0f32; t.numel()];
            checkpoint::dtype::decode_f32(t.dtype, ckpt.bytes(r), &mut v);
            v.iter().for_each(|x| data.extend_from_slice(&x.to_le_bytes()));
            entries.push(safetensors::TensorEntry { dtype: Dtype::F32, begin, end: data.len(), ..t.clone() });
        } else {
            data.extend_from_slice(ckpt.bytes(r));
            entries.push(safetensors::TensorEntry { begin, end: data.len(), ..t.clone() });
        }
    }
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    let mut bytes = safetensors::write_header(Some(&meta), &entries);
    bytes.extend_from_slice(&data);
    std::fs::write(tmp.join("model.safetensors"), bytes).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_string_lossy().into_owned();
        if file.ends_with(".safetensors") || file.ends_with(".index.json") || !p.is_file() {
            continue;
        }
        if file == "config.json" {
            let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["torch_dtype"] = "float32".into();
            std::fs::write(tmp.join(file), serde_json::to_string_pretty(&c).unwrap()).unwrap();
        } else {
            std::fs::copy(&p, tmp.join(file)).unwrap();
        }
    }
    // Another test process may have finished first: then use its copy.
    if std::fs::rename(&tmp, &out).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(out.join("config.json").is_file(), "f32 copy `{}` could not be installed", out.display());
    }
    out
}
