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
    let (status, _, plain) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"][0]["text"], cut);
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");

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
    // The request stopped early, so the engine cancels it and frees its blocks.
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
async fn shutdown_refuses_new_requests_with_503_and_health_turns_503() {
    let s = TestServer::start(Options::default()).await;
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["engine"]["alive"], true);
    assert_eq!(health["status"], "ok");
    assert!(health["engine"]["kv_blocks_total"].as_u64().unwrap() > 0);
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("health", health);
    });

    s.scheduler.shutdown();
    let (status, headers, err) = s.post("/v1/chat/completions", &chat_body("x", 2)).await;
    assert_eq!(status, 503, "{err}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(err["error"]["code"], "service_unavailable");
    s.scheduler.stopped().await;
    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 503);
    assert_eq!(health["engine"]["alive"], false);
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
