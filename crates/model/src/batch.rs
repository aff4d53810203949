//! A batch of prompts of different lengths, packed: the real tokens of every prompt one after another,
//! with no padding. Dense work runs on real tokens only; attention and positions are per prompt.
//!
//! Hugging Face's left-padded `input_ids` + `attention_mask` convert with [`Batch::from_padded`]. Position
//! ids count real tokens (0 at each prompt's first real token), as transformers' `generate` computes them
//! from the attention mask. (A plain left-padded `model(**batch)` in transformers 4.57 instead numbers
//! positions from the first pad; for rotary models only position differences matter, so both agree up to
//! rounding, method.md §3.)

use crate::{ModelError, Result};

/// One prompt's tokens inside a packed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The prompt's index in its batch (for generation steps, the index of the prompt being continued).
    pub row: usize,
    /// First token row in the packed buffer.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Position id of the first token (0 for a prompt; the cache length for a generation step).
    pub pos0: usize,
}

impl Segment {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// Prompts of token ids, packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    tokens: Vec<u32>,
    segments: Vec<Segment>,
}

impl Batch {
    /// Packs prompts (each at least one token).
    pub fn new<S: AsRef<[u32]>>(prompts: &[S]) -> Result<Batch> {
        if prompts.is_empty() {
            return Err(ModelError::Batch("the batch has no prompts".into()));
        }
        let mut tokens = Vec::with_capacity(prompts.iter().map(|p| p.as_ref().len()).sum());
        let mut segments = Vec::with_capacity(prompts.len());
        for (row, p) in prompts.iter().enumerate() {
            let p = p.as_ref();
            if p.is_empty() {
                return Err(ModelError::Batch(format!("prompt {row} has no tokens")));
            }
            segments.push(Segment { row, start: tokens.len(), len: p.len(), pos0: 0 });
            tokens.extend_from_slice(p);
        }
        Ok(Batch { tokens, segments })
    }

    /// Converts a left-padded batch (`ids` and `mask` both `[rows, cols]` row-major, mask 1 for real
    /// tokens) by dropping the padding. Right padding or holes in the mask are errors.
    pub fn from_padded(ids: &[u32], mask: &[u8], rows: usize, cols: usize) -> Result<Batch> {
        let n = rows.checked_mul(cols).ok_or_else(|| ModelError::Batch("rows x cols overflows".into()))?;
        if ids.len() != n || mask.len() != n {
            return Err(ModelError::Batch(format!(
                "a padded batch of {rows} x {cols} needs {n} ids and mask values, got {} and {}",
                ids.len(),
                mask.len()
            )));
        }
        let mut prompts = Vec::with_capacity(rows);
        for r in 0..rows {
            let m = &mask[r * cols..(r + 1) * cols];
            if let Some(bad) = m.iter().find(|&&v| v > 1) {
                return Err(ModelError::Batch(format!("attention mask value {bad} in row {r}; expected 0 or 1")));
            }
            let first = m.iter().position(|&v| v == 1).unwrap_or(cols);
            if m[first..].contains(&0) {
                return Err(ModelError::Batch(format!(
                    "row {r} of the attention mask is not left padding (a 0 follows a 1)"
                )));
            }
            prompts.push(&ids[r * cols + first..(r + 1) * cols]);
        }
        Batch::new(&prompts)
    }

    /// A generation step: one new token per continued prompt, at the given position.
    pub(crate) fn step(rows: &[(usize, u32, usize)]) -> Batch {
        let tokens = rows.iter().map(|r| r.1).collect();
        let segments =
            rows.iter().enumerate().map(|(i, &(row, _, pos))| Segment { row, start: i, len: 1, pos0: pos }).collect();
        Batch { tokens, segments }
    }

    /// Tokens continuing prompts that are in a cache: `(prompt, tokens)`, the first at position `pos0(prompt)`.
    pub(crate) fn continuing(rows: &[(usize, &[u32])], pos0: impl Fn(usize) -> usize) -> Batch {
        let mut tokens = Vec::with_capacity(rows.iter().map(|r| r.1.len()).sum());
        let mut segments = Vec::with_capacity(rows.len());
        for &(row, t) in rows {
            segments.push(Segment { row, start: tokens.len(), len: t.len(), pos0: pos0(row) });
            tokens.extend_from_slice(t);
        }
        Batch { tokens, segments }
    }

    /// The same prompts continuing at position `pos0` (after a shared prefix, `prefix.rs`).
    pub(crate) fn shifted(&self, pos0: usize) -> Batch {
        let segments = self.segments.iter().map(|s| Segment { pos0: s.pos0 + pos0, ..*s }).collect();
        Batch { tokens: self.tokens.clone(), segments }
    }

    /// All token ids, packed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The tokens of prompt `row`.
    pub fn prompt(&self, row: usize) -> &[u32] {
        &self.tokens[self.segments[row].range()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_prompts_and_strips_left_padding() {
        let b = Batch::new(&[vec![5, 6, 7], vec![8]]).unwrap();
        assert_eq!(b.tokens(), &[5, 6, 7, 8]);
        assert_eq!(b.segments()[1], Segment { row: 1, start: 3, len: 1, pos0: 0 });
        let p = Batch::from_padded(&[5, 6, 7, 0, 0, 8], &[1, 1, 1, 0, 0, 1], 2, 3).unwrap();
        assert_eq!(p, b);
    }

    #[test]
    fn rejects_empty_prompts_and_right_padding() {
        let e = |r: Result<Batch>| r.unwrap_err().to_string();
        assert_eq!(e(Batch::new::<Vec<u32>>(&[])), "the batch has no prompts");
        assert_eq!(e(Batch::new(&[vec![1], vec![]])), "prompt 1 has no tokens");
        assert_eq!(
            e(Batch::from_padded(&[1, 2], &[1, 0], 1, 2)),
            "row 0 of the attention mask is not left padding (a 0 follows a 1)"
        );
        assert_eq!(e(Batch::from_padded(&[1, 2], &[0, 0], 1, 2)), "prompt 0 has no tokens");
        assert_eq!(
            e(Batch::from_padded(&[1], &[1], 1, 2)),
            "a padded batch of 1 x 2 needs 2 ids and mask values, got 1 and 1"
        );
    }
}
