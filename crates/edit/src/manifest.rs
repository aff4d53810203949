//! `abliterate.json`: what was done to a checkpoint, with enough to check it.
//!
//! Per edited tensor, the ledger gives `|r̂ᵀW|` before and `|r̂ᵀW'|` after (recomputed from the
//! bytes actually written, i.e. after rounding to the stored dtype). `|r̂ᵀW|` is the 2-norm of the
//! whole projection: `sqrt(Σ_q c_q²)` over every column `q` of the writer view (every column of
//! a weight, every row of an embedding, every column of every fused expert), where `c_q` is the
//! component along the unit vector the tensor was edited against (`r̂`, or Gemma 2/3's `ŝ`). It is
//! also given relative to `||W||_F`. Nothing in the manifest depends on time, thread count or OUT.

use serde_json::{Map, Value, json};

use crate::LayerKernel;
use crate::plan::{LayerSet, Options, Plan};
use crate::{Direction, Directions};

/// One file of the input or the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Path relative to the model (or output) directory, `/`-separated.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The measured effect of the edit on one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Ledger {
    pub name: String,
    pub file: String,
    /// `attn_out`, `mlp_down`, `embedding`, ... (`_bias` for biases).
    pub kind: String,
    pub layer: Option<usize>,
    pub expert: Option<usize>,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// `r`, or the post-norm whose gain weights the direction.
    pub against: String,
    /// The scale applied (`--scale` times the layer kernel's weight).
    pub scale: f64,
    /// The layer kernel's weight.
    pub weight: f64,
    /// Vectors in the basis removed (1: one direction).
    pub k: usize,
    /// Norm-preserving edits: `max_q | ||w'_q|| / ||w_q|| − 1 |` over the columns, as stored.
    pub norm_drift: Option<f64>,
    /// `|uᵀW|`: 2-norm of the projection of the original tensor.
    pub proj_before: f64,
    /// `|uᵀW'|` of the stored (rounded) edited tensor.
    pub proj_after: f64,
    /// `||W||_F` of the original.
    pub frobenius: f64,
    /// `max |W' − W|` over all entries, as stored.
    pub max_change: f64,
}

impl Ledger {
    /// `|uᵀW'| / |uᵀW|` (0 when the tensor had no component to remove).
    pub fn ratio(&self) -> f64 {
        if self.proj_before == 0.0 { 0.0 } else { self.proj_after / self.proj_before }
    }

    fn rel(&self, v: f64) -> f64 {
        if self.frobenius == 0.0 { 0.0 } else { v / self.frobenius }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "file": self.file,
            "kind": self.kind,
            "layer": self.layer,
            "expert": self.expert,
            "dtype": self.dtype,
            "shape": self.shape,
            "against": self.against,
            "scale": self.scale,
            "weight": self.weight,
            "k": self.k,
            "norm_drift": self.norm_drift,
            "proj_before": self.proj_before,
            "proj_after": self.proj_after,
            "ratio": self.ratio(),
            "proj_before_rel_frobenius": self.rel(self.proj_before),
            "proj_after_rel_frobenius": self.rel(self.proj_after),
            "frobenius": self.frobenius,
            "max_abs_change": self.max_change,
        })
    }
}

/// The outcome of an edit.
#[derive(Clone, Debug)]
pub struct Report {
    pub ledger: Vec<Ledger>,
    pub inputs: Vec<FileRecord>,
    pub outputs: Vec<FileRecord>,
    /// The manifest as written to `abliterate.json`.
    pub manifest: Value,
    /// Bytes written, manifest excluded.
    pub bytes_written: u64,
    /// Files of the model directory not carried over (weights in another format), relative paths.
    pub not_copied: Vec<String>,
}

impl Report {
    /// The largest `|uᵀW'| / |uᵀW|`, and its tensor.
    pub fn worst_ratio(&self) -> Option<&Ledger> {
        self.ledger.iter().max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
    }
}

fn files(records: &[FileRecord]) -> Value {
    Value::Array(records.iter().map(|r| json!({"path": r.path, "sha256": r.sha256, "bytes": r.bytes})).collect())
}

