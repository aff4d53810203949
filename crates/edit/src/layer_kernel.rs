//! Layer kernels: a weight per decoder layer and per writer kind, multiplying the edit's scale
//! (docs/variants.md, "Layer kernels"). A weight of 0 leaves the tensor unedited (copied bit for bit).
//!
//! Writer kinds are grouped as the issue and heretic name them: `attn` (attention output, and its bias),
//! `mlp` (MLP down projection, every expert's and the shared expert's, and biases) and `embedding` (the
//! token and position embeddings, which belong to no layer and so take one weight). A group without a
//! profile has weight 1 everywhere.
//!
//! A profile is either a [`Tent`] (heretic's parametric kernel) or an explicit table, one weight per
//! layer, read from a JSON file. Only reads that file; never writes.

use std::fmt;
use std::path::Path;

use checkpoint::{Writer, WriterKind};
use serde_json::{Value, json};

use crate::{Error, Result};

/// heretic's kernel: weight `peak` at layer `position` (fractional allowed), falling linearly with the
/// distance `|l − position|` to `min` at distance `width`, and 0 beyond:
/// `w(l) = peak + (|l − position| / width) · (min − peak)` for `|l − position| <= width`, else 0
/// (`width = 0`: `peak` at `l == position` only).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tent {
    pub peak: f64,
    pub position: f64,
    pub min: f64,
    pub width: f64,
}

impl Tent {
    /// Parses `PEAK,POSITION,MIN,WIDTH`, e.g. `1.0,14,0.3,8`.
    pub fn parse(spec: &str, what: &str) -> Result<Tent> {
        let bad = |problem: String| Error::Kernel { spec: format!("{what} {spec}"), problem };
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        let [peak, position, min, width] = parts.as_slice() else {
            return Err(bad("write PEAK,POSITION,MIN,WIDTH, e.g. `1.0,14,0.3,8`".into()));
        };
        let num = |s: &str, name: &str| -> Result<f64> {
            let v: f64 = s.parse().map_err(|_| bad(format!("{name} `{s}` is not a number")))?;
            if !v.is_finite() {
                return Err(bad(format!("{name} `{s}` is not finite")));
            }
            Ok(v)
        };
        let t = Tent {
            peak: num(peak, "PEAK")?,
            position: num(position, "POSITION")?,
            min: num(min, "MIN")?,
            width: num(width, "WIDTH")?,
        };
        if t.width < 0.0 {
            return Err(bad(format!("WIDTH {} is negative", t.width)));
        }
        Ok(t)
    }

    pub fn weight(&self, layer: usize) -> f64 {
        let dist = (layer as f64 - self.position).abs();
        if dist > self.width {
            0.0
        } else if self.width == 0.0 {
            self.peak
        } else {
            self.peak + (dist / self.width) * (self.min - self.peak)
        }
    }
}

/// `PEAK,POSITION,MIN,WIDTH`, what [`Tent::parse`] reads; a precision (`{:.3}`) applies to each number.
impl fmt::Display for Tent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b, c, d) = (self.peak, self.position, self.min, self.width);
        match f.precision() {
            Some(p) => write!(f, "{a:.p$},{b:.p$},{c:.p$},{d:.p$}"),
            None => write!(f, "{a},{b},{c},{d}"),
        }
    }
}

/// The weights of one writer group across layers.
#[derive(Clone, Debug, PartialEq)]
pub enum Profile {
    Tent(Tent),
    /// One weight per decoder layer.
    Table(Vec<f64>),
}

impl Profile {
    pub fn weight(&self, layer: usize) -> f64 {
        match self {
            Profile::Tent(t) => t.weight(layer),
            Profile::Table(w) => w.get(layer).copied().unwrap_or(0.0),
        }
    }

