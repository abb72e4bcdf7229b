//! What the request handlers and the metrics listener share, built once at start-up.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::budget::{BodyBudget, Uploads};
use crate::policy::clients::ClientGuard;
use crate::policy::limits::Limiter;
use crate::policy::tokens::{self, TokenBudget};
use crate::upstream::balance::UpstreamSet;

pub struct GatewayState {
    pub cfg: Arc<Config>,
    /// The llama-servers, with their pools, slot queues and health.
    pub upstream: Arc<UpstreamSet>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<BodyBudget>,
    /// Bodies being received at once, per key and per IP.
    pub uploads: Uploads,
    pub limiter: Arc<Limiter>,
    /// Per-client-IP protections, before authentication.
    pub clients: ClientGuard,
    /// Per-key token limits and quotas (reserve, then settle).
    pub tokens: Arc<TokenBudget>,
    pub ledger: Arc<Ledger>,
}

impl GatewayState {
    /// Fails only when the usage ledger in `state_dir` cannot be opened.
    pub fn new(cfg: Config) -> Result<Arc<GatewayState>, String> {
        let cfg = Arc::new(cfg);
        let metrics = Metrics::new(
            cfg.catalogue.routes().iter().map(|m| m.name.as_str()),
            cfg.keys.ids(),
            cfg.upstream.servers.iter().map(|s| s.name.as_str()),
        );
        let limiter = Limiter::new(
            cfg.key_limits.iter().map(|(id, l)| (id.clone(), *l)),
            cfg.limits.max_concurrent_requests,
            Instant::now(),
        );
        let tokens = Arc::new(TokenBudget::new(
            cfg.key_limits.iter().map(|(id, l)| (id.clone(), l.tokens)),
            tokens::now_ms(),
        ));
        let ledger = Arc::new(Ledger::open(cfg.state_dir.as_deref(), tokens.clone())?);
        Ok(Arc::new(GatewayState {
            upstream: Arc::new(UpstreamSet::new(&cfg.upstream, &metrics)),
            metrics: Arc::new(metrics),
            budget: BodyBudget::new(cfg.limits.max_buffered_body_bytes),
            uploads: Uploads::new(
                cfg.limits.max_uploads_per_key,
                cfg.limits.max_uploads_per_ip,
            ),
            limiter: Arc::new(limiter),
            clients: ClientGuard::new(cfg.downstream.clients.clone()),
            tokens,
            ledger,
            cfg,
        }))
    }

    /// Sets the quota-use gauges (used / quota per key and period).
    pub fn publish_quota_use(&self) {
        let now = tokens::now_ms();
        for key in self.tokens.keys() {
            let Some(state) = self.tokens.state(key, now) else {
                continue;
            };
            for (period, used) in [("day", state.day), ("month", state.month)] {
                if let Some((used, quota)) = used {
                    self.metrics
                        .quota_used(key, period, used as f64 / quota as f64);
                }
            }
        }
    }
}
