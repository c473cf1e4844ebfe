//! Every endpoint and error case over real HTTP, with the scheduler and the
//! simulated backend behind the server.
//!
//! JSON snapshots sort object keys: a workspace build turns on serde_json's
//! `preserve_order` (the `prompt` crate and llguidance ask for it), so the
//! key order of a parsed `Value` depends on which crates are built together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{chat_prompt, expected_text, Options, SseReader, TestServer, EOS, MODEL};
use serde_json::{json, Value};

fn chat_body(user: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
    })
}

#[tokio::test]
async fn models_are_listed_and_looked_up() {
    let s = TestServer::start(Options::default()).await;
    let (status, list) = s.get_json("/v1/models").await;
    assert_eq!(status, 200);
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("models", list, {".data[].created" => "[created]"});
    });
    let (status, one) = s.get_json(&format!("/v1/models/{MODEL}")).await;
    assert_eq!((status, &one["id"]), (200, &json!(MODEL)));
    let (status, missing) = s.get_json("/v1/models/gpt-4").await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_chat_completion_returns_the_generated_text_and_usage() {
    let s = TestServer::start(Options::default()).await;
    let (status, _, body) = s
        .post("/v1/chat/completions", &chat_body("Hello", 12))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        expected_text(&chat_prompt("Hello"), 12)
    );
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("chat_completion", body, {
            ".id" => "[id]",
            ".created" => "[created]",
            ".choices[].message.content" => "[text]",
        });
    });
}

#[tokio::test]
async fn a_streamed_chat_matches_the_unstreamed_one_and_ends_with_usage_and_done() {
    let s = TestServer::start(Options::default()).await;
    let mut body = chat_body("Stream me", 20);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let payloads = SseReader::new(s.open_stream("/v1/chat/completions", &body).await)
        .all()
        .await;
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected_text(&chat_prompt("Stream me"), 20));
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per response");
    let redact = |c: &Value| {
        let mut c = c.clone();
        c["id"] = json!("[id]");
        c["created"] = json!("[created]");
        c
    };
    let n = chunks.len();
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!(
            "chat_stream_edges",
            json!({
                "first": redact(&chunks[0]),
                "finish": redact(&chunks[n - 2]),
                "usage": redact(&chunks[n - 1]),
            })
        );
    });
}

#[tokio::test]
async fn completions_work_streamed_and_not() {
    let s = TestServer::start(Options::default()).await;
    let body = json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 16});
    let (status, _, plain) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"][0]["text"], expected_text("Once upon", 16));
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("completion", plain, {
            ".id" => "[id]", ".created" => "[created]", ".choices[].text" => "[text]",
        });
    });

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let payloads = SseReader::new(s.open_stream("/v1/completions", &streamed).await)
        .all()
        .await;
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected_text("Once upon", 16));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );

    // A prompt of token ids and a batch of one prompt are the same prompt.
    let ids: Vec<u32> = "Once upon".bytes().map(u32::from).collect();
    for prompt in [json!(ids), json!([ids]), json!(["Once upon"])] {
        let (status, _, again) = s
            .post(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": prompt, "max_tokens": 16}),
            )
            .await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["choices"][0]["text"], plain["choices"][0]["text"]);
    }
}

#[tokio::test]
async fn a_stop_string_cuts_the_text_before_it_with_finish_reason_stop() {
    let s = TestServer::start(Options::default()).await;
    let full = expected_text("Once upon", 40);
    // A stop string taken from the middle of the answer, three bytes long,
    // so it spans three tokens.
    let stop: String = full[20..23].to_owned();
    let cut = &full[..full.find(&stop).unwrap()];
    let body = json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 40, "stop": [stop]});
    let steps_before = s.control.stats().steps;
    let (status, _, plain) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"][0]["text"], cut);
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    // The engine matched the stop string itself: the request ended with
    // the token that completed it (one step per token, the first from the
    // prefill), not one step later when the client let go.
    s.wait_idle().await;
    let tokens_to_stop = full.find(&stop).unwrap() + stop.len();
    assert_eq!(
        s.control.stats().steps - steps_before,
        tokens_to_stop as u64
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stop"] = json!(stop);
    let payloads = SseReader::new(s.open_stream("/v1/completions", &streamed).await)
        .all()
        .await;
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, cut);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // The request stopped early and freed its blocks.
    s.wait_idle().await;
}

