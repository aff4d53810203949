//! What an edit (or its hooks) removes, and where: orthonormal bases of directions, one shared by every
//! residual writer or one per decoder layer (docs/variants.md).
//!
//! - [`Basis`]: `k` orthonormal vectors in f64, made from any linearly independent vectors by modified
//!   Gram-Schmidt with one reorthogonalization pass (MGS2), in the given order. For `k = 1` it is exactly
//!   `r̂ = r/||r||` as [`Direction::unit`] computes it, so the paper's edit keeps its bits.
//! - [`Directions`]: the basis each writer is orthogonalized against. Read from a direction file (one
//!   vector: the paper's edit), a **subspace file** (a `direction` tensor of shape `[k, hidden]`: remove
//!   `W' = W − V Vᵀ W`), a **per-layer file** (a `directions` tensor `[layers, hidden]` or
//!   `[layers, k, hidden]`: row `l` for the writers of decoder layer `l`, and optionally an `embedding`
//!   tensor `[hidden]` or `[k, hidden]` for the token embedding, which otherwise takes layer 0's), or one
//!   candidate of a candidates file.
//!
//! Validated like direction files (shape, dtype, finite values, independent vectors); never writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use checkpoint::Dtype;
use serde_json::{Map, Value};

use crate::{Candidate, Direction, DirectionError, Result, TENSOR, check_values, norm, read_file, take_tensor};

/// The tensor of a per-layer direction file: `[layers, hidden]` or `[layers, k, hidden]`.
pub const LAYERS_TENSOR: &str = "directions";
/// The optional embedding basis of a per-layer file: `[hidden]` or `[k, hidden]`.
pub const EMBEDDING_TENSOR: &str = "embedding";

/// A vector whose part outside the span of the ones before it is below this fraction of its norm is
/// refused as linearly dependent: normalising what is left would amplify rounding into a direction.
pub const DEPENDENT: f64 = 1e-6;

/// `k` orthonormal vectors of length `d`, row-major `[k, d]`, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Basis {
    d: usize,
    values: Vec<f64>,
}

impl Basis {
    /// An orthonormal basis of the span of `vectors` (each of length `d`), by MGS2 in order: each
    /// vector loses its components along the basis so far twice (the second pass removes what rounding
    /// left of the first), then is divided by its norm ([`norm`]). Err (naming the vector by index)
    /// when one is zero, not finite, or within [`DEPENDENT`] of the span of those before it.
    pub fn orthonormalize(vectors: &[&[f64]]) -> std::result::Result<Basis, String> {
        let d = vectors.first().map_or(0, |v| v.len());
        if vectors.is_empty() || d == 0 {
            return Err("no vectors".into());
        }
        let mut values: Vec<f64> = Vec::with_capacity(vectors.len() * d);
        for (m, v) in vectors.iter().enumerate() {
            if v.len() != d {
                return Err(format!("vector {m} has length {} but vector 0 has length {d}", v.len()));
            }
            check_values(v, &format!("vector {m}"))?;
            let n0 = norm(v);
            let mut w = v.to_vec();
            for _ in 0..2 {
                for e in values.chunks_exact(d) {
                    let h: f64 = w.iter().zip(e).map(|(x, y)| x * y).sum();
                    w.iter_mut().zip(e).for_each(|(x, y)| *x -= h * y);
                }
            }
            let n = norm(&w);
            if n <= DEPENDENT * n0 {
                return Err(format!(
                    "vector {m} lies in the span of the vectors before it (what is left of it has {:.1e} of its \
                     norm), so they do not span {} dimensions",
                    n / n0,
                    m + 1
                ));
            }
            values.extend(w.iter().map(|x| x / n));
        }
        Ok(Basis { d, values })
    }

    /// The basis `{r̂}` of one raw direction: `r / ||r||` exactly as [`Direction::unit`].
    pub fn of_direction(direction: &Direction) -> Basis {
        Basis { d: direction.values.len(), values: direction.unit() }
    }

