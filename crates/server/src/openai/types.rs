//! The request and response bodies of OpenAI's API, as far as this server
//! implements them.
//!
//! Request fields are deliberately loose (`Option`, signed integers) so that
//! a value of the right type but outside its range reaches validation, which
//! names the parameter, instead of failing inside serde with a vaguer
//! message. Unknown fields are ignored, as OpenAI's own server does.

use serde::{Deserialize, Serialize};

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Tokens to generate at most (the legacy name).
    pub max_tokens: Option<i64>,
    /// Tokens to generate at most (the newer name; wins over `max_tokens`).
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<i64>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// One stop string or several.
    pub stop: Option<StopParam>,
    /// Number of choices; only 1 is supported.
    pub n: Option<i64>,
    /// An end-user id, for logs.
    pub user: Option<String>,
    /// `high`, `normal` or `low` (an extension of this server).
    pub priority: Option<String>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
}

/// `stop`: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopParam {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Generation parameters.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or an array of content parts; null for tool-call messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only text parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The model id.
    pub model: String,
    /// The prompt.
    pub prompt: PromptParam,
    /// Echo the prompt before the completion; only `false` is supported.
    pub echo: Option<bool>,
    /// Generation parameters.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// `prompt`: text or token ids, one prompt or a batch of one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptParam {
    /// One text prompt.
    Text(String),
    /// Text prompts; exactly one is supported.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Prompts as token ids; exactly one is supported.
    TokenLists(Vec<Vec<u32>>),
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageOut {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// How the prompt was served.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from earlier requests
    /// (the prefix cache) instead of computed.
    pub cached_tokens: usize,
}

impl UsageOut {
    /// Usage from the counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A non-streaming chat answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// Exactly one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageOut,
}

/// A chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// The same id in every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Null, except in the usage chunk; only present when usage was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// A streamed chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A non-streaming text completion, also the shape of its stream chunks.
#[derive(Debug, Clone, Serialize)]
pub struct TextCompletion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice, or none in a streamed usage chunk.
    pub choices: Vec<TextChoice>,
    /// Token counts; in a stream, only present when usage was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// A text completion choice.
#[derive(Debug, Clone, Serialize)]
pub struct TextChoice {
    /// The generated text (new text only, in a stream).
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`; null until the last chunk of a stream.
    pub finish_reason: Option<&'static str>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The served models.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The id clients use.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Always `mlx-batch`.
    pub owned_by: &'static str,
}