#[tokio::test]
async fn an_end_of_sequence_token_finishes_with_stop_and_is_not_shown() {
    let s = TestServer::start(Options::default().with_eos(8)).await;
    let (status, _, body) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 200}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let text = body["choices"][0]["text"].as_str().unwrap();
    let tokens: Vec<u32> = "Hi".bytes().map(u32::from).collect();
    let stop = Some(sim_backend::StopRule {
        token: EOS,
        one_in: 8,
    });
    let expected = sim_backend::tokens::expected_tokens(&tokens, None, 200, common::VOCAB, stop);
    assert_eq!(expected.last(), Some(&EOS));
    assert_eq!(
        text.len(),
        expected.len() - 1,
        "every token but EOS is text"
    );
    assert_eq!(body["usage"]["completion_tokens"], expected.len());
}

#[tokio::test]
async fn concurrent_streams_each_get_the_text_they_get_alone() {
    let s = TestServer::start(Options::default()).await;
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt number {i}")).collect();
    let tasks = prompts.iter().map(|p| {
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": 24, "stream": true});
        let s = &s;
        async move {
            let payloads = SseReader::new(s.open_stream("/v1/completions", &body).await)
                .all()
                .await;
            payloads[..payloads.len() - 1]
                .iter()
                .filter_map(|p| {
                    serde_json::from_str::<Value>(p).unwrap()["choices"][0]["text"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect::<String>()
        }
    });
    let texts = futures::future::join_all(tasks).await;
    for (p, text) in prompts.iter().zip(texts) {
        assert_eq!(text, expected_text(p, 24), "prompt {p}");
    }
    s.wait_idle().await;
}

/// Every request error, its status and the parameter it names.
#[tokio::test]
async fn invalid_requests_get_openai_errors_naming_the_parameter() {
    let s = TestServer::start(Options::default()).await;
    let chat = |extra: Value| {
        let mut body = chat_body("x", 4);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "temperature",
            chat(json!({"temperature": 2.5})),
            400,
            Some("temperature"),
        ),
        ("top_p", chat(json!({"top_p": 0})), 400, Some("top_p")),
        ("top_k", chat(json!({"top_k": 0})), 400, Some("top_k")),
        ("n", chat(json!({"n": 2})), 400, Some("n")),
        (
            "max_tokens",
            chat(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens",
            chat(json!({"max_completion_tokens": -3})),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "priority",
            chat(json!({"priority": "urgent"})),
            400,
            Some("priority"),
        ),
        (
            "stop",
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        (
            "empty messages",
            json!({"model": MODEL, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "role",
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            "image part",
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            "context",
            chat(json!({"max_tokens": 100_000})),
            400,
            Some("max_tokens"),
        ),
        (
            "unknown field",
            chat(json!({"functions": []})),
            400,
            Some("functions"),
        ),
        (
            "presence_penalty",
            chat(json!({"presence_penalty": 3})),
            400,
            Some("presence_penalty"),
        ),
        (
            "frequency_penalty",
            chat(json!({"frequency_penalty": -2.5})),
            400,
            Some("frequency_penalty"),
        ),
        (
            "repetition_penalty",
            chat(json!({"repetition_penalty": 0})),
            400,
            Some("repetition_penalty"),
        ),
        ("min_p", chat(json!({"min_p": 1.5})), 400, Some("min_p")),
        (
            "logit_bias key",
            chat(json!({"logit_bias": {"hello": 5}})),
            400,
            Some("logit_bias"),
        ),
        (
            "logit_bias value",
            chat(json!({"logit_bias": {"65": 500}})),
            400,
            Some("logit_bias"),
        ),
        (
            "top_logprobs alone",
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
        ),
        (
            "top_logprobs",
            chat(json!({"logprobs": true, "top_logprobs": 25})),
            400,
            Some("top_logprobs"),
        ),
        ("wrong type", chat(json!({"max_tokens": "many"})), 400, None),
        ("missing model", json!({"messages": []}), 400, None),
        (
            "unknown model",
            chat(json!({"model": "gpt-4o"})),
            404,
            Some("model"),
        ),
    ];
    let mut seen = Vec::new();
    for (name, body, status, param) in cases {
        let (got, _, err) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(got, status, "{name}: {err}");
        assert_eq!(err["error"]["param"].as_str(), param, "{name}: {err}");
        assert!(
            err["error"]["message"].as_str().unwrap().len() > 10,
            "{name}"
        );
        assert!(err["error"]["type"].is_string(), "{name}");
        seen.push(json!({"case": name, "status": got, "error": err["error"]}));
    }
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("request_errors", seen);
    });
    // The same for text completions' own fields.
    let (got, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "a", "logprobs": 21}),
        )
        .await;
    assert_eq!(
        (got, err["error"]["param"].as_str()),
        (400, Some("logprobs"))
    );
    let (got, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "a", "messages": []}),
        )
        .await;
    assert_eq!(
        (got, err["error"]["param"].as_str()),
        (400, Some("messages")),
        "{err}"
    );
    assert_eq!(err["error"]["code"], "unknown_parameter");

    let (status, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": ["a", "b"]}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
    let (status, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": [99999]}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
    let (status, _, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "a", "echo": true}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("echo"))
    );
    s.wait_idle().await;
}

