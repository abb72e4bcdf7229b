//! Serving one request: hygiene, the route table, authentication, limits,
//! then the model routes (body read, checked, rewritten, relayed). Every
//! request is answered here or in the files beside it.

use bytes::{Bytes, BytesMut};
use pingora_error::{ErrorType, Result};
use pingora_proxy::Session;
use serde_json::json;

use super::ctx::{DisconnectPhase, RequestCtx};
use super::respond::write_response;
use super::GatewayProxy;
use crate::errors::{ApiError, GatewayError};
use crate::labels::{AuthFailure, LimitReason, StoreFallback};
use crate::metrics::app as metrics_app;
use crate::openai::{body, prefix};
use crate::policy::auth::ApiKey;
use crate::policy::budget::Reservation;
use crate::policy::limits::OnStoreError;
use crate::policy::ratelimit::Window;
use crate::policy::routes::Route;
use crate::policy::{hygiene, limits, tokens};
use crate::shared::SlotLease;
use crate::upstream::balance::FirstPick;
use crate::upstream::relay::{Relay, UpstreamPath};

impl GatewayProxy {
    pub(super) async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
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
                let (status, body) = self.health();
                self.respond_json(session, ctx, status, body.to_string())
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
                let list = self.state.cfg.catalogue.list_body(key.allowed_models());
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

