//! What the request handlers and the metrics listener share, built once at start-up.

use std::sync::Arc;
use std::time::Instant;

use crate::admission::SlotQueue;
use crate::budget::BodyBudget;
use crate::clients::ClientGuard;
use crate::config::Config;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;

pub struct GatewayState {
    pub cfg: Arc<Config>,
    pub upstream: Arc<UpstreamClient>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<BodyBudget>,
    pub limiter: Arc<Limiter>,
    /// Per-client-IP protections, before authentication.
    pub clients: ClientGuard,
    /// Slot-aware admission, when `upstream.max_in_flight` is set.
    pub slots: Option<Arc<SlotQueue>>,
}

impl GatewayState {
    pub fn new(cfg: Config) -> Arc<GatewayState> {
        let cfg = Arc::new(cfg);
        let metrics = Metrics::new(
            cfg.catalogue.routes().iter().map(|m| m.name.as_str()),
            cfg.keys.ids(),
            &cfg.upstream.authority,
        );
        let limiter = Limiter::new(
            cfg.key_limits.iter().map(|(id, l)| (id.clone(), *l)),
            cfg.limits.max_concurrent_requests,
            Instant::now(),
        );
        let slots = (cfg.upstream.max_in_flight > 0)
            .then(|| SlotQueue::new(cfg.upstream.max_in_flight, cfg.upstream.max_queued));
        Arc::new(GatewayState {
            upstream: Arc::new(UpstreamClient::new(cfg.upstream.clone())),
            metrics: Arc::new(metrics),
            budget: BodyBudget::new(cfg.limits.max_buffered_body_bytes),
            limiter: Arc::new(limiter),
            clients: ClientGuard::new(cfg.downstream.clients.clone()),
            slots,
            cfg,
        })
    }
}
