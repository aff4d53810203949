//! Direction and candidate files: the one on-disk format for refusal directions, written by `find` and
//! read by `edit`, `diff`, `verify` and the hooks (`generate --ablate`).
//!
//! - A **direction file** is a safetensors file holding a 1-D tensor `direction` of length hidden_size
//!   (F32 or F64, any norm: the raw difference in means of method.md §4) and string metadata (`layer`,
//!   `position`, `source`, ...). [`Direction::load`] reads one.
//! - A **candidates file** holds every candidate of method.md §4 at once: a tensor `candidates` of shape
//!   `[positions, layers, hidden]` (F32 or F64), metadata `positions` (a JSON list of the negative
//!   positions, in axis order, e.g. `[-6, -5, -4, -3, -2, -1]`) and `layers` (a JSON list, `[0, 1, ...]`).
//!   [`Candidates::load`] reads one; [`Candidates::direction`] picks `(position, layer)` from it.
//! - [`Direction::open`] accepts either, so every command that takes `--direction FILE` also takes a
//!   candidates file with `--candidate POS,LAYER`.
//!
//! Everything is validated before use: shape, dtype, NaN and infinities, and the norm, computed with
//! scaling so that huge or tiny finite values neither overflow nor underflow ([`norm`]). A direction
//! whose norm is not a normal positive number is refused: normalising it would give a zero or
//! meaningless unit vector and an edit that silently does nothing. This crate never writes a file except
//! through [`write`] and [`Candidates::write`], and never opens an input for writing.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use checkpoint::{Dtype, dtype, safetensors};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub mod derive;
pub mod interchange;
pub mod set;
pub use set::{Basis, Directions, Layout};

/// The name of the tensor in a direction file.
pub const TENSOR: &str = "direction";
/// The name of the tensor in a candidates file.
pub const CANDIDATES_TENSOR: &str = "candidates";
/// The name of the tensor in a means file: mean activations (e.g. of the harmless prompts) in the layout of a
/// candidates file, `[positions, layers, hidden]` (what projected and biprojected directions need; `find`
/// can write it beside its candidates).
pub const MEANS_TENSOR: &str = "means";

/// A validated direction: finite, with a normal positive norm.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// The raw vector as stored (F32 widened exactly to f64).
    pub values: Vec<f64>,
    pub dtype: Dtype,
    /// `__metadata__` of the file (for a candidate: the candidates file's, with its `position` and
    /// `layer`).
    pub metadata: Map<String, Value>,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectionError {
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("direction file `{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("direction file `{}`: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

pub type Result<T, E = DirectionError> = std::result::Result<T, E>;

/// One candidate of a candidates file: a position counted from the end of the prompt (-1 is the last
/// prompt token) and a 0-based layer (the residual stream entering that layer). Parsed from `POS,LAYER`,
/// e.g. `-1,22`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Candidate {
    pub position: i64,
    pub layer: usize,
}

impl FromStr for Candidate {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Candidate, String> {
        let bad = || format!("`{s}` is not POS,LAYER (e.g. `-1,22`: position -1, layer 22)");
        let (p, l) = s.split_once(',').ok_or_else(bad)?;
        let position: i64 = p.trim().parse().map_err(|_| bad())?;
        let layer: usize = l.trim().parse().map_err(|_| bad())?;
        if position >= 0 {
            return Err(format!(
                "`{s}`: the position is counted from the end of the prompt and must be negative (-1 is the last token)"
            ));
        }
        Ok(Candidate { position, layer })
    }
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.position, self.layer)
    }
}

/// `||v||_2` in f64 without overflow or underflow: values are rescaled by an exact power of two when
/// their largest magnitude is beyond `2^±500`, so for every other input the result is bit-identical to
/// the plain `sqrt(Σ v²)` (method.md §6, numerical recipe step 2). NaN in gives NaN; an infinite value
/// gives infinity.
pub fn norm(values: &[f64]) -> f64 {
    let max = values.iter().fold(0f64, |m, v| if v.abs() > m || v.is_nan() { v.abs() } else { m });
    if max.is_nan() || max.is_infinite() || max == 0.0 {
        return max;
    }
    const BIG: f64 = 3.273390607896142e150; // 2^500
    const SMALL: f64 = 3.054936363499605e-151; // 2^-500
    // Exact powers of two (2^-600, 2^600): multiplying by them changes no bit of a mantissa.
    let scale = if max > BIG {
        f64::from_bits((1023u64 - 600) << 52)
    } else if max < SMALL {
        f64::from_bits((1023u64 + 600) << 52)
    } else {
        1.0
    };
    let sum: f64 = values.iter().map(|v| (v * scale) * (v * scale)).sum();
    sum.sqrt() / scale
}

