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
    grammars: Option<GrammarCompiler>,
}

impl MlxTextModel {
    /// Reads `config.json` and the tokenizer files of `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let info = ModelInfo::read(dir)
            .with_context(|| format!("reading the model config in {}", dir.display()))?;
        let tokenizer = Tokenizer::from_model_dir(dir)
            .with_context(|| format!("loading the tokenizer in {}", dir.display()))?;
        // The logits are as wide as the embedding, which may pad the
        // tokenizer's vocabulary; masks must cover all of it. A model that
        // cannot have grammars (no end-of-sequence token, a tokenizer that
        // is neither byte-level nor byte-fallback) still serves free text,
        // and refuses structured output by name.
        let grammars =
            GrammarCompiler::from_tokenizer(&tokenizer, tokenizer.eos_token_ids(), info.vocab_size)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no constrained decoding for this model: response_format and required tool calls will be refused");
                })
                .ok();
        Ok(Self {
            info,
            tokenizer,
            grammars,
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
        // The tokenizer's union of every file a model may put them in.
        self.tokenizer.eos_token_ids().to_vec()
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
        self.grammars.as_ref()
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
