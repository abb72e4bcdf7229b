//! Per-key limits, the global cap and slot-aware admission, through the real binary.

mod support;

use std::sync::Arc;
use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};
use serde_json::{json, Value};
use support::gateway::{sha256_hex, Gateway};

const A: &str = "sk-limits-a";
const B: &str = "sk-limits-b";

fn config(upstream: &str, a_limits: &str, extra: &str) -> String {
    format!(
        "upstream:\n  url: {upstream}\nmodels:\n  - name: qwen\nkeys:\n  - id: a\n    sha256: {}\n    limits:\n{a_limits}  - id: b\n    sha256: {}\n{extra}",
        sha256_hex(A),
        sha256_hex(B)
    )
}

fn chat(extra: Value) -> String {
    let mut body = json!({"model": "qwen", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

async fn post(
    gw: &Gateway,
    key: &str,
    body: String,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn error_code(resp: reqwest::Response) -> (u16, Option<String>, String) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    (
        status,
        retry,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn requests_per_minute() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&mock.url(), "      requests_per_minute: 3\n", ""));
    for _ in 0..3 {
        assert_eq!(post(&gw, A, chat(json!({})), &[]).await.status(), 200);
    }
    let (status, retry, code) = error_code(post(&gw, A, chat(json!({})), &[]).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!(
        (1..=20).contains(&retry),
        "a token comes back every 20 s: {retry}"
    );
    assert_eq!(
        mock.requests().len(),
        3,
        "refused requests never reach the upstream"
    );
    assert_eq!(
        post(&gw, B, chat(json!({})), &[]).await.status(),
        200,
        "other keys are not limited"
    );
    let scrape = gw.scrape().await;
    assert!(
        scrape.contains(r#"llm_edge_rate_limited_total{key="a",reason="key_rate"} 1"#),
        "{scrape}"
    );
}

#[tokio::test]
async fn concurrent_requests_per_key_and_globally() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Arc::new(Gateway::start(&config(
        &mock.url(),
        "      max_concurrent: 2\n",
        "limits:\n  max_concurrent_requests: 3\n",
    )));
    let slow = |key: &'static str| {
        let gw = gw.clone();
        tokio::spawn(async move {
            post(
                &gw,
                key,
                chat(json!({})),
                &[("x-mock-first-token-delay-ms", "1500")],
            )
            .await
            .status()
        })
    };
    let (a1, a2) = (slow(A), slow(A));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, retry, code) = error_code(post(&gw, A, chat(json!({})), &[]).await).await;
    assert_eq!(
        (status, retry.as_deref(), code.as_str()),
        (429, Some("1"), "rate_limit_exceeded")
    );
    let b1 = slow(B);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a has 2, b has 1: the global cap of 3 is reached
    let (status, _, _) = error_code(post(&gw, B, chat(json!({})), &[]).await).await;
    assert_eq!(status, 429);
    for t in [a1, a2, b1] {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        post(&gw, A, chat(json!({})), &[]).await.status(),
        200,
        "slots come back"
    );
    let scrape = gw.scrape().await;
    assert!(
        scrape.contains(r#"reason="key_concurrency""#)
            && scrape.contains(r#"reason="global_concurrency""#)
    );
}

#[tokio::test]
async fn max_tokens_ceiling_clamps_or_rejects() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&mock.url(), "      max_tokens: 100\n", ""));
    assert_eq!(
        post(&gw, A, chat(json!({"max_tokens": 5000})), &[])
            .await
            .status(),
        200
    );
    assert_eq!(mock.last_request().unwrap().json()["max_tokens"], 100);
    post(&gw, A, chat(json!({})), &[]).await;
    assert_eq!(
        mock.last_request().unwrap().json()["max_tokens"],
        100,
        "inserted when absent"
    );
    post(&gw, A, chat(json!({"max_tokens": 7})), &[]).await;
    assert_eq!(
        mock.last_request().unwrap().json()["max_tokens"],
        7,
        "below the ceiling: untouched"
    );
    drop(gw);

    let gw = Gateway::start(&config(
        &mock.url(),
        "      max_tokens: 100\n      over_max_tokens: reject\n",
        "",
    ));
    let before = mock.requests().len();
    let resp = post(&gw, A, chat(json!({"max_tokens": 5000})), &[]).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "max_tokens");
    assert!(body["error"]["message"].as_str().unwrap().contains("100"));
    assert_eq!(mock.requests().len(), before);
}

#[tokio::test]
async fn slot_admission_never_exceeds_the_limit_and_serves_in_order() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml = format!(
        "upstream:\n  url: {}\n  max_in_flight: 2\n  queue_timeout: 60s\nmodels:\n  - name: qwen\nkeys:\n  - id: a\n    sha256: {}\n",
        mock.url(),
        sha256_hex(A)
    );
    let gw = Arc::new(Gateway::start(&yaml));
    let clients = 20; // 10x the slots
    let mut tasks = Vec::new();
    for i in 0..clients {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("q-{i:02}");
            let resp = post(
                &gw,
                A,
                chat(json!({"stream": true})),
                &[
                    ("x-request-id", &id),
                    ("x-mock-tokens", "5"),
                    ("x-mock-delay-ms", "40"),
                ],
            )
            .await;
            (resp.status(), resp.text().await.unwrap())
        }));
        // arrive in a defined order
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let mut depth_seen = 0;
    for _ in 0..10 {
        let s = gw.scrape().await;
        let depth: f64 = s
            .lines()
            .find(|l| l.starts_with("llm_edge_queue_depth{"))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        depth_seen = depth_seen.max(depth as usize);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    assert!(
        mock.max_active() <= 2,
        "the upstream saw {} at once",
        mock.max_active()
    );
    assert_eq!(mock.max_active(), 2);
    let order: Vec<String> = mock
        .requests()
        .iter()
        .filter_map(|r| r.header("x-request-id").map(str::to_string))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "queued requests are served in arrival order");
    assert!(depth_seen >= 5, "queue depth metric: {depth_seen}");
    assert!(gw
        .scrape()
        .await
        .contains("llm_edge_queue_wait_seconds_count 20"));
}

#[tokio::test]
async fn a_full_or_slow_queue_answers_503_with_retry_after() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml = format!(
        "upstream:\n  url: {}\n  max_in_flight: 1\n  queue_timeout: 1s\n  max_queued: 1\nmodels:\n  - name: qwen\nkeys:\n  - id: a\n    sha256: {}\n",
        mock.url(),
        sha256_hex(A)
    );
    let gw = Arc::new(Gateway::start(&yaml));
    let holder = {
        let gw = gw.clone();
        tokio::spawn(async move {
            post(
                &gw,
                A,
                chat(json!({})),
                &[("x-mock-first-token-delay-ms", "3000")],
            )
            .await
            .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = {
        let gw = gw.clone();
        tokio::spawn(async move { error_code(post(&gw, A, chat(json!({})), &[]).await).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, retry, code) = error_code(post(&gw, A, chat(json!({})), &[]).await).await;
    assert_eq!(
        (status, retry.as_deref(), code.as_str()),
        (503, Some("2"), "upstream_busy"),
        "queue full"
    );
    let (status, retry, code) = queued.await.unwrap();
    assert_eq!(
        (status, retry.as_deref(), code.as_str()),
        (503, Some("2"), "upstream_busy"),
        "queue timeout"
    );
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(mock.requests().len(), 1);
    let s = gw.scrape().await;
    assert!(
        s.contains(r#"reason="queue_full""#) && s.contains(r#"reason="queue_timeout""#),
        "{s}"
    );
}