    /// A basis from vectors already orthonormal (e.g. read back from our own file), `[k, d]` row-major.
    /// Used where a basis must be carried bit for bit; `orthonormalize` is the checked way in.
    pub fn from_orthonormal(d: usize, values: Vec<f64>) -> Basis {
        assert!(d > 0 && values.len().is_multiple_of(d) && !values.is_empty(), "a basis is [k, d] with k, d > 0");
        Basis { d, values }
    }

    /// Number of vectors.
    pub fn k(&self) -> usize {
        self.values.len() / self.d
    }

    /// Length of each vector.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Vector `m`.
    pub fn vector(&self, m: usize) -> &[f64] {
        &self.values[m * self.d..(m + 1) * self.d]
    }

    /// The vectors, `[k, d]` row-major.
    pub fn as_slice(&self) -> &[f64] {
        &self.values
    }

    pub fn vectors(&self) -> impl Iterator<Item = &[f64]> {
        self.values.chunks_exact(self.d)
    }

    /// `v − V Vᵀ v` (the coefficients `Vᵀ v` all taken from `v` itself, then subtracted in order).
    pub fn project_out(&self, v: &[f64]) -> Vec<f64> {
        let c: Vec<f64> = self.vectors().map(|e| e.iter().zip(v).map(|(a, b)| a * b).sum()).collect();
        let mut out = v.to_vec();
        for (e, c) in self.vectors().zip(c) {
            out.iter_mut().zip(e).for_each(|(x, y)| *x -= c * y);
        }
        out
    }
}

/// How a [`Directions`] was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One vector for every writer: the paper's edit.
    Single,
    /// One subspace of `k` vectors for every writer.
    Subspace,
    /// One basis per decoder layer (and one for the embedding).
    PerLayer,
}

impl Layout {
    pub fn label(self) -> &'static str {
        match self {
            Layout::Single => "single",
            Layout::Subspace => "subspace",
            Layout::PerLayer => "per_layer",
        }
    }
}

/// The basis every residual writer is orthogonalized against, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Directions {
    pub layout: Layout,
    /// One basis per decoder layer (all the same `Arc` unless per-layer).
    layers: Vec<Arc<Basis>>,
    embedding: Arc<Basis>,
    /// The direction itself for [`Layout::Single`] (raw, with its metadata): what `find`'s tools and the
    /// manifest report.
    pub single: Option<Direction>,
    pub dtype: Dtype,
    pub metadata: Map<String, Value>,
    /// sha256 of the file's bytes.
    pub sha256: String,
    pub path: PathBuf,
}

impl From<Direction> for Directions {
    fn from(d: Direction) -> Directions {
        Directions::single(d, 0)
    }
}

impl Directions {
    /// One direction for every writer of a model with `layers` decoder layers.
    pub fn single(d: Direction, layers: usize) -> Directions {
        let b = Arc::new(Basis::of_direction(&d));
        Directions {
            layout: Layout::Single,
            layers: vec![b.clone(); layers],
            embedding: b,
            dtype: d.dtype,
            metadata: d.metadata.clone(),
            sha256: d.sha256.clone(),
            path: d.path.clone(),
            single: Some(d),
        }
    }

