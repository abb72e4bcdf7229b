//! `llm-edge check`: client-side diagnostics, run from any client machine
//! (Machine C) against a gateway.
//!
//! Five steps, in order, each reported as one PASS/WARN/FAIL/SKIP line with a
//! hint naming the likely cause of a failure:
//!
//! 1. `connection`: `GET /health` (no key): is the gateway there at all?
//! 2. `upstream`: `GET /health/upstream` (no key): is llama-server reachable
//!    behind the SSH tunnel? Only a warning, so the auth step still runs.
//! 3. `models`: `GET /v1/models` with the key: is the key accepted, which models?
//! 4. `chat`: `POST /v1/chat/completions`, a short prompt, `max_tokens` 16.
//! 5. `streaming`: the same with `stream: true`; passes when `data: [DONE]`
//!    arrives, and measures the time to the first token and tokens/s.
//!
//! Steps that cannot work after an earlier failure are reported as skipped.
//! Every network step is bounded by `--timeout`. Exit code: 0 when nothing
//! failed, 1 on any failure, 2 on a usage error.
//!
//! The pure parts (settings, URL normalisation, error hints, the SSE scan,
//! the report) come first and are unit-tested; the network steps follow.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::cli::CheckArgs;

/// `max_tokens` of the test requests: enough to measure a rate, cheap to generate.
pub const MAX_TOKENS: u32 = 16;
const PROMPT: &str = "Say hello in five words.";
/// The most of a (non-streamed) body read; replies to the test requests are small.
const BODY_LIMIT: usize = 1 << 20;
/// The most of a stream read before giving up on it.
const STREAM_LIMIT: usize = 8 << 20;
const MAX_TIMEOUT_SECS: u64 = 86_400;

const TUNNEL_HINT: &str = "the gateway is up but cannot reach llama-server behind it: the SSH tunnel on the edge (Machine B) is down or llama-server is not running";
const LOADING_HINT: &str =
    "model still loading: llama-server is still loading its model; retry in a minute";

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

/// The gateway's address, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Without `/v1` and without a trailing slash: `/health` lives here.
    pub root: String,
    /// `root` + `/v1`: the OpenAI API.
    pub api: String,
    pub host: String,
    pub port: u16,
    pub https: bool,
}

/// Accepts the URL with or without `/v1` and with or without a trailing slash.
pub fn normalize_base_url(raw: &str) -> Result<BaseUrl, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("the base URL is empty".into());
    }
    let url = reqwest::Url::parse(trimmed).map_err(|e| {
        format!("invalid base URL '{trimmed}': {e} (expected e.g. http://HOST:8000/v1)")
    })?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "invalid base URL '{trimmed}': scheme '{other}' (use http:// or https://)"
            ))
        }
    };
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => return Err(format!("invalid base URL '{trimmed}': no host")),
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "invalid base URL '{trimmed}': no query or fragment allowed"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "invalid base URL '{trimmed}': credentials in the URL are not supported (use --api-key)"
        ));
    }
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let mut path = url.path().trim_end_matches('/');
    if let Some(p) = path.strip_suffix("/v1") {
        path = p.trim_end_matches('/');
    }
    let root = format!("{}{path}", url.origin().ascii_serialization());
    Ok(BaseUrl {
        api: format!("{root}/v1"),
        root,
        host,
        port,
        https,
    })
}

/// Everything a check run needs, resolved from the flags and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub base: BaseUrl,
    pub api_key: Option<String>,
    /// Where the key came from (`--api-key` or the variable's name).
    pub key_source: Option<&'static str>,
    pub model: Option<String>,
    pub json: bool,
    pub timeout: Duration,
}

