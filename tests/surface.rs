//! The default-deny API surface, tried as an attacker with an ordinary key
//! would: every path is one the gateway chose, and every policy (allow-list,
//! token ceiling, request limits, routing) holds on every model route, in
//! every dialect, however the path is spelled.

mod support;

use mock_llama::{MockLlama, MockOptions};
use serde_json::{json, Value};
use support::gateway::{sha256_hex, Gateway};
use support::http::{raw_to_close, status_of};

const A: &str = "sk-surface-a";
const B: &str = "sk-surface-b";
const LIMITED: &str = "sk-surface-limited";

/// Keys: `a` may use `model-a` only, `b` every model, `limited` `model-a`
/// with a 16-token ceiling and 2 requests a minute.
fn config(servers: &str, extra: &str) -> String {
    format!(
        r#"
upstream:
{servers}
  connect_timeout: 2s
models:
  - name: model-a
    aliases: [alias-a]
    upstream_name: upstream-a.gguf
  - name: model-b
    upstream_name: upstream-b.gguf
keys:
  - id: a
    sha256: {a}
    models: [model-a]
  - id: b
    sha256: {b}
  - id: limited
    sha256: {l}
    models: [model-a]
    limits:
      max_tokens: 16
      requests_per_minute: 2
{extra}
"#,
        a = sha256_hex(A),
        b = sha256_hex(B),
        l = sha256_hex(LIMITED),
    )
}

fn one(mock: &MockLlama) -> String {
    format!("  url: {}", mock.url())
}

/// Every model route with a body that names `model` in its dialect.
fn model_routes(model: &str) -> Vec<(&'static str, Value)> {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    vec![
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": msgs}),
        ),
        ("/v1/completions", json!({"model": model, "prompt": "hi"})),
        ("/v1/embeddings", json!({"model": model, "input": "hi"})),
        ("/v1/responses", json!({"model": model, "input": "hi"})),
        (
            "/v1/messages",
            json!({"model": model, "max_tokens": 8, "messages": msgs}),
        ),
        (
            "/v1/rerank",
            json!({"model": model, "query": "q", "documents": ["a", "b"]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": model, "messages": msgs}),
        ),
        (
            "/v1/responses/input_tokens",
            json!({"model": model, "input": "hi"}),
        ),
        (
            "/v1/chat/completions/input_tokens",
            json!({"model": model, "messages": msgs}),
        ),
    ]
}

async fn post(gw: &Gateway, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", gw.url()))
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Sends raw HTTP/1.1 and returns the status line's code and the whole reply.
async fn raw(gw: &Gateway, request: &str) -> (u16, String) {
    let text = raw_to_close(gw, request.as_bytes()).await;
    (status_of(&text), text)
}

fn model_requests(mock: &MockLlama) -> Vec<mock_llama::Received> {
    mock.requests()
        .into_iter()
        .filter(|r| r.path != "/health")
        .collect()
}

/// The error's message in either shape (OpenAI's or Anthropic's).
fn error_type(path: &str, body: &Value) -> String {
    if path.starts_with("/v1/messages") {
        assert_eq!(body["type"], "error", "{path}: Anthropic shape: {body}");
        body["error"]["type"].as_str().unwrap_or_default().into()
    } else {
        body["error"]["code"].as_str().unwrap_or_default().into()
    }
}

#[tokio::test]
async fn paths_outside_the_table_are_404_and_never_reach_llama_server() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&one(&mock), ""));
    for (method, path) in [
        ("GET", "/v1/stream?conv_id=abc&from=0"),
        ("POST", "/v1/streams/lookup"),
        ("POST", "/v1/chat/completions/control"),
        ("POST", "/v1/tokenize"),
        ("POST", "/v1/reranking"),
        ("GET", "/props"),
        ("POST", "/slots/0?action=erase"),
        ("POST", "/completion"),
        ("POST", "/infill"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/models/load"),
        ("GET", "/metrics"),
    ] {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {B}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let (code, text) = raw(&gw, &req).await;
        assert_eq!(code, 404, "{method} {path}: {text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        let bare = path.split('?').next().unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(bare),
            "{body}"
        );
    }
    assert!(model_requests(&mock).is_empty(), "{:?}", mock.requests());
}

