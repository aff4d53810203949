//! Rotary position embeddings as transformers 4.57 computes them (`modeling_rope_utils.py`): the inverse
//! frequencies of each `rope_scaling` type, formed in f32 in the same order of operations as torch, then
//! `cos`/`sin` of `inv_freq * position` (an f32 product) and the rotate-half application.
//!
//! Supported `rope_type`s: default, linear, dynamic, llama3, yarn, longrope. Dynamic and longrope depend
//! on the sequence length; transformers takes it from the largest position id of the whole batch, we take
//! it per prompt (the same for a prompt run alone), so a prompt's result never depends on its batch.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{ModelError, Result};

#[derive(Clone, Debug, PartialEq)]
enum Scaling {
    Default,
    Linear { factor: f64 },
    Dynamic { factor: f64, max_pos: usize },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
    Yarn { factor: f64, beta_fast: f64, beta_slow: f64, original_max: f64, truncate: bool },
    LongRope { short: Vec<f64>, long: Vec<f64>, original_max: usize },
}

/// One rotary embedding: its base, rotated dimensions and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    theta: f64,
    /// Rotated dimensions per head (`head_dim * partial_rotary_factor`).
    pub dim: usize,
    scaling: Scaling,
    /// Factor on cos/sin (`attention_factor`; 1 except for yarn and longrope).
    attention_scaling: f64,
}

impl RopeSpec {
    pub fn default_rope(theta: f64, dim: usize) -> RopeSpec {
        RopeSpec { theta, dim, scaling: Scaling::Default, attention_scaling: 1.0 }
    }

