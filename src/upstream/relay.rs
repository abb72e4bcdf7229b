//! Relays one model-route request to llama-server and its response back.
//!
//! The response streams through unbuffered: each chunk read from upstream is
//! written (and flushed, chunked) to the client before the next is read, so
//! every SSE event leaves as soon as llama-server sends it. Meanwhile the
//! client socket is watched: if the client leaves, the upstream connection
//! is dropped at once (not pooled), which is what makes llama-server cancel
//! the generation and free its slot.
//!
//! Backpressure: a chunk is read from upstream only once the previous one
//! was written, so a client that reads slowly slows the upstream down and the
//! gateway holds at most one chunk (plus socket buffers) per stream. A client
//! that accepts nothing for `upstream.idle_timeout` is treated as gone, so it
//! cannot hold a llama-server slot forever.
//!
//! Every error a model route's client gets is JSON in its dialect: a
//! non-streamed response is read whole (bounded by [`WHOLE_MAX`]; llama-server
//! sends it at the end of the generation anyway) and checked before anything
//! is written, so an HTML page, an empty 502 or broken JSON from upstream
//! becomes a gateway error with the same status and an excerpt.
//!
//! One cohesive thing, longer than most files: opening the exchange (server
//! choice, slot, failover) and relaying its answer share the same timeouts,
//! client watch and error endings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use tokio::time::Instant;

use crate::errors::{ApiError, GatewayError};
use crate::gateway::ctx::{DisconnectPhase, RequestCtx};
use crate::labels::{LimitReason, UpstreamErrorKind};
use crate::metrics::Metrics;
use crate::openai::sse::Accounting;
use crate::policy::budget::Reservation;
use crate::policy::cors::CorsPolicy;
use crate::policy::headers;
use crate::policy::routes::Dialect;
use crate::upstream::admission::Denied;
use crate::upstream::balance::{FirstPick, Health, Lease, UpstreamSet};
use crate::upstream::client::{Exchange, Unsent, UpstreamFailure};

/// Why a write to the client did not complete.
enum WriteFailed {
    /// The client closed the connection, or accepted nothing for the
    /// stall limit (it stopped reading).
    ClientGone,
    /// `upstream.total_timeout` passed while the write was blocked.
    TotalTimeout,
}

/// Writes one piece of the response body, bounded: a client that accepts
/// nothing for `stall` has stopped reading, and the total deadline (if any)
/// also caps a blocked write.
async fn write_body(
    session: &mut Session,
    chunk: Option<Bytes>,
    end: bool,
    stall: Duration,
    deadline: Option<Instant>,
) -> Result<(), WriteFailed> {
    let timer = tokio::time::sleep(stall);
    tokio::pin!(timer);
    write_body_timed(session, chunk, end, timer, stall, deadline).await
}

/// [`write_body`] with a timer the caller keeps (a stream's, moved for each
/// chunk instead of registering a new one).
async fn write_body_timed(
    session: &mut Session,
    chunk: Option<Bytes>,
    end: bool,
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    stall: Duration,
    deadline: Option<Instant>,
) -> Result<(), WriteFailed> {
    let stall_at = Instant::now() + stall;
    let limit = deadline.map_or(stall_at, |d| d.min(stall_at));
    timer.as_mut().reset(limit);
    // The write first, as `timeout_at` polls it: a write that completes
    // at once never sees the timer.
    let written = tokio::select! {
        biased;
        written = session.write_response_body(chunk, end) => Ok(written),
        _ = timer => Err(()),
    };
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFailed::ClientGone),
        Err(()) => {
            // A write may have stopped half-way: the connection cannot be reused.
            session.set_keepalive(None);
            if deadline.is_some_and(|d| d < stall_at) {
                Err(WriteFailed::TotalTimeout)
            } else {
                log::debug!(
                    "the client accepted no response bytes for {}; dropping it",
                    humantime::format_duration(stall)
                );
                Err(WriteFailed::ClientGone)
            }
        }
    }
}

