//! [`GatewayProxy`]: the Pingora `ProxyHttp` implementation.
//!
//! Each phase is a short adapter over the pure modules. `request_filter`
//! does everything: it classifies the route (default-deny: a path outside
//! the route table is a 404 that never reaches llama-server), authenticates,
//! answers health and model listings itself, and for the model routes and
//! the operator's passthrough paths reads the body (bounded), checks and
//! rewrites it and relays the request (see `upstream.rs` for why this does
//! not use Pingora's proxy loop). Every request is answered there, so
//! Pingora's upstream phases never run.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use serde_json::json;

use crate::auth::ApiKey;
use crate::body;
use crate::budget::Reservation;
use crate::cors::CorsPolicy;
use crate::ctx::{self, DisconnectPhase, RequestCtx, CLIENT_CLOSED_REQUEST};
use crate::errors::ApiError;
use crate::gateway_error::GatewayError;
use crate::headers;
use crate::hygiene;
use crate::limits;
use crate::metrics::{RequestRecord, KEY_INVALID};
use crate::metrics_app;
use crate::relay::Relay;
use crate::routes::{Dialect, Route};
use crate::state::GatewayState;
use crate::upstream::HealthReport;

/// A server's state in `/health/upstream`, and what it said.
fn health_words(report: &HealthReport) -> (&'static str, Option<&str>) {
    match report {
        HealthReport::Healthy => ("ok", None),
        HealthReport::Loading(d) => ("loading", Some(d)),
        HealthReport::Unhealthy(d) => ("unhealthy", Some(d)),
        HealthReport::Unreachable(d) => ("unreachable", Some(d)),
    }
}

/// How long, after answering 413, we keep reading (and discarding) what the
/// client still sends, so it reads our answer instead of a connection reset.
const LINGER_AFTER_REJECT: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 64 << 20;

pub struct GatewayProxy {
    state: Arc<GatewayState>,
}

