//! The tokenizer's side files of a Hugging Face model directory, read as transformers reads them:
//! `tokenizer_config.json` (special tokens, chat template, decoding flags), the legacy
//! `special_tokens_map.json`, `chat_template.jinja`, and the end-of-turn ids of
//! `generation_config.json` (or `config.json`).
//!
//! Every file is untrusted: wrong types are errors naming the file and the field, never panics.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::AddedToken;

use crate::error::{Error, Result};
use crate::template::SpecialTokens;

pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
pub(crate) const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub(crate) const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
pub(crate) const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub(crate) const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub(crate) const CONFIG_FILE: &str = "config.json";

/// Reads a file that may be absent (`Ok(None)`).
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(cause) => Err(Error::Io { path: path.to_path_buf(), cause }),
    }
}

fn parse_object(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), message: e.to_string() })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(Error::Invalid { path: path.to_path_buf(), problem: "not a JSON object".to_string() }),
    }
}

/// A JSON object file that may be absent (then empty).
pub(crate) fn read_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    read_optional(path)?.map(|bytes| parse_object(path, &bytes)).transpose()
}

fn invalid(path: &Path, problem: String) -> Error {
    Error::Invalid { path: path.to_path_buf(), problem }
}

/// A special token as tokenizer files write it: a string, an AddedToken object
/// (`{"content": ...}`), or null.
fn token_text(path: &Path, field: &str, value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(path, format!("`{field}` is an object without a string `content`"))),
        },
        _ => Err(invalid(path, format!("`{field}` must be a string, an object with `content`, or null"))),
    }
}

/// Fills the special tokens from one file's fields (those present replace earlier values).
fn read_special(path: &Path, map: &Map<String, Value>, special: &mut SpecialTokens) -> Result<()> {
    let slots: [(&str, &mut Option<String>); 7] = [
        ("bos_token", &mut special.bos_token),
        ("eos_token", &mut special.eos_token),
        ("unk_token", &mut special.unk_token),
        ("sep_token", &mut special.sep_token),
        ("pad_token", &mut special.pad_token),
        ("cls_token", &mut special.cls_token),
        ("mask_token", &mut special.mask_token),
    ];
    for (field, slot) in slots {
        if let Some(value) = map.get(field) {
            *slot = token_text(path, field, value)?;
        }
    }
    match map.get("additional_special_tokens") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let mut list = Vec::new();
            for item in items {
                if let Some(text) = token_text(path, "additional_special_tokens", item)?
                    && !list.contains(&text)
                {
                    list.push(text);
                }
            }
            special.additional_special_tokens = list;
        }
        Some(_) => return Err(invalid(path, "`additional_special_tokens` must be a list".to_string())),
    }
    Ok(())
}

/// What tokenizer_config.json (with the legacy special_tokens_map.json) says.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenizerConfig {
    pub path: PathBuf,
    pub special: SpecialTokens,
    /// `added_tokens_decoder`, sorted by id.
    pub added_tokens: Vec<(u32, AddedToken)>,
    pub clean_up_tokenization_spaces: bool,
    /// `add_prefix_space` as transformers resolves it; None where transformers leaves the
    /// pre-tokenizer alone.
    pub add_prefix_space: Option<bool>,
    pub split_special_tokens: bool,
    /// `chat_template` as written: a string, or a list of `{name, template}`.
    pub chat_template: Option<Value>,
}

fn get_bool(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(path, format!("`{field}` must be true or false"))),
    }
}

fn added_token(path: &Path, id: &str, value: &Value) -> Result<(u32, AddedToken)> {
    let bad = |what: &str| invalid(path, format!("`added_tokens_decoder` entry `{id}`: {what}"));
    let id: u32 = id.parse().map_err(|_| bad("the key is not a token id"))?;
    let Value::Object(o) = value else { return Err(bad("not an object")) };
    let Some(Value::String(content)) = o.get("content") else { return Err(bad("no string `content`")) };
    let flag = |name: &str, default: bool| match o.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(&format!("`{name}` is not a boolean"))),
    };
    let special = flag("special", false)?;
    let token = AddedToken::from(content.clone(), special)
        .single_word(flag("single_word", false)?)
        .lstrip(flag("lstrip", false)?)
        .rstrip(flag("rstrip", false)?)
        // Python's AddedToken defaults `normalized` to `not special`.
        .normalized(flag("normalized", !special)?);
    Ok((id, token))
}

