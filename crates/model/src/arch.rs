//! What the forward pass of each family does, read from config.json with transformers 4.57's defaults
//! (each family's `configuration_*.py`) where a field is absent. Everything family-specific is decided
//! here, once, so that the forward pass only follows flags.

use checkpoint::{Config, Family};
use serde_json::Value;

use crate::rope::RopeSpec;
use crate::{ModelError, Result};

/// How an RMSNorm applies its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `w * x̂` (Llama and most families).
    Plain,
    /// `x̂ * (1 + w)` (Gemma 1/2/3); the gain `1 + w` is formed in f32 at load.
    OnePlus,
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact GELU, `0.5 x (1 + erf(x/√2))`.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`.
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Activation> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_python_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

/// How attention scores are scaled before the softmax (the two spellings round differently).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScoreScale {
    /// `(q·k) * s` with `s = scaling as f32`.
    Mul(f32),
    /// `(q·k) / s` (Qwen2-MoE's eager attention divides by `sqrt(head_dim)`).
    Div(f32),
}

/// Attention of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionKind {
    /// Keys at distance `>= window` from the query are masked (`kv > q - window` is kept).
    pub window: Option<usize>,
    /// Index into [`Arch::ropes`].
    pub rope: usize,
}

/// Mixture-of-experts block settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub expert_ff: usize,
    /// Renormalise the top-k routing weights to sum to 1 (Mixtral always; Qwen: `norm_topk_prob`).
    pub renormalize: bool,
    /// Qwen2-MoE's shared expert width (its output is scaled by `sigmoid(shared_expert_gate(x))`).
    pub shared_ff: Option<usize>,
}

/// Everything the forward pass needs to know about a model's architecture.
#[derive(Clone, Debug)]
pub struct Arch {
    pub family: Family,
    pub hidden: usize,
    pub layers: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Dense MLP width (None where every layer is MoE).
    pub intermediate: Option<usize>,
    /// `rms_norm_eps`, as the f32 that torch adds.
    pub norm_eps: f32,
    pub norm: NormKind,
    pub activation: Activation,
    /// Embedding output scale (Gemma: `sqrt(hidden)` rounded to the compute dtype, f32 here).
    pub embed_scale: Option<f32>,
    pub score_scale: ScoreScale,
    /// Gemma 2: `tanh(s / cap) * cap` on attention scores.
    pub attn_softcap: Option<f32>,
    /// Gemma 2/3: `tanh(z / cap) * cap` on the logits.
    pub final_softcap: Option<f32>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma 2/3: RMSNorm on the attention and MLP outputs before the residual add.
    pub post_norms: bool,
    /// Phi-3 stores q/k/v and gate/up fused.
    pub fused_projections: bool,
    pub attention: Vec<AttentionKind>,
    /// Whether each layer's MLP is a mixture of experts.
    pub moe_layers: Vec<bool>,
    pub moe: Option<MoeSpec>,
    pub ropes: Vec<RopeSpec>,
    /// The LM head reads the embedding matrix.
    pub tied: bool,
    /// The positions a sequence may have (`max_position_embeddings`, or the family's default):
    /// generation refuses to size a KV cache beyond it.
    pub context: usize,
}

impl Arch {
    /// Derives the architecture from a parsed config.json (`tied` from the checkpoint's tensors).
    pub fn from_config(config: &Config, tied: bool, config_path: &std::path::Path) -> Result<Arch> {
        let bad = |problem: String| ModelError::Config { path: config_path.to_path_buf(), problem };
        let raw = &config.raw;
        let family = config.family;
        let f64_or = |k: &str, d: f64| -> Result<f64> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_f64().ok_or_else(|| bad(format!("`{k}` is not a number"))),
            }
        };
        let bool_or = |k: &str, d: bool| -> Result<bool> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_bool().ok_or_else(|| bad(format!("`{k}` is not a boolean"))),
            }
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&v| v > 0)
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| bad(format!("`{k}` is not a positive integer"))),
            }
        };
        let is_gemma = matches!(family, Family::Gemma | Family::Gemma2 | Family::Gemma3);

        // One definition with `edit`'s shape checks: config.json's, or the family default.
        let head_dim = config.head_dim;
        if !config.num_attention_heads.is_multiple_of(config.num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                config.num_attention_heads, config.num_key_value_heads
            )));
        }

        let default_eps = match family {
            Family::Phi3 | Family::Mixtral => 1e-5,
            _ => 1e-6,
        };
        let norm_eps = f64_or("rms_norm_eps", default_eps)?;
        if !(norm_eps > 0.0 && norm_eps.is_finite()) {
            return Err(bad(format!("`rms_norm_eps` {norm_eps} must be positive")));
        }

        // Gemma 1's modeling file reads `hidden_act`; Gemma 2/3 read `hidden_activation`.
        let (act_key, act_default) = match family {
            Family::Gemma => ("hidden_act", "gelu_pytorch_tanh"),
            Family::Gemma2 | Family::Gemma3 => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        let act_name = match raw.get(act_key) {
            None | Some(Value::Null) => act_default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad(format!("`{act_key}` is not a string"))),
        };
        let activation = Activation::parse(&act_name).ok_or_else(|| ModelError::Unsupported {
            what: format!("activation `{act_name}` (`{act_key}` in config.json)"),
        })?;

        let score_scale = match family {
            Family::Gemma2 | Family::Gemma3 => {
                let s = f64_or("query_pre_attn_scalar", 256.0)?;
                if s <= 0.0 {
                    return Err(bad(format!("`query_pre_attn_scalar` {s} must be positive")));
                }
                ScoreScale::Mul(s.powf(-0.5) as f32)
            }
            Family::Qwen2Moe => ScoreScale::Div((head_dim as f64).sqrt() as f32),
            _ => ScoreScale::Mul((head_dim as f64).powf(-0.5) as f32),
        };
        let softcap = |k: &str, d: Option<f64>| -> Result<Option<f32>> {
            match raw.get(k) {
                None => Ok(d.map(|v| v as f32)),
                Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(c) if c > 0.0 => Ok(Some(c as f32)),
                    _ => Err(bad(format!("`{k}` must be a positive number or null"))),
                },
            }
        };
        // Gemma 3's attention ignores attn_logit_softcapping in transformers 4.57 (never passed on).
        let attn_softcap = if family == Family::Gemma2 { softcap("attn_logit_softcapping", Some(50.0))? } else { None };
        let final_softcap = match family {
            Family::Gemma2 => softcap("final_logit_softcapping", Some(30.0))?,
            Family::Gemma3 => softcap("final_logit_softcapping", None)?,
            _ => None,
        };

        let attention_bias = bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match family {
            Family::Llama | Family::Qwen3 | Family::Qwen3Moe | Family::Gemma | Family::Gemma2 | Family::Gemma3 => {
                (attention_bias, attention_bias)
            }
            Family::Qwen2 => (true, false),
            Family::Qwen2Moe => (bool_or("qkv_bias", true)?, false),
            _ => (false, false),
        };
        let mlp_bias = family == Family::Llama && bool_or("mlp_bias", false)?;

        if family == Family::Gemma3 && bool_or("use_bidirectional_attention", false)? {
            return Err(ModelError::Unsupported {
                what: "`use_bidirectional_attention` (an embedding model, not a chat model)".into(),
            });
        }

        // Sliding windows, per layer, with each family's rules.
        let n = config.num_hidden_layers;
        let layer_types: Option<Vec<String>> = match raw.get("layer_types") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let types: Option<Vec<String>> = a.iter().map(|v| v.as_str().map(str::to_string)).collect();
                let types = types.ok_or_else(|| bad("`layer_types` must be a list of strings".into()))?;
                if types.len() != n {
                    return Err(bad(format!(
                        "`layer_types` has {} entries for {n} layers (num_hidden_layers)",
                        types.len()
                    )));
                }
                if let Some(t) = types.iter().find(|t| *t != "sliding_attention" && *t != "full_attention") {
                    return Err(ModelError::Unsupported { what: format!("layer type `{t}` in `layer_types`") });
                }
                Some(types)
            }
            Some(_) => return Err(bad("`layer_types` must be a list of strings".into())),
        };
        let sliding: Vec<bool>;
        let window: Option<usize>;
        match family {
            Family::Llama | Family::Gemma => {
                sliding = vec![false; n];
                window = None;
            }
            Family::Mistral => {
                // Mistral's default is 4096 when the key is absent; null disables it.
                window = match raw.get("sliding_window") {
                    None => Some(4096),
                    Some(_) => opt_usize("sliding_window")?,
                };
                sliding = vec![true; n];
            }
            Family::Mixtral | Family::Phi3 => {
                window = opt_usize("sliding_window")?;
                sliding = vec![true; n];
            }
            Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => {
                let use_sw = bool_or("use_sliding_window", false)?;
                let sw = match raw.get("sliding_window") {
                    None => Some(4096),
                    Some(_) => opt_usize("sliding_window")?,
                };
                window = if use_sw { sw } else { None };
                sliding = match (family, &layer_types) {
                    (Family::Qwen2 | Family::Qwen3, Some(t)) => t.iter().map(|t| t == "sliding_attention").collect(),
                    (Family::Qwen2 | Family::Qwen3, None) => {
                        let max_window_layers = opt_usize("max_window_layers")?.unwrap_or(28);
                        (0..n).map(|i| window.is_some() && i >= max_window_layers).collect()
                    }
                    // The MoE variants apply the window to every layer (eager mask).
                    _ => vec![true; n],
                };
            }
            Family::Gemma2 | Family::Gemma3 => {
                window = match raw.get("sliding_window") {
                    None => Some(4096),
                    Some(_) => opt_usize("sliding_window")?,
                };
                sliding = match &layer_types {
                    Some(t) => t.iter().map(|t| t == "sliding_attention").collect(),
                    None if family == Family::Gemma2 => (0..n).map(|i| (i + 1) % 2 != 0).collect(),
                    None => {
                        let pattern = opt_usize("sliding_window_pattern")?.unwrap_or(6);
                        (0..n).map(|i| (i + 1) % pattern != 0).collect()
                    }
                };
            }
        }

        // Rotary embeddings: one table, or Gemma 3's global and local ones.
        let max_pos = opt_usize("max_position_embeddings")?.unwrap_or(match family {
            Family::Llama => 2048,
            Family::Gemma3 => 131_072,
            Family::Mistral | Family::Mixtral => 4096 * 32,
            Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => 32768,
            Family::Phi3 => 4096,
            _ => 8192,
        });
        let partial = f64_or("partial_rotary_factor", 1.0)?;
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(bad(format!("`partial_rotary_factor` {partial} must be in (0, 1]")));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(bad(format!("rotary dimension {rotary_dim} (head_dim x partial_rotary_factor) must be even")));
        }
        let theta_default = match family {
            Family::Gemma3 => 1_000_000.0,
            Family::Mixtral => 1e6,
            _ => 10000.0,
        };
        let theta = f64_or("rope_theta", theta_default)?;
        let original_max = opt_usize("original_max_position_embeddings")?;
        let global = RopeSpec::parse(raw.get("rope_scaling"), theta, rotary_dim, max_pos, original_max, config_path)?;
        let mut ropes = vec![global];
        let mut rope_of_sliding = 0;
        if family == Family::Gemma3 {
            let local = f64_or("rope_local_base_freq", 10000.0)?;
            ropes.push(RopeSpec::default_rope(local, rotary_dim));
            rope_of_sliding = 1;
        }
        let attention = sliding
            .iter()
            .map(|&s| AttentionKind {
                window: if s { window } else { None },
                rope: if s { rope_of_sliding } else { 0 },
            })
            .collect();

        // Mixture of experts: which layers, and how tokens are routed.
        let moe = match (&config.moe, family) {
            (None, _) => None,
            (Some(m), Family::Mixtral) => Some(MoeSpec {
                experts: m.num_experts,
                top_k: m.experts_per_token,
                expert_ff: m.expert_intermediate_size,
                renormalize: true,
                shared_ff: None,
            }),
            (Some(m), _) => Some(MoeSpec {
                experts: m.num_experts,
                top_k: m.experts_per_token,
                expert_ff: m.expert_intermediate_size,
                renormalize: bool_or("norm_topk_prob", false)?,
                shared_ff: if family == Family::Qwen2Moe {
                    Some(m.shared_expert_intermediate_size.ok_or_else(|| {
                        bad("`shared_expert_intermediate_size` is missing (Qwen2-MoE has a shared expert)".into())
                    })?)
                } else {
                    None
                },
            }),
        };
        if let Some(m) = &moe
            && (m.top_k == 0 || m.top_k > m.experts)
        {
            return Err(bad(format!("num_experts_per_tok {} must be in 1..={}", m.top_k, m.experts)));
        }
        let moe_layers: Vec<bool> = match family {
            Family::Mixtral => vec![true; n],
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let step = opt_usize("decoder_sparse_step")?.unwrap_or(1);
                let only: Vec<usize> = match raw.get("mlp_only_layers") {
                    None | Some(Value::Null) => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_u64().map(|v| v as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad("`mlp_only_layers` must be a list of layer indices".into()))?,
                    Some(_) => return Err(bad("`mlp_only_layers` must be a list of layer indices".into())),
                };
                let experts = moe.as_ref().map_or(0, |m| m.experts);
                (0..n).map(|i| !only.contains(&i) && experts > 0 && (i + 1) % step == 0).collect()
            }
            _ => vec![false; n],
        };
        if moe_layers.iter().any(|m| !m) && config.intermediate_size.is_none() {
            return Err(bad("`intermediate_size` is missing (needed by the dense MLP layers)".into()));
        }

        Ok(Arch {
            family,
            hidden: config.hidden_size,
            layers: n,
            vocab: config.vocab_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim,
            intermediate: config.intermediate_size,
            norm_eps: norm_eps as f32,
            norm: if is_gemma { NormKind::OnePlus } else { NormKind::Plain },
            activation,
            embed_scale: is_gemma.then(|| (config.hidden_size as f64).sqrt() as f32),
            score_scale,
            attn_softcap,
            final_softcap,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            post_norms: family.has_post_norms(),
            fused_projections: family == Family::Phi3,
            attention,
            moe_layers,
            moe,
            ropes,
            tied,
            context: max_pos,
        })
    }

    /// Width of the q, k and v projections together.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