/// Checks a raw vector for use as a direction: finite values and a normal positive norm. `what` names
/// it in the message.
pub(crate) fn check_values(values: &[f64], what: &str) -> std::result::Result<(), String> {
    if let Some(i) = values.iter().position(|v| v.is_nan()) {
        return Err(format!("{what} contains NaN (at index {i})"));
    }
    if let Some(i) = values.iter().position(|v| v.is_infinite()) {
        return Err(format!("{what} contains an infinite value (at index {i})"));
    }
    let n = norm(values);
    if n == 0.0 {
        return Err(format!("{what} is the zero vector, which has no direction"));
    }
    if !n.is_normal() {
        return Err(format!(
            "{what} has norm {n:e}, which is not a normal positive number, so it cannot be normalised reliably \
             (rescale the vector)"
        ));
    }
    Ok(())
}

/// The file's bytes, its parsed header and the one tensor named `name` (with its values as f64).
pub(crate) struct Loaded {
    pub(crate) bytes: Vec<u8>,
    pub(crate) metadata: Map<String, Value>,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) values: Vec<f64>,
}

pub(crate) fn read_file(path: &Path) -> Result<(Vec<u8>, safetensors::Header)> {
    let bytes = std::fs::read(path).map_err(|cause| DirectionError::Io { path: path.to_path_buf(), cause })?;
    let header = safetensors::parse(&bytes).map_err(|e| DirectionError::Invalid {
        path: path.to_path_buf(),
        problem: format!("not a valid safetensors file: {e}"),
    })?;
    Ok((bytes, header))
}

fn tensor_names(header: &safetensors::Header) -> String {
    let names: Vec<_> = header.tensors.iter().map(|t| format!("`{}`", t.name)).collect();
    if names.is_empty() { "none".to_string() } else { names.join(", ") }
}

pub(crate) fn take_tensor(path: &Path, bytes: Vec<u8>, header: safetensors::Header, name: &str) -> Result<Loaded> {
    let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
    let t = header
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| bad(format!("has no tensor `{name}` (found {})", tensor_names(&header))))?;
    if !matches!(t.dtype, Dtype::F32 | Dtype::F64) {
        return Err(bad(format!("`{name}` has dtype {}; F32 or F64 expected", t.dtype)));
    }
    let start = header.data_start();
    let mut values = vec![0f64; t.numel()];
    dtype::decode_f64(t.dtype, &bytes[start + t.begin..start + t.end], &mut values);
    let (dtype, shape) = (t.dtype, t.shape.clone());
    Ok(Loaded { metadata: header.metadata.unwrap_or_default(), bytes, dtype, shape, values })
}

impl Direction {
    /// Reads and validates a direction file for a model with `hidden_size`.
    pub fn load(path: &Path, hidden_size: usize) -> Result<Direction> {
        let (bytes, header) = read_file(path)?;
        Direction::from_direction_file(path, bytes, header, hidden_size)
    }

    /// Reads a direction file, or one candidate of a candidates file: `candidate` must be given for a
    /// candidates file and must not be given for a direction file.
    pub fn open(path: &Path, hidden_size: usize, candidate: Option<Candidate>) -> Result<Direction> {
        let (bytes, header) = read_file(path)?;
        let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
        let has = |name: &str| header.tensors.iter().any(|t| t.name == name);
        match (has(TENSOR), has(CANDIDATES_TENSOR), candidate) {
            (true, _, None) => Direction::from_direction_file(path, bytes, header, hidden_size),
            (true, _, Some(c)) => Err(bad(format!(
                "holds one direction (tensor `{TENSOR}`), not candidates; drop --candidate {},{}",
                c.position, c.layer
            ))),
            (false, true, Some(c)) => {
                Candidates::from_file(path, bytes, header, hidden_size)?.direction(c).map_err(|e| match e {
                    CandidateError::Missing(problem) | CandidateError::Unusable(problem) => bad(problem),
                })
            }
            (false, true, None) => Err(bad(format!(
                "is a candidates file (tensor `{CANDIDATES_TENSOR}`); choose one with --candidate POS,LAYER"
            ))),
            (false, false, _) => {
                Err(bad(format!("has no tensor `{TENSOR}` or `{CANDIDATES_TENSOR}` (found {})", tensor_names(&header))))
            }
        }
    }