#[tokio::test]
async fn malformed_bodies_routes_and_methods_get_openai_errors() {
    let s = TestServer::start(Options::default()).await;
    let raw = |body: &'static str| {
        s.client
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in ["{not json", "", "[1, 2]", "{\"model\": 5}"] {
        let resp = raw(body).await.unwrap();
        assert_eq!(resp.status(), 400, "{body:?}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{body:?}");
    }
    // curl -d sends a form content type; the body is JSON all the same.
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(json!({"model": MODEL, "prompt": "a", "max_tokens": 2}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let resp = s.client.get(s.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unknown_url");
    let resp = s
        .client
        .get(s.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let mut options = Options::default();
    options.server.body_limit = 1024;
    let s = TestServer::start(options).await;
    let big = "x".repeat(4096);
    let (status, _, err) = s
        .post("/v1/completions", &json!({"model": MODEL, "prompt": big}))
        .await;
    assert_eq!(status, 413);
    assert_eq!(err["error"]["code"], "request_too_large");
    // A small one still works on the same server.
    let (status, _, _) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "a", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

/// Waits until `/health` reports `n` requests in `field` of the engine
/// ("waiting" in the queue, "running" holding KV blocks).
async fn wait_engine(s: &TestServer, field: &str, n: u64) {
    for _ in 0..400 {
        if s.health().await["engine"][field].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never saw {n} {field}: {}", s.health().await);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let mut options = Options::default().serial(Duration::from_millis(5));
    options.scheduler.max_queue = Some(1);
    let s = TestServer::start(options).await;
    let long = json!({"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": true});
    let mut running = SseReader::new(s.open_stream("/v1/completions", &long).await);
    running.next().await.unwrap();
    // The engine publishes its counts after a step, so until then the
    // running request may still show as waiting: wait for it to show as
    // running before reading `waiting` as the queued request.
    wait_engine(&s, "running", 1).await;
    let queued = {
        let client = s.client.clone();
        let url = s.url("/v1/completions");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"model": MODEL, "prompt": "b", "max_tokens": 2}))
                .send()
                .await
        })
    };
    wait_engine(&s, "waiting", 1).await;
    let (status, headers, err) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "c", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    drop(running);
    assert_eq!(queued.await.unwrap().unwrap().status(), 200);
    s.wait_idle().await;
}

#[tokio::test]
async fn a_request_that_waits_past_the_timeout_gets_504() {
    let mut options = Options::default().serial(Duration::from_millis(5));
    options.server.request_timeout = Some(Duration::from_millis(100));
    let s = TestServer::start(options).await;
    let long = json!({"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": true});
    let mut running = SseReader::new(s.open_stream("/v1/completions", &long).await);
    running.next().await.unwrap();
    for stream in [false, true] {
        let body = json!({"model": MODEL, "prompt": "b", "max_tokens": 2, "stream": stream});
        let (status, _, err) = s.post("/v1/completions", &body).await;
        assert_eq!(status, 504, "stream={stream}: {err}");
        assert_eq!(err["error"]["code"], "timeout");
    }
    drop(running);
    s.wait_idle().await;
}

#[tokio::test]
async fn shutdown_refuses_new_requests_with_503_readiness_drains_then_liveness_fails() {
    let s = TestServer::start(Options::default().serial(Duration::from_millis(5))).await;
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["engine"]["alive"], true);
    assert_eq!(health["status"], "ok");
    assert!(health["engine"]["kv_blocks_total"].as_u64().unwrap() > 0);
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("health", health, {".engine.since_progress_ms" => "[ms]"});
    });
    let (status, ready) = s.get_json("/health/ready").await;
    assert_eq!((status, &ready["status"]), (200, &json!("ok")));

    // A running stream keeps the engine alive through the drain.
    let body = json!({"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": true});
    let mut reader = SseReader::new(s.open_stream("/v1/completions", &body).await);
    reader.next().await.unwrap();
    s.scheduler.shutdown();
    let (status, headers, err) = s.post("/v1/chat/completions", &chat_body("x", 2)).await;
    assert_eq!(status, 503, "{err}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(err["error"]["code"], "service_unavailable");
    let (status, ready) = s.get_json("/health/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["reason"], "draining");
    let (status, live) = s.get_json("/health").await;
    assert_eq!(status, 200, "draining is not a liveness failure: {live}");
    while reader.next().await.is_some() {}
    s.scheduler.stopped().await;
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 503);
    assert_eq!(health["engine"]["alive"], false);
    assert_eq!(health["reason"], "engine_stopped");
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.contains("mlx_batch_ready 0"), "{text}");
    assert!(text.contains("mlx_batch_live 0"), "{text}");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_capacity() {
    let s = TestServer::start(Options::default().serial(Duration::from_millis(5))).await;
    let body = json!({"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": true});
    let mut reader = SseReader::new(s.open_stream("/v1/completions", &body).await);
    reader.next().await.unwrap();
    reader.next().await.unwrap();
    let h = s.health().await;
    assert_eq!(h["engine"]["running"], 1);
    assert!(h["engine"]["kv_blocks_used"].as_u64().unwrap() > 0);
    let steps_before = s.control.stats().steps;
    drop(reader);
    s.wait_idle().await;
    let stats = s.control.stats();
    assert_eq!(stats.live_sequences, 0, "the backend released the sequence");
    assert!(stats.steps - steps_before < 400, "generation stopped early");
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("mlx_batch_server_client_disconnects_total"),
        "{text}"
    );
    assert!(text.contains("mlx_batch_cancellations_total"), "{text}");
}