impl GatewayProxy {
    pub fn new(state: Arc<GatewayState>) -> GatewayProxy {
        GatewayProxy { state }
    }

    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let req = session.req_header();
        let raw_target = (!session.is_http2()).then(|| req.raw_path());
        hygiene::check(
            raw_target,
            &req.uri,
            &req.headers,
            self.state.cfg.limits.max_header_bytes,
        )?;
        if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
            if let Some(h1) = session.as_downstream().as_http1() {
                hygiene::check_raw_framing(&h1.get_headers_raw_bytes())?;
            }
        }
        if req.method == http::Method::OPTIONS {
            let requested = session
                .get_header("access-control-request-headers")
                .and_then(|v| v.to_str().ok());
            let resp = self
                .state
                .cfg
                .cors
                .preflight(ctx.cors_origin.as_deref(), requested)?;
            write_response(session, ctx, &self.state.cfg.cors, resp, Bytes::new()).await?;
            return Ok(());
        }
        if self.state.cfg.metrics.on_public_listener
            && req.uri.path() == self.state.cfg.metrics.path
        {
            let authorization = session.get_header("authorization").map(|v| v.as_bytes());
            // Boxed: a rare route's large future would grow every request's.
            let (status, body) = Box::pin(metrics_app::scrape(&self.state, authorization)).await;
            let resp = metrics_app::response_header(status, body.len())?;
            write_response(session, ctx, &self.state.cfg.cors, resp, Bytes::from(body)).await?;
            return Ok(());
        }
        // On HTTP/1 the target exactly as sent: what llama-server would decode.
        let path = match raw_target {
            Some(raw) => std::str::from_utf8(raw).map_err(|_| {
                ApiError::InvalidRequest("the request path must be ASCII text".into())
            })?,
            None => req.uri.path(),
        };
        let route = self.state.cfg.routes.classify(req.method.as_str(), path)?;
        ctx.route = Some(route.clone());
        match route {
            Route::Health => {
                self.respond_json(session, ctx, 200, json!({"status": "ok"}).to_string())
                    .await?;
                return Ok(());
            }
            Route::HealthUpstream => {
                Box::pin(self.upstream_health(session, ctx)).await?;
                return Ok(());
            }
            _ => {}
        }
        if let Some(ip) = ctx.client_ip {
            let entered = self.state.clients.enter(ip);
            ctx.ip_slot = entered.map_err(|refusal| refusal_error(ctx, refusal))?;
        }
        let key = self.authenticate(session, ctx)?;
        ctx.key_id = Some(key.id.clone());
        match route {
            Route::ListModels => {
                let list = self.state.cfg.catalogue.list_json(|m| key.allows(&m.name));
                self.respond_json(session, ctx, 200, list).await?;
                Ok(())
            }
            Route::GetModel(id) => {
                let visible = self
                    .state
                    .cfg
                    .catalogue
                    .resolve(Some(&id))
                    .filter(|m| key.allows(&m.name))
                    .and_then(|_| self.state.cfg.catalogue.model_json(&id));
                let model = visible.ok_or(ApiError::ModelNotFound(id))?;
                self.respond_json(session, ctx, 200, model).await?;
                Ok(())
            }
            Route::Passthrough => {
                self.forward_passthrough(session, ctx, key).await?;
                Ok(())
            }
            r => {
                self.forward_model_request(session, ctx, key, &r).await?;
                Ok(())
            }
        }
    }

    /// The key the request presents. A valid key is never throttled by
    /// others' failures from the same address (a NAT, an office): only
    /// requests whose key fails count towards, and are refused by, the
    /// per-IP limit on failed authentications.
    fn authenticate<'k>(
        &'k self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<&'k ApiKey, GatewayError> {
        let headers = &session.req_header().headers;
        let authorization: Vec<&[u8]> = headers
            .get_all("authorization")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let x_api_key: Vec<&[u8]> = headers
            .get_all("x-api-key")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let token = crate::auth::presented_token(&authorization, &x_api_key)?;
        match self.state.cfg.keys.authenticate_token(token) {
            Ok(key) => Ok(key),
            Err(e) => {
                if e.code() == "invalid_api_key" {
                    ctx.key_id = Some(KEY_INVALID.to_string());
                }
                if let Some(ip) = ctx.client_ip {
                    let clients = &self.state.clients;
                    clients
                        .check_auth_throttle(ip)
                        .map_err(|refusal| refusal_error(ctx, refusal))?;
                    clients.note_auth_failure(ip);
                }
                Err(e.into())
            }
        }
    }

    /// Limits first: a refused request costs no body read and never
    /// reaches the upstream.
    fn admit(&self, ctx: &mut RequestCtx, key: &ApiKey) -> Result<(), GatewayError> {
        let admitted = self.state.limiter.admit(&key.id, std::time::Instant::now());
        ctx.limit_guard = Some(admitted.map_err(|refusal| refusal_error(ctx, refusal))?);
        Ok(())
    }

    /// A path the operator opened: the key and its request limits hold; the
    /// body (bounded like any other) goes upstream as it came.
    async fn forward_passthrough(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        key: &ApiKey,
    ) -> Result<(), GatewayError> {
        self.admit(ctx, key)?;
        let (body, reservation) = self.read_body(session, ctx, key).await?;
        let req = session.req_header();
        let path = req.uri.path();
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let has_body = !body.is_empty() || !matches!(req.method.as_str(), "GET" | "HEAD");
        let req = headers::upstream_request(
            req,
            &headers::Forwarding {
                path,
                query: req.uri.query(),
                body_len: has_body.then_some(body.len()),
                request_id: ctx.request_id.as_deref(),
                client_ip: ctx.client_ip,
            },
        )?;
        let relay = Relay {
            upstream: &self.state.upstream,
            metrics: &self.state.metrics,
            cors: &self.state.cfg.cors,
            allowed: &[],
            model: "(passthrough)",
            key: &key.id,
            dialect: Dialect::OpenAi,
            expects_json: false,
            accounting: false,
        };
        relay.forward(session, ctx, req, body, reservation).await
    }

    async fn forward_model_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        key: &ApiKey,
        api_route: &Route,
    ) -> Result<(), GatewayError> {
        self.admit(ctx, key)?;
        let (body, reservation) = self.read_body(session, ctx, key).await?;
        let info = body::inspect(&body)?;
        let requested = info.model.as_ref().map(|m| m.name.as_str());
        let route =
            self.state.cfg.catalogue.resolve(requested).ok_or_else(|| {
                ApiError::ModelNotFound(requested.unwrap_or_default().to_string())
            })?;
        ctx.model = Some(route.name.clone());
        if !key.allows(&route.name) {
            return Err(ApiError::ModelNotAllowed {
                key_id: key.id.clone(),
                model: requested.unwrap_or(&route.name).to_string(),
            }
            .into());
        }
        // Only generations have a token ceiling; each dialect inserts its own field.
        let insert_as = match api_route {
            Route::Messages => Some(body::InsertAs::AnthropicMaxTokens),
            Route::Responses => Some(body::InsertAs::MaxOutputTokens),
            Route::ChatCompletions | Route::Completions => Some(body::InsertAs::MaxTokens),
            _ => None,
        };
        let max_tokens = match insert_as {
            Some(_) => limits::max_tokens_to_send(&self.state.limiter.key_limits(&key.id), &info)?,
            None => None,
        };
        let rewrite = body::Rewrite {
            upstream_model: &route.upstream_name,
            max_tokens,
            insert_as: insert_as.unwrap_or(body::InsertAs::MaxTokens),
        };
        let body = body::rewrite(body, &info, &rewrite);
        let req = session.req_header();
        let req = headers::upstream_request(
            req,
            &headers::Forwarding {
                path: api_route.upstream_path().unwrap_or("/"),
                query: req.uri.query(),
                body_len: Some(body.len()),
                request_id: ctx.request_id.as_deref(),
                client_ip: ctx.client_ip,
            },
        )?;
        let relay = Relay {
            upstream: &self.state.upstream,
            metrics: &self.state.metrics,
            cors: &self.state.cfg.cors,
            allowed: &route.upstreams,
            model: &route.name,
            key: &key.id,
            dialect: api_route.dialect(),
            expects_json: true,
            accounting: !api_route.counts_tokens_only(),
        };
        relay.forward(session, ctx, req, body, reservation).await
    }

    /// Reads the whole request body, within the per-request limit, the
    /// global budget (reserved as bytes arrive, never from the declared
    /// length), the caps on bodies being received at once per key and per
    /// IP, and `downstream.body_timeout` for the whole body. Oversized bodies
    /// are refused as soon as that is known (from `Content-Length`, or while
    /// reading) without reading the rest.
    async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        key: &ApiKey,
    ) -> Result<(Bytes, Reservation), GatewayError> {
        let limit = self.state.cfg.limits.max_body_bytes;
        let declared = match session.get_header("content-length") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        ApiError::InvalidRequest("invalid Content-Length header".into())
                    })?,
            ),
        };
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::BodyTooLarge { limit }.into());
        }
        let mut reservation = Reservation::empty(&self.state.budget);
        if session.is_body_done() {
            return Ok((Bytes::new(), reservation));
        }
        let _uploading = self
            .state
            .uploads
            .enter(&key.id, ctx.client_ip)
            .map_err(|refusal| refusal_error(ctx, refusal))?;
        let expects_continue = session
            .get_header("expect")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await
                .map_err(|_| ctx.client_left(DisconnectPhase::BeforeFirstToken))?;
        }
        // Allocated as bytes arrive too: a declared length is only a claim.
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(64 * 1024));
        let body_timeout = self.state.cfg.downstream.body_timeout;
        let deadline = tokio::time::Instant::now() + body_timeout;
        loop {
            let read = tokio::time::timeout_at(deadline, session.read_request_body()).await;
            let chunk = match read {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => break,
                Err(_) => {
                    return Err(ApiError::BodyTimeout(format!(
                        "the request body did not arrive within {} (downstream.body_timeout); received {} bytes",
                        humantime::format_duration(body_timeout),
                        buf.len()
                    ))
                    .into())
                }
                Ok(Err(e)) if e.etype() == &ErrorType::ReadTimedout => {
                    return Err(ApiError::BodyTimeout(
                        "timed out reading the request body (downstream.read_timeout)".into(),
                    )
                    .into())
                }
                Ok(Err(e))
                    if matches!(
                        e.etype(),
                        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                    ) =>
                {
                    return Err(ctx.client_left(DisconnectPhase::BeforeFirstToken))
                }
                Ok(Err(e)) => {
                    // What follows on this connection cannot be framed: close it.
                    session.set_keepalive(None);
                    return Err(ApiError::InvalidRequest(format!(
                        "the request body's framing is broken ({}): send a Content-Length body or valid chunked encoding",
                        e.etype().as_str()
                    ))
                    .into())
                }
            };
            let total = buf.len() + chunk.len();
            if total > limit {
                return Err(ApiError::BodyTooLarge { limit }.into());
            }
            if !reservation.grow_to(total) {
                return Err(overloaded().into());
            }
            buf.extend_from_slice(&chunk);
            ctx.bytes_in = total;
        }
        Ok((buf.freeze(), reservation))
    }

    /// Every server's health. 200 while at least one is up (`degraded`
    /// when some are not), else 503 with each server's state.
    async fn upstream_health(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let set = &self.state.upstream;
        // With several servers, the health checker's last findings: this
        // path needs no key, and must not open a connection to every server
        // per call. A lone server is probed now, as before.
        let cached = (!set.is_single()).then(|| set.last_reports()).flatten();
        let reports = match cached {
            Some(reports) => reports,
            None => set.check_all().await,
        };
        let servers: Vec<serde_json::Value> = set
            .members()
            .iter()
            .zip(&reports)
            .map(|(m, report)| {
                let (status, detail) = health_words(report);
                let mut v = json!({
                    "name": m.server().name,
                    "upstream": m.server().authority,
                    "status": status,
                });
                if let Some(detail) = detail {
                    v["message"] = json!(detail);
                }
                v
            })
            .collect();
        let up = reports
            .iter()
            .filter(|r| **r == HealthReport::Healthy)
            .count();
        let authority = match set.members() {
            [single] => single.server().authority.clone(),
            _ => set
                .members()
                .iter()
                .map(|m| m.server().authority.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        if up > 0 {
            let status = if up == reports.len() {
                "ok"
            } else {
                "degraded"
            };
            let body = json!({"status": status, "upstream": authority, "upstreams": servers});
            return self.respond_json(session, ctx, 200, body.to_string()).await;
        }
        let (state, message) = match reports.as_slice() {
            [HealthReport::Loading(detail)] => (
                "loading",
                format!("llama-server at {authority} is still loading its model: {detail}"),
            ),
            [HealthReport::Unhealthy(detail)] => ("unhealthy", detail.clone()),
            [HealthReport::Unreachable(detail)] => ("unreachable", detail.clone()),
            all => {
                let loading = all.iter().all(|r| matches!(r, HealthReport::Loading(_)));
                (
                    if loading { "loading" } else { "unreachable" },
                    format!(
                        "none of the {} upstream servers is up: {}",
                        all.len(),
                        set.describe(&[])
                    ),
                )
            }
        };
        let error = ApiError::UpstreamUnavailable(message);
        ctx.error_code = Some(error.code());
        let mut body: serde_json::Value =
            serde_json::from_slice(&error.body(ctx.request_id.as_deref())).unwrap_or_default();
        body["status"] = json!(state);
        body["upstream"] = json!(authority);
        body["upstreams"] = json!(servers);
        self.respond_json(session, ctx, 503, body.to_string()).await
    }

    async fn respond_json(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: String,
    ) -> Result<(), GatewayError> {
        let resp = json_response_header(status, body.len())?;
        write_response(session, ctx, &self.state.cfg.cors, resp, Bytes::from(body)).await
    }

    /// Answers with an OpenAI-shaped error.
    async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: &ApiError,
    ) -> Result<()> {
        ctx.error_code = Some(err.code());
        let body_unread = !session.is_body_done();
        if body_unread {
            // Otherwise Pingora would drain the whole unread body before answering.
            session.set_keepalive(None);
        }
        let dialect = ctx.route.as_ref().map_or(Dialect::OpenAi, Route::dialect);
        let body = err.body_in(dialect, ctx.request_id.as_deref());
        let mut resp = json_response_header(err.status(), body.len())?;
        match err {
            ApiError::MissingKey(_) | ApiError::InvalidKey(_) => {
                resp.insert_header("WWW-Authenticate", "Bearer")?;
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                resp.insert_header("Allow", *allowed)?;
            }
            _ => {}
        }
        if let Some(seconds) = err.retry_after() {
            resp.insert_header("Retry-After", seconds.to_string())?;
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

    /// The name of the server the request went to (or the first one).
    fn upstream_name(&self, ctx: &RequestCtx) -> &str {
        self.upstream_server(ctx).name.as_str()
    }

    fn upstream_server(&self, ctx: &RequestCtx) -> &crate::config::UpstreamServer {
        let members = self.state.upstream.members();
        members[ctx.upstream.unwrap_or(0).min(members.len() - 1)].server()
    }

    /// Per-request totals, recorded once when the request ends.
    fn record_metrics(&self, ctx: &mut RequestCtx, status: u16) {
        let stats = ctx.accounting.finish();
        let m = &self.state.metrics;
        m.record_request(&RequestRecord {
            route: ctx.route_label(),
            model: ctx.model.as_deref(),
            key: ctx.key_id.as_deref(),
            status,
            duration: ctx.start.elapsed(),
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            stats: stats.as_ref(),
        });
        if let Some(phase) = ctx.disconnect {
            m.client_disconnect(phase.label());
        }
        if let Some(reason) = ctx.limited {
            m.rate_limited(ctx.key_id.as_deref(), reason);
        }
        let upstream = self.upstream_name(ctx);
        if let Some(kind) = ctx.upstream_error {
            m.upstream_error(upstream, kind);
        } else if ctx.upstream_status.is_some_and(|s| s >= 500) {
            m.upstream_error(upstream, "5xx");
        }
        if let Some(code @ ("missing_api_key" | "invalid_api_key" | "model_not_allowed")) =
            ctx.error_code
        {
            m.auth_failure(code);
        }
    }
}

/// A limit's refusal as the 429 the client gets (and the metric label it leaves).
fn refusal_error(ctx: &mut RequestCtx, refusal: limits::Refusal) -> ApiError {
    ctx.limited = Some(refusal.reason);
    ApiError::RateLimited {
        message: refusal.message,
        retry_after: refusal.retry_after.as_secs_f64().ceil() as u64,
    }
}

/// HTTP/1.1 keeps a connection unless the client says `close`; HTTP/1.0
/// only when it asks for `keep-alive`.
fn client_keeps_alive(http10: bool, headers: &http::HeaderMap) -> bool {
    let says = |word: &str| {
        headers.get_all(http::header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(word.as_bytes()))
        })
    };
    if http10 {
        says("keep-alive")
    } else {
        !says("close")
    }
}