/// The flag, else the first non-empty variable of `vars`.
fn pick(
    flag: Option<&str>,
    flag_name: &'static str,
    vars: [&'static str; 2],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, &'static str)> {
    let non_empty = |v: String| {
        let t = v.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    if let Some(v) = flag.map(str::to_string).and_then(non_empty) {
        return Some((v, flag_name));
    }
    vars.iter()
        .find_map(|name| env(name).and_then(non_empty).map(|v| (v, *name)))
}

/// Flags first, then `LLM_*`, then the seed's `TEST_*` variables.
pub fn resolve_settings(
    args: &CheckArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, String> {
    let Some((raw_url, _)) = pick(
        args.base_url.as_deref(),
        "--base-url",
        ["LLM_BASE_URL", "TEST_BASE_URL"],
        env,
    ) else {
        return Err(
            "no gateway URL: pass --base-url http://HOST:8000/v1 or set LLM_BASE_URL".into(),
        );
    };
    let base = normalize_base_url(&raw_url)?;
    if args.timeout == 0 || args.timeout > MAX_TIMEOUT_SECS {
        return Err(format!(
            "--timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    let key = pick(
        args.api_key.as_deref(),
        "--api-key",
        ["LLM_API_KEY", "TEST_API_KEY"],
        env,
    );
    let model = pick(
        args.model.as_deref(),
        "--model",
        ["LLM_MODEL", "TEST_MODEL"],
        env,
    );
    Ok(Settings {
        base,
        key_source: key.as_ref().map(|(_, source)| *source),
        api_key: key.map(|(k, _)| k),
        model: model.map(|(m, _)| m),
        json: args.json,
        timeout: Duration::from_secs(args.timeout),
    })
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// Something is wrong, but the later steps still run.
    Warn,
    Fail,
    /// Not run because an earlier step failed.
    Skipped,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "SKIP",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub hint: Option<String>,
    /// Extra JSON fields: `http_status`, `latency_ms`, `models`, `ttft_ms`, ...
    pub metrics: Map<String, Value>,
}

impl Check {
    pub fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            hint: None,
            metrics: Map::new(),
        }
    }

    pub fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Pass, detail)
    }

    pub fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }

    pub fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }

    pub fn skipped(name: &'static str, why: &str) -> Check {
        Check::new(name, Status::Skipped, format!("skipped: {why}"))
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Check {
        self.metrics.insert(key.to_string(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("ok".into(), json!(self.status == Status::Pass));
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("detail".into(), json!(self.detail));
        m.insert("hint".into(), json!(self.hint));
        for (k, v) in &self.metrics {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(m)
    }

    /// `PASS connection  gateway at http://... answered in 3 ms`
    pub fn line(&self) -> String {
        let mut line = format!("{} {:<10}  {}", self.status.label(), self.name, self.detail);
        if let Some(hint) = &self.hint {
            let _ = write!(line, " -> hint: {hint}");
        }
        line
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub base: BaseUrl,
    pub model: Option<String>,
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no step failed (a warning alone does not fail the run).
    pub fn ok(&self) -> bool {
        self.checks
            .iter()
            .all(|c| matches!(c.status, Status::Pass | Status::Warn))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "base_url": self.base.api,
            "root_url": self.base.root,
            "model": self.model,
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn summary(&self) -> String {
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        let mut parts = vec![format!("{} passed", count(Status::Pass))];
        for (status, word) in [
            (Status::Warn, "warning"),
            (Status::Fail, "failed"),
            (Status::Skipped, "skipped"),
        ] {
            let n = count(status);
            if n > 0 {
                let plural = if status == Status::Warn && n > 1 {
                    "s"
                } else {
                    ""
                };
                parts.push(format!("{n} {word}{plural}"));
            }
        }
        format!(
            "result: {} ({}) for {}",
            if self.ok() { "ok" } else { "FAILED" },
            parts.join(", "),
            self.base.api
        )
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let _ = writeln!(out, "{}", check.line());
        }
        let _ = writeln!(out, "{}", self.summary());
        out
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------
// Error bodies and hints
// ---------------------------------------------------------------------------

/// The `error` object of an OpenAI-shaped error body (the gateway's, or
/// llama-server's passed through, whose `code` is a number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    pub kind: String,
}

impl ErrorInfo {
    fn from_value(err: &Value) -> ErrorInfo {
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        match err {
            Value::String(s) => ErrorInfo {
                message: s.clone(),
                ..ErrorInfo::default()
            },
            _ => ErrorInfo {
                code: text(err.get("code")),
                message: text(err.get("message")),
                kind: text(err.get("type")),
            },
        }
    }

    /// `404 model_not_found: the model 'x' does not exist`
    pub fn describe(&self, status: Option<u16>) -> String {
        let mut out = status.map(|s| s.to_string()).unwrap_or_default();
        let label = if self.code.is_empty() || self.code.parse::<u16>().is_ok() {
            &self.kind
        } else {
            &self.code
        };
        if !label.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(label);
        }
        if !self.message.is_empty() {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&self.message);
        }
        out
    }
}

pub fn parse_error_body(body: &[u8]) -> Option<ErrorInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error").map(ErrorInfo::from_value)
}

/// What the hints need to know about the run.
#[derive(Debug, Clone, Copy)]
pub struct HintCtx<'a> {
    pub model: Option<&'a str>,
    /// The models `/v1/models` listed for this key.
    pub models: &'a [String],
    pub key_source: Option<&'a str>,
}

fn model_list(models: &[String]) -> String {
    if models.is_empty() {
        "none listed for this key".into()
    } else {
        models.join(", ")
    }
}

/// The hint for an error answer (`status` None: an error event in a stream).
pub fn api_error_hint(status: Option<u16>, err: &ErrorInfo, ctx: &HintCtx) -> String {
    let model = ctx.model.unwrap_or("?");
    let loading = err.message.to_ascii_lowercase().contains("loading")
        || err.code.eq_ignore_ascii_case("loading");
    match err.code.as_str() {
        "missing_api_key" | "invalid_api_key" => return key_hint(ctx.key_source),
        "model_not_allowed" => {
            return format!(
                "this key may not use the model '{model}'; models it may use: {} (pick one with --model or LLM_MODEL)",
                model_list(ctx.models)
            )
        }
        "model_not_found" => {
            return format!(
                "the model '{model}' does not exist on this gateway; available models: {} (pass --model or set LLM_MODEL)",
                model_list(ctx.models)
            )
        }
        "not_found" | "method_not_allowed" => return path_hint(),
        "upstream_unreachable" => return TUNNEL_HINT.into(),
        "upstream_error" => {
            return "llama-server broke off the exchange: check the SSH tunnel on the edge (Machine B) and llama-server's log on the GPU machine".into()
        }
        "upstream_timeout" => return timeout_upstream_hint(),
        "gateway_overloaded" => {
            return "the gateway is at its concurrency limit: retry later, or raise its limits on the edge".into()
        }
        _ => {}
    }
    if loading {
        return LOADING_HINT.into();
    }
    match status {
        Some(401) if err.kind == "authentication_error" && err.code.parse::<u16>().is_ok() => {
            "llama-server rejected the gateway's own request: upstream.api_key in the edge's config does not match llama-server's --api-key".into()
        }
        Some(401) => key_hint(ctx.key_source),
        Some(403) => format!(
            "this key may not use the model '{model}'; models it may use: {}",
            model_list(ctx.models)
        ),
        Some(404) | Some(405) => path_hint(),
        Some(400) | Some(422) => "the gateway or llama-server rejected the test request: see the message".into(),
        Some(413) => "the request was too large for the gateway's limits".into(),
        Some(429) => "rate limited: retry later".into(),
        Some(500) => "the gateway failed internally: see its log on the edge (journalctl -u llm-edge)".into(),
        Some(502) => TUNNEL_HINT.into(),
        Some(503) => "llama-server is unavailable (busy or loading): retry in a moment".into(),
        Some(504) => timeout_upstream_hint(),
        Some(s) => format!("unexpected answer {s}: see the message"),
        None => "the gateway ended the stream with an error: see the message".into(),
    }
}

fn key_hint(source: Option<&str>) -> String {
    match source {
        None => "key missing: no API key was given; pass --api-key or set LLM_API_KEY".into(),
        Some("LLM_API_KEY") => "key missing/wrong: check LLM_API_KEY".into(),
        Some(other) => {
            format!("key missing/wrong: check LLM_API_KEY (the key used came from {other})")
        }
    }
}

fn path_hint() -> String {
    "no such path on this server: the base URL should be the gateway's root, with or without /v1 (e.g. http://HOST:8000/v1)".into()
}

fn timeout_upstream_hint() -> String {
    "upstream timeout: llama-server did not answer in time (overloaded, stuck, or a very long prompt); check it on the GPU machine, or raise upstream.first_byte_timeout on the edge".into()
}

/// A short, single-line excerpt of a body for the report.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 160 {
        format!("{}...", flat.chars().take(160).collect::<String>())
    } else if flat.is_empty() {
        "(empty body)".into()
    } else {
        flat
    }
}

