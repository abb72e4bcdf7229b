//! Several llama-servers behind one gateway: which one gets a request.
//!
//! Each server (a GPU machine at the end of its own tunnel port) is a
//! [`Member`] with its own connection pool, its own slot queue
//! (`max_in_flight`) and a health state kept fresh by [`HealthChecker`], a
//! Pingora background service that probes every server's `/health`.
//!
//! A request goes to the healthy server (allowed for its model) with the
//! least load: requests assigned, queued ones included, per slot; ties
//! rotate. When the connect to it fails the server is marked down and the
//! next one is tried: nothing was sent, so nothing runs twice; when its queue
//! is full, the next one is tried too. A model's lone server is never
//! skipped: every request tries it, and its own error (the tunnel hint) is
//! what the client sees; with several, a request for which every server is
//! down or loading is answered 503 at once, naming each server's state.
//!
//! With `upstream.routing: cache_affinity` (the default with several
//! servers) a model request that has an affinity key goes by
//! [`affinity::choose`] instead: the server holding the longest prefix of
//! its prompt, within bounded load. Each member keeps its prefix
//! [`affinity::Index`]; a server marked down loses it.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::IntGauge;

use crate::config::{self, UpstreamServer};
use crate::metrics::Metrics;
use crate::openai::prefix::Affinity;
use crate::policy::limits::OnStoreError;
use crate::shared::decide::{local_slots, slot_backoff};
use crate::shared::{SharedState, SlotLease};
use crate::upstream::admission::{Denied, SlotPermit, SlotQueue};
use crate::upstream::affinity::{self, Choice};
use crate::upstream::client::{HealthReport, UpstreamClient};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Up,
    /// llama-server answers but is still loading its model (`/health` 503).
    Loading,
    Down,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Loading,
            3 => Health::Down,
            _ => Health::Unknown,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Health::Unknown => 0,
            Health::Up => 1,
            Health::Loading => 2,
            Health::Down => 3,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Loading => "loading",
            Health::Down => "down",
        }
    }

    fn routable(self) -> bool {
        matches!(self, Health::Up | Health::Unknown)
    }
}

impl From<&HealthReport> for Health {
    fn from(report: &HealthReport) -> Health {
        match report {
            HealthReport::Healthy => Health::Up,
            HealthReport::Loading(_) => Health::Loading,
            HealthReport::Unhealthy(_) | HealthReport::Unreachable(_) => Health::Down,
        }
    }
}

/// One llama-server and what the gateway knows about it.
pub struct Member {
    pub client: UpstreamClient,
    slots: Option<Arc<SlotQueue>>,
    /// Requests assigned to it and not finished, queued ones included.
    assigned: AtomicUsize,
    health: AtomicU8,
    /// Requests holding one of this edge's share of the slots while the
    /// shared store is away.
    local_share: Arc<AtomicUsize>,
    /// `llm_edge_upstream_up` for this server, kept in step with `health`.
    up: IntGauge,
    /// Why it was last marked down or loading, for the all-down message.
    reason: std::sync::Mutex<String>,
    /// The prompt prefixes it is believed to hold.
    prefixes: std::sync::Mutex<affinity::Index>,
}

