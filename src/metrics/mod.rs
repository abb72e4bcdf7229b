//! Prometheus metrics: the catalogue an LLM operator watches.
//!
//! Label values only ever come from bounded sets: the route from a fixed
//! list, the model from the configured catalogue (`other` otherwise), the key
//! from configured key ids (`anonymous` without a key, `invalid` for a wrong
//! one), never a raw key, path or other client string. Per-request totals are
//! recorded once, when the request ends; per-chunk histograms and the live
//! gauges are updated where they happen.
//!
//! The crate is `prometheus` 0.14, the major version Pingora's own
//! Prometheus support uses, so both can share one registry format.

pub mod app;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::labels::{
    AuthFailure, DisconnectPhase, LimitReason, PromptTokenKind, RoutingOutcome, StoreFallback,
    StoreOp, UpstreamErrorKind,
};
use crate::openai::sse::ResponseStats;

/// Time to first token: 10 ms to 2 min.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Gap between tokens: 1 ms to 5 s.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Whole requests: 5 ms to 10 min.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const TOKENS_PER_SECOND_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0];

pub const MODEL_OTHER: &str = "other";
/// The `kind` values of the token counters.
const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];
pub const KEY_ANONYMOUS: &str = "anonymous";
pub const KEY_INVALID: &str = "invalid";

/// What the gateway records about one finished request.
#[derive(Debug, Default)]
pub struct RequestRecord<'a> {
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub key: Option<&'a str>,
    pub status: u16,
    pub duration: Duration,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub stats: Option<&'a ResponseStats>,
}

/// The series of one configured model, held rather than looked up: a
/// `with_label_values` call hashes its labels and takes a lock each time.
struct ModelSeries {
    ttft: Histogram,
    inter_token: Histogram,
    prompt_tps: Histogram,
    generation_tps: Histogram,
    cache_hit_ratio: Histogram,
    streams_active: IntGauge,
}

/// The series of one configured server (in `upstreams` order), by the
/// index of each typed label's value.
struct ServerSeries {
    errors: Vec<IntCounter>,
    routing: Vec<IntCounter>,
    prompt_tokens: Vec<IntCounter>,
    forgotten: IntCounter,
}

/// The per-route series (in `routes::LABELS` order).
struct RouteSeries {
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    /// Prompt, completion and cached tokens (generating routes only).
    tokens: Option<[IntCounter; 3]>,
}

pub struct Metrics {
    registry: Registry,
    /// Handles of series that exist from the start anyway (configured
    /// models, route labels, the typed labels' values); anything else (an
    /// unknown model's `other`) is still looked up when it happens.
    per_model: HashMap<String, ModelSeries>,
    per_route: Vec<RouteSeries>,
    per_server: Vec<ServerSeries>,
    auth_failure_series: Vec<IntCounter>,
    disconnect_series: Vec<IntCounter>,
    known_models: HashSet<String>,
    known_keys: HashSet<String>,
    /// Server names (`upstream` label values), in configuration order.
    upstreams: Vec<String>,

    requests: IntCounterVec,
    request_duration: HistogramVec,
    ttft: HistogramVec,
    inter_token: HistogramVec,
    tokens: IntCounterVec,
    /// Tokens by route (dialect) and kind, for the dashboard's per-route view.
    route_tokens: IntCounterVec,
    streams_active: IntGaugeVec,
    in_flight: IntGauge,
    client_disconnects: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_up: IntGaugeVec,
    routing: IntCounterVec,
    upstream_prompt_tokens: IntCounterVec,
    affinity_forgotten: IntCounterVec,
    auth_failures: IntCounterVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    prompt_tps: HistogramVec,
    generation_tps: HistogramVec,
    cache_hit_ratio: HistogramVec,
    body_budget_used: IntGauge,
    rate_limited: IntCounterVec,
    queue_depth: IntGaugeVec,
    upstream_in_flight: IntGaugeVec,
    queue_wait: Histogram,
    quota_used: prometheus::GaugeVec,
    store_calls: IntCounterVec,
    store_errors: IntCounterVec,
    store_fallbacks: IntCounterVec,
    store_up: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("register counter");
    c
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("register histogram");
    h
}

