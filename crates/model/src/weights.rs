//! Every tensor the forward pass reads, decoded once from the checkpoint's stored dtype to f32 (exact for
//! bf16, f16 and f32) and checked against the shape config.json implies. Projection weights and the LM
//! head are stored panel-major ([`Panels`]): `gemm` then reads them in place without repacking on every
//! call, which makes small batches (generation steps) about twice as fast (docs/benchmarks.md). q/k/v and
//! gate/up are fused (one matrix product each); Gemma's norm gains `1 + w` are formed here, in f32, as
//! transformers does.

use checkpoint::{Checkpoint, Dtype, Family, TensorRef, dtype};

use crate::arch::{Arch, NormKind};
use crate::kernels::{Held, Panels, RowBlock};
use crate::load::WeightWidth;
use crate::{ModelError, Result};

/// A linear layer `y = x Wᵀ + b` (transformers stores `W` as `[out, inp]`; we store it panel-major).
pub struct Linear {
    pub w: Panels,
    pub bias: Option<Vec<f32>>,
}

/// A gated MLP: `down(act(gate(x)) * up(x))`, gate and up fused as `[gate; up]` rows.
pub struct Mlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub ff: usize,
}

pub struct MoeBlock {
    /// `[experts, d]`.
    pub router: Linear,
    pub experts: Vec<Mlp>,
    /// Qwen2-MoE: the shared expert and its `[1, d]` sigmoid gate.
    pub shared: Option<(Mlp, Linear)>,
}

pub enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

pub struct Layer {
    pub input_norm: Vec<f32>,
    /// `[q; k; v]` rows.
    pub qkv: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: Linear,
    /// Gemma 2/3 `post_attention_layernorm` (applied to the attention output).
    pub post_attn_norm: Option<Vec<f32>>,
    /// The norm before the MLP (`post_attention_layernorm` in Llama-style models,
    /// `pre_feedforward_layernorm` in Gemma 2/3).
    pub pre_mlp_norm: Vec<f32>,
    pub ffn: Ffn,
    pub post_mlp_norm: Option<Vec<f32>>,
}

pub struct Weights {
    /// The token embedding `[vocab, d]`, read row by row from the checkpoint's memory map when a token
    /// is embedded (no f32 copy of the whole matrix).
    pub embed: TensorRef,
    pub embed_dtype: Dtype,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// The LM head (the embedding when tied).
    pub lm_head: Panels,
}

/// Prefixes a text model's tensors live under (plain causal LMs, then multimodal Gemma 3 layouts).
const PREFIXES: [&str; 3] = ["model.", "model.language_model.", "language_model.model."];

/// What loading holds or would hold, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Stored bytes of the tensors read (progress counts these).
    pub read: u64,
    /// Held at f32 width.
    pub f32: u64,
    /// Held at stored width.
    pub stored: u64,
}

/// Reads the tensors the forward pass needs. In a *plan* (`width: None`) it only checks them (names,
/// shapes against config.json, dtypes) and counts bytes, allocating nothing in proportion to config.json;
/// then the real load packs each matrix straight from the memory map and releases its mapped pages.
struct Loader<'a, 'p> {
    ckpt: &'a Checkpoint,
    prefix: &'static str,
    family: Family,
    /// The width to hold matrices at; `None` for a plan.
    width: Option<WeightWidth>,
    tally: Tally,
    /// The plan's total of `read`, for progress.
    total: u64,
    progress: Option<&'p mut dyn FnMut(u64, u64)>,
    dtypes: Vec<Held>,
}

/// `a * b` for sizes from config.json, an error naming them if it overflows.
fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| ModelError::Unsupported { what: format!("{what} ({a} x {b}, too large)") })
}

impl Loader<'_, '_> {
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn has(&self, name: &str) -> bool {
        self.ckpt.get(&self.full(name)).is_some()
    }

