//! Fault injection against the real `llm-edge` binary: upstream faults
//! (resets, hangs, broken framing, HTML errors, silent tunnels) and client
//! faults (slowloris headers, unfinished bodies, clients that never read,
//! thousands of dropped connections). After each fault the client got a
//! clean, prompt outcome, the metrics say what happened, and the gateway
//! still serves.
//!
//! Every loop is bounded in count and time; everything is on loopback.
//! "Prompt" bounds are generous and far from the configured timeouts.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_llama::{reply_text, token_text, MockLlama, MockOptions, MALFORMED_SSE_FRAMES};
use serde_json::{json, Value};
use support::gateway::{standard_config, Gateway, KEY};
use support::http::{client, error_of, eventually_within, fd_count, metric, proc_status_kb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far below every configured timeout that matters here (20 s unless a
/// test shortens one), yet generous for a busy machine.
const PROMPT: Duration = Duration::from_secs(10);

fn chat(stream: bool) -> String {
    support::http::chat("qwen", stream)
}

async fn setup(replace: &[(&str, &str)], extra: &str) -> (MockLlama, Gateway) {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&mock.url(), replace, extra));
    (mock, gw)
}

/// `standard_config` with some of its lines replaced (e.g. a shorter timeout).
fn config(upstream: &str, replace: &[(&str, &str)], extra: &str) -> String {
    let mut yaml = standard_config(upstream, extra);
    for (from, to) in replace {
        assert!(yaml.contains(from), "standard_config has no {from:?}");
        yaml = yaml.replace(from, to);
    }
    yaml
}