// ---------------------------------------------------------------------------
// Transport failures
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Refused,
    Timeout,
    Dns,
    Tls,
    /// Connected, then closed or reset without an HTTP answer.
    Closed,
    /// No route to the host or network.
    Unreachable,
    Other,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Refused => "connection_refused",
            TransportKind::Timeout => "timeout",
            TransportKind::Dns => "dns",
            TransportKind::Tls => "tls",
            TransportKind::Closed => "connection_closed",
            TransportKind::Unreachable => "unreachable",
            TransportKind::Other => "transport",
        }
    }
}

/// Classifies a client error from its flags, the kinds of the I/O errors in
/// its source chain, and the chain's text.
pub fn classify_transport(
    is_timeout: bool,
    io_kinds: &[std::io::ErrorKind],
    text: &str,
    https: bool,
) -> TransportKind {
    use std::io::ErrorKind as K;
    let text = text.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if io_kinds.contains(&K::ConnectionRefused) || has(&["connection refused"]) {
        TransportKind::Refused
    } else if is_timeout || io_kinds.contains(&K::TimedOut) || has(&["timed out"]) {
        TransportKind::Timeout
    } else if has(&[
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "nodename nor servname",
        "no such host",
        "name resolution",
    ]) {
        TransportKind::Dns
    } else if https
        && has(&[
            "tls",
            "certificate",
            "handshake",
            "corrupt message",
            "invalidcontenttype",
            "unknownissuer",
            "notvalidforname",
            "alert",
        ])
    {
        TransportKind::Tls
    } else if io_kinds
        .iter()
        .any(|k| matches!(k, K::HostUnreachable | K::NetworkUnreachable))
        || has(&["no route to host", "network is unreachable"])
    {
        TransportKind::Unreachable
    } else if io_kinds.iter().any(|k| {
        matches!(
            k,
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
        )
    }) || has(&[
        "connection closed",
        "connection reset",
        "incomplete message",
        "broken pipe",
    ]) {
        TransportKind::Closed
    } else {
        TransportKind::Other
    }
}