    /// Reads `rope_scaling` (null, or an object with `rope_type` or the older `type`).
    pub fn parse(
        value: Option<&Value>,
        theta: f64,
        dim: usize,
        max_pos: usize,
        original_max_attr: Option<usize>,
        path: &Path,
    ) -> Result<RopeSpec> {
        let bad = |problem: String| ModelError::Config { path: path.to_path_buf(), problem };
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(bad(format!("`rope_theta` {theta} must be positive")));
        }
        let obj: &Map<String, Value> = match value {
            None | Some(Value::Null) => return Ok(RopeSpec::default_rope(theta, dim)),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(bad("`rope_scaling` must be an object or null".into())),
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`rope_scaling` has no `rope_type`".into()))?;
        let num = |k: &str| -> Result<f64> {
            obj.get(k)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("`rope_scaling.{k}` is missing or not a number")))
        };
        let opt_num = |k: &str| -> Result<Option<f64>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .map(Some)
                    .ok_or_else(|| bad(format!("`rope_scaling.{k}` is not a number"))),
            }
        };
        let positive = |k: &str, v: f64| -> Result<f64> {
            if v > 0.0 { Ok(v) } else { Err(bad(format!("`rope_scaling.{k}` {v} must be positive"))) }
        };
        let mut attention_scaling = 1.0;
        let scaling = match kind {
            "default" => Scaling::Default,
            "linear" => Scaling::Linear { factor: positive("factor", num("factor")?)? },
            "dynamic" => Scaling::Dynamic { factor: positive("factor", num("factor")?)?, max_pos },
            "llama3" => {
                let s = Scaling::Llama3 {
                    factor: positive("factor", num("factor")?)?,
                    low_freq_factor: positive("low_freq_factor", num("low_freq_factor")?)?,
                    high_freq_factor: positive("high_freq_factor", num("high_freq_factor")?)?,
                    original_max: positive(
                        "original_max_position_embeddings",
                        num("original_max_position_embeddings")?,
                    )?,
                };
                if let Scaling::Llama3 { low_freq_factor, high_freq_factor, .. } = s
                    && low_freq_factor == high_freq_factor
                {
                    return Err(bad("`rope_scaling` low_freq_factor equals high_freq_factor".into()));
                }
                s
            }
            "yarn" => {
                let factor = positive("factor", num("factor")?)?;
                let original_max = opt_num("original_max_position_embeddings")?.unwrap_or(max_pos as f64);
                let mscale = opt_num("mscale")?;
                let mscale_all_dim = opt_num("mscale_all_dim")?;
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                attention_scaling = match opt_num("attention_factor")? {
                    Some(a) => a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get_mscale(factor, m) / get_mscale(factor, a),
                        _ => get_mscale(factor, 1.0),
                    },
                };
                // `or 32` / `or 1` in transformers: a 0 or null falls back too.
                let beta_fast = opt_num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
                let beta_slow = opt_num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
                let truncate = obj.get("truncate").and_then(Value::as_bool).unwrap_or(true);
                Scaling::Yarn { factor, beta_fast, beta_slow, original_max, truncate }
            }
            "longrope" => {
                let list = |k: &str| -> Result<Vec<f64>> {
                    let v: Option<Vec<f64>> = obj
                        .get(k)
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                        .unwrap_or(None);
                    let v = v.ok_or_else(|| bad(format!("`rope_scaling.{k}` must be a list of numbers")))?;
                    if v.len() != dim / 2 {
                        return Err(bad(format!(
                            "`rope_scaling.{k}` has {} entries; the rotary dimension {dim} needs {}",
                            v.len(),
                            dim / 2
                        )));
                    }
                    Ok(v)
                };
                let (short, long) = (list("short_factor")?, list("long_factor")?);
                let (original_max, factor) = match original_max_attr {
                    Some(o) => (o, max_pos as f64 / o as f64),
                    None => (max_pos, opt_num("factor")?.unwrap_or(1.0)),
                };
                attention_scaling = match opt_num("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original_max as f64).ln()).sqrt(),
                };
                Scaling::LongRope { short, long, original_max }
            }
            other => {
                return Err(ModelError::Unsupported {
                    what: format!(
                        "`rope_scaling` type `{other}` (supported: default, linear, dynamic, llama3, yarn, longrope)"
                    ),
                });
            }
        };
        Ok(RopeSpec { theta, dim, scaling, attention_scaling })
    }

    /// `base ** (arange(0, dim, 2) / dim)` in f32, as torch forms it.
    fn pos_freqs(&self, base: f64) -> Vec<f32> {
        let base32 = base as f32;
        (0..self.dim / 2)
            .map(|i| {
                let e = (2 * i) as f32 / self.dim as f32;
                // torch raises the f32 base to f32 exponents; its vectorised pow can differ from the
                // platform powf by an ulp (seen once: dynamic scaling's non-integer base).
                base32.powf(e)
            })
            .collect()
    }

    /// The inverse frequencies for a sequence whose largest position is `seq_len - 1`.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let default = |base: f64| -> Vec<f32> { self.pos_freqs(base).iter().map(|p| 1.0f32 / p).collect() };
        match &self.scaling {
            Scaling::Default => default(self.theta),
            Scaling::Linear { factor } => default(self.theta).iter().map(|f| f / *factor as f32).collect(),
            Scaling::Dynamic { factor, max_pos } => {
                if seq_len <= *max_pos {
                    default(self.theta)
                } else {
                    let d = self.dim as f64;
                    let base =
                        self.theta * ((factor * seq_len as f64 / *max_pos as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                    default(base)
                }
            }
            Scaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
                let inv = default(self.theta);
                let low_wavelen = (original_max / low_freq_factor) as f32;
                let high_wavelen = (original_max / high_freq_factor) as f32;
                let factor32 = *factor as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                inv.iter()
                    .map(|&f| {
                        let wavelen = two_pi / f;
                        let scaled = if wavelen > low_wavelen { f / factor32 } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (*original_max as f32 / wavelen - *low_freq_factor as f32)
                                / (*high_freq_factor as f32 - *low_freq_factor as f32);
                            (1.0 - smooth) * scaled / factor32 + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            Scaling::Yarn { factor, beta_fast, beta_slow, original_max, truncate } => {
                let pos = self.pos_freqs(self.theta);
                let d = self.dim as f64;
                let correction_dim =
                    |rot: f64| (d * (original_max / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * self.theta.ln());
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                let factor32 = *factor as f32;
                pos.iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let extrapolation = 1.0f32 / p;
                        let interpolation = 1.0f32 / (factor32 * p);
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0f32 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
            Scaling::LongRope { short, long, original_max } => {
                let ext = if seq_len > *original_max { long } else { short };
                self.pos_freqs(self.theta).iter().zip(ext).map(|(&p, &e)| 1.0f32 / (e as f32 * p)).collect()
            }
        }
    }

    /// Whether [`RopeSpec::inv_freq`] depends on the sequence length.
    pub fn depends_on_length(&self) -> bool {
        matches!(self.scaling, Scaling::Dynamic { .. } | Scaling::LongRope { .. })
    }

    /// Writes `cos` and `sin` (each `dim / 2` values; both halves of a head share them) for one position.
    pub fn cos_sin(&self, inv_freq: &[f32], position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        let scale = self.attention_scaling as f32;
        for ((f, c), s) in inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            let angle = (f * p) as f64;
            *c = angle.cos() as f32 * scale;
            *s = angle.sin() as f32 * scale;
        }
    }
}

/// Rotates the first `2 * cos.len()` dimensions of one head in place:
/// `x * cos + rotate_half(x) * sin`, each product rounded separately as torch does.
#[inline]
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, rest) = x.split_at_mut(half);
    let b = &mut rest[..half];
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] + (-x2) * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value, dim: usize) -> RopeSpec {
        RopeSpec::parse(Some(&v), 500000.0, dim, 131072, None, Path::new("config.json")).unwrap()
    }

    #[test]
    fn default_inverse_frequencies_follow_the_formula() {
        let r = RopeSpec::default_rope(10000.0, 8);
        let inv = r.inv_freq(1);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-8, "{}", inv[1]);
        assert!((inv[3] - 0.001).abs() < 1e-10, "{}", inv[3]);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let r = spec(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
            128,
        );
        let plain = RopeSpec::default_rope(500000.0, 128).inv_freq(1);
        let scaled = r.inv_freq(1);
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[63], plain[63] / 8.0);
        assert!(scaled[33] < plain[33] && scaled[33] > plain[33] / 8.0);
    }

    #[test]
    fn longrope_switches_factors_past_the_original_length() {
        let v = json!({"type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [2.0, 4.0]});
        let r = RopeSpec::parse(Some(&v), 10000.0, 4, 8192, Some(4096), Path::new("c")).unwrap();
        assert_eq!(r.inv_freq(4096), RopeSpec::default_rope(10000.0, 4).inv_freq(1));
        assert_eq!(r.inv_freq(4097)[1], r.inv_freq(1)[1] / 4.0);
        assert!((r.attention_scaling - (1.0 + 2f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-15);
    }

    /// Every scaling type against transformers 4.57.1 (`tests/data/rope.json`, made by `make_rope.py`):
    /// inverse frequencies, attention factor, and cos/sin at several positions.
    #[test]
    fn every_scaling_type_matches_transformers() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rope.json");
        let data: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let nums = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
        let cases = data["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 10);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let c = &case["config"];
            let head_dim = c
                .get("head_dim")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| c["hidden_size"].as_u64().unwrap() / c["num_attention_heads"].as_u64().unwrap())
                as usize;
            let dim =
                (head_dim as f64 * c.get("partial_rotary_factor").and_then(Value::as_f64).unwrap_or(1.0)) as usize;
            let spec = RopeSpec::parse(
                c.get("rope_scaling"),
                c["rope_theta"].as_f64().unwrap(),
                dim,
                c["max_position_embeddings"].as_u64().unwrap() as usize,
                c.get("original_max_position_embeddings").and_then(Value::as_u64).map(|v| v as usize),
                Path::new("config.json"),
            )
            .unwrap();
            let seq_len = case["seq_len"].as_u64().unwrap() as usize;
            let inv = spec.inv_freq(seq_len);
            let want = nums(&case["inv_freq"]);
            for (i, (g, w)) in inv.iter().zip(&want).enumerate() {
                let ulps = (g.to_bits() as i64 - (*w as f32).to_bits() as i64).abs();
                assert!(ulps <= 1, "{name}: inv_freq[{i}] {g} vs {w}");
            }
            assert_eq!(inv.len(), want.len(), "{name}");
            assert!((spec.attention_scaling - case["attention_scaling"].as_f64().unwrap()).abs() < 1e-15, "{name}");
            let half = dim / 2;
            let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
            for (k, p) in case["positions"].as_array().unwrap().iter().enumerate() {
                spec.cos_sin(&inv, p.as_u64().unwrap() as usize, &mut cos, &mut sin);
                for (got, key) in [(&cos, "cos"), (&sin, "sin")] {
                    let want = nums(&case[key][k]);
                    assert_eq!(want.len(), dim, "{name}: both halves stored");
                    for i in 0..half {
                        assert_eq!(want[i], want[i + half], "{name}: the halves repeat");
                        let d = (got[i] as f64 - want[i]).abs();
                        // torch's vectorised cos/sin and pow are within an ulp; a one-ulp inv_freq moves
                        // the angle by up to an ulp of the angle.
                        let angle = (inv[i] * p.as_u64().unwrap() as f32) as f64;
                        let allowed = 3e-7 + angle * f32::EPSILON as f64;
                        assert!(d <= allowed, "{name}: {key}[{i}] at position {p}: {} vs {}", got[i], want[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_types_are_named() {
        let e = RopeSpec::parse(Some(&json!({"rope_type": "mrope"})), 1e4, 8, 1, None, Path::new("c")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`rope_scaling` type `mrope` (supported: default, linear, dynamic, llama3, yarn, longrope) is not supported by the runtime yet"
        );
    }

    #[test]
    fn rotation_by_zero_is_identity_and_preserves_norm() {
        let r = RopeSpec::default_rope(10000.0, 4);
        let inv = r.inv_freq(1);
        let (mut c, mut s) = (vec![0.0; 2], vec![0.0; 2]);
        r.cos_sin(&inv, 0, &mut c, &mut s);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        apply(&mut x, &c, &s);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
        r.cos_sin(&inv, 7, &mut c, &mut s);
        apply(&mut x, &c, &s);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4, "{n}");
    }
}
