//! The `/metrics` endpoint, on its own listener (loopback by default).
//!
//! Pingora's ready-made Prometheus service answers every path without
//! authentication; this one serves only the configured path and checks an
//! optional bearer token. Each scrape also probes llama-server's `/health`
//! (with several servers the health checker keeps that state instead), so
//! `llm_edge_upstream_up` is fresh even when no traffic flows.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::errors::ApiError;
use crate::state::GatewayState;

pub struct MetricsApp {
    pub state: Arc<GatewayState>,
}

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn token_ok(expected: Option<&str>, authorization: Option<&[u8]>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    // Read as API keys are: the scheme in any case, the token trimmed.
    let presented = authorization
        .and_then(crate::policy::auth::bearer_token)
        .unwrap_or_default();
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected.as_bytes()))
}

/// Status and body of one scrape (also used on the public listener when configured).
pub async fn scrape(state: &GatewayState, authorization: Option<&[u8]>) -> (u16, Vec<u8>) {
    let metrics = &state.metrics;
    if !token_ok(
        state.cfg.metrics.bearer_token.as_ref().map(Secret::expose),
        authorization,
    ) {
        let err = ApiError::InvalidKey(
            "missing or wrong metrics token: send 'Authorization: Bearer <metrics.bearer_token>'"
                .into(),
        );
        return (401, err.body(None).to_vec());
    }
    let set = &state.upstream;
    if set.is_single() {
        set.check_all().await;
    }
    metrics.set_buffered_bytes(state.budget.used());
    for member in set.members() {
        let (in_flight, queued) = member.slot_use();
        let in_flight = if member.server().max_in_flight > 0 {
            in_flight
        } else {
            member.assigned()
        };
        metrics.set_slots(&member.server().name, queued, in_flight);
    }
    (200, metrics.render())
}

pub fn response_header(status: u16, len: usize) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    let content_type = if status == 200 {
        TEXT_FORMAT
    } else {
        "application/json"
    };
    resp.insert_header("Content-Type", content_type)?;
    resp.insert_header("Content-Length", len.to_string())?;
    Ok(resp)
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path_ok = session.req_header().uri.path() == self.state.cfg.metrics.path;
        let (status, body, content_type) = if path_ok {
            let authorization = session
                .get_header("authorization")
                .map(|v| v.as_bytes().to_vec());
            let (status, body) = scrape(&self.state, authorization.as_deref()).await;
            let ct = if status == 200 {
                TEXT_FORMAT
            } else {
                "application/json"
            };
            (status, body, ct)
        } else {
            let err = ApiError::NotFound {
                method: session.req_header().method.to_string(),
                path: format!(
                    "{} (metrics are at {})",
                    session.req_header().uri.path(),
                    self.state.cfg.metrics.path
                ),
            };
            (404, err.body(None).to_vec(), "application/json")
        };
        let mut resp = Response::new(body);
        *resp.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        assert!(token_ok(None, None));
        assert!(token_ok(Some("t0k"), Some(b"Bearer t0k")));
        assert!(!token_ok(Some("t0k"), Some(b"Bearer t0")));
        assert!(!token_ok(Some("t0k"), Some(b"t0k")));
        assert!(!token_ok(Some("t0k"), None));
    }

    #[test]
    fn the_scheme_is_case_insensitive_like_api_keys() {
        for header in [
            &b"bearer t0k"[..],
            b"BEARER t0k",
            b"BeArEr t0k",
            b"Bearer  t0k ",
        ] {
            assert!(
                token_ok(Some("t0k"), Some(header)),
                "{}",
                String::from_utf8_lossy(header)
            );
        }
        for header in [&b"bearer t0"[..], b"bearert0k", b"Basic t0k", b"bearer "] {
            assert!(
                !token_ok(Some("t0k"), Some(header)),
                "{}",
                String::from_utf8_lossy(header)
            );
        }
    }
}
