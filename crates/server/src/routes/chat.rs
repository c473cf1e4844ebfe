//! `POST /v1/chat/completions`.

use axum::{
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Extension, Json,
};
use std::sync::Arc;

use batching_types::SharedConstraint;
use futures::{stream, StreamExt};
use prompt::{ChatMessage, ToolCall};
use serde_json::Value;

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
    prepare::{check_model, off_the_workers, prepare, top_logprobs, Edge, EndpointOptions},
    request_id::RequestName,
    routes::{
        self,
        streaming::{first_step, items, StreamItem},
        tool_calls::{ToolOutput, ToolStream},
        unix_now,
    },
    sse,
    structured::{self, OutputPlan},
    text_model::TextModel,
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
    let messages = chat_messages(&body.messages)?;
    let plan = OutputPlan::new(
        structured::response_format(body.params.response_format.as_ref())?,
        structured::tools(
            body.tools.as_ref(),
            body.tool_choice.as_ref(),
            body.parallel_tool_calls,
        )?,
    )?;
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
    let tool_output = plan.tools.active().then(|| ToolOutput {
        format: state.model.tool_call_format(),
        parallel: plan.tools.parallel,
    });
    let (tokens, constraint) = render(&state, messages, plan).await?;
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
            constraint,
            // Tool-call markers may be special tokens.
            keep_special_tokens: tool_output.is_some(),
        },
    )?;
    let id = format!("chatcmpl-{}", name.0);
    let created = unix_now();
    let model = body.model;
    let events = state.engine.submit(prepared.request)?;
    let mut generation = Generation::new(events, prepared.generation);

    if !prepared.stream {
        let answer = generation.collect().await?;
        let (content, tool_calls, finish_reason) = match tool_output {
            Some(output) => {
                let split = output.split(answer.text, answer.reason);
                (split.content, split.tool_calls, split.finish_reason)
            }
            None => (Some(answer.text), Vec::new(), answer.reason),
        };
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    tool_calls,
                },
                logprobs: logprobs
                    .map(|_| routes::logprobs::chat(state.model.as_ref(), &answer.logprobs)),
                finish_reason,
            }],
            usage: answer.usage,
        })
        .into_response());
    }

    let first = first_step(&mut generation).await?;
    let mut chunker = Chunker {
        id,
        created,
        model,
        include_usage: prepared.include_usage,
        logprobs: logprobs.map(|_| Arc::clone(&state.model)),
        tools: tool_output.map(ToolOutput::stream),
    };
    let opening = chunker.chunk(
        ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
            ..ChatDelta::default()
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

/// Renders the chat template, tokenizes it and compiles the output's
/// grammar, off the async workers.
async fn render(
    state: &AppState,
    messages: Vec<ChatMessage>,
    plan: OutputPlan,
) -> Result<(Vec<u32>, Option<SharedConstraint>), ApiError> {
    let model = Arc::clone(&state.model);
    off_the_workers(move || {
        let prompt = model
            .chat_prompt(&messages, plan.tools.shown())
            .map_err(|e| ApiError::invalid_param("messages", format!("chat template: {e:#}")))?;
        let tokens = model
            .encode(&prompt)
            .map_err(|e| ApiError::invalid_param("messages", format!("tokenizer: {e:#}")))?;
        let constraint = structured::compile(model.as_ref(), &plan)?;
        Ok((tokens, constraint))
    })
    .await
}

/// Checks the conversation and turns it into the template's messages:
/// text content only, tool calls only on assistant messages, and every
/// tool result answering a call made before it.
fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut call_ids: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let param = |field: &str| format!("messages[{i}]{field}");
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid_param(
                &param(".role"),
                format!(
                    "unknown role {:?}: expected one of {}",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
        let content = match &m.content {
            None => None,
            Some(MessageContent::Text(text)) => Some(text.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid_param(
                                &param(".content"),
                                format!(
                                "content parts of type {:?} are not supported; only text parts are",
                                part.kind
                            ),
                            ))
                        }
                    }
                }
                Some(text)
            }
        };
        let tool_calls = match &m.tool_calls {
            None | Some(Value::Null) => Vec::new(),
            Some(_) if m.role != "assistant" => {
                return Err(ApiError::invalid_param(
                    &param(".tool_calls"),
                    "only assistant messages carry tool_calls",
                ))
            }
            Some(calls) => tool_calls(i, calls)?,
        };
        call_ids.extend(tool_calls.iter().map(|c| c.id.clone()));
        let tool_call_id = match (&m.tool_call_id, m.role.as_str()) {
            (None, "tool") => {
                return Err(ApiError::invalid_param(
                    &param(".tool_call_id"),
                    "a tool message needs the tool_call_id of the call it answers",
                ))
            }
            (Some(id), "tool") if !call_ids.contains(id) => {
                return Err(ApiError::invalid_param(
                    &param(".tool_call_id"),
                    format!("no earlier assistant message made a tool call with id {id:?}"),
                ))
            }
            (Some(_), role) if role != "tool" => {
                return Err(ApiError::invalid_param(
                    &param(".tool_call_id"),
                    "only tool messages carry a tool_call_id",
                ))
            }
            (id, _) => id.clone(),
        };
        // Templates render a missing content as nothing only when the
        // message calls tools; elsewhere an empty text is the safe reading.
        let content = if content.is_none() && tool_calls.is_empty() {
            Some(String::new())
        } else {
            content
        };
        // Templates written before the `developer` role know it as `system`.
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role.clone()
        };
        out.push(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id,
            name: m.name.clone(),
        });
    }
    Ok(out)
}