    /// `/health`: 503 `draining` once a stop began (load balancers take
    /// the edge out), 200 `degraded` while the shared store is away (the
    /// edge serves under `state.on_error`), else 200 `ok`.
    fn health(&self) -> (u16, serde_json::Value) {
        if self
            .state
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return (503, json!({"status": "draining"}));
        }
        match &self.state.shared {
            Some(store) if !store.is_up() => {
                (200, json!({"status": "degraded", "store": "unreachable"}))
            }
            _ => (200, json!({"status": "ok"})),
        }
    }

    /// The key the request presents. A valid key is never throttled by
    /// others' failures from the same address (a NAT, an office): only
    /// requests whose key fails count towards, and are refused by, the
    /// per-IP limit on failed authentications.
    pub(super) fn authenticate<'k>(
        &'k self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<&'k ApiKey, GatewayError> {
        let headers = &session.req_header().headers;
        let values = |name| headers.get_all(name).into_iter().map(|v| v.as_bytes());
        let token =
            crate::policy::auth::presented_token(values("authorization"), values("x-api-key"))?;
        match self.state.cfg.keys.authenticate_token(token) {
            Ok(key) => Ok(key),
            Err(e) => {
                if e.auth_failure() == Some(AuthFailure::InvalidKey) {
                    ctx.key_id = Some(super::ctx::invalid_key_id());
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
    pub(super) fn admit(&self, ctx: &mut RequestCtx, key: &ApiKey) -> Result<(), GatewayError> {
        let now = std::time::Instant::now();
        let admitted = self.state.limiter.admit(&key.id, now);
        ctx.ratelimit.requests = self.state.limiter.request_window(&key.id, now);
        self.note_tokens_window(ctx, key);
        ctx.limit_guard = Some(admitted.map_err(|refusal| refusal_error(ctx, refusal))?);
        Ok(())
    }

    /// With `state.redis`: the key's limits across every edge, in one
    /// round trip (after this edge's own checks, which no request over the
    /// fleet's limits can pass either), with the lease of `slot` (an
    /// upstream's name and `max_in_flight`) pipelined in the same round
    /// trip; the lease, when it was taken, is returned. A store that does
    /// not answer leaves the decision to `state.on_error`.
    pub(super) async fn shared_admit(
        &self,
        ctx: &mut RequestCtx,
        key: &ApiKey,
        tokens: u64,
        slot: Option<(&str, usize)>,
    ) -> Result<Option<SlotLease>, GatewayError> {
        let (Some(store), Some(fallback)) = (&self.state.shared, &self.state.fallback) else {
            return Ok(None);
        };
        let Some(limits) = fallback.fleet.get(&*key.id).copied() else {
            return Ok(None);
        };
        if limits.requests_per_minute.is_none()
            && limits.max_concurrent.is_none()
            && limits.tokens.is_empty()
        {
            return Ok(None);
        }
        let now = tokens::now_ms();
        match store.admit_key(&key.id, &limits, tokens, now, slot).await {
            Ok((Ok(admission), slot)) => {
                if let Some(window) = admission.request_window() {
                    ctx.ratelimit.requests = Some(window);
                }
                ctx.shared = Some(admission);
                Ok(slot)
            }
            Ok((Err(refusal), _)) => Err(refusal_error(ctx, refusal).into()),
            Err(down) => {
                log::debug!("shared store: {}; state.on_error applies", down.0);
                self.store_fallback(ctx, key, tokens, now).map(|()| None)
            }
        }
    }

    fn store_fallback(
        &self,
        ctx: &mut RequestCtx,
        key: &ApiKey,
        tokens: u64,
        now_ms: u64,
    ) -> Result<(), GatewayError> {
        let metrics = &self.state.metrics;
        let (Some(fallback), Some(OnStoreError::Local)) = (
            &self.state.fallback,
            self.state.shared.as_ref().map(|s| s.on_error()),
        ) else {
            metrics.store_fallback(StoreFallback::Deny);
            ctx.limited = Some(LimitReason::StoreUnavailable);
            return Err(ApiError::Overloaded(
                    "the gateways' shared state store is unreachable and this gateway is configured to refuse requests meanwhile (state.on_error: deny); retry shortly".into(),
                )
                .into());
        };
        metrics.store_fallback(StoreFallback::Local);
        let guard = fallback
            .limiter
            .admit(&key.id, std::time::Instant::now())
            .map_err(|refusal| refusal_error(ctx, refusal))?;
        let reservation = if tokens > 0 {
            Some(
                fallback
                    .tokens
                    .reserve(&key.id, tokens, now_ms)
                    .map_err(|refusal| refusal_error(ctx, refusal))?,
            )
        } else {
            None
        };
        ctx.fallback = Some((guard, reservation));
        Ok(())
    }

    fn note_tokens_window(&self, ctx: &mut RequestCtx, key: &ApiKey) {
        let state = self.state.tokens.state(&key.id, tokens::now_ms());
        ctx.ratelimit.tokens = state.and_then(|s| {
            s.per_minute.map(|limit| Window {
                limit,
                remaining: s.remaining,
                reset: s.reset,
            })
        });
    }

    /// Reserves the request's worst case against its key's token limits:
    /// the prompt estimate plus every generation's length. A generation
    /// without a length (and no ceiling on the key) gets one written: what
    /// the budget has left, so it cannot run past it. Returns the length to
    /// write upstream.
    fn reserve_tokens(
        &self,
        ctx: &mut RequestCtx,
        key: &ApiKey,
        api_route: &Route,
        info: &body::RequestBody,
        body_len: usize,
        mut max_tokens: Option<u64>,
    ) -> Result<Option<u64>, GatewayError> {
        let budget = &self.state.tokens;
        let now = tokens::now_ms();
        let Some(room) = budget.room(&key.id, now) else {
            return Ok(max_tokens);
        };
        if api_route.counts_tokens_only() {
            return Ok(max_tokens);
        }
        let prompt = tokens::estimate_prompt_tokens(body_len);
        let worst = if api_route.ceiling_field().is_some() {
            let choices = info.choices.max(1);
            let per_generation = match [info.requested_max_tokens(), max_tokens]
                .into_iter()
                .flatten()
                .min()
            {
                Some(n) => n,
                None => {
                    let left =
                        (room.saturating_sub(prompt) / choices).min(limits::MAX_WRITTEN_TOKENS);
                    // Nothing left: reserving one token each gives the refusal.
                    let left = left.max(1);
                    max_tokens = Some(left);
                    left
                }
            };
            let completion = per_generation.saturating_mul(choices);
            ctx.reserved_completion = (choices > 1).then_some(completion);
            prompt.saturating_add(completion)
        } else {
            prompt
        };
        let reserved = budget
            .reserve(&key.id, worst, now)
            .map_err(|refusal| refusal_error(ctx, refusal));
        self.note_tokens_window(ctx, key);
        ctx.tokens = Some(reserved?);
        ctx.prompt_estimate = prompt;
        Ok(max_tokens)
    }

    pub(super) async fn forward_model_request(
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
                key_id: key.id.to_string(),
                model: requested.unwrap_or(&route.name).to_string(),
            }
            .into());
        }
        // Only generations have a token ceiling; each dialect inserts its own field.
        let insert_as = api_route.ceiling_field();
        let max_tokens = match insert_as {
            Some(_) => limits::max_tokens_to_send(&self.state.limiter.key_limits(&key.id), &info)?,
            None => None,
        };
        let max_tokens = self.reserve_tokens(ctx, key, api_route, &info, body.len(), max_tokens)?;
        // The affinity key comes from the body as the client sent it (only
        // when it can change where the request goes).
        let affinity = (api_route.generates()
            && self.state.upstream.routes_by_affinity(&route.upstreams))
        .then(|| {
            let header = self.state.upstream.config().affinity_header.as_deref();
            let header = header
                .and_then(|h| session.get_header(h))
                .and_then(|v| v.to_str().ok());
            Box::new(prefix::derive(&body, &route.name, header, &key.id))
        })
        .filter(|a| !a.is_empty());
        // With a shared store, the server is chosen now, so that its slot
        // across edges is leased in the key's admission round trip.
        let upstream = &self.state.upstream;
        let mut first = self.state.shared.as_ref().and_then(|_| {
            let (index, choice) =
                upstream.choose_for(&route.upstreams, &[], affinity.as_deref())?;
            Some(FirstPick {
                index,
                choice,
                slot: None,
            })
        });
        let early = first
            .as_ref()
            .and_then(|pick| upstream.slot_to_lease_early(pick.index));
        let reserved = ctx.tokens.as_ref().map_or(0, |t| t.tokens());
        let slot = self.shared_admit(ctx, key, reserved, early).await?;
        if let Some(pick) = first.as_mut() {
            pick.slot = slot;
        }
        let rewrite = body::Rewrite {
            upstream_model: &route.upstream_name,
            max_tokens,
            insert_as: insert_as.unwrap_or(body::InsertAs::MaxTokens),
        };
        let body = body::rewrite(body, &info, &rewrite);
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
            affinity: affinity.as_deref(),
            path: UpstreamPath::Fixed(api_route.upstream_path().unwrap_or("/")),
            content_length: true,
        };
        let result = relay.forward(session, ctx, body, reservation, first).await;
        ctx.affinity = affinity;
        result
    }

    /// Reads the whole request body, within the per-request limit, the
    /// global budget (reserved as bytes arrive, never from the declared
    /// length), the caps on bodies being received at once per key and per
    /// IP, and `downstream.body_timeout` for the whole body. Oversized bodies
    /// are refused as soon as that is known (from `Content-Length`, or while
    /// reading) without reading the rest.
    pub(super) async fn read_body(
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
        // A body that arrives as one piece is kept as it is; the buffer is
        // allocated for a second piece, as bytes arrive (a declared length
        // is only a claim).
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
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
                        first.as_ref().map_or(buf.len(), Bytes::len)
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
            let held = first.as_ref().map_or(buf.len(), Bytes::len);
            let total = held + chunk.len();
            if total > limit {
                return Err(ApiError::BodyTooLarge { limit }.into());
            }
            if !reservation.grow_to(total) {
                return Err(overloaded().into());
            }
            if held == 0 {
                first = Some(chunk);
            } else {
                if let Some(first) = first.take() {
                    buf.reserve(declared.unwrap_or(0).min(64 * 1024).max(total));
                    buf.extend_from_slice(&first);
                }
                buf.extend_from_slice(&chunk);
            }
            ctx.bytes_in = total;
        }
        Ok((first.unwrap_or_else(|| buf.freeze()), reservation))
    }
}

/// A limit's refusal as the 429 the client gets (and the metric label it leaves).
pub(super) fn refusal_error(ctx: &mut RequestCtx, refusal: limits::Refusal) -> ApiError {
    ctx.limited = Some(refusal.reason);
    ApiError::RateLimited {
        message: refusal.message,
        retry_after: refusal.retry_after.as_secs_f64().ceil() as u64,
    }
}

pub(super) fn overloaded() -> ApiError {
    ApiError::Overloaded(
        "the gateway is holding too many request bodies at once (limits.max_buffered_body_bytes); retry shortly".into(),
    )
}
