//! Post-instruction tokens (method.md §1): the chat template's tokens that follow the user's
//! instruction in a prompt (SmolLM2: `<|im_end|>\n<|im_start|>assistant\n`). Refusal directions
//! are read at these positions, counted from the end of every prompt, so they must be the last
//! tokens of every tokenized prompt; [`PostInstruction::check`] says so per prompt.
//!
//! They are found by rendering a placeholder instruction and tokenizing the whole prompt, so
//! the tokens are the ones the template's text gets *in context*; a token that straddles the end
//! of the instruction (a merge across the boundary) is an error, not a guess.

use crate::error::{Error, Result};
use crate::{Chat, Ending, Message};

/// Instructions rendered to find the template's suffix; lowercase ASCII words so that they
/// survive templates that strip, trim or change the case of the content.
const PLACEHOLDERS: [&str; 2] = ["abliterate placeholder instruction", "xq zv placeholder"];

/// The template tokens after the instruction, and their text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostInstruction {
    ids: Vec<u32>,
    text: String,
}

impl PostInstruction {
    /// Token ids (`eoi_toks`), in order; the last is the last token of every prompt.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The template text these tokens cover.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `n_eoi`, the number of post-instruction positions.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Checks that a tokenized prompt ends with these tokens. `prompt` names it in the error
    /// (it is shortened there, as instructions may be long).
    pub fn check(&self, prompt_ids: &[u32], prompt: &str) -> Result<()> {
        if prompt_ids.ends_with(&self.ids) {
            return Ok(());
        }
        let tail = &prompt_ids[prompt_ids.len().saturating_sub(self.ids.len())..];
        Err(Error::PostInstructionMismatch { prompt: shorten(prompt), expected: self.ids.clone(), got: tail.to_vec() })
    }
}

/// `"How do I ..."` cut to 48 characters, quoted.
fn shorten(text: &str) -> String {
    const MAX: usize = 48;
    let mut out: String = text.chars().take(MAX).collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    format!("{out:?}")
}

pub(crate) fn find(chat: &Chat) -> Result<PostInstruction> {
    let origin = chat.template().origin().to_string();
    let placeholder_error = |problem: String| Error::Placeholder { origin: origin.clone(), problem };
    let mut last_problem = String::new();
    for placeholder in PLACEHOLDERS {
        let rendered = chat.render(&[Message::user(placeholder)], Ending::GenerationPrompt)?;
        // Exact text first, then ignoring ASCII case (a template may upper- or title-case it).
        let lower = rendered.to_ascii_lowercase();
        let hits: Vec<usize> = match rendered.match_indices(placeholder).map(|(i, _)| i).collect::<Vec<_>>() {
            exact if !exact.is_empty() => exact,
            _ => lower.match_indices(placeholder).map(|(i, _)| i).collect(),
        };
        let start = match hits.as_slice() {
            [start] => *start,
            [] => {
                last_problem = format!("the instruction `{placeholder}` does not appear in the rendered prompt");
                continue;
            }
            many => {
                last_problem = format!(
                    "the instruction `{placeholder}` appears {} times in the rendered prompt; it must appear once",
                    many.len()
                );
                continue;
            }
        };
        let end = start + placeholder.len();
        let encoding = chat
            .tokenizer()
            .encode(rendered.as_str(), false)
            .map_err(|e| Error::Encode { what: "the placeholder prompt".to_string(), message: e.to_string() })?;
        let offsets = encoding.get_offsets();
        let first = offsets.iter().position(|&(s, _)| s >= end).unwrap_or(offsets.len());
        if let Some(&(s, e)) = offsets[..first].iter().find(|&&(s, e)| s < end && e > end) {
            return Err(placeholder_error(format!(
                "the token covering {:?} spans the end of the instruction: the template's text after the \
                 instruction merges with it, so there are no separate post-instruction tokens",
                &rendered[s..e]
            )));
        }
        let ids = encoding.get_ids()[first..].to_vec();
        if ids.is_empty() {
            return Err(placeholder_error(
                "nothing follows the instruction in a rendered prompt, so there are no post-instruction tokens"
                    .to_string(),
            ));
        }
        return Ok(PostInstruction { ids, text: rendered[end..].to_string() });
    }
    Err(placeholder_error(last_problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_prompt_and_the_tail() {
        let eoi = PostInstruction { ids: vec![2, 198], text: String::new() };
        eoi.check(&[5, 6, 2, 198], "ok").unwrap();
        let long = "a".repeat(60);
        let err = eoi.check(&[5, 2, 199], &long).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "prompt \"{}…\": its last 2 tokens [2, 199] are not the post-instruction tokens [2, 198] of the chat \
                 template (a token merged across the end of the instruction, or the prompt does not end with the \
                 generation prompt)",
                "a".repeat(48)
            )
        );
        assert!(eoi.check(&[198], "short").is_err());
    }
}
