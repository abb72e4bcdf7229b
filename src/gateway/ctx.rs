//! The per-request record ([`RequestCtx`]) and the access-log line built from it.

use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use crate::errors::GatewayError;
pub use crate::labels::DisconnectPhase;
use crate::labels::{AuthFailure, LimitReason, UpstreamErrorKind};
use crate::metrics::InFlightGuard;
use crate::openai::sse::Accounting;
use crate::policy::limits::LimitGuard;
use crate::policy::ratelimit::RateLimitState;
use crate::policy::routes::{Route, UNKNOWN_ROUTE};
use crate::policy::tokens::TokenReservation;
use crate::upstream::balance::Lease;

/// Status logged when the client went away before the response was complete.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

#[derive(Debug)]
pub struct RequestCtx {
    pub start: Instant,
    /// The request id, as the header value it travels as (one buffer,
    /// shared by the upstream request, the response and the log).
    pub request_id: Option<http::HeaderValue>,
    /// The request's `Origin`, when the CORS policy allows it.
    pub cors_origin: Option<String>,
    /// The request's `Origin` (cleaned for the log), when the policy refuses it.
    pub cors_refused: Option<String>,
    pub route: Option<Route>,
    /// The key's id, shared with the key table (no copy per request);
    /// `invalid` for a wrong key.
    pub key_id: Option<std::sync::Arc<str>>,
    /// Public model name, once resolved (shared with the catalogue).
    pub model: Option<std::sync::Arc<str>>,
    /// The status the client got (499 when it left first).
    pub status: Option<u16>,
    pub upstream_status: Option<u16>,
    pub first_byte: Option<Duration>,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub error_code: Option<&'static str>,
    pub upstream_error: Option<UpstreamErrorKind>,
    /// Why the key was refused, if it was.
    pub auth_failure: Option<AuthFailure>,
    pub disconnect: Option<DisconnectPhase>,
    /// Reads the response on the side for token accounting.
    pub accounting: Accounting,
    /// Keeps `requests_in_flight` up while the request lives.
    pub in_flight: Option<InFlightGuard>,
    /// This request's share of its key's and the global concurrency limits.
    pub limit_guard: Option<LimitGuard>,
    /// Its claim on the upstream server it went to (and that server's slot,
    /// with slot-aware admission).
    pub lease: Option<Lease>,
    /// The server it went to last (index into `upstream.servers`).
    pub upstream: Option<usize>,
    /// Servers whose connect failed for it (Pingora's proxy loop failover).
    pub tried: Vec<usize>,
    /// Which limit refused it, if one did.
    pub limited: Option<LimitReason>,
    /// The client's address (the peer, or per X-Forwarded-For from a trusted proxy).
    pub client_ip: Option<std::net::IpAddr>,
    /// This request's share of its IP's concurrency limit.
    pub ip_slot: Option<crate::policy::clients::IpSlot>,
    /// An HTTP/1.0 client: no chunked coding in its responses.
    pub http10: bool,
    /// Its key's token reservation, settled when it ends.
    pub tokens: Option<TokenReservation>,
    /// Its prompt's estimated tokens (what a cut stream is charged for).
    pub prompt_estimate: u64,
    /// For several generations (`n` > 1): the completion tokens reserved,
    /// charged in full (llama-server reports only the first one's usage).
    pub reserved_completion: Option<u64>,
    /// With `state.redis`: its claim on its key's limits across all edges.
    pub shared: Option<crate::shared::KeyAdmission>,
    /// The store did not answer (`state.on_error: local`): its claim on
    /// this edge's share of its key's limits instead.
    pub fallback: Option<(LimitGuard, Option<TokenReservation>)>,
    /// Its key's limits for the rate-limit response headers.
    pub ratelimit: RateLimitState,
    /// Its cache-affinity key (model requests with several servers).
    pub affinity: Option<Box<crate::openai::prefix::Affinity>>,
    /// How cache-affinity routing chose its server.
    pub routing: Option<crate::upstream::affinity::Choice>,
    /// Prompt tokens the server reported reusing from its cache.
    pub cached: Option<u64>,
}

