//! The seam between the HTTP layer and a model's text side.
//!
//! The routes need only a handful of things from a model: turn text into
//! tokens, format a chat (with tools), turn tokens back into text as they
//! stream, compile grammars over its vocabulary, and know the
//! end-of-sequence ids and the context length. Keeping that behind
//! a small trait lets the HTTP tests run over a byte-level model with the
//! simulated backend, and the binary plug in the real tokenizer.

pub use prompt::{ChatMessage, GrammarCompiler, Tool, ToolCallFormat};

/// Turns generated tokens into text incrementally.
///
/// A token can end in the middle of a multi-byte character, so a decoder
/// may hold bytes back until the character is complete.
pub trait StreamDecoder: Send {
    /// Adds one token and returns the text that became final.
    fn push(&mut self, token: u32) -> anyhow::Result<String>;
    /// Returns whatever is still held back once generation ends.
    fn flush(&mut self) -> String;
}

/// What the server needs to know about the model it serves.
pub trait TextModel: Send + Sync + 'static {
    /// The id clients name in the `model` field.
    fn id(&self) -> &str;
    /// The longest sequence, prompt plus generated tokens.
    fn max_context(&self) -> usize;
    /// The number of token ids; prompts given as ids must stay below it.
    fn vocab_size(&self) -> usize;
    /// Tokens that end generation; they are never shown as text.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Tokenizes a prompt as-is (no special tokens are added).
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>>;
    /// Formats a conversation, with the tools the model may call, with the
    /// model's chat template, ending with the prompt for the assistant's
    /// turn.
    fn chat_prompt(&self, messages: &[ChatMessage], tools: &[Tool]) -> anyhow::Result<String>;
    /// A fresh incremental decoder for one response. With
    /// `keep_special_tokens`, special tokens show as their text (tool-call
    /// markers that are special tokens must reach the tool-call parser).
    fn decoder(&self, keep_special_tokens: bool) -> Box<dyn StreamDecoder>;
    /// How this model writes tool calls.
    fn tool_call_format(&self) -> ToolCallFormat;
    /// The grammar compiler for constrained decoding (`response_format`,
    /// required tool calls), or `None` when this model cannot have one.
    fn grammars(&self) -> Option<&GrammarCompiler>;
    /// One token's own text, as log probabilities show it (a token that is
    /// only part of a character shows as the replacement character).
    fn token_text(&self, token: u32) -> String;
}
