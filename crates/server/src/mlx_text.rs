//! The real [`TextModel`]: the model folder's config (through
//! `backend-mlx`), tokenizer and chat template (through `prompt`).

use std::path::Path;

use anyhow::Context;
use backend_mlx::ModelInfo;
use prompt::{DecodeStream, Tokenizer};

use crate::text_model::{
    ChatMessage, GrammarCompiler, StreamDecoder, TextModel, Tool, ToolCallFormat,
};

/// A model folder's text side.
#[derive(Debug)]
pub struct MlxTextModel {
    info: ModelInfo,
    tokenizer: Tokenizer,
    /// Built once at load (about 0.1 s for a 49k vocabulary): a request
    /// only compiles its own grammar against it.
    grammars: GrammarCompiler,
    /// The tokenizer's end tokens, then the config's, without repeats:
    /// merged once here, since every request asks for them.
    eos_token_ids: Vec<u32>,
}

impl MlxTextModel {
    /// Reads `config.json` and the tokenizer files of `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let info = ModelInfo::read(dir)
            .with_context(|| format!("reading the model config in {}", dir.display()))?;
        let tokenizer = Tokenizer::from_model_dir(dir)
            .with_context(|| format!("loading the tokenizer in {}", dir.display()))?;
        let mut eos_token_ids = tokenizer.eos_token_ids().to_vec();
        for id in &info.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        // The logits are as wide as the embedding, which may pad the
        // tokenizer's vocabulary; masks must cover all of it.
        let grammars = GrammarCompiler::from_tokenizer(&tokenizer, &eos_token_ids, info.vocab_size)
            .with_context(|| format!("preparing constrained decoding for {}", dir.display()))?;
        Ok(Self {
            info,
            tokenizer,
            grammars,
            eos_token_ids,
        })
    }

    /// The model's config summary.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

impl TextModel for MlxTextModel {
    fn id(&self) -> &str {
        &self.info.name
    }

    fn max_context(&self) -> usize {
        self.info.max_context
    }

    fn vocab_size(&self) -> usize {
        // The embedding's rows: an id past them would index outside it.
        self.info.vocab_size
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text)?)
    }

    fn chat_prompt(&self, messages: &[ChatMessage], tools: &[Tool]) -> anyhow::Result<String> {
        Ok(self.tokenizer.apply_chat_template(messages, tools, true)?)
    }

    fn decoder(&self, keep_special_tokens: bool) -> Box<dyn StreamDecoder> {
        Box::new(Decoder(if keep_special_tokens {
            self.tokenizer.decode_stream_keeping_special()
        } else {
            self.tokenizer.decode_stream()
        }))
    }

    fn tool_call_format(&self) -> ToolCallFormat {
        self.tokenizer.tool_call_format()
    }

    fn grammars(&self) -> Option<&GrammarCompiler> {
        Some(&self.grammars)
    }

    fn token_text(&self, token: u32) -> String {
        self.tokenizer.decode(&[token]).unwrap_or_default()
    }
}

struct Decoder(DecodeStream);

impl StreamDecoder for Decoder {
    fn push(&mut self, token: u32) -> anyhow::Result<String> {
        Ok(self.0.push(token)?.unwrap_or_default())
    }

    fn flush(&mut self) -> String {
        // A failure here can only concern the last partial character.
        self.0.flush().ok().flatten().unwrap_or_default()
    }
}
