//! Chat messages to tokens, and generated tokens back to text and tool
//! calls, without MLX.
//!
//! The main design decision is that **everything a model's text side needs
//! is decided once per model and then shared read-only**: [`Tokenizer`]
//! loads `tokenizer.json` and compiles the chat template into a minijinja
//! environment at load (a request only renders it), and [`GrammarCompiler`]
//! builds llguidance's token trie and parser factory once (a request only
//! compiles its grammar). Both are `Send + Sync`, so the server shares them
//! across request handlers while the engine thread runs the model.
//!
//! The parts:
//! - [`Tokenizer`]: encode (never doubling a BOS the template already
//!   wrote), decode, [`DecodeStream`] for streaming, and
//!   [`Tokenizer::apply_chat_template`] with OpenAI's messages and tools
//!   passed the way Hugging Face templates expect them (tool-call arguments
//!   as objects, `tojson` as Python writes JSON). Templates that ignore
//!   tools get them through the Hermes convention instead.
//! - [`parse_tool_calls`] and the streaming [`ToolCallParser`]: tool calls
//!   in generated text, in the Hermes/Qwen, Llama 3 and Mistral formats
//!   ([`ToolCallFormat`], detected from the template).
//! - [`GrammarCompiler`] and [`Grammar`]: constrained decoding (any JSON
//!   object, a JSON schema, optionally strict, or a tool call in the
//!   model's format) as a [`batching_types::TokenConstraint`].
//!
//! llguidance's own bridge to Hugging Face tokenizers
//! (`toktrie_hf_tokenizers`) pins `tokenizers` 0.21. Instead of building a
//! second copy of that large crate, [`GrammarCompiler`] reads each token's
//! bytes from the workspace's `tokenizers` 0.22 itself (the same rules:
//! GPT-2 byte-level or SentencePiece byte-fallback, special tokens marked
//! so text can never produce them) and hands llguidance a plain token trie.
//! That trie cannot re-tokenize text canonically, which llguidance needs
//! only for forced tokens; the backend samples every token, so none are
//! asked for.

mod decode;
mod error;
mod grammar;
mod message;
mod pyjson;
mod template;
mod tokenizer;
mod tool_parse;

pub use decode::DecodeStream;
pub use error::{BoxedError, PromptError};
pub use grammar::{Grammar, GrammarCompiler, ToolChoice};
pub use message::{ChatMessage, FunctionCall, FunctionDefinition, Tool, ToolCall};
pub use tokenizer::Tokenizer;
pub use tool_parse::{
    parse_tool_calls, ParsedOutput, ParsedToolCall, StreamedToolCall, ToolCallFormat,
    ToolCallParser, ToolStreamEvent,
};
