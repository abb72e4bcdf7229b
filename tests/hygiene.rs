//! HTTP hygiene, abuse before auth and the security pass, against the real binary.

mod support;

use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};
use serde_json::{json, Value};
use support::gateway::{standard_config, Gateway, KEY};
use support::http::get;
use support::http::status_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw bytes and returns what comes back within a few seconds.
async fn raw(gw: &Gateway, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 64 {
                    // enough for the status line and headers; the body follows quickly
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
                    {
                        out.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn smuggling_vectors_get_a_clear_400_and_never_reach_the_upstream() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    let body = r#"{"model":"qwen","messages":[]}"#;
    let cases = [
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", body.len()),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\n{body}", body.len()),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nX-Folded: a\r\n b\r\n\r\n{body}", body.len()),
        format!("GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {KEY}\r\n\r\n"),
        format!("GET /v1/%2e%2e/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"),
        format!("GET /v1/..%2Fadmin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"),
        format!("GET /v1/../health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"),
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nX-Big: {}\r\n\r\n", "a".repeat(200_000)),
    ];
    for case in &cases {
        let response = raw(&gw, case.as_bytes()).await;
        let status = status_of(&response);
        let shown = &case[..case.len().min(120)];
        assert!((400..500).contains(&status), "{shown:?} got: {response:?}");
    }
    assert!(
        mock.requests().is_empty(),
        "nothing reached the upstream: {:?}",
        mock.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    // the gateway keeps serving
    let ok = raw(&gw, format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes()).await;
    assert_eq!(status_of(&ok), 200, "{ok}");
}

#[tokio::test]
async fn our_400s_explain_themselves() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    let response = raw(
        &gw,
        format!("GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{response}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("encoded dots"),
        "{v}"
    );
    let response = raw(
        &gw,
        format!(
            "GET http://x/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(response.contains("absolute-form"), "{response}");
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_ip() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(
        &mock.url(),
        "downstream:\n  max_auth_failures_per_minute: 5\n",
    ));
    let c = reqwest::Client::new();
    for _ in 0..5 {
        let r = get(&gw, "/v1/models", "sk-guess").await;
        assert_eq!(r.status(), 401);
    }
    let r = get(&gw, "/v1/models", "sk-guess").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    // a valid key from the same address (a NAT, an office) is never locked
    // out by someone else's failures: only failing keys are throttled
    let r = get(&gw, "/v1/models", KEY).await;
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .body(json!({"model":"qwen","messages":[]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v1/models", gw.url()))
        .header("x-api-key", "sk-guess-again")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "a failing key is still throttled");
    assert_eq!(
        c.get(format!("{}/health", gw.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let scrape = gw.scrape().await;
    assert!(scrape.contains(r#"reason="ip_auth_failures""#), "{scrape}");
}

#[tokio::test]
async fn concurrent_requests_per_ip_are_capped() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = std::sync::Arc::new(Gateway::start(&standard_config(
        &mock.url(),
        "downstream:\n  max_concurrent_per_ip: 2\n",
    )));
    let slow = || {
        let gw = gw.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", gw.url()))
                .bearer_auth(KEY)
                .header("x-mock-first-token-delay-ms", "1000")
                .body(json!({"model":"qwen","messages":[]}).to_string())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let (a, b) = (slow(), slow());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        (a.await.unwrap(), b.await.unwrap()),
        (reqwest::StatusCode::OK, reqwest::StatusCode::OK)
    );
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn forwarded_for_is_trusted_only_from_configured_proxies() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let c = reqwest::Client::new();
    let untrusted = Gateway::start(&standard_config(&mock.url(), ""));
    c.get(format!("{}/health", untrusted.url()))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    let trusted = Gateway::start(&standard_config(
        &mock.url(),
        "downstream:\n  trusted_proxies: [127.0.0.1]\n",
    ));
    c.get(format!("{}/health", trusted.url()))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        untrusted.log().contains("127.0.0.1 \"GET /health\""),
        "{}",
        untrusted.log()
    );
    assert!(!untrusted.log().contains("203.0.113.7"));
    assert!(
        trusted.log().contains("203.0.113.7 \"GET /health\""),
        "{}",
        trusted.log()
    );
}

#[tokio::test]
async fn no_secret_ever_reaches_a_log_line_or_a_metric() {
    let mock = MockLlama::start(MockOptions {
        api_key: Some("sk-upstream-secret".into()),
        ..MockOptions::default()
    })
    .await;
    let yaml = standard_config(&mock.url(), "").replace(
        "  connect_timeout: 2s",
        "  api_key: sk-upstream-secret\n  connect_timeout: 2s",
    );
    // Pingora's debug and trace lines dump whole headers: no level may print a secret.
    for level in ["info", "debug", "trace"] {
        let gw = Gateway::start_with_env(&yaml, &[("RUST_LOG", level)]);
        let c = reqwest::Client::new();
        for key in [KEY, "sk-wrong-secret", ""] {
            let _ = c
                .post(format!("{}/v1/chat/completions", gw.url()))
                .header("Authorization", format!("Bearer {key}"))
                .body(json!({"model":"qwen","messages":[],"stream":true}).to_string())
                .send()
                .await
                .unwrap()
                .text()
                .await;
        }
        let _ = c
            .post(format!("{}/v1/messages?key=sk-query-secret", gw.url()))
            .header("x-api-key", KEY)
            .body(json!({"model":"qwen","max_tokens":2,"messages":[]}).to_string())
            .send()
            .await
            .unwrap()
            .text()
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = gw.log();
        let scrape = gw.scrape().await;
        let digest = llm_edge::policy::auth::digest_hex(KEY);
        for secret in [
            KEY,
            "sk-wrong-secret",
            "sk-upstream-secret",
            "sk-query-secret",
            digest.as_str(),
            "Bearer",
        ] {
            assert!(
                !log.contains(secret),
                "{level}: {secret} in the log:\n{log}"
            );
            assert!(!scrape.contains(secret), "{secret} in the metrics");
        }
        assert!(log.contains("key=alice") && log.contains("key=invalid"));
        if level == "trace" {
            assert!(
                log.contains("withheld"),
                "the header dumps were seen and withheld"
            );
        }
    }
}
