//! The outputs of a run, written atomically: everything goes into a temporary directory beside OUT,
//! which is renamed into place only when complete (with `force`, an existing OUT is replaced only then).
//! OUT may not be, contain, or lie inside the model directory; the model is only read.
//!
//! Files: `direction.safetensors` (the chosen raw vector, F64, with string metadata), `candidates.safetensors`
//! (`[positions, layers, hidden]`, F64), `means.safetensors` (the harmless means in the same layout, tensor
//! `means`: what `abliterate direction orthogonalize --means` and `biproject --means` read), `scores.json`,
//! `report.md`, and the plots `bypass.svg`, `induce.svg`, `kl.svg`.

use std::io::Read;
use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::plot::{self, Chart};
use crate::report;
use crate::{FindError, Found, Result};

pub const DIRECTION: &str = "direction.safetensors";
pub const CANDIDATES: &str = "candidates.safetensors";
pub const MEANS: &str = "means.safetensors";
pub const SCORES: &str = "scores.json";
pub const REPORT: &str = "report.md";

/// What the outputs record about the model and the tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub model_dir: String,
    /// sha256 of the weights: of `model.safetensors` for one file; for shards, of the lines
    /// `<sha256>  <file name>\n` of every shard in name order.
    pub model_sha256: String,
    pub version: String,
}

