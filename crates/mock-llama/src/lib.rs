//! A mock llama.cpp `llama-server` for tests and benchmarks.
//!
//! It speaks llama.cpp's wire format (b11434): SSE frames `data: <json>\n\n`,
//! a first chunk with `delta: {"role":"assistant","content":null}`, one chunk
//! per token, a finish chunk with `timings` (or a usage chunk when
//! `stream_options.include_usage` is set), then `data: [DONE]`, and then,
//! as llama-server b11434 does, the connection is closed although the headers
//! promised keep-alive (see `drain_and_close`); keep-alive
//! with `Keep-Alive: timeout=5, max=100` and idle connections closed after
//! 5 s for non-streamed answers; JSON errors with `Connection: close`. It spaces tokens in time,
//! records every request it receives, and notices when a client goes away
//! mid-generation. Paths are percent-decoded before routing, as cpp-httplib
//! does (`/v1/chat/c%6fmpletions` and `/v1%2Fchat/completions` are chat).
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/embeddings`, and the
//! generation routes, which share the token count, the reply text
//! ([`reply_text`]), the delays, the faults and the prompt token count
//! ([`prompt_token_count`]: the same conversation counts the same in every
//! dialect):
//! - `/v1/chat/completions` and `/v1/completions` (OpenAI; `n` choices, whose
//!   usage is the first choice's, one usage chunk per choice when streamed);
//! - `/v1/responses` (OpenAI Responses, from `input` string or items and
//!   `instructions`): a `response` object; streamed, `event:`/`data:` frames
//!   `response.created`, `response.in_progress`, `response.output_item.added`,
//!   `response.content_part.added` with the first `response.output_text.delta`,
//!   one delta per token, then `response.output_text.done`,
//!   `response.content_part.done`, `response.output_item.done` and
//!   `response.completed` (usage, and `timings` beside `response`), no
//!   `[DONE]`; with `n` > 1, a JSON array of responses (interleaved streams);
//! - `/v1/messages` (Anthropic, `system` and `messages`; `n` is ignored): a
//!   `message` without `timings`; streamed, `message_start` (input tokens),
//!   `content_block_start` with the first `content_block_delta`, one delta
//!   per token, then `content_block_stop`, `message_delta` (output tokens)
//!   and `message_stop`, no `[DONE]`.
//!
//! Tokens to generate: `x-mock-tokens`, else the request's `n_predict`,
//! `max_completion_tokens`, `max_tokens` (`max_output_tokens` for Responses;
//! only `max_tokens` for Messages), else [`MockOptions::tokens`].
//! Token counting: `POST /v1/messages/count_tokens` answers
//! `{"input_tokens":N}`, `/v1/responses/input_tokens` and
//! `/v1/chat/completions/input_tokens` answer
//! `{"input_tokens":N,"object":"response.input_tokens"}`.
//! `POST /v1/rerank` (also `/v1/reranking`, `/rerank`, `/reranking`) answers
//! as `llama-server --reranking` does (Jina or TEI shape). Everything else is
//! llama.cpp's 404.
//!
//! Prompt cache ([`MockOptions::prompt_cache`], off by default): like
//! llama-server's, it remembers the last prompts it processed (one per slot,
//! `parallel` of them, each with the reply it generated) and reports as
//! `cache_n` (and `cached_tokens`, `cache_read_input_tokens`) the longest
//! common prefix of the new prompt's ChatML rendering with one of them, in
//! the mock's token unit (a quarter of the bytes, see
//! [`prompt_token_count`]), when it is at least a tenth of the prompt (as
//! llama-server's `--slot-prompt-similarity`); the prompt replaces that
//! slot's, else the least recently used slot's (and reuses nothing). [`MockLlama::forget_cache`]
//! empties it (a restarted llama-server).
//!
//! Per-request controls (headers the gateway forwards untouched):
//! `x-mock-tokens: N`, `x-mock-delay-ms: MS` (between tokens),
//! `x-mock-first-token-delay-ms: MS`, and `x-mock-fault:` one of
//! - `drop-next-request` (streams): after the stream, the next request on
//!   the connection is read and dropped unanswered, then the connection
//!   closes: llama-server's close after a stream, caught at its worst
//!   moment;
//! - `close-before-response`, `close-after-request` (the whole request is
//!   read and recorded, then the connection is closed without a byte of
//!   answer: a clean FIN);
//! - `cut-mid-stream` (after half the tokens, no finishing events or
//!   `[DONE]`), `hang-after-headers`;
//! - `html-500` (500, `text/html`), `empty-502` (502, no `Content-Type`,
//!   `Content-Length: 0`), `text-200` (200, `text/plain`, body `not json`),
//!   `broken-json-200` (200, `application/json`, body `{"choices": [`),
//!   `broken-json-500` (500, `application/json`, body `<not json>`): on any
//!   route, instead of its answer;
//! - `hop-headers`: the normal answer, plus `Connection: keep-alive,
//!   X-Hop-Secret`, `X-Hop-Secret: 1` and `Keep-Alive: timeout=5, max=100`
//!   ([`HOP_HEADERS`]);
//! - `chunked-json`: a normal non-streamed JSON answer sent with
//!   `Transfer-Encoding: chunked`, in two chunks, instead of `Content-Length`;
//! - the network faults `reset-mid-stream` (after half the tokens or half a
//!   non-streamed body, the connection is reset: `SO_LINGER` 0, then close),
//!   `bad-chunk-size` (after half the tokens, a chunk whose size line is not
//!   hex; the connection then stays open), `malformed-sse`
//!   ([`MALFORMED_SSE_FRAMES`] before the tokens, whatever the dialect),
//!   `eof-without-done` (a close-delimited stream, no `Transfer-Encoding`,
//!   that ends with a clean FIN after half the tokens and no `[DONE]`).
//!
//! `x-mock-bulk-bytes: N` streams about N bytes of large (chat-shaped)
//! content events as fast as the reader takes them (see
//! [`MockLlama::streamed_bytes`]).

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
    /// Like `llama-server -np`: the largest `n` (choices) a request may ask
    /// for. The mock does not queue: it serves any number of requests at once.
    pub parallel: usize,
    /// Emulate llama-server's prompt cache (see the module docs).
    pub prompt_cache: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            tokens: 8,
            token_delay: Duration::from_millis(0),
            alias: "mock-model".into(),
            api_key: None,
            parallel: 4,
            prompt_cache: false,
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
    /// The emulated prompt cache: one rendered prompt (and reply) per slot,
    /// most recently used last.
    cache: Mutex<std::collections::VecDeque<String>>,
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
    /// Empties the emulated prompt cache (as a restart would).
    pub fn forget_cache(&self) {
        self.state.cache.lock().unwrap().clear();
    }

    /// Prompt tokens of `rendered` found in the emulated cache; remembers
    /// `rendered` followed by `reply` in the slot it reused (or the least
    /// recently used one).
    fn cache_lookup(&self, rendered: &str, reply: &str) -> usize {
        let mut cache = self.state.cache.lock().unwrap();
        let best = cache
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let common = p
                    .bytes()
                    .zip(rendered.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                (common, i)
            })
            .max();
        // As llama-server picks a slot: the most similar prompt if it shares
        // at least a tenth (`--slot-prompt-similarity 0.1`), else the least
        // recently used slot.
        let common = match best {
            Some((common, i)) if common > 0 && common * 10 >= rendered.len() => {
                cache.remove(i);
                common
            }
            _ => {
                if cache.len() >= self.opts.parallel.max(1) {
                    cache.pop_front();
                }
                0
            }
        };
        cache.push_back(format!("{rendered}{reply}<|im_end|>\n"));
        // llama-server always evaluates at least the prompt's last token.
        (common / 4).min((rendered.len() / 4).max(1) - 1)
    }

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
        match fault.as_str() {
            // The whole request (head and body) has been read and recorded.
            "close-before-response" | "close-after-request" => return Ok(false),
            "html-500" => {
                let body = "<html><body><h1>500 Internal Server Error</h1></body></html>";
                write_response(stream, 500, "text/html", body.as_bytes(), true, "").await?;
                return Ok(false);
            }
            "empty-502" => {
                write_exact(stream, 502, None, b"", true).await?;
                return Ok(false);
            }
            "text-200" => {
                write_exact(stream, 200, Some("text/plain"), b"not json", last).await?;
                return Ok(!last);
            }
            "broken-json-200" => {
                write_exact(
                    stream,
                    200,
                    Some("application/json"),
                    br#"{"choices": ["#,
                    last,
                )
                .await?;
                return Ok(!last);
            }
            "broken-json-500" => {
                write_exact(stream, 500, Some("application/json"), b"<not json>", true).await?;
                return Ok(false);
            }
            _ => {}
        }
        if self.state.loading.load(Ordering::SeqCst) {
            return error_reply(stream, 503, "Loading model", "unavailable_error").await;
        }
        // Like cpp-httplib, route on the percent-decoded path.
        let path = percent_decode(req.path.split('?').next().unwrap_or(""));
        if let Some(key) = &self.opts.api_key {
            let ok = path == "/health"
                || path == "/v1/health"
                || req.header("authorization") == Some(&format!("Bearer {key}"))
                || req.header("x-api-key") == Some(key.as_str());
            if !ok {
                return error_reply(stream, 401, "Invalid API Key", "authentication_error").await;
            }
        }
        let method = req.method.as_str();
        let generation = match (method, path.as_str()) {
            ("POST", "/v1/chat/completions") => Some(Dialect::Chat),
            ("POST", "/v1/completions") => Some(Dialect::Completions),
            ("POST", "/v1/responses" | "/responses") => Some(Dialect::Responses),
            ("POST", "/v1/messages") => Some(Dialect::Messages),
            _ => None,
        };
        let counting = match (method, path.as_str()) {
            ("POST", "/v1/chat/completions/input_tokens" | "/chat/completions/input_tokens") => {
                Some(Dialect::Chat)
            }
            ("POST", "/v1/responses/input_tokens" | "/responses/input_tokens") => {
                Some(Dialect::Responses)
            }
            ("POST", "/v1/messages/count_tokens") => Some(Dialect::Messages),
            _ => None,
        };
        if let Some(dialect) = generation.or(counting) {
            let body = match parse_request(dialect, &req.body) {
                Ok(body) => body,
                Err((status, message, kind)) => {
                    return error_reply(stream, status, &message, kind).await;
                }
            };
            if generation.is_some() {
                return self
                    .generate(stream, req, &body, dialect, &fault, last)
                    .await;
            }
            let n = prompt_token_count(dialect, &body);
            let mut out = json!({"input_tokens": n});
            if dialect != Dialect::Messages {
                out["object"] = json!("response.input_tokens");
            }
            let out = out.to_string();
            write_response(
                stream,
                200,
                "application/json",
                out.as_bytes(),
                last,
                &fault,
            )
            .await?;
            return Ok(!last);
        }
        match (method, path.as_str()) {
            ("GET", "/health" | "/v1/health") => {
                write_response(
                    stream,
                    200,
                    "application/json",
                    br#"{"status":"ok"}"#,
                    last,
                    &fault,
                )
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
                    &fault,
                )
                .await?;
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
                    &fault,
                )
                .await?;
            }
            ("POST", "/v1/rerank" | "/v1/reranking" | "/rerank" | "/reranking") => {
                let out = serde_json::from_slice::<Value>(&req.body)
                    .map_err(|e| {
                        (
                            400,
                            format!("[json.exception.parse_error.101] parse error: {e}"),
                            "invalid_request_error",
                        )
                    })
                    .and_then(|body| rerank(&body, &self.opts.alias));
                match out {
                    Ok(out) => {
                        let out = out.to_string();
                        write_response(
                            stream,
                            200,
                            "application/json",
                            out.as_bytes(),
                            last,
                            &fault,
                        )
                        .await?;
                    }
                    Err((status, message, kind)) => {
                        return error_reply(stream, status, &message, kind).await;
                    }
                }
            }
            _ => return error_reply(stream, 404, "File Not Found", "not_found_error").await,
        }
        Ok(!last)
    }

    async fn generate(
        &self,
        stream: &mut TcpStream,
        req: &Received,
        body: &Value,
        dialect: Dialect,
        fault: &str,
        last: bool,
    ) -> std::io::Result<bool> {
        let tokens = req
            .header("x-mock-tokens")
            .and_then(|v| v.parse().ok())
            .or_else(|| requested_tokens(dialect, body))
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
        // `n` (alias of `n_cmpl`): that many choices, 1 to the slot count. The
        // Messages converter drops it.
        let mut n = 1;
        if dialect != Dialect::Messages {
            if let Some((field, value)) = ["n_cmpl", "n"]
                .iter()
                .find_map(|f| body.get(*f).and_then(Value::as_i64).map(|v| (*f, v)))
            {
                if value < 1 || value > self.opts.parallel as i64 {
                    let message = format!(
                        "Field '{field}': Value must be between 1 <= value <= {}, but got {value}",
                        self.opts.parallel
                    );
                    return error_reply(stream, 400, &message, "invalid_request_error").await;
                }
                n = value as usize;
            }
        }
        let prompt_n = prompt_token_count(dialect, body);
        let cache_n = if self.opts.prompt_cache {
            self.cache_lookup(&rendered_prompt(dialect, body), &reply_text(tokens))
        } else {
            0
        };
        let mut choices: Vec<Events> = (0..n)
            .map(|i| {
                let mut e = Events::new(dialect, &self.opts.alias, prompt_n, include_usage, i);
                e.cache_n = cache_n;
                e
            })
            .collect();
        // One completion id for all the choices (each Responses reply has its own).
        let id = choices[0].id.clone();
        choices.iter_mut().for_each(|c| c.id.clone_from(&id));
        let events = &choices[0];
        let active = ActiveGuard::new(&self.state);

        // llama-server (b11434) sends a stream's headers when a slot starts on
        // the request, before the first token; the mock sends them after the
        // first-token delay, which stands for the queue and the prompt both.
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
            let out = match dialect {
                // Usage and timings are the first choice's only, as in llama.cpp.
                Dialect::Chat | Dialect::Completions => {
                    let mut out = events.complete(tokens);
                    for choice in &choices[1..] {
                        let more = choice.complete(tokens)["choices"][0].clone();
                        out["choices"].as_array_mut().unwrap().push(more);
                    }
                    out
                }
                // Several Responses replies come as a JSON array of them.
                _ if n > 1 => choices.iter().map(|c| c.complete(tokens)).collect(),
                _ => events.complete(tokens),
            }
            .to_string();
            if fault == "reset-mid-stream" {
                // The header promises the whole body; half of it comes, then a reset.
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nServer: llama.cpp\r\n\r\n",
                    out.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(&out.as_bytes()[..out.len() / 2]).await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(stream);
                return Ok(false);
            }
            write_response(stream, 200, "application/json", out.as_bytes(), last, fault).await?;
            self.state.completed.fetch_add(1, Ordering::SeqCst);
            return Ok(!last);
        }

        if fault == "eof-without-done" {
            return self
                .close_delimited_stream(stream, events, tokens, delay)
                .await;
        }
        // llama-server's headers, in its order.
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\nX-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n{}\r\n",
            connection_headers(fault, last)
        );
        stream.write_all(head.as_bytes()).await?;
        if fault == "malformed-sse" {
            for frame in MALFORMED_SSE_FRAMES {
                send_chunk(stream, frame).await?;
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
        for chunk in choices.iter().flat_map(Events::preamble) {
            send_chunk(stream, &chunk).await?;
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
            for choice in &choices {
                if send_chunk(stream, &choice.token(i)).await.is_err() {
                    self.note_abort();
                    return Ok(false);
                }
            }
        }
        // Each choice finishes with its own usage and timings (several usage
        // chunks when n > 1, as llama.cpp sends them), then one `[DONE]`.
        for chunk in choices.iter().flat_map(|c| c.finish(tokens)) {
            send_chunk(stream, &chunk).await?;
        }
        if let Some(done) = events.done() {
            send_chunk(stream, done).await?;
        }
        stream.write_all(b"0\r\n\r\n").await?;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
        // The slot is free once the stream ended, whatever the connection does.
        drop(active);
        if fault == "drop-next-request" {
            // The worst timing of what follows: the next request on this
            // connection arrives before the close does. Read and dropped.
            let mut scratch = Vec::new();
            let next =
                tokio::time::timeout(Duration::from_secs(2), read_request(stream, &mut scratch));
            let _ = next.await;
            return Ok(false);
        }
        drain_and_close(stream).await;
        Ok(false)
    }

    /// `eof-without-done`: a stream delimited by the connection's close (no
    /// `Transfer-Encoding`, no `Content-Length`), ended by a clean FIN after
    /// half the tokens, without the finishing events or `[DONE]`.
    async fn close_delimited_stream(
        &self,
        stream: &mut TcpStream,
        events: &Events<'_>,
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
            stream.write_all(events.token(i).as_bytes()).await?;
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

/// The wire format of a generation (or token counting) route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1/chat/completions` (and `/v1/chat/completions/input_tokens`).
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/responses` (OpenAI Responses; and `/v1/responses/input_tokens`).
    Responses,
    /// `/v1/messages` (Anthropic Messages; and `/v1/messages/count_tokens`).
    Messages,
}

/// Extra response headers of `x-mock-fault: hop-headers`: hop-by-hop headers,
/// one of them named only by `Connection`.
pub const HOP_HEADERS: &str =
    "Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5, max=100\r\n";

/// Parses and checks a request body as llama-server's converters do; the
/// error is (status, message, type).
fn parse_request(dialect: Dialect, raw: &[u8]) -> Result<Value, (u16, String, &'static str)> {
    let body = serde_json::from_slice::<Value>(raw).map_err(|e| {
        (
            400,
            format!("[json.exception.parse_error.101] parse error: {e}"),
            "invalid_request_error",
        )
    })?;
    let missing = |field: &str| body.get(field).is_none();
    match dialect {
        Dialect::Chat if missing("messages") => Err((
            400,
            "'messages' is required".into(),
            "invalid_request_error",
        )),
        Dialect::Responses if missing("input") => {
            Err((400, "'input' is required".into(), "invalid_request_error"))
        }
        Dialect::Responses
            if body
                .get("previous_response_id")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()) =>
        {
            Err((
                400,
                "llama.cpp does not support 'previous_response_id'.".into(),
                "invalid_request_error",
            ))
        }
        // llama.cpp throws a std::runtime_error here: a 500.
        Dialect::Messages if missing("messages") => {
            Err((500, "'messages' is required".into(), "server_error"))
        }
        _ => Ok(body),
    }
}

/// Tokens to generate as the request asks in its dialect, llama.cpp's
/// precedence: `n_predict`, then `max_completion_tokens`, then `max_tokens`
/// (`max_output_tokens` first for Responses). The Messages converter keeps
/// only `max_tokens` (it drops `n_predict`). A negative (unlimited) value
/// leaves the mock's default.
fn requested_tokens(dialect: Dialect, body: &Value) -> Option<usize> {
    let fields: &[&str] = match dialect {
        Dialect::Chat | Dialect::Completions => {
            &["n_predict", "max_completion_tokens", "max_tokens"]
        }
        // The converter turns `max_output_tokens` into `max_tokens`, replacing it.
        Dialect::Responses => &[
            "n_predict",
            "max_completion_tokens",
            "max_output_tokens",
            "max_tokens",
        ],
        Dialect::Messages => &["max_tokens"],
    };
    let field = fields.iter().find_map(|f| body.get(*f))?;
    field.as_u64().map(|n| n as usize)
}

/// The conversation as llama.cpp's converters turn it into chat messages:
/// (role, text) pairs.
fn prompt_messages(dialect: Dialect, body: &Value) -> Vec<(String, String)> {
    fn text(content: Option<&Value>) -> String {
        match content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.as_str().or_else(|| p.get("text").and_then(Value::as_str)))
                .collect(),
            _ => String::new(),
        }
    }
    let message = |m: &Value| {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        (role.to_string(), text(m.get("content")))
    };
    let list = |v: Option<&Value>| -> Vec<(String, String)> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().map(message).collect())
            .unwrap_or_default()
    };
    match dialect {
        Dialect::Chat => list(body.get("messages")),
        Dialect::Completions => vec![(String::new(), text(body.get("prompt")))],
        Dialect::Responses => {
            let mut out = Vec::new();
            if let Some(instructions) = body.get("instructions") {
                out.push(("system".into(), text(Some(instructions))));
            }
            match body.get("input") {
                Some(Value::String(s)) => out.push(("user".into(), s.clone())),
                input => out.extend(list(input)),
            }
            out
        }
        Dialect::Messages => {
            let mut out = Vec::new();
            if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
                out.push(("system".into(), text(Some(system))));
            }
            out.extend(list(body.get("messages")));
            out
        }
    }
}

/// Prompt tokens the mock counts for a request: a quarter of the bytes of its
/// ChatML rendering (with the generation prompt), so the same conversation
/// counts the same in every dialect, in the token counting routes too.
pub fn prompt_token_count(dialect: Dialect, body: &Value) -> usize {
    (rendered_prompt(dialect, body).len() / 4).max(1)
}

/// The prompt as the mock renders it: ChatML with the generation prompt
/// (the text of a `/v1/completions` prompt as it is).
fn rendered_prompt(dialect: Dialect, body: &Value) -> String {
    let messages = prompt_messages(dialect, body);
    if dialect == Dialect::Completions {
        messages.into_iter().map(|(_, t)| t).collect()
    } else {
        let mut s: String = messages
            .iter()
            .map(|(role, t)| format!("<|im_start|>{role}\n{t}<|im_end|>\n"))
            .collect();
        s.push_str("<|im_start|>assistant\n");
        s
    }
}

/// `/v1/rerank` as llama-server `--reranking` answers it: the Jina shape
/// (`results` of `index` and `relevance_score`, best first, `top_n` of them)
/// or, when the request has `texts` instead of `documents`, TEI's bare array of
/// `index` and `score` (and `text` with `return_text`). The score of a document
/// is the share of the query's words it contains.
fn rerank(body: &Value, alias: &str) -> Result<Value, (u16, String, &'static str)> {
    let bad = |m: &str| (400, m.to_string(), "invalid_request_error");
    let tei = body.get("texts").is_some();
    let query = match body.get("query") {
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err(bad("\"query\" must be a string")),
        None => return Err(bad("\"query\" must be provided")),
    };
    let documents: Vec<String> = body
        .get("documents")
        .or_else(|| body.get("texts"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if documents.is_empty() {
        return Err(bad("\"documents\" must be a non-empty string array"));
    }
    let top_n = body
        .get("top_n")
        .and_then(Value::as_u64)
        .map_or(documents.len(), |n| n as usize);
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let query_words = words(&query);
    let label = if tei { "score" } else { "relevance_score" };
    let return_text = tei && body.get("return_text").and_then(Value::as_bool) == Some(true);
    let mut tokens = 0;
    let mut results: Vec<(f64, Value)> = documents
        .iter()
        .enumerate()
        .map(|(index, doc)| {
            let doc_words = words(doc);
            let hits = query_words.iter().filter(|w| doc_words.contains(w)).count();
            let score = hits as f64 / query_words.len().max(1) as f64;
            tokens += ((query.len() + doc.len()) / 4).max(1) + 4;
            let mut v = json!({"index": index});
            v[label] = json!(score);
            if return_text {
                v["text"] = json!(doc);
            }
            (score, v)
        })
        .collect();
    results.sort_by(|a, b| b.0.total_cmp(&a.0));
    let results: Vec<Value> = results.into_iter().take(top_n).map(|(_, v)| v).collect();
    if tei {
        return Ok(Value::Array(results));
    }
    let model = body.get("model").cloned().unwrap_or_else(|| json!(alias));
    Ok(json!({"model": model, "object": "list",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}))
}

fn random_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("mock{nanos:09}x{n:06}")
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn sse_event(name: &str, v: &Value) -> String {
    format!("event: {name}\ndata: {v}\n\n")
}

/// What one generation sends, in its dialect: the non-streamed reply, or the
/// SSE text of each HTTP chunk of the stream.
struct Events<'a> {
    dialect: Dialect,
    model: &'a str,
    prompt_n: usize,
    /// Of `prompt_n`, the tokens found in the emulated prompt cache.
    cache_n: usize,
    include_usage: bool,
    /// The choice (`n`) this is, in the OpenAI chat and completions dialects.
    index: usize,
    created: u64,
    /// `chatcmpl-…`: chat, completions and (as in llama.cpp) messages.
    id: String,
    /// `resp_…` and `msg_…`: the Responses response and its message item.
    resp_id: String,
    item_id: String,
}

impl<'a> Events<'a> {
    fn new(
        dialect: Dialect,
        model: &'a str,
        prompt_n: usize,
        include_usage: bool,
        index: usize,
    ) -> Self {
        Events {
            dialect,
            model,
            prompt_n,
            cache_n: 0,
            include_usage,
            index,
            created: now(),
            id: format!("chatcmpl-{}", random_id()),
            resp_id: format!("resp_{}", random_id()),
            item_id: format!("msg_{}", random_id()),
        }
    }

    fn oai_usage(&self, tokens: usize) -> Value {
        json!({"completion_tokens": tokens, "prompt_tokens": self.prompt_n, "total_tokens": tokens + self.prompt_n,
            "prompt_tokens_details": {"cached_tokens": self.cache_n}})
    }

    fn resp_usage(&self, tokens: usize) -> Value {
        json!({"input_tokens": self.prompt_n, "output_tokens": tokens, "total_tokens": tokens + self.prompt_n,
            "input_tokens_details": {"cached_tokens": self.cache_n}})
    }

    fn resp_part(text: &str) -> Value {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn resp_output(&self, text: &str) -> Value {
        if text.is_empty() {
            return json!([]);
        }
        json!([{"content": [Self::resp_part(text)], "id": self.item_id, "role": "assistant",
            "status": "completed", "type": "message"}])
    }

    /// The whole non-streamed reply of `tokens` tokens.
    fn complete(&self, tokens: usize) -> Value {
        let text = reply_text(tokens);
        let timings = timings(self.prompt_n, self.cache_n, tokens);
        match self.dialect {
            Dialect::Chat => {
                json!({"choices":[{"finish_reason":"stop","index":self.index,"message":{"role":"assistant","content": text}}],
                "created": self.created, "model": self.model, "system_fingerprint": "b11434-mock", "object":"chat.completion",
                "usage": self.oai_usage(tokens), "id": self.id, "timings": timings})
            }
            Dialect::Completions => {
                json!({"choices":[{"text": text, "index":self.index, "logprobs": null, "finish_reason":"stop"}],
                "created": self.created, "model": self.model, "system_fingerprint": "b11434-mock", "object":"text_completion",
                "usage": self.oai_usage(tokens), "id": self.id, "timings": timings})
            }
            Dialect::Responses => {
                json!({"completed_at": now(), "created_at": self.created, "id": self.resp_id,
                "model": self.model, "object": "response", "output": self.resp_output(&text), "status": "completed",
                "usage": self.resp_usage(tokens)})
            }
            Dialect::Messages => {
                let content = if text.is_empty() {
                    json!([])
                } else {
                    json!([{"type": "text", "text": text}])
                };
                json!({"id": self.id, "type": "message", "role": "assistant", "content": content,
                    "model": self.model, "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"cache_read_input_tokens": self.cache_n, "input_tokens": self.prompt_n - self.cache_n, "output_tokens": tokens}})
            }
        }
    }

    fn oai_chunk(&self, choice: Value) -> Value {
        let object = if self.dialect == Dialect::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"choices": [choice], "created": self.created, "id": self.id, "model": self.model,
            "system_fingerprint": "b11434-mock", "object": object})
    }

    /// Chunks before the first token's.
    fn preamble(&self) -> Vec<String> {
        match self.dialect {
            Dialect::Chat => vec![sse_data(&self.oai_chunk(
                json!({"finish_reason": null, "index": self.index, "delta": {"role": "assistant", "content": null}}),
            ))],
            _ => vec![],
        }
    }

    /// The chunk that carries token `i` (with the first, the events that open
    /// the message in the Responses and Messages dialects).
    fn token(&self, i: usize) -> String {
        let token = token_text(i);
        match self.dialect {
            Dialect::Chat | Dialect::Completions => {
                let choice = if self.dialect == Dialect::Chat {
                    json!({"finish_reason": null, "index": self.index, "delta": {"content": token}})
                } else {
                    json!({"text": token, "index": self.index, "logprobs": null, "finish_reason": null})
                };
                let mut v = self.oai_chunk(choice);
                let sent_at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_micros() as u64;
                v["mock_sent_us"] = json!(sent_at);
                sse_data(&v)
            }
            Dialect::Responses => {
                let mut out = String::new();
                if i == 0 {
                    let response =
                        json!({"id": self.resp_id, "object": "response", "status": "in_progress"});
                    for kind in ["response.created", "response.in_progress"] {
                        out += &sse_event(kind, &json!({"type": kind, "response": response}));
                    }
                    out += &sse_event(
                        "response.output_item.added",
                        &json!({"type": "response.output_item.added", "item": {"content": [], "id": self.item_id,
                            "role": "assistant", "status": "in_progress", "type": "message"}}),
                    );
                    out += &sse_event(
                        "response.content_part.added",
                        &json!({"type": "response.content_part.added", "item_id": self.item_id,
                            "part": {"type": "output_text", "text": ""}}),
                    );
                }
                out += &sse_event(
                    "response.output_text.delta",
                    &json!({"type": "response.output_text.delta", "item_id": self.item_id, "delta": token}),
                );
                out
            }
            Dialect::Messages => {
                let mut out = String::new();
                if i == 0 {
                    out += &sse_event(
                        "message_start",
                        &json!({"type": "message_start", "message": {"id": self.id, "type": "message",
                            "role": "assistant", "content": [], "model": self.model, "stop_reason": null,
                            "stop_sequence": null, "usage": {"cache_read_input_tokens": self.cache_n,
                            "input_tokens": self.prompt_n - self.cache_n, "output_tokens": 0}}}),
                    );
                    out += &sse_event(
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
                    );
                }
                out += &sse_event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": token}}),
                );
                out
            }
        }
    }

    /// What ends the stream after every choice has finished: `data: [DONE]`
    /// in the OpenAI chat and completions dialects, nothing in the others.
    fn done(&self) -> Option<&'static str> {
        match self.dialect {
            Dialect::Chat | Dialect::Completions => Some("data: [DONE]\n\n"),
            Dialect::Responses | Dialect::Messages => None,
        }
    }

    /// The chunks after the last token: the finish, usage and `timings` (for
    /// each choice; `[DONE]` comes once, after all of them: see `done`).
    fn finish(&self, tokens: usize) -> Vec<String> {
        let timings = timings(self.prompt_n, self.cache_n, tokens);
        let text = reply_text(tokens);
        match self.dialect {
            Dialect::Chat | Dialect::Completions => {
                let choice = if self.dialect == Dialect::Chat {
                    json!({"finish_reason": "stop", "index": self.index, "delta": {}})
                } else {
                    json!({"text": "", "index": self.index, "logprobs": null, "finish_reason": "stop"})
                };
                let mut fin = self.oai_chunk(choice);
                let mut out = Vec::new();
                if self.include_usage {
                    out.push(sse_data(&fin));
                    fin["choices"] = json!([]);
                    fin["usage"] = self.oai_usage(tokens);
                }
                fin["timings"] = timings;
                out.push(sse_data(&fin));
                out
            }
            Dialect::Responses => {
                let mut out = String::new();
                if !text.is_empty() {
                    out += &sse_event(
                        "response.output_text.done",
                        &json!({"type": "response.output_text.done", "item_id": self.item_id, "text": text}),
                    );
                    out += &sse_event(
                        "response.content_part.done",
                        &json!({"type": "response.content_part.done", "item_id": self.item_id,
                            "part": Self::resp_part(&text)}),
                    );
                    out += &sse_event(
                        "response.output_item.done",
                        &json!({"type": "response.output_item.done", "item": self.resp_output(&text)[0]}),
                    );
                }
                out += &sse_event(
                    "response.completed",
                    &json!({"type": "response.completed", "response": {"id": self.resp_id, "object": "response",
                        "created_at": now(), "status": "completed", "model": self.model,
                        "output": self.resp_output(&text), "usage": self.resp_usage(tokens)},
                        "timings": timings}),
                );
                vec![out]
            }
            Dialect::Messages => {
                let mut out = String::new();
                if !text.is_empty() {
                    out += &sse_event(
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": 0}),
                    );
                }
                out += &sse_event(
                    "message_delta",
                    &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                        "usage": {"output_tokens": tokens}}),
                );
                out += &sse_event("message_stop", &json!({"type": "message_stop"}));
                vec![out]
            }
        }
    }
}

pub fn token_text(i: usize) -> String {
    format!("tok{i} ")
}

/// The full reply of `tokens` tokens.
pub fn reply_text(tokens: usize) -> String {
    (0..tokens).map(token_text).collect()
}

/// llama.cpp's `timings`: `prompt_n` counts the tokens evaluated, the
/// cached ones (`cache_n`) apart.
fn timings(prompt_n: usize, cache_n: usize, predicted_n: usize) -> Value {
    json!({"cache_n": cache_n, "prompt_n": prompt_n - cache_n, "prompt_ms": 1.5, "prompt_per_token_ms": 0.1, "prompt_per_second": 1000.0,
        "predicted_n": predicted_n, "predicted_ms": 2.5, "predicted_per_token_ms": 0.3, "predicted_per_second": 400.0})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn send_event(stream: &mut TcpStream, data: &str) -> std::io::Result<()> {
    send_chunk(stream, &format!("data: {data}\n\n")).await
}

/// Writes `text` as one HTTP chunk.
async fn send_chunk(stream: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let chunk = format!("{:x}\r\n{text}\r\n", text.len());
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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `Keep-Alive: timeout=5, max=100`, or `Connection: close` on a connection's
/// last reply; with `x-mock-fault: hop-headers`, [`HOP_HEADERS`] (its
/// `Connection` saying `close, X-Hop-Secret` on a last reply).
fn connection_headers(fault: &str, close: bool) -> &'static str {
    match (fault == "hop-headers", close) {
        (false, false) => "Keep-Alive: timeout=5, max=100\r\n",
        (false, true) => "Connection: close\r\n",
        (true, false) => HOP_HEADERS,
        (true, true) => "Connection: close, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5, max=100\r\n",
    }
}

/// A llama-server style reply. `fault` shapes a successful one:
/// `hop-headers` adds [`HOP_HEADERS`], `chunked-json` sends the body as two
/// chunks instead of with a `Content-Length`.
async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    fault: &str,
) -> std::io::Result<()> {
    let chunked = fault == "chunked-json";
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n".to_string()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\nContent-Type: {content_type}; charset=utf-8\r\n{framing}{}\r\n",
        reason(status),
        connection_headers(fault, close)
    );
    stream.write_all(head.as_bytes()).await?;
    if chunked {
        let (a, b) = body.split_at(body.len() / 2);
        for part in [a, b] {
            if !part.is_empty() {
                stream
                    .write_all(format!("{:x}\r\n", part.len()).as_bytes())
                    .await?;
                stream.write_all(part).await?;
                stream.write_all(b"\r\n").await?;
            }
        }
        stream.write_all(b"0\r\n\r\n").await?;
    } else {
        stream.write_all(body).await?;
    }
    stream.flush().await
}

/// A reply with exactly these headers: `Content-Type` as given (none when
/// None), `Content-Length`, and `Connection: close` when `close`.
async fn write_exact(
    stream: &mut TcpStream,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(ct) = content_type {
        head += &format!("Content-Type: {ct}\r\n");
    }
    head += &format!("Content-Length: {}\r\n", body.len());
    head += if close {
        "Connection: close\r\n\r\n"
    } else {
        "Keep-Alive: timeout=5, max=100\r\n\r\n"
    };
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// llama-server's JSON error (`{"error":{"code","message","type"}}`), after
/// which the mock closes the connection. Returns Ok(false) for `respond`.
async fn error_reply(
    stream: &mut TcpStream,
    status: u16,
    message: &str,
    kind: &str,
) -> std::io::Result<bool> {
    let body = json!({"error": {"code": status, "message": message, "type": kind}});
    write_response(
        stream,
        status,
        "application/json",
        body.to_string().as_bytes(),
        true,
        "",
    )
    .await?;
    Ok(false)
}

/// `%XX` escapes decoded, as cpp-httplib does to the path before routing.
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What llama-server (cpp-httplib, b11434) does after every streamed
/// response although its headers said keep-alive: the stream's provider
/// reports "no more" after the last chunk, which httplib takes for a
/// cancel, so it half-closes, reads and discards whatever arrives for up to
/// 100 ms (a request sent on the connection meanwhile is lost unanswered),
/// then closes.
async fn drain_and_close(stream: &mut TcpStream) {
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
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
