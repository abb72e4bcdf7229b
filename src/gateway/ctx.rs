//! The per-request record ([`RequestCtx`]) and the access-log line built from it.

use std::fmt::Write as _;
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
    pub request_id: Option<String>,
    /// The request's `Origin`, when the CORS policy allows it.
    pub cors_origin: Option<String>,
    pub route: Option<Route>,
    pub key_id: Option<String>,
    /// Public model name, once resolved.
    pub model: Option<String>,
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
    /// Its key's limits for the rate-limit response headers.
    pub ratelimit: RateLimitState,
}

impl RequestCtx {
    pub fn new() -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: None,
            cors_origin: None,
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
            lease: None,
            upstream: None,
            tried: Vec::new(),
            limited: None,
            client_ip: None,
            ip_slot: None,
            http10: false,
            tokens: None,
            prompt_estimate: 0,
            ratelimit: RateLimitState::default(),
        }
    }

    /// Records that the client left, and returns the error that ends the request.
    pub fn client_left(&mut self, phase: DisconnectPhase) -> GatewayError {
        self.status = Some(CLIENT_CLOSED_REQUEST);
        self.disconnect = Some(phase);
        GatewayError::ClientGone
    }

    pub fn route_label(&self) -> &'static str {
        self.route.as_ref().map_or(UNKNOWN_ROUTE, Route::label)
    }

    /// One access-log line. Only bounded, non-secret values: the key id, never the key.
    pub fn access_log_line(
        &self,
        client: &str,
        method: &str,
        path: &str,
        status: u16,
        upstream: Option<&str>,
    ) -> String {
        let mut line = String::with_capacity(200);
        let _ = write!(
            line,
            "{client} \"{method} {path}\" {status} route={} key={} model={} upstream_status={} ttfb_ms={} bytes_in={} bytes_out={} duration_ms={}",
            self.route_label(),
            self.key_id.as_deref().unwrap_or("-"),
            self.model.as_deref().unwrap_or("-"),
            self.upstream_status.map_or("-".to_string(), |s| s.to_string()),
            self.first_byte.map_or("-".to_string(), |d| d.as_millis().to_string()),
            self.bytes_in,
            self.bytes_out,
            self.start.elapsed().as_millis(),
        );
        if let Some(name) = upstream {
            let _ = write!(line, " upstream={name}");
        }
        if let Some(id) = &self.request_id {
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
        line
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
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
    fn request_ids() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id("a\nb"));
        assert!(!valid_request_id(&"a".repeat(129)));
    }
}
