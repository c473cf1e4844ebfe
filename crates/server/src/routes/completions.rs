//! `POST /v1/completions`.

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
    generation::{Generation, TokenInfo},
    openai::{
        errors::ApiError,
        extract::OpenAiJson,
        types::{
            CompletionRequest, PromptParam, TextChoice, TextCompletion, TextLogprobs, UsageOut,
        },
    },
    prepare::{check_model, off_the_workers, prepare, top_logprobs, Edge, EndpointOptions},
    request_id::RequestName,
    routes::{
        self,
        streaming::{first_step, items, StreamItem},
        unix_now,
    },
    sse,
    structured::{self, OutputPlan, ToolPlan},
    text_model::TextModel,
};

/// Answers a text completion, streamed or not.
pub async fn handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    Extension(name): Extension<RequestName>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&state, &body.model)?;
    if body.echo == Some(true) {
        return Err(ApiError::invalid_param(
            "echo",
            "echo=true is not supported",
        ));
    }
    let logprobs = body
        .logprobs
        .map(|n| top_logprobs("logprobs", n))
        .transpose()?;
    let plan = OutputPlan::new(
        structured::response_format(body.params.response_format.as_ref())?,
        ToolPlan::none(),
    )?;
    let model = Arc::clone(&state.model);
    let prompt = body.prompt;
    let (tokens, constraint) = off_the_workers(move || {
        let tokens = prompt_tokens(model.as_ref(), prompt)?;
        Ok((tokens, structured::compile(model.as_ref(), &plan)?))
    })
    .await?;
    let prepared = prepare(
        &state,
        tokens,
        "prompt",
        &body.params,
        &Edge {
            headers: &headers,
            name: &name,
        },
        EndpointOptions {
            logprobs,
            constraint,
            keep_special_tokens: false,
        },
    )?;
    let mut shape = Shape {
        id: format!("cmpl-{}", name.0),
        created: unix_now(),
        model: body.model,
        include_usage: prepared.include_usage,
        logprobs: logprobs.map(|_| Arc::clone(&state.model)),
        sent_chars: 0,
    };
    let events = state.engine.submit(prepared.request)?;
    let mut generation = Generation::new(events, prepared.generation);

    if !prepared.stream {
        let answer = generation.collect().await?;
        let lp = shape.logprobs_of(&answer.logprobs);
        let mut whole =
            shape.completion(answer.text, Some(answer.reason), Some(Some(answer.usage)));
        whole.choices[0].logprobs = lp;
        return Ok(Json(whole).into_response());
    }
    let first = first_step(&mut generation).await?;
    let payloads =
        items(first, generation).flat_map(move |item| stream::iter(shape.payloads(item)));
    Ok(sse::response(payloads, state.config.stream_stall_timeout))
}

/// The prompt as token ids; exactly one prompt per request.
fn prompt_tokens(model: &dyn TextModel, prompt: PromptParam) -> Result<Vec<u32>, ApiError> {
    let encode = |text: &str| {
        model
            .encode(text)
            .map_err(|e| ApiError::invalid_param("prompt", format!("tokenizer: {e:#}")))
    };
    let one_prompt = || {
        ApiError::invalid_param(
            "prompt",
            "exactly one prompt per request is supported; send several requests instead",
        )
    };
    match prompt {
        PromptParam::Text(text) => encode(&text),
        PromptParam::Tokens(tokens) => Ok(tokens),
        PromptParam::Texts(texts) => match texts.as_slice() {
            [text] => encode(text),
            _ => Err(one_prompt()),
        },
        PromptParam::TokenLists(mut lists) => match lists.len() {
            1 => Ok(lists.swap_remove(0)),
            _ => Err(one_prompt()),
        },
    }
}

/// What every payload of one response shares.
struct Shape {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The text model, when log probabilities were asked for.
    logprobs: Option<Arc<dyn TextModel>>,
    /// Characters of token text reported so far (for `text_offset`).
    sent_chars: usize,
}

impl Shape {
    fn completion(
        &self,
        text: String,
        finish_reason: Option<&'static str>,
        usage: Option<Option<UsageOut>>,
    ) -> TextCompletion {
        TextCompletion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![TextChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason,
            }],
            usage,
        }
    }

    /// The log probabilities of `tokens` (when asked for), offsets counted
    /// on from the tokens reported before.
    fn logprobs_of(&mut self, tokens: &[TokenInfo]) -> Option<TextLogprobs> {
        let model = self.logprobs.as_ref()?;
        let lp = routes::logprobs::text(model.as_ref(), tokens, self.sent_chars);
        self.sent_chars += lp.tokens.iter().map(|t| t.chars().count()).sum::<usize>();
        Some(lp)
    }

    fn payloads(&mut self, item: StreamItem) -> Vec<String> {
        let stream_usage = self.include_usage.then_some(None);
        match item {
            StreamItem::Text(text, tokens) => {
                let lp = self.logprobs_of(&tokens);
                let mut chunk = self.completion(text, None, stream_usage);
                chunk.choices[0].logprobs = lp;
                vec![to_json(&chunk)]
            }
            StreamItem::Finish { reason, usage } => {
                let mut out = vec![to_json(&self.completion(
                    String::new(),
                    Some(reason),
                    stream_usage,
                ))];
                if self.include_usage {
                    let mut last = self.completion(String::new(), None, Some(Some(usage)));
                    last.choices.clear();
                    out.push(to_json(&last));
                }
                out
            }
            StreamItem::Error(e) => vec![e.body_json()],
        }
    }
}

fn to_json(completion: &TextCompletion) -> String {
    serde_json::to_string(completion)
        .unwrap_or_else(|e| ApiError::internal(format!("serializing a chunk: {e}")).body_json())
}
