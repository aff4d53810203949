//! What each tensor of a checkpoint does: writes to the residual stream, normalises such a write
//! (Gemma 2/3 post-norms), or only reads it. method.md §6 ("Which tensors are writers").
//!
//! The d_model axis of every writer comes from the family's forward code, never from the shape
//! alone (square matrices are ambiguous); the shape is then checked against config.json.

use crate::config::{Config, Family};

/// A tensor that adds to the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriterKind {
    /// Token embedding `[vocab, d]`: each row is written for its token.
    Embedding,
    /// Attention output projection (`o_proj`).
    AttnOut,
    /// Dense MLP down projection.
    MlpDown,
    /// A routed expert's down projection (one expert, or all experts fused in a 3-D tensor).
    ExpertDown,
    /// Qwen2-MoE's shared expert down projection.
    SharedExpertDown,
}

impl WriterKind {
    pub const ALL: [WriterKind; 5] = [
        WriterKind::Embedding,
        WriterKind::AttnOut,
        WriterKind::MlpDown,
        WriterKind::ExpertDown,
        WriterKind::SharedExpertDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            WriterKind::Embedding => "embedding",
            WriterKind::AttnOut => "attn_out",
            WriterKind::MlpDown => "mlp_down",
            WriterKind::ExpertDown => "expert_down",
            WriterKind::SharedExpertDown => "shared_expert_down",
        }
    }
}

/// Label of the unit vector a writer is edited or measured against, the same in every output:
/// `r` (the direction), or `s(NORM)` for the gain-weighted `ŝ` of the post-norm `NORM` (Gemma 2/3).
pub fn unit_label(post_norm: Option<&str>) -> String {
    match post_norm {
        None => "r".to_string(),
        Some(norm) => format!("s({norm})"),
    }
}

/// Where a writer's contribution is added: after attention or after the MLP/MoE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    Attn,
    Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Writer {
    pub kind: WriterKind,
    /// Decoder layer (None for the embedding).
    pub layer: Option<usize>,
    /// Expert index for per-expert tensors (None for fused 3-D expert tensors and non-experts).
    pub expert: Option<usize>,
    /// An output bias rather than a weight.
    pub bias: bool,
    /// The axis of the tensor that indexes d_model.
    pub model_axis: usize,
}

impl Writer {
    /// `attn_out`, `mlp_down`, ... with `_bias` for biases: the one label of a writer's kind.
    pub fn label(&self) -> String {
        if self.bias { format!("{}_bias", self.kind.label()) } else { self.kind.label().to_string() }
    }

    /// Views a tensor of this writer as `[outer, d, inner]` around its d_model axis: a weight
    /// `[d, k]` is `[1, d, k]`, an embedding `[V, d]` is `[V, d, 1]`, a bias `[d]` is `[1, d, 1]`,
    /// fused experts `[E, d, k]` are `[E, d, k]`. Every edit and measurement works on this view.
    pub fn view(&self, shape: &[usize]) -> (usize, usize, usize) {
        let outer = shape[..self.model_axis].iter().product();
        let inner = shape[self.model_axis + 1..].iter().product();
        (outer, shape[self.model_axis], inner)
    }

    /// The site whose post-norm (Gemma 2/3) follows this writer; None for the embedding.
    pub fn site(&self) -> Option<Site> {
        match self.kind {
            WriterKind::Embedding => None,
            WriterKind::AttnOut => Some(Site::Attn),
            _ => Some(Site::Mlp),
        }
    }
}

/// A tensor that only reads the residual stream (or is not part of the text model's stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    LmHead,
    FinalNorm,
    /// A norm before attention or the MLP.
    PreNorm,
    /// q/k/v projections (separate or fused) and their biases.
    AttnIn,
    /// Qwen 3 / Gemma 3 per-head q/k RMSNorm.
    QkNorm,
    /// gate/up projections (separate or fused), per expert or shared.
    MlpIn,
    /// MoE router and Qwen2-MoE's shared-expert gate.
    Router,
    /// Rotary frequency buffers saved by old transformers versions.
    RotaryBuffer,
    /// Vision tower and projector of a multimodal checkpoint (not part of the text stream).
    Vision,
}