#[tokio::test]
async fn escaped_spellings_of_a_route_are_400_and_never_reach_llama_server() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&one(&mock), ""));
    let body =
        json!({"model": "model-b", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    for path in [
        "/v1/chat/c%6fmpletions",
        "/v1/%63hat/completions",
        "/v1/embedding%73",
        "/v1/m%65ssages",
        "/v1/responses%2F",
        "/v1/chat/completions%3F",
        "/v1/chat//completions",
        "/v1/./messages",
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {A}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (code, text) = raw(&gw, &req).await;
        assert_eq!(code, 400, "{path}: {text}");
        assert!(text.contains("invalid_request"), "{text}");
    }
    assert!(model_requests(&mock).is_empty(), "{:?}", mock.requests());
}

#[tokio::test]
async fn the_allow_list_holds_on_every_model_route_in_its_dialect() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&one(&mock), ""));
    for (path, body) in model_routes("model-b") {
        let (status, err) = post(&gw, path, A, &body).await;
        assert_eq!(status, 403, "{path}: {err}");
        let kind = error_type(path, &err);
        assert!(
            kind == "model_not_allowed" || kind == "permission_error",
            "{path}: {err}"
        );
    }
    assert!(model_requests(&mock).is_empty(), "{:?}", mock.requests());
    // the allowed model, spelled as its alias, reaches llama-server under
    // its upstream name, on every route, at the canonical path
    for (path, body) in model_routes("alias-a") {
        let (status, _) = post(&gw, &format!("{path}/"), A, &body).await;
        assert_ne!(status, 403, "{path}");
    }
    let received = model_requests(&mock);
    assert_eq!(received.len(), model_routes("x").len());
    for (r, (path, _)) in received.iter().zip(model_routes("x")) {
        assert_eq!(r.path, path);
        assert_eq!(r.json()["model"], "upstream-a.gguf", "{path}");
        assert!(r.header("authorization").is_none());
    }
}

#[tokio::test]
async fn x_api_key_authenticates_and_anthropic_errors_are_anthropic_shaped() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&one(&mock), ""));
    let c = reqwest::Client::new();
    let body = json!({"model": "model-b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let send = |key: Option<&str>| {
        let mut req = c
            .post(format!("{}/v1/messages", gw.url()))
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "tools-2024-04-04")
            .body(body.to_string());
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        req.send()
    };
    let resp = send(Some(B)).await.unwrap();
    assert_ne!(resp.status().as_u16(), 401);
    let got = model_requests(&mock).pop().unwrap();
    assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(got.header("anthropic-beta"), Some("tools-2024-04-04"));
    assert!(
        got.header("x-api-key").is_none(),
        "the key is never forwarded"
    );
    for (key, status, kind) in [
        (None, 401, "authentication_error"),
        (Some("sk-wrong"), 401, "authentication_error"),
        (Some(A), 403, "permission_error"),
    ] {
        let resp = send(key).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["error"]["type"], kind, "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn the_request_limit_holds_on_every_route() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&one(&mock), ""));
    let mut limited = 0;
    for (path, body) in model_routes("model-a") {
        let (status, err) = post(&gw, path, LIMITED, &body).await;
        if status == 429 {
            limited += 1;
            let kind = error_type(path, &err);
            assert!(
                kind == "rate_limit_exceeded" || kind == "rate_limit_error",
                "{path}: {err}"
            );
        }
    }
    // 2 a minute: the burst of two passes, everything after is refused
    assert_eq!(limited, model_routes("x").len() - 2);
    assert_eq!(model_requests(&mock).len(), 2);
}