/// The hint for a transport failure while reaching the gateway.
pub fn transport_hint(kind: TransportKind, base: &BaseUrl, timeout: Duration) -> String {
    let (host, port) = (&base.host, base.port);
    let secs = timeout.as_secs();
    match kind {
        TransportKind::Refused => format!(
            "gateway not running or port closed: nothing accepts connections at {host}:{port}; start llm-edge on the edge (systemctl status llm-edge) or check the port"
        ),
        TransportKind::Timeout => format!(
            "firewall or wrong address: nothing answered from {host}:{port} within {secs} s (a firewall dropping packets, a wrong IP or port, or a service there that is not llm-edge)"
        ),
        TransportKind::Dns => format!(
            "DNS failure: the name '{host}' does not resolve; check its spelling in the base URL, or use the edge's IP address"
        ),
        TransportKind::Tls => format!(
            "TLS error talking to https://{host}:{port}: check the certificate (name, expiry, issuer), or use http:// if nothing terminates TLS in front of the gateway (llm-edge itself speaks plain HTTP)"
        ),
        TransportKind::Closed => format!(
            "{host}:{port} accepted the connection but closed it without an HTTP answer: a wrong port, a proxy in the way, or http:// to a TLS port (try https://)"
        ),
        TransportKind::Unreachable => format!(
            "no route to {host}: a wrong address, or the network or a firewall blocks it"
        ),
        TransportKind::Other => format!("cannot talk to the gateway at {host}:{port}"),
    }
}

// ---------------------------------------------------------------------------
// The stream scan
// ---------------------------------------------------------------------------

/// Reads an SSE reply incrementally: content deltas, `[DONE]`, error events.
#[derive(Debug, Default, Clone)]
pub struct StreamScan {
    pending: Vec<u8>,
    /// `data:` lines seen.
    pub events: u64,
    /// Deltas with content (or `reasoning_content`, as thinking models send first).
    pub tokens: u64,
    pub first_token: Option<Duration>,
    pub last_token: Option<Duration>,
    pub done: bool,
    pub error: Option<ErrorInfo>,
    /// `timings.predicted_per_second`, when llama-server's final chunk has it.
    pub upstream_tokens_per_s: Option<f64>,
    /// `data:` lines that were neither JSON nor `[DONE]`.
    pub bad_events: u64,
    pub text: String,
}

impl StreamScan {
    /// Feeds bytes received `at` (since the request was sent).
    pub fn feed(&mut self, bytes: &[u8], at: Duration) {
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        for line in complete.split(|&b| b == b'\n') {
            self.line(&String::from_utf8_lossy(line), at);
        }
    }

