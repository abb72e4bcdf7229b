//! A mock llama.cpp `llama-server` for tests and benchmarks.
//!
//! It speaks llama.cpp's wire format (b11434): SSE frames `data: <json>\n\n`,
//! a first chunk with `delta: {"role":"assistant","content":null}`, one chunk
//! per token, a finish chunk with `timings` (or a usage chunk when
//! `stream_options.include_usage` is set), then `data: [DONE]`; keep-alive
//! with `Keep-Alive: timeout=5, max=100` and idle connections closed after
//! 5 s; JSON errors with `Connection: close`. It spaces tokens in time,
//! records every request it receives, and notices when a client goes away
//! mid-generation.
//!
//! Per-request controls (headers the gateway forwards untouched):
//! `x-mock-tokens: N`, `x-mock-delay-ms: MS` (between tokens),
//! `x-mock-first-token-delay-ms: MS`, and `x-mock-fault:` one of
//! `close-before-response`, `cut-mid-stream` (after half the tokens, no
//! `[DONE]`), `hang-after-headers`, `html-500`, and the network faults
//! `reset-mid-stream` (after half the tokens or half a non-streamed body, the
//! connection is reset: `SO_LINGER` 0, then close), `bad-chunk-size` (after
//! half the tokens, a chunk whose size line is not hex; the connection then
//! stays open), `malformed-sse` ([`MALFORMED_SSE_FRAMES`] before the tokens),
//! `eof-without-done` (a close-delimited stream, no `Transfer-Encoding`, that
//! ends with a clean FIN after half the tokens and no `[DONE]`).
//! `x-mock-bulk-bytes: N` streams about N bytes of large content events as
//! fast as the reader takes them (see [`MockLlama::streamed_bytes`]).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const IDLE_CLOSE: Duration = Duration::from_secs(5);
pub const MAX_REQUESTS_PER_CONNECTION: usize = 100;

/// What `x-mock-fault: malformed-sse` sends before the tokens, each written
/// as its own HTTP chunk: a comment, an `event:` line, CRLF line endings, a
/// `data:` that is not JSON, an empty `data:`, a JSON value of the wrong
/// shape, a line split across two chunks and one without a space after
/// `data:`. A relay must pass every byte through untouched.
pub const MALFORMED_SSE_FRAMES: &[&str] = &[
    ": keep-alive comment\n\n",
    "event: ping\ndata: {}\n\n",
    "data: {\"choices\":[]}\r\n\r\n",
    "data: {this is not json\n\n",
    "data:\n\n",
    "data: [1,2,3]\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"sp",
    "lit\"},\"index\":0}]}\n\n",
    "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":null}}]}\n\n",
    "retry: 1000\nid: 7\n\n",
];

/// Size of the content of one `x-mock-bulk-bytes` event.
pub const BULK_EVENT_CONTENT: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Tokens per reply when the request does not say (`max_tokens` wins).
    pub tokens: usize,
    pub token_delay: Duration,
    /// What `-a` would be: the model id llama-server reports and echoes.
    pub alias: String,
    /// Like `llama-server --api-key`.
    pub api_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            tokens: 8,
            token_delay: Duration::from_millis(0),
            alias: "mock-model".into(),
            api_key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Received>>,
    aborted: AtomicUsize,
    completed: AtomicUsize,
    connections: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    abort_times: Mutex<Vec<Instant>>,
    loading: std::sync::atomic::AtomicBool,
    streamed_bytes: AtomicUsize,
}

