//! Relays one model-route request to llama-server and its response back.
//!
//! The response streams through unbuffered: each chunk read from upstream is
//! written (and flushed, chunked) to the client before the next is read, so
//! every SSE event leaves as soon as llama-server sends it. Meanwhile the
//! client socket is watched: if the client leaves, the upstream connection
//! is dropped at once (not pooled), which is what makes llama-server cancel
//! the generation and free its slot.

use std::time::Duration;

use bytes::Bytes;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use tokio::time::Instant;

use crate::budget::Reservation;
use crate::cors::CorsPolicy;
use crate::ctx::{DisconnectPhase, RequestCtx};
use crate::errors::ApiError;
use crate::gateway_error::GatewayError;
use crate::headers;
use crate::metrics::Metrics;
use crate::sse::Accounting;
use crate::upstream::UpstreamClient;

/// Waits until `deadline`, or forever when there is none.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn total_timeout_error(limit: Duration) -> ApiError {
    ApiError::UpstreamTimeout(format!(
        "the request took longer than the configured total of {} (upstream.total_timeout)",
        humantime::format_duration(limit)
    ))
}

/// What a relay needs besides the request itself.
pub struct Relay<'a> {
    pub upstream: &'a UpstreamClient,
    pub metrics: &'a Metrics,
    pub cors: &'a CorsPolicy,
}

impl Relay<'_> {
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: RequestHeader,
        body: Bytes,
        reservation: Reservation,
    ) -> Result<(), GatewayError> {
        forward(self, session, ctx, req, body, reservation).await
    }
}

async fn forward(
    relay: &Relay<'_>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: RequestHeader,
    body: Bytes,
    reservation: Reservation,
) -> Result<(), GatewayError> {
    let (upstream, metrics) = (relay.upstream, relay.metrics);
    let cfg = upstream.config();
    let deadline = cfg.total_timeout.map(|t| Instant::from_std(ctx.start) + t);

    let sent = tokio::select! {
        sent = upstream.send(&req, &body) => sent,
        _ = session.as_downstream_mut().read_body_or_idle(true) => {
            return Err(ctx.client_left(DisconnectPhase::BeforeFirstToken));
        }
        _ = until(deadline) => {
            return Err(total_timeout_error(cfg.total_timeout.unwrap_or_default()).into());
        }
    };
    drop(body);
    drop(reservation);
    let mut exchange = sent.map_err(|failure| {
        ctx.upstream_error = Some(failure.kind());
        metrics.set_upstream_up(false);
        GatewayError::from(failure.into_api_error(&cfg.authority))
    })?;
    metrics.set_upstream_up(true);

    let upstream_resp = exchange
        .http
        .resp_header()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "response header missing"))?;
    ctx.upstream_status = Some(upstream_resp.status.as_u16());
    ctx.first_byte = Some(ctx.start.elapsed());
    let is_sse = headers::is_event_stream(upstream_resp);
    let content_type = upstream_resp
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ctx.accounting = Accounting::for_response(is_sse, content_type);
    let mut resp = headers::downstream_response(upstream_resp, is_sse)?;
    headers::finish_client_response(
        &mut resp,
        ctx.request_id.as_deref(),
        relay.cors,
        ctx.cors_origin.as_deref(),
    )?;
    ctx.status = Some(resp.status.as_u16());
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(|_| ctx.client_left(DisconnectPhase::BeforeFirstToken))?;

    let model = ctx.model.clone();
    let _stream = is_sse.then(|| metrics.stream_started(model.as_deref()));
    let inter_token = metrics.inter_token_histogram(model.as_deref());
    let mut last_token: Option<std::time::Instant> = None;
    loop {
        let next = tokio::select! {
            read = tokio::time::timeout(cfg.idle_timeout, exchange.http.read_body_bytes()) => read,
            _ = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(ctx.client_left(DisconnectPhase::Streaming));
            }
            _ = until(deadline) => {
                return end_broken_response(session, ctx, is_sse, total_timeout_error(cfg.total_timeout.unwrap_or_default())).await;
            }
        };
        match next {
            Ok(Ok(Some(chunk))) => {
                ctx.bytes_out += chunk.len();
                if ctx.accounting.feed(&chunk) > 0 {
                    let now = std::time::Instant::now();
                    match last_token {
                        None => metrics.first_token(model.as_deref(), now - ctx.start),
                        Some(prev) => inter_token.observe((now - prev).as_secs_f64()),
                    }
                    last_token = Some(now);
                }
                session
                    .write_response_body(Some(chunk), false)
                    .await
                    .map_err(|_| ctx.client_left(DisconnectPhase::Streaming))?;
            }
            Ok(Ok(None)) => {
                session
                    .write_response_body(None, true)
                    .await
                    .map_err(|_| ctx.client_left(DisconnectPhase::Streaming))?;
                upstream.release(exchange).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                ctx.upstream_error = Some("reset");
                let err = ApiError::UpstreamBroken(format!(
                    "the connection to the upstream at {} broke during the response ({}): the SSH tunnel or llama-server went away; the reply is incomplete",
                    cfg.authority,
                    e.etype().as_str().to_lowercase()
                ));
                return end_broken_response(session, ctx, is_sse, err).await;
            }
            Err(_) => {
                ctx.upstream_error = Some("timeout");
                let err = ApiError::UpstreamTimeout(format!(
                    "the upstream at {} sent nothing for {} during the response (upstream.idle_timeout); the reply is incomplete",
                    cfg.authority,
                    humantime::format_duration(cfg.idle_timeout)
                ));
                return end_broken_response(session, ctx, is_sse, err).await;
            }
        }
    }
}

/// The response already started, so the status cannot change. An SSE stream
/// gets a final `data: {"error":...}` event and ends without `[DONE]`, which
/// OpenAI clients raise as an error; any other body is cut off without its
/// terminating chunk so the client sees it incomplete, never as complete.
async fn end_broken_response(
    session: &mut Session,
    ctx: &mut RequestCtx,
    is_sse: bool,
    err: ApiError,
) -> Result<(), GatewayError> {
    ctx.error_code = Some(err.code());
    session.set_keepalive(None);
    if is_sse {
        let event = err.sse_event(ctx.request_id.as_deref());
        ctx.bytes_out += event.len();
        session
            .write_response_body(Some(event), true)
            .await
            .map_err(|_| ctx.client_left(DisconnectPhase::Streaming))?;
        return Ok(());
    }
    Err(GatewayError::Aborted(Error::explain(
        ErrorType::ReadError,
        err.to_string(),
    )))
}
