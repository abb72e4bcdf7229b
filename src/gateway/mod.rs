//! [`GatewayProxy`]: the Pingora `ProxyHttp` implementation, phases first.
//!
//! Each phase is a short adapter over the pure modules (`policy`, `openai`)
//! and the upstream (`upstream`). `request_filter`
//! does everything: it classifies the route (default-deny: a path outside
//! the route table is a 404 that never reaches llama-server), authenticates,
//! answers health and model listings itself, and for the model routes and
//! the operator's passthrough paths reads the body (bounded), checks and
//! rewrites it and relays the request (see `upstream/client.rs` for why this does
//! not use Pingora's proxy loop). Every request is answered there, so
//! Pingora's upstream phases never run.

//!
//! Files: [`serve`] (the request path), [`passthrough`], [`health`],
//! [`respond`] (answers the gateway writes), [`ctx`] (the per-request record).
//! This folder may import everything else; nothing else imports it but
//! `server`.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::errors::{ApiError, GatewayError};
use crate::labels::UpstreamErrorKind;
use crate::ledger::Counts;
use crate::logging::AccessLogFormat;
use crate::metrics::RequestRecord;
use crate::openai::sse::ResponseStats;
use crate::policy::tokens;
use crate::state::GatewayState;
use ctx::{RequestCtx, CLIENT_CLOSED_REQUEST};

pub mod ctx;
mod health;
mod passthrough;
mod respond;
mod serve;

pub struct GatewayProxy {
    state: Arc<GatewayState>,
}

