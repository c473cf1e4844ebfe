//! `POST /v1/chat/completions`.

use axum::{
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Extension, Json,
};
use std::sync::Arc;

use futures::{stream, StreamExt};

use crate::{
    app::AppState,
    generation::Generation,
    openai::{
        errors::ApiError,
        extract::OpenAiJson,
        types::{
            AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
            ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessageIn, MessageContent,
        },
    },
    prepare::{check_model, prepare, top_logprobs, Edge, EndpointOptions},
    request_id::RequestName,
    routes::{
        self,
        streaming::{first_step, items, StreamItem},
        unix_now,
    },
    sse,
    text_model::{ChatMessage, TextModel},
};

/// Roles a chat template can be expected to know.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Answers a chat completion, streamed or not.
pub async fn handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    Extension(name): Extension<RequestName>,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&state, &body.model)?;
    let messages = flatten_messages(&body.messages)?;
    let prompt = state
        .model
        .chat_prompt(&messages)
        .map_err(|e| ApiError::invalid_param("messages", format!("chat template: {e:#}")))?;
    let tokens = state
        .model
        .encode(&prompt)
        .map_err(|e| ApiError::invalid_param("messages", format!("tokenizer: {e:#}")))?;
    let logprobs = match (body.logprobs, body.top_logprobs) {
        (Some(true), top) => Some(top_logprobs("top_logprobs", top.unwrap_or(0))?),
        (_, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ))
        }
        _ => None,
    };
    let prepared = prepare(
        &state,
        tokens,
        "messages",
        &body.params,
        &Edge {
            headers: &headers,
            name: &name,
        },
        EndpointOptions {
            logprobs,
            ..EndpointOptions::default()
        },
    )?;
    let id = format!("chatcmpl-{}", name.0);
    let created = unix_now();
    let model = body.model;
    let events = state.engine.submit(prepared.request)?;
    let mut generation = Generation::new(events, prepared.generation);

    if !prepared.stream {
        let answer = generation.collect().await?;
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: answer.text,
                },
                logprobs: logprobs
                    .map(|_| routes::logprobs::chat(state.model.as_ref(), &answer.logprobs)),
                finish_reason: answer.reason,
            }],
            usage: answer.usage,
        })
        .into_response());
    }

    let first = first_step(&mut generation).await?;
    let chunker = Chunker {
        id,
        created,
        model,
        include_usage: prepared.include_usage,
        logprobs: logprobs.map(|_| Arc::clone(&state.model)),
    };
    let opening = chunker.chunk(
        ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
        None,
    );
    let rest = items(first, generation).flat_map(move |item| stream::iter(chunker.payloads(item)));
    Ok(sse::response(
        stream::once(async move { opening }).chain(rest),
        state.config.stream_stall_timeout,
    ))
}

/// Turns messages into plain text ones, refusing what a text model cannot
/// read.
fn flatten_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!(
                        "unknown role {:?}: expected one of {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content"),
                                    format!(
                                        "content parts of type {:?} are not supported; only text parts are",
                                        part.kind
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // Templates written before the `developer` role know it as `system`.
            let role = if m.role == "developer" {
                "system".to_owned()
            } else {
                m.role.clone()
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// Builds the JSON payloads of one streamed chat response.
struct Chunker {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The text model, when log probabilities were asked for.
    logprobs: Option<Arc<dyn TextModel>>,
}

impl Chunker {
    fn chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> String {
        self.to_json(ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    fn payloads(&self, item: StreamItem) -> Vec<String> {
        match item {
            StreamItem::Text(text, tokens) => vec![self.chunk(
                ChatDelta {
                    role: None,
                    content: Some(text),
                },
                self.logprobs
                    .as_ref()
                    .map(|model| routes::logprobs::chat(model.as_ref(), &tokens)),
                None,
            )],
            StreamItem::Finish { reason, usage } => {
                let mut out = vec![self.chunk(ChatDelta::default(), None, Some(reason))];
                if self.include_usage {
                    out.push(self.to_json(ChatChunk {
                        id: self.id.clone(),
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: self.model.clone(),
                        choices: Vec::new(),
                        usage: Some(Some(usage)),
                    }));
                }
                out
            }
            StreamItem::Error(e) => vec![e.body_json()],
        }
    }

    fn to_json(&self, chunk: ChatChunk) -> String {
        serde_json::to_string(&chunk)
            .unwrap_or_else(|e| ApiError::internal(format!("serializing a chunk: {e}")).body_json())
    }
}