    /// The end of the body: a last line without a newline still counts.
    pub fn finish(&mut self, at: Duration) {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            self.line(&String::from_utf8_lossy(&rest), at);
        }
    }

    fn line(&mut self, line: &str, at: Duration) {
        let line = line.trim_end_matches('\r');
        let Some(data) = line.strip_prefix("data:") else {
            return;
        };
        let data = data.trim();
        self.events += 1;
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            self.bad_events += 1;
            return;
        };
        if let Some(err) = v.get("error") {
            self.error = Some(ErrorInfo::from_value(err));
            return;
        }
        if let Some(tps) = v
            .pointer("/timings/predicted_per_second")
            .and_then(Value::as_f64)
        {
            self.upstream_tokens_per_s = Some(tps);
        }
        let choices = v.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let delta = choice.get("delta");
            let piece = ["content", "reasoning_content"]
                .iter()
                .filter_map(|k| delta.and_then(|d| d.get(*k)).and_then(Value::as_str))
                .find(|s| !s.is_empty());
            if let Some(piece) = piece {
                self.tokens += 1;
                self.first_token.get_or_insert(at);
                self.last_token = Some(at);
                if self.text.len() < 200 {
                    self.text.push_str(piece);
                }
            }
        }
    }

    /// The decode rate: the deltas after the first over the time from the
    /// first to the last. None with fewer than two deltas, or when they all
    /// arrived at once.
    pub fn tokens_per_s(&self) -> Option<f64> {
        let (first, last) = (self.first_token?, self.last_token?);
        let span = last.checked_sub(first)?.as_secs_f64();
        (self.tokens >= 2 && span > 0.0).then(|| (self.tokens - 1) as f64 / span)
    }

    pub fn generation(&self) -> Option<Duration> {
        self.last_token?.checked_sub(self.first_token?)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn quote(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 60 {
        format!("\"{}...\"", flat.chars().take(60).collect::<String>())
    } else {
        format!("\"{flat}\"")
    }
}

// ---------------------------------------------------------------------------
// The network steps
// ---------------------------------------------------------------------------

/// Runs `llm-edge check` and returns its exit code.
pub fn run(args: &CheckArgs) -> ExitCode {
    let settings = match resolve_settings(args, &|name| std::env::var(name).ok()) {
        Ok(s) => s,
        Err(e) => {
            if args.json {
                let doc = json!({"ok": false, "base_url": null, "error": e, "checks": []});
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                ));
            }
            eprintln!("llm-edge check: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-edge check: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_mode = settings.json;
    let report = runtime.block_on(run_checks(&settings, &mut |check: &Check| {
        if !json_mode {
            emit(&format!("{}\n", check.line()));
        }
    }));
    if json_mode {
        let doc = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        emit(&format!("{doc}\n"));
    } else {
        emit(&format!("{}\n", report.summary()));
    }
    report.exit_code()
}

/// Writes to stdout, ignoring a closed pipe (no panic as `println!` would).
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Runs the steps in order; `on_check` sees each as it completes.
pub async fn run_checks(s: &Settings, on_check: &mut dyn FnMut(&Check)) -> Report {
    let mut report = Report {
        base: s.base.clone(),
        model: s.model.clone(),
        checks: Vec::new(),
    };
    let mut push = |report: &mut Report, check: Check| {
        on_check(&check);
        report.checks.push(check);
    };
    let client = match reqwest::Client::builder()
        .connect_timeout(s.timeout)
        .user_agent(concat!("llm-edge-check/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            push(
                &mut report,
                Check::fail(
                    "connection",
                    format!("cannot create the HTTP client: {e}"),
                    "a local problem (TLS roots, proxy variables): see the message",
                ),
            );
            for name in ["upstream", "models", "chat", "streaming"] {
                push(&mut report, Check::skipped(name, "no HTTP client"));
            }
            return report;
        }
    };
    let net = Net { client, s };

    let (check, reachable) = net.connection().await;
    push(&mut report, check);
    if !reachable {
        for name in ["upstream", "models", "chat", "streaming"] {
            push(
                &mut report,
                Check::skipped(name, "the gateway cannot be reached"),
            );
        }
        return report;
    }
    push(&mut report, net.upstream().await);

    let (check, models) = net.models().await;
    push(&mut report, check);
    let Some(models) = models else {
        push(
            &mut report,
            Check::skipped("chat", "the models step failed"),
        );
        push(
            &mut report,
            Check::skipped("streaming", "the models step failed"),
        );
        return report;
    };
    let Some(model) = s.model.clone().or_else(|| models.first().cloned()) else {
        let why = "no model to try: the key lists none; pass --model";
        push(&mut report, Check::skipped("chat", why));
        push(&mut report, Check::skipped("streaming", why));
        return report;
    };
    report.model = Some(model.clone());
    let ctx = HintCtx {
        model: Some(&model),
        models: &models,
        key_source: s.key_source,
    };

    let check = net.chat(&model, &ctx).await;
    let chat_ok = check.status == Status::Pass;
    push(&mut report, check);
    if !chat_ok {
        push(
            &mut report,
            Check::skipped("streaming", "the chat step failed"),
        );
        return report;
    }
    push(&mut report, net.streaming(&model, &ctx).await);
    report
}

/// Why a request got no HTTP answer.
#[derive(Debug)]
enum NetError {
    /// Nothing within the step's deadline.
    Timeout,
    Transport {
        kind: TransportKind,
        detail: String,
    },
    TooLarge,
}

/// A complete (non-streamed) answer.
struct Reply {
    status: u16,
    body: Vec<u8>,
    elapsed: Duration,
}

struct Net<'a> {
    client: reqwest::Client,
    s: &'a Settings,
}

