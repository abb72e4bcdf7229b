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
use crate::shared::SharedState;
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
    /// With `state.redis`: the store the edges share.
    pub shared: Option<Arc<SharedState>>,
    /// With `state.redis`: this edge's share of every key's limits
    /// (divided by `state.expected_edges`), used while the store is away
    /// and `state.on_error` is `local`.
    pub fallback: Option<Fallback>,
    /// Set when a stop or reload begins: `/health` answers 503 so load
    /// balancers send new requests elsewhere.
    pub draining: std::sync::atomic::AtomicBool,
}

/// Per-key limits of one edge of `state.expected_edges`.
pub struct Fallback {
    pub limiter: Limiter,
    pub tokens: TokenBudget,
    /// Every key's own limits, as the store enforces them fleet-wide.
    pub fleet: std::collections::HashMap<String, crate::policy::limits::KeyLimits>,
}

impl GatewayState {
    /// Fails only when the usage ledger in `state_dir` cannot be opened.
    pub fn new(cfg: Config) -> Result<Arc<GatewayState>, String> {
        let cfg = Arc::new(cfg);
        let metrics = Metrics::new(
            cfg.catalogue.routes().iter().map(|m| &*m.name),
            cfg.keys.ids(),
            cfg.upstream.servers.iter().map(|s| s.name.as_str()),
        );
        // With a shared store the requests-per-minute bucket lives there
        // alone: a local one would also be charged by requests the store
        // then refuses.
        let local_rpm = |l: &crate::policy::limits::KeyLimits| match cfg.shared {
            Some(_) => crate::policy::limits::KeyLimits {
                requests_per_minute: None,
                ..*l
            },
            None => *l,
        };
        let limiter = Limiter::new(
            cfg.key_limits
                .iter()
                .map(|(id, l)| (id.clone(), local_rpm(l))),
            cfg.limits.max_concurrent_requests,
            Instant::now(),
        );
        let tokens = Arc::new(TokenBudget::new(
            cfg.key_limits.iter().map(|(id, l)| (id.clone(), l.tokens)),
            tokens::now_ms(),
        ));
        let mut ledger = Ledger::open(cfg.state_dir.as_deref(), tokens.clone())?;
        if cfg.shared.is_some() {
            ledger.share_with_fleet();
        }
        let ledger = Arc::new(ledger);
        let upstream = Arc::new(UpstreamSet::new(&cfg.upstream, &metrics));
        let metrics = Arc::new(metrics);
        let (shared, fallback) = match &cfg.shared {
            None => (None, None),
            Some(s) => {
                let store = SharedState::new(s.clone(), metrics.clone())?;
                upstream.share(store.clone());
                let edges = s.expected_edges;
                let scaled: Vec<_> = cfg
                    .key_limits
                    .iter()
                    .map(|(id, l)| (id.clone(), l.scaled(edges)))
                    .collect();
                let fallback = Fallback {
                    limiter: Limiter::new(scaled.iter().cloned(), None, Instant::now()),
                    tokens: TokenBudget::new(
                        scaled.iter().map(|(id, l)| (id.clone(), l.tokens)),
                        tokens::now_ms(),
                    ),
                    fleet: cfg.key_limits.iter().cloned().collect(),
                };
                (Some(store), Some(fallback))
            }
        };
        Ok(Arc::new(GatewayState {
            upstream,
            metrics,
            shared,
            fallback,
            draining: std::sync::atomic::AtomicBool::new(false),
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
