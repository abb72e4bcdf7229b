//! What the integration tests send to the gateway and read back: request
//! bodies, a client, raw HTTP exchanges, error bodies, scrapes, and a bounded
//! `eventually` for waiting on something that happens in the background.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::gateway::Gateway;

/// How long `eventually` waits before it fails the test.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// A client whose requests give up after a minute (a hung test fails, not hangs).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A chat completion request for `model` with one user message, `"hello"`.
pub fn chat(model: &str, stream: bool) -> String {
    chat_saying(model, "hello", stream)
}

/// A chat completion request for `model` with one user message, `content`.
pub fn chat_saying(model: &str, content: &str, stream: bool) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream})
        .to_string()
}

/// `POST {path}` with a JSON body, and the key as bearer token when given.
pub async fn post(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{path}", gw.url()))
        .header("Content-Type", "application/json")
        .body(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

/// `GET {path}` with `key` as bearer token.
pub async fn get(gw: &Gateway, path: &str, key: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", gw.url()))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// The status and body of an error answer, after checking that the body is
/// an OpenAI-style error (`error.message` and `error.type` are strings).
pub async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    (status, body)
}

/// The status code of a raw HTTP/1.1 response text (0 when there is none).
pub fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes `request` on a new connection and reads until the peer closes (at
/// most 5 s): the whole response text.
pub async fn raw_to_close(gw: &Gateway, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The sum of every sample of `name` in a Prometheus scrape whose labels
/// contain all of `labels` (each a `key="value"` text).
pub fn metric(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// Polls `check` every 20 ms until it holds; fails the test after `within`.
pub async fn eventually_within(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds; fails the test after [`EVENTUALLY`].
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(EVENTUALLY, what, check).await;
}

/// Like [`eventually`], for a check that has to await (a scrape, a request).
pub async fn eventually_async(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The kB value of `field` (e.g. `VmRSS:`) in `/proc/{pid}/status`.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// How many file descriptors `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `POST /v1/chat/completions` with `key` as bearer token, `body` as is, and
/// the extra `headers` (e.g. the mock's `x-mock-*` controls).
pub async fn post_chat(
    gw: &Gateway,
    key: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}