impl RequestCtx {
    pub fn new() -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: None,
            cors_origin: None,
            cors_refused: None,
            route: None,
            key_id: None,
            model: None,
            status: None,
            upstream_status: None,
            first_byte: None,
            bytes_in: 0,
            bytes_out: 0,
            error_code: None,
            upstream_error: None,
            auth_failure: None,
            disconnect: None,
            accounting: Accounting::Off,
            in_flight: None,
            limit_guard: None,
            shared: None,
            fallback: None,
            lease: None,
            upstream: None,
            tried: Vec::new(),
            limited: None,
            client_ip: None,
            ip_slot: None,
            http10: false,
            tokens: None,
            prompt_estimate: 0,
            reserved_completion: None,
            ratelimit: RateLimitState::default(),
            affinity: None,
            routing: None,
            cached: None,
        }
    }

    /// Records that the client left, and returns the error that ends the request.
    pub fn client_left(&mut self, phase: DisconnectPhase) -> GatewayError {
        self.status = Some(CLIENT_CLOSED_REQUEST);
        self.disconnect = Some(phase);
        GatewayError::ClientGone
    }

    /// The request id as text (ids are checked or generated printable ASCII).
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }

    pub fn route_label(&self) -> &'static str {
        self.route.as_ref().map_or(UNKNOWN_ROUTE, Route::label)
    }

    /// One access-log line. Only bounded, non-secret values: the key id, never the key.
    /// Written field by field into one buffer (no string per field).
    pub fn access_log_line(
        &self,
        client: impl fmt::Display,
        method: &str,
        path: &str,
        status: u16,
        upstream: Option<&str>,
    ) -> String {
        let mut line = String::with_capacity(256);
        let _ = write!(
            line,
            "{client} \"{method} {path}\" {status} route={} key={} model={} upstream_status={} ttfb_ms={} bytes_in={} bytes_out={} duration_ms={}",
            self.route_label(),
            self.key_id.as_deref().unwrap_or("-"),
            self.model.as_deref().unwrap_or("-"),
            OrDash(self.upstream_status),
            OrDash(self.first_byte.map(|d| d.as_millis())),
            self.bytes_in,
            self.bytes_out,
            self.start.elapsed().as_millis(),
        );
        if let Some(name) = upstream {
            let _ = write!(line, " upstream={name}");
        }
        if let Some(cached) = self.cached {
            let _ = write!(line, " cached={cached}");
        }
        if let Some(id) = self.request_id() {
            let _ = write!(line, " request_id={id}");
        }
        if let Some(code) = self.error_code {
            let _ = write!(line, " error={code}");
        }
        if let Some(kind) = self.upstream_error {
            let _ = write!(line, " upstream_error={}", kind.as_str());
        }
        if let Some(phase) = self.disconnect {
            let _ = write!(line, " disconnect={}", phase.as_str());
        }
        if let Some(origin) = &self.cors_refused {
            let _ = write!(line, " cors=refused origin={origin}");
        }
        line
    }
}

/// A value, or `-` when there is none (the access log's empty field).
pub struct OrDash<T>(pub Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The JSON access-log record, borrowed from the request's. Members in
/// alphabetical order, as a `serde_json::Value` writes them.
#[derive(serde::Serialize)]
struct JsonLine<'a, C: fmt::Display> {
    bytes_in: usize,
    bytes_out: usize,
    cached: Option<u64>,
    #[serde(serialize_with = "display")]
    client: C,
    cors: Option<&'static str>,
    disconnect: Option<&'static str>,
    duration_ms: u64,
    error: Option<&'static str>,
    key: Option<&'a str>,
    method: &'a str,
    model: Option<&'a str>,
    origin: Option<&'a str>,
    path: &'a str,
    request_id: Option<&'a str>,
    route: &'static str,
    status: u16,
    #[serde(serialize_with = "display")]
    ts: humantime::Rfc3339Timestamp,
    ttfb_ms: Option<u64>,
    upstream: Option<&'a str>,
    upstream_error: Option<&'static str>,
    upstream_status: Option<u16>,
}