impl TokenizerConfig {
    pub fn read(dir: &Path) -> Result<TokenizerConfig> {
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let map = read_object(&path)?.unwrap_or_default();
        let mut special = SpecialTokens::default();
        read_special(&path, &map, &mut special)?;
        let mut added_tokens = Vec::new();
        match map.get("added_tokens_decoder") {
            Some(Value::Object(decoder)) => {
                for (id, value) in decoder {
                    added_tokens.push(added_token(&path, id, value)?);
                }
                added_tokens.sort_by_key(|(id, _)| *id);
            }
            Some(_) => return Err(invalid(&path, "`added_tokens_decoder` must be an object".to_string())),
            None => {
                // Legacy layout (transformers `from_pretrained`): without `added_tokens_decoder`,
                // special_tokens_map.json's entries replace tokenizer_config.json's.
                let legacy = dir.join(SPECIAL_TOKENS_MAP_FILE);
                if let Some(legacy_map) = read_object(&legacy)? {
                    read_special(&legacy, &legacy_map, &mut special)?;
                }
            }
        }
        let class = map.get("tokenizer_class").and_then(Value::as_str).unwrap_or_default();
        // `PreTrainedTokenizerFast.__init__` sets the pre-tokenizer's `add_prefix_space` to the
        // config's value, False when absent; the Llama classes pass None, which leaves it alone.
        let add_prefix_space = match get_bool(&path, &map, "add_prefix_space")? {
            Some(b) => Some(b),
            None if class.starts_with("LlamaTokenizer") || class.starts_with("CodeLlamaTokenizer") => None,
            None => Some(false),
        };
        let chat_template = match map.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(v @ (Value::String(_) | Value::Array(_))) => Some(v.clone()),
            Some(_) => {
                return Err(invalid(
                    &path,
                    "`chat_template` must be a string or a list of {name, template}".to_string(),
                ));
            }
        };
        Ok(TokenizerConfig {
            special,
            added_tokens,
            clean_up_tokenization_spaces: get_bool(&path, &map, "clean_up_tokenization_spaces")?.unwrap_or(false),
            add_prefix_space,
            split_special_tokens: get_bool(&path, &map, "split_special_tokens")?.unwrap_or(false),
            chat_template,
            path,
        })
    }

    /// The default chat template of tokenizer_config.json, if it has one.
    pub fn default_template(&self) -> Result<Option<String>> {
        match &self.chat_template {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Array(list)) => {
                let mut names = Vec::new();
                for entry in list {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry.get("template").and_then(Value::as_str);
                    let (Some(name), Some(template)) = (name, template) else {
                        return Err(invalid(
                            &self.path,
                            "each `chat_template` list entry must have string `name` and `template`".to_string(),
                        ));
                    };
                    if name == "default" {
                        return Ok(Some(template.to_string()));
                    }
                    names.push(name.to_string());
                }
                Err(Error::NoDefaultTemplate { path: self.path.clone(), names })
            }
            Some(_) => unreachable!("`chat_template` was checked to be a string or a list in `read`"),
        }
    }
}

/// `eos_token_id` of one JSON object: an int or a list of ints (null or absent: none).
fn eos_ids_of(path: &Path, map: &Map<String, Value>) -> Result<Option<Vec<u32>>> {
    let to_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(path, format!("`eos_token_id` has `{v}`, which is not a token id")))
    };
    match map.get("eos_token_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items.iter().map(to_id).collect::<Result<Vec<_>>>().map(Some),
        Some(v) => Ok(Some(vec![to_id(v)?])),
    }
}

/// The end-of-turn ids the model's generation config declares: generation_config.json's
/// `eos_token_id`, or config.json's (top level, then `text_config`) where there is no
/// generation_config.json, as transformers derives one.
pub(crate) fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join(GENERATION_CONFIG_FILE);
    if let Some(map) = read_object(&path)? {
        return Ok(eos_ids_of(&path, &map)?.unwrap_or_default());
    }
    let path = dir.join(CONFIG_FILE);
    let Some(map) = read_object(&path)? else { return Ok(Vec::new()) };
    if let Some(ids) = eos_ids_of(&path, &map)? {
        return Ok(ids);
    }
    match map.get("text_config") {
        Some(Value::Object(text)) => Ok(eos_ids_of(&path, text)?.unwrap_or_default()),
        _ => Ok(Vec::new()),
    }
}