    /// The tensor `full`, checked to have `shape` and a float dtype.
    fn tensor(&self, full: &str, shape: &[usize]) -> Result<(TensorRef, Dtype)> {
        let (r, t) = self.ckpt.get(full).ok_or_else(|| ModelError::MissingTensor {
            name: full.to_string(),
            why: format!("the {} forward pass needs it", self.family.name()),
        })?;
        if t.shape != shape {
            return Err(ModelError::Shape { name: full.to_string(), expected: shape.to_vec(), got: t.shape.clone() });
        }
        if !t.dtype.is_float() {
            return Err(ModelError::Dtype { name: full.to_string(), dtype: t.dtype.to_string() });
        }
        Ok((r, t.dtype))
    }

    fn advance(&mut self, bytes: u64) {
        self.tally.read += bytes;
        if self.width.is_some()
            && let Some(p) = self.progress.as_mut()
        {
            p(self.tally.read, self.total);
        }
    }

    /// A small f32 vector (norm gain or bias) of `n` values.
    fn vector(&mut self, full: &str, n: usize) -> Result<Vec<f32>> {
        let (r, dtype) = self.tensor(full, &[n])?;
        let bytes = self.ckpt.bytes(r);
        self.tally.f32 += 4 * n as u64;
        self.tally.stored += 4 * n as u64;
        let out = if self.width.is_some() {
            let mut out = vec![0f32; n];
            dtype::decode_f32(dtype, bytes, &mut out);
            out
        } else {
            Vec::new()
        };
        self.advance(bytes.len() as u64);
        Ok(out)
    }

    fn read(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let full = self.full(name);
        self.vector(&full, n)
    }

    /// A norm gain, as the forward pass multiplies it (`1 + w` for Gemma).
    fn norm(&mut self, name: &str, d: usize, kind: NormKind) -> Result<Vec<f32>> {
        let mut w = self.read(name, d)?;
        if kind == NormKind::OnePlus {
            for v in &mut w {
                *v += 1.0;
            }
        }
        Ok(w)
    }

    /// A matrix stacked from full tensor names, each `[rows_i, inp]`, packed into panels.
    fn matrix(&mut self, parts: &[(String, usize)], inp: usize) -> Result<Panels> {
        let mut found = Vec::with_capacity(parts.len());
        for (full, rows) in parts {
            found.push(self.tensor(full, &[*rows, inp])?);
        }
        let out = parts.iter().try_fold(0usize, |a, p| a.checked_add(p.1));
        let padded = out
            .and_then(|o| Panels::padded_len(o, inp))
            .ok_or_else(|| ModelError::Unsupported { what: format!("a matrix of {} (too large)", parts[0].0) })?
            as u64;
        // Stored width keeps bf16 and f16 when every part has that dtype; anything else is held as f32.
        let narrow = match found.first().map(|f| f.1) {
            Some(Dtype::BF16) if found.iter().all(|f| f.1 == Dtype::BF16) => Held::Bf16,
            Some(Dtype::F16) if found.iter().all(|f| f.1 == Dtype::F16) => Held::F16,
            _ => Held::F32,
        };
        self.tally.f32 += 4 * padded;
        self.tally.stored += narrow.size() as u64 * padded;
        let read: u64 = found.iter().map(|(r, _)| self.ckpt.bytes(*r).len() as u64).sum();
        let Some(width) = self.width else {
            self.advance(read);
            return Ok(Panels::pack(&[], 0, Held::F32));
        };
        let held = if width == WeightWidth::F32 { Held::F32 } else { narrow };
        if !self.dtypes.contains(&held) {
            self.dtypes.push(held);
        }
        let blocks: Vec<RowBlock<'_>> = found
            .iter()
            .zip(parts)
            .map(|((r, dtype), (_, rows))| RowBlock { bytes: self.ckpt.bytes(*r), dtype: *dtype, rows: *rows })
            .collect();
        let panels = Panels::pack(&blocks, inp, held);
        // Only the packed copy stays resident (the embedding is read again row by row when used).
        for (r, _) in &found {
            self.ckpt.release(*r);
        }
        self.advance(read);
        Ok(panels)
    }

    /// Stacks several `[rows_i, inp]` matrices (and optional biases) into one `Linear` (output columns
    /// in the order given).
    fn stacked(&mut self, parts: &[(&str, usize)], inp: usize, bias: bool) -> Result<Linear> {
        let weights: Vec<(String, usize)> =
            parts.iter().map(|(n, r)| (self.full(&format!("{n}.weight")), *r)).collect();
        let w = self.matrix(&weights, inp)?;
        let bias = if bias {
            let mut b = Vec::new();
            for (name, rows) in parts {
                b.extend(self.read(&format!("{name}.bias"), *rows)?);
            }
            Some(b)
        } else {
            None
        };
        Ok(Linear { w, bias })
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.stacked(&[(name, out)], inp, bias)
    }