impl Member {
    pub fn server(&self) -> &UpstreamServer {
        self.client.server()
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Slots in use and requests waiting for one (0, 0 without a slot limit).
    pub fn slot_use(&self) -> (usize, usize) {
        self.slots
            .as_ref()
            .map_or((0, 0), |q| (q.in_flight(), q.queued()))
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Its prefix index (a poisoned lock still holds a usable index).
    pub fn prefixes(&self) -> std::sync::MutexGuard<'_, affinity::Index> {
        self.prefixes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_health(&self, health: Health, reason: &str) {
        if health == Health::Down {
            // Down (killed, restarted, unreachable): whatever it cached is gone.
            self.prefixes().clear();
        }
        self.health.store(health.as_u8(), Ordering::Relaxed);
        self.up.set(i64::from(health == Health::Up));
        if health != Health::Up {
            let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            r.clear();
            r.push_str(reason);
        }
    }
}

/// The configured servers.
pub struct UpstreamSet {
    members: Vec<Member>,
    cfg: config::Upstream,
    /// Rotates the starting point among equally loaded servers.
    next: AtomicUsize,
    /// With `state.redis`: slots are leased across all edges too.
    shared: std::sync::OnceLock<Arc<SharedState>>,
}

/// A request's claim on one server: counted as assigned to it (and holding
/// one of its slots, if it has a limit) until dropped.
pub struct Lease {
    set: Arc<UpstreamSet>,
    index: usize,
    slot: Option<SlotPermit>,
    /// How cache-affinity routing chose it (`None`: least load).
    pub choice: Option<Choice>,
    /// With `state.redis`: the same slot, leased across all edges.
    shared_slot: Option<SharedSlot>,
}

/// The server chosen for a request's first attempt when it was admitted,
/// so that its slot across edges could be leased in the same round trip as
/// the key's limits (`slot`: that lease, when there was room).
#[derive(Debug)]
pub struct FirstPick {
    pub index: usize,
    pub choice: Option<Choice>,
    pub slot: Option<SlotLease>,
}

/// A slot across edges: a lease in the store, or, while the store is away
/// (`state.on_error: local`), one of this edge's share of the slots.
#[derive(Debug)]
enum SharedSlot {
    Leased(#[allow(dead_code)] SlotLease),
    LocalShare(Arc<AtomicUsize>),
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        if let SharedSlot::LocalShare(count) = self {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.member().server().name)
            .field("slot", &self.slot.is_some())
            .finish()
    }
}

impl Lease {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn member(&self) -> &Member {
        &self.set.members[self.index]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.set.members[self.index]
            .assigned
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A server as [`pick`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub index: usize,
    pub health: Health,
    /// Requests assigned to it, queued ones included.
    pub assigned: usize,
    /// Its slots (`max_in_flight`), 0 for no limit.
    pub slots: usize,
}

impl Candidate {
    /// Load relative to its size: a server with 8 slots and 4 requests is
    /// less loaded than one with 1 slot and 1 request.
    fn load(&self) -> u64 {
        (self.assigned as u64 * 1024) / self.slots.max(1) as u64
    }
}

/// Out of `of` (> 0) servers, picks a routable candidate with the least load
/// (assigned requests per slot), rotating among equals from `start` (< `of`);
/// `None` when none is routable.
pub fn pick(
    candidates: impl IntoIterator<Item = Candidate>,
    start: usize,
    of: usize,
) -> Option<usize> {
    candidates
        .into_iter()
        .filter(|c| c.health.routable())
        .min_by_key(|c| (c.load(), (c.index + of - start) % of))
        .map(|c| c.index)
}

impl UpstreamSet {
    pub fn new(cfg: &config::Upstream, metrics: &Metrics) -> UpstreamSet {
        let members = cfg
            .servers
            .iter()
            .map(|server| Member {
                client: UpstreamClient::new(server.clone(), cfg),
                slots: (server.max_in_flight > 0)
                    .then(|| SlotQueue::new(server.max_in_flight, cfg.max_queued)),
                assigned: AtomicUsize::new(0),
                local_share: Arc::new(AtomicUsize::new(0)),
                health: AtomicU8::new(Health::Unknown.as_u8()),
                up: metrics.upstream_up_gauge(&server.name),
                reason: std::sync::Mutex::new(String::new()),
                prefixes: std::sync::Mutex::new(affinity::Index::new(affinity::Index::budget_for(
                    server.context,
                ))),
            })
            .collect();
        UpstreamSet {
            members,
            cfg: cfg.clone(),
            next: AtomicUsize::new(0),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Shares every server's `max_in_flight` with the other edges.
    pub fn share(&self, store: Arc<SharedState>) {
        let _ = self.shared.set(store);
    }

    pub fn config(&self) -> &config::Upstream {
        &self.cfg
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn is_single(&self) -> bool {
        self.members.len() == 1
    }

    /// The server for the next attempt of a request allowed on `allowed`
    /// (empty: all), other than those in `tried`.
    pub fn choose(&self, allowed: &[usize], tried: &[usize]) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        self.choose_from(allowed, tried, start)
    }

    /// Whether requests for a model served by `allowed` (empty: all) are
    /// routed by cache affinity: `cache_affinity` routing and more than one
    /// server to choose from. Only then is an affinity key worth deriving.
    pub fn routes_by_affinity(&self, allowed: &[usize]) -> bool {
        self.cfg.routing == config::Routing::CacheAffinity && self.candidates(allowed) > 1
    }

    /// [`UpstreamSet::choose`] for a request with an affinity key: with
    /// `cache_affinity` routing and several candidates, the server holding
    /// its longest prefix within bounded load, and how it was chosen.
    pub fn choose_for(
        &self,
        allowed: &[usize],
        tried: &[usize],
        key: Option<&Affinity>,
    ) -> Option<(usize, Option<Choice>)> {
        let key = key.filter(|k| !k.is_empty() && self.routes_by_affinity(allowed));
        let Some(key) = key else {
            return self.choose(allowed, tried).map(|i| (i, None));
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.members.len();
        let all: Vec<affinity::Candidate> = (0..n)
            .filter(|i| allowed.is_empty() || allowed.contains(i))
            .filter(|i| !tried.contains(i) && self.members[*i].health().routable())
            .map(|i| {
                let m = &self.members[i];
                affinity::Candidate {
                    index: i,
                    assigned: m.assigned(),
                    slots: m.server().max_in_flight,
                    matched: m.prefixes().matched(key),
                }
            })
            .collect();
        affinity::choose(&all, self.cfg.load_factor, start % n, n).map(|(i, c)| (i, Some(c)))
    }

    /// The closed loop after a response from server `index` to a request
    /// with affinity key `key`: the server reported reusing `actual` prompt
    /// tokens (`None`: no report) where `predicted` were expected. A wrong
    /// prediction forgets the entries past what was reused; a complete
    /// response (`served`) records the prompt, which the server now holds.
    /// Returns whether entries were forgotten.
    pub fn affinity_feedback(
        &self,
        index: usize,
        key: &Affinity,
        predicted: u64,
        actual: Option<u64>,
        served: bool,
    ) -> bool {
        if self.cfg.routing != config::Routing::CacheAffinity || key.is_empty() {
            return false;
        }
        let Some(member) = self.members.get(index) else {
            return false;
        };
        let mut prefixes = member.prefixes();
        let forgot = actual.is_some_and(|a| prefixes.correct(key, predicted, a));
        if served {
            prefixes.record(key);
        }
        forgot
    }

    /// Whether [`UpstreamSet::choose`] would find a server (without moving
    /// the rotation).
    pub fn has_candidate(&self, allowed: &[usize], tried: &[usize]) -> bool {
        self.choose_from(allowed, tried, 0).is_some()
    }

    /// How many servers may serve a request allowed on `allowed`.
    pub fn candidates(&self, allowed: &[usize]) -> usize {
        if allowed.is_empty() {
            self.members.len()
        } else {
            allowed.len()
        }
    }

    fn choose_from(&self, allowed: &[usize], tried: &[usize], start: usize) -> Option<usize> {
        let n = self.members.len();
        // A lone candidate is always tried: its own error says more than
        // "down", and it is back the moment it answers.
        let lone = self.candidates(allowed) == 1;
        let candidates = (0..n)
            .filter(|i| allowed.is_empty() || allowed.contains(i))
            .filter(|i| !tried.contains(i))
            .map(|i| {
                let m = &self.members[i];
                Candidate {
                    index: i,
                    health: if lone { Health::Unknown } else { m.health() },
                    assigned: m.assigned(),
                    slots: m.server().max_in_flight,
                }
            });
        pick(candidates, start % n, n)
    }

    /// Assigns a request to server `index`, waiting (at most
    /// `queue_timeout`) for one of its slots when it has a limit.
    /// Cancel-safe: dropping the future leaves the queue.
    /// `taken`: the slot across edges, when the request's admission
    /// already leased it (in the same round trip as the key's limits).
    pub async fn lease(
        self: &Arc<Self>,
        index: usize,
        key: &str,
        taken: Option<SlotLease>,
    ) -> Result<Lease, Denied> {
        let started = tokio::time::Instant::now();
        let mut lease = self.assign(index);
        if let Some(slots) = &self.members[index].slots {
            // A slot across edges leased at admission is kept only with this
            // edge's slot in hand at once: one that waited here while holding
            // it could wait for a request that holds this edge's slot and
            // polls for the one it holds.
            if let Some((permit, taken)) = taken.and_then(|t| Some((slots.try_acquire()?, t))) {
                lease.slot = Some(permit);
                lease.shared_slot = Some(SharedSlot::Leased(taken));
                return Ok(lease);
            }
            lease.slot = Some(slots.acquire(key, self.cfg.queue_timeout).await?);
            if let Some(store) = self.shared.get() {
                let deadline = started + self.cfg.queue_timeout;
                lease.shared_slot = self.shared_slot(store, index, deadline).await?;
            }
        }
        Ok(lease)
    }

    /// The slot across edges worth leasing together with a request's key
    /// limits, for a request that will go to server `index`: its name and
    /// `max_in_flight`, when there is a store, the server has a limit and
    /// this edge has one of its slots free (a request that would queue here
    /// leases later, so that it never holds a fleet slot while it waits).
    pub fn slot_to_lease_early(&self, index: usize) -> Option<(&str, usize)> {
        self.shared.get()?;
        let member = self.members.get(index)?;
        let server = member.server();
        let slots = member.slots.as_ref()?;
        slots
            .has_room()
            .then_some((server.name.as_str(), server.max_in_flight))
    }

    /// With this edge's slot in hand (the local queue kept the order fair
    /// across keys), the same slot across every edge: tried again with a
    /// short back-off while other edges hold them all, until `deadline`.
    /// While the store is away (`state.on_error: local`), one of this
    /// edge's share of the slots instead.
    async fn shared_slot(
        &self,
        store: &Arc<SharedState>,
        index: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Option<SharedSlot>, Denied> {
        let member = &self.members[index];
        let server = member.server();
        let mut attempt = 0;
        loop {
            match store.acquire_slot(&server.name, server.max_in_flight).await {
                Ok(Some(lease)) => return Ok(Some(SharedSlot::Leased(lease))),
                Ok(None) => {}
                Err(_) => match store.on_error() {
                    OnStoreError::Deny => return Err(Denied::StoreUnavailable),
                    OnStoreError::Local => {
                        let share =
                            local_slots(server.max_in_flight, store.config().expected_edges);
                        let taken = member.local_share.fetch_update(
                            Ordering::AcqRel,
                            Ordering::Acquire,
                            |n| (n < share).then_some(n + 1),
                        );
                        if taken.is_ok() {
                            return Ok(Some(SharedSlot::LocalShare(member.local_share.clone())));
                        }
                    }
                },
            }
            let wait = slot_backoff(attempt);
            attempt += 1;
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(Denied::Timeout);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Counts a request as assigned to server `index`, without a slot
    /// (requests that are not generations do not queue).
    pub fn assign(self: &Arc<Self>, index: usize) -> Lease {
        self.members[index].assigned.fetch_add(1, Ordering::Relaxed);
        Lease {
            set: self.clone(),
            index,
            slot: None,
            choice: None,
            shared_slot: None,
        }
    }

    /// Records what a request learned about a server (a connect that failed
    /// marks it down until its next good health probe), and its
    /// `llm_edge_upstream_up`.
    pub fn mark(&self, index: usize, health: Health, reason: &str) {
        self.members[index].set_health(health, reason);
    }

    /// "a (down: connection refused), b (loading)" for the servers in `allowed`.
    pub fn describe(&self, allowed: &[usize]) -> String {
        self.members
            .iter()
            .enumerate()
            .filter(|(i, _)| allowed.is_empty() || allowed.contains(i))
            .map(|(_, m)| {
                let health = m.health();
                let reason = m.reason();
                if reason.is_empty() || health == Health::Up {
                    format!("{} ({})", m.server().name, health.label())
                } else {
                    format!("{} ({}: {reason})", m.server().name, health.label())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What the health checks last found, as reports; `None` while a server
    /// has not been probed yet.
    pub fn last_reports(&self) -> Option<Vec<HealthReport>> {
        self.members
            .iter()
            .map(|m| match m.health() {
                Health::Unknown => None,
                Health::Up => Some(HealthReport::Healthy),
                Health::Loading => Some(HealthReport::Loading(m.reason())),
                Health::Down => Some(HealthReport::Unreachable(m.reason())),
            })
            .collect()
    }

    /// Probes every server's `/health` at once and records the results.
    pub async fn check_all(self: &Arc<Self>) -> Vec<HealthReport> {
        let probes: Vec<_> = (0..self.members.len())
            .map(|i| {
                let set = self.clone();
                tokio::spawn(async move { set.members[i].client.probe().await })
            })
            .collect();
        let mut reports = Vec::with_capacity(probes.len());
        for (i, probe) in probes.into_iter().enumerate() {
            let (report, reason) = probe.await.unwrap_or_else(|e| {
                let why = format!("the health probe failed: {e}");
                (HealthReport::Unreachable(why.clone()), why)
            });
            let reason = reason.as_str();
            let member = &self.members[i];
            let health = Health::from(&report);
            if member.health() != health {
                log::info!(
                    "upstream {} ({}) is {}{}{reason}",
                    member.server().name,
                    member.server().authority,
                    health.label(),
                    if reason.is_empty() { "" } else { ": " }
                );
            }
            member.set_health(health, reason);
            reports.push(report);
        }
        reports
    }
}

/// The Pingora background service that keeps every server's health fresh
/// (only started when there are several: a lone server is always tried).
pub struct HealthChecker {
    pub set: Arc<UpstreamSet>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // The first probe after one interval: until then every server is
        // "unknown" and tried (a failed connect still moves on at once).
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    self.set.check_all().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