/// Writes the client's response header, with what every response carries
/// whoever wrote it (the request id, the gateway's CORS policy), and records
/// its status.
pub async fn write_header(
    session: &mut Session,
    ctx: &mut RequestCtx,
    cors: &CorsPolicy,
    mut resp: pingora_http::ResponseHeader,
) -> Result<(), GatewayError> {
    headers::finish_client_response(
        &mut resp,
        ctx.request_id.as_ref(),
        cors,
        ctx.cors_origin.as_deref(),
    )?;
    if !ctx.ratelimit.is_empty() {
        let anthropic = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.dialect() == Dialect::Anthropic);
        for (name, value) in ctx
            .ratelimit
            .headers(anthropic, std::time::SystemTime::now())
        {
            resp.insert_header(name, value)?;
        }
    }
    ctx.status = Some(resp.status.as_u16());
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(|_| ctx.client_left(DisconnectPhase::BeforeFirstToken))
}

/// Whether an SSE stream already told the client how it ends: llama-server's
/// `data: [DONE]`, or an error event of its own.
fn stream_ended(accounting: &Accounting) -> bool {
    matches!(accounting, Accounting::Sse(s) if s.stats.saw_done || s.stats.saw_error)
}

fn saw_done(accounting: &Accounting) -> bool {
    matches!(accounting, Accounting::Sse(s) if s.stats.saw_done)
}

/// Read errors that mean the upstream spoke broken HTTP (bad chunk framing,
/// a body shorter than announced) rather than a connection that went away.
fn is_protocol_error(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::InvalidHTTPHeader | ErrorType::H1Error)
        || matches!(e.etype().as_str(), "InvalidChunk")
}

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
    pub upstream: &'a Arc<UpstreamSet>,
    pub metrics: &'a Metrics,
    pub cors: &'a CorsPolicy,
    /// The servers that serve the model (empty: all).
    pub allowed: &'a [usize],
    /// The public model name, for messages.
    pub model: &'a str,
    /// The key id, for fair queueing.
    pub key: &'a str,
    /// The route's wire format (error shapes, stream reading).
    pub dialect: Dialect,
    /// A model route: non-streamed responses must be JSON.
    pub expects_json: bool,
    /// Read the response for token accounting (generations, embeddings).
    pub accounting: bool,
    /// The request's cache-affinity key, if it has one.
    pub affinity: Option<&'a crate::openai::prefix::Affinity>,
    /// The path it takes upstream.
    pub path: UpstreamPath,
    /// Whether it is sent with a `Content-Length` (a request with a body).
    pub content_length: bool,
}

/// Which path a relayed request takes upstream.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamPath {
    /// This one: a model route's canonical path (never the client's spelling).
    Fixed(&'static str),
    /// The client's own (passthrough), without a trailing slash.
    Client,
}

/// The least a stream's chunk buffer holds (typical SSE events are a few
/// hundred bytes; several can arrive in one read).
const CHUNK_BUFFER: usize = 1024;

/// The largest non-streamed response read whole and checked; a larger one
/// is relayed as it comes (only embeddings of big batches get there).
pub const WHOLE_MAX: usize = 8 << 20;

/// How much of a non-JSON upstream answer an error quotes.
const EXCERPT: usize = 200;

/// A non-streamed response read before answering.
enum Whole {
    Complete(Bytes),
    /// Over [`WHOLE_MAX`]: what was read so far; the rest follows as it comes.
    Partial(Bytes),
}

/// What the client gets for a complete non-streamed model-route response:
/// `Ok(None)` as it is, `Ok(Some(body))` re-shaped for the dialect, or an
/// error when it is not JSON.
fn check_whole(
    dialect: Dialect,
    status: u16,
    body: &[u8],
    authority: &str,
) -> Result<Option<Bytes>, ApiError> {
    // Only checked (no tree built): the accounting parses the body anyway,
    // and most answers are passed on as they are.
    let valid = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    if !valid {
        let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT)]);
        let excerpt = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let said = if excerpt.is_empty() {
            "an empty body".to_string()
        } else {
            format!("'{excerpt}'")
        };
        return Err(if (200..300).contains(&status) {
            ApiError::UpstreamInvalid {
                status: 502,
                message: format!(
                    "the upstream at {authority} answered {status} with a body that is not JSON ({said}); is llama-server what listens there?"
                ),
            }
        } else {
            ApiError::UpstreamInvalid {
                status: if status >= 400 { status } else { 502 },
                message: format!("the upstream at {authority} answered {status} with {said}"),
            }
        });
    }
    if dialect != Dialect::Anthropic || status < 400 {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if value.get("type").is_none() {
        // llama-server writes its own (OpenAI-like) error shape on every
        // route; Anthropic clients read `{"type":"error","error":{...}}`.
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let err = ApiError::UpstreamInvalid { status, message };
        return Ok(Some(err.body_in(Dialect::Anthropic, None)));
    }
    Ok(None)
}