async fn post(gw: &Gateway, stream: bool, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .header("Content-Type", "application/json")
        .body(chat(stream));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// The whole body as text, however it ends (bounded by [`PROMPT`]).
async fn read_to_end(resp: reqwest::Response) -> (String, Option<reqwest::Error>) {
    let mut s = resp.bytes_stream();
    let mut all = Vec::new();
    let mut failure = None;
    let read = tokio::time::timeout(PROMPT, async {
        while let Some(chunk) = s.next().await {
            match chunk {
                Ok(c) => all.extend_from_slice(&c),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the client was left hanging: {all:?}");
    (String::from_utf8_lossy(&all).into_owned(), failure)
}

/// A broken stream's outcome: no `[DONE]`, and a last event `data: {"error":...}`.
fn assert_cut_with_error_event(text: &str) -> Value {
    assert!(
        !text.contains("[DONE]"),
        "a cut stream must not look complete: {text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = last
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("last event is not data: {last}"));
    let event: Value = serde_json::from_str(data).unwrap_or_else(|_| panic!("not JSON: {last}"));
    assert!(
        event["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{event}"
    );
    assert!(event["error"]["request_id"].is_string(), "{event}");
    event
}

/// The gateway still serves: a normal reply and a normal stream.
async fn still_serving(gw: &Gateway) {
    let r = post(gw, false, &[]).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], reply_text(8));
    let r = post(gw, true, &[]).await;
    assert_eq!(r.status(), 200);
    let (text, failure) = read_to_end(r).await;
    assert!(failure.is_none(), "{failure:?}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

/// After the fault: no stream counted as still running, nothing in flight.
async fn settled(gw: &Gateway) {
    let deadline = Instant::now() + PROMPT;
    loop {
        let m = gw.scrape().await;
        let (streams, in_flight) = (
            metric(&m, "llm_edge_streams_active", &[]),
            metric(&m, "llm_edge_requests_in_flight", &[]),
        );
        if streams == 0.0 && in_flight == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "streams_active {streams}, requests_in_flight {in_flight}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Once [`settled`], asserts that exactly one `name` sample with `labels` was counted.
async fn settled_counted_once(gw: &Gateway, name: &str, labels: &[&str]) {
    settled(gw).await;
    let m = gw.scrape().await;
    assert_eq!(metric(&m, name, labels), 1.0, "{name} {labels:?} in:\n{m}");
}

fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:")
}

/// Stands in for the SSH tunnel's listening end on the gateway's machine:
/// it forwards to llama-server, or accepts and never answers (reading the
/// request, or not even that).
struct Tunnel {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    accepted: Arc<AtomicUsize>,
}

const FORWARD: u8 = 0;
/// Reads whatever comes, never writes a byte.
const SILENT: u8 = 1;
/// Accepts, then neither reads nor writes.
const STUCK: u8 = 2;

impl Tunnel {
    async fn start(target: SocketAddr, mode: u8) -> Tunnel {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnel = Tunnel {
            addr,
            mode: Arc::new(AtomicU8::new(mode)),
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        let (mode, accepted) = (tunnel.mode.clone(), tunnel.accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let mode = mode.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    // Bounded: nothing here outlives a test by much.
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        match mode {
                            FORWARD => {
                                let mut up = TcpStream::connect(target).await?;
                                tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
                            }
                            SILENT => {
                                let mut buf = vec![0u8; 64 * 1024];
                                while conn.read(&mut buf).await? > 0 {}
                            }
                            _ => {
                                let mut probe = [0u8; 1];
                                // Never reads: waits for the peer's close (or the bound).
                                let _ = conn.peek(&mut probe).await;
                                std::future::pending::<()>().await;
                            }
                        }
                        Ok::<(), std::io::Error>(())
                    })
                    .await;
                });
            }
        });
        tunnel
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- upstream faults

#[tokio::test]
async fn upstream_reset_mid_response() {
    let (mock, gw) = setup(&[], "").await;

    // A stream: half the tokens, then an RST.
    let started = Instant::now();
    let resp = post(
        &gw,
        true,
        &[
            ("x-mock-fault", "reset-mid-stream"),
            ("x-mock-tokens", "10"),
            ("x-mock-delay-ms", "20"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, _) = read_to_end(resp).await;
    assert!(started.elapsed() < PROMPT);
    assert!(text.contains(&token_text(4)), "{text}");
    assert!(!text.contains(&token_text(5)), "{text}");
    let event = assert_cut_with_error_event(&text);
    assert_eq!(event["error"]["code"], "upstream_error");

    // A JSON reply: half its Content-Length, then an RST. It is read whole
    // before anything is written, so the client gets an error, never a
    // short body that looks complete.
    let resp = post(&gw, false, &[("x-mock-fault", "reset-mid-stream")]).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");

    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[r#"kind="reset""#]),
        2.0,
        "{m}"
    );
    assert_eq!(mock.completed(), 0);
    still_serving(&gw).await;
}

#[tokio::test]
async fn upstream_hang_after_headers_hits_the_idle_timeout() {
    let (mock, gw) = setup(&[("idle_timeout: 20s", "idle_timeout: 1s")], "").await;
    let started = Instant::now();
    let resp = post(&gw, true, &[("x-mock-fault", "hang-after-headers")]).await;
    assert_eq!(resp.status(), 200, "the header came before the hang");
    let (text, _) = read_to_end(resp).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < PROMPT,
        "{took:?}"
    );
    let event = assert_cut_with_error_event(&text);
    assert_eq!(event["error"]["code"], "upstream_timeout");
    assert!(
        event["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream.idle_timeout"),
        "{event}"
    );
    // The stuck generation is cancelled upstream (its connection dropped).
    eventually_within(PROMPT, "the upstream sees the cancel", || {
        mock.aborted() == 1
    })
    .await;

    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[r#"kind="timeout""#]),
        1.0,
        "{m}"
    );
    still_serving(&gw).await;
}

#[tokio::test]
async fn malformed_sse_passes_through_untouched() {
    let (_mock, gw) = setup(&[], "").await;
    let resp = post(
        &gw,
        true,
        &[("x-mock-fault", "malformed-sse"), ("x-mock-tokens", "3")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, failure) = read_to_end(resp).await;
    assert!(failure.is_none(), "{failure:?}");
    let odd = MALFORMED_SSE_FRAMES.concat();
    assert!(
        text.contains(&odd),
        "odd frames were altered:\n{text}\n--- expected ---\n{odd}"
    );
    assert!(text.contains(&token_text(2)), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("request_id"),
        "no gateway error event: {text}"
    );

    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(metric(&m, "llm_edge_upstream_errors_total", &[]), 0.0);
    assert_eq!(
        metric(&m, "llm_edge_requests_total", &[r#"code="200""#]),
        1.0
    );
    still_serving(&gw).await;
}

#[tokio::test]
async fn broken_chunked_encoding_cuts_the_stream_promptly() {
    let (mock, gw) = setup(&[], "").await;
    let started = Instant::now();
    let resp = post(
        &gw,
        true,
        &[("x-mock-fault", "bad-chunk-size"), ("x-mock-tokens", "10")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, _) = read_to_end(resp).await;
    // The mock keeps the connection open for 30 s: only the bad framing ends it.
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    assert!(text.contains(&token_text(4)), "{text}");
    assert!(
        !text.contains("not\":\"a chunk"),
        "bytes after a bad chunk size must not reach the client: {text}"
    );
    let event = assert_cut_with_error_event(&text);
    assert_eq!(event["error"]["code"], "upstream_error");
    // The connection with broken framing is closed, never pooled.
    eventually_within(PROMPT, "the upstream connection is closed", || {
        mock.aborted() == 1
    })
    .await;

    settled_counted_once(
        &gw,
        "llm_edge_upstream_errors_total",
        &[r#"kind="invalid_response""#],
    )
    .await;
    still_serving(&gw).await;
}

#[tokio::test]
async fn html_500_becomes_a_json_error_with_its_status_and_an_excerpt() {
    let (_mock, gw) = setup(&[], "").await;
    let html = "<html><body><h1>500 Internal Server Error</h1></body></html>";
    for stream in [false, true] {
        let resp = post(&gw, stream, &[("x-mock-fault", "html-500")]).await;
        assert_eq!(resp.status(), 500);
        let h = resp.headers();
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{h:?}"
        );
        assert!(h.get("x-request-id").is_some());
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_response", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(html),
            "{body}"
        );
    }
    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[r#"kind="5xx""#]),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llm_edge_requests_total", &[r#"code="500""#]),
        2.0
    );
    still_serving(&gw).await;
}

#[tokio::test]
async fn upstream_closing_without_done_is_never_a_complete_stream() {
    let (_mock, gw) = setup(&[], "").await;
    // `cut-mid-stream`: chunked, the connection closes without the last chunk.
    // `eof-without-done`: close-delimited, a clean FIN, no `[DONE]`.
    for fault in ["cut-mid-stream", "eof-without-done"] {
        let started = Instant::now();
        let resp = post(
            &gw,
            true,
            &[("x-mock-fault", fault), ("x-mock-tokens", "10")],
        )
        .await;
        assert_eq!(resp.status(), 200, "{fault}");
        let (text, _) = read_to_end(resp).await;
        assert!(started.elapsed() < PROMPT, "{fault}");
        assert!(text.contains(&token_text(4)), "{fault}: {text}");
        let event = assert_cut_with_error_event(&text);
        assert_eq!(event["error"]["code"], "upstream_error", "{fault}");
    }
    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[r#"kind="reset""#]),
        2.0,
        "{m}"
    );
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_tunnel_that_accepts_and_never_answers_is_a_504() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let tunnel = Tunnel::start(mock.addr, SILENT).await;
    let gw = Gateway::start(&config(
        &tunnel.url(),
        &[("first_byte_timeout: 20s", "first_byte_timeout: 1s")],
        "",
    ));

    for stream in [false, true] {
        let started = Instant::now();
        let (status, body) = error_of(post(&gw, stream, &[]).await).await;
        let took = started.elapsed();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (504, Some("upstream_timeout")),
            "{body}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < PROMPT,
            "{took:?}"
        );
    }
    // A body larger than every socket buffer, to a tunnel that does not even
    // read: the request cannot be sent, and still the client hears back.
    tunnel.set(STUCK);
    let big =
        json!({"model": "qwen", "messages": [{"role": "user", "content": "x".repeat(24 << 20)}]})
            .to_string();
    let started = Instant::now();
    let send = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .body(big)
        .send();
    let resp = tokio::time::timeout(Duration::from_secs(30), send)
        .await
        .expect("the client was left hanging while the request could not be sent")
        .unwrap();
    let took = started.elapsed();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 504, "{body}");
    assert!(took < PROMPT, "{took:?}");

    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[r#"kind="timeout""#]),
        3.0,
        "{m}"
    );
    assert_eq!(metric(&m, "llm_edge_upstream_up", &[]), 0.0, "{m}");
    assert!(mock.requests().is_empty());

    // llama-server answers again behind the tunnel: served, no restart.
    tunnel.set(FORWARD);
    still_serving(&gw).await;
    assert_eq!(mock.requests().len(), 2);
}

// ---------------------------------------------------------------- client faults

/// Sends `bytes` one at a time, `gap` apart; false when the gateway closed first.
async fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) -> bool {
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            return false;
        }
        tokio::time::sleep(gap).await;
    }
    true
}

/// Waits (bounded) for the gateway to end the connection; returns what it sent
/// before closing, or None if it was still open at the bound.
async fn closed_by_gateway(s: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slowloris_headers_are_timed_out_while_others_are_served() {
    let (mock, gw) = setup(&[], "downstream:\n  read_timeout: 1s\n").await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 10\r\n\r\n"
    );
    // 16 clients trickle the start of a request header byte by byte, then go quiet.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let head = head.clone();
        let addr = gw.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let sent_all =
                trickle(&mut s, &head.as_bytes()[..12], Duration::from_millis(150)).await;
            assert!(sent_all, "closed while the client was still sending");
            let paused = Instant::now();
            // Pingora's own header timeout is 60 s; ours is 1 s.
            let closed = closed_by_gateway(&mut s, Duration::from_secs(15)).await;
            (closed.is_some(), paused.elapsed())
        }));
    }
    // Meanwhile everybody else is served, promptly.
    for _ in 0..10 {
        let started = Instant::now();
        let r = post(&gw, false, &[]).await;
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < PROMPT);
    }
    for handle in slow {
        let (closed, after) = handle.await.unwrap();
        assert!(closed, "a client silent mid-header was not timed out");
        assert!(
            after >= Duration::from_millis(800) && after < Duration::from_secs(10),
            "closed {after:?} after the client went quiet (read_timeout is 1 s)"
        );
    }
    assert_eq!(
        mock.requests().len(),
        10,
        "slow headers never reach upstream"
    );
    settled(&gw).await;
    still_serving(&gw).await;
}