    /// A gated MLP stored as separate gate/up/down projections.
    fn mlp(&mut self, gate: &str, up: &str, down: &str, d: usize, ff: usize, bias: bool) -> Result<Mlp> {
        Ok(Mlp { gate_up: self.stacked(&[(gate, ff), (up, ff)], d, bias)?, down: self.linear(down, d, ff, bias)?, ff })
    }
}

/// What [`Weights::load`] held.
pub struct Loaded {
    pub weights: Weights,
    pub held: Vec<Held>,
}

impl Weights {
    /// Checks every tensor the forward pass needs against config.json and counts what loading would
    /// hold at each width, without allocating in proportion to either.
    pub fn plan(ckpt: &Checkpoint, arch: &Arch) -> Result<Tally> {
        let mut ld = Loader::new(ckpt, arch, None, None)?;
        Weights::run(&mut ld, arch)?;
        Ok(ld.tally)
    }

    /// Loads the weights at `width` (F32 or Stored), reporting progress over `total` bytes read.
    pub fn load(
        ckpt: &Checkpoint,
        arch: &Arch,
        width: WeightWidth,
        total: u64,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<Loaded> {
        let mut ld = Loader::new(ckpt, arch, Some(width), progress)?;
        ld.total = total;
        let weights = Weights::run(&mut ld, arch)?;
        Ok(Loaded { weights, held: ld.dtypes })
    }

    fn run(ld: &mut Loader<'_, '_>, arch: &Arch) -> Result<Weights> {
        let ckpt = ld.ckpt;
        let d = arch.hidden;
        let hd = arch.head_dim;
        let q_w = mul(arch.heads, hd, "num_attention_heads x head_dim")?;
        let kv_w = mul(arch.kv_heads, hd, "num_key_value_heads x head_dim")?;
        let embed_name = ld.full("embed_tokens.weight");
        // The embedding stays in the memory map: checked here, decoded row by row when used.
        let (embed, embed_dtype) = ld.tensor(&embed_name, &[arch.vocab, d])?;
        let head_name = if arch.tied {
            embed_name
        } else {
            ["lm_head.weight", "language_model.lm_head.weight"]
                .into_iter()
                .find(|n| ckpt.get(n).is_some())
                .unwrap_or("lm_head.weight")
                .to_string()
        };
        let lm_head = ld.matrix(&[(head_name, arch.vocab)], d)?;
        let final_norm = ld.norm("norm.weight", d, arch.norm)?;

        let mut layers = Vec::with_capacity(arch.layers);
        for i in 0..arch.layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            let input_norm = ld.norm(&p("input_layernorm.weight"), d, arch.norm)?;
            let qkv = if arch.fused_projections {
                let rows = mul(2, kv_w, "2 x num_key_value_heads x head_dim")?.checked_add(q_w).ok_or_else(|| {
                    ModelError::Unsupported { what: "q/k/v widths from config.json (too large)".into() }
                })?;
                ld.linear(&p("self_attn.qkv_proj"), rows, d, arch.qkv_bias)?
            } else {
                ld.stacked(
                    &[(&p("self_attn.q_proj"), q_w), (&p("self_attn.k_proj"), kv_w), (&p("self_attn.v_proj"), kv_w)],
                    d,
                    arch.qkv_bias,
                )?
            };
            let (q_norm, k_norm) = if arch.qk_norm {
                (
                    Some(ld.norm(&p("self_attn.q_norm.weight"), hd, arch.norm)?),
                    Some(ld.norm(&p("self_attn.k_norm.weight"), hd, arch.norm)?),
                )
            } else {
                (None, None)
            };
            let o = ld.linear(&p("self_attn.o_proj"), d, q_w, arch.o_bias)?;
            let (post_attn_norm, pre_mlp_norm, post_mlp_norm) = if arch.post_norms {
                (
                    Some(ld.norm(&p("post_attention_layernorm.weight"), d, arch.norm)?),
                    ld.norm(&p("pre_feedforward_layernorm.weight"), d, arch.norm)?,
                    Some(ld.norm(&p("post_feedforward_layernorm.weight"), d, arch.norm)?),
                )
            } else {
                (None, ld.norm(&p("post_attention_layernorm.weight"), d, arch.norm)?, None)
            };
            let ffn = if arch.moe_layers[i] {
                Ffn::Moe(load_moe(ld, arch, i)?)
            } else {
                let ff = arch.intermediate.expect("Arch checks intermediate_size for dense layers");
                if arch.fused_projections {
                    Ffn::Dense(Mlp {
                        gate_up: ld.linear(&p("mlp.gate_up_proj"), mul(2, ff, "2 x intermediate_size")?, d, false)?,
                        down: ld.linear(&p("mlp.down_proj"), d, ff, false)?,
                        ff,
                    })
                } else {
                    Ffn::Dense(ld.mlp(
                        &p("mlp.gate_proj"),
                        &p("mlp.up_proj"),
                        &p("mlp.down_proj"),
                        d,
                        ff,
                        arch.mlp_bias,
                    )?)
                }
            };
            layers.push(Layer { input_norm, qkv, q_norm, k_norm, o, post_attn_norm, pre_mlp_norm, ffn, post_mlp_norm });
        }
        Ok(Weights { embed, embed_dtype, layers, final_norm, lm_head })
    }
}