/// Why no server took the request.
struct NotOpened {
    upstream: Option<usize>,
    upstream_error: Option<UpstreamErrorKind>,
    limited: Option<LimitReason>,
    error: ApiError,
}

impl NotOpened {
    /// Server `index` failed with `failure`, and that is the answer.
    fn failed(set: &UpstreamSet, index: usize, failure: UpstreamFailure) -> NotOpened {
        NotOpened {
            upstream: Some(index),
            upstream_error: Some(failure.kind()),
            limited: None,
            error: failure.into_api_error(&set.members()[index].server().authority),
        }
    }
}

/// How far opening an exchange got, kept across a rebuild of the request
/// header (see [`Unopened::Rebuild`]).
#[derive(Default)]
struct Opening {
    tried: Vec<usize>,
    failed: Option<(usize, UpstreamFailure)>,
    full: Option<NotOpened>,
    /// A lease whose pooled connection was stale: the request goes out
    /// again on a fresh connection to the same server.
    stale: Option<Lease>,
    /// The server chosen before admission (with a shared store, its slot
    /// may already be leased): the first attempt goes there.
    first: Option<FirstPick>,
}

/// Why [`open`] returned without an exchange.
enum Unopened {
    /// No server took it: the answer.
    Not(NotOpened),
    /// The request header went with a stale connection: build it again
    /// and call [`open`] once more.
    Rebuild,
}

/// Picks a server, waits for one of its slots, sends the request; when the
/// connect fails, marks that server down and tries the next one (the same
/// header, re-addressed), and when its queue is full, tries the next one too.
async fn open(
    relay: &Relay<'_>,
    st: &mut Opening,
    req: &mut Option<Box<RequestHeader>>,
    body: &Bytes,
) -> Result<(Lease, Exchange), Unopened> {
    let (set, metrics) = (relay.upstream, relay.metrics);
    loop {
        let Some(header) = req.take() else {
            return Err(Unopened::Rebuild);
        };
        let (index, lease, sent) = if let Some(lease) = st.stale.take() {
            let sent = lease.member().client.send_fresh(header, body).await;
            (lease.index(), lease, sent)
        } else {
            let (index, choice, taken) = match st.first.take() {
                Some(pick) => (pick.index, pick.choice, pick.slot),
                None => {
                    let Some((index, choice)) =
                        set.choose_for(relay.allowed, &st.tried, relay.affinity)
                    else {
                        return Err(Unopened::Not(match st.full.take() {
                            Some(busy) if st.failed.is_none() => busy,
                            _ => no_server_left(relay, st.failed.take()),
                        }));
                    };
                    (index, choice, None)
                }
            };
            if let Some((previous, failure)) = st.failed.take() {
                // Another server takes over: count the failure now.
                metrics.upstream_error(&set.members()[previous].server().name, failure.kind());
            }
            let server = set.members()[index].server();
            let waited = std::time::Instant::now();
            let lease = set.lease(index, relay.key, taken).await;
            if server.max_in_flight > 0 {
                metrics.queue_waited(waited.elapsed());
            }
            let mut lease = match lease {
                Ok(lease) => lease,
                Err(Denied::QueueFull) => {
                    st.tried.push(index);
                    st.full = Some(busy(set, index, Denied::QueueFull));
                    *req = Some(header);
                    continue;
                }
                Err(denied) => return Err(Unopened::Not(busy(set, index, denied))),
            };
            lease.choice = choice;
            let sent = lease.member().client.send(header, body).await;
            (index, lease, sent)
        };
        match sent {
            Ok(exchange) => {
                // A 503 is llama-server loading its model (or overloaded):
                // only the health check brings such a server back.
                let status = exchange.http.get_status().map_or(0, |s| s.as_u16());
                if status != 503 {
                    set.mark(index, Health::Up, "");
                }
                return Ok((lease, exchange));
            }
            Err(Unsent::Stale) => {
                st.stale = Some(lease);
                return Err(Unopened::Rebuild);
            }
            Err(Unsent::Failed { failure, header }) => {
                if matches!(
                    failure,
                    UpstreamFailure::Connect(_) | UpstreamFailure::NoResponse(_)
                ) {
                    set.mark(index, Health::Down, &failure.short_reason());
                }
                if !failure.nothing_sent() {
                    return Err(Unopened::Not(NotOpened::failed(set, index, failure)));
                }
                st.tried.push(index);
                st.failed = Some((index, failure));
                *req = header;
            }
        }
    }
}