#[tokio::test]
async fn a_high_priority_request_overtakes_queued_low_ones() {
    let s = TestServer::start(Options::default().serial(Duration::from_millis(2))).await;
    let first_token_at = |body: Value, header: Option<&'static str>| {
        let client = s.client.clone();
        let url = s.url("/v1/completions");
        tokio::spawn(async move {
            let mut req = client.post(url).json(&body);
            if let Some(p) = header {
                req = req.header("x-priority", p);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut reader = SseReader::new(resp);
            reader.next().await.unwrap();
            let at = Instant::now();
            reader.all().await;
            at
        })
    };
    let low = |p: &str| json!({"model": MODEL, "prompt": p, "max_tokens": 30, "stream": true, "priority": "low"});
    // The running request is long enough that the queue below forms while
    // it still holds the only batch slot, however slow the machine.
    let mut long_low = low("running");
    long_low["max_tokens"] = json!(200);
    let running = first_token_at(long_low, None);
    wait_engine(&s, "running", 1).await;
    let queued: Vec<_> = (0..3)
        .map(|i| first_token_at(low(&format!("low {i}")), None))
        .collect();
    wait_engine(&s, "waiting", 3).await;
    let high = first_token_at(
        json!({"model": MODEL, "prompt": "high", "max_tokens": 30, "stream": true}),
        Some("high"),
    );
    let high_at = high.await.unwrap();
    for q in queued {
        assert!(high_at < q.await.unwrap(), "HIGH got its first token first");
    }
    running.await.unwrap();
    s.wait_idle().await;
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let s = TestServer::start(Options::default()).await;
    let (status, _, _) = s.post("/v1/chat/completions", &chat_body("m", 3)).await;
    assert_eq!(status, 200);
    let resp = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for name in [
        "mlx_batch_time_to_first_token_seconds",
        "mlx_batch_tokens_generated_total",
        "mlx_batch_server_http_responses_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} missing:\n{text}"
        );
    }
}