    fn from_direction_file(
        path: &Path,
        bytes: Vec<u8>,
        header: safetensors::Header,
        hidden_size: usize,
    ) -> Result<Direction> {
        let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
        let t = take_tensor(path, bytes, header, TENSOR)?;
        if t.shape.len() != 1 {
            return Err(bad(format!("`{TENSOR}` must be 1-D, found shape {:?}", t.shape)));
        }
        if t.shape[0] != hidden_size {
            return Err(bad(format!(
                "`{TENSOR}` has length {} but the model's hidden_size is {hidden_size}",
                t.shape[0]
            )));
        }
        check_values(&t.values, &format!("`{TENSOR}`")).map_err(bad)?;
        Ok(Direction {
            values: t.values,
            dtype: t.dtype,
            metadata: t.metadata,
            sha256: sha256_hex(&t.bytes),
            path: path.to_path_buf(),
        })
    }

    /// `||r||_2` in f64, no epsilon, safely scaled ([`norm`]; method.md §6, numerical recipe step 2).
    pub fn norm(&self) -> f64 {
        norm(&self.values)
    }

    /// `r̂ = r / ||r||` in f64.
    pub fn unit(&self) -> Vec<f64> {
        let n = self.norm();
        self.values.iter().map(|v| v / n).collect()
    }

    /// A string metadata field.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

/// Every candidate `r[position, layer]` of method.md §4, validated (finite values; zero candidates are
/// allowed in the file, e.g. the degenerate layer-0 ones, but cannot be used as a direction).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// `[positions, layers, hidden]`, row-major.
    values: Vec<f64>,
    /// The position of each index of the first axis (negative, counted from the end).
    positions: Vec<i64>,
    layers: usize,
    hidden: usize,
    pub dtype: Dtype,
    pub metadata: Map<String, Value>,
    pub sha256: String,
    pub path: PathBuf,
}

/// Why a candidate cannot be taken from a candidates file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CandidateError {
    /// The file has no such position or layer.
    #[error("{0}")]
    Missing(String),
    /// The candidate is not a usable direction (zero, or a norm that is not a normal number).
    #[error("{0}")]
    Unusable(String),
}

/// Parses a metadata field holding a JSON list of integers.
fn int_list(metadata: &Map<String, Value>, key: &str) -> Option<std::result::Result<Vec<i64>, String>> {
    let text = metadata.get(key)?;
    let parsed = text
        .as_str()
        .and_then(|s| serde_json::from_str::<Vec<i64>>(s).ok())
        .ok_or_else(|| format!("metadata `{key}` is {text}, not a JSON list of integers such as \"[-2, -1]\""));
    Some(parsed)
}

impl Candidates {
    /// Reads and validates a candidates file for a model with `hidden_size`.
    pub fn load(path: &Path, hidden_size: usize) -> Result<Candidates> {
        let (bytes, header) = read_file(path)?;
        Candidates::from_file(path, bytes, header, hidden_size)
    }

    /// Reads a means file (tensor [`MEANS_TENSOR`], the layout of a candidates file).
    pub fn load_means(path: &Path, hidden_size: usize) -> Result<Candidates> {
        let (bytes, header) = read_file(path)?;
        Candidates::from_named(path, bytes, header, hidden_size, MEANS_TENSOR)
    }

    fn from_file(path: &Path, bytes: Vec<u8>, header: safetensors::Header, hidden_size: usize) -> Result<Candidates> {
        Candidates::from_named(path, bytes, header, hidden_size, CANDIDATES_TENSOR)
    }