#[tokio::test]
async fn a_body_that_never_finishes_is_timed_out_and_never_forwarded() {
    let (mock, gw) = setup(&[], "downstream:\n  read_timeout: 1s\n").await;
    let declared = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n{{\"model\":\"qwen\",\"messages\":["
    );
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{{\"model\":\"qwen\",\r\n"
    );
    // Each sends a few more body bytes, slowly, then nothing.
    for (head, more) in [(declared, &b"{\"role\""[..]), (chunked, b"8\r\n{\"role\"")] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        assert!(trickle(&mut s, more, Duration::from_millis(200)).await);
        let paused = Instant::now();
        let reply = closed_by_gateway(&mut s, Duration::from_secs(15))
            .await
            .expect("an unfinished body was not timed out");
        let after = paused.elapsed();
        assert!(after < Duration::from_secs(10), "{after:?}");
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.starts_with("HTTP/1.1 408") && text.contains("read_timeout"),
            "{text}"
        );
    }
    assert!(
        mock.requests().is_empty(),
        "an unfinished body reached the upstream"
    );
    settled(&gw).await;
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_requests_total", &[r#"code="408""#]),
        2.0,
        "{m}"
    );
    still_serving(&gw).await;
}

/// Sends a streaming request on a raw socket and reads only the response header.
async fn open_unread_stream(gw: &Gateway, headers: &str) -> TcpStream {
    let body = chat(true);
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(PROMPT, s.read_exact(&mut head))
        .await
        .expect("no response header")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    s
}

