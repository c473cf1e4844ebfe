//! Turning validated OpenAI parameters into an engine request.
//!
//! Every check that depends only on the request happens here, before the
//! engine sees it, so that each refusal names its parameter and nothing
//! invalid ever takes a place in the queue.

use std::{collections::HashMap, time::Instant};

use axum::http::HeaderMap;
use batching_types::{
    NewRequest, Priority, SamplingParams, SharedConstraint, SharedStopCondition, TypesError,
};

use crate::{
    app::AppState,
    generation::GenerationConfig,
    openai::{
        errors::ApiError,
        types::{CommonParams, StopParam},
    },
    request_id::RequestName,
    stop::StopStrings,
};

/// The most stop strings a request may carry, as in OpenAI's API.
pub const MAX_STOP_STRINGS: usize = 4;

/// The header that sets a request's priority when the body does not.
pub const PRIORITY_HEADER: &str = "x-priority";

/// A request ready to submit, with what reading its answer needs.
pub struct Prepared {
    /// What the engine runs.
    pub request: NewRequest,
    /// How to read the answer.
    pub generation: GenerationConfig,
    /// Whether to stream server-sent events.
    pub stream: bool,
    /// Whether a stream ends with a usage chunk.
    pub include_usage: bool,
}

/// What one endpoint asks of a request beyond the common parameters.
#[derive(Debug, Clone, Default)]
pub struct EndpointOptions {
    /// Report log probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// A grammar the output must follow.
    pub constraint: Option<SharedConstraint>,
    /// Decode special tokens as their text (tool-call markers).
    pub keep_special_tokens: bool,
}

/// What the HTTP edge knows of a request besides its body.
pub struct Edge<'a> {
    /// Its headers (`x-priority`).
    pub headers: &'a HeaderMap,
    /// Its name (`x-request-id`).
    pub name: &'a RequestName,
}

/// Runs `work` (a chat template, a tokenizer, a grammar compiler: a few
/// milliseconds of CPU) on the blocking pool, so that it never holds up the
/// async workers that move every other request's bytes.
pub async fn off_the_workers<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

/// Fails with 404 unless `model` is the one this server serves.
pub fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model.id() {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// Validates `params` for a prompt of `prompt_tokens` and builds the
/// request. `prompt_param` names the prompt field in errors.
pub fn prepare(
    state: &AppState,
    prompt_tokens: Vec<u32>,
    prompt_param: &str,
    params: &CommonParams,
    edge: &Edge<'_>,
    options: EndpointOptions,
) -> Result<Prepared, ApiError> {
    let headers = edge.headers;
    if let Some(n) = params.n {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("n={n} is not supported: this server returns exactly one choice (n=1)"),
            ));
        }
    }
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!("the {prompt_param} must not be empty"),
        ));
    }
    let vocab = state.model.vocab_size();
    if let Some(bad) = prompt_tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!("token id {bad} is out of range: the vocabulary has {vocab} tokens"),
        ));
    }
    let max_tokens = max_tokens(state, prompt_tokens.len(), prompt_param, params)?;
    let mut sampling = sampling(state, params)?;
    sampling.logprobs = options.logprobs;
    sampling.constraint = options.constraint;
    let priority = priority(params, headers)?;
    let stop = stop_strings(params.stop.as_ref())?;
    if !stop.is_empty() {
        sampling.stop_condition = Some(SharedStopCondition::new(StopStrings::new(
            state.model.decoder(options.keep_special_tokens),
            stop.clone(),
            state.model.eos_token_ids(),
        )));
    }
    if let Some(user) = &params.user {
        tracing::debug!(user, "request from user");
    }
    let prompt_len = prompt_tokens.len();
    Ok(Prepared {
        request: NewRequest {
            request_id: 0,
            name: Some(edge.name.0.clone()),
            model_id: state.model.id().to_owned(),
            prompt_tokens,
            max_tokens,
            priority,
            sampling,
            deadline: state.config.request_timeout.map(|t| Instant::now() + t),
        },
        generation: GenerationConfig {
            decoder: state.model.decoder(options.keep_special_tokens),
            stop,
            eos_token_ids: state.model.eos_token_ids(),
            prompt_tokens: prompt_len,
            request_name: edge.name.0.clone(),
        },
        stream: params.stream.unwrap_or(false),
        include_usage: params
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// `max_completion_tokens` (or `max_tokens`), checked against the context;
/// without either, whatever room the context and the KV cache leave.
fn max_tokens(
    state: &AppState,
    prompt_len: usize,
    prompt_param: &str,
    params: &CommonParams,
) -> Result<usize, ApiError> {
    let context = state.model.max_context();
    if prompt_len >= context {
        return Err(ApiError::context_length(prompt_param, format!(
            "This model's maximum context length is {context} tokens. However, your prompt has {prompt_len} tokens, which leaves no room for a completion."
        )));
    }
    let requested = match (params.max_completion_tokens, params.max_tokens) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    let Some((name, value)) = requested else {
        let room = context.min(state.engine.max_sequence_tokens());
        return Ok(room.saturating_sub(prompt_len).max(1));
    };
    if value < 1 {
        return Err(ApiError::invalid_param(
            name,
            format!("{name} must be at least 1, got {value}"),
        ));
    }
    let value = usize::try_from(value).unwrap_or(usize::MAX);
    if prompt_len.saturating_add(value) > context {
        return Err(ApiError::context_length(name, format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {value} in the completion). Please reduce the prompt or {name}.",
            prompt_len.saturating_add(value)
        )));
    }
    Ok(value)
}

