//! `tokenizer.json` loaded the way transformers' `PreTrainedTokenizerFast` loads it, so that token
//! ids match `apply_chat_template(..., tokenize=True)` exactly: no truncation or padding, the
//! pre-tokenizer's `add_prefix_space` taken from tokenizer_config.json, the tokens of
//! `added_tokens_decoder` (and special tokens) that tokenizer.json lacks added, and
//! `split_special_tokens` honoured. Decoding applies `clean_up_tokenization_spaces` as
//! transformers' `decode` does.

use std::path::Path;

use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::{TOKENIZER_FILE, TokenizerConfig, read_optional};
use crate::error::{Error, Result};

pub(crate) fn load(dir: &Path, config: &TokenizerConfig) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    let bytes = read_optional(&path)?.ok_or_else(|| Error::NoTokenizer { path: path.clone() })?;
    let tok_err = |message: String| Error::Tokenizer { path: path.clone(), message };
    let mut json: Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::Json { path: path.clone(), message: e.to_string() })?;
    if let (Some(want), Some(Value::Object(pre))) = (config.add_prefix_space, json.get_mut("pre_tokenizer"))
        && let Some(Value::Bool(have)) = pre.get("add_prefix_space")
        && *have != want
    {
        pre.insert("add_prefix_space".to_string(), Value::Bool(want));
    }
    let mut tokenizer: Tokenizer = serde_json::from_value(json).map_err(|e| tok_err(e.to_string()))?;
    tokenizer.with_truncation(None).map_err(|e| tok_err(e.to_string()))?;
    tokenizer.with_padding(None);

    // transformers adds the `added_tokens_decoder` entries that differ from tokenizer.json's
    // added tokens, then the special tokens that are not in the vocabulary at all.
    let existing = tokenizer.get_added_tokens_decoder();
    let mut to_add: Vec<AddedToken> = config
        .added_tokens
        .iter()
        .filter(|(_, token)| !existing.values().any(|t| t == token))
        .map(|(_, token)| token.clone())
        .collect();
    let special = &config.special;
    let all_special: Vec<&str> = special
        .named()
        .iter()
        .filter_map(|(_, t)| *t)
        .chain(special.additional_special_tokens.iter().map(String::as_str))
        .filter(|t| !t.is_empty())
        .collect();
    for text in &all_special {
        let known = tokenizer.token_to_id(text).is_some() || to_add.iter().any(|t| t.content == *text);
        if !known {
            to_add.push(AddedToken::from(text.to_string(), true));
        }
    }
    for token in &mut to_add {
        token.special = token.special || all_special.contains(&token.content.as_str());
    }
    if !to_add.is_empty() {
        tokenizer.add_tokens(to_add).map_err(|e| tok_err(e.to_string()))?;
    }
    tokenizer.set_encode_special_tokens(config.split_special_tokens);
    Ok(tokenizer)
}

/// transformers' `clean_up_tokenization`: removes the space before punctuation and English
/// contractions, in this order.
pub(crate) fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    let mut out = text.to_string();
    for (from, to) in RULES {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_follows_transformers_order() {
        assert_eq!(clean_up_tokenization("Hi , you ! I 'm sure it 's fine ."), "Hi, you! I'm sure it's fine.");
        // " ' " goes first, so " n ' t" becomes " n't" and then "n't", as in Python.
        assert_eq!(clean_up_tokenization("do n ' t"), "don't");
        assert_eq!(clean_up_tokenization("no change"), "no change");
    }
}