#[tokio::test]
async fn steps_failing_in_a_row_fail_liveness_with_the_reason_until_one_succeeds() {
    // Slow steps leave time to look between the third and the fifth
    // failure.
    let mut options = Options::default().serial(Duration::from_millis(60));
    // Each request is re-queued after a failed step a few times, so the
    // engine keeps stepping (and failing) on its own.
    options.scheduler.max_step_retries = 10;
    let s = TestServer::start(options).await;
    s.control.fail_next_steps(4);
    let body = chat_body("x", 3);
    let request = s.post("/v1/chat/completions", &body);
    let watch = async {
        let mut seen_down = None;
        for _ in 0..400 {
            let (status, health) = s.get_json("/health").await;
            if status == 503 {
                seen_down = Some(health);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen_down
    };
    let ((status, _, answer), down) = tokio::join!(request, watch);
    let down = down.expect("/health never turned 503 while steps failed");
    assert_eq!(down["reason"], "step_failures", "{down}");
    assert!(
        down["engine"]["consecutive_step_failures"]
            .as_u64()
            .unwrap()
            >= 3
    );
    // The fifth step succeeded: the request was served and health recovers.
    assert_eq!(status, 200, "{answer}");
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["engine"]["consecutive_step_failures"], 0);
    let (status, _) = s.get_json("/health/ready").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_step_that_does_not_return_fails_liveness_as_stalled() {
    let mut options = Options::default().serial(Duration::from_millis(1500));
    options.server.health.stall_timeout = Duration::from_millis(300);
    let s = TestServer::start(options).await;
    let body = chat_body("x", 1);
    let request = s.post("/v1/chat/completions", &body);
    let watch = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.get_json("/health").await
    };
    let ((status, _, answer), (live_status, live)) = tokio::join!(request, watch);
    assert_eq!(live_status, 503, "{live}");
    assert_eq!(live["reason"], "stalled");
    assert_eq!(status, 200, "{answer}");
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 200, "idle again after the step: {health}");
}

