//! Every tensor the forward pass reads, decoded once from the checkpoint's stored dtype to f32 (exact for
//! bf16, f16 and f32) and checked against the shape config.json implies. Projection weights and the LM
//! head are stored panel-major ([`Panels`]): `gemm` then reads them in place without repacking on every
//! call, which makes small batches (generation steps) about twice as fast (docs/benchmarks.md). q/k/v and
//! gate/up are fused (one matrix product each); Gemma's norm gains `1 + w` are formed here, in f32, as
//! transformers does.

use checkpoint::{Checkpoint, Dtype, Family, TensorRef, dtype};

use crate::arch::{Arch, NormKind};
use crate::kernels::Panels;
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

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    prefix: &'static str,
    family: Family,
}

impl Loader<'_> {
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn has(&self, name: &str) -> bool {
        self.ckpt.get(&self.full(name)).is_some()
    }

    /// Decodes `name` (shape `shape`) into `out`.
    fn read_into(&self, full: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
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
        debug_assert_eq!(out.len(), t.numel());
        dtype::decode_f32(t.dtype, self.ckpt.bytes(r), out);
        Ok(())
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; shape.iter().product()];
        self.read_into(&self.full(name), shape, &mut out)?;
        Ok(out)
    }

    /// A norm gain, as the forward pass multiplies it (`1 + w` for Gemma).
    fn norm(&self, name: &str, d: usize, kind: NormKind) -> Result<Vec<f32>> {
        let mut w = self.read(name, &[d])?;
        if kind == NormKind::OnePlus {
            for v in &mut w {
                *v += 1.0;
            }
        }
        Ok(w)
    }

    /// Stacks several `[rows_i, inp]` matrices (and optional biases) into one `Linear` (output columns
    /// in the order given).
    fn stacked(&self, parts: &[(&str, usize)], inp: usize, bias: bool) -> Result<Linear> {
        let out: usize = parts.iter().map(|p| p.1).sum();
        let mut w = vec![0f32; out * inp];
        let mut b = bias.then(|| vec![0f32; out]);
        let mut row = 0;
        for (name, rows) in parts {
            let full = self.full(&format!("{name}.weight"));
            self.read_into(&full, &[*rows, inp], &mut w[row * inp..(row + rows) * inp])?;
            if let Some(b) = &mut b {
                self.read_into(&self.full(&format!("{name}.bias")), &[*rows], &mut b[row..row + rows])?;
            }
            row += rows;
        }
        Ok(Linear { w: Panels::from_rows(&w, out, inp), bias: b })
    }

    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.stacked(&[(name, out)], inp, bias)
    }

    /// A gated MLP stored as separate gate/up/down projections.
    fn mlp(&self, gate: &str, up: &str, down: &str, d: usize, ff: usize, bias: bool) -> Result<Mlp> {
        Ok(Mlp { gate_up: self.stacked(&[(gate, ff), (up, ff)], d, bias)?, down: self.linear(down, d, ff, bias)?, ff })
    }
}

impl Weights {
    pub fn load(ckpt: &Checkpoint, arch: &Arch) -> Result<Weights> {
        let prefix =
            PREFIXES.iter().find(|p| ckpt.get(&format!("{p}embed_tokens.weight")).is_some()).ok_or_else(|| {
                ModelError::MissingTensor {
                    name: "model.embed_tokens.weight".into(),
                    why: "every supported family has a token embedding".into(),
                }
            })?;
        let ld = Loader { ckpt, prefix, family: arch.family };
        let d = arch.hidden;
        let hd = arch.head_dim;
        let (q_w, kv_w) = (arch.heads * hd, arch.kv_heads * hd);
        let embed_name = ld.full("embed_tokens.weight");
        let mut head = vec![0f32; arch.vocab * d];
        // Reading it whole checks its shape and dtype once; rows are decoded again on use.
        ld.read_into(&embed_name, &[arch.vocab, d], &mut head)?;
        let (embed, entry) = ckpt.get(&embed_name).expect("read_into found it");
        let embed_dtype = entry.dtype;
        if !arch.tied {
            let name = ["lm_head.weight", "language_model.lm_head.weight"]
                .into_iter()
                .find(|n| ckpt.get(n).is_some())
                .unwrap_or("lm_head.weight");
            ld.read_into(name, &[arch.vocab, d], &mut head)?;
        }
        let lm_head = Panels::from_rows(&head, arch.vocab, d);
        drop(head);
        let final_norm = ld.norm("norm.weight", d, arch.norm)?;

        let mut layers = Vec::with_capacity(arch.layers);
        for i in 0..arch.layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            let qkv = if arch.fused_projections {
                ld.linear(&p("self_attn.qkv_proj"), q_w + 2 * kv_w, d, arch.qkv_bias)?
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
                Ffn::Moe(load_moe(&ld, arch, i)?)
            } else {
                let ff = arch.intermediate.expect("Arch checks intermediate_size for dense layers");
                if arch.fused_projections {
                    Ffn::Dense(Mlp {
                        gate_up: ld.linear(&p("mlp.gate_up_proj"), 2 * ff, d, false)?,
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
            layers.push(Layer {
                input_norm: ld.norm(&p("input_layernorm.weight"), d, arch.norm)?,
                qkv,
                q_norm,
                k_norm,
                o,
                post_attn_norm,
                pre_mlp_norm,
                ffn,
                post_mlp_norm,
            });
        }
        Ok(Weights { embed, embed_dtype, layers, final_norm, lm_head })
    }
}

fn load_moe(ld: &Loader<'_>, arch: &Arch, i: usize) -> Result<MoeBlock> {
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