impl Metrics {
    /// Builds the registry (process collector and `build_info` included).
    /// Panics only on a programming error in the metric definitions (start-up).
    pub fn new<'a>(
        models: impl IntoIterator<Item = &'a str>,
        keys: impl IntoIterator<Item = &'a str>,
        upstreams: impl IntoIterator<Item = &'a str>,
    ) -> Metrics {
        // Names carry the `llm_edge_` prefix themselves: a registry-wide prefix
        // would also rename the standard process_* metrics.
        let registry = Registry::new();
        let r = &registry;
        let build_info = Gauge::with_opts(
            Opts::new(
                "llm_edge_build_info",
                "Always 1; labels say which llm-edge is running",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("llm_edge_build_info");
        build_info.set(1.0);
        registry
            .register(Box::new(build_info))
            .expect("register build_info");
        // The standard process_* metrics: CPU, RSS, open fds.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register process collector");
        let in_flight = IntGauge::new(
            "llm_edge_requests_in_flight",
            "Requests being handled right now",
        )
        .expect("gauge");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("register gauge");
        let body_budget_used = IntGauge::new(
            "llm_edge_buffered_request_bytes",
            "Request body bytes held in memory right now (limits.max_buffered_body_bytes)",
        )
        .expect("gauge");
        registry
            .register(Box::new(body_budget_used.clone()))
            .expect("register gauge");
        let streams_active = IntGaugeVec::new(
            Opts::new(
                "llm_edge_streams_active",
                "SSE streams being relayed right now",
            ),
            &["model"],
        )
        .expect("gauge");
        registry
            .register(Box::new(streams_active.clone()))
            .expect("register gauge");
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "llm_edge_upstream_up",
                "1 when llama-server answered its last check or request, 0 when it did not",
            ),
            &["upstream"],
        )
        .expect("gauge");
        registry
            .register(Box::new(upstream_up.clone()))
            .expect("register gauge");

        let mut metrics = Metrics {
            per_model: HashMap::new(),
            per_route: Vec::new(),
            per_server: Vec::new(),
            auth_failure_series: Vec::new(),
            disconnect_series: Vec::new(),
            known_models: models.into_iter().map(str::to_string).collect(),
            known_keys: keys.into_iter().map(str::to_string).collect(),
            upstreams: upstreams.into_iter().map(str::to_string).collect(),
            requests: counter(r, "llm_edge_requests_total", "Requests answered, by route, model, key id and status code", &["route", "model", "key", "code"]),
            request_duration: histogram(r, "llm_edge_request_duration_seconds", "Time from request to the last response byte", &["route", "model"], DURATION_BUCKETS),
            ttft: histogram(r, "llm_edge_time_to_first_token_seconds", "Time from request to the first generated token of a stream", &["model"], TTFT_BUCKETS),
            inter_token: histogram(r, "llm_edge_inter_token_seconds", "Gap between consecutive streamed tokens", &["model"], INTER_TOKEN_BUCKETS),
            tokens: counter(r, "llm_edge_tokens_total", "Tokens by model, key id and kind (prompt, completion, cached)", &["model", "key", "kind"]),
            route_tokens: counter(r, "llm_edge_route_tokens_total", "Tokens by route and kind (prompt, completion, cached)", &["route", "kind"]),
            streams_active,
            in_flight,
            client_disconnects: counter(r, "llm_edge_client_disconnects_total", &format!("Clients that left before their response was complete, by phase ({})", DisconnectPhase::list()), &["phase"]),
            upstream_errors: counter(r, "llm_edge_upstream_errors_total", &format!("Failures talking to llama-server, by server and kind ({})", UpstreamErrorKind::list()), &["upstream", "kind"]),
            upstream_up,
            routing: counter(r, "llm_edge_routing_total", &format!("Cache-affinity routing choices, by server and outcome ({})", RoutingOutcome::list()), &["upstream", "outcome"]),
            upstream_prompt_tokens: counter(r, "llm_edge_upstream_prompt_tokens_total", &format!("Prompt tokens of model requests, by server and kind ({})", PromptTokenKind::list()), &["upstream", "kind"]),
            affinity_forgotten: counter(r, "llm_edge_affinity_forgotten_total", "Responses that reused less than half the predicted prompt cache (the server's index entries past the reuse are forgotten)", &["upstream"]),
            auth_failures: counter(r, "llm_edge_auth_failures_total", &format!("Refused keys, by reason ({})", AuthFailure::list()), &["reason"]),
            request_bytes: counter(r, "llm_edge_request_bytes_total", "Request body bytes received", &["route"]),
            response_bytes: counter(r, "llm_edge_response_bytes_total", "Response body bytes sent", &["route"]),
            prompt_tps: histogram(r, "llm_edge_upstream_prompt_tokens_per_second", "llama.cpp prompt processing speed (timings.prompt_per_second)", &["model"], TOKENS_PER_SECOND_BUCKETS),
            generation_tps: histogram(r, "llm_edge_upstream_generation_tokens_per_second", "llama.cpp generation speed (timings.predicted_per_second)", &["model"], TOKENS_PER_SECOND_BUCKETS),
            cache_hit_ratio: histogram(r, "llm_edge_prompt_cache_hit_ratio", "Share of each prompt served from llama.cpp's prompt cache (cache_n / (cache_n + prompt_n))", &["model"], RATIO_BUCKETS),
            body_budget_used,
            rate_limited: counter(r, "llm_edge_rate_limited_total", &format!("Requests refused by a limit, by key id and reason ({})", LimitReason::list()), &["key", "reason"]),
            queue_depth: {
                let g = IntGaugeVec::new(Opts::new("llm_edge_queue_depth", "Requests waiting for a slot of an upstream (max_in_flight)"), &["upstream"]).expect("gauge");
                registry.register(Box::new(g.clone())).expect("register gauge");
                g
            },
            upstream_in_flight: {
                let g = IntGaugeVec::new(Opts::new("llm_edge_upstream_in_flight", "Requests at an upstream now (holding one of its slots, when it has a limit)"), &["upstream"]).expect("gauge");
                registry.register(Box::new(g.clone())).expect("register gauge");
                g
            },
            queue_wait: {
                let h = Histogram::with_opts(HistogramOpts::new("llm_edge_queue_wait_seconds", "Time requests waited for an upstream slot").buckets(TTFT_BUCKETS.to_vec())).expect("histogram");
                registry.register(Box::new(h.clone())).expect("register histogram");
                h
            },
            quota_used: {
                let g = prometheus::GaugeVec::new(Opts::new("llm_edge_key_quota_used_ratio", "Share of a key's token quota used (tokens_per_day, tokens_per_month; reserved tokens included), by key id and period"), &["key", "period"]).expect("gauge");
                registry.register(Box::new(g.clone())).expect("register gauge");
                g
            },
            store_calls: counter(r, "llm_edge_store_calls_total", &format!("Round trips to the shared store (state.redis), by operation ({}); on a request's path: admit (and slot while waiting for one held elsewhere)", StoreOp::list()), &["op"]),
            store_errors: counter(r, "llm_edge_store_errors_total", &format!("Failed or timed-out calls to the shared store (state.redis), by operation ({})", StoreOp::list()), &["op"]),
            store_fallbacks: counter(r, "llm_edge_store_fallbacks_total", &format!("Requests decided without the shared store, by state.on_error ({})", StoreFallback::list()), &["policy"]),
            store_up: IntGauge::new("llm_edge_store_up", "1 when the shared store (state.redis) answers, 0 when it does not; absent without state.redis").expect("gauge"),
            registry,
        };
        // Every series of a known upstream exists from the start, at 0, so
        // rate() and alerts see the first failure after a restart.
        for name in &metrics.upstreams {
            metrics.upstream_up.with_label_values(&[name]).set(0);
            metrics.queue_depth.with_label_values(&[name]).set(0);
            metrics.upstream_in_flight.with_label_values(&[name]).set(0);
            for kind in UpstreamErrorKind::ALL {
                metrics
                    .upstream_errors
                    .with_label_values(&[name, kind.as_str()]);
            }
            for outcome in RoutingOutcome::ALL {
                metrics.routing.with_label_values(&[name, outcome.as_str()]);
            }
            for kind in PromptTokenKind::ALL {
                metrics
                    .upstream_prompt_tokens
                    .with_label_values(&[name, kind.as_str()]);
            }
            metrics.affinity_forgotten.with_label_values(&[name]);
        }
        for reason in AuthFailure::ALL {
            metrics.auth_failures.with_label_values(&[reason.as_str()]);
        }
        for phase in DisconnectPhase::ALL {
            metrics
                .client_disconnects
                .with_label_values(&[phase.as_str()]);
        }
        metrics.create_series_at_zero();
        metrics.hold_handles();
        metrics
    }

    /// Takes the handles of the series created at zero above.
    fn hold_handles(&mut self) {
        self.per_model = self
            .known_models
            .iter()
            .map(|model| {
                let m = &[model.as_str()];
                let series = ModelSeries {
                    ttft: self.ttft.with_label_values(m),
                    inter_token: self.inter_token.with_label_values(m),
                    prompt_tps: self.prompt_tps.with_label_values(m),
                    generation_tps: self.generation_tps.with_label_values(m),
                    cache_hit_ratio: self.cache_hit_ratio.with_label_values(m),
                    streams_active: self.streams_active.with_label_values(m),
                };
                (model.clone(), series)
            })
            .collect();
        let generating: Vec<&str> = crate::policy::routes::generating_labels().collect();
        self.per_route = crate::policy::routes::LABELS
            .iter()
            .map(|route| RouteSeries {
                request_bytes: self.request_bytes.with_label_values(&[route]),
                response_bytes: self.response_bytes.with_label_values(&[route]),
                tokens: generating.contains(route).then(|| {
                    TOKEN_KINDS.map(|kind| self.route_tokens.with_label_values(&[route, kind]))
                }),
            })
            .collect();
        self.per_server = self
            .upstreams
            .iter()
            .map(|name| ServerSeries {
                errors: UpstreamErrorKind::ALL
                    .iter()
                    .map(|k| self.upstream_errors.with_label_values(&[name, k.as_str()]))
                    .collect(),
                routing: RoutingOutcome::ALL
                    .iter()
                    .map(|o| self.routing.with_label_values(&[name, o.as_str()]))
                    .collect(),
                prompt_tokens: PromptTokenKind::ALL
                    .iter()
                    .map(|k| {
                        self.upstream_prompt_tokens
                            .with_label_values(&[name, k.as_str()])
                    })
                    .collect(),
                forgotten: self.affinity_forgotten.with_label_values(&[name]),
            })
            .collect();
        self.auth_failure_series = AuthFailure::ALL
            .iter()
            .map(|r| self.auth_failures.with_label_values(&[r.as_str()]))
            .collect();
        self.disconnect_series = DisconnectPhase::ALL
            .iter()
            .map(|p| self.client_disconnects.with_label_values(&[p.as_str()]))
            .collect();
    }

    fn model_series(&self, model: Option<&str>) -> Option<&ModelSeries> {
        model.and_then(|m| self.per_model.get(m))
    }

    fn server_series(&self, upstream: &str) -> Option<&ServerSeries> {
        let i = self.upstreams.iter().position(|n| n == upstream)?;
        self.per_server.get(i)
    }

    fn route_series(&self, route: &str) -> Option<&RouteSeries> {
        let i = crate::policy::routes::LABELS
            .iter()
            .position(|l| *l == route)?;
        self.per_route.get(i)
    }

    /// Registers the shared store's series (only with `state.redis`), at 0.
    pub fn enable_store(&self) {
        let _ = self.registry.register(Box::new(self.store_up.clone()));
        for op in StoreOp::ALL {
            self.store_calls.with_label_values(&[op.as_str()]);
            self.store_errors.with_label_values(&[op.as_str()]);
        }
        for policy in StoreFallback::ALL {
            self.store_fallbacks.with_label_values(&[policy.as_str()]);
        }
    }

    pub fn store_call(&self, op: StoreOp) {
        self.store_calls.with_label_values(&[op.as_str()]).inc();
    }

    pub fn store_error(&self, op: StoreOp) {
        self.store_errors.with_label_values(&[op.as_str()]).inc();
    }

    pub fn store_fallback(&self, policy: StoreFallback) {
        self.store_fallbacks
            .with_label_values(&[policy.as_str()])
            .inc();
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// `used / quota` of one key's quota (`period`: day or month).
    pub fn quota_used(&self, key: &str, period: &str, ratio: f64) {
        self.quota_used.with_label_values(&[key, period]).set(ratio);
    }

    /// Creates, at 0, every series a dashboard panel or an alert reads whose
    /// labels are known before the first request: a series that appears
    /// only with its first event leaves a panel on "No data" and hides that
    /// first event from `rate()`. Bounded by the configuration: (keys + 2)
    /// × limit reasons, models × (keys + 2) × 3 token kinds, a few
    /// histograms per model, two byte counters per route.
    fn create_series_at_zero(&self) {
        let mut keys: Vec<&str> = self.known_keys.iter().map(String::as_str).collect();
        keys.sort_unstable();
        keys.extend([KEY_ANONYMOUS, KEY_INVALID]);
        for key in &keys {
            for reason in LimitReason::ALL {
                self.rate_limited.with_label_values(&[key, reason.as_str()]);
            }
        }
        for model in &self.known_models {
            let model = model.as_str();
            self.streams_active.with_label_values(&[model]);
            for histogram in [
                &self.ttft,
                &self.inter_token,
                &self.prompt_tps,
                &self.generation_tps,
                &self.cache_hit_ratio,
            ] {
                histogram.with_label_values(&[model]);
            }
            // A request with a wrong key never generates.
            for key in keys.iter().filter(|k| **k != KEY_INVALID) {
                for kind in TOKEN_KINDS {
                    self.tokens.with_label_values(&[model, key, kind]);
                }
            }
        }
        for route in crate::policy::routes::generating_labels() {
            for kind in TOKEN_KINDS {
                self.route_tokens.with_label_values(&[route, kind]);
            }
        }
        for route in crate::policy::routes::LABELS {
            self.request_bytes.with_label_values(&[route]);
            self.response_bytes.with_label_values(&[route]);
        }
    }

    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        match model {
            Some(m) if self.known_models.contains(m) => m,
            _ => MODEL_OTHER,
        }
    }

    pub fn key_label<'a>(&self, key: Option<&'a str>) -> &'a str {
        match key {
            Some(k) if self.known_keys.contains(k) || k == KEY_ANONYMOUS => k,
            Some(_) => KEY_INVALID,
            None => KEY_ANONYMOUS,
        }
    }

    /// Records a finished request (called exactly once per request).
    pub fn record_request(&self, r: &RequestRecord) {
        let model = self.model_label(r.model);
        let key = self.key_label(r.key);
        let code = status_label(r.status);
        self.requests
            .with_label_values(&[r.route, model, key, code])
            .inc();
        self.request_duration
            .with_label_values(&[r.route, model])
            .observe(r.duration.as_secs_f64());
        let route = self.route_series(r.route);
        match route {
            Some(s) => {
                s.request_bytes.inc_by(r.bytes_in as u64);
                s.response_bytes.inc_by(r.bytes_out as u64);
            }
            None => {
                self.request_bytes
                    .with_label_values(&[r.route])
                    .inc_by(r.bytes_in as u64);
                self.response_bytes
                    .with_label_values(&[r.route])
                    .inc_by(r.bytes_out as u64);
            }
        }
        let Some(stats) = r.stats else { return };
        let tokens = stats.tokens();
        let route_tokens = route.and_then(|s| s.tokens.as_ref());
        for (i, (kind, n)) in TOKEN_KINDS
            .into_iter()
            .zip([tokens.prompt, tokens.completion, tokens.cached])
            .enumerate()
        {
            self.tokens.with_label_values(&[model, key, kind]).inc_by(n);
            match route_tokens {
                Some(counters) => counters[i].inc_by(n),
                None => self
                    .route_tokens
                    .with_label_values(&[r.route, kind])
                    .inc_by(n),
            }
        }
        let series = self.model_series(r.model);
        let histogram = |held: fn(&ModelSeries) -> &Histogram, vec: &HistogramVec| {
            series.map_or_else(|| vec.with_label_values(&[model]), |s| held(s).clone())
        };
        if let Some(t) = stats.timings {
            if let Some(tps) = t.prompt_per_second.filter(|v| v.is_finite() && *v > 0.0) {
                histogram(|s| &s.prompt_tps, &self.prompt_tps).observe(tps);
            }
            if let Some(tps) = t.predicted_per_second.filter(|v| v.is_finite() && *v > 0.0) {
                histogram(|s| &s.generation_tps, &self.generation_tps).observe(tps);
            }
        }
        if let Some(ratio) = stats.cache_hit_ratio() {
            histogram(|s| &s.cache_hit_ratio, &self.cache_hit_ratio).observe(ratio);
        }
    }

    pub fn first_token(&self, model: Option<&str>, after: Duration) {
        self.first_token_histogram(model)
            .observe(after.as_secs_f64());
    }

    /// The time-to-first-token histogram of `model`, for a stream to hold.
    pub fn first_token_histogram(&self, model: Option<&str>) -> Histogram {
        match self.model_series(model) {
            Some(s) => s.ttft.clone(),
            None => self.ttft.with_label_values(&[self.model_label(model)]),
        }
    }

    /// A histogram handle for one stream's per-chunk observations.
    pub fn inter_token_histogram(&self, model: Option<&str>) -> Histogram {
        match self.model_series(model) {
            Some(s) => s.inter_token.clone(),
            None => self
                .inter_token
                .with_label_values(&[self.model_label(model)]),
        }
    }

    pub fn stream_started(&self, model: Option<&str>) -> StreamGuard {
        let gauge = match self.model_series(model) {
            Some(s) => s.streams_active.clone(),
            None => self
                .streams_active
                .with_label_values(&[self.model_label(model)]),
        };
        gauge.inc();
        StreamGuard(gauge)
    }

    /// Requests between their first phase and their logging, now.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    pub fn request_started(&self) -> InFlightGuard {
        self.in_flight.inc();
        InFlightGuard(self.in_flight.clone())
    }

    pub fn client_disconnect(&self, phase: DisconnectPhase) {
        match self.disconnect_series.get(phase.index()) {
            Some(c) => c.inc(),
            None => self
                .client_disconnects
                .with_label_values(&[phase.as_str()])
                .inc(),
        }
    }

    /// `upstream` must be a configured server's name (bounded labels).
    pub fn upstream_error(&self, upstream: &str, kind: UpstreamErrorKind) {
        match self
            .server_series(upstream)
            .and_then(|s| s.errors.get(kind.index()))
        {
            Some(c) => c.inc(),
            None => self
                .upstream_errors
                .with_label_values(&[upstream, kind.as_str()])
                .inc(),
        }
    }

    /// A cache-affinity choice of server `upstream` (a configured name).
    pub fn routed(&self, upstream: &str, outcome: RoutingOutcome) {
        match self
            .server_series(upstream)
            .and_then(|s| s.routing.get(outcome.index()))
        {
            Some(c) => c.inc(),
            None => self
                .routing
                .with_label_values(&[upstream, outcome.as_str()])
                .inc(),
        }
    }

    /// A model request's prompt at server `upstream`: all its tokens, the
    /// cached ones predicted, and those reported cached.
    pub fn upstream_prompt(&self, upstream: &str, prompt: u64, predicted: u64, cached: u64) {
        let series = self.server_series(upstream);
        for (kind, n) in [
            (PromptTokenKind::Prompt, prompt),
            (PromptTokenKind::Predicted, predicted),
            (PromptTokenKind::Cached, cached),
        ] {
            match series.and_then(|s| s.prompt_tokens.get(kind.index())) {
                Some(c) => c.inc_by(n),
                None => self
                    .upstream_prompt_tokens
                    .with_label_values(&[upstream, kind.as_str()])
                    .inc_by(n),
            }
        }
    }

    /// The closed loop forgot index entries of server `upstream`.
    pub fn affinity_forgot(&self, upstream: &str) {
        match self.server_series(upstream) {
            Some(s) => s.forgotten.inc(),
            None => self.affinity_forgotten.with_label_values(&[upstream]).inc(),
        }
    }

    /// `llm_edge_upstream_up` of a configured server, kept by its [`Member`](crate::upstream::balance::Member).
    pub fn upstream_up_gauge(&self, upstream: &str) -> IntGauge {
        self.upstream_up.with_label_values(&[upstream])
    }

    pub fn auth_failure(&self, reason: AuthFailure) {
        match self.auth_failure_series.get(reason.index()) {
            Some(c) => c.inc(),
            None => self
                .auth_failures
                .with_label_values(&[reason.as_str()])
                .inc(),
        }
    }

    pub fn rate_limited(&self, key: Option<&str>, reason: LimitReason) {
        self.rate_limited
            .with_label_values(&[self.key_label(key), reason.as_str()])
            .inc();
    }

    pub fn queue_waited(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub fn set_slots(&self, upstream: &str, queued: usize, in_flight: usize) {
        self.queue_depth
            .with_label_values(&[upstream])
            .set(queued as i64);
        self.upstream_in_flight
            .with_label_values(&[upstream])
            .set(in_flight as i64);
    }

    pub fn set_buffered_bytes(&self, bytes: usize) {
        self.body_budget_used.set(bytes as i64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Number of distinct series (for cardinality checks).
    pub fn series_count(&self) -> usize {
        self.registry
            .gather()
            .iter()
            .map(|f| f.get_metric().len())
            .sum()
    }
}

fn status_label(status: u16) -> &'static str {
    const CODES: [(u16, &str); 20] = [
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (422, "422"),
        (429, "429"),
        (499, "499"),
        (500, "500"),
        (501, "501"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
        (0, "0"),
        (100, "100"),
    ];
    CODES.iter().find(|(c, _)| *c == status).map_or(
        match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        |(_, s)| s,
    )
}

/// Decrements `streams_active` when a stream ends, however it ends.
pub struct StreamGuard(IntGauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements `requests_in_flight` when the request's context is dropped.
pub struct InFlightGuard(IntGauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl std::fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlightGuard")
    }
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamGuard")
    }
}

#[cfg(test)]
mod tests;