/// The options as recorded.
pub fn options_json(plan: &Plan) -> Value {
    options_to_json(&plan.options)
}

/// [`Options`] as recorded (`options` of `abliterate.json` and of `--dry-run --json`).
pub fn options_to_json(o: &Options) -> Value {
    json!({
        "scale": o.scale,
        "layers": o.layers.as_ref().map(|l| l.spec().to_string()),
        "skip_embeddings": o.skip_embeddings,
        "exclude": o.exclude,
        "keep_tie": o.keep_tie,
        "norm_preserving": o.norm_preserving,
        "kernel": (!o.kernel.is_identity()).then(|| o.kernel.to_json()),
    })
}

/// The inverse of [`options_to_json`]: the options an edit was made with, read back from its manifest (so
/// that `verify` can rebuild the edit's plan and hooks). Every field is required; a bad one is named.
pub fn options_from_json(v: &Value) -> std::result::Result<Options, String> {
    let field = |k: &str| v.get(k).ok_or(format!("`options.{k}` is missing"));
    let boolean = |k: &str| field(k)?.as_bool().ok_or(format!("`options.{k}` is not true or false"));
    let scale = field("scale")?.as_f64().filter(|s| s.is_finite()).ok_or("`options.scale` is not a finite number")?;
    let layers = match field("layers")? {
        Value::Null => None,
        Value::String(spec) => Some(spec.parse::<LayerSet>().map_err(|e| format!("`options.layers`: {e}"))?),
        x => return Err(format!("`options.layers` is {x}, not a layer list or null")),
    };
    let exclude = field("exclude")?
        .as_array()
        .and_then(|xs| xs.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or("`options.exclude` is not a list of strings")?;
    let kernel = LayerKernel::from_json(field("kernel")?).map_err(|e| format!("`options.kernel`: {e}"))?;
    Ok(Options {
        scale,
        layers,
        skip_embeddings: boolean("skip_embeddings")?,
        exclude,
        keep_tie: boolean("keep_tie")?,
        norm_preserving: boolean("norm_preserving")?,
        kernel,
    })
}

/// The plan as JSON (what `--dry-run --json` prints, and part of the manifest).
pub fn plan_json(plan: &Plan) -> Value {
    json!({
        "family": plan.family.name(),
        "options": options_json(plan),
        "edited": plan.edits.iter().map(|e| json!({
            "name": e.name,
            "file": e.file,
            "kind": e.kind_label(),
            "layer": e.writer.layer,
            "expert": e.writer.expert,
            "dtype": e.dtype.as_str(),
            "shape": e.shape,
            "bytes": e.bytes,
            "against": e.against.label(),
            "scale": e.scale,
            "weight": e.weight,
        })).collect::<Vec<_>>(),
        "edited_bytes": plan.edit_bytes(),
        "added": plan.added.iter().map(|a| json!({
            "name": a.name, "file": a.file, "copy_of": a.copy_of, "replaces_stored": a.replaces.is_some(),
            "dtype": a.dtype.as_str(), "shape": a.shape, "bytes": a.bytes,
        })).collect::<Vec<_>>(),
        "excluded": plan.excluded.iter().map(|x| json!({"name": x.name, "file": x.file, "reason": x.reason.to_string()})).collect::<Vec<_>>(),
        "exclude_patterns": plan.patterns.iter().map(|p| json!({"pattern": p.pattern, "matched": p.matched})).collect::<Vec<_>>(),
        "tie": plan.tie.label(),
        "tie_note": plan.tie_note(),
        "unchanged_tensors": plan.unchanged,
        "unchanged_bytes": plan.unchanged_bytes,
    })
}

pub fn direction_json(direction: &Direction) -> Value {
    json!({
        "file": direction.path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sha256": direction.sha256,
        "norm": direction.norm(),
        "dtype": direction.dtype.as_str(),
        "length": direction.values.len(),
        "metadata": Value::Object(direction.metadata.clone()),
    })
}

/// What the edit removed: the direction (as [`direction_json`]) for one vector; for a subspace or
/// per-layer directions the file, its layout, `k` and every layer's basis size.
pub fn directions_json(d: &Directions) -> Value {
    if let Some(single) = &d.single {
        return direction_json(single);
    }
    json!({
        "file": d.path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sha256": d.sha256,
        "layout": d.layout.label(),
        "k": d.k(),
        "dtype": d.dtype.as_str(),
        "length": d.for_layer(None).d(),
        "metadata": Value::Object(d.metadata.clone()),
    })
}

pub(crate) struct ManifestParts<'a> {
    pub plan: &'a Plan,
    pub direction: &'a Directions,
    pub model: &'a str,
    pub ledger: &'a [Ledger],
    pub inputs: &'a [FileRecord],
    pub outputs: &'a [FileRecord],
    /// Files not carried over (weights in another format).
    pub not_copied: &'a [String],
    /// The input's own `abliterate.json`, if it was itself an edit.
    pub previous: Option<Value>,
}

