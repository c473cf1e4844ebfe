//! The request and response bodies of OpenAI's API, as far as this server
//! implements them.
//!
//! Request fields are deliberately loose (`Option`, signed integers) so that
//! a value of the right type but outside its range reaches validation, which
//! names the parameter, instead of failing inside serde with a vaguer
//! message. A field this server does not know is refused with a 400 that
//! names it (see [`KnownFields`]), as OpenAI's own API does: silently
//! ignoring one would make a client believe it was honoured.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// The top-level fields a request body may carry; any other is refused.
pub trait KnownFields {
    /// The fields of this endpoint besides [`COMMON_FIELDS`].
    const FIELDS: &'static [&'static str];

    /// Whether `field` may appear in this endpoint's body.
    fn is_known(field: &str) -> bool {
        COMMON_FIELDS.contains(&field) || Self::FIELDS.contains(&field)
    }
}

/// The fields every completion endpoint takes ([`CommonParams`], the model
/// and `logprobs`, whose meaning differs by endpoint).
pub const COMMON_FIELDS: [&str; 20] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "user",
    "priority",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "logprobs",
];

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
    /// Keep only tokens at least this likely relative to the best, 0 to 1
    /// (an extension).
    pub min_p: Option<f64>,
    /// Penalise tokens already generated, -2 to 2.
    pub presence_penalty: Option<f64>,
    /// Penalise tokens by how often they were generated, -2 to 2.
    pub frequency_penalty: Option<f64>,
    /// Hugging Face's repetition penalty over prompt and output, above 0
    /// (an extension; 1 is off).
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) to a bias from -100 to 100.
    pub logit_bias: Option<HashMap<String, f64>>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<serde_json::Value>,
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
    /// Return the log probability of each output token.
    pub logprobs: Option<bool>,
    /// With `logprobs`, this many most likely alternatives, 0 to 20.
    pub top_logprobs: Option<i64>,
    /// Functions the model may call (validated in `structured`).
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<serde_json::Value>,
    /// Whether several calls may come in one answer.
    pub parallel_tool_calls: Option<bool>,
    /// Generation parameters.
    #[serde(flatten)]
    pub params: CommonParams,
}

impl KnownFields for ChatCompletionRequest {
    const FIELDS: &'static [&'static str] = &[
        "messages",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    ];
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or an array of content parts; null for tool-call messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// The calls an assistant message made (validated in the chat route).
    #[serde(default)]
    pub tool_calls: Option<serde_json::Value>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The author's or the function's name.
    #[serde(default)]
    pub name: Option<String>,
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
    /// Return the log probability of each output token and this many most
    /// likely alternatives, 0 to 20.
    pub logprobs: Option<i64>,
    /// Generation parameters.
    #[serde(flatten)]
    pub params: CommonParams,
}

impl KnownFields for CompletionRequest {
    const FIELDS: &'static [&'static str] = &["prompt", "echo"];
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
    /// The output tokens' log probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text; null when the answer is only tool calls.
    pub content: Option<String>,
    /// The tools the model called.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<prompt::ToolCall>,
}

/// A tool call in a stream: the whole call in one chunk, with its place
/// among the response's calls.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    /// The call's position, from 0.
    pub index: usize,
    /// Its id, name and arguments.
    #[serde(flatten)]
    pub call: prompt::ToolCall,
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
    /// The log probabilities of the tokens this chunk covers, when asked
    /// for.
    pub logprobs: Option<ChatLogprobs>,
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
    /// Complete tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
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
    /// The output tokens' log probabilities, when asked for.
    pub logprobs: Option<TextLogprobs>,
    /// `stop` or `length`; null until the last chunk of a stream.
    pub finish_reason: Option<&'static str>,
}

/// Chat log probabilities: one entry per output token.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// The tokens, in order.
    pub content: Vec<ChatTokenLogprob>,
}

/// One output token of a chat answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative at a position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its text's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// Text-completion log probabilities, in the legacy column layout.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TextLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log probabilities.
    pub token_logprobs: Vec<f32>,
    /// Per position, the most likely tokens' texts and log probabilities.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Each token's character offset in the completion text.
    pub text_offset: Vec<usize>,
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