impl GatewayProxy {
    pub fn new(state: Arc<GatewayState>) -> GatewayProxy {
        GatewayProxy { state }
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// No downstream modules. Pingora's default adds its response
    /// compression module, disabled (level 0): it would do nothing here but
    /// cost four allocations per request (its context and boxed filters).
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.in_flight = Some(self.state.metrics.request_started());
        session.set_read_timeout(Some(self.state.cfg.downstream.read_timeout));
        let req = session.req_header();
        ctx.http10 = !session.is_http2() && req.version == http::Version::HTTP_10;
        if crate::policy::headers::client_keeps_alive(ctx.http10, &req.headers) {
            session.set_keepalive(Some(
                self.state.cfg.downstream.keepalive_timeout.as_secs().max(1),
            ));
        } else {
            session.set_keepalive(None);
        }
        let incoming = session
            .get_header("x-request-id")
            .filter(|v| v.to_str().is_ok_and(ctx::valid_request_id))
            .cloned();
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
        ctx.cors_refused = self.state.cfg.cors.refused(origin);
        ctx.request_id = incoming.or_else(|| {
            let mut id = [0u8; uuid::fmt::Simple::LENGTH];
            let id = uuid::Uuid::new_v4().simple().encode_lower(&mut id);
            http::HeaderValue::from_str(id).ok()
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
        // request_filter answers every request itself, so what reaches
        // here is either a client that left (already recorded) or a failure
        // before any answer: the gateway's own.
        if e.esource() == &ErrorSource::Downstream {
            ctx.status = Some(CLIENT_CLOSED_REQUEST);
            return FailToProxy {
                error_code: CLIENT_CLOSED_REQUEST,
                can_reuse_downstream: false,
            };
        }
        let err = ApiError::Internal("the gateway failed to handle the request".into());
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
        let stats = ctx.accounting.finish();
        self.affinity_feedback(ctx, stats.as_ref());
        // Built only when it will be written (the line costs ~6 allocations).
        if log::log_enabled!(target: crate::logging::ACCESS_TARGET, log::Level::Info) {
            let req = session.req_header();
            let upstream = self.upstream_server(ctx).map(|s| s.name.as_str());
            let client = ctx::OrDash(ctx.client_ip);
            let (method, path) = (req.method.as_str(), req.uri.path());
            let line = match self.state.cfg.logging.access_log_format {
                AccessLogFormat::Text => {
                    ctx.access_log_line(client, method, path, status, upstream)
                }
                AccessLogFormat::Json => {
                    ctx.access_log_json(client, method, path, status, upstream)
                }
            };
            log::info!(target: crate::logging::ACCESS_TARGET, "{line}");
        }
        self.record_metrics(ctx, status, stats);
    }
}

impl GatewayProxy {
    /// Replaces the request's token reservation with what it used, and adds
    /// it to the usage ledger. A stream cut before its usage arrived is
    /// charged its prompt estimate plus the tokens it streamed, one whose
    /// client left before any answer its prompt estimate; a request refused
    /// or failed before a server answered, nothing; several generations (`n`),
    /// at least what was reserved for them.
    fn settle_usage(&self, ctx: &mut RequestCtx, status: u16, stats: Option<&ResponseStats>) {
        let now = tokens::now_ms();
        let counts = stats.map(ResponseStats::tokens).unwrap_or_default();
        let reported = stats.is_some_and(|s| s.usage.is_some() || s.timings.is_some());
        let answered = ctx.upstream_status.is_some_and(|s| s < 400);
        let prompt = if !reported && answered && counts.prompt == 0 {
            ctx.prompt_estimate
        } else {
            counts.prompt
        };
        let (prompt, completion) = match (ctx.upstream_status, ctx.reserved_completion) {
            // Left before any answer: llama-server may have been working on
            // the prompt (a non-streamed answer's header comes last), so the
            // prompt is charged; a request that never left the gateway pays
            // it too, the safe side of a budget.
            (None, _) if ctx.disconnect.is_some() => (ctx.prompt_estimate, 0),
            (None, _) => (0, 0),
            // Several generations: llama-server's usage is the first one's.
            (Some(s), Some(reserved)) if s < 400 => (prompt, counts.completion.max(reserved)),
            (Some(_), _) => (prompt, counts.completion),
        };
        if let Some(reservation) = ctx.tokens.take() {
            reservation.settle(prompt + completion, now);
        }
        if let Some(shared) = ctx.shared.take() {
            shared.settle(prompt + completion);
        }
        if let Some((_, Some(reservation))) = ctx.fallback.take() {
            reservation.settle(prompt + completion, now);
            // Decided without the store: the fleet's quotas learn of it later.
            if let (Some(store), Some(fallback), Some(key)) = (
                &self.state.shared,
                &self.state.fallback,
                ctx.key_id.as_deref(),
            ) {
                if let Some(limits) = fallback.fleet.get(key) {
                    store.owe(key, &limits.tokens, prompt + completion, now);
                }
            }
        }
        let (Some(key), Some(model)) = (ctx.key_id.as_deref(), ctx.model.as_deref()) else {
            return;
        };
        let gpu_ms = stats
            .and_then(|s| s.timings)
            .map_or(0.0, |t| t.prompt_ms + t.predicted_ms);
        let cancelled = status == CLIENT_CLOSED_REQUEST;
        self.state.ledger.record(
            key,
            model,
            now,
            &Counts {
                requests: 1,
                prompt_tokens: prompt,
                cached_tokens: counts.cached.min(prompt),
                completion_tokens: completion,
                errors: u64::from(status >= 400 && !cancelled),
                cancelled: u64::from(cancelled),
                gpu_ms: if gpu_ms.is_finite() && gpu_ms > 0.0 {
                    gpu_ms.round() as u64
                } else {
                    0
                },
            },
        );
    }

    /// Cache-affinity routing's closed loop, once a model request is over:
    /// the reuse the server reported (also for the access log's `cached=`)
    /// against the prediction, the per-server prompt-token counters, and the
    /// server's prefix index corrected and updated.
    fn affinity_feedback(&self, ctx: &mut RequestCtx, stats: Option<&ResponseStats>) {
        let reported = stats.filter(|s| s.usage.is_some() || s.timings.is_some());
        let counts = reported.map(ResponseStats::tokens);
        ctx.cached = counts.map(|c| c.cached);
        let (Some(index), Some(server)) = (ctx.upstream, self.upstream_server(ctx)) else {
            return;
        };
        let m = &self.state.metrics;
        let predicted = ctx.routing.map_or(0, |c| c.predicted);
        if let Some(choice) = ctx.routing {
            m.routed(&server.name, choice.outcome.label());
        }
        if let Some(c) = counts {
            m.upstream_prompt(&server.name, c.prompt, predicted, c.cached.min(c.prompt));
        }
        let Some(key) = ctx.affinity.as_deref() else {
            return;
        };
        let served = ctx.upstream_status.is_some_and(|s| (200..300).contains(&s))
            && ctx.upstream_error.is_none()
            && ctx.disconnect.is_none();
        let upstream = &self.state.upstream;
        if upstream.affinity_feedback(index, key, predicted, ctx.cached, served) {
            m.affinity_forgot(&server.name);
        }
    }

    /// The server the request went to, if one was chosen.
    fn upstream_server(&self, ctx: &RequestCtx) -> Option<&crate::config::UpstreamServer> {
        let index = ctx.upstream?;
        self.state.upstream.members().get(index).map(|m| m.server())
    }

    /// Per-request totals, recorded once when the request ends.
    fn record_metrics(&self, ctx: &mut RequestCtx, status: u16, stats: Option<ResponseStats>) {
        self.settle_usage(ctx, status, stats.as_ref());
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
            m.client_disconnect(phase);
        }
        if let Some(reason) = ctx.limited {
            m.rate_limited(ctx.key_id.as_deref(), reason);
        }
        // Only a server that was chosen gets an error counted against it
        // (a request refused before that has none).
        if let Some(server) = self.upstream_server(ctx) {
            let kind = ctx.upstream_error.or_else(|| {
                ctx.upstream_status
                    .is_some_and(|s| s >= 500)
                    .then_some(UpstreamErrorKind::Status5xx)
            });
            if let Some(kind) = kind {
                m.upstream_error(&server.name, kind);
            }
        }
        if let Some(reason) = ctx.auth_failure {
            m.auth_failure(reason);
        }
    }
}
