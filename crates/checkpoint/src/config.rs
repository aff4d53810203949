//! `config.json`: the model family and the dimensions we check tensors against.
//!
//! Only what the editor and the runtime need is typed here; the whole (text) config stays
//! available as JSON for family-specific fields (`Config::raw`).

use serde_json::{Map, Value};

/// A supported architecture, from `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

impl Family {
    pub const ALL: [Family; 11] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
    ];

    /// The `model_type` values each family answers to.
    pub fn from_model_type(s: &str) -> Option<Family> {
        Some(match s {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// transformers' default for `tie_word_embeddings` when config.json omits it.
    pub fn default_tie(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }

    /// `head_dim` when config.json has none, as transformers 4.57 defaults it: 256 for the Gemmas
    /// and 128 for Qwen 3 (their config classes' defaults), `hidden / heads` for every other
    /// family (their attention's `getattr(config, "head_dim", hidden // heads)`). The one
    /// definition: `edit` checks shapes with it and the runtime runs with it.
    pub fn default_head_dim(self, hidden: usize, heads: usize) -> Option<usize> {
        match self {
            Family::Gemma | Family::Gemma2 | Family::Gemma3 => Some(256),
            Family::Qwen3 => Some(128),
            _ => hidden.is_multiple_of(heads).then(|| hidden / heads),
        }
    }

    /// Gemma 2 and 3 normalise each block's output before adding it to the residual
    /// (method.md §6, post-norm writers).
    pub fn has_post_norms(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    pub fn is_moe(self) -> bool {
        matches!(self, Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe)
    }
}

pub const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe";

/// Mixture-of-experts dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub num_experts: usize,
    pub experts_per_token: usize,
    /// Hidden size of each expert's MLP (`moe_intermediate_size`; Mixtral: `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Qwen2-MoE's shared expert, if any.
    pub shared_expert_intermediate_size: Option<usize>,
}

/// The parts of `config.json` the tool relies on.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub family: Family,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim`, or the family's default ([`Family::default_head_dim`]).
    pub head_dim: usize,
    /// Dense MLP width (absent for pure-MoE layers in some configs).
    pub intermediate_size: Option<usize>,
    pub moe: Option<Moe>,
    /// Whether the LM head reads the token embedding matrix (config value or family default).
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as written, if any.
    pub dtype: Option<String>,
    /// The text model's config object (for multimodal Gemma 3: `text_config`).
    pub raw: Map<String, Value>,
    /// The whole config.json as read.
    pub file: Map<String, Value>,
}

/// Why config.json is unusable. The caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("no `model_type`")]
    NoModelType,
    #[error("unsupported model_type `{0}`; supported: {SUPPORTED_MODEL_TYPES}")]
    UnknownModelType(String),
    #[error("`{field}` is missing or not a positive integer")]
    BadField { field: String },
    #[error(
        "declares quantization_config (method `{0}`): quantized checkpoints cannot be edited; dequantize the model first (e.g. load it in transformers and save_pretrained it in bfloat16)"
    )]
    Quantized(String),
    #[error("hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is given")]
    HeadDim { hidden: usize, heads: usize },
}