#[tokio::test]
async fn a_request_keeps_one_identity_from_the_header_to_the_response() {
    let s = TestServer::start(Options::default()).await;
    // The client's x-request-id is honoured: returned, and the response id's
    // suffix, streamed or not.
    for stream in [false, true] {
        let mut body = chat_body("x", 2);
        body["stream"] = json!(stream);
        let resp = s
            .client
            .post(s.url("/v1/chat/completions"))
            .header("x-request-id", "client-abc.123")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-request-id"], "client-abc.123");
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("\"id\":\"chatcmpl-client-abc.123\""),
            "stream={stream}: {text}"
        );
    }
    // Without one, the server names the request, and the name is the id's
    // suffix too.
    let (status, headers, answer) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "a", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let name = headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(name.len(), 24, "{name}");
    assert_eq!(answer["id"], format!("cmpl-{name}"));
    // Errors carry it as well.
    let (status, headers, _) = s
        .post("/v1/completions", &json!({"model": "nope", "prompt": "a"}))
        .await;
    assert_eq!(status, 404);
    assert!(headers.contains_key("x-request-id"));
    // One that cannot be an id is refused, naming the header.
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .header("x-request-id", "has space")
        .json(&json!({"model": MODEL, "prompt": "a", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "x-request-id", "{err}");
}

mod slow_clients {
    use super::*;
    use std::time::Instant;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    fn quick(options: &mut Options) {
        let c = &mut options.server.connections;
        c.header_read_timeout = Duration::from_millis(400);
        c.keep_alive_timeout = Duration::from_millis(300);
        options.server.body_read_timeout = Duration::from_millis(400);
        options.server.stream_stall_timeout = Duration::from_millis(500);
    }

    async fn connect(s: &TestServer) -> TcpStream {
        TcpStream::connect(s.base.trim_start_matches("http://"))
            .await
            .unwrap()
    }

    /// Reads until the server closes the connection; returns what it sent
    /// and how long that took.
    async fn read_to_close(stream: &mut TcpStream) -> (String, Duration) {
        let start = Instant::now();
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the server never closed the connection");
        (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
    }

    #[tokio::test]
    async fn headers_that_never_complete_and_idle_connections_are_closed() {
        let mut options = Options::default();
        quick(&mut options);
        let s = TestServer::start(options).await;
        let mut silent = connect(&s).await;
        let (sent, took) = read_to_close(&mut silent).await;
        assert!(sent.is_empty() && took < Duration::from_secs(2), "{took:?}");
        let mut partial = connect(&s).await;
        partial
            .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (_, took) = read_to_close(&mut partial).await;
        assert!(took < Duration::from_secs(2), "{took:?}");
        // A served keep-alive connection is closed once idle.
        let mut idle = connect(&s).await;
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (sent, took) = read_to_close(&mut idle).await;
        assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn a_trickled_body_gets_408_and_its_connection_is_closed() {
        let mut options = Options::default();
        quick(&mut options);
        let s = TestServer::start(options).await;
        let body = br#"{"model": "sim-byte", "prompt": "a", "max_tokens": 2}"#;
        let mut slow = connect(&s).await;
        slow.write_all(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let trickle = async {
            for byte in body.iter().take(10) {
                if slow.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        trickle.await;
        let (sent, _) = read_to_close(&mut slow).await;
        assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
        assert!(sent.contains("request_timeout"), "{sent}");
    }

    #[tokio::test]
    async fn beyond_the_connection_cap_new_connections_are_closed_at_once() {
        let mut options = Options::default();
        quick(&mut options);
        options.server.connections.max_connections = 2;
        options.server.connections.header_read_timeout = Duration::from_secs(5);
        let s = TestServer::start(options).await;
        let _a = connect(&s).await;
        let _b = connect(&s).await;
        // Let the server accept both before the third arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = connect(&s).await;
        let (sent, took) = read_to_close(&mut c).await;
        assert!(sent.is_empty());
        assert!(
            took < Duration::from_millis(500),
            "refused at once: {took:?}"
        );
        drop((_a, _b));
        // Once they are gone, a normal request is served again.
        let mut ok = false;
        for _ in 0..50 {
            if let Ok(resp) = s.client.get(s.url("/health")).send().await {
                ok = resp.status() == 200;
                if ok {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok);
    }

    #[tokio::test]
    async fn a_stream_whose_client_stops_reading_is_cancelled_and_frees_its_blocks() {
        let mut options = Options::default().serial(Duration::from_millis(2));
        quick(&mut options);
        let s = TestServer::start(options).await;
        let body =
            json!({"model": MODEL, "prompt": "a", "max_tokens": 3000, "stream": true}).to_string();
        let mut reader = connect(&s).await;
        reader
            .write_all(
                format!(
                    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // Read the headers and a little, then stop reading altogether.
        let mut first = [0u8; 256];
        let _ = reader.read(&mut first).await.unwrap();
        let cancelled = async {
            for _ in 0..200 {
                let h = s.health().await;
                if h["engine"]["running"] == 0 && h["engine"]["kv_blocks_used"] == 0 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(cancelled.await, "the stalled stream still holds its blocks");
        let generated = s.control.stats().decode_tokens;
        assert!(
            generated < 2900,
            "cancelled early, not run to the end: {generated}"
        );
        drop(reader);
    }
}

#[tokio::test]
async fn log_probabilities_come_in_each_endpoints_shape_streamed_or_not() {
    let s = TestServer::start(Options::default()).await;
    let mut body = chat_body("x", 6);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (status, _, answer) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 6);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // The sim's sampled token is its most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(entry["logprob"].as_f64().unwrap() < 0.0);
        assert!(entry["bytes"].is_array());
    }
    // Streamed: the chunks' entries add up to the same.
    body["stream"] = json!(true);
    let payloads = SseReader::new(s.open_stream("/v1/chat/completions", &body).await)
        .all()
        .await;
    let streamed: usize = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(Vec::len)
        })
        .sum();
    assert_eq!(streamed, 6);
    // Without asking, none.
    let (_, _, plain) = s.post("/v1/chat/completions", &chat_body("x", 2)).await;
    assert!(plain["choices"][0]["logprobs"].is_null());

    let text = json!({"model": MODEL, "prompt": "abc", "max_tokens": 5, "logprobs": 3});
    let (status, _, answer) = s.post("/v1/completions", &text).await;
    assert_eq!(status, 200, "{answer}");
    let lp = &answer["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
}