impl<'a, 'p> Loader<'a, 'p> {
    fn new(
        ckpt: &'a Checkpoint,
        arch: &Arch,
        width: Option<WeightWidth>,
        progress: Option<&'p mut dyn FnMut(u64, u64)>,
    ) -> Result<Self> {
        let prefix =
            PREFIXES.iter().find(|p| ckpt.get(&format!("{p}embed_tokens.weight")).is_some()).ok_or_else(|| {
                ModelError::MissingTensor {
                    name: "model.embed_tokens.weight".into(),
                    why: "every supported family has a token embedding".into(),
                }
            })?;
        Ok(Loader {
            ckpt,
            prefix,
            family: arch.family,
            width,
            tally: Tally::default(),
            total: 0,
            progress,
            dtypes: Vec::new(),
        })
    }
}

fn load_moe(ld: &mut Loader<'_, '_>, arch: &Arch, i: usize) -> Result<MoeBlock> {
    let m = arch.moe.as_ref().expect("Arch sets moe for MoE layers");
    let d = arch.hidden;
    let block = match arch.family {
        Family::Mixtral if ld.has(&format!("layers.{i}.mlp.gate.weight")) => "mlp",
        Family::Mixtral => "block_sparse_moe",
        _ => "mlp",
    };
    let p = |s: &str| format!("layers.{i}.{block}.{s}");
    if ld.has(&p("experts.down_proj")) || ld.has(&p("experts.gate_up_proj")) {
        return Err(ModelError::Unsupported {
            what: format!(
                "fused 3-D expert tensors (`{}`, transformers 5 layout); save the model with transformers 4.x",
                ld.full(&p("experts.down_proj"))
            ),
        });
    }
    let router = ld.linear(&p("gate"), m.experts, d, false)?;
    let mut experts = Vec::with_capacity(m.experts);
    for e in 0..m.experts {
        let ex = |s: &str| p(&format!("experts.{e}.{s}"));
        experts.push(match arch.family {
            Family::Mixtral => ld.mlp(&ex("w1"), &ex("w3"), &ex("w2"), d, m.expert_ff, false)?,
            _ => ld.mlp(&ex("gate_proj"), &ex("up_proj"), &ex("down_proj"), d, m.expert_ff, false)?,
        });
    }
    let shared = match m.shared_ff {
        Some(ff) => Some((
            ld.mlp(
                &p("shared_expert.gate_proj"),
                &p("shared_expert.up_proj"),
                &p("shared_expert.down_proj"),
                d,
                ff,
                false,
            )?,
            ld.linear(&p("shared_expert_gate"), 1, d, false)?,
        )),
        None => None,
    };
    Ok(MoeBlock { router, experts, shared })
}
