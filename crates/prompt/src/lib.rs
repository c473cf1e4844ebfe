//! Chat messages to tokens, and generated tokens back to text and tool
//! calls, without MLX.
//!
//! The main design decision is that **everything a model's text side needs
//! is decided once per model and then shared read-only**: [`Tokenizer`]
//! loads `tokenizer.json` and compiles the chat template into a minijinja
//! environment at load (a request only renders it). It is `Send + Sync`, so
//! the server shares it across request handlers while the engine thread runs
//! the model.
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

mod decode;
mod error;
mod message;
mod pyjson;
mod template;
mod tokenizer;
mod tool_parse;

pub use decode::DecodeStream;
pub use error::{BoxedError, PromptError};
pub use message::{ChatMessage, FunctionCall, FunctionDefinition, Tool, ToolCall};
pub use tokenizer::Tokenizer;
pub use tool_parse::{
    parse_tool_calls, ParsedOutput, ParsedToolCall, StreamedToolCall, ToolCallFormat,
    ToolCallParser, ToolStreamEvent,
};
