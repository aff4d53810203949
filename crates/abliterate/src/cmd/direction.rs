//! `abliterate direction ...`: derive and combine direction files (docs/variants.md): projected and protected
//! directions, subspaces (stacked or from the SVD of per-prompt differences), per-layer and interpolated
//! directions from a candidates file, biprojection against per-layer harmless means, and interchange with
//! llama.cpp control vectors, `.npy` and other tools' `.safetensors`. The math is `direction::derive` and
//! `direction::interchange`; this file reads inputs, writes outputs atomically (a temporary file beside OUT,
//! renamed when complete) and reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use checkpoint::Dtype;
use direction::interchange::{ControlVector, read_npy};
use direction::{Basis, Candidate, Candidates, Direction, derive, set};
use serde_json::{Map, Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
    /// Print a machine-readable summary on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Remove from a direction its components along protected directions (projected abliteration: protect
    /// the harmless mean). Writes a direction file.
    Orthogonalize {
        direction: PathBuf,
        /// A direction or subspace file whose vectors are protected (repeatable).
        #[arg(long, value_name = "FILE")]
        against: Vec<PathBuf>,
        /// A means file (harmless means, [positions, layers, hidden]): protect the mean at the direction's own
        /// position and layer (its metadata), or at --at.
        #[arg(long, value_name = "FILE")]
        means: Option<PathBuf>,
        /// Where in the means file, as POS,LAYER (default: the direction's `position` and `layer`).
        #[arg(long, value_name = "POS,LAYER", allow_hyphen_values = true)]
        at: Option<Candidate>,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// Biprojection: one direction, orthogonalized for each decoder layer against the harmless mean of the
    /// residual that layer writes into. Writes a per-layer file.
    Biproject {
        direction: PathBuf,
        #[arg(long, value_name = "FILE")]
        means: PathBuf,
        /// Position (from the end, -1 the last prompt token) of the means to use.
        #[arg(long, allow_hyphen_values = true)]
        position: i64,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// Stack directions into one subspace file (orthonormalized by MGS2 in the order given).
    Stack {
        #[arg(required = true, num_args = 2..)]
        files: Vec<PathBuf>,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// The top-k right singular vectors of per-prompt harmful-minus-harmless differences (pairs in order).
    /// Writes a subspace file.
    Svd {
        /// Harmful activations at one site: a safetensors file with an `activations` [n, hidden] tensor, or .npy.
        #[arg(long, value_name = "FILE")]
        harmful: PathBuf,
        #[arg(long, value_name = "FILE")]
        harmless: PathBuf,
        #[arg(short = 'k', long, default_value_t = 2)]
        k: usize,
        /// Centre the differences first (abliterix's variant; uncentred, the first vector follows the mean).
        #[arg(long)]
        center: bool,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// Per-layer directions from a candidates file: each layer's writers take the candidate of the residual
    /// they write into (the last layer the last candidate). Writes a per-layer file.
    PerLayer {
        candidates: PathBuf,
        #[arg(long, allow_hyphen_values = true)]
        position: i64,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// heretic's fractional direction index: normalize((1-t) r̂_a + t r̂_b) between the candidates of layers
    /// a = floor(INDEX) and a + 1. Writes a direction file.
    Interpolate {
        candidates: PathBuf,
        #[arg(long, allow_hyphen_values = true)]
        position: i64,
        #[arg(long)]
        index: f64,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// Import a llama.cpp control vector (.gguf), a .npy array or another tool's .safetensors tensor.
    Import {
        file: PathBuf,
        /// Our layer (the residual entering it) to take: control vector `direction.(LAYER-1)`, or row LAYER of a
        /// 2-D array. Writes a direction file.
        #[arg(long)]
        layer: Option<usize>,
        /// For a 2-D array: `subspace` (its rows span a subspace) or `per-layer` (row l for layer l).
        #[arg(long = "as", value_name = "LAYOUT")]
        layout: Option<ImportAs>,
        /// For a control vector without --layer: the model's number of decoder layers (a per-layer file).
        #[arg(long)]
        layers: Option<usize>,
        /// The tensor to take from a .safetensors file (default: its only tensor).
        #[arg(long)]
        tensor: Option<String>,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
    /// Export a direction as a llama.cpp control vector (`--control-vector FILE:COEFF` adds COEFF times it;
    /// use a negative coefficient to steer away from the direction).
    Export {
        direction: PathBuf,
        /// Our layers (residuals entering them, 1 or more) to write it at, e.g. `10-20`; default the
        /// direction's own `layer`. Layer ℓ is llama.cpp's `direction.(ℓ-1)`.
        #[arg(long, value_name = "RANGE")]
        layers: Option<String>,
        /// Multiply the raw vector by this.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        coeff: f64,
        /// `controlvector.model_hint` (the model's llama.cpp architecture name).
        #[arg(long, default_value = "llama")]
        model_hint: String,
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ImportAs {
    Subspace,
    PerLayer,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let summary = match args.command {
        Sub::Orthogonalize { direction, against, means, at, output } => {
            orthogonalize(&direction, &against, means.as_deref(), at, &output)?
        }
        Sub::Biproject { direction, means, position, output } => biproject(&direction, &means, position, &output)?,
        Sub::Stack { files, output } => stack(&files, &output)?,
        Sub::Svd { harmful, harmless, k, center, output } => svd(&harmful, &harmless, k, center, &output)?,
        Sub::PerLayer { candidates, position, output } => per_layer(&candidates, position, &output)?,
        Sub::Interpolate { candidates, position, index, output } => interpolate(&candidates, position, index, &output)?,
        Sub::Import { file, layer, layout, layers, tensor, output } => {
            import(&file, layer, layout, layers, tensor.as_deref(), &output)?
        }
        Sub::Export { direction, layers, coeff, model_hint, output } => {
            export(&direction, layers.as_deref(), coeff, &model_hint, &output)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary["summary"].as_str().unwrap_or(""));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes through a temporary file beside `out`, renamed into place only when complete.
fn atomically(out: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let name = out.file_name().with_context(|| format!("output `{}` has no file name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.abliterate-tmp-{}", name.to_string_lossy(), std::process::id()));
    let done = write(&tmp).and_then(|()| std::fs::rename(&tmp, out));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing `{}`", out.display()));
    }
    Ok(())
}

/// A direction file of any length.
fn load_direction(path: &Path) -> Result<Direction> {
    let shape = direction::tensor_shape(path, direction::TENSOR)?
        .with_context(|| format!("`{}` has no `direction` tensor", path.display()))?;
    let [d] = shape[..] else {
        bail!("`{}`: `direction` has shape {shape:?}; one vector (1-D) expected here", path.display())
    };
    Ok(Direction::load(path, d)?)
}

/// The raw vectors of a direction (1 vector) or subspace file (k vectors).
fn load_vectors(path: &Path) -> Result<Vec<Vec<f64>>> {
    let shape = direction::tensor_shape(path, direction::TENSOR)?
        .with_context(|| format!("`{}` has no `direction` tensor", path.display()))?;
    let tensors = direction::read_tensors(path)?;
    let (_, _, values) = tensors.into_iter().find(|(n, _, _)| n == direction::TENSOR).expect("the shape was found");
    let d = *shape.last().unwrap_or(&0);
    if d == 0 || shape.len() > 2 {
        bail!("`{}`: `direction` has shape {shape:?}; [hidden] or [k, hidden] expected", path.display());
    }
    Ok(values.chunks_exact(d).map(<[f64]>::to_vec).collect())
}

fn meta(pairs: &[(&str, String)]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("tool".into(), json!(format!("abliterate {}", env!("CARGO_PKG_VERSION"))));
    for (k, v) in pairs {
        m.insert((*k).into(), Value::String(v.clone()));
    }
    m
}

fn sha(path: &Path) -> Result<String> {
    Ok(direction::sha256_hex(&std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?))
}

fn norm(v: &[f64]) -> f64 {
    direction::norm(v)
}

fn orthogonalize(
    path: &Path,
    against: &[PathBuf],
    means: Option<&Path>,
    at: Option<Candidate>,
    out: &Path,
) -> Result<Value> {
    let r = load_direction(path)?;
    let d = r.values.len();
    let mut protect: Vec<Vec<f64>> = Vec::new();
    for f in against {
        protect.extend(load_vectors(f)?);
    }
    let mut where_mean = None;
    if let Some(m) = means {
        let c = match at {
            Some(c) => c,
            None => {
                let num = |k: &str| r.meta(k).and_then(|v| v.parse::<i64>().ok());
                let (Some(position), Some(layer)) = (num("position"), num("layer")) else {
                    bail!(
                        "`{}` records no `position` and `layer`; give the means' place with --at POS,LAYER",
                        path.display()
                    )
                };
                Candidate { position, layer: layer as usize }
            }
        };
        let means = Candidates::load_means(m, d)?;
        protect.push(means.get(c).map_err(|e| anyhow::anyhow!("means file `{}`: {e}", m.display()))?.to_vec());
        where_mean = Some(c);
    }
    if protect.is_empty() {
        bail!("nothing to orthogonalize against: give --against FILE or --means FILE");
    }
    let rows: Vec<&[f64]> = protect.iter().map(Vec::as_slice).collect();
    let v = derive::orthogonalize(&r.values, &rows).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
    let mut m = r.metadata.clone();
    m.extend(meta(&[
        ("derived", "orthogonalize".into()),
        ("from_sha256", r.sha256.clone()),
        ("protected", format!("{} vector(s)", protect.len())),
    ]));
    if let Some(c) = where_mean {
        m.insert("protected_mean_at".into(), json!(format!("{},{}", c.position, c.layer)));
    }
    atomically(out, |tmp| direction::write(tmp, &v, Dtype::F32, &m))?;
    let kept = norm(&v) / r.norm();
    Ok(json!({
        "summary": format!(
            "wrote `{}`: the direction without its component along {} protected vector(s); {:.4} of its norm is left \
             (cosine with the original {:.4})",
            out.display(), protect.len(), kept, kept
        ),
        "output": out.display().to_string(),
        "protected": protect.len(),
        "norm_kept": kept,
    }))
}

fn biproject(path: &Path, means: &Path, position: i64, out: &Path) -> Result<Value> {
    let r = load_direction(path)?;
    let m = Candidates::load_means(means, r.values.len())?;
    let (rows, sources) = derive::biproject(&r.values, &m, position).map_err(|e| anyhow::anyhow!("{e}"))?;
    let layers = m.layers();
    let md = meta(&[
        ("derived", "biproject".into()),
        ("from_sha256", r.sha256.clone()),
        ("means_sha256", sha(means)?),
        ("position", position.to_string()),
        ("source_residuals", format!("{sources:?}")),
    ]);
    atomically(out, |tmp| set::write_per_layer(tmp, &rows, layers, 1, None, Dtype::F32, &md))?;
    Ok(json!({
        "summary": format!("wrote `{}`: {layers} per-layer directions (layer l against the harmless mean of residual {sources:?}[l])", out.display()),
        "output": out.display().to_string(),
        "layers": layers,
        "source_residuals": sources,
    }))
}

fn stack(files: &[PathBuf], out: &Path) -> Result<Value> {
    let mut vectors = Vec::new();
    for f in files {
        vectors.extend(load_vectors(f)?);
    }
    let rows: Vec<&[f64]> = vectors.iter().map(Vec::as_slice).collect();
    let basis = Basis::orthonormalize(&rows).map_err(|e| anyhow::anyhow!("stacking: {e}"))?;
    let shas = files.iter().map(|f| sha(f)).collect::<Result<Vec<_>>>()?;
    let md = meta(&[("derived", "stack (MGS2, in order)".into()), ("from_sha256", shas.join(","))]);
    atomically(out, |tmp| set::write_subspace(tmp, basis.as_slice(), basis.k(), Dtype::F32, &md))?;
    Ok(json!({
        "summary": format!("wrote `{}`: a subspace of {} orthonormal directions", out.display(), basis.k()),
        "output": out.display().to_string(),
        "k": basis.k(),
    }))
}

/// Activations `[n, d]` from a safetensors file (`activations`, or its only tensor) or a .npy file.
fn load_activations(path: &Path) -> Result<(usize, Vec<f64>)> {
    let (shape, values) = if path.extension().is_some_and(|e| e == "npy") {
        read_npy(&std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?
    } else {
        let tensors = direction::read_tensors(path)?;
        let pick = if tensors.len() == 1 {
            0
        } else {
            tensors
                .iter()
                .position(|(n, _, _)| n == "activations")
                .with_context(|| format!("`{}` has several tensors and none is `activations`", path.display()))?
        };
        let (_, shape, values) = tensors.into_iter().nth(pick).expect("index found above");
        (shape, values)
    };
    let [_, d] = shape[..] else { bail!("`{}`: activations must be [n, hidden], found {shape:?}", path.display()) };
    Ok((d, values))
}

fn svd(harmful: &Path, harmless: &Path, k: usize, center: bool, out: &Path) -> Result<Value> {
    let (d, a) = load_activations(harmful)?;
    let (d2, b) = load_activations(harmless)?;
    if d != d2 {
        bail!("the harmful activations have hidden size {d}, the harmless {d2}");
    }
    let (basis, sv) = derive::top_k_svd(&a, &b, d, k, center).map_err(|e| anyhow::anyhow!("{e}"))?;
    let total: f64 = sv.iter().map(|s| s * s).sum();
    let explained: Vec<f64> = sv.iter().take(k).map(|s| s * s / total).collect();
    let md = meta(&[
        ("derived", format!("top-{k} SVD of per-prompt differences{}", if center { ", centred" } else { "" })),
        ("harmful_sha256", sha(harmful)?),
        ("harmless_sha256", sha(harmless)?),
        ("explained", format!("{explained:?}")),
    ]);
    atomically(out, |tmp| set::write_subspace(tmp, basis.as_slice(), k, Dtype::F32, &md))?;
    Ok(json!({
        "summary": format!(
            "wrote `{}`: the top {k} singular directions of {} differences, explaining {} of their energy",
            out.display(), a.len() / d,
            explained.iter().map(|e| format!("{e:.3}")).collect::<Vec<_>>().join(" + ")
        ),
        "output": out.display().to_string(),
        "k": k,
        "explained": explained,
        "singular_values": sv,
    }))
}

fn load_candidates(path: &Path) -> Result<Candidates> {
    let shape = direction::tensor_shape(path, direction::CANDIDATES_TENSOR)?
        .with_context(|| format!("`{}` has no `candidates` tensor", path.display()))?;
    let d = *shape.last().unwrap_or(&0);
    Ok(Candidates::load(path, d)?)
}

fn per_layer(path: &Path, position: i64, out: &Path) -> Result<Value> {
    let c = load_candidates(path)?;
    let (rows, sources) = derive::per_layer(&c, position).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
    let md = meta(&[
        ("derived", "per-layer candidates".into()),
        ("candidates_sha256", c.sha256.clone()),
        ("position", position.to_string()),
        ("source_residuals", format!("{sources:?}")),
    ]);
    let layers = c.layers();
    atomically(out, |tmp| set::write_per_layer(tmp, &rows, layers, 1, None, Dtype::F32, &md))?;
    Ok(json!({
        "summary": format!("wrote `{}`: {layers} per-layer directions (layer l from candidate residual {sources:?}[l])", out.display()),
        "output": out.display().to_string(),
        "layers": layers,
        "source_residuals": sources,
    }))
}

fn interpolate(path: &Path, position: i64, index: f64, out: &Path) -> Result<Value> {
    let c = load_candidates(path)?;
    let v = derive::interpolate(&c, position, index).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
    let md = meta(&[
        ("derived", "interpolate".into()),
        ("candidates_sha256", c.sha256.clone()),
        ("position", position.to_string()),
        ("index", index.to_string()),
        ("layer", (index.floor() as usize).to_string()),
    ]);
    atomically(out, |tmp| direction::write(tmp, &v, Dtype::F32, &md))?;
    Ok(json!({
        "summary": format!("wrote `{}`: the unit direction at fractional index {index} (position {position})", out.display()),
        "output": out.display().to_string(),
        "index": index,
    }))
}

fn import(
    path: &Path,
    layer: Option<usize>,
    layout: Option<ImportAs>,
    layers: Option<usize>,
    tensor: Option<&str>,
    out: &Path,
) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    let source = [
        ("imported_from", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        ("imported_sha256", direction::sha256_hex(&bytes)),
    ];
    if bytes.starts_with(b"GGUF") {
        let cv = ControlVector::from_gguf(&bytes).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
        let row = |n: usize| -> Result<Vec<f64>> {
            let v = cv.layers.get(&n).with_context(|| {
                format!(
                    "`{}` has no `direction.{n}` (it has {:?})",
                    path.display(),
                    cv.layers.keys().collect::<Vec<_>>()
                )
            })?;
            Ok(v.iter().map(|x| *x as f64).collect())
        };
        let mut md = meta(&source);
        md.insert("model_hint".into(), json!(cv.model_hint));
        if let Some(l) = layer {
            if l == 0 {
                bail!(
                    "--layer 0: a control vector cannot hold the residual entering layer 0 (llama.cpp has no direction.0)"
                );
            }
            let v = row(l - 1)?;
            md.insert("layer".into(), json!(l.to_string()));
            atomically(out, |tmp| direction::write(tmp, &v, Dtype::F32, &md))?;
            return Ok(json!({
                "summary": format!("wrote `{}`: control vector direction.{} as the direction at layer {l}", out.display(), l - 1),
                "output": out.display().to_string(),
            }));
        }
        let n = layers.context("a control vector holds one vector per layer: give --layer L for one, or --layers N (the model's decoder layers) for a per-layer file")?;
        // Block l adds to the residual it writes into, llama.cpp's direction.l; block 0 (no direction.0)
        // takes direction.1.
        let mut rows = Vec::new();
        for l in 0..n {
            rows.extend(row(l.max(1))?);
        }
        md.insert("source".into(), json!("block l <- direction.l (block 0 <- direction.1)"));
        atomically(out, |tmp| set::write_per_layer(tmp, &rows, n, 1, None, Dtype::F32, &md))?;
        return Ok(json!({
            "summary": format!("wrote `{}`: {n} per-layer directions from the control vector", out.display()),
            "output": out.display().to_string(),
        }));
    }
    let (shape, values) = if bytes.starts_with(b"\x93NUMPY") {
        read_npy(&bytes).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?
    } else {
        let tensors = direction::read_tensors(path)?;
        let pick = match tensor {
            Some(t) => tensors
                .iter()
                .position(|(n, _, _)| n == t)
                .with_context(|| format!("`{}` has no tensor `{t}`", path.display()))?,
            None if tensors.len() == 1 => 0,
            None => bail!(
                "`{}` has {} tensors ({}); choose one with --tensor",
                path.display(),
                tensors.len(),
                tensors.iter().map(|(n, _, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ")
            ),
        };
        let (_, shape, values) = tensors.into_iter().nth(pick).expect("index found above");
        (shape, values)
    };
    let md = meta(&source);
    match (shape.as_slice(), layer, layout) {
        ([_], None, None) => {
            atomically(out, |tmp| direction::write(tmp, &values, Dtype::F32, &md))?;
            Ok(
                json!({"summary": format!("wrote `{}`: one direction", out.display()), "output": out.display().to_string()}),
            )
        }
        ([rows, d], Some(l), None) => {
            if l >= *rows {
                bail!("--layer {l}: the array has {rows} rows");
            }
            let mut md = md;
            md.insert("layer".into(), json!(l.to_string()));
            let v = values[l * d..(l + 1) * d].to_vec();
            atomically(out, |tmp| direction::write(tmp, &v, Dtype::F32, &md))?;
            Ok(
                json!({"summary": format!("wrote `{}`: row {l} as the direction at layer {l}", out.display()), "output": out.display().to_string()}),
            )
        }
        ([k, d], None, Some(ImportAs::Subspace)) => {
            let rows: Vec<&[f64]> = values.chunks_exact(*d).collect();
            Basis::orthonormalize(&rows).map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
            atomically(out, |tmp| set::write_subspace(tmp, &values, *k, Dtype::F32, &md))?;
            Ok(
                json!({"summary": format!("wrote `{}`: a subspace of {k} directions", out.display()), "output": out.display().to_string()}),
            )
        }
        ([n, _], None, Some(ImportAs::PerLayer)) => {
            atomically(out, |tmp| set::write_per_layer(tmp, &values, *n, 1, None, Dtype::F32, &md))?;
            Ok(
                json!({"summary": format!("wrote `{}`: {n} per-layer directions", out.display()), "output": out.display().to_string()}),
            )
        }
        ([_, _], None, None) => bail!(
            "`{}` holds a 2-D array {shape:?}: say what it is with --as subspace|per-layer, or take one row with --layer",
            path.display()
        ),
        _ => bail!("`{}`: cannot import an array of shape {shape:?} with these options", path.display()),
    }
}

fn export(path: &Path, layers: Option<&str>, coeff: f64, model_hint: &str, out: &Path) -> Result<Value> {
    let r = load_direction(path)?;
    let wanted: Vec<usize> = match layers {
        Some(spec) => {
            let set = edit::LayerSet::parse(spec)?;
            (0..=set.max()).filter(|l| set.contains(*l)).collect()
        }
        None => vec![r.meta("layer").and_then(|l| l.parse().ok()).with_context(|| {
            format!("`{}` records no integer `layer`; say where to add it with --layers", path.display())
        })?],
    };
    if wanted.contains(&0) {
        bail!("layer 0 (the residual entering the first block) cannot be written: llama.cpp has no direction.0");
    }
    let v: Vec<f32> = r.values.iter().map(|x| (coeff * x) as f32).collect();
    let cv = ControlVector {
        model_hint: model_hint.to_string(),
        layers: wanted.iter().map(|l| (l - 1, v.clone())).collect(),
    };
    let bytes = cv.to_gguf();
    atomically(out, |tmp| std::fs::write(tmp, &bytes))?;
    Ok(json!({
        "summary": format!(
            "wrote `{}`: a llama.cpp control vector adding {coeff} × the direction at layer(s) {wanted:?} (direction.{:?}); \
             load it with --control-vector-scaled {} 1",
            out.display(), wanted.iter().map(|l| l - 1).collect::<Vec<_>>(), out.display()
        ),
        "output": out.display().to_string(),
        "gguf_tensors": wanted.iter().map(|l| format!("direction.{}", l - 1)).collect::<Vec<_>>(),
    }))
}