#[derive(Clone)]
pub struct MockLlama {
    pub addr: SocketAddr,
    state: Arc<State>,
    opts: Arc<MockOptions>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl MockLlama {
    /// Binds 127.0.0.1 on an ephemeral port and serves on the current runtime.
    pub async fn start(opts: MockOptions) -> MockLlama {
        Self::start_on(0, opts).await
    }

    /// Like [`MockLlama::start`] on a given loopback port (0: ephemeral).
    pub async fn start_on(port: u16, opts: MockOptions) -> MockLlama {
        // A deep accept queue: std's default of 128 overflows when a gateway opens
        // hundreds of upstream connections at once, turning into 1 s SYN retries.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("bind mock");
        let listener: TcpListener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("mock addr");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mock = MockLlama {
            addr,
            state: Arc::new(State::default()),
            opts: Arc::new(opts),
            stop: Arc::new(stop_tx),
        };
        let server = mock.clone();
        tokio::spawn(async move {
            let mut stopped = stop_rx.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.wait_for(|s| *s) => return,
                };
                let Ok((stream, _)) = accepted else { return };
                let conn = server.clone();
                let mut stopped = stop_rx.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn.serve_connection(stream) => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        mock
    }

    /// Stops like a killed llama-server: the port is closed and every open
    /// connection is dropped mid-whatever.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<Received> {
        self.state.requests.lock().unwrap().last().cloned()
    }

    /// Generations the client abandoned before the end.
    pub fn aborted(&self) -> usize {
        self.state.aborted.load(Ordering::SeqCst)
    }

    pub fn abort_times(&self) -> Vec<Instant> {
        self.state.abort_times.lock().unwrap().clone()
    }

    /// Makes every endpoint answer 503 "Loading model", as while llama-server loads.
    pub fn set_loading(&self, loading: bool) {
        self.state.loading.store(loading, Ordering::SeqCst);
    }

    pub fn completed(&self) -> usize {
        self.state.completed.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Generations running right now, and the most ever at once.
    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }

    pub fn max_active(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }

    /// Bytes of `x-mock-bulk-bytes` streams written so far (all requests).
    /// When the reader stops reading, this stops growing: the write blocks.
    pub fn streamed_bytes(&self) -> usize {
        self.state.streamed_bytes.load(Ordering::SeqCst)
    }

    async fn serve_connection(self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        self.state.connections.fetch_add(1, Ordering::SeqCst);
        let mut buf = Vec::with_capacity(8192);
        for served in 1..=MAX_REQUESTS_PER_CONNECTION {
            let Some(req) = read_request(&mut stream, &mut buf).await else {
                return;
            };
            self.state.requests.lock().unwrap().push(req.clone());
            let last = served == MAX_REQUESTS_PER_CONNECTION;
            match self.respond(&mut stream, &req, last).await {
                Ok(true) => {}
                _ => return,
            }
        }
    }

    /// Returns Ok(true) when the connection may serve another request.
    async fn respond(
        &self,
        stream: &mut TcpStream,
        req: &Received,
        last: bool,
    ) -> std::io::Result<bool> {
        let fault = req.header("x-mock-fault").unwrap_or("").to_string();
        if fault == "close-before-response" {
            return Ok(false);
        }
        if fault == "html-500" {
            let body = "<html><body><h1>500 Internal Server Error</h1></body></html>";
            write_response(stream, 500, "text/html", body.as_bytes(), true).await?;
            return Ok(false);
        }
        if self.state.loading.load(Ordering::SeqCst) {
            let body =
                json!({"error":{"code":503,"message":"Loading model","type":"unavailable_error"}});
            write_response(
                stream,
                503,
                "application/json",
                body.to_string().as_bytes(),
                true,
            )
            .await?;
            return Ok(false);
        }
        if let Some(key) = &self.opts.api_key {
            let ok = req.path == "/health"
                || req.header("authorization") == Some(&format!("Bearer {key}"))
                || req.header("x-api-key") == Some(key.as_str());
            if !ok {
                let body = json!({"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}});
                write_response(
                    stream,
                    401,
                    "application/json",
                    body.to_string().as_bytes(),
                    true,
                )
                .await?;
                return Ok(false);
            }
        }
        let path = req.path.split('?').next().unwrap_or("").to_string();
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/health") => {
                write_response(stream, 200, "application/json", br#"{"status":"ok"}"#, last)
                    .await?;
            }
            ("GET", "/v1/models") | ("GET", "/models") => {
                let body = json!({"object":"list","data":[{"id": self.opts.alias, "object":"model","created": now(),"owned_by":"llamacpp","meta":{"n_params":1}}]});
                write_response(
                    stream,
                    200,
                    "application/json",
                    body.to_string().as_bytes(),
                    last,
                )
                .await?;
            }
            ("POST", "/v1/chat/completions") | ("POST", "/v1/completions") => {
                let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                    let body = json!({"error":{"code":400,"message":"Failed to parse JSON","type":"invalid_request_error"}});
                    write_response(
                        stream,
                        400,
                        "application/json",
                        body.to_string().as_bytes(),
                        true,
                    )
                    .await?;
                    return Ok(false);
                };
                let chat = path.ends_with("chat/completions");
                if chat && body.get("messages").is_none() {
                    let body = json!({"error":{"code":400,"message":"'messages' is required","type":"invalid_request_error"}});
                    write_response(
                        stream,
                        400,
                        "application/json",
                        body.to_string().as_bytes(),
                        true,
                    )
                    .await?;
                    return Ok(false);
                }
                return self.generate(stream, req, &body, chat, &fault, last).await;
            }
            ("POST", "/v1/embeddings") => {
                let body = json!({"model": self.opts.alias, "object":"list","usage":{"prompt_tokens":3,"total_tokens":3},
                    "data":[{"embedding":[0.25,-0.5,0.125],"index":0,"object":"embedding"}]});
                write_response(
                    stream,
                    200,
                    "application/json",
                    body.to_string().as_bytes(),
                    last,
                )
                .await?;
            }
            _ => {
                let body = json!({"error":{"code":404,"message":"File Not Found","type":"not_found_error"}});
                write_response(
                    stream,
                    404,
                    "application/json",
                    body.to_string().as_bytes(),
                    true,
                )
                .await?;
                return Ok(false);
            }
        }
        Ok(!last)
    }

    async fn generate(
        &self,
        stream: &mut TcpStream,
        req: &Received,
        body: &Value,
        chat: bool,
        fault: &str,
        last: bool,
    ) -> std::io::Result<bool> {
        let tokens = req
            .header("x-mock-tokens")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                body.get("max_tokens")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
            })
            .unwrap_or(self.opts.tokens);
        let delay = req
            .header("x-mock-delay-ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(self.opts.token_delay);
        let first_delay = req
            .header("x-mock-first-token-delay-ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::ZERO);
        let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let prompt_n = prompt_tokens(body);
        let id = format!("chatcmpl-mock{}", now());
        let _active = ActiveGuard::new(&self.state);

        // llama-server sends headers only once the first token exists.
        if !first_delay.is_zero() && !wait_or_client_gone(stream, first_delay).await {
            self.note_abort();
            return Ok(false);
        }
        if !streaming {
            for _ in 0..tokens {
                if !delay.is_zero() && !wait_or_client_gone(stream, delay).await {
                    self.note_abort();
                    return Ok(false);
                }
            }
            let text = reply_text(tokens);
            let timings = timings(prompt_n, tokens);
            let cut_body = fault == "reset-mid-stream";
            let usage = json!({"completion_tokens": tokens, "prompt_tokens": prompt_n, "total_tokens": tokens + prompt_n,
                "prompt_tokens_details": {"cached_tokens": 0}});
            let out = if chat {
                json!({"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content": text}}],
                    "created": now(), "model": self.opts.alias, "system_fingerprint": "b11434-mock", "object":"chat.completion",
                    "usage": usage, "id": id, "timings": timings})
            } else {
                json!({"choices":[{"text": text, "index":0, "logprobs": null, "finish_reason":"stop"}],
                    "created": now(), "model": self.opts.alias, "system_fingerprint": "b11434-mock", "object":"text_completion",
                    "usage": usage, "id": id, "timings": timings})
            };
            if cut_body {
                // The header promises the whole body; half of it comes, then a reset.
                let body = out.to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nServer: llama.cpp\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(&body.as_bytes()[..body.len() / 2]).await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
                return Ok(false);
            }
            write_response(
                stream,
                200,
                "application/json",
                out.to_string().as_bytes(),
                last,
            )
            .await?;
            self.state.completed.fetch_add(1, Ordering::SeqCst);
            return Ok(!last);
        }

        if fault == "eof-without-done" {
            return self.close_delimited_stream(stream, tokens, delay).await;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Type: text/event-stream\r\nKeep-Alive: timeout=5, max=100\r\nServer: llama.cpp\r\nTransfer-Encoding: chunked\r\nX-Accel-Buffering: no\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(head.as_bytes()).await?;
        if fault == "malformed-sse" {
            for frame in MALFORMED_SSE_FRAMES {
                let chunk = format!("{:x}\r\n{frame}\r\n", frame.len());
                stream.write_all(chunk.as_bytes()).await?;
                stream.flush().await?;
            }
        }
        if let Some(bulk) = req
            .header("x-mock-bulk-bytes")
            .and_then(|v| v.parse::<usize>().ok())
        {
            return self.bulk_stream(stream, bulk, last).await;
        }
        if fault == "hang-after-headers" {
            let _ = wait_or_client_gone(stream, Duration::from_secs(3600)).await;
            self.note_abort();
            return Ok(false);
        }
        let base = json!({"created": now(), "id": id, "model": self.opts.alias, "system_fingerprint": "b11434-mock",
            "object": if chat { "chat.completion.chunk" } else { "text_completion" }});
        let chunk = |choice: Value, extra: Option<(&str, Value)>| {
            let mut v = base.clone();
            v["choices"] = json!([choice]);
            if let Some((k, x)) = extra {
                v[k] = x;
            }
            v
        };
        if chat {
            let first = chunk(
                json!({"finish_reason": null, "index": 0, "delta": {"role": "assistant", "content": null}}),
                None,
            );
            send_event(stream, &first.to_string()).await?;
        }
        let cut_at = matches!(
            fault,
            "cut-mid-stream" | "reset-mid-stream" | "bad-chunk-size"
        )
        .then_some(tokens / 2);
        for i in 0..tokens {
            if i > 0 && !delay.is_zero() && !wait_or_client_gone(stream, delay).await {
                self.note_abort();
                return Ok(false);
            }
            if Some(i) == cut_at {
                match fault {
                    "reset-mid-stream" => reset(stream),
                    "bad-chunk-size" => {
                        stream
                            .write_all(b"zz\r\ndata: {\"not\":\"a chunk\"}\n\n\r\n")
                            .await?;
                        stream.flush().await?;
                        // Stay connected: only the framing is broken, not the connection.
                        if !wait_or_client_gone(stream, Duration::from_secs(30)).await {
                            self.note_abort();
                        }
                    }
                    _ => {}
                }
                return Ok(false);
            }
            let sent_at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64;
            let token = token_text(i);
            let choice = if chat {
                json!({"finish_reason": null, "index": 0, "delta": {"content": token}})
            } else {
                json!({"text": token, "index": 0, "logprobs": null, "finish_reason": null})
            };
            let ev = chunk(choice, Some(("mock_sent_us", json!(sent_at))));
            if send_event(stream, &ev.to_string()).await.is_err() {
                self.note_abort();
                return Ok(false);
            }
        }
        let finish_choice = if chat {
            json!({"finish_reason": "stop", "index": 0, "delta": {}})
        } else {
            json!({"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"})
        };
        let usage = json!({"completion_tokens": tokens, "prompt_tokens": prompt_n, "total_tokens": tokens + prompt_n});
        if include_usage {
            send_event(stream, &chunk(finish_choice, None).to_string()).await?;
            let mut usage_chunk = base.clone();
            usage_chunk["choices"] = json!([]);
            usage_chunk["usage"] = usage;
            usage_chunk["timings"] = timings(prompt_n, tokens);
            send_event(stream, &usage_chunk.to_string()).await?;
        } else {
            let fin = chunk(finish_choice, Some(("timings", timings(prompt_n, tokens))));
            send_event(stream, &fin.to_string()).await?;
        }
        send_event(stream, "[DONE]").await?;
        stream.write_all(b"0\r\n\r\n").await?;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
        Ok(!last)
    }

    /// `eof-without-done`: a stream delimited by the connection's close (no
    /// `Transfer-Encoding`, no `Content-Length`), ended by a clean FIN after
    /// half the tokens, without a finish chunk or `[DONE]`.
    async fn close_delimited_stream(
        &self,
        stream: &mut TcpStream,
        tokens: usize,
        delay: Duration,
    ) -> std::io::Result<bool> {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nServer: llama.cpp\r\nConnection: close\r\n\r\n";
        stream.write_all(head.as_bytes()).await?;
        for i in 0..tokens / 2 {
            if i > 0 && !delay.is_zero() && !wait_or_client_gone(stream, delay).await {
                self.note_abort();
                return Ok(false);
            }
            let ev = json!({"choices":[{"finish_reason": null, "index": 0, "delta": {"content": token_text(i)}}],
                "created": now(), "id": "chatcmpl-eof", "model": self.opts.alias, "object": "chat.completion.chunk"});
            stream
                .write_all(format!("data: {ev}\n\n").as_bytes())
                .await?;
            stream.flush().await?;
        }
        stream.shutdown().await?;
        Ok(false)
    }

    /// `x-mock-bulk-bytes`: large content events as fast as the reader takes
    /// them, counted in `streamed_bytes` as each write completes.
    async fn bulk_stream(
        &self,
        stream: &mut TcpStream,
        total: usize,
        last: bool,
    ) -> std::io::Result<bool> {
        let content = "x".repeat(BULK_EVENT_CONTENT);
        let ev = json!({"choices":[{"finish_reason": null, "index": 0, "delta": {"content": content}}],
            "created": now(), "id": "chatcmpl-bulk", "model": self.opts.alias, "object": "chat.completion.chunk"})
        .to_string();
        let frame = format!("data: {ev}\n\n");
        let chunk = format!("{:x}\r\n{frame}\r\n", frame.len());
        let mut sent = 0;
        while sent < total {
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                self.note_abort();
                return Ok(false);
            }
            sent += chunk.len();
            self.state
                .streamed_bytes
                .fetch_add(chunk.len(), Ordering::SeqCst);
        }
        let fin = json!({"choices":[{"finish_reason": "stop", "index": 0, "delta": {}}],
            "created": now(), "id": "chatcmpl-bulk", "model": self.opts.alias, "object": "chat.completion.chunk"});
        send_event(stream, &fin.to_string()).await?;
        send_event(stream, "[DONE]").await?;
        stream.write_all(b"0\r\n\r\n").await?;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
        Ok(!last)
    }

    fn note_abort(&self) {
        self.state.aborted.fetch_add(1, Ordering::SeqCst);
        self.state.abort_times.lock().unwrap().push(Instant::now());
    }
}

