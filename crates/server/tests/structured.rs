//! Structured output and tool calls over real HTTP, with the simulated
//! backend and the byte model: the grammar is compiled by `prompt` over the
//! byte vocabulary and enforced by the backend token by token, so what the
//! client gets back must follow the schema whatever the simulated model
//! "wanted" to write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Options, SseReader, TestServer, MODEL};
use serde_json::{json, Value};

/// A schema whose every instance is short (enums and booleans only), so
/// a backend that picks arbitrary allowed tokens still finishes it.
fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"enum": ["Oslo", "Lima"]},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "rain": {"type": "boolean"}
        },
        "required": ["city", "unit", "rain"]
    })
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Weather now",
            "parameters": weather_schema(), "strict": true}},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
            "strict": true}}
    ])
}

fn check_weather(value: &Value) {
    let map = value.as_object().unwrap_or_else(|| panic!("{value}"));
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["city", "rain", "unit"], "{value}");
    assert!(["Oslo", "Lima"].contains(&map["city"].as_str().unwrap()));
    assert!(["celsius", "fahrenheit"].contains(&map["unit"].as_str().unwrap()));
    assert!(map["rain"].is_boolean());
}

async fn server() -> TestServer {
    // The end-of-sequence token must exist for a grammar to finish.
    TestServer::start(Options::default().with_eos(1000)).await
}

/// Collects a streamed chat: content, tool-call deltas and finish reason.
async fn stream_chat(s: &TestServer, body: &Value) -> (String, Vec<Value>, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let payloads = SseReader::new(s.open_stream("/v1/chat/completions", &body).await)
        .all()
        .await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let (mut content, mut calls, mut reason) = (String::new(), Vec::new(), String::new());
    for p in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(p).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            content.push_str(text);
        }
        if let Some(list) = choice["delta"]["tool_calls"].as_array() {
            calls.extend(list.iter().cloned());
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_owned();
        }
    }
    (content, calls, reason)
}