fn display<S: serde::Serializer>(v: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl RequestCtx {
    /// The same record as [`access_log_line`](Self::access_log_line), as one
    /// JSON object (`logging.access_log_format: json`): every field always
    /// present (`null` when it does not apply), keys in alphabetical order,
    /// with a UTC timestamp `ts`.
    pub fn access_log_json(
        &self,
        client: impl fmt::Display,
        method: &str,
        path: &str,
        status: u16,
        upstream: Option<&str>,
    ) -> String {
        let line = JsonLine {
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            cached: self.cached,
            client,
            cors: self.cors_refused.as_ref().map(|_| "refused"),
            disconnect: self.disconnect.map(DisconnectPhase::as_str),
            duration_ms: self.start.elapsed().as_millis() as u64,
            error: self.error_code,
            key: self.key_id.as_deref(),
            method,
            model: self.model.as_deref(),
            origin: self.cors_refused.as_deref(),
            path,
            request_id: self.request_id(),
            route: self.route_label(),
            status,
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            ttfb_ms: self.first_byte.map(|d| d.as_millis() as u64),
            upstream,
            upstream_error: self.upstream_error.map(UpstreamErrorKind::as_str),
            upstream_status: self.upstream_status,
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}

/// The `key` label of a wrong key, shared (made once).
pub fn invalid_key_id() -> std::sync::Arc<str> {
    static INVALID: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
    INVALID
        .get_or_init(|| crate::metrics::KEY_INVALID.into())
        .clone()
}

/// An `X-Request-Id` we accept from the client: short, printable, no spaces.
pub fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_line_has_the_fields() {
        let mut ctx = RequestCtx::new();
        ctx.route = Some(Route::ChatCompletions);
        ctx.key_id = Some("alice".into());
        ctx.model = Some("qwen".into());
        ctx.upstream_status = Some(200);
        ctx.first_byte = Some(Duration::from_millis(12));
        ctx.bytes_out = 345;
        let _ = ctx.client_left(DisconnectPhase::Streaming);
        let line = ctx.access_log_line(
            "1.2.3.4",
            "POST",
            "/v1/chat/completions",
            499,
            Some("gpu-a"),
        );
        for part in [
            "1.2.3.4 \"POST /v1/chat/completions\" 499",
            "route=chat_completions",
            "key=alice",
            "model=qwen",
            "upstream_status=200",
            "ttfb_ms=12",
            "bytes_out=345",
            "duration_ms=",
            "disconnect=streaming",
            "upstream=gpu-a",
        ] {
            assert!(line.contains(part), "{line} lacks {part}");
        }
    }

    #[test]
    fn json_log_line_has_the_same_fields() {
        let mut ctx = RequestCtx::new();
        ctx.route = Some(Route::ChatCompletions);
        ctx.key_id = Some("alice".into());
        ctx.cors_refused = Some("http://evil".into());
        ctx.request_id = Some(http::HeaderValue::from_static("r1"));
        let line = ctx.access_log_json("1.2.3.4", "POST", "/v1/x \"q\"", 200, None);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        // Keys sorted, every field present: the bytes a `Value` would write.
        assert_eq!(v.to_string(), line);
        assert_eq!(v.as_object().unwrap().len(), 21);
        assert_eq!(v["client"], "1.2.3.4");
        assert_eq!(v["path"], "/v1/x \"q\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["route"], "chat_completions");
        assert_eq!(v["key"], "alice");
        assert_eq!(v["model"], serde_json::Value::Null);
        assert_eq!(v["cors"], "refused");
        assert_eq!(v["origin"], "http://evil");
        assert_eq!(v["request_id"], "r1");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        let text = ctx.access_log_line("1.2.3.4", "POST", "/v1/x", 200, None);
        assert!(text.ends_with(" cors=refused origin=http://evil"), "{text}");
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id("a\nb"));
        assert!(!valid_request_id(&"a".repeat(129)));
    }
}