struct ActiveGuard<'a>(&'a State);

impl<'a> ActiveGuard<'a> {
    fn new(state: &'a State) -> Self {
        let now = state.active.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_active.fetch_max(now, Ordering::SeqCst);
        ActiveGuard(state)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Makes dropping `stream` reset the connection (RST) instead of closing it.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

pub fn token_text(i: usize) -> String {
    format!("tok{i} ")
}

/// The full reply of `tokens` tokens.
pub fn reply_text(tokens: usize) -> String {
    (0..tokens).map(token_text).collect()
}

fn prompt_tokens(body: &Value) -> usize {
    let text = body.to_string();
    (text.len() / 4).max(1)
}

fn timings(prompt_n: usize, predicted_n: usize) -> Value {
    json!({"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": 1.5, "prompt_per_token_ms": 0.1, "prompt_per_second": 1000.0,
        "predicted_n": predicted_n, "predicted_ms": 2.5, "predicted_per_token_ms": 0.3, "predicted_per_second": 400.0})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn send_event(stream: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let frame = format!("data: {data}\n\n");
    let chunk = format!("{:x}\r\n{frame}\r\n", frame.len());
    stream.write_all(chunk.as_bytes()).await?;
    stream.flush().await
}

/// Sleeps for `d`, returning false early if the peer closes the connection.
async fn wait_or_client_gone(stream: &mut TcpStream, d: Duration) -> bool {
    let mut probe = [0u8; 1];
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        r = stream.peek(&mut probe) => !matches!(r, Ok(0) | Err(_)),
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let conn = if close {
        "Connection: close\r\n".to_string()
    } else {
        "Keep-Alive: timeout=5, max=100\r\n".to_string()
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nAccess-Control-Allow-Origin: \r\nContent-Type: {content_type}; charset=utf-8\r\nContent-Length: {}\r\nServer: llama.cpp\r\n{conn}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Reads one request (Content-Length or chunked body). None when the peer
/// closed, was idle for 5 s, or sent garbage.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let deadline = tokio::time::Instant::now() + IDLE_CLOSE;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = parsed.parse(buf) {
            let method = parsed.method?.to_string();
            let path = parsed.path?.to_string();
            let headers: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let find = |name: &str| {
                headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            buf.drain(..head_len);
            let body = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                read_chunked(stream, buf).await?
            } else {
                let len: usize = find("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < len {
                    read_more(stream, buf, None).await?;
                }
                buf.drain(..len).collect()
            };
            return Some(Received {
                method,
                path,
                headers,
                body,
            });
        }
        read_more(stream, buf, Some(deadline)).await?;
    }
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Option<tokio::time::Instant>,
) -> Option<()> {
    let mut chunk = [0u8; 65536];
    let read = stream.read(&mut chunk);
    let n = match deadline {
        Some(d) => tokio::time::timeout_at(d, read).await.ok()?.ok()?,
        None => read.await.ok()?,
    };
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            read_more(stream, buf, None).await?;
        };
        let size_line = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            read_more(stream, buf, None).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Some(body);
        }
    }
}