pub(crate) fn build(p: ManifestParts<'_>) -> Value {
    let mut m = Map::new();
    m.insert("tool".into(), json!("abliterate"));
    m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    m.insert("method".into(), json!("weight orthogonalization, docs/method.md §6"));
    m.insert("model".into(), json!(p.model));
    m.insert("direction".into(), directions_json(p.direction));
    m.insert("options".into(), options_json(p.plan));
    m.insert("tie".into(), json!(p.plan.tie.label()));
    m.insert("tie_note".into(), json!(p.plan.tie_note()));
    m.insert(
        "projection_definition".into(),
        json!(
            "proj = sqrt(sum over every column q of the writer view of (u . W[:, q])^2), u the unit vector the \
             tensor was edited against (r, or gain-weighted for Gemma 2/3 post-norm writers); proj_after is \
             computed from the stored (rounded) bytes; *_rel_frobenius divide by ||W||_F of the original"
        ),
    );
    m.insert("edited".into(), Value::Array(p.ledger.iter().map(Ledger::to_json).collect()));
    let plan = plan_json(p.plan);
    for key in ["added", "excluded", "exclude_patterns", "unchanged_tensors", "unchanged_bytes"] {
        m.insert(key.into(), plan[key].clone());
    }
    m.insert("inputs".into(), files(p.inputs));
    m.insert("outputs".into(), files(p.outputs));
    m.insert(
        "not_copied".into(),
        json!({
            "files": p.not_copied,
            "why": "weights in another format (or stale shards not in the index): they would hold the unedited model"
        }),
    );
    if let Some(prev) = p.previous {
        m.insert("previous_edit".into(), prev);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Profile, Tent};

    #[test]
    fn options_read_back_from_their_record_are_the_options() {
        let o = Options {
            scale: 0.75,
            layers: Some("0-3,7".parse().unwrap()),
            skip_embeddings: true,
            exclude: vec!["*.bias".into()],
            keep_tie: true,
            norm_preserving: true,
            kernel: LayerKernel {
                attn: Some(Profile::Tent(Tent { peak: 1.25, position: 2.5, min: 0.1, width: 3.0 })),
                mlp: Some(Profile::Table(vec![0.0, 0.5, 1.0 / 3.0])),
                embedding: Some(0.2),
            },
        };
        // Through the text of a manifest, as verify reads it.
        let text = serde_json::to_string(&options_to_json(&o)).unwrap();
        assert_eq!(options_from_json(&serde_json::from_str(&text).unwrap()).unwrap(), o);
        let default = Options::default();
        assert_eq!(options_from_json(&options_to_json(&default)).unwrap(), default);
        // A bad field is named.
        let mut v = options_to_json(&o);
        v["kernel"]["attn"] = json!({"tent": {"peak": 1.0, "position": 2.0, "min": "x", "width": 1.0}});
        assert_eq!(
            options_from_json(&v).unwrap_err(),
            "`options.kernel`: `attn`: tent `min` is \"x\", not a finite number"
        );
        let mut v = options_to_json(&o);
        v.as_object_mut().unwrap().remove("keep_tie");
        assert_eq!(options_from_json(&v).unwrap_err(), "`options.keep_tie` is missing");
    }
}