impl Reader {
    pub fn label(self) -> &'static str {
        match self {
            Reader::LmHead => "lm_head",
            Reader::FinalNorm => "final_norm",
            Reader::PreNorm => "pre_norm",
            Reader::AttnIn => "attn_in",
            Reader::QkNorm => "qk_norm",
            Reader::MlpIn => "mlp_in",
            Reader::Router => "router",
            Reader::RotaryBuffer => "rotary_buffer",
            Reader::Vision => "vision",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Writer(Writer),
    /// Gemma 2/3 `post_attention_layernorm` / `post_feedforward_layernorm` weight: the gain
    /// `g = 1 + w` applied to a writer's output (method.md §6).
    PostNorm {
        layer: usize,
        site: Site,
    },
    Reader(Reader),
    Unknown,
}

impl Role {
    /// `embedding`, `attn_out`, `mlp_down_bias`, `post_norm`, `lm_head`, `unknown`, ...: the one
    /// label of every role, in every output.
    pub fn label(&self) -> String {
        match self {
            Role::Writer(w) => w.label(),
            Role::PostNorm { .. } => "post_norm".to_string(),
            Role::Reader(r) => r.label().to_string(),
            Role::Unknown => "unknown".to_string(),
        }
    }

    pub fn writer(&self) -> Option<&Writer> {
        match self {
            Role::Writer(w) => Some(w),
            _ => None,
        }
    }
}

/// Prefixes under which a text model's tensors are stored.
const TEXT_PREFIXES: [&str; 3] = ["model.language_model.", "language_model.model.", "model."];

/// Classifies one tensor by name and rank (rank picks between per-expert and fused layouts).
pub fn classify(family: Family, name: &str, rank: usize) -> Role {
    use Reader::*;
    if name.starts_with("vision_tower.")
        || name.starts_with("multi_modal_projector.")
        || name.starts_with("model.vision_tower.")
        || name.starts_with("model.multi_modal_projector.")
    {
        return if family == Family::Gemma3 { Role::Reader(Vision) } else { Role::Unknown };
    }
    if name == "lm_head.weight" || name == "language_model.lm_head.weight" {
        return Role::Reader(LmHead);
    }
    let Some(rest) = TEXT_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else {
        return Role::Unknown;
    };
    match rest {
        "embed_tokens.weight" => return writer(WriterKind::Embedding, None, None, false, 1),
        "norm.weight" => return Role::Reader(FinalNorm),
        _ => {}
    }
    let Some(rest) = rest.strip_prefix("layers.") else {
        return Role::Unknown;
    };
    let Some((layer, rest)) = split_index(rest) else {
        return Role::Unknown;
    };
    classify_in_layer(family, layer, rest, rank)
}

fn writer(kind: WriterKind, layer: Option<usize>, expert: Option<usize>, bias: bool, model_axis: usize) -> Role {
    Role::Writer(Writer { kind, layer, expert, bias, model_axis })
}

/// `"12.rest"` -> `(12, "rest")`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (num, rest) = s.split_once('.')?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || (num.len() > 1 && num.starts_with('0')) {
        return None;
    }
    Some((num.parse().ok()?, rest))
}