fn overloaded() -> ApiError {
    ApiError::Overloaded(
        "the gateway is holding too many request bodies at once (limits.max_buffered_body_bytes); retry shortly".into(),
    )
}

fn json_response_header(status: u16, len: usize) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("Content-Type", "application/json")?;
    resp.insert_header("Content-Length", len.to_string())?;
    Ok(resp)
}

/// Writes a whole response the gateway answers itself.
async fn write_response(
    session: &mut Session,
    ctx: &mut RequestCtx,
    cors: &CorsPolicy,
    mut resp: ResponseHeader,
    body: Bytes,
) -> Result<(), GatewayError> {
    headers::finish_client_response(
        &mut resp,
        ctx.request_id.as_deref(),
        cors,
        ctx.cors_origin.as_deref(),
    )?;
    ctx.status = Some(resp.status.as_u16());
    ctx.bytes_out += body.len();
    let written = async {
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    };
    written
        .await
        .map_err(|_| ctx.client_left(DisconnectPhase::BeforeFirstToken))
}

/// Reads and discards what the client still sends after an early answer,
/// briefly, so closing the socket does not reset the connection under the
/// answer the client has not read yet.
async fn linger(session: &mut Session) {
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

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.in_flight = Some(self.state.metrics.request_started());
        session.set_read_timeout(Some(self.state.cfg.downstream.read_timeout));
        let req = session.req_header();
        ctx.http10 = !session.is_http2() && req.version == http::Version::HTTP_10;
        if client_keeps_alive(ctx.http10, &req.headers) {
            session.set_keepalive(Some(
                self.state.cfg.downstream.keepalive_timeout.as_secs().max(1),
            ));
        } else {
            session.set_keepalive(None);
        }
        let incoming = session
            .get_header("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| ctx::valid_request_id(id));
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let forwarded_for = session
            .get_header("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        ctx.client_ip = self.state.clients.client_ip(peer, forwarded_for);
        let origin = session.get_header("origin").and_then(|v| v.to_str().ok());
        ctx.cors_origin = self.state.cfg.cors.allowed(origin);
        ctx.request_id = Some(match incoming {
            Some(id) => id.to_string(),
            None => uuid::Uuid::new_v4().simple().to_string(),
        });
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.serve(session, ctx).await {
            Ok(()) => Ok(true),
            Err(GatewayError::Api(err)) => {
                self.respond_error(session, ctx, &err).await?;
                Ok(true)
            }
            Err(GatewayError::ClientGone) => {
                Error::e_explain(ErrorType::ConnectionClosed, "client closed the connection")
            }
            Err(GatewayError::Aborted(e)) => Err(e),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // request_filter answers every request (default-deny): nothing
        // reaches Pingora's own proxy loop.
        Error::e_explain(
            ErrorType::InternalError,
            "every request is answered in request_filter",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let already_answered = ctx.status.is_some() || session.response_written().is_some();
        if already_answered {
            return FailToProxy {
                error_code: ctx.status.unwrap_or(0),
                can_reuse_downstream: false,
            };
        }
        let err = match (e.esource(), e.etype()) {
            (ErrorSource::Downstream, _) => {
                ctx.status = Some(CLIENT_CLOSED_REQUEST);
                return FailToProxy {
                    error_code: CLIENT_CLOSED_REQUEST,
                    can_reuse_downstream: false,
                };
            }
            (
                _,
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectError
                | ErrorType::ConnectNoRoute,
            ) => {
                ctx.upstream_error = Some(crate::upstream::connect_kind(e));
                if self.state.upstream.is_single() {
                    ApiError::UpstreamUnreachable(format!(
                        "the upstream llama-server at {} is unreachable: check that the SSH tunnel from the GPU machine is up and llama-server is running behind it",
                        self.upstream_server(ctx).authority
                    ))
                } else {
                    ApiError::UpstreamUnavailable(format!(
                        "no upstream server could take the request: {}; check their SSH tunnels and llama-server processes",
                        self.state.upstream.describe(&[])
                    ))
                }
            }
            (_, ErrorType::ReadTimedout) => {
                ctx.upstream_error = Some("timeout");
                ApiError::UpstreamTimeout(format!(
                    "the upstream at {} did not answer in time",
                    self.upstream_server(ctx).authority
                ))
            }
            (ErrorSource::Upstream, _) => {
                ctx.upstream_error = Some("reset");
                ApiError::UpstreamBroken(format!(
                    "the upstream at {} failed ({}): check the SSH tunnel and llama-server",
                    self.upstream_server(ctx).authority,
                    e.etype().as_str().to_lowercase()
                ))
            }
            _ => ApiError::Internal("the gateway failed to handle the request".into()),
        };
        let code = err.status();
        if self.respond_error(session, ctx, &err).await.is_err() {
            ctx.status = Some(CLIENT_CLOSED_REQUEST);
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// What Pingora's own error lines say about a request: method and path,
    /// never the query (clients put keys in it) or any header.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        ctx.status == Some(CLIENT_CLOSED_REQUEST) || ctx.error_code.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The request is over: give its upstream slot and limit counts back now.
        ctx.lease = None;
        ctx.in_flight = None;
        ctx.limit_guard = None;
        ctx.ip_slot = None;
        let status = ctx
            .status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()))
            .unwrap_or(if e.is_some() { 500 } else { 0 });
        // Built only when it will be written (the line costs ~6 allocations).
        if log::log_enabled!(target: "llm_edge::access", log::Level::Info) {
            let req = session.req_header();
            let upstream = ctx.upstream.map(|_| self.upstream_name(ctx));
            let line = ctx.access_log_line(
                &ctx.client_ip
                    .map_or_else(|| "-".to_string(), |ip| ip.to_string()),
                req.method.as_str(),
                req.uri.path(),
                status,
                upstream,
            );
            log::info!(target: "llm_edge::access", "{line}");
        }
        self.record_metrics(ctx, status);
    }
}
