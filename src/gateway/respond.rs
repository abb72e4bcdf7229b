//! Answers the gateway writes itself: JSON bodies, errors in the route's
//! dialect (with `WWW-Authenticate`, `Allow`, `Retry-After` where they
//! belong), and the brief linger after an early answer.

use bytes::Bytes;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::{DisconnectPhase, RequestCtx};
use super::GatewayProxy;
use crate::errors::{ApiError, GatewayError};
use crate::policy::cors::CorsPolicy;
use crate::policy::headers;
use crate::policy::routes::{Dialect, Route};

/// How long, after answering 413, we keep reading (and discarding) what the
/// client still sends, so it reads our answer instead of a connection reset.
const LINGER_AFTER_REJECT: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 64 << 20;

impl GatewayProxy {
    pub(super) async fn respond_json(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: impl Into<Bytes>,
    ) -> Result<(), GatewayError> {
        let body = body.into();
        let resp = json_response_header(status, body.len())?;
        write_response(session, ctx, &self.state.cfg.cors, resp, body).await
    }

    /// Answers with an OpenAI-shaped error.
    pub(super) async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: &ApiError,
    ) -> Result<()> {
        ctx.error_code = Some(err.code());
        ctx.auth_failure = err.auth_failure();
        let mut body_unread = !session.is_body_done();
        // Only a wrong or missing key's small body is read: a client
        // retrying with the right key would otherwise pay a handshake per
        // 401. Every other refusal (a limit, an overload, a throttled
        // address) spends nothing more on the request and closes.
        let wrong_key = matches!(err, ApiError::MissingKey(_) | ApiError::InvalidKey(_));
        if body_unread
            && wrong_key
            && headers::client_keeps_alive(ctx.http10, &session.req_header().headers)
            && small_declared_body(session)
        {
            body_unread = !drain(session).await;
        }
        if body_unread {
            // Otherwise Pingora would drain the whole unread body before answering.
            session.set_keepalive(None);
        }
        let dialect = ctx.route.as_ref().map_or(Dialect::OpenAi, Route::dialect);
        let body = err.body_in(dialect, ctx.request_id());
        let mut resp = json_response_header(err.status(), body.len())?;
        match err {
            ApiError::MissingKey(_) | ApiError::InvalidKey(_) => {
                // Lower-case static name and value: nothing to copy.
                resp.insert_header("www-authenticate", http::HeaderValue::from_static("Bearer"))?;
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                resp.insert_header("Allow", *allowed)?;
            }
            _ => {}
        }
        if let Some(seconds) = err.retry_after() {
            resp.insert_header("retry-after", headers::short_value(seconds)?)?;
        }
        if write_response(session, ctx, &self.state.cfg.cors, resp, body)
            .await
            .is_err()
        {
            return Error::e_explain(
                ErrorType::WriteError,
                "client left before the error response",
            );
        }
        if body_unread {
            linger(session).await;
        }
        Ok(())
    }
}

pub(super) fn json_response_header(status: u16, len: usize) -> Result<ResponseHeader> {
    let status = http::StatusCode::from_u16(status)
        .or_err(ErrorType::InvalidHTTPHeader, "invalid status")?;
    let mut map = http::HeaderMap::with_capacity(6);
    map.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    map.insert(http::header::CONTENT_LENGTH, headers::short_value(len)?);
    Ok(headers::response_from(status, map))
}

/// Writes a whole response the gateway answers itself.
pub(super) async fn write_response(
    session: &mut Session,
    ctx: &mut RequestCtx,
    cors: &CorsPolicy,
    resp: ResponseHeader,
    body: Bytes,
) -> Result<(), GatewayError> {
    ctx.bytes_out += body.len();
    crate::upstream::relay::write_header(session, ctx, cors, resp).await?;
    session
        .write_response_body(Some(body), true)
        .await
        .map_err(|_| ctx.client_left(DisconnectPhase::BeforeFirstToken))
}

/// The largest unread body drained so that a refused request keeps its
/// connection; larger, chunked or `Expect: 100-continue` bodies close it.
const DRAIN_MAX_BYTES: usize = 64 * 1024;
/// How long draining may take before the connection is closed instead.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// A body declared by `Content-Length` (no chunked coding, no
/// `Expect: 100-continue`, which would wait for our go-ahead) of at most
/// [`DRAIN_MAX_BYTES`].
fn small_declared_body(session: &Session) -> bool {
    let headers = &session.req_header().headers;
    if headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers.contains_key(http::header::EXPECT)
    {
        return false;
    }
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| n <= DRAIN_MAX_BYTES)
}

/// Reads the rest of a small body, briefly; whether it all arrived.
async fn drain(session: &mut Session) -> bool {
    let read_all = async {
        loop {
            match session.read_request_body().await {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIMEOUT, read_all)
        .await
        .unwrap_or(false)
}

/// Reads and discards what the client still sends after an early answer,
/// briefly, so closing the socket does not reset the connection under the
/// answer the client has not read yet.
pub(super) async fn linger(session: &mut Session) {
    let discard = async {
        let mut discarded = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            discarded += chunk.len();
            if discarded > LINGER_MAX_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_AFTER_REJECT, discard).await;
}
