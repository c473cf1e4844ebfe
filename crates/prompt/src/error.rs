//! The one error enum of this crate.

use std::path::PathBuf;

/// The error of an external library that reports errors as boxed trait
/// objects (`tokenizers`) or as `anyhow` errors (`llguidance`).
pub type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong between chat messages and tokens.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A model file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON configuration file is malformed.
    #[error("{}: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What serde found wrong, naming the field.
        source: serde_json::Error,
    },
    /// `tokenizer.json` could not be loaded.
    #[error("loading the tokenizer {what}: {source}")]
    LoadTokenizer {
        /// The file, or a description of the bytes it came from.
        what: String,
        /// The tokenizers crate's error.
        source: BoxedError,
    },
    /// Encoding text into ids failed.
    #[error("tokenizer: encoding failed: {0}")]
    Encode(#[source] BoxedError),
    /// Decoding ids into text failed.
    #[error("tokenizer: decoding failed: {0}")]
    Decode(#[source] BoxedError),
    /// A chat was to be rendered but the model ships no chat template.
    #[error("the model in {} has no chat template", dir.display())]
    NoChatTemplate {
        /// The model folder.
        dir: PathBuf,
    },
    /// The chat template does not parse.
    #[error("invalid chat template: {0}")]
    TemplateSyntax(#[source] minijinja::Error),
    /// Rendering the chat template failed (it may have raised an exception
    /// on purpose, for example for roles it does not accept).
    #[error("chat template failed: {0}")]
    TemplateRender(#[source] minijinja::Error),
    /// An assistant message's tool call carries `arguments` that are not
    /// JSON; chat templates need them as an object.
    #[error("tool call {name:?}: arguments are not valid JSON: {source}")]
    ToolArguments {
        /// The function's name.
        name: String,
        /// Why the arguments did not parse.
        source: serde_json::Error,
    },
    /// The vocabulary cannot be turned into the byte strings that
    /// constrained decoding matches against (or the ids given with it are
    /// out of range).
    #[error("vocabulary for constrained decoding: {0}")]
    Vocabulary(String),
    /// llguidance could not set up its tokenizer tables.
    #[error("constrained decoding setup: {0}")]
    GrammarSetup(#[source] BoxedError),
    /// A grammar (a JSON schema, or a tool's parameters) cannot be compiled;
    /// the message names the problem, so it can be shown to the client.
    #[error("invalid {what}: {source}")]
    InvalidGrammar {
        /// What was compiled: `JSON schema`, `parameters of tool "x"`, ...
        what: String,
        /// llguidance's explanation.
        source: BoxedError,
    },
    /// A tool call was requested but no tools were given, or the named tool
    /// is not among them.
    #[error("tool choice: {0}")]
    ToolChoice(String),
}