/// An assistant message's `tool_calls`, checked.
fn tool_calls(i: usize, calls: &Value) -> Result<Vec<ToolCall>, ApiError> {
    let Some(calls) = calls.as_array() else {
        return Err(ApiError::invalid_param(
            &format!("messages[{i}].tool_calls"),
            "tool_calls must be an array",
        ));
    };
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let param = |field: &str| format!("messages[{i}].tool_calls[{j}]{field}");
            let text = |field: &str, value: Option<&Value>| {
                value
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ApiError::invalid_param(&param(field), format!("{field} must be a string"))
                    })
            };
            if let Some(kind) = call.get("type") {
                if kind != "function" {
                    return Err(ApiError::invalid_param(
                        &param(".type"),
                        "only function tool calls are supported",
                    ));
                }
            }
            let id = text(".id", call.get("id"))?;
            let function = call.get("function");
            let name = text(".function.name", function.and_then(|f| f.get("name")))?;
            let arguments = text(
                ".function.arguments",
                function.and_then(|f| f.get("arguments")),
            )?;
            // Templates need the arguments as an object.
            if !matches!(
                serde_json::from_str::<Value>(&arguments),
                Ok(Value::Object(_))
            ) {
                return Err(ApiError::invalid_param(
                    &param(".function.arguments"),
                    "arguments must be a JSON object written as a string",
                ));
            }
            Ok(ToolCall::function(id, name, arguments))
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
    /// The tool-call reader, when the output is read for calls.
    tools: Option<ToolStream>,
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

    fn payloads(&mut self, item: StreamItem) -> Vec<String> {
        match item {
            StreamItem::Text(text, tokens) => {
                let logprobs = self
                    .logprobs
                    .as_ref()
                    .map(|model| routes::logprobs::chat(model.as_ref(), &tokens));
                let deltas = match &mut self.tools {
                    Some(tools) => tools.push(&text),
                    None => vec![ChatDelta {
                        content: Some(text),
                        ..ChatDelta::default()
                    }],
                };
                self.delta_chunks(deltas, logprobs)
            }
            StreamItem::Finish { reason, usage } => {
                let (mut out, reason) = match &mut self.tools {
                    Some(tools) => {
                        let (deltas, reason) = tools.finish(reason);
                        (self.delta_chunks(deltas, None), reason)
                    }
                    None => (Vec::new(), reason),
                };
                out.push(self.chunk(ChatDelta::default(), None, Some(reason)));
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

    /// One chunk per delta, the log probabilities on the first; a chunk
    /// with an empty delta carries them when the text was held back (a
    /// possible tool call), so none are lost.
    fn delta_chunks(&self, deltas: Vec<ChatDelta>, logprobs: Option<ChatLogprobs>) -> Vec<String> {
        let mut logprobs = logprobs.filter(|l| !l.content.is_empty());
        if deltas.is_empty() {
            return logprobs
                .map(|l| self.chunk(ChatDelta::default(), Some(l), None))
                .into_iter()
                .collect();
        }
        deltas
            .into_iter()
            .map(|delta| {
                let lp = logprobs
                    .take()
                    .or_else(|| self.logprobs.as_ref().map(|_| ChatLogprobs::default()));
                self.chunk(delta, lp, None)
            })
            .collect()
    }

    fn to_json(&self, chunk: ChatChunk) -> String {
        serde_json::to_string(&chunk)
            .unwrap_or_else(|e| ApiError::internal(format!("serializing a chunk: {e}")).body_json())
    }
}
