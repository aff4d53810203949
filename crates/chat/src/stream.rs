//! Incremental decoding for streaming generated text: feed ids as they come, get the new text.
//!
//! Text is only handed out once it can no longer change: a token may end inside a multi-byte
//! UTF-8 character (decoded as U+FFFD until the next token completes it), and
//! transformers' `clean_up_tokenization_spaces` removes a space before `.`, `,`, `'s`, ... that a
//! later token may bring. So the pieces, joined, equal [`Chat::decode`] of all the ids.
//!
//! Each push decodes all ids so far (decoders such as Metaspace treat the first token
//! specially, so a window would need care): about 30 µs a token at 600 tokens on the real model,
//! small next to a forward pass.

use crate::error::Result;
use crate::{Chat, Special};

/// Streaming decoder made by [`Chat::stream`].
pub struct TextStream<'a> {
    chat: &'a Chat,
    special: Special,
    ids: Vec<u32>,
    /// What has been handed out so far.
    emitted: String,
}

impl<'a> TextStream<'a> {
    pub(crate) fn new(chat: &'a Chat, special: Special) -> TextStream<'a> {
        TextStream { chat, special, ids: Vec::new(), emitted: String::new() }
    }

    /// Adds one generated id; returns the text that became final (often empty while a
    /// character or a word is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let raw = self.chat.decode_raw(&self.ids, self.special)?;
        let end = stable_end(&raw, self.chat.cleans_up_spaces());
        let text = self.chat.clean(&raw[..end]);
        Ok(self.take_new(&text))
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Ends the stream: returns the text still held back.
    pub fn finish(mut self) -> Result<String> {
        let full = self.chat.decode(&self.ids, self.special)?;
        if full.starts_with(&self.emitted) {
            return Ok(self.take_new(&full));
        }
        // Unreachable with the tokenizers we know (decoding extends its prefix); if a decoder
        // ever rewrote earlier text, hand out what follows the common prefix.
        let common = full.char_indices().zip(self.emitted.chars()).take_while(|((_, a), b)| a == b).count();
        let at = full.char_indices().nth(common).map_or(full.len(), |(i, _)| i);
        Ok(full[at..].to_string())
    }

    fn take_new(&mut self, text: &str) -> String {
        match text.strip_prefix(self.emitted.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.emitted.push_str(&new);
                new
            }
            _ => String::new(),
        }
    }
}

/// Where the text that can no longer change ends: before trailing U+FFFD (an incomplete UTF-8
/// character) and, when spaces are cleaned up, before any space that a later token could turn
/// into one of the clean-up patterns (all start with a space and span at most 4 bytes, so a
/// space within the last 3 bytes is held back, and again before it).
fn stable_end(raw: &str, clean_up: bool) -> usize {
    let mut end = raw.len();
    while raw[..end].ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    if clean_up {
        loop {
            let mut window = end.saturating_sub(3);
            while !raw.is_char_boundary(window) {
                window += 1;
            }
            match raw[window..end].find(' ') {
                Some(p) => end = window + p,
                None => break,
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_incomplete_characters_and_clean_up_candidates() {
        assert_eq!(stable_end("ab\u{FFFD}\u{FFFD}", false), 2);
        assert_eq!(stable_end("hello wo", true), 5);
        assert_eq!(stable_end("hello world", true), 11);
        assert_eq!(stable_end("hello world", false), 11);
        assert_eq!(stable_end("a b c d", true), 1);
        assert_eq!(stable_end("é x", true), 2);
    }
}