/// No server (left) to try: a lone server's own error, or 503 naming each
/// server's state.
fn no_server_left(relay: &Relay<'_>, failed: Option<(usize, UpstreamFailure)>) -> NotOpened {
    let set = relay.upstream;
    let candidates = set.candidates(relay.allowed);
    match failed {
        Some((index, failure)) if candidates == 1 => NotOpened::failed(set, index, failure),
        failed => NotOpened {
            upstream: failed.as_ref().map(|(i, _)| *i),
            upstream_error: failed.as_ref().map(|(_, f)| f.kind()),
            limited: None,
            error: ApiError::all_down(
                &format!(
                    "all {candidates} upstream servers for model '{}'",
                    relay.model
                ),
                &set.describe(relay.allowed),
            ),
        },
    }
}

fn busy(set: &UpstreamSet, index: usize, denied: Denied) -> NotOpened {
    let server = set.members()[index].server();
    let cfg = set.config();
    let which = if set.is_single() {
        String::new()
    } else {
        format!(" {}", server.name)
    };
    let (reason, message) = match denied {
        Denied::QueueFull => (
            LimitReason::QueueFull,
            format!(
                "all {} slots of llama-server{which} are busy and {} requests are already waiting (upstream.max_queued); retry shortly",
                server.max_in_flight, cfg.max_queued
            ),
        ),
        Denied::Timeout => (
            LimitReason::QueueTimeout,
            format!(
                "all {} slots of llama-server{which} stayed busy for {} (upstream.queue_timeout); retry shortly",
                server.max_in_flight,
                humantime::format_duration(cfg.queue_timeout)
            ),
        ),
        Denied::StoreUnavailable => (
            LimitReason::StoreUnavailable,
            "the gateways' shared state store is unreachable and this gateway is configured to refuse requests meanwhile (state.on_error: deny); retry shortly".to_string(),
        ),
    };
    NotOpened {
        upstream: Some(index),
        upstream_error: None,
        limited: Some(reason),
        error: ApiError::UpstreamBusy {
            message,
            retry_after: 2,
        },
    }
}

impl Relay<'_> {
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
        reservation: Reservation,
        first: Option<FirstPick>,
    ) -> Result<(), GatewayError> {
        forward(self, session, ctx, body, reservation, first).await
    }

    /// The header llama-server gets for this request (still unaddressed).
    fn upstream_request(
        &self,
        client: &RequestHeader,
        ctx: &RequestCtx,
        body_len: usize,
    ) -> pingora_error::Result<Box<RequestHeader>> {
        let path = match self.path {
            UpstreamPath::Fixed(path) => path,
            // The client's own path, without a trailing slash.
            UpstreamPath::Client => {
                let path = client.uri.path();
                path.strip_suffix('/')
                    .filter(|p| !p.is_empty())
                    .unwrap_or(path)
            }
        };
        let req = headers::upstream_request(
            client,
            &headers::Forwarding {
                path,
                query: client.uri.query(),
                body_len: self.content_length.then_some(body_len),
                request_id: ctx.request_id.as_ref(),
                client_ip: ctx.client_ip,
            },
        )?;
        Ok(Box::new(req))
    }
}