fn classify_in_layer(family: Family, layer: usize, rest: &str, rank: usize) -> Role {
    use Reader::*;
    let l = Some(layer);
    let post_norms = family.has_post_norms();
    match rest {
        "input_layernorm.weight" => return Role::Reader(PreNorm),
        "post_attention_layernorm.weight" if post_norms => {
            return Role::PostNorm { layer, site: Site::Attn };
        }
        "post_attention_layernorm.weight" => return Role::Reader(PreNorm),
        "pre_feedforward_layernorm.weight" if post_norms => return Role::Reader(PreNorm),
        "post_feedforward_layernorm.weight" if post_norms => {
            return Role::PostNorm { layer, site: Site::Mlp };
        }
        "self_attn.o_proj.weight" => return writer(WriterKind::AttnOut, l, None, false, 0),
        "self_attn.o_proj.bias" => return writer(WriterKind::AttnOut, l, None, true, 0),
        "self_attn.rotary_emb.inv_freq" => return Role::Reader(RotaryBuffer),
        _ => {}
    }
    if let Some(p) = rest.strip_prefix("self_attn.") {
        let qkv = match family {
            Family::Phi3 => matches!(p, "qkv_proj.weight" | "qkv_proj.bias"),
            _ => matches!(
                p,
                "q_proj.weight" | "k_proj.weight" | "v_proj.weight" | "q_proj.bias" | "k_proj.bias" | "v_proj.bias"
            ),
        };
        if qkv {
            return Role::Reader(AttnIn);
        }
        if matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3)
            && matches!(p, "q_norm.weight" | "k_norm.weight")
        {
            return Role::Reader(QkNorm);
        }
        return Role::Unknown;
    }
    // Dense MLP (every dense family, and dense layers of Qwen MoE models).
    let dense_ok = !matches!(family, Family::Mixtral);
    if dense_ok {
        match (family, rest) {
            (_, "mlp.down_proj.weight") => return writer(WriterKind::MlpDown, l, None, false, 0),
            (_, "mlp.down_proj.bias") => return writer(WriterKind::MlpDown, l, None, true, 0),
            (Family::Phi3, "mlp.gate_up_proj.weight") => return Role::Reader(MlpIn),
            (f, "mlp.gate_proj.weight" | "mlp.up_proj.weight" | "mlp.gate_proj.bias" | "mlp.up_proj.bias")
                if f != Family::Phi3 =>
            {
                return Role::Reader(MlpIn);
            }
            _ => {}
        }
    }
    if !family.is_moe() {
        return Role::Unknown;
    }
    // Mixture of experts. Mixtral's block is `block_sparse_moe` (transformers 4.x) or `mlp` (5.x).
    let moe = match family {
        Family::Mixtral => rest.strip_prefix("block_sparse_moe.").or_else(|| rest.strip_prefix("mlp.")),
        _ => rest.strip_prefix("mlp."),
    };
    let Some(moe) = moe else { return Role::Unknown };
    if moe == "gate.weight" {
        return Role::Reader(Router);
    }
    if family == Family::Qwen2Moe {
        match moe {
            "shared_expert_gate.weight" => return Role::Reader(Router),
            "shared_expert.down_proj.weight" => {
                return writer(WriterKind::SharedExpertDown, l, None, false, 0);
            }
            "shared_expert.gate_proj.weight" | "shared_expert.up_proj.weight" => {
                return Role::Reader(MlpIn);
            }
            _ => {}
        }
    }
    let Some(experts) = moe.strip_prefix("experts.") else {
        return Role::Unknown;
    };
    // Fused 3-D tensors (transformers 5.x): down_proj [E, d, ff] used as F.linear(x, W[e]),
    // so d_model is axis 1; gate_up_proj [E, 2 ff, d] only reads.
    match (experts, rank) {
        ("down_proj", 3) => return writer(WriterKind::ExpertDown, l, None, false, 1),
        ("gate_up_proj", 3) => return Role::Reader(MlpIn),
        _ => {}
    }
    let Some((e, p)) = split_index(experts) else {
        return Role::Unknown;
    };
    let (down, ins): (&str, &[&str]) = match family {
        Family::Mixtral => ("w2.weight", &["w1.weight", "w3.weight"]),
        _ => ("down_proj.weight", &["gate_proj.weight", "up_proj.weight"]),
    };
    if p == down {
        writer(WriterKind::ExpertDown, l, Some(e), false, 0)
    } else if ins.contains(&p) {
        Role::Reader(MlpIn)
    } else {
        Role::Unknown
    }
}

/// The shape config.json implies for a writer; `None` entries are not constrained.
pub fn expected_shape(config: &Config, w: &Writer) -> Vec<Option<usize>> {
    let d = Some(config.hidden_size);
    if w.bias {
        return vec![d];
    }
    let moe_ff = config.moe.as_ref().map(|m| m.expert_intermediate_size);
    match w.kind {
        WriterKind::Embedding => vec![Some(config.vocab_size), d],
        WriterKind::AttnOut => vec![d, Some(config.num_attention_heads * config.head_dim)],
        WriterKind::MlpDown => vec![d, config.intermediate_size],
        WriterKind::ExpertDown if w.expert.is_none() => {
            vec![config.moe.as_ref().map(|m| m.num_experts), d, moe_ff]
        }
        WriterKind::ExpertDown => vec![d, moe_ff],
        WriterKind::SharedExpertDown => {
            vec![d, config.moe.as_ref().and_then(|m| m.shared_expert_intermediate_size)]
        }
    }
}