    fn from_named(
        path: &Path,
        bytes: Vec<u8>,
        header: safetensors::Header,
        hidden_size: usize,
        name: &str,
    ) -> Result<Candidates> {
        let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
        let t = take_tensor(path, bytes, header, name)?;
        let &[n_pos, layers, hidden] = t.shape.as_slice() else {
            return Err(bad(format!("`{name}` must have shape [positions, layers, hidden], found {:?}", t.shape)));
        };
        if hidden != hidden_size {
            return Err(bad(format!("`{name}` has hidden size {hidden} but the model's hidden_size is {hidden_size}")));
        }
        if n_pos == 0 || layers == 0 {
            return Err(bad(format!("`{name}` has shape {:?}: no candidates", t.shape)));
        }
        let positions = match int_list(&t.metadata, "positions") {
            None => (-(n_pos as i64)..0).collect(),
            Some(p) => p.map_err(bad)?,
        };
        if positions.len() != n_pos || positions.iter().any(|&p| p >= 0) {
            return Err(bad(format!(
                "metadata `positions` {positions:?} must list {n_pos} negative positions (the first axis of \
                 `{name}`)"
            )));
        }
        if let Some(l) = int_list(&t.metadata, "layers") {
            let l = l.map_err(bad)?;
            if l != (0..layers as i64).collect::<Vec<_>>() {
                return Err(bad(format!(
                    "metadata `layers` must be the layers 0..{} in order (the second axis of `{name}`)",
                    layers - 1
                )));
            }
        }
        if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
            let (p, rest) = (i / (layers * hidden), i % (layers * hidden));
            return Err(bad(format!(
                "candidate ({}, {}) contains a NaN or infinite value (at index {})",
                positions[p],
                rest / hidden,
                rest % hidden
            )));
        }
        Ok(Candidates {
            values: t.values,
            positions,
            layers,
            hidden,
            dtype: t.dtype,
            metadata: t.metadata,
            sha256: sha256_hex(&t.bytes),
            path: path.to_path_buf(),
        })
    }

    /// Positions of the first axis, in order.
    pub fn positions(&self) -> &[i64] {
        &self.positions
    }

    /// Number of layers (the second axis).
    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The raw vector of a candidate.
    pub fn get(&self, c: Candidate) -> std::result::Result<&[f64], CandidateError> {
        let p = self.positions.iter().position(|&p| p == c.position).ok_or_else(|| {
            CandidateError::Missing(format!(
                "has no candidate at position {} (positions: {:?})",
                c.position, self.positions
            ))
        })?;
        if c.layer >= self.layers {
            return Err(CandidateError::Missing(format!(
                "has no candidate at layer {} (layers 0..={})",
                c.layer,
                self.layers - 1
            )));
        }
        let at = (p * self.layers + c.layer) * self.hidden;
        Ok(&self.values[at..at + self.hidden])
    }

    /// One candidate as a [`Direction`] (metadata: the file's, plus `position`, `layer` and
    /// `candidates_file`), refused if its norm is not a normal positive number.
    pub fn direction(&self, c: Candidate) -> std::result::Result<Direction, CandidateError> {
        let values = self.get(c)?.to_vec();
        check_values(&values, &format!("candidate {c}")).map_err(CandidateError::Unusable)?;
        let mut metadata = self.metadata.clone();
        metadata.remove("positions");
        metadata.remove("layers");
        metadata.insert("position".into(), Value::String(c.position.to_string()));
        metadata.insert("layer".into(), Value::String(c.layer.to_string()));
        metadata.insert("candidates_file".into(), Value::String(self.path.display().to_string()));
        Ok(Direction { values, dtype: self.dtype, metadata, sha256: self.sha256.clone(), path: self.path.clone() })
    }

    /// Projected candidates (docs/variants.md, "Projected"): every candidate `r[p, l]` without its component
    /// along the harmless mean of the same site, `r − (r·μ̂) μ̂` ([`derive::orthogonalize`]), not renormalized.
    /// `means` must have the same positions, layers and hidden size (find writes both). A zero candidate
    /// stays zero (it is not usable either way); a site whose mean is zero, or whose candidate lies along
    /// it, is refused, naming it. The result is in memory: its `sha256` is that of the candidates and the
    /// means together, its metadata records both.
    pub fn projected(&self, means: &Candidates) -> std::result::Result<Candidates, String> {
        if means.positions != self.positions || means.layers != self.layers || means.hidden != self.hidden {
            return Err(format!(
                "the means file `{}` ({} positions {:?}, {} layers, hidden {}) does not match the candidates `{}` \
                 ({} positions {:?}, {} layers, hidden {})",
                means.path.display(),
                means.positions.len(),
                means.positions,
                means.layers,
                means.hidden,
                self.path.display(),
                self.positions.len(),
                self.positions,
                self.layers,
                self.hidden
            ));
        }
        let mut values = Vec::with_capacity(self.values.len());
        for (i, (r, mu)) in self.values.chunks(self.hidden).zip(means.values.chunks(self.hidden)).enumerate() {
            if r.iter().all(|&x| x == 0.0) {
                values.extend_from_slice(r);
                continue;
            }
            let site = Candidate { position: self.positions[i / self.layers], layer: i % self.layers };
            values.extend(derive::orthogonalize(r, &[mu]).map_err(|e| format!("candidate {site}: {e}"))?);
        }
        let mut metadata = self.metadata.clone();
        metadata.insert(
            "projected".into(),
            Value::String(format!(
                "each candidate orthogonalized against the harmless mean of its site, from `{}` (sha256 {})",
                means.path.display(),
                means.sha256
            )),
        );
        Ok(Candidates {
            values,
            positions: self.positions.clone(),
            layers: self.layers,
            hidden: self.hidden,
            dtype: Dtype::F64,
            metadata,
            sha256: sha256_hex(format!("{} projected against {}", self.sha256, means.sha256).as_bytes()),
            path: self.path.clone(),
        })
    }

    /// Writes a candidates file: `values` `[positions, layers, hidden]` row-major as F32 or F64, with
    /// `positions` and `layers` recorded in the metadata beside `metadata`.
    pub fn write(
        path: &Path,
        values: &[f64],
        positions: &[i64],
        layers: usize,
        dtype: Dtype,
        metadata: &Map<String, Value>,
    ) -> std::io::Result<()> {
        Candidates::write_named(path, CANDIDATES_TENSOR, values, positions, layers, dtype, metadata)
    }

    /// [`Candidates::write`] with another tensor name: [`MEANS_TENSOR`] makes a means file
    /// ([`Candidates::load_means`]).
    pub fn write_named(
        path: &Path,
        name: &str,
        values: &[f64],
        positions: &[i64],
        layers: usize,
        dtype: Dtype,
        metadata: &Map<String, Value>,
    ) -> std::io::Result<()> {
        assert!(matches!(dtype, Dtype::F32 | Dtype::F64), "candidates files hold F32 or F64");
        let hidden = values.len() / (positions.len() * layers).max(1);
        assert_eq!(values.len(), positions.len() * layers * hidden, "values are [positions, layers, hidden]");
        let mut meta = metadata.clone();
        meta.insert("positions".into(), Value::String(format!("{positions:?}")));
        meta.insert("layers".into(), Value::String(format!("{:?}", (0..layers).collect::<Vec<_>>())));
        meta.insert("axis_order".into(), Value::String("position, layer, hidden".into()));
        write_tensor(path, name, values, &[positions.len(), layers, hidden], dtype, &meta)
    }
}