#[tokio::test]
async fn a_client_that_never_reads_gets_backpressure_not_buffering() {
    const BULK: usize = 200 << 20;
    let (mock, gw) = setup(&[], "").await;
    let pid = gw.pid();
    still_serving(&gw).await;
    let rss_before = rss_kb(pid);

    let reader = open_unread_stream(&gw, &format!("x-mock-bulk-bytes: {BULK}\r\n")).await;
    // The upstream writes until every buffer between it and the client is full,
    // then its writes block: the stream pauses.
    let mut last = 0;
    let mut stalled_since = Instant::now();
    let mut peak_rss = rss_before;
    let deadline = Instant::now() + Duration::from_secs(15);
    while stalled_since.elapsed() < Duration::from_secs(2) {
        assert!(Instant::now() < deadline, "the upstream never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_rss = peak_rss.max(rss_kb(pid));
        let now = mock.streamed_bytes();
        if now != last {
            last = now;
            stalled_since = Instant::now();
        }
    }
    let rss_paused = rss_kb(pid);
    let growth_mb = peak_rss.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "slow reader: upstream paused after {:.1} MB of {} MB; gateway RSS {} kB before, {} kB peak, {} kB paused (growth {:.1} MB)",
        last as f64 / (1 << 20) as f64,
        BULK >> 20,
        rss_before,
        peak_rss,
        rss_paused,
        growth_mb
    );
    assert!(
        last < 64 << 20,
        "{last} bytes left the upstream for a client that reads nothing"
    );
    assert!(
        growth_mb < 32.0,
        "gateway RSS grew {growth_mb:.1} MB for one non-reading client"
    );
    assert_eq!(mock.aborted(), 0);
    let m = gw.scrape().await;
    assert_eq!(metric(&m, "llm_edge_streams_active", &[]), 1.0);
    assert_eq!(metric(&m, "llm_edge_requests_in_flight", &[]), 1.0);

    // Others are served meanwhile.
    still_serving(&gw).await;

    // The client finally leaves: the generation is cancelled upstream.
    drop(reader);
    eventually_within(PROMPT, "the upstream sees the cancel", || {
        mock.aborted() == 1
    })
    .await;
    settled_counted_once(
        &gw,
        "llm_edge_client_disconnects_total",
        &[r#"phase="streaming""#],
    )
    .await;
    assert_eq!(
        mock.completed(),
        4,
        "only the still_serving replies completed"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_frees_the_upstream_after_the_idle_timeout() {
    let (mock, gw) = setup(&[("idle_timeout: 20s", "idle_timeout: 2s")], "").await;
    let mut reader = open_unread_stream(&gw, "x-mock-bulk-bytes: 209715200\r\n").await;
    let opened = Instant::now();
    // The client keeps its socket open but reads nothing: after 2 s without
    // progress the gateway gives up on it and frees the upstream slot.
    eventually_within(PROMPT, "the upstream is released", || mock.aborted() == 1).await;
    let took = opened.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let closed = closed_by_gateway(&mut reader, PROMPT).await;
    assert!(closed.is_some(), "the gateway kept the stalled client");
    settled_counted_once(
        &gw,
        "llm_edge_client_disconnects_total",
        &[r#"phase="streaming""#],
    )
    .await;
    still_serving(&gw).await;
}

/// Opens `count` connections to the gateway, `at_once` at a time, and drops
/// each in one of four ways: at once; after part of a header; after a whole
/// streaming request, before the answer; after the stream's first bytes.
async fn churn(addr: SocketAddr, count: usize, at_once: usize) {
    let body = chat(true);
    let full = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nx-mock-tokens: 50\r\nx-mock-delay-ms: 20\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut opened = 0;
    while opened < count {
        let batch: Vec<_> = (opened..(opened + at_once).min(count))
            .map(|i| {
                let full = full.clone();
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    match i % 4 {
                        0 => {}
                        1 => {
                            let _ = s.write_all(&full.as_bytes()[..40]).await;
                        }
                        2 => {
                            let _ = s.write_all(full.as_bytes()).await;
                        }
                        _ => {
                            let _ = s.write_all(full.as_bytes()).await;
                            let mut buf = [0u8; 256];
                            let _ = tokio::time::timeout(PROMPT, s.read(&mut buf)).await;
                        }
                    }
                })
            })
            .collect();
        for h in batch {
            h.await.unwrap();
        }
        opened += at_once;
    }
}

/// Waits (bounded) until the gateway has no more fds than `baseline`.
async fn fds_back_to(pid: u32, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fds = fd_count(pid);
    while fds > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        fds = fd_count(pid);
    }
    fds
}

#[tokio::test]
async fn thousands_of_dropped_connections_leave_no_trace() {
    const CONNECTIONS: usize = 3_000;
    const AT_ONCE: usize = 100;
    const ROUNDS: usize = 5;
    let (mock, gw) = setup(&[], "downstream:\n  read_timeout: 2s\n").await;
    let pid = gw.pid();
    // Warm up (threads, pools, allocator), then let the upstream pool drain.
    for _ in 0..20 {
        still_serving(&gw).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (fds_before, rss_before) = (fd_count(pid), rss_kb(pid));

    // Five rounds: the first shows what churn costs at all (allocator
    // arenas, buffers kept for reuse), the later ones whether it accumulates
    // (a leak of 1 kB per connection would add 12 MB over rounds 1-4).
    let mut rss = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        churn(gw.addr, CONNECTIONS, AT_ONCE).await;
        let took = started.elapsed();
        // Everything the churn opened is closed again: sockets, upstream streams.
        let fds_after = fds_back_to(pid, fds_before).await;
        settled(&gw).await;
        let rss_after = rss_kb(pid);
        println!(
            "round {round}: {CONNECTIONS} connections opened and dropped in {took:.1?}: fds {fds_before} -> {fds_after}, RSS {rss_before} kB -> {rss_after} kB"
        );
        assert!(
            fds_after <= fds_before,
            "round {round}: fds {fds_before} before, {fds_after} after"
        );
        rss.push(rss_after);
    }
    println!("the upstream saw {} generations cancelled", mock.aborted());
    still_serving(&gw).await;
    assert!(
        rss[0] < rss_before + 24 * 1024,
        "RSS {rss_before} kB before, {} kB after the first round",
        rss[0]
    );
    // The allocator's footprint wobbles by a few MB; a leak only grows.
    let settled_rss = rss[ROUNDS - 2].min(rss[ROUNDS - 1]);
    let later = settled_rss.saturating_sub(rss[0]);
    assert!(
        later < 8 * 1024,
        "RSS kept growing with more churn: {rss:?} kB (+{later} kB after the first round)"
    );
    let m = gw.scrape().await;
    assert_eq!(metric(&m, "llm_edge_requests_in_flight", &[]), 0.0);
    assert!(
        metric(&m, "llm_edge_client_disconnects_total", &[]) >= (ROUNDS * CONNECTIONS / 4) as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llm_edge_upstream_errors_total", &[]),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_reused_at_once_are_never_dropped() {
    // Clients that send their next request the moment a JSON reply is
    // complete, on the same connection, must be served every time: the
    // gateway must not mistake the next request's first bytes for a client
    // leaving (which used to cut that request: 499, and an IncompleteMessage
    // for the client).
    const CLIENTS: usize = 16;
    const EACH: usize = 150;
    let (mock, gw) = setup(&[], "").await;
    let base = gw.url();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let base = base.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut failures = Vec::new();
                for i in 0..EACH {
                    let (path, body) = if (w + i) % 2 == 0 {
                        ("/v1/chat/completions", chat(false))
                    } else {
                        (
                            "/v1/embeddings",
                            r#"{"model":"qwen","input":"hi"}"#.to_string(),
                        )
                    };
                    let sent = c
                        .post(format!("{base}{path}"))
                        .bearer_auth(KEY)
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => {
                            if let Err(e) = r.bytes().await {
                                failures.push(format!("{w}/{i}: body {e}"));
                            }
                        }
                        Ok(r) => failures.push(format!("{w}/{i}: status {}", r.status())),
                        Err(e) => failures.push(format!("{w}/{i}: {e:?}")),
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    let total = CLIENTS * EACH;
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(mock.requests().len(), total);
    let m = gw.scrape().await;
    assert_eq!(
        metric(&m, "llm_edge_client_disconnects_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llm_edge_requests_total", &[r#"code="200""#]),
        total as f64
    );
}

#[tokio::test]
async fn after_a_broken_stream_the_client_connection_stays_usable() {
    // The error event ends the chunked body properly, so the client may reuse
    // its connection at once; the next request on it must be served.
    let (_mock, gw) = setup(&[], "").await;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", gw.url());
    for i in 0..40 {
        let r = c
            .post(&url)
            .bearer_auth(KEY)
            .header("x-mock-fault", "cut-mid-stream")
            .header("x-mock-tokens", "4")
            .body(chat(true))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{i}: {e:?}"));
        let text = r.text().await.unwrap();
        assert_cut_with_error_event(&text);
        let r = c
            .post(&url)
            .bearer_auth(KEY)
            .body(chat(false))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{i}: the next request on the connection failed: {e:?}"));
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}