/// The config fields `expected_shape` used, for error messages.
pub fn shape_fields(config: &Config, w: &Writer) -> String {
    let d = config.hidden_size;
    if w.bias {
        return format!("hidden_size {d}");
    }
    match w.kind {
        WriterKind::Embedding => format!("vocab_size {}, hidden_size {d}", config.vocab_size),
        WriterKind::AttnOut => format!(
            "hidden_size {d}, num_attention_heads {} x head_dim {}",
            config.num_attention_heads, config.head_dim
        ),
        WriterKind::MlpDown => match config.intermediate_size {
            Some(i) => format!("hidden_size {d}, intermediate_size {i}"),
            None => format!("hidden_size {d}"),
        },
        WriterKind::ExpertDown | WriterKind::SharedExpertDown => match &config.moe {
            Some(m) => format!(
                "hidden_size {d}, num_experts {}, expert intermediate size {}{}",
                m.num_experts,
                m.expert_intermediate_size,
                m.shared_expert_intermediate_size
                    .map(|s| format!(", shared_expert_intermediate_size {s}"))
                    .unwrap_or_default()
            ),
            None => format!("hidden_size {d}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_llama_names() {
        let c = |n| classify(Family::Llama, n, 2);
        assert_eq!(c("model.embed_tokens.weight"), writer(WriterKind::Embedding, None, None, false, 1));
        assert_eq!(c("model.layers.3.self_attn.o_proj.weight"), writer(WriterKind::AttnOut, Some(3), None, false, 0));
        assert_eq!(c("model.layers.3.mlp.down_proj.bias"), writer(WriterKind::MlpDown, Some(3), None, true, 0));
        assert_eq!(c("model.layers.3.mlp.up_proj.weight"), Role::Reader(Reader::MlpIn));
        assert_eq!(c("model.layers.03.mlp.up_proj.weight"), Role::Unknown);
        assert_eq!(c("model.layers.3.self_attn.q_norm.weight"), Role::Unknown);
        assert_eq!(c("lm_head.weight"), Role::Reader(Reader::LmHead));
        assert_eq!(c("model.extra.weight"), Role::Unknown);
    }

    #[test]
    fn classifies_gemma_post_norms_and_moe() {
        assert_eq!(
            classify(Family::Gemma2, "model.layers.1.post_attention_layernorm.weight", 1),
            Role::PostNorm { layer: 1, site: Site::Attn }
        );
        assert_eq!(
            classify(Family::Gemma, "model.layers.1.post_attention_layernorm.weight", 1),
            Role::Reader(Reader::PreNorm)
        );
        assert_eq!(
            classify(Family::Gemma3, "language_model.model.layers.0.post_feedforward_layernorm.weight", 1),
            Role::PostNorm { layer: 0, site: Site::Mlp }
        );
        assert_eq!(
            classify(Family::Mixtral, "model.layers.0.block_sparse_moe.experts.7.w2.weight", 2),
            writer(WriterKind::ExpertDown, Some(0), Some(7), false, 0)
        );
        assert_eq!(
            classify(Family::Qwen3Moe, "model.layers.0.mlp.experts.down_proj", 3),
            writer(WriterKind::ExpertDown, Some(0), None, false, 1)
        );
        assert_eq!(
            classify(Family::Qwen2Moe, "model.layers.0.mlp.shared_expert.down_proj.weight", 2),
            writer(WriterKind::SharedExpertDown, Some(0), None, false, 0)
        );
        assert_eq!(
            classify(Family::Qwen2Moe, "model.layers.0.mlp.shared_expert_gate.weight", 2),
            Role::Reader(Reader::Router)
        );
    }
}