impl Net<'_> {
    fn deadline(&self) -> Instant {
        Instant::now() + self.s.timeout
    }

    fn secs(&self) -> u64 {
        self.s.timeout.as_secs()
    }

    fn transport(&self, err: &reqwest::Error) -> NetError {
        let mut chain: Vec<String> = Vec::new();
        let mut kinds = Vec::new();
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kinds.push(io.kind());
            }
            let text = e.to_string();
            if !chain.iter().any(|c| c.contains(&text)) {
                chain.push(text);
            }
            current = e.source();
        }
        let all = chain.join(": ");
        let kind = classify_transport(err.is_timeout(), &kinds, &all, self.s.base.https);
        if kind == TransportKind::Timeout {
            return NetError::Timeout;
        }
        // The first link only says "error sending request for url (...)".
        let detail = if chain.len() > 1 {
            chain[1..].join(": ")
        } else {
            all
        };
        NetError::Transport { kind, detail }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.s.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends and reads the whole body, all before `deadline`.
    async fn fetch(
        &self,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Result<Reply, NetError> {
        let start = Instant::now();
        let mut resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => return Err(NetError::Timeout),
            Ok(Err(e)) => return Err(self.transport(&e)),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        let body = self.read_body(&mut resp, deadline).await?;
        Ok(Reply {
            status,
            body,
            elapsed: start.elapsed(),
        })
    }

    async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        deadline: Instant,
    ) -> Result<Vec<u8>, NetError> {
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Err(_) => return Err(NetError::Timeout),
                Ok(Err(e)) => return Err(self.transport(&e)),
                Ok(Ok(None)) => return Ok(body),
                Ok(Ok(Some(chunk))) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > BODY_LIMIT {
                        return Err(NetError::TooLarge);
                    }
                }
            }
        }
    }

    /// A failed request as a check line: `fail` or `warn` with the hint.
    fn net_failure(
        &self,
        name: &'static str,
        status: Status,
        what: &str,
        err: NetError,
        timeout_hint: Option<&str>,
    ) -> Check {
        let (detail, hint, kind) = match err {
            NetError::Timeout => (
                format!("{what}: no answer within {} s", self.secs()),
                timeout_hint.map_or_else(
                    || transport_hint(TransportKind::Timeout, &self.s.base, self.s.timeout),
                    str::to_string,
                ),
                TransportKind::Timeout,
            ),
            NetError::Transport { kind, detail } => (
                format!("{what}: {detail}"),
                transport_hint(kind, &self.s.base, self.s.timeout),
                kind,
            ),
            NetError::TooLarge => (
                format!("{what}: the answer is larger than {BODY_LIMIT} bytes"),
                "something other than llm-edge answers at this URL".to_string(),
                TransportKind::Other,
            ),
        };
        Check::new(name, status, detail)
            .hint(hint)
            .with("error", kind.as_str())
    }

    /// Step 1: `GET /health`. Also says whether anything answered at all.
    async fn connection(&self) -> (Check, bool) {
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
    async fn upstream(&self) -> Check {
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
    async fn models(&self) -> (Check, Option<Vec<String>>) {
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
    async fn chat(&self, model: &str, ctx: &HintCtx<'_>) -> Check {
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
    async fn streaming(&self, model: &str, ctx: &HintCtx<'_>) -> Check {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(base: Option<&str>) -> CheckArgs {
        CheckArgs {
            base_url: base.map(str::to_string),
            api_key: None,
            model: None,
            json: false,
            timeout: 30,
        }
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn base_url_with_or_without_v1() {
        for raw in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
            " http://127.0.0.1:8000/v1// ",
        ] {
            let b = normalize_base_url(raw).unwrap();
            assert_eq!(b.root, "http://127.0.0.1:8000", "{raw}");
            assert_eq!(b.api, "http://127.0.0.1:8000/v1", "{raw}");
            assert_eq!(
                (b.host.as_str(), b.port, b.https),
                ("127.0.0.1", 8000, false)
            );
        }
        let b = normalize_base_url("https://llm.example.com/edge/v1").unwrap();
        assert_eq!(b.root, "https://llm.example.com/edge");
        assert_eq!(b.api, "https://llm.example.com/edge/v1");
        assert_eq!(b.port, 443);
        assert!(b.https);
        let b = normalize_base_url("http://[::1]:9/v1").unwrap();
        assert_eq!(b.root, "http://[::1]:9");
    }

    #[test]
    fn bad_base_urls_are_usage_errors() {
        for raw in [
            "",
            "127.0.0.1:8000",
            "ftp://host/",
            "http://",
            "http://h/?a=1",
            "http://u:p@h/",
        ] {
            assert!(normalize_base_url(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn flags_win_then_llm_then_test_variables() {
        let env = env_of(&[
            ("LLM_BASE_URL", "http://llm:1/v1"),
            ("TEST_BASE_URL", "http://test:2"),
            ("LLM_API_KEY", ""),
            ("TEST_API_KEY", "sk-test"),
            ("TEST_MODEL", "m-test"),
        ]);
        let s = resolve_settings(&args(None), &env).unwrap();
        assert_eq!(s.base.root, "http://llm:1");
        assert_eq!(s.api_key.as_deref(), Some("sk-test"));
        assert_eq!(s.key_source, Some("TEST_API_KEY"));
        assert_eq!(s.model.as_deref(), Some("m-test"));

        let mut a = args(Some("http://flag:3"));
        a.api_key = Some("sk-flag".into());
        a.model = Some("m-flag".into());
        let s = resolve_settings(&a, &env).unwrap();
        assert_eq!(s.base.root, "http://flag:3");
        assert_eq!(s.key_source, Some("--api-key"));
        assert_eq!(s.model.as_deref(), Some("m-flag"));

        let env = env_of(&[("TEST_BASE_URL", "http://test:2")]);
        let s = resolve_settings(&args(None), &env).unwrap();
        assert_eq!(s.base.root, "http://test:2");
        assert_eq!(s.api_key, None);
    }

    #[test]
    fn missing_url_or_bad_timeout_is_a_usage_error() {
        let none = |_: &str| None;
        assert!(resolve_settings(&args(None), &none)
            .unwrap_err()
            .contains("LLM_BASE_URL"));
        let mut a = args(Some("http://h:1"));
        a.timeout = 0;
        assert!(resolve_settings(&a, &none).is_err());
        a.timeout = u64::MAX;
        assert!(resolve_settings(&a, &none).is_err());
    }

    #[test]
    fn error_bodies_and_hints() {
        let models = vec!["qwen3".to_string(), "small".to_string()];
        let ctx = HintCtx {
            model: Some("nope"),
            models: &models,
            key_source: Some("--api-key"),
        };
        let err = parse_error_body(
            br#"{"error":{"message":"the model 'nope' does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#,
        )
        .unwrap();
        assert_eq!(
            err.describe(Some(404)),
            "404 model_not_found: the model 'nope' does not exist"
        );
        let hint = api_error_hint(Some(404), &err, &ctx);
        assert!(hint.contains("qwen3, small"), "{hint}");

        let key = ErrorInfo {
            code: "invalid_api_key".into(),
            ..ErrorInfo::default()
        };
        let hint = api_error_hint(Some(401), &key, &ctx);
        assert!(
            hint.contains("LLM_API_KEY") && hint.contains("--api-key"),
            "{hint}"
        );
        let no_key = HintCtx {
            key_source: None,
            ..ctx
        };
        assert!(api_error_hint(Some(401), &key, &no_key).contains("no API key"));

        // llama-server's own error, passed through: a numeric code.
        let loading = parse_error_body(
            br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
        )
        .unwrap();
        assert_eq!(loading.code, "503");
        assert_eq!(
            loading.describe(Some(503)),
            "503 unavailable_error: Loading model"
        );
        assert!(api_error_hint(Some(503), &loading, &ctx).contains("still loading"));

        let tunnel = ErrorInfo {
            code: "upstream_unreachable".into(),
            ..ErrorInfo::default()
        };
        assert!(api_error_hint(Some(502), &tunnel, &ctx).contains("SSH tunnel"));
        assert!(api_error_hint(Some(504), &ErrorInfo::default(), &ctx).contains("timeout"));
        assert!(api_error_hint(Some(403), &ErrorInfo::default(), &ctx).contains("may not use"));
        assert!(parse_error_body(b"<html>").is_none());
    }

    #[test]
    fn transport_classes() {
        use std::io::ErrorKind as K;
        assert_eq!(
            classify_transport(false, &[K::ConnectionRefused], "", false),
            TransportKind::Refused
        );
        assert_eq!(
            classify_transport(true, &[], "operation timed out", false),
            TransportKind::Timeout
        );
        assert_eq!(
            classify_transport(
                false,
                &[K::Other],
                "client error (Connect): dns error: failed to lookup address information: Name or service not known",
                false
            ),
            TransportKind::Dns
        );
        assert_eq!(
            classify_transport(
                false,
                &[K::InvalidData],
                "client error (Connect): received corrupt message of type InvalidContentType",
                true
            ),
            TransportKind::Tls
        );
        assert_eq!(
            classify_transport(false, &[], "invalid peer certificate: UnknownIssuer", true),
            TransportKind::Tls
        );
        assert_eq!(
            classify_transport(
                false,
                &[],
                "connection closed before message completed",
                false
            ),
            TransportKind::Closed
        );
        assert_eq!(
            classify_transport(false, &[K::NetworkUnreachable], "", false),
            TransportKind::Unreachable
        );
        assert_eq!(
            classify_transport(false, &[], "weird", false),
            TransportKind::Other
        );
        let base = normalize_base_url("http://10.0.0.9:8000").unwrap();
        let t = Duration::from_secs(5);
        assert!(transport_hint(TransportKind::Refused, &base, t).contains("not running"));
        assert!(
            transport_hint(TransportKind::Timeout, &base, t).contains("firewall or wrong address")
        );
        assert!(transport_hint(TransportKind::Dns, &base, t).contains("'10.0.0.9'"));
    }

    #[test]
    fn stream_scan_counts_deltas_and_sees_done_across_chunks() {
        let mut scan = StreamScan::default();
        let ev = |c: &str| {
            format!(
                "data: {}\n\n",
                json!({"choices":[{"index":0,"delta":{"content":c}}]})
            )
        };
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\r\n\r\n";
        scan.feed(role.as_bytes(), Duration::from_millis(5));
        let first = ev("tok0 ");
        let (a, b) = first.split_at(10);
        scan.feed(a.as_bytes(), Duration::from_millis(10));
        assert_eq!(scan.tokens, 0);
        scan.feed(b.as_bytes(), Duration::from_millis(20));
        scan.feed(ev("tok1 ").as_bytes(), Duration::from_millis(30));
        scan.feed(
            format!(
                "{}{}",
                ev("tok2 "),
                "data: {\"choices\":[{\"delta\":{}}],\"timings\":{\"predicted_per_second\":41.5}}\n\n"
            )
            .as_bytes(),
            Duration::from_millis(40),
        );
        scan.feed(b"data: [DONE]", Duration::from_millis(41));
        assert!(!scan.done);
        scan.finish(Duration::from_millis(42));
        assert!(scan.done);
        assert_eq!(scan.tokens, 3);
        assert_eq!(scan.first_token, Some(Duration::from_millis(20)));
        assert_eq!(scan.tokens_per_s(), Some(100.0));
        assert_eq!(scan.upstream_tokens_per_s, Some(41.5));
        assert_eq!(scan.text, "tok0 tok1 tok2 ");
        assert!(scan.error.is_none());
    }

    #[test]
    fn stream_scan_sees_an_error_event_and_reasoning() {
        let mut scan = StreamScan::default();
        scan.feed(
            b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n\n",
            Duration::from_millis(1),
        );
        scan.feed(
            b"data: {\"error\":{\"message\":\"cut\",\"type\":\"server_error\",\"code\":\"upstream_error\"}}\n\n",
            Duration::from_millis(2),
        );
        scan.finish(Duration::from_millis(3));
        assert_eq!(scan.tokens, 1);
        assert_eq!(scan.tokens_per_s(), None);
        assert!(!scan.done);
        assert_eq!(scan.error.unwrap().code, "upstream_error");
    }

    #[test]
    fn report_lines_json_and_exit() {
        let base = normalize_base_url("http://127.0.0.1:1/v1").unwrap();
        let report = Report {
            base,
            model: Some("m".into()),
            checks: vec![
                Check::pass(
                    "connection",
                    "gateway at http://127.0.0.1:1 answered in 3 ms",
                )
                .with("latency_ms", 3),
                Check::warn("upstream", "503 loading: x", LOADING_HINT),
                Check::fail("chat", "404 model_not_found: no", "pick another"),
                Check::skipped("streaming", "the chat step failed"),
            ],
        };
        assert!(!report.ok());
        assert_eq!(
            report.checks[0].line(),
            "PASS connection  gateway at http://127.0.0.1:1 answered in 3 ms"
        );
        assert_eq!(
            report.checks[2].line(),
            "FAIL chat        404 model_not_found: no -> hint: pick another"
        );
        assert_eq!(
            report.summary(),
            "result: FAILED (1 passed, 1 warning, 1 failed, 1 skipped) for http://127.0.0.1:1/v1"
        );
        let v = report.to_json();
        assert_eq!(v["ok"], false);
        assert_eq!(v["base_url"], "http://127.0.0.1:1/v1");
        assert_eq!(v["checks"][0]["latency_ms"], 3);
        assert_eq!(v["checks"][0]["hint"], Value::Null);
        assert_eq!(v["checks"][1]["ok"], false);
        assert_eq!(v["checks"][1]["status"], "warn");
        assert_eq!(v["checks"][3]["status"], "skipped");

        let warn_only = Report {
            checks: report.checks[..2].to_vec(),
            ..report
        };
        assert!(warn_only.ok());
    }
}