async fn forward(
    relay: &Relay<'_>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: Bytes,
    reservation: Reservation,
    first: Option<FirstPick>,
) -> Result<(), GatewayError> {
    let metrics = relay.metrics;
    let cfg = relay.upstream.config();
    let deadline = cfg.total_timeout.map(|t| Instant::from_std(ctx.start) + t);

    // One header for every attempt: failover re-addresses it; only a stale
    // pooled connection, which takes it along, makes us build another.
    let mut req = Some(relay.upstream_request(session.req_header(), ctx, body.len())?);
    let mut opening = Opening {
        first,
        ..Opening::default()
    };
    let opened = loop {
        let step = tokio::select! {
            step = open(relay, &mut opening, &mut req, &body) => step,
            _ = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(ctx.client_left(DisconnectPhase::BeforeFirstToken));
            }
            _ = until(deadline) => {
                return Err(total_timeout_error(cfg.total_timeout.unwrap_or_default()).into());
            }
        };
        match step {
            Ok(opened) => break Ok(opened),
            Err(Unopened::Not(not)) => break Err(not),
            Err(Unopened::Rebuild) => {
                req = Some(relay.upstream_request(session.req_header(), ctx, body.len())?);
            }
        }
    };
    drop(req);
    drop(body);
    drop(reservation);
    // Held until the response is over: the server's slot and its in-flight count.
    let (lease, mut exchange) = opened.map_err(|not| {
        ctx.upstream = not.upstream;
        ctx.upstream_error = not.upstream_error;
        ctx.limited = not.limited;
        GatewayError::from(not.error)
    })?;
    ctx.upstream = Some(lease.index());
    ctx.routing = lease.choice;
    let member = lease.member();
    let authority = member.server().authority.as_str();

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
    ctx.accounting = if relay.accounting {
        Accounting::for_dialect(relay.dialect, is_sse, content_type)
    } else {
        Accounting::Off
    };
    let mut resp = headers::downstream_response(upstream_resp, is_sse, ctx.http10)?;
    let mut prefix = None;
    if relay.expects_json && !is_sse {
        let status = resp.status.as_u16();
        match read_whole(session, ctx, &mut exchange, relay, authority, deadline).await? {
            Whole::Complete(body) => {
                let body = match check_whole(relay.dialect, status, &body, authority) {
                    Ok(None) => body,
                    Ok(Some(reshaped)) => {
                        resp.insert_header("Content-Type", "application/json")?;
                        reshaped
                    }
                    Err(e) => {
                        // A non-JSON error status still counts as that
                        // status (`5xx`); a 2xx that is not JSON is invalid.
                        if (200..300).contains(&status) {
                            ctx.upstream_error = Some(UpstreamErrorKind::InvalidResponse);
                        }
                        return Err(e.into());
                    }
                };
                ctx.accounting.feed_whole(&body);
                resp.remove_header("transfer-encoding");
                resp.insert_header(
                    http::header::CONTENT_LENGTH,
                    headers::short_value(body.len())?,
                )?;
                ctx.bytes_out += body.len();
                write_header(session, ctx, relay.cors, resp).await?;
                return match write_body(session, Some(body), true, cfg.idle_timeout, deadline).await
                {
                    Ok(()) => {
                        member.client.release(exchange).await;
                        Ok(())
                    }
                    Err(WriteFailed::ClientGone) => {
                        Err(ctx.client_left(DisconnectPhase::Streaming))
                    }
                    Err(WriteFailed::TotalTimeout) => abort_response(
                        ctx,
                        total_timeout_error(cfg.total_timeout.unwrap_or_default()),
                    ),
                };
            }
            Whole::Partial(start) => prefix = Some(start),
        }
    }
    if ctx.http10 && !resp.headers.contains_key("content-length") {
        // No chunked coding for HTTP/1.0: the close ends the body.
        session.set_keepalive(None);
    }
    write_header(session, ctx, relay.cors, resp).await?;
    if let Some(start) = prefix {
        ctx.bytes_out += start.len();
        ctx.accounting.feed(&start);
        if write_body(session, Some(start), false, cfg.idle_timeout, deadline)
            .await
            .is_err()
        {
            return Err(ctx.client_left(DisconnectPhase::Streaming));
        }
    }

    // The stream's metric handles, looked up once.
    let _stream = is_sse.then(|| metrics.stream_started(ctx.model.as_deref()));
    let first_token = metrics.first_token_histogram(ctx.model.as_deref());
    let inter_token = metrics.inter_token_histogram(ctx.model.as_deref());
    let mut last_token: Option<std::time::Instant> = None;
    let stall = cfg.idle_timeout;
    let total_timeout = || total_timeout_error(cfg.total_timeout.unwrap_or_default());
    // One idle timer and one total-deadline timer per response for reading
    // from upstream, and one stall timer for writing to the client, the
    // idle and stall ones reset per chunk: registering a fresh timer for
    // every chunk costs more than moving one.
    let total = until(deadline);
    tokio::pin!(total);
    let idle = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle);
    let write_stall = tokio::time::sleep(stall);
    tokio::pin!(write_stall);
    // Each chunk is copied out of Pingora's buffer into this one and handed
    // to the client as a frozen slice of it. Once the client's write has
    // dropped that slice the next chunk reuses the same memory: no
    // allocation per chunk (sized for typical SSE events; it grows for a
    // larger piece).
    let mut out = bytes::BytesMut::new();
    loop {
        idle.as_mut().reset(Instant::now() + cfg.idle_timeout);
        let next = tokio::select! {
            // In this order. The upstream before the client: once a body
            // with a Content-Length is complete the client has all of it and
            // may send its next request on the same connection at once.
            // Polled in random order, the client watch could read that
            // request's first byte and take it for a disconnect, cutting the
            // next request (499, and a connection closed under the client).
            // The deadline first, so a stream that never pauses still ends.
            biased;
            _ = &mut total => {
                return end_broken_response(session, ctx, is_sse, total_timeout(), stall).await;
            }
            read = exchange.http.read_body_ref() => {
                Ok(read.map(|r| r.map(|piece| {
                    out.reserve(piece.len().max(CHUNK_BUFFER));
                    out.extend_from_slice(piece);
                    out.split().freeze()
                })))
            }
            _ = &mut idle => Err(()),
            _ = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(ctx.client_left(DisconnectPhase::Streaming));
            }
        };
        match next {
            Ok(Ok(Some(chunk))) => {
                ctx.bytes_out += chunk.len();
                if ctx.accounting.feed(&chunk) > 0 {
                    let now = std::time::Instant::now();
                    match last_token {
                        None => first_token.observe((now - ctx.start).as_secs_f64()),
                        Some(prev) => inter_token.observe((now - prev).as_secs_f64()),
                    }
                    last_token = Some(now);
                }
                let timer = write_stall.as_mut();
                match write_body_timed(session, Some(chunk), false, timer, stall, deadline).await {
                    Ok(()) => {}
                    Err(WriteFailed::ClientGone) => {
                        return Err(ctx.client_left(DisconnectPhase::Streaming));
                    }
                    Err(WriteFailed::TotalTimeout) => {
                        return abort_response(ctx, total_timeout());
                    }
                }
            }
            Ok(Ok(None)) => {
                if is_sse && !stream_ended(&ctx.accounting) {
                    // A clean end of the body (e.g. a close-delimited stream
                    // whose connection closed) without `[DONE]`: the reply is
                    // incomplete, and the client must not take it as whole.
                    ctx.upstream_error = Some(UpstreamErrorKind::Reset);
                    let err =
                        ApiError::stream_cut(authority, "it ended before its end-of-stream event");
                    return end_broken_response(session, ctx, is_sse, err, stall).await;
                }
                return match write_body(session, None, true, stall, deadline).await {
                    Ok(()) => {
                        member.client.release(exchange).await;
                        Ok(())
                    }
                    Err(WriteFailed::ClientGone) => {
                        Err(ctx.client_left(DisconnectPhase::Streaming))
                    }
                    Err(WriteFailed::TotalTimeout) => abort_response(ctx, total_timeout()),
                };
            }
            Ok(Err(_)) if is_sse && saw_done(&ctx.accounting) => {
                // The whole reply, `[DONE]` included, reached the client; only
                // the upstream connection's end was untidy. Finish the stream;
                // that connection is dropped, not pooled.
                return match write_body(session, None, true, stall, deadline).await {
                    Ok(()) => Ok(()),
                    Err(WriteFailed::ClientGone) => {
                        Err(ctx.client_left(DisconnectPhase::Streaming))
                    }
                    Err(WriteFailed::TotalTimeout) => abort_response(ctx, total_timeout()),
                };
            }
            Ok(Err(e)) => {
                let err = if is_protocol_error(&e) {
                    ctx.upstream_error = Some(UpstreamErrorKind::InvalidResponse);
                    ApiError::upstream_malformed(authority, &e.etype().as_str().to_lowercase())
                } else {
                    ctx.upstream_error = Some(UpstreamErrorKind::Reset);
                    ApiError::stream_cut(authority, &e.etype().as_str().to_lowercase())
                };
                return end_broken_response(session, ctx, is_sse, err, stall).await;
            }
            Err(_) => {
                ctx.upstream_error = Some(UpstreamErrorKind::Timeout);
                let err =
                    ApiError::upstream_silent(authority, cfg.idle_timeout, "upstream.idle_timeout");
                return end_broken_response(session, ctx, is_sse, err, stall).await;
            }
        }
    }
}