    /// The inverse of the manifest's form (`{"tent": {...}}` or `{"table": [...]}`).
    fn from_json(v: &Value) -> std::result::Result<Profile, String> {
        let num = |x: &Value, what: &str| {
            x.as_f64().filter(|f| f.is_finite()).ok_or(format!("{what} is {x}, not a finite number"))
        };
        if let Some(t) = v.get("tent") {
            let f = |k: &str| num(&t[k], &format!("tent `{k}`"));
            return Ok(Profile::Tent(Tent {
                peak: f("peak")?,
                position: f("position")?,
                min: f("min")?,
                width: f("width")?,
            }));
        }
        if let Some(w) = v.get("table").and_then(Value::as_array) {
            return w
                .iter()
                .enumerate()
                .map(|(l, x)| num(x, &format!("table[{l}]")))
                .collect::<Result<_, _>>()
                .map(Profile::Table);
        }
        Err(format!("{v} is neither {{\"tent\": ...}} nor {{\"table\": [...]}}"))
    }

    fn to_json(&self) -> Value {
        match self {
            Profile::Tent(t) => {
                json!({"tent": {"peak": t.peak, "position": t.position, "min": t.min, "width": t.width}})
            }
            Profile::Table(w) => json!({"table": w}),
        }
    }
}

/// Weights per layer and writer group. `Default`: weight 1 everywhere (the paper's edit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerKernel {
    pub attn: Option<Profile>,
    pub mlp: Option<Profile>,
    /// The embedding's weight (it belongs to no layer).
    pub embedding: Option<f64>,
}

impl LayerKernel {
    /// The weight of a writer (1 for a group without a profile).
    pub fn weight(&self, w: &Writer) -> f64 {
        let profile = match w.kind {
            WriterKind::Embedding => return self.embedding.unwrap_or(1.0),
            WriterKind::AttnOut => &self.attn,
            WriterKind::MlpDown | WriterKind::ExpertDown | WriterKind::SharedExpertDown => &self.mlp,
        };
        match (profile, w.layer) {
            (Some(p), Some(l)) => p.weight(l),
            _ => 1.0,
        }
    }

    pub fn is_identity(&self) -> bool {
        self.attn.is_none() && self.mlp.is_none() && self.embedding.is_none()
    }

