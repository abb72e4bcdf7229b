//! End-to-end tests of the real `llm-edge` binary in front of the mock llama-server.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_llama::{reply_text, MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::setup;
use support::gateway::{standard_config, Gateway, KEY, KEY_LIMITED};
use support::http::{chat, client, eventually, eventually_within, post, post_chat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The error answer to a chat `body` sent with `key` (see [`error_of`]).
async fn chat_error(gw: &Gateway, key: Option<&str>, body: String) -> (u16, Value) {
    error_of(post(gw, "/v1/chat/completions", key, body).await).await
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let (status, body) = support::http::error_of(resp).await;
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{body}"
    );
    (status, body)
}

#[tokio::test]
async fn models_are_answered_from_the_catalogue() {
    let (mock, gw) = setup("").await;
    let resp = client()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen3", "small", "qwen", "default"]);
    assert!(!v.to_string().contains(".gguf"));

    let limited: Value = client()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY_LIMITED)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limited["data"].as_array().unwrap().len(), 1);

    let one: Value = client()
        .get(format!("{}/v1/models/qwen", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "qwen");
    let missing = client()
        .get(format!("{}/v1/models/gpt-4", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(missing).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        mock.requests().is_empty(),
        "model listing never reaches the upstream"
    );
}

#[tokio::test]
async fn keys_are_required_and_never_forwarded() {
    let (mock, gw) = setup("").await;
    let resp = post(&gw, "/v1/chat/completions", None, chat("qwen", false)).await;
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("missing_api_key"))
    );

    let (status, body) = chat_error(&gw, Some("sk-wrong"), chat("qwen", false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(body["error"]["type"], "authentication_error");

    let (status, body) = chat_error(&gw, Some(KEY_LIMITED), chat("qwen", false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let models = client()
        .get(format!("{}/v1/models", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
    assert!(
        mock.requests().is_empty(),
        "rejected requests never reach the upstream"
    );

    let ok = post(
        &gw,
        "/v1/chat/completions",
        Some(KEY_LIMITED),
        chat("small", false),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let seen = mock.last_request().unwrap();
    assert_eq!(
        seen.header("authorization"),
        None,
        "the client's key is not forwarded"
    );
    assert!(seen.header("x-request-id").is_some());

    let log = gw.log();
    assert!(
        !log.contains(KEY) && !log.contains(KEY_LIMITED) && !log.contains("sk-wrong"),
        "{log}"
    );
    assert!(log.contains("key=bob"), "{log}");
}

#[tokio::test]
async fn model_field_is_rewritten_byte_exactly() {
    let (mock, gw) = setup("").await;
    let sent = r#"{ "messages":[{"role":"user","content":"héllo \u00e9 \"q\""}],  "model" : "qwen",  "temperature": 0.70, "extra": {"model":"keep"}}"#;
    let resp = post(&gw, "/v1/chat/completions", Some(KEY), sent).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], reply_text(8));
    let seen = mock.last_request().unwrap();
    let expected = sent.replace(
        r#""model" : "qwen""#,
        r#""model" : "/models/qwen3-30b.gguf""#,
    );
    assert_eq!(String::from_utf8(seen.body.clone()).unwrap(), expected);
    assert_eq!(
        seen.header("content-length"),
        Some(expected.len().to_string().as_str())
    );

    // No model: the default model's upstream name is inserted.
    post(&gw, "/v1/chat/completions", Some(KEY), r#"{"messages":[]}"#).await;
    assert_eq!(
        String::from_utf8(mock.last_request().unwrap().body).unwrap(),
        r#"{"model":"/models/qwen3-30b.gguf","messages":[]}"#
    );

    // Completions and embeddings are rewritten too.
    post(
        &gw,
        "/v1/completions",
        Some(KEY),
        r#"{"model":"small","prompt":"hi"}"#,
    )
    .await;
    assert_eq!(
        mock.last_request().unwrap().json()["model"],
        "small-upstream"
    );
    let emb = post(
        &gw,
        "/v1/embeddings",
        Some(KEY),
        r#"{"model":"default","input":"hi"}"#,
    )
    .await;
    assert_eq!(emb.status(), 200);
    assert_eq!(
        mock.last_request().unwrap().json()["model"],
        "/models/qwen3-30b.gguf"
    );
}

#[tokio::test]
async fn bad_bodies_get_clear_400s_and_never_reach_the_upstream() {
    let (mock, gw) = setup("").await;
    let cases: [(&str, &str); 7] = [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1,2,3]", "JSON object"),
        (r#"{"model": 7, "messages": []}"#, "must be a string"),
        (
            r#"{"model":"small","messages":[],"model":"qwen"}"#,
            "more than one",
        ),
        (r#"{"model":"small"} {}"#, "not valid JSON"),
        ("\u{0}\u{1}", "not valid JSON"),
    ];
    for (body, hint) in cases {
        let (status, err) =
            error_of(post(&gw, "/v1/chat/completions", Some(KEY), body).await).await;
        assert_eq!(status, 400, "{body:?}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(hint),
            "{body:?}: {err}"
        );
    }
    let (status, err) = chat_error(&gw, Some(KEY), chat("gpt-4o", false)).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert!(mock.requests().is_empty());
    // and it keeps serving
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn routes_methods_and_health() {
    let (mock, gw) = setup("").await;
    let c = client();
    let health = c.get(format!("{}/health", gw.url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let up: Value = c
        .get(format!("{}/health/upstream", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(up["status"], "ok");
    let (status, body) = error_of(
        c.get(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    assert!(body["error"]["message"].as_str().unwrap().contains("POST"));
    let (status, _) = error_of(c.get(format!("{}/admin", gw.url())).send().await.unwrap()).await;
    assert_eq!(status, 404);
    // other /v1 paths are the gateway's 404 (default-deny), never llama-server's
    let other = c
        .get(format!("{}/v1/unknown-endpoint", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/unknown-endpoint"));
    assert!(
        mock.requests().iter().all(|r| r.path == "/health"),
        "nothing but health probes reached llama-server"
    );
}

fn sized_body(size: usize) -> String {
    let prefix = r#"{"model":"qwen","messages":[{"role":"user","content":""#;
    let suffix = r#""}]}"#;
    let mut body = String::with_capacity(size);
    body.push_str(prefix);
    body.push_str(&"a".repeat(size - prefix.len() - suffix.len()));
    body.push_str(suffix);
    body
}

#[tokio::test]
async fn every_body_size_up_to_the_limit_reaches_the_upstream_intact() {
    let limit = 4 << 20;
    let (mock, gw) = setup(&format!("limits:\n  max_body_bytes: {limit}\n")).await;
    for size in [
        1024,
        64 * 1024 - 1,
        64 * 1024,
        64 * 1024 + 1,
        1 << 20,
        limit,
    ] {
        let body = sized_body(size);
        let resp = post(&gw, "/v1/chat/completions", Some(KEY), body.clone()).await;
        let status = resp.status();
        assert_eq!(
            status,
            200,
            "size {size}: {}\n{}",
            resp.text().await.unwrap(),
            gw.log()
        );
        let seen = mock.last_request().unwrap();
        let expected = body.replacen(
            r#""model":"qwen""#,
            r#""model":"/models/qwen3-30b.gguf""#,
            1,
        );
        assert_eq!(seen.body.len(), expected.len(), "size {size}");
        assert!(
            seen.body == expected.as_bytes(),
            "size {size}: body changed"
        );
    }
    // Chunked upload (no Content-Length) of a large body works too.
    let body = sized_body(2 << 20);
    let stream = futures_util::stream::iter(
        body.clone()
            .into_bytes()
            .chunks(100_000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = post(
        &gw,
        "/v1/chat/completions",
        Some(KEY),
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.last_request().unwrap().body.len(),
        body.len() + "/models/qwen3-30b.gguf".len() - "qwen".len()
    );
}

#[tokio::test]
async fn over_the_limit_is_413_and_the_client_reads_it() {
    let limit = 1 << 20;
    let (mock, gw) = setup(&format!("limits:\n  max_body_bytes: {limit}\n")).await;
    let before = mock.requests().len();
    // Declared too large: refused from the header.
    let (status, body) = error_of(
        post(
            &gw,
            "/v1/chat/completions",
            Some(KEY),
            sized_body(limit + 1),
        )
        .await,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    // Streamed without a length: refused while reading.
    let big = sized_body(3 * limit);
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = post(
        &gw,
        "/v1/chat/completions",
        Some(KEY),
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(resp.status(), 413);
    assert_eq!(
        mock.requests().len(),
        before,
        "oversized bodies never reach the upstream"
    );

    // Expect: 100-continue: the 413 comes instead of "100 Continue", before any body byte.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        limit + 10
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // And with a small body, 100 Continue comes first and the request succeeds.
    let body = chat("qwen", false);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"));
    s.write_all(body.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
}

#[tokio::test]
async fn streams_arrive_token_by_token() {
    let (_mock, gw) = setup("").await;
    let tokens = 10;
    let start = Instant::now();
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .header("x-mock-delay-ms", "100")
        .header("x-mock-tokens", tokens.to_string())
        .body(chat("qwen", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(h.get("content-length").is_none());
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.get("content-encoding").is_none());
    let mut arrivals = Vec::new();
    let mut all = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(start.elapsed());
        all.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(all).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), tokens + 3, "role, tokens, finish, [DONE]");
    assert_eq!(events.last().unwrap(), &"data: [DONE]");
    let content: String = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, reply_text(tokens));
    assert!(
        arrivals.len() >= tokens,
        "chunks were coalesced: {arrivals:?}"
    );
    let (first, last) = (arrivals[0], *arrivals.last().unwrap());
    assert!(
        last - first > Duration::from_millis(600),
        "first {first:?} last {last:?}"
    );
    assert!(
        first * 3 < last,
        "first chunk should arrive long before the last: {first:?} vs {last:?}"
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream() {
    let (mock, gw) = setup("").await;
    let resp = post_chat(
        &gw,
        KEY,
        chat("qwen", true),
        &[("x-mock-delay-ms", "100"), ("x-mock-tokens", "500")],
    )
    .await;
    let mut stream = resp.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    let dropped_at = Instant::now();
    drop(stream);
    eventually_within(
        Duration::from_secs(5),
        "the upstream sees the abort",
        || mock.aborted() != 0,
    )
    .await;
    assert_eq!(mock.aborted(), 1, "the upstream did not see the abort");
    let seen_after = mock.abort_times()[0] - dropped_at;
    assert!(
        seen_after < Duration::from_secs(3),
        "abort took {seen_after:?}"
    );
    assert_eq!(mock.completed(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = gw.log();
    assert!(log.contains("\"POST /v1/chat/completions\" 499"), "{log}");
    assert!(log.contains("disconnect=streaming"), "{log}");
    assert!(
        !log.contains("Prematurely"),
        "Pingora's error log should stay quiet: {log}"
    );
}

#[tokio::test]
async fn client_disconnect_before_the_first_token_cancels_the_upstream() {
    let (mock, gw) = setup("").await;
    let c = client();
    let req = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .header("x-mock-first-token-delay-ms", "20000")
        .body(chat("qwen", false))
        .send();
    let _ = tokio::time::timeout(Duration::from_millis(500), req).await;
    eventually_within(
        Duration::from_secs(5),
        "the upstream sees the abort",
        || mock.aborted() != 0,
    )
    .await;
    assert_eq!(mock.aborted(), 1);
    eventually("the access log line", || {
        gw.log().contains("disconnect=before_first_token")
    })
    .await;
    assert!(
        gw.log().contains("disconnect=before_first_token"),
        "{}",
        gw.log()
    );
}

#[tokio::test]
async fn upstream_down_is_a_502_with_the_tunnel_hint() {
    // Nothing listens on this port.
    let (_dead, port) = support::gateway::refused_port();
    let gw = Gateway::start(&standard_config(&format!("http://127.0.0.1:{port}"), ""));
    let (status, body) =
        error_of(post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", true)).await).await;
    assert_eq!(status, 502);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("SSH tunnel"),
        "{msg}"
    );
    let health = client()
        .get(format!("{}/health/upstream", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let v: Value = health.json().await.unwrap();
    assert_eq!(v["status"], "unreachable");
    // the gateway itself is fine
    assert_eq!(
        client()
            .get(format!("{}/health", gw.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn tunnel_up_but_llama_server_down_is_a_502_with_the_hint() {
    // Like sshd with no llama-server behind the forward: accept, then close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let gw = Gateway::start(&standard_config(&format!("http://{addr}"), ""));
    let started = Instant::now();
    let (status, body) =
        error_of(post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false)).await).await;
    assert_eq!(status, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("llama-server"),
        "{body}"
    );
    // prompt: long before the 20 s first-byte timeout could have fired
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let health = client()
        .get(format!("{}/health/upstream", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
}

#[tokio::test]
async fn slow_first_byte_is_a_504() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml = standard_config(&mock.url(), "")
        .replace("first_byte_timeout: 20s", "first_byte_timeout: 1s");
    let gw = Gateway::start(&yaml);
    let resp = post_chat(
        &gw,
        KEY,
        chat("qwen", true),
        &[("x-mock-first-token-delay-ms", "4000")],
    )
    .await;
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let (_mock, gw) = setup("").await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        Some(KEY),
        r#"{"model":"qwen"}"#,
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "'messages' is required");
}

#[tokio::test]
async fn upstream_stream_cut_ends_with_an_sse_error_and_no_done() {
    let (_mock, gw) = setup("").await;
    let resp = post_chat(
        &gw,
        KEY,
        chat("qwen", true),
        &[("x-mock-fault", "cut-mid-stream"), ("x-mock-tokens", "10")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn upstream_key_is_sent_instead_of_the_clients() {
    let mock = MockLlama::start(MockOptions {
        api_key: Some("llama-secret".into()),
        ..MockOptions::default()
    })
    .await;
    let yaml = standard_config(&mock.url(), "").replace(
        "  connect_timeout: 2s",
        "  api_key: llama-secret\n  connect_timeout: 2s",
    );
    let gw = Gateway::start(&yaml);
    let resp = post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.last_request().unwrap().header("authorization"),
        Some("Bearer llama-secret")
    );
    // passthrough routes get it too
    let other = client()
        .get(format!("{}/v1/models-extra", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        404,
        "reached the mock with its key (a 401 would mean it was missing)"
    );
}

#[tokio::test]
async fn pooled_connections_survive_llama_servers_keep_alive_limits() {
    let (mock, gw) = setup("").await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(KEY)
            .body(chat("qwen", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(mock.connections(), 1, "the upstream connection is reused");
    // llama-server drops idle connections after 5 s.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let r = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .body(chat("qwen", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // ... and every connection after 100 requests.
    for i in 0..150 {
        let r = c
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(KEY)
            .body(chat("qwen", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert!(mock.connections() >= 2);
}

#[tokio::test]
async fn garbage_does_not_stop_the_gateway() {
    let (_mock, gw) = setup("").await;
    for junk in [
        &b"\x16\x03\x01\x02\x00garbage"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(junk).await;
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn health_upstream_follows_llama_server_loading() {
    let (mock, gw) = setup("").await;
    let c = client();
    mock.set_loading(true);
    let resp = c
        .get(format!("{}/health/upstream", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "loading");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Loading model"),
        "{v}"
    );
    // requests meanwhile get llama-server's own 503, unchanged
    let r = post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false)).await;
    assert_eq!(r.status(), 503);
    mock.set_loading(false);
    let resp = c
        .get(format!("{}/health/upstream", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_global_body_budget_turns_excess_into_503() {
    let (mock, gw) =
        setup("limits:\n  max_body_bytes: 1000000\n  max_buffered_body_bytes: 1500000\n").await;
    // One client declares 900 kB and has sent 800 kB of it: those bytes are
    // reserved (what arrived, not what was declared).
    let body = sized_body(900_000);
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..800_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second large body does not fit in what is left.
    let resp = post(&gw, "/v1/chat/completions", Some(KEY), sized_body(900_000)).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let (status, err) = error_of(resp).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (503, Some("gateway_overloaded"))
    );
    // A small one still does.
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false))
            .await
            .status(),
        200
    );
    // The slow client finishes and is served.
    slow.write_all(&body.as_bytes()[800_000..]).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn total_timeout_caps_a_long_stream() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), "").replace(
        "  pool_idle_timeout: 4s",
        "  pool_idle_timeout: 4s\n  total_timeout: 1s",
    ));
    let resp = post_chat(
        &gw,
        KEY,
        chat("qwen", true),
        &[("x-mock-delay-ms", "100"), ("x-mock-tokens", "100")],
    )
    .await;
    let text = resp.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(text.contains("upstream.total_timeout"), "{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mock.aborted(),
        1,
        "the cut generation is cancelled upstream"
    );
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_is_timed_out() {
    let (mock, gw) = setup("downstream:\n  read_timeout: 1s\n").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 408") && text.contains("read_timeout"),
        "{text}"
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn cors_preflight_and_responses() {
    let (_mock, gw) = setup("cors:\n  allowed_origins: ['http://chat.example:3000']\n").await;
    let c = client();
    let pre = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", gw.url()),
        )
        .header("Origin", "http://chat.example:3000")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        pre.status(),
        204,
        "a preflight is never 405 and needs no key"
    );
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "http://chat.example:3000"
    );
    assert!(pre.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(
        pre.headers()["access-control-allow-headers"],
        "authorization,content-type"
    );

    let other = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", gw.url()),
        )
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 204);
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // The refusal is logged as one, with the origin to add if it is wanted.
    eventually("the refused preflight's log line", || {
        gw.log().lines().any(|l| {
            l.contains("\"OPTIONS /v1/chat/completions\" 204")
                && l.ends_with("cors=refused origin=http://evil.example")
        })
    })
    .await;
    let allowed_line = |l: &&str| l.contains("\"OPTIONS") && !l.contains("cors=refused");
    assert_eq!(gw.log().lines().filter(allowed_line).count(), 1);
    // One `Vary: Origin`, on a preflight and on a real answer.
    for resp in [&pre, &other] {
        let vary: Vec<_> = resp.headers().get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin"]);
    }

    // Real responses carry our policy, never llama-server's empty header.
    let resp = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .header("Origin", "http://chat.example:3000")
        .body(chat("qwen", true))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://chat.example:3000"
    );
    assert_eq!(
        resp.headers()
            .get_all("access-control-allow-origin")
            .iter()
            .count(),
        1
    );
    assert_eq!(resp.headers().get_all("vary").iter().count(), 1);
    let plain = post(&gw, "/v1/chat/completions", Some(KEY), chat("qwen", false)).await;
    assert!(
        plain.headers().get("access-control-allow-origin").is_none(),
        "llama-server's empty header leaked"
    );
    // Errors are readable by the page too.
    let denied = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("Origin", "http://chat.example:3000")
        .body(chat("qwen", false))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(
        denied.headers()["access-control-allow-origin"],
        "http://chat.example:3000"
    );
    assert!(denied.headers()["x-request-id"]
        .to_str()
        .is_ok_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn json_access_log_lines_parse_and_never_hold_a_key() {
    let (_mock, gw) = setup("logging:\n  access_log_format: json\n").await;
    let c = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    assert_eq!(
        post_chat(&gw, KEY, chat("qwen", false), &[]).await.status(),
        200
    );
    // Keys in every place a client puts them: header, x-api-key, the query.
    let wrong = "sk-wrong-key-in-the-header";
    assert_eq!(
        post_chat(&gw, wrong, chat("qwen", false), &[])
            .await
            .status(),
        401
    );
    let x_api_key = c
        .post(&url)
        .header("x-api-key", KEY)
        .body(chat("qwen", false));
    assert_eq!(x_api_key.send().await.unwrap().status(), 200);
    let in_query = c
        .post(format!("{url}?api_key={KEY}&key={KEY}"))
        .bearer_auth(KEY)
        .body(chat("qwen", false));
    in_query.send().await.unwrap();
    let refused = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "http://page.example");
    assert_eq!(refused.send().await.unwrap().status(), 204);

    let access = || -> Vec<Value> {
        gw.log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    eventually("five access-log lines", || access().len() == 5).await;
    let log = gw.log();
    for secret in [KEY, wrong] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    let lines = access();
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["route"], "chat_completions");
    assert_eq!(lines[0]["key"], "alice");
    assert_eq!(lines[0]["model"], "qwen3");
    assert!(lines[0]["duration_ms"].is_u64() && lines[0]["request_id"].is_string());
    assert_eq!(lines[1]["status"], 401);
    assert_eq!(lines[1]["key"], "invalid");
    assert_eq!(lines[1]["error"], "invalid_api_key");
    assert_eq!(
        lines[3]["path"], "/v1/chat/completions",
        "the query is never logged"
    );
    assert_eq!(lines[4]["cors"], "refused");
    assert_eq!(lines[4]["origin"], "http://page.example");
    // Every other line keeps its text form.
    assert!(log
        .lines()
        .any(|l| !l.starts_with('{') && l.contains("INFO")));
}

#[tokio::test]
async fn request_ids_are_kept_or_generated() {
    let (mock, gw) = setup("").await;
    let resp = post_chat(
        &gw,
        KEY,
        chat("qwen", false),
        &[("X-Request-Id", "trace-abc.123")],
    )
    .await;
    assert_eq!(resp.headers()["x-request-id"], "trace-abc.123");
    assert_eq!(
        mock.last_request().unwrap().header("x-request-id"),
        Some("trace-abc.123")
    );
    let bad = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("X-Request-Id", "has spaces; and {braces}")
        .body(chat("qwen", false))
        .send()
        .await
        .unwrap();
    let id = bad.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() >= 16 && !id.contains(' '));
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.log().contains(&format!("request_id={id}")));
}