/// The response already started, so the status cannot change. An SSE stream
/// gets a final `data: {"error":...}` event and ends without `[DONE]`, which
/// OpenAI clients raise as an error; any other body is cut off without its
/// terminating chunk so the client sees it incomplete, never as complete.
///
/// The SSE stream's HTTP framing stays whole, so the client connection stays
/// reusable: closing it silently after a complete chunked body would race a
/// client that sends its next request on it at once.
async fn end_broken_response(
    session: &mut Session,
    ctx: &mut RequestCtx,
    is_sse: bool,
    err: ApiError,
    stall: Duration,
) -> Result<(), GatewayError> {
    if is_sse {
        ctx.error_code = Some(err.code());
        let dialect = ctx.route.as_ref().map_or(Dialect::OpenAi, |r| r.dialect());
        let event = err.sse_event_in(dialect, ctx.request_id());
        ctx.bytes_out += event.len();
        return match write_body(session, Some(event), true, stall, None).await {
            Ok(()) => Ok(()),
            Err(_) => Err(ctx.client_left(DisconnectPhase::Streaming)),
        };
    }
    abort_response(ctx, err)
}

/// Cuts a response that already started: the connection closes (an error
/// ends the session, never reused) without the body's end, so the client
/// sees it incomplete.
fn abort_response(ctx: &mut RequestCtx, err: ApiError) -> Result<(), GatewayError> {
    ctx.error_code = Some(err.code());
    Err(GatewayError::Aborted(Error::explain(
        ErrorType::ReadError,
        err.to_string(),
    )))
}

