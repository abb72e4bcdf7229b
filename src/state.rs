//! What the request handlers and the metrics listener share, built once at start-up.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::budget::{BodyBudget, Uploads};
use crate::policy::clients::ClientGuard;
use crate::policy::limits::Limiter;
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
}

impl GatewayState {
    pub fn new(cfg: Config) -> Arc<GatewayState> {
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
        Arc::new(GatewayState {
            upstream: Arc::new(UpstreamSet::new(&cfg.upstream, &metrics)),
            metrics: Arc::new(metrics),
            budget: BodyBudget::new(cfg.limits.max_buffered_body_bytes),
            uploads: Uploads::new(
                cfg.limits.max_uploads_per_key,
                cfg.limits.max_uploads_per_ip,
            ),
            limiter: Arc::new(limiter),
            clients: ClientGuard::new(cfg.downstream.clients.clone()),
            cfg,
        })
    }
}