    /// Reads a table file: JSON `{"attn": [w_0, ..], "mlp": [w_0, ..], "embedding": w}` (every key
    /// optional; each list one finite weight per decoder layer, `layers` of them).
    pub fn from_table(path: &Path, layers: usize) -> Result<LayerKernel> {
        let bad = |problem: String| Error::Kernel { spec: format!("--kernel-table {}", path.display()), problem };
        let text = std::fs::read(path).map_err(|cause| Error::Io { path: path.to_path_buf(), cause })?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj =
            v.as_object().ok_or_else(|| bad("must be a JSON object with `attn`, `mlp` and/or `embedding`".into()))?;
        if let Some(k) = obj.keys().find(|k| !["attn", "mlp", "embedding"].contains(&k.as_str())) {
            return Err(bad(format!("unknown key `{k}` (expected `attn`, `mlp`, `embedding`)")));
        }
        let list = |key: &str| -> Result<Option<Profile>> {
            let Some(x) = obj.get(key) else { return Ok(None) };
            let xs = x.as_array().ok_or_else(|| bad(format!("`{key}` must be a list of {layers} numbers")))?;
            if xs.len() != layers {
                return Err(bad(format!("`{key}` has {} weights but the model has {layers} layers", xs.len())));
            }
            let w = xs
                .iter()
                .enumerate()
                .map(|(l, x)| {
                    x.as_f64()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| bad(format!("`{key}[{l}]` is {x}, not a finite number")))
                })
                .collect::<Result<Vec<f64>>>()?;
            Ok(Some(Profile::Table(w)))
        };
        let embedding = match obj.get("embedding") {
            None => None,
            Some(x) => Some(
                x.as_f64()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad(format!("`embedding` is {x}, not a finite number")))?,
            ),
        };
        Ok(LayerKernel { attn: list("attn")?, mlp: list("mlp")?, embedding })
    }

    /// The inverse of [`LayerKernel::to_json`] (null: the identity kernel).
    pub fn from_json(v: &Value) -> std::result::Result<LayerKernel, String> {
        if v.is_null() {
            return Ok(LayerKernel::default());
        }
        let profile = |k: &str| match &v[k] {
            Value::Null => Ok(None),
            p => Profile::from_json(p).map(Some).map_err(|e| format!("`{k}`: {e}")),
        };
        let embedding = match &v["embedding"] {
            Value::Null => None,
            x => Some(x.as_f64().filter(|f| f.is_finite()).ok_or(format!("`embedding` is {x}, not a finite number"))?),
        };
        Ok(LayerKernel { attn: profile("attn")?, mlp: profile("mlp")?, embedding })
    }

    /// As recorded in `abliterate.json`.
    pub fn to_json(&self) -> Value {
        json!({
            "attn": self.attn.as_ref().map(Profile::to_json),
            "mlp": self.mlp.as_ref().map(Profile::to_json),
            "embedding": self.embedding,
            "definition": "weight(l) = peak + (|l - position| / width) * (min - peak) where |l - position| <= width, \
                           else 0 (tent); table: one weight per layer; the tensor's scale is --scale times its weight; \
                           weight 0 leaves the tensor unedited",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tent_matches_heretics_linear_interpolation() {
        let t = Tent::parse("1.0,10,0.2,4", "--kernel-attn").unwrap();
        assert_eq!(t.weight(10), 1.0);
        assert!((t.weight(12) - 0.6).abs() < 1e-15 && (t.weight(8) - 0.6).abs() < 1e-15);
        assert!((t.weight(14) - 0.2).abs() < 1e-15);
        assert_eq!(t.weight(15), 0.0);
        assert_eq!(t.weight(5), 0.0);
        let t = Tent::parse("0.8,10.5,0.8,0.5", "x").unwrap();
        assert_eq!((t.weight(10), t.weight(11), t.weight(12)), (0.8, 0.8, 0.0));
        let t = Tent::parse("2,3,1,0", "x").unwrap();
        assert_eq!((t.weight(3), t.weight(2)), (2.0, 0.0));
    }

    #[test]
    fn tent_displays_as_it_parses() {
        let t = Tent::parse("1.25,10.5,0.2,4", "x").unwrap();
        assert_eq!(t.to_string(), "1.25,10.5,0.2,4");
        assert_eq!(Tent::parse(&t.to_string(), "x").unwrap(), t);
        assert_eq!(format!("{t:.2}"), "1.25,10.50,0.20,4.00");
    }

    #[test]
    fn tent_errors_name_the_option() {
        let e = |s: &str| Tent::parse(s, "--kernel-mlp").unwrap_err().to_string();
        assert_eq!(e("1,2,3"), "--kernel-mlp 1,2,3: write PEAK,POSITION,MIN,WIDTH, e.g. `1.0,14,0.3,8`");
        assert_eq!(e("1,x,0,2"), "--kernel-mlp 1,x,0,2: POSITION `x` is not a number");
        assert_eq!(e("1,2,0,-1"), "--kernel-mlp 1,2,0,-1: WIDTH -1 is negative");
        assert_eq!(e("1,2,inf,1"), "--kernel-mlp 1,2,inf,1: MIN `inf` is not finite");
    }

    #[test]
    fn tables_are_checked_against_the_layer_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(&p, r#"{"attn": [0.5, 1.0], "embedding": 0}"#).unwrap();
        let k = LayerKernel::from_table(&p, 2).unwrap();
        assert_eq!(k.attn, Some(Profile::Table(vec![0.5, 1.0])));
        assert_eq!((k.mlp.clone(), k.embedding), (None, Some(0.0)));
        let e = LayerKernel::from_table(&p, 3).unwrap_err().to_string();
        assert_eq!(e, format!("--kernel-table {}: `attn` has 2 weights but the model has 3 layers", p.display()));
        std::fs::write(&p, r#"{"attn": [0.5, "a"]}"#).unwrap();
        let e = LayerKernel::from_table(&p, 2).unwrap_err().to_string();
        assert_eq!(e, format!("--kernel-table {}: `attn[1]` is \"a\", not a finite number", p.display()));
        std::fs::write(&p, r#"{"o_proj": []}"#).unwrap();
        let e = LayerKernel::from_table(&p, 2).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("--kernel-table {}: unknown key `o_proj` (expected `attn`, `mlp`, `embedding`)", p.display())
        );
    }
}