    /// One direction per decoder layer, `rows` `[layers, d]` row-major (any norms; each is normalized), the
    /// embedding taking layer 0's: what a per-layer file of one vector per layer holds, made in memory
    /// (e.g. from [`crate::derive::per_layer`]). A zero or non-finite row is refused, naming its layer.
    pub fn per_layer_rows(rows: &[f64], layers: usize) -> std::result::Result<Directions, String> {
        if layers == 0 || rows.is_empty() || !rows.len().is_multiple_of(layers) {
            return Err(format!("{} values are not [{layers}, d] per-layer directions", rows.len()));
        }
        let d = rows.len() / layers;
        let bases = rows
            .chunks_exact(d)
            .enumerate()
            .map(|(l, r)| {
                if norm(r) == 0.0 {
                    return Err(format!("layer {l}: the direction is zero"));
                }
                subspace(r, 1, d, &format!("layer {l}")).map(Arc::new)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Directions {
            layout: Layout::PerLayer,
            embedding: bases[0].clone(),
            layers: bases,
            single: None,
            dtype: Dtype::F64,
            metadata: Map::new(),
            sha256: String::new(),
            path: PathBuf::new(),
        })
    }

    /// Reads any direction-like file for a model with `layers` decoder layers of width `hidden`: a
    /// direction file, a subspace file, a per-layer file, or (with `candidate`) a candidates file.
    pub fn open(path: &Path, hidden: usize, layers: usize, candidate: Option<Candidate>) -> Result<Directions> {
        let (bytes, header) = read_file(path)?;
        let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
        let find = |name: &str| header.tensors.iter().find(|t| t.name == name).map(|t| t.shape.clone());
        if let Some(shape) = find(TENSOR)
            && shape.len() == 2
        {
            if candidate.is_some() {
                return Err(bad(
                    "holds a subspace (tensor `direction` [k, hidden]), not candidates; drop --candidate".into()
                ));
            }
            let t = take_tensor(path, bytes.clone(), header, TENSOR)?;
            let (k, d) = (shape[0], shape[1]);
            if d != hidden {
                return Err(bad(format!("`{TENSOR}` has shape [{k}, {d}] but the model's hidden_size is {hidden}")));
            }
            let basis = subspace(&t.values, k, d, &format!("`{TENSOR}`")).map_err(bad)?;
            let b = Arc::new(basis);
            return Ok(Directions {
                layout: Layout::Subspace,
                layers: vec![b.clone(); layers],
                embedding: b,
                single: None,
                dtype: t.dtype,
                metadata: t.metadata,
                sha256: crate::sha256_hex(&bytes),
                path: path.to_path_buf(),
            });
        }
        if find(LAYERS_TENSOR).is_some() {
            if candidate.is_some() {
                return Err(bad(format!(
                    "holds per-layer directions (tensor `{LAYERS_TENSOR}`), not candidates; drop --candidate"
                )));
            }
            return per_layer(path, bytes, header, hidden, layers);
        }
        let d = Direction::open(path, hidden, candidate)?;
        Ok(Directions::single(d, layers))
    }

    /// The basis the writers of decoder layer `layer` are orthogonalized against; `None`: the embedding.
    pub fn for_layer(&self, layer: Option<usize>) -> &Arc<Basis> {
        match layer {
            None => &self.embedding,
            Some(l) => self.layers.get(l).unwrap_or(&self.embedding),
        }
    }

    /// Number of decoder layers it was made for (0 for a shared basis made without a model).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The largest number of vectors of any basis.
    pub fn k(&self) -> usize {
        self.layers.iter().map(|b| b.k()).chain([self.embedding.k()]).max().unwrap_or(1)
    }

    /// The same directions for a model with `layers` layers (a shared basis repeats; a per-layer one
    /// must already have that many).
    pub fn with_layers(mut self, layers: usize) -> Directions {
        if self.layout != Layout::PerLayer {
            self.layers = vec![self.embedding.clone(); layers];
        }
        self
    }
}

/// `[k, d]` raw vectors -> their orthonormal basis, or why not.
fn subspace(values: &[f64], k: usize, d: usize, what: &str) -> std::result::Result<Basis, String> {
    if k == 0 {
        return Err(format!("{what} holds no vectors"));
    }
    let rows: Vec<&[f64]> = values.chunks_exact(d).collect();
    Basis::orthonormalize(&rows).map_err(|e| format!("{what}: {e}"))
}

fn per_layer(
    path: &Path,
    bytes: Vec<u8>,
    header: checkpoint::safetensors::Header,
    hidden: usize,
    layers: usize,
) -> Result<Directions> {
    let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
    let embedding_shape = header.tensors.iter().find(|t| t.name == EMBEDDING_TENSOR).map(|t| t.shape.clone());
    let embedding_values = match &embedding_shape {
        Some(_) => Some(take_tensor(path, bytes.clone(), header.clone(), EMBEDDING_TENSOR)?.values),
        None => None,
    };
    let t = take_tensor(path, bytes.clone(), header, LAYERS_TENSOR)?;
    let (n, k, d) = match t.shape.as_slice() {
        &[n, d] => (n, 1, d),
        &[n, k, d] => (n, k, d),
        s => {
            return Err(bad(format!(
                "`{LAYERS_TENSOR}` must have shape [layers, hidden] or [layers, k, hidden], found {s:?}"
            )));
        }
    };
    if d != hidden {
        return Err(bad(format!("`{LAYERS_TENSOR}` has hidden size {d} but the model's hidden_size is {hidden}")));
    }
    if n != layers {
        return Err(bad(format!("`{LAYERS_TENSOR}` has {n} layers but the model has {layers}")));
    }
    let mut bases = Vec::with_capacity(n);
    for l in 0..n {
        let rows = &t.values[l * k * d..(l + 1) * k * d];
        bases.push(Arc::new(subspace(rows, k, d, &format!("layer {l} of `{LAYERS_TENSOR}`")).map_err(bad)?));
    }
    let embedding = match (embedding_shape, embedding_values) {
        (Some(shape), Some(values)) => {
            let ke = match shape.as_slice() {
                &[e] if e == hidden => 1,
                &[ke, e] if e == hidden => ke,
                s => {
                    return Err(bad(format!(
                        "`{EMBEDDING_TENSOR}` must have shape [{hidden}] or [k, {hidden}], found {s:?}"
                    )));
                }
            };
            Arc::new(subspace(&values, ke, d, &format!("`{EMBEDDING_TENSOR}`")).map_err(bad)?)
        }
        _ => bases[0].clone(),
    };
    Ok(Directions {
        layout: Layout::PerLayer,
        layers: bases,
        embedding,
        single: None,
        dtype: t.dtype,
        metadata: t.metadata,
        sha256: crate::sha256_hex(&bytes),
        path: path.to_path_buf(),
    })
}

/// Writes a subspace file: `vectors` (`[k, d]` row-major) as the `direction` tensor.
pub fn write_subspace(
    path: &Path,
    vectors: &[f64],
    k: usize,
    dtype: Dtype,
    metadata: &Map<String, Value>,
) -> std::io::Result<()> {
    assert!(k > 0 && vectors.len().is_multiple_of(k), "vectors are [k, d]");
    let d = vectors.len() / k;
    crate::write_tensors(path, &[(TENSOR, vectors, vec![k, d])], dtype, metadata)
}

/// Writes a per-layer file: `layers` (`[L, k, d]` row-major) and optionally the embedding's `[k_e, d]`.
pub fn write_per_layer(
    path: &Path,
    layers: &[f64],
    n_layers: usize,
    k: usize,
    embedding: Option<(&[f64], usize)>,
    dtype: Dtype,
    metadata: &Map<String, Value>,
) -> std::io::Result<()> {
    let d = layers.len() / (n_layers * k).max(1);
    assert_eq!(layers.len(), n_layers * k * d, "layers are [L, k, d]");
    let shape = if k == 1 { vec![n_layers, d] } else { vec![n_layers, k, d] };
    let mut tensors: Vec<(&str, &[f64], Vec<usize>)> = vec![(LAYERS_TENSOR, layers, shape)];
    if let Some((e, ke)) = embedding {
        tensors.push((EMBEDDING_TENSOR, e, if ke == 1 { vec![d] } else { vec![ke, d] }));
    }
    let mut meta = metadata.clone();
    meta.insert("layout".into(), Value::String("per_layer".into()));
    crate::write_tensors(path, &tensors, dtype, &meta)
}