/// Reads a non-streamed response before anything is written to the client,
/// under the same timeouts as a relayed one and while watching the client.
async fn read_whole(
    session: &mut Session,
    ctx: &mut RequestCtx,
    exchange: &mut Exchange,
    relay: &Relay<'_>,
    authority: &str,
    deadline: Option<Instant>,
) -> Result<Whole, GatewayError> {
    let cfg = relay.upstream.config();
    // Sized by the announced length when there is one: the body is then
    // read into one buffer of exactly its size (no growth, and no second
    // allocation when it becomes `Bytes`).
    let announced = exchange
        .http
        .resp_header()
        .and_then(|h| h.headers.get(http::header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut buf = bytes::BytesMut::with_capacity(announced.min(WHOLE_MAX));
    let total = until(deadline);
    tokio::pin!(total);
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut total => {
                return Err(total_timeout_error(cfg.total_timeout.unwrap_or_default()).into());
            }
            // Copied straight from Pingora's buffer (`read_body_bytes` would
            // copy each piece once more).
            read = tokio::time::timeout(cfg.idle_timeout, exchange.http.read_body_ref()) => {
                read.map(|r| r.map(|piece| piece.map(|piece| buf.extend_from_slice(piece))))
            }
            _ = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(ctx.client_left(DisconnectPhase::BeforeFirstToken));
            }
        };
        match next {
            Ok(Ok(Some(()))) => {
                if buf.len() > WHOLE_MAX {
                    return Ok(Whole::Partial(buf.freeze()));
                }
            }
            Ok(Ok(None)) => return Ok(Whole::Complete(buf.freeze())),
            Ok(Err(e)) => {
                let protocol = is_protocol_error(&e);
                ctx.upstream_error = Some(if protocol {
                    UpstreamErrorKind::InvalidResponse
                } else {
                    UpstreamErrorKind::Reset
                });
                let why = e.etype().as_str().to_lowercase();
                return Err(if protocol {
                    ApiError::upstream_malformed(authority, &why)
                } else {
                    ApiError::stream_cut(authority, &why)
                }
                .into());
            }
            Err(_) => {
                ctx.upstream_error = Some(UpstreamErrorKind::Timeout);
                return Err(ApiError::upstream_silent(
                    authority,
                    cfg.idle_timeout,
                    "upstream.idle_timeout",
                )
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests;