#[tokio::test]
async fn json_schema_output_follows_the_schema_on_both_endpoints_streamed_or_not() {
    let s = server().await;
    for (i, strict) in [(0, true), (1, true), (2, false)] {
        let format = json!({"type": "json_schema", "json_schema": {
            "name": "weather", "schema": weather_schema(), "strict": strict}});
        let chat = json!({"model": MODEL, "max_tokens": 200, "seed": i,
            "messages": [{"role": "user", "content": format!("Weather {i}?")}],
            "response_format": format});
        let (status, _, body) = s.post("/v1/chat/completions", &chat).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        if strict {
            check_weather(&parsed);
        } else {
            assert!(parsed.is_object(), "{text}");
        }

        let (content, calls, reason) = stream_chat(&s, &chat).await;
        assert_eq!(
            (content.as_str(), calls.len(), reason.as_str()),
            (text, 0, "stop")
        );

        let completion = json!({"model": MODEL, "max_tokens": 200, "prompt": format!("{i}: "),
            "response_format": format});
        let (status, _, body) = s.post("/v1/completions", &completion).await;
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["text"].as_str().unwrap();
        if strict {
            check_weather(&serde_json::from_str(text).unwrap());
        }
    }
    let (status, _, body) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "max_tokens": 200,
                "messages": [{"role": "user", "content": "any"}],
                "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    // Any object: the backend writes whatever keys it likes, and the
    // grammar only lets it stop once the object is closed.
    if body["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[tokio::test]
async fn a_named_tool_choice_returns_a_valid_call_streamed_or_not() {
    let s = server().await;
    let request = json!({"model": MODEL, "max_tokens": 300,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (status, _, body) = s.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(choice["message"]["content"], Value::Null, "{body}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("call_"), "{id}");
    let arguments = calls[0]["function"]["arguments"].as_str().unwrap();
    check_weather(&serde_json::from_str(arguments).unwrap());

    let (content, streamed, reason) = stream_chat(&s, &request).await;
    assert_eq!((content.as_str(), reason.as_str()), ("", "tool_calls"));
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert_eq!(streamed[0]["index"], 0);
    assert_eq!(streamed[0]["function"], calls[0]["function"]);

    // The conversation goes on with the tool's result.
    let follow_up = json!({"model": MODEL, "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": calls},
            {"role": "tool", "tool_call_id": id, "content": "{\"temp\": 3}"}
        ],
        "tools": weather_tools()});
    let (status, _, body) = s.post("/v1/chat/completions", &follow_up).await;
    assert_eq!(status, 200, "{body}");
    let mut wrong = follow_up.clone();
    wrong["messages"][2]["tool_call_id"] = json!("call_nope");
    let (status, _, body) = s.post("/v1/chat/completions", &wrong).await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("messages[2].tool_call_id"))
    );
}

#[tokio::test]
async fn required_tool_calls_respect_parallel_tool_calls() {
    let s = server().await;
    let mut most = 0;
    for seed in 0..6 {
        for parallel in [true, false] {
            let request = json!({"model": MODEL, "max_tokens": 400, "seed": seed,
                "messages": [{"role": "user", "content": format!("go {seed}")}],
                "tools": weather_tools(), "tool_choice": "required",
                "parallel_tool_calls": parallel});
            let (status, _, body) = s.post("/v1/chat/completions", &request).await;
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            if choice["finish_reason"] == "length" {
                continue;
            }
            assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
            let calls = choice["message"]["tool_calls"].as_array().unwrap();
            assert!(!calls.is_empty());
            if !parallel {
                assert_eq!(calls.len(), 1, "{body}");
            }
            for call in calls {
                let args: Value =
                    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                match call["function"]["name"].as_str().unwrap() {
                    "get_weather" => check_weather(&args),
                    "get_time" => assert!(["UTC", "CET"].contains(&args["zone"].as_str().unwrap())),
                    other => panic!("unknown tool {other}"),
                }
            }
            most = most.max(calls.len());
        }
    }
    assert!(most >= 1);
}

#[tokio::test]
async fn structured_output_errors_name_their_parameter() {
    let s = server().await;
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "unknown format",
            chat(json!({"response_format": {"type": "yaml"}})),
            "response_format",
        ),
        (
            "bad schema",
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}}),
            ),
            "response_format",
        ),
        (
            "bad tool schema",
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}),
            ),
            "tools",
        ),
        (
            "unknown named tool",
            chat(
                json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
            "tool_choice",
        ),
        (
            "format with forced tool",
            chat(
                json!({"tools": weather_tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            ),
            "response_format",
        ),
        (
            "tool calls on a user",
            chat(json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})),
            "messages[0].tool_calls",
        ),
        (
            "arguments not JSON",
            chat(
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            "tool message without id",
            chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].tool_call_id",
        ),
    ];
    for (name, body, param) in cases {
        let (status, _, err) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{name}: {err}");
        assert_eq!(err["error"]["param"], param, "{name}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{name}");
    }
    let (status, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 7}}}),
        )
        .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("response_format.json_schema.schema"))
    );
}

#[tokio::test]
async fn auto_tools_with_a_format_either_call_or_answer_in_the_format() {
    let s = server().await;
    let (mut calls, mut answers) = (0, 0);
    for seed in 0..16 {
        let request = json!({"model": MODEL, "max_tokens": 300, "seed": seed,
            "messages": [{"role": "user", "content": format!("q{seed}")}],
            "tools": weather_tools(),
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "w", "schema": weather_schema(), "strict": true}}});
        let (status, _, body) = s.post("/v1/chat/completions", &request).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        match choice["finish_reason"].as_str().unwrap() {
            "tool_calls" => {
                assert!(!choice["message"]["tool_calls"]
                    .as_array()
                    .unwrap()
                    .is_empty());
                calls += 1;
            }
            "stop" => {
                let text = choice["message"]["content"].as_str().unwrap();
                check_weather(&serde_json::from_str(text).unwrap());
                answers += 1;
            }
            other => assert_eq!(other, "length", "{body}"),
        }
    }
    assert!(calls + answers > 0, "every run was cut off");
    eprintln!("{calls} tool-call answers, {answers} JSON answers");
}
