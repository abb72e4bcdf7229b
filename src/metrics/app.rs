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
use crate::ledger::report::{self, GroupBy};
use crate::policy::tokens;
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

/// The metrics token, when one is configured: the 401 otherwise.
fn authorize(state: &GatewayState, authorization: Option<&[u8]>) -> Result<(), (u16, Vec<u8>)> {
    if token_ok(
        state.cfg.metrics.bearer_token.as_ref().map(Secret::expose),
        authorization,
    ) {
        return Ok(());
    }
    let err = ApiError::InvalidKey(
        "missing or wrong metrics token: send 'Authorization: Bearer <metrics.bearer_token>'"
            .into(),
    );
    Err((401, err.body(None).to_vec()))
}

/// Status and body of one scrape (also used on the public listener when configured).
pub async fn scrape(state: &GatewayState, authorization: Option<&[u8]>) -> (u16, Vec<u8>) {
    let metrics = &state.metrics;
    if let Err(refused) = authorize(state, authorization) {
        return refused;
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

/// The usage ledger as JSON, behind the metrics token.
pub const USAGE_PATH: &str = "/usage";

/// `GET /usage?since=7d&key=alice&by=model`: the ledger's rows from
/// `since` ago (default 24h), grouped, with each limited key's quota use.
pub fn usage(state: &GatewayState, authorization: Option<&[u8]>, query: &str) -> (u16, Vec<u8>) {
    if let Err(refused) = authorize(state, authorization) {
        return refused;
    }
    let (mut since, mut key, mut by) = ("24h".to_string(), None, GroupBy::Key);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "since" => since = value.to_string(),
            "key" => key = Some(value.to_string()),
            "by" => match GroupBy::parse(value) {
                Some(b) => by = b,
                None => return bad_request("by", "must be key, model or day"),
            },
            _ => return bad_request(name, "is not a parameter of /usage (since, key, by)"),
        }
    }
    let Ok(span) = humantime::parse_duration(&since) else {
        return bad_request("since", "must be a duration such as 24h or 7d");
    };
    let since_hour = (tokens::now_ms() / 1000).saturating_sub(span.as_secs()) / 3600;
    let rows = match state.ledger.rows(since_hour) {
        Ok(rows) => rows,
        Err(e) => {
            let err = ApiError::Internal(format!("cannot read the usage ledger: {e}"));
            return (500, err.body(None).to_vec());
        }
    };
    let groups = report::group(&rows, by, key.as_deref());
    let mut doc = report::json(&groups, by, since_hour);
    let now = tokens::now_ms();
    let quotas: serde_json::Map<String, serde_json::Value> = state
        .tokens
        .keys()
        .filter_map(|k| Some((k, state.tokens.state(k, now)?)))
        .map(|(k, s)| {
            let period = |p: Option<(u64, u64)>| {
                p.map(|(used, quota)| serde_json::json!({"used": used, "quota": quota}))
            };
            (
                k.to_string(),
                serde_json::json!({
                    "tokens_per_minute": s.per_minute,
                    "day": period(s.day),
                    "month": period(s.month),
                }),
            )
        })
        .collect();
    doc["quotas"] = serde_json::Value::Object(quotas);
    (200, doc.to_string().into_bytes())
}

fn bad_request(param: &str, message: &str) -> (u16, Vec<u8>) {
    let err = ApiError::InvalidParam {
        param: param.to_string(),
        message: format!("{param}: {message}"),
    };
    (400, err.body(None).to_vec())
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
        let path = session.req_header().uri.path();
        let path_ok = path == self.state.cfg.metrics.path;
        let (status, body, content_type) = if path == USAGE_PATH {
            let authorization = session.get_header("authorization").map(|v| v.as_bytes());
            let query = session.req_header().uri.query().unwrap_or("");
            let (status, body) = usage(&self.state, authorization, query);
            (status, body, "application/json")
        } else if path_ok {
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