impl Config {
    /// Parses config.json text.
    pub fn parse(text: &[u8]) -> Result<Config, ConfigError> {
        let value: Value = serde_json::from_slice(text).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let Value::Object(file) = value else {
            return Err(ConfigError::NotObject);
        };
        let model_type = file.get("model_type").and_then(Value::as_str).ok_or(ConfigError::NoModelType)?.to_string();
        let family =
            Family::from_model_type(&model_type).ok_or_else(|| ConfigError::UnknownModelType(model_type.clone()))?;
        if let Some(q) = file.get("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
            return Err(ConfigError::Quantized(method.to_string()));
        }
        // Multimodal Gemma 3 keeps the language model's settings in `text_config`.
        let raw = match file.get("text_config") {
            Some(Value::Object(t)) => t.clone(),
            _ => file.clone(),
        };
        let get = |k: &str| raw.get(k).and_then(Value::as_u64).filter(|&v| v > 0).map(|v| v as usize);
        let need = |k: &str| get(k).ok_or_else(|| ConfigError::BadField { field: k.to_string() });
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let head_dim = match raw.get("head_dim") {
            None | Some(Value::Null) => family
                .default_head_dim(hidden_size, num_attention_heads)
                .ok_or(ConfigError::HeadDim { hidden: hidden_size, heads: num_attention_heads })?,
            Some(_) => need("head_dim")?,
        };
        let moe = match family {
            Family::Mixtral => Some(Moe {
                num_experts: need("num_local_experts")?,
                experts_per_token: need("num_experts_per_tok")?,
                expert_intermediate_size: need("intermediate_size")?,
                shared_expert_intermediate_size: None,
            }),
            Family::Qwen2Moe | Family::Qwen3Moe => Some(Moe {
                num_experts: need("num_experts")?,
                experts_per_token: need("num_experts_per_tok")?,
                expert_intermediate_size: need("moe_intermediate_size")?,
                shared_expert_intermediate_size: get("shared_expert_intermediate_size"),
            }),
            _ => None,
        };
        let tie = raw
            .get("tie_word_embeddings")
            .or_else(|| file.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(family.default_tie());
        let dtype = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| raw.get(*k).or_else(|| file.get(*k)).and_then(Value::as_str))
            .map(str::to_string);
        Ok(Config {
            model_type,
            family,
            hidden_size,
            num_hidden_layers: need("num_hidden_layers")?,
            vocab_size: need("vocab_size")?,
            num_attention_heads,
            num_key_value_heads: get("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim,
            intermediate_size: get("intermediate_size"),
            moe,
            tie_word_embeddings: tie,
            dtype,
            raw,
            file,
        })
    }

    /// Reads an optional float field of the text config.
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Value::as_f64)
    }

    /// Reads an optional integer field of the text config.
    pub fn usize(&self, key: &str) -> Option<usize> {
        self.raw.get(key).and_then(Value::as_u64).map(|v| v as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_defaults_apply_when_fields_are_omitted() {
        let c = Config::parse(
            br#"{"model_type":"gemma","hidden_size":64,"num_hidden_layers":2,"vocab_size":10,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert!(c.tie_word_embeddings);
        // Issue 13: Gemma's head_dim defaults to 256 (not hidden/heads = 16), as in transformers.
        assert_eq!((c.head_dim, c.num_key_value_heads), (256, 4));
        let c = Config::parse(
            br#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"vocab_size":10,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert!(!c.tie_word_embeddings);
    }

    /// transformers 4.57's `head_dim` when config.json omits it (or writes null), family by family.
    #[test]
    fn head_dim_defaults_follow_each_family() {
        for family in Family::ALL {
            let want = match family {
                Family::Gemma | Family::Gemma2 | Family::Gemma3 => 256,
                Family::Qwen3 => 128,
                _ => 16,
            };
            for head_dim in ["", r#""head_dim":null,"#] {
                let text = format!(
                    r#"{{"model_type":"{}",{head_dim}"hidden_size":64,"num_hidden_layers":2,"vocab_size":10,"num_attention_heads":4,
                       "intermediate_size":8,"num_local_experts":2,"num_experts":2,"num_experts_per_tok":1,"moe_intermediate_size":8}}"#,
                    family.name()
                );
                assert_eq!(Config::parse(text.as_bytes()).unwrap().head_dim, want, "{family:?} {head_dim}");
            }
        }
        let e = |t: &str| Config::parse(t.as_bytes()).unwrap_err().to_string();
        let base = r#""hidden_size":64,"num_hidden_layers":2,"vocab_size":10,"num_attention_heads":5"#;
        assert_eq!(
            e(&format!(r#"{{"model_type":"llama",{base}}}"#)),
            "hidden_size 64 is not divisible by num_attention_heads 5 and no head_dim is given"
        );
        assert_eq!(Config::parse(format!(r#"{{"model_type":"gemma",{base}}}"#).as_bytes()).unwrap().head_dim, 256);
        assert_eq!(
            e(&format!(r#"{{"model_type":"llama",{base},"head_dim":"16"}}"#)),
            "`head_dim` is missing or not a positive integer"
        );
    }

    #[test]
    fn multimodal_gemma3_reads_text_config() {
        let c = Config::parse(br#"{"model_type":"gemma3","text_config":{"hidden_size":64,"num_hidden_layers":2,"vocab_size":10,"num_attention_heads":4,"head_dim":32}}"#).unwrap();
        assert_eq!((c.family, c.hidden_size, c.head_dim), (Family::Gemma3, 64, 32));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |t: &str| Config::parse(t.as_bytes()).unwrap_err().to_string();
        assert!(e("{").starts_with("not valid JSON: "));
        assert_eq!(
            e(r#"{"model_type":"gpt2"}"#),
            format!("unsupported model_type `gpt2`; supported: {SUPPORTED_MODEL_TYPES}")
        );
        assert_eq!(
            e(r#"{"model_type":"llama","hidden_size":"x"}"#),
            "`hidden_size` is missing or not a positive integer"
        );
        assert!(
            e(r#"{"model_type":"llama","quantization_config":{"quant_method":"gptq"}}"#)
                .starts_with("declares quantization_config (method `gptq`)")
        );
    }
}
