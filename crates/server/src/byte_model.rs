//! A byte-level [`TextModel`]: every byte is one token.
//!
//! It exists so that the HTTP layer can be tested end to end over the
//! simulated backend with no model files. It still behaves like a real
//! tokenizer where it matters to the server: characters can span several
//! tokens, so its decoder has to buffer incomplete UTF-8.

use std::collections::HashMap;

use crate::text_model::{
    ChatMessage, GrammarCompiler, StreamDecoder, TextModel, Tool, ToolCallFormat,
};

/// The byte-level test model.
#[derive(Debug)]
pub struct ByteTextModel {
    id: String,
    max_context: usize,
    eos: Vec<u32>,
    /// Grammars over the 256 byte tokens, when the model has an
    /// end-of-sequence id to finish them with.
    grammars: Option<GrammarCompiler>,
}

impl ByteTextModel {
    /// A model called `id` that holds `max_context` tokens and ends
    /// generation on any of `eos` (ids of 256 and above are never text).
    pub fn new(id: impl Into<String>, max_context: usize, eos: Vec<u32>) -> Self {
        // Its logits are the 256 bytes and the end-of-sequence ids (as the
        // simulated backend's are). Without an end-of-sequence id no grammar
        // could finish, so such a model refuses structured output instead.
        let width = eos
            .iter()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(256);
        let bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let grammars = GrammarCompiler::from_token_bytes(bytes, HashMap::new(), &eos, width).ok();
        Self {
            id: id.into(),
            max_context,
            eos,
            grammars,
        }
    }

    /// The 256 bytes, then room for special tokens such as an EOS id.
    const VOCAB: usize = 512;
}

impl TextModel for ByteTextModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn chat_prompt(&self, messages: &[ChatMessage], tools: &[Tool]) -> anyhow::Result<String> {
        // ChatML, the format of the default model's template; the tools'
        // names and the calls' JSON, short enough for a small test context.
        let mut out = String::new();
        if !tools.is_empty() {
            let names: Vec<&str> = tools.iter().map(|t| t.function.name.as_str()).collect();
            out.push_str(&format!(
                "<|im_start|>tools\n{}<|im_end|>\n",
                names.join(" ")
            ));
        }
        for m in messages {
            out.push_str(&format!("<|im_start|>{}\n", m.role));
            if let Some(content) = &m.content {
                out.push_str(content);
            }
            for call in &m.tool_calls {
                out.push_str(&serde_json::to_string(call)?);
            }
            out.push_str("<|im_end|>\n");
        }
        out.push_str("<|im_start|>assistant\n");
        Ok(out)
    }

    fn decoder(&self, _keep_special_tokens: bool) -> Box<dyn StreamDecoder> {
        // Special tokens (ids of 256 and above) have no text either way.
        Box::new(Utf8Decoder::default())
    }

    fn tool_call_format(&self) -> ToolCallFormat {
        ToolCallFormat::Hermes
    }

    fn grammars(&self) -> Option<&GrammarCompiler> {
        self.grammars.as_ref()
    }

    fn token_text(&self, token: u32) -> String {
        u8::try_from(token).map_or_else(
            |_| String::new(),
            |b| String::from_utf8_lossy(&[b]).into_owned(),
        )
    }
}

/// Collects bytes and releases the longest valid UTF-8 prefix.
#[derive(Debug, Default)]
struct Utf8Decoder {
    pending: Vec<u8>,
}

impl StreamDecoder for Utf8Decoder {
    fn push(&mut self, token: u32) -> anyhow::Result<String> {
        let Ok(byte) = u8::try_from(token) else {
            // Not a byte: a special token, which has no text.
            return Ok(String::new());
        };
        self.pending.push(byte);
        match std::str::from_utf8(&self.pending) {
            Ok(text) => {
                let text = text.to_owned();
                self.pending.clear();
                Ok(text)
            }
            // An incomplete character at the end: wait for its other bytes.
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                Ok(text)
            }
            // Bytes that can never become valid: show them as U+FFFD, as
            // real byte-level tokenizers do.
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                Ok(text)
            }
        }
    }

    fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn multi_byte_characters_come_out_whole() {
        let model = ByteTextModel::new("m", 64, vec![256]);
        let tokens = model.encode("é!").unwrap();
        assert_eq!(tokens.len(), 3);
        let mut d = model.decoder(false);
        assert_eq!(d.push(tokens[0]).unwrap(), "");
        assert_eq!(d.push(tokens[1]).unwrap(), "é");
        assert_eq!(d.push(tokens[2]).unwrap(), "!");
        assert_eq!(d.push(256).unwrap(), "", "special tokens have no text");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let model = ByteTextModel::new("m", 64, vec![]);
        let mut d = model.decoder(false);
        assert_eq!(d.push(0xC3).unwrap(), "");
        assert_eq!(d.push(u32::from(b'a')).unwrap(), "\u{FFFD}a");
        assert_eq!(d.push(0xE2).unwrap(), "");
        assert_eq!(d.flush(), "\u{FFFD}");
    }

    #[test]
    fn chat_prompts_use_chatml() {
        let model = ByteTextModel::new("m", 64, vec![]);
        let prompt = model
            .chat_prompt(&[ChatMessage::new("user", "Hi")], &[])
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
