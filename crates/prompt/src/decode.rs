//! Streaming detokenization.

use crate::{PromptError, Tokenizer};

/// Turns a stream of token ids into text pieces without ever splitting a
/// UTF-8 character or a multi-token grapheme.
///
/// Byte-level BPE tokens can end in the middle of a character, and some
/// tokenizers (SentencePiece) only render spaces correctly with context, so
/// the stream re-decodes a short window of recent ids and emits only the
/// text that has become stable (the same approach as Hugging Face's
/// text-generation-inference).
pub struct DecodeStream {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl std::fmt::Debug for DecodeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStream")
            .field("skip_special", &self.skip_special)
            .field("ids", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl DecodeStream {
    pub(crate) fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer.decode_with(ids, self.skip_special)
    }

    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, PromptError> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // `full` extends `prefix` except in rare normaliser cases; fall
            // back to the char boundary so slicing never panics.
            let start = if full.is_char_boundary(prefix.len()) && full.starts_with(&prefix) {
                prefix.len()
            } else {
                common_prefix_len(&prefix, &full)
            };
            let piece = full[start..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of a stream (for example an
    /// incomplete character), decoded as well as the tokenizer can.
    pub fn flush(&mut self) -> Result<Option<String>, PromptError> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() {
            let start = common_prefix_len(&prefix, &full);
            Ok(Some(full[start..].to_owned()))
        } else {
            Ok(None)
        }
    }
}

/// The byte length of the longest common prefix of `a` and `b` that ends
/// on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("aé", "aè"), 1);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
    }
}
