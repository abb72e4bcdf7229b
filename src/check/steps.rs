//! The network steps: `connection`, `upstream`, `models`, `chat` and
//! `streaming`, one method each on [`Net`], each turning the gateway's answer
//! (or its absence) into one [`Check`] with a hint. Just over 500 lines, kept
//! whole as one cohesive thing: the five steps side by side, the streaming
//! step alone a third of it.

use std::fmt::Write as _;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::hints::{
    api_error_hint, parse_error_body, path_hint, snippet, ErrorInfo, HintCtx, LOADING_HINT,
    TUNNEL_HINT,
};
use super::net::{ms, quote, round1, Net, NetError, Reply};
use super::report::{Check, Status};
use super::stream::StreamScan;

/// `max_tokens` of the test requests: enough to measure a rate, cheap to generate.
pub const MAX_TOKENS: u32 = 16;
const PROMPT: &str = "Say hello in five words.";
/// The most of a stream read before giving up on it.
const STREAM_LIMIT: usize = 8 << 20;

impl Net<'_> {
    /// Step 1: `GET /health`. Also says whether anything answered at all.
    pub(super) async fn connection(&self) -> (Check, bool) {
        let name = "connection";
        let url = format!("{}/health", self.s.base.root);
        let req = self.client.get(&url);
        let reply = match self.fetch(req, self.deadline()).await {
            Ok(r) => r,
            Err(e) => {
                let what = format!("GET {url}");
                return (self.net_failure(name, Status::Fail, &what, e, None), false);
            }
        };
        let latency = ms(reply.elapsed);
        let healthy = reply.status == 200
            && serde_json::from_slice::<Value>(&reply.body)
                .is_ok_and(|v| v.get("status").and_then(Value::as_str) == Some("ok"));
        let check = if healthy {
            Check::pass(
                name,
                format!("gateway at {} answered in {latency} ms", self.s.base.root),
            )
        } else {
            Check::fail(
                name,
                format!("GET {url} answered {}: {}", reply.status, snippet(&reply.body)),
                format!(
                    "something answers at {}:{} but not llm-edge's /health: a wrong port, or a proxy in front that does not forward /health",
                    self.s.base.host, self.s.base.port
                ),
            )
        };
        (
            check
                .with("http_status", reply.status)
                .with("latency_ms", latency),
            true,
        )
    }

    /// Step 2: `GET /health/upstream`. Problems are warnings.
    pub(super) async fn upstream(&self) -> Check {
        let name = "upstream";
        let url = format!("{}/health/upstream", self.s.base.root);
        let reply = match self.fetch(self.client.get(&url), self.deadline()).await {
            Ok(r) => r,
            Err(e) => {
                return self.net_failure(
                    name,
                    Status::Warn,
                    &format!("GET {url}"),
                    e,
                    Some("the gateway's probe of llama-server hangs: the SSH tunnel on the edge (Machine B) may be stuck"),
                )
            }
        };
        let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let state = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let upstream = body.get("upstream").and_then(Value::as_str).unwrap_or("");
        let message = body
            .get("error")
            .map(ErrorInfo::from_value)
            .map(|e| e.message)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| snippet(&reply.body));
        let check = match (reply.status, state.as_str()) {
            (200, "ok") => {
                let at = if upstream.is_empty() {
                    String::new()
                } else {
                    format!(" at {upstream}")
                };
                Check::pass(
                    name,
                    format!(
                        "llama-server{at} is reachable behind the gateway ({} ms)",
                        ms(reply.elapsed)
                    ),
                )
            }
            (200, "degraded") => {
                let down: Vec<String> = body
                    .get("upstreams")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|u| u.get("status").and_then(Value::as_str) != Some("ok"))
                    .map(|u| {
                        format!(
                            "{} ({})",
                            u.get("name").and_then(Value::as_str).unwrap_or("?"),
                            u.get("status").and_then(Value::as_str).unwrap_or("?")
                        )
                    })
                    .collect();
                Check::warn(
                    name,
                    format!("some upstream servers are not up: {}; requests go to the others", down.join(", ")),
                    "see /health/upstream on the gateway for each server's reason; on the edge, the tunnel of each down server",
                )
            }
            (_, "loading") => Check::warn(name, format!("{} loading: {message}", reply.status), LOADING_HINT),
            (_, "unreachable") => Check::warn(
                name,
                format!("{} unreachable: {message}", reply.status),
                TUNNEL_HINT,
            ),
            (_, "unhealthy") => Check::warn(
                name,
                format!("{} unhealthy: {message}", reply.status),
                "llama-server answers but reports a problem: see its log on the GPU machine",
            ),
            (404, _) => Check::warn(
                name,
                format!("GET {url} answered 404: {message}"),
                "this gateway has no /health/upstream (an older llm-edge, or a proxy that does not forward it); the chat step will tell",
            ),
            (status, _) => Check::warn(
                name,
                format!("GET {url} answered {status}: {message}"),
                "an unexpected answer from the gateway's upstream probe; the chat step will tell",
            ),
        };
        let check = check
            .with("http_status", reply.status)
            .with("latency_ms", ms(reply.elapsed));
        if state.is_empty() {
            check
        } else {
            check.with("upstream_status", state)
        }
    }

    /// Step 3: `GET /v1/models` with the key. The model ids when it passes.
    pub(super) async fn models(&self) -> (Check, Option<Vec<String>>) {
        let name = "models";
        let url = format!("{}/models", self.s.base.api);
        let req = self.request(reqwest::Method::GET, &url);
        let reply = match self.fetch(req, self.deadline()).await {
            Ok(r) => r,
            Err(e) => {
                let check = self.net_failure(name, Status::Fail, &format!("GET {url}"), e, None);
                return (check, None);
            }
        };
        let ctx = HintCtx {
            model: self.s.model.as_deref(),
            models: &[],
            key_source: self.s.key_source,
        };
        if reply.status != 200 {
            return (self.error_check(name, &reply, &ctx), None);
        }
        let ids: Option<Vec<String>> =
            serde_json::from_slice::<Value>(&reply.body)
                .ok()
                .and_then(|v| {
                    v.get("data")?.as_array().map(|data| {
                        data.iter()
                            .filter_map(|m| m.get("id").and_then(Value::as_str))
                            .map(str::to_string)
                            .collect()
                    })
                });
        let Some(ids) = ids else {
            let check = Check::fail(
                name,
                format!(
                    "GET {url} answered 200 but not a model list: {}",
                    snippet(&reply.body)
                ),
                path_hint(),
            );
            return (check.with("http_status", 200), None);
        };
        let check = if ids.is_empty() {
            Check::warn(
                name,
                "the key is accepted but lists no models",
                "the key's `models` in the edge's config matches no model",
            )
        } else {
            let what = if self.s.api_key.is_some() {
                "key accepted"
            } else {
                "no key needed"
            };
            Check::pass(
                name,
                format!("{what}; {} models: {}", ids.len(), ids.join(", ")),
            )
        };
        let check = check
            .with("http_status", 200)
            .with("latency_ms", ms(reply.elapsed))
            .with("models", ids.clone());
        (check, Some(ids))
    }

    /// A non-2xx answer as a failed check.
    fn error_check(&self, name: &'static str, reply: &Reply, ctx: &HintCtx) -> Check {
        let check = match parse_error_body(&reply.body) {
            Some(err) => {
                let hint = api_error_hint(Some(reply.status), &err, ctx);
                let check = Check::fail(name, err.describe(Some(reply.status)), hint);
                if err.code.is_empty() {
                    check
                } else {
                    check.with("error_code", err.code)
                }
            }
            None => Check::fail(
                name,
                format!("{}: {}", reply.status, snippet(&reply.body)),
                format!(
                    "{}; the body is not an OpenAI error, so something other than llm-edge (a proxy?) may be answering",
                    api_error_hint(Some(reply.status), &ErrorInfo::default(), ctx)
                ),
            ),
        };
        check
            .with("http_status", reply.status)
            .with("latency_ms", ms(reply.elapsed))
    }

    fn chat_body(model: &str, stream: bool) -> Value {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        })
    }

    fn slow_hint(&self) -> String {
        format!(
            "no reply within {} s: the model may be slow (raise --timeout) or llama-server is stuck; see the upstream step",
            self.secs()
        )
    }

    /// Step 4: one short non-streamed completion.
    pub(super) async fn chat(&self, model: &str, ctx: &HintCtx<'_>) -> Check {
        let name = "chat";
        let url = format!("{}/chat/completions", self.s.base.api);
        let req = self
            .request(reqwest::Method::POST, &url)
            .json(&Self::chat_body(model, false));
        let reply = match self.fetch(req, self.deadline()).await {
            Ok(r) => r,
            Err(e) => {
                let slow = self.slow_hint();
                return self
                    .net_failure(name, Status::Fail, &format!("POST {url}"), e, Some(&slow))
                    .with("model", model);
            }
        };
        if reply.status != 200 {
            return self.error_check(name, &reply, ctx).with("model", model);
        }
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let Some(message) = v.pointer("/choices/0/message") else {
            return Check::fail(
                name,
                format!("200 but not a chat completion: {}", snippet(&reply.body)),
                "something other than llm-edge (a proxy?) answers at this URL",
            )
            .with("http_status", 200)
            .with("model", model);
        };
        let text = |k: &str| message.get(k).and_then(Value::as_str).unwrap_or("");
        let (content, reasoning) = (text("content"), text("reasoning_content"));
        let tokens = v
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64);
        let latency = ms(reply.elapsed);
        let mut detail = format!("model {model} replied in {latency} ms");
        if let Some(n) = tokens {
            let _ = write!(detail, " ({n} tokens)");
        }
        if !content.is_empty() {
            let _ = write!(detail, ": {}", quote(content));
        } else if !reasoning.is_empty() {
            let _ = write!(detail, ": (reasoning only) {}", quote(reasoning));
        } else {
            detail.push_str(": (empty reply)");
        }
        let mut check = Check::pass(name, detail)
            .with("http_status", 200)
            .with("model", model)
            .with("latency_ms", latency)
            .with(
                "reply",
                if content.is_empty() {
                    reasoning
                } else {
                    content
                },
            );
        if let Some(n) = tokens {
            check = check.with("completion_tokens", n);
        }
        check
    }

    /// Step 5: the same, streamed.
    pub(super) async fn streaming(&self, model: &str, ctx: &HintCtx<'_>) -> Check {
        let name = "streaming";
        let url = format!("{}/chat/completions", self.s.base.api);
        let req = self
            .request(reqwest::Method::POST, &url)
            .header("Accept", "text/event-stream")
            .json(&Self::chat_body(model, true));
        let deadline = self.deadline();
        let start = Instant::now();
        let slow = self.slow_hint();
        let mut resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => {
                return self
                    .net_failure(
                        name,
                        Status::Fail,
                        &format!("POST {url}"),
                        NetError::Timeout,
                        Some(&slow),
                    )
                    .with("model", model)
            }
            Ok(Err(e)) => {
                let err = self.transport(&e);
                return self
                    .net_failure(name, Status::Fail, &format!("POST {url}"), err, Some(&slow))
                    .with("model", model);
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        if status != 200 {
            let body = match self.read_body(&mut resp, deadline).await {
                Ok(b) => b,
                Err(e) => {
                    return self
                        .net_failure(
                            name,
                            Status::Fail,
                            &format!("POST {url} ({status})"),
                            e,
                            Some(&slow),
                        )
                        .with("model", model)
                }
            };
            let reply = Reply {
                status,
                body,
                elapsed: start.elapsed(),
            };
            return self.error_check(name, &reply, ctx).with("model", model);
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();

        let mut scan = StreamScan::default();
        let mut received = 0usize;
        let mut cut: Option<NetError> = None;
        loop {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Err(_) => {
                    cut = Some(NetError::Timeout);
                    break;
                }
                Ok(Err(e)) => {
                    cut = Some(self.transport(&e));
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    received += chunk.len();
                    scan.feed(&chunk, start.elapsed());
                    if scan.done || scan.error.is_some() {
                        break;
                    }
                    if received > STREAM_LIMIT {
                        cut = Some(NetError::TooLarge);
                        break;
                    }
                }
            }
        }
        scan.finish(start.elapsed());
        let total = start.elapsed();
        let tps = scan.tokens_per_s().map(round1);
        let ttft = scan.first_token.map(ms);
        let metrics = |check: Check| {
            let mut check = check
                .with("http_status", status)
                .with("model", model)
                .with("done", scan.done)
                .with("tokens", scan.tokens)
                .with("ttft_ms", ttft)
                .with("tokens_per_s", tps)
                .with("generation_ms", scan.generation().map(ms))
                .with("total_ms", ms(total));
            if let Some(up) = scan.upstream_tokens_per_s {
                check = check.with("upstream_tokens_per_s", round1(up));
            }
            check
        };

        if let Some(err) = &scan.error {
            let check = Check::fail(
                name,
                format!(
                    "the stream ended with an error after {} tokens: {}",
                    scan.tokens,
                    err.describe(None)
                ),
                api_error_hint(None, err, ctx),
            )
            .with("error_code", err.code.clone());
            return metrics(check);
        }
        if scan.done {
            let mut detail = format!("data: [DONE] after {} tokens", scan.tokens);
            match ttft {
                Some(t) => {
                    let _ = write!(detail, "; first token after {t} ms");
                }
                None => detail.push_str("; no content deltas"),
            }
            match tps {
                Some(r) => {
                    let _ = write!(detail, ", {r:.1} tokens/s");
                }
                None => detail.push_str(", tokens/s n/a"),
            }
            return metrics(Check::pass(name, detail));
        }
        let check = match cut {
            Some(NetError::Timeout) => Check::fail(
                name,
                format!(
                    "no data: [DONE] within {} s ({} tokens received)",
                    self.secs(),
                    scan.tokens
                ),
                if scan.tokens > 0 {
                    format!("generation is slower than --timeout {} s allows (raise it), or a proxy holds the stream back", self.secs())
                } else {
                    slow.clone()
                },
            ),
            Some(NetError::TooLarge) => Check::fail(
                name,
                format!("no data: [DONE] after {STREAM_LIMIT} bytes"),
                "the server ignores max_tokens, or something other than llm-edge answers",
            ),
            Some(NetError::Transport { kind, detail }) => Check::fail(
                name,
                format!("the stream broke after {} tokens: {detail}", scan.tokens),
                "the connection was cut mid-reply: the SSH tunnel or llama-server dropped, or a proxy between you and the gateway closed it",
            )
            .with("error", kind.as_str()),
            None if scan.events == 0 => Check::fail(
                name,
                format!(
                    "200 with no SSE events (Content-Type: {}): {}",
                    if content_type.is_empty() { "none" } else { &content_type },
                    quote(&scan.text)
                ),
                "the server ignored stream: true, or a proxy buffers or rewrites the stream",
            ),
            None => Check::fail(
                name,
                format!(
                    "the stream ended without data: [DONE] after {} tokens",
                    scan.tokens
                ),
                "the reply was cut: the SSH tunnel or llama-server dropped mid-reply, or a proxy closed the connection",
            ),
        };
        metrics(check)
    }
}