impl Meta {
    /// Hashes the checkpoint's weight files (streamed with reads, not through the memory map, so the
    /// files do not become resident).
    pub fn for_checkpoint(ckpt: &Checkpoint) -> Result<Meta> {
        let hashes: Vec<(String, String)> =
            ckpt.shards.iter().map(|s| Ok((sha256_file(&s.path)?, s.file_name.clone()))).collect::<Result<_>>()?;
        let model_sha256 = match hashes.as_slice() {
            [(h, _)] => h.clone(),
            many => {
                let lines: String = many.iter().map(|(h, n)| format!("{h}  {n}\n")).collect();
                hex(&Sha256::digest(lines.as_bytes()))
            }
        };
        Ok(Meta {
            model_dir: ckpt.dir.display().to_string(),
            model_sha256,
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Opens the checkpoint of `dir` and hashes it.
    pub fn for_model(dir: &Path) -> Result<Meta> {
        let ckpt = Checkpoint::open(dir).map_err(|e| FindError::Output(e.to_string()))?;
        Meta::for_checkpoint(&ckpt)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |cause| FindError::Io { path: path.to_path_buf(), cause };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks OUT before any work: not the model directory, not inside it, not containing it, and absent
/// unless `force`. Creates nothing.
pub fn check(model_dir: &Path, out: &Path, force: bool) -> Result<()> {
    let model = model_dir.canonicalize().map_err(|cause| FindError::Io { path: model_dir.to_path_buf(), cause })?;
    let resolved = resolve(out)?;
    if resolved == model || resolved.starts_with(&model) {
        return Err(FindError::Output(format!(
            "output `{}` is the model directory or inside it; the model is only read, so choose another -o",
            out.display()
        )));
    }
    if model.starts_with(&resolved) {
        return Err(FindError::Output(format!(
            "output `{}` contains the model directory `{}`, so replacing it would delete the model; choose another -o",
            out.display(),
            model_dir.display()
        )));
    }
    if std::fs::symlink_metadata(out).is_ok() && !force {
        return Err(FindError::Output(format!(
            "output `{}` already exists; choose another -o, or pass --force to replace it once find has succeeded",
            out.display()
        )));
    }
    Ok(())
}

/// OUT with its deepest existing ancestor resolved (links followed), the rest appended.
fn resolve(out: &Path) -> Result<PathBuf> {
    let abs = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir().map_err(|cause| FindError::Io { path: out.to_path_buf(), cause })?.join(out)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut p = real;
            for part in rest.iter().rev() {
                p.push(part);
            }
            return Ok(p);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// The string metadata of `direction.safetensors`.
pub fn direction_metadata(found: &Found, meta: &Meta) -> Map<String, Value> {
    let c = found.chosen();
    let s = |v: Option<f64>| v.map_or("nan".to_string(), |v| format!("{v}"));
    let prompts: Map<String, Value> =
        found.sets.as_array().into_iter().map(|(n, i)| (n.to_string(), json!(i.sha256))).collect();
    let seed = match found.sampling {
        crate::Sampling::Paper => 42,
        crate::Sampling::Seed { seed } => seed,
    };
    let mut m = Map::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), Value::String(v));
    };
    put("layer", c.layer.to_string());
    put("position", c.position.to_string());
    put("token", report::token_at(found, c.position));
    put("bypass_score", s(c.bypass));
    put("induce_score", s(c.induce));
    put("kl_score", s(c.kl));
    put("norm", format!("{}", c.norm));
    put("rule", serde_json::to_string(&found.choice.rule).expect("serializable"));
    put("refusal_tokens", format!("{:?}", found.refusal.ids));
    put("model_sha256", meta.model_sha256.clone());
    put("prompts_sha256", Value::Object(prompts).to_string());
    put("sampling", serde_json::to_string(&found.sampling).expect("serializable"));
    put("seed", seed.to_string());
    put("system", serde_json::to_string(&found.system).expect("serializable"));
    put("source", "abliterate find: difference of mean residuals, harmful minus harmless (method.md §4)".to_string());
    put("abliterate_version", meta.version.clone());
    m
}

/// Writes every output into OUT (see the module docs). `check` should have been called before the run.
pub fn write(found: &Found, meta: &Meta, out: &Path, force: bool) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| FindError::Io { path, cause }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.abliterate-find-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = (|| -> Result<()> {
        let md = direction_metadata(found, meta);
        direction::write(&tmp.join(DIRECTION), found.direction(), Dtype::F64, &md).map_err(io(&tmp.join(DIRECTION)))?;
        let mut cm = Map::new();
        cm.insert("model_sha256".into(), json!(meta.model_sha256));
        cm.insert(
            "kept".into(),
            json!(format!(
                "harmful_train {} harmless_train {}",
                found.kept.harmful_train.len(),
                found.kept.harmless_train.len()
            )),
        );
        for (file, tensor, values, source) in [
            (
                CANDIDATES,
                direction::CANDIDATES_TENSOR,
                &found.candidates,
                "abliterate find: r[position, layer] = mean(harmful) − mean(harmless) (method.md §4)",
            ),
            (
                MEANS,
                direction::MEANS_TENSOR,
                &found.harmless_means,
                "abliterate find: mean(harmless)[position, layer] over the filtered harmless training prompts (method.md §4)",
            ),
        ] {
            cm.insert("source".into(), json!(source));
            cm.insert("abliterate_version".into(), json!(meta.version));
            direction::Candidates::write_named(
                &tmp.join(file),
                tensor,
                values,
                &found.positions,
                found.layers,
                Dtype::F64,
                &cm,
            )
            .map_err(io(&tmp.join(file)))?;
        }
        let scores = serde_json::to_vec_pretty(&report::scores_json(found, meta)).expect("serializable");
        std::fs::write(tmp.join(SCORES), scores).map_err(io(&tmp.join(SCORES)))?;
        std::fs::write(tmp.join(REPORT), report::markdown(found, meta)).map_err(io(&tmp.join(REPORT)))?;
        for chart in Chart::ALL {
            std::fs::write(tmp.join(chart.file()), plot::svg(found, chart)).map_err(io(&tmp.join(chart.file())))?;
        }
        if std::fs::symlink_metadata(out).is_ok() {
            if !force {
                return Err(FindError::Output(format!(
                    "output `{}` appeared while find ran; nothing replaced",
                    out.display()
                )));
            }
            let old = parent.join(format!(".{name}.abliterate-old-{}", std::process::id()));
            std::fs::rename(out, &old).map_err(io(out))?;
            std::fs::rename(&tmp, out).map_err(io(out))?;
            let removed = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
            removed.map_err(io(&old))?;
        } else {
            std::fs::rename(&tmp, out).map_err(io(out))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