fn sampling(state: &AppState, params: &CommonParams) -> Result<SamplingParams, ApiError> {
    let defaults = SamplingParams::default();
    let top_k = match params.top_k {
        None => None,
        // Some servers read 0 or -1 as "off"; here omitting the field turns
        // it off, so a non-positive value is more likely a mistake.
        Some(k) if k < 1 => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be at least 1, got {k}; omit it to disable top-k"),
            ))
        }
        Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
    };
    // f64 to f32 loses only precision no sampler can tell apart.
    let f = |v: Option<f64>, default: f32| v.map_or(default, |v| v as f32);
    let sampling = SamplingParams {
        temperature: f(params.temperature, state.config.default_temperature),
        top_p: f(params.top_p, defaults.top_p),
        top_k,
        seed: params.seed.map(|s| u64::from_ne_bytes(s.to_ne_bytes())),
        stop_token_ids: state.model.eos_token_ids(),
        min_p: f(params.min_p, defaults.min_p),
        presence_penalty: f(params.presence_penalty, defaults.presence_penalty),
        frequency_penalty: f(params.frequency_penalty, defaults.frequency_penalty),
        repetition_penalty: f(params.repetition_penalty, defaults.repetition_penalty),
        logit_bias: logit_bias(state, params.logit_bias.as_ref())?,
        ..SamplingParams::default()
    };
    sampling.validate().map_err(|e| match e {
        TypesError::InvalidSampling { param, reason } => {
            ApiError::invalid_param(param, format!("invalid value for {param}: {reason}"))
        }
        other => ApiError::bad_json(other.to_string()),
    })?;
    Ok(sampling)
}

/// `logit_bias`: token ids as strings, each below the vocabulary size.
fn logit_bias(
    state: &AppState,
    bias: Option<&HashMap<String, f64>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    let vocab = state.model.vocab_size();
    let mut out = Vec::with_capacity(bias.len());
    for (key, &value) in bias {
        let token = key
            .parse::<u32>()
            .ok()
            .filter(|&t| (t as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("{key:?} is not a token id below the vocabulary size of {vocab}"),
                )
            })?;
        out.push((token, value as f32));
    }
    // A fixed order keeps the request's sampling independent of the map's.
    out.sort_by_key(|&(t, _)| t);
    Ok(out)
}

/// The number of alternatives asked for, checked against OpenAI's limit.
pub fn top_logprobs(param: &str, n: i64) -> Result<usize, ApiError> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= SamplingParams::MAX_TOP_LOGPROBS)
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!(
                    "{param} must be between 0 and {}, got {n}",
                    SamplingParams::MAX_TOP_LOGPROBS
                ),
            )
        })
}

fn priority(params: &CommonParams, headers: &HeaderMap) -> Result<Priority, ApiError> {
    if let Some(p) = &params.priority {
        return p
            .parse()
            .map_err(|e: TypesError| ApiError::invalid_param("priority", e.to_string()));
    }
    match headers.get(PRIORITY_HEADER) {
        None => Ok(Priority::default()),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "priority",
                    format!("the {PRIORITY_HEADER} header must be \"high\", \"normal\" or \"low\""),
                )
            }),
    }
}

fn stop_strings(stop: Option<&StopParam>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s.clone()],
        Some(StopParam::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stops.len()
            ),
        ));
    }
    Ok(stops)
}