#[tokio::test]
async fn the_token_ceiling_holds_in_every_dialect() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml =
        config(&one(&mock), "").replace("requests_per_minute: 2", "requests_per_minute: 1000");
    let gw = Gateway::start(&yaml);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "/v1/messages",
            json!({"model": "model-a", "max_tokens": 100000, "messages": msgs}),
            "max_tokens",
        ),
        (
            "/v1/responses",
            json!({"model": "model-a", "input": "hi", "max_output_tokens": 100000}),
            "max_output_tokens",
        ),
        (
            "/v1/responses",
            json!({"model": "model-a", "input": "hi"}),
            "max_output_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "model-a", "messages": msgs, "max_completion_tokens": 100000}),
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "model-a", "prompt": "hi", "n_predict": 100000}),
            "n_predict",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "model-a", "messages": msgs}),
            "max_tokens",
        ),
    ];
    for (path, body, field) in &cases {
        let before = model_requests(&mock).len();
        let (status, err) = post(&gw, path, LIMITED, body).await;
        assert_ne!(status, 400, "{path}: {err}");
        let got = model_requests(&mock);
        assert_eq!(got.len(), before + 1, "{path}");
        let sent = got.last().unwrap().json();
        let value = sent[field].as_u64().unwrap_or(u64::MAX);
        assert!(value <= 16, "{path} {field}: {sent}");
    }
    // `n` multiplies the generation: choices × tokens stays within the ceiling
    let before = model_requests(&mock).len();
    let body = json!({"model": "model-a", "messages": msgs, "n": 4, "max_tokens": 16});
    let (status, _) = post(&gw, "/v1/chat/completions", LIMITED, &body).await;
    let got = model_requests(&mock);
    if status == 400 {
        assert_eq!(
            got.len(),
            before,
            "a refused request never reaches llama-server"
        );
    } else {
        let sent = got.last().unwrap().json();
        let n = sent["n"].as_u64().unwrap_or(1);
        assert!(n * sent["max_tokens"].as_u64().unwrap() <= 16, "{sent}");
    }
}

#[tokio::test]
async fn a_model_pinned_to_a_server_is_routed_there_on_every_route() {
    let mock_a = MockLlama::start(MockOptions::default()).await;
    let mock_b = MockLlama::start(MockOptions::default()).await;
    let servers = format!(
        "  servers:\n    - name: gpu-a\n      url: {}\n    - name: gpu-b\n      url: {}\n  health_interval: 1h",
        mock_a.url(),
        mock_b.url()
    );
    let yaml = config(&servers, "").replace(
        "    upstream_name: upstream-b.gguf\n",
        "    upstream_name: upstream-b.gguf\n    upstreams: [gpu-b]\n",
    );
    let yaml = yaml.replace(
        "    upstream_name: upstream-a.gguf\n",
        "    upstream_name: upstream-a.gguf\n    upstreams: [gpu-a]\n",
    );
    let gw = Gateway::start(&yaml);
    for (path, body) in model_routes("model-b") {
        assert_eq!(post(&gw, path, A, &body).await.0, 403, "{path}");
    }
    for (path, body) in model_routes("model-a") {
        post(&gw, path, A, &body).await;
    }
    assert!(
        model_requests(&mock_b).is_empty(),
        "{:?}",
        mock_b.requests()
    );
    assert_eq!(model_requests(&mock_a).len(), model_routes("x").len());
}

#[tokio::test]
async fn an_opened_passthrough_path_needs_a_key_counts_and_is_labelled() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml = config(
        &one(&mock),
        "routes:\n  passthrough: [/props, /v1/tokenize]\n",
    );
    let gw = Gateway::start(&yaml);
    let c = reqwest::Client::new();
    let resp = c.get(format!("{}/props", gw.url())).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(model_requests(&mock).is_empty());
    let resp = c
        .get(format!("{}/props?api_key={LIMITED}&x=1", gw.url()))
        .bearer_auth(LIMITED)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        404,
        "llama-server's own answer (the mock has no /props)"
    );
    let got = model_requests(&mock);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/props?x=1", "key-like parameters are dropped");
    // the key's request limit counts passthrough requests too
    for expected in [404, 429] {
        let resp = c
            .post(format!("{}/v1/tokenize", gw.url()))
            .bearer_auth(LIMITED)
            .body(r#"{"content":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), expected);
    }
    assert_eq!(model_requests(&mock).len(), 2);
    let scrape = gw.scrape().await;
    assert!(
        scrape.contains(r#"route="passthrough""#),
        "passthrough requests are labelled: {scrape}"
    );
    assert!(!gw.log().contains(LIMITED), "no key in the log");
}