fn write_tensor(
    path: &Path,
    name: &str,
    values: &[f64],
    shape: &[usize],
    dtype: Dtype,
    metadata: &Map<String, Value>,
) -> std::io::Result<()> {
    write_tensors(path, &[(name, values, shape.to_vec())], dtype, metadata)
}

/// Writes several tensors (name, values, shape), in order, into one safetensors file.
pub(crate) fn write_tensors(
    path: &Path,
    tensors: &[(&str, &[f64], Vec<usize>)],
    dtype: Dtype,
    metadata: &Map<String, Value>,
) -> std::io::Result<()> {
    let mut data = Vec::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, values, shape) in tensors {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "tensor `{name}`: values match the shape");
        let begin = data.len();
        dtype::encode_f64(dtype, values, &mut data);
        entries.push(safetensors::TensorEntry {
            name: name.to_string(),
            dtype,
            shape: shape.clone(),
            begin,
            end: data.len(),
        });
    }
    let mut bytes = safetensors::write_header(Some(metadata), &entries);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes)
}

/// Writes a direction file: `values` as F32 or F64 with string metadata. Used by `find` and tests.
pub fn write(path: &Path, values: &[f64], dtype: Dtype, metadata: &Map<String, Value>) -> std::io::Result<()> {
    assert!(matches!(dtype, Dtype::F32 | Dtype::F64), "direction files hold F32 or F64");
    write_tensor(path, TENSOR, values, &[values.len()], dtype, metadata)
}

/// The shape of tensor `name` in a safetensors file (None if absent), read from its header alone.
pub fn tensor_shape(path: &Path, name: &str) -> Result<Option<Vec<usize>>> {
    let (_, header) = read_file(path)?;
    Ok(header.tensors.iter().find(|t| t.name == name).map(|t| t.shape.clone()))
}

/// A tensor read whole: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f64>);

/// Every tensor of a safetensors file with its shape and values (float types only), in file order.
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    let (bytes, header) = read_file(path)?;
    let start = header.data_start();
    let mut out = Vec::new();
    for t in &header.tensors {
        if !matches!(t.dtype, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16) {
            return Err(DirectionError::Invalid {
                path: path.to_path_buf(),
                problem: format!("tensor `{}` has dtype {}; a float type expected", t.name, t.dtype),
            });
        }
        let mut v = vec![0f64; t.numel()];
        dtype::decode_f64(t.dtype, &bytes[start + t.begin..start + t.end], &mut v);
        out.push((t.name.clone(), t.shape.clone(), v));
    }
    Ok(out)
}

/// Lowercase hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
