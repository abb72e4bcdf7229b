//! The state several edges share through Redis or Valkey (`state.redis`):
//! per-key request and token limits and quotas, and the slots of each
//! upstream. Owns the connection, the Lua scripts (`*.lua`, each run
//! atomically by the store, so edges never race on a read-modify-write),
//! the leases of requests in flight and their renewal, and whether the
//! store is answering (`/health`, `llm_edge_store_up`).
//!
//! One round trip per admitted request: `admit.lua` (concurrency, requests
//! per minute, tokens per minute, day and month quotas together) pipelined
//! with `slot.lua` (a lease on the upstream the request will most likely
//! use) when that upstream has `max_in_flight`. Two scripts rather than one
//! because a key's limits and an upstream's slots live under different hash
//! tags (one cluster slot each). Only a request that finds every slot held
//! asks again while it waits; settling and releasing happen after the
//! response, off the request's path. A store that does not answer within
//! `state.timeout` is marked down and skipped at once until the background
//! check sees it again; what happens meanwhile is the caller's
//! `state.on_error` policy.
//!
//! The fleet's usage ledger lives here too: every edge adds its hourly rows
//! at each ledger flush ([`SharedState::add_usage`]), and `llm-edge usage`
//! reads them back ([`read_usage`]).
//!
//! Must not import `gateway` or `upstream` (the upstream slots call in
//! here); the pure decisions are in `decide.rs`.

pub mod decide;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::OnceCell;

use crate::config::SharedConfig;
use crate::labels::StoreOp;
use crate::ledger::Row;
use crate::metrics::Metrics;
use crate::policy::limits::{KeyLimits, OnStoreError, Refusal};
use crate::policy::ratelimit::Window;
use crate::policy::tokens::TokenLimits;
use decide::{arg, key_names, slot_key, KeyNames, Verdict, DAY_TTL_S, MONTH_TTL_S};

/// Why the store gave no decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDown(pub String);

/// The shared store of one edge.
pub struct SharedState {
    cfg: SharedConfig,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    admit: Script,
    settle: Script,
    slot: Script,
    renew: Script,
    metrics: Arc<Metrics>,
    up: AtomicBool,
    /// This process, in every lease id: `<edge>-<n>`.
    edge: String,
    next: AtomicU64,
    /// Leases held by requests in flight here: id -> (zset, member).
    leases: Mutex<HashMap<u64, (String, String)>>,
    /// Tokens this edge's requests used while the store was away, which
    /// the fleet's quota counters never saw: counter -> (tokens, ttl s).
    owed: Mutex<HashMap<String, (u64, u64)>>,
    /// The fleet-ledger batch sent without an answer: (id, rows).
    usage_batch: Mutex<Option<(u64, Vec<Row>)>>,
    usage: Script,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("edge", &self.edge)
            .field("up", &self.is_up())
            .finish()
    }
}

impl SharedState {
    /// Fails only on a URL the client library refuses (validation checked it).
    pub fn new(cfg: SharedConfig, metrics: Arc<Metrics>) -> Result<Arc<SharedState>, String> {
        let client =
            redis::Client::open(cfg.url.expose()).map_err(|e| format!("state.redis: {e}"))?;
        metrics.enable_store();
        metrics.set_store_up(true);
        Ok(Arc::new(SharedState {
            client,
            conn: OnceCell::new(),
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            slot: Script::new(include_str!("slot.lua")),
            renew: Script::new(include_str!("renew.lua")),
            metrics,
            up: AtomicBool::new(true),
            edge: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            next: AtomicU64::new(1),
            leases: Mutex::new(HashMap::new()),
            owed: Mutex::new(HashMap::new()),
            usage_batch: Mutex::new(None),
            usage: Script::new(include_str!("usage.lua")),
            cfg,
        }))
    }

    pub fn config(&self) -> &SharedConfig {
        &self.cfg
    }

    pub fn on_error(&self) -> OnStoreError {
        self.cfg.on_error
    }

    /// Whether the store answered its last call or check.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                log::warn!("shared store is back: limits and slots are shared across edges again");
            } else {
                log::error!(
                    "shared store unreachable: applying state.on_error = {:?} until it answers",
                    self.cfg.on_error
                );
            }
        }
        self.metrics.set_store_up(up);
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreDown> {
        let timeout = self.cfg.timeout;
        self.conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                self.client.get_connection_manager_lazy(config)
            })
            .await
            .cloned()
            .map_err(|e| StoreDown(e.to_string()))
    }

    /// Runs one call under `state.timeout`; a store already known to be
    /// down is not waited on (the health check brings it back).
    async fn call<T, F, Fut>(&self, op: StoreOp, f: F) -> Result<T, StoreDown>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // The check and the renewals always try: they are what notices the
        // store is back, and a lease must not lapse on one missed check.
        if !self.is_up() && !matches!(op, StoreOp::Ping | StoreOp::Renew) {
            self.metrics.store_error(op);
            return Err(StoreDown("the store did not answer its last check".into()));
        }
        let conn = self.conn().await?;
        self.metrics.store_call(op);
        let (result, outage) = match tokio::time::timeout(self.cfg.timeout, f(conn)).await {
            Ok(Ok(v)) => (Ok(v), false),
            // A script error is a bug, not an outage: only lost
            // connections and timeouts mark the store down.
            Ok(Err(e)) => {
                let outage = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error();
                (Err(StoreDown(e.to_string())), outage)
            }
            Err(_) => (
                Err(StoreDown(format!(
                    "no answer within {} (state.timeout)",
                    humantime::format_duration(self.cfg.timeout)
                ))),
                true,
            ),
        };
        match &result {
            Ok(_) => self.set_up(true),
            Err(e) => {
                self.metrics.store_error(op);
                if outage {
                    self.set_up(false);
                }
                log::debug!("shared store {}: {}", op.as_str(), e.0);
            }
        }
        result
    }

    fn lease_id(&self) -> (u64, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n, format!("{}-{n}", self.edge))
    }

    fn hold(&self, n: u64, zset: String, member: String) {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, (zset, member));
    }

    fn forget(&self, n: u64) {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&n);
    }

    /// Leases held by requests in flight on this edge.
    pub fn leases_held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Checks and takes one request's per-key limits across every edge, in
    /// one round trip: a concurrent-request lease, one request of the
    /// per-minute limit, and `tokens` of the token budget and quotas. With
    /// `slot` (an upstream's name and `max_in_flight`), a lease on one of
    /// that upstream's slots is taken in the same round trip (pipelined);
    /// `None` in the answer when every slot was held (or the key was
    /// refused: that lease is given back at once).
    /// `Ok((Err(_), _))`: refused; `Err(_)`: the store did not decide.
    pub async fn admit_key(
        self: &Arc<Self>,
        key_id: &str,
        limits: &KeyLimits,
        tokens: u64,
        now_ms: u64,
        slot: Option<(&str, usize)>,
    ) -> Result<(Result<KeyAdmission, Refusal>, Option<SlotLease>), StoreDown> {
        let names = key_names(&self.cfg.prefix, key_id, now_ms);
        let (n, member) = self.lease_id();
        let ttl = self.cfg.lease_ttl.as_millis() as u64;
        let t = &limits.tokens;
        let mut admit = self.admit.prepare_invoke();
        admit
            .key(&names.rpm)
            .key(&names.concurrent)
            .key(&names.tpm)
            .key(&names.day)
            .key(&names.month)
            .arg(limits.requests_per_minute.unwrap_or(0))
            .arg(limits.max_concurrent.unwrap_or(0))
            .arg(&member)
            .arg(ttl)
            .arg(tokens);
        token_args(&mut admit, t);
        let (reply, slot) = match slot {
            None => {
                let reply: Vec<i64> = self
                    .call(StoreOp::Admit, |mut conn| async move {
                        admit.invoke_async(&mut conn).await
                    })
                    .await?;
                (reply, None)
            }
            Some((name, max)) => {
                let key = slot_key(&self.cfg.prefix, name);
                let (slot_n, slot_member) = self.lease_id();
                let mut take = self.slot.prepare_invoke();
                take.key(&key).arg(max).arg(&slot_member).arg(ttl);
                let (reply, taken): (Vec<i64>, i64) = self
                    .call(StoreOp::Admit, |mut conn| async move {
                        let scripts = [&admit, &take];
                        let mut pipe = redis::pipe();
                        pipe.ignore_errors();
                        scripts.iter().for_each(|s| {
                            pipe.invoke_script(s);
                        });
                        let mut replies: Vec<redis::RedisResult<redis::Value>> =
                            pipe.query_async(&mut conn).await?;
                        // A restarted or flushed store lacks a script: load
                        // both and run again only the ones that did not run
                        // (one of them may have, e.g. when admit.lua alone
                        // was loaded by a request without a slot to lease:
                        // running it again would take the key's limits twice).
                        let missing: Vec<usize> = (0..replies.len())
                            .filter(|&i| matches!(&replies[i], Err(e) if is_no_script(e)))
                            .collect();
                        if !missing.is_empty() {
                            let mut again = redis::pipe();
                            again.load_script(&self.slot).ignore();
                            again.load_script(&self.admit).ignore();
                            again.ignore_errors();
                            for &i in &missing {
                                again.invoke_script(scripts[i]);
                            }
                            let redone: Vec<redis::RedisResult<redis::Value>> =
                                again.query_async(&mut conn).await?;
                            for (i, r) in missing.into_iter().zip(redone) {
                                replies[i] = r;
                            }
                        }
                        let mut replies = replies.into_iter();
                        let (Some(admitted), Some(taken)) = (replies.next(), replies.next()) else {
                            return Err(redis::RedisError::from((
                                redis::ErrorKind::Client,
                                "a short pipeline reply",
                            )));
                        };
                        Ok((
                            redis::from_redis_value(admitted?)?,
                            redis::from_redis_value(taken?)?,
                        ))
                    })
                    .await?;
                // Held from here on, so that a refusal below gives it back.
                let lease = (taken == 1).then(|| self.slot_lease(slot_n, key, slot_member));
                (reply, lease)
            }
        };
        match decide::verdict(&reply) {
            Some(Verdict::Admitted { requests_left, .. }) => {
                let holds_lease = limits.max_concurrent.is_some();
                if holds_lease {
                    self.hold(n, names.concurrent.clone(), member.clone());
                }
                let admission = KeyAdmission {
                    store: Some(self.clone()),
                    lease: holds_lease.then_some(n),
                    member,
                    names,
                    limits: *limits,
                    tokens,
                    requests_left,
                };
                Ok((Ok(admission), slot))
            }
            Some(Verdict::Refused(r)) => Ok((
                Err(decide::refusal(r, key_id, limits, tokens, now_ms)),
                None,
            )),
            None => Err(StoreDown(format!(
                "unexpected reply from admit.lua: {reply:?}"
            ))),
        }
    }

    fn slot_lease(self: &Arc<Self>, n: u64, key: String, member: String) -> SlotLease {
        self.hold(n, key.clone(), member.clone());
        SlotLease {
            store: self.clone(),
            n,
            key,
            member,
        }
    }

    /// Takes one of `max` slots of upstream `name` across every edge;
    /// `Ok(None)` when all are held.
    pub async fn acquire_slot(
        self: &Arc<Self>,
        name: &str,
        max: usize,
    ) -> Result<Option<SlotLease>, StoreDown> {
        let key = slot_key(&self.cfg.prefix, name);
        let (n, member) = self.lease_id();
        let ttl = self.cfg.lease_ttl.as_millis() as u64;
        let taken: i64 = self
            .call(StoreOp::Slot, |mut conn| {
                let mut inv = self.slot.prepare_invoke();
                inv.key(&key).arg(max).arg(&member).arg(ttl);
                async move { inv.invoke_async(&mut conn).await }
            })
            .await?;
        Ok((taken == 1).then(|| self.slot_lease(n, key, member)))
    }

    /// Runs `f` on the current runtime, if there is one (a drop at exit
    /// may have none: the lease then expires on its own).
    fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(fut);
        }
    }

    /// Pushes back the expiry of every lease held here; run every third of
    /// `state.lease_ttl`.
    pub async fn renew_leases(&self) -> Result<usize, StoreDown> {
        let held: Vec<(String, String)> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        if held.is_empty() {
            return Ok(0);
        }
        let ttl = self.cfg.lease_ttl.as_millis() as u64;
        let renewed: i64 = self
            .call(StoreOp::Renew, |mut conn| {
                let mut inv = self.renew.prepare_invoke();
                inv.arg(ttl);
                for (key, member) in &held {
                    inv.key(key).arg(member);
                }
                async move { inv.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(renewed.max(0) as usize)
    }

    /// Notes `tokens` that key `key_id` used at `now_ms` under this edge's
    /// own share of its limits (the store did not answer), so that the
    /// fleet's day and month quotas count them once it answers again.
    pub fn owe(&self, key_id: &str, limits: &TokenLimits, tokens: u64, now_ms: u64) {
        if tokens == 0 {
            return;
        }
        let names = key_names(&self.cfg.prefix, key_id, now_ms);
        let mut owed = lock(&self.owed);
        for (limit, counter, ttl) in [
            (limits.per_day, names.day, DAY_TTL_S),
            (limits.per_month, names.month, MONTH_TTL_S),
        ] {
            if limit.is_some() {
                owed.entry(counter).or_insert((0, ttl)).0 += tokens;
            }
        }
    }

    /// Adds what [`SharedState::owe`] noted to the quota counters, in one
    /// atomic round trip; kept for the next try when the store does not
    /// answer (a write applied without an answer then counts twice: the
    /// safe side of a budget).
    pub async fn pay_back(&self) -> Result<usize, StoreDown> {
        let owed: Vec<(String, (u64, u64))> = lock(&self.owed).drain().collect();
        if owed.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (counter, (tokens, ttl)) in &owed {
            pipe.incr(counter, *tokens).ignore();
            pipe.expire(counter, *ttl as i64).ignore();
        }
        let paid = self
            .call(StoreOp::Settle, |mut conn| async move {
                pipe.query_async::<()>(&mut conn).await
            })
            .await;
        if let Err(e) = paid {
            let mut back = lock(&self.owed);
            for (counter, (tokens, ttl)) in owed {
                back.entry(counter).or_insert((0, ttl)).0 += tokens;
            }
            return Err(e);
        }
        Ok(owed.len())
    }

    /// Adds this edge's hourly rows (what `take` hands over) to the fleet's
    /// ledger, as one batch applied atomically and at most once
    /// (`usage.lua`). A batch that got no answer is kept and sent again as
    /// it was, before any new rows are taken: the store may have applied
    /// it, and the same id is then skipped instead of counted twice.
    pub async fn add_usage(&self, take: impl FnOnce() -> Vec<Row>) -> Result<(), StoreDown> {
        let unconfirmed = lock(&self.usage_batch).clone();
        if let Some((id, rows)) = unconfirmed {
            self.send_usage(id, &rows).await?;
            *lock(&self.usage_batch) = None;
        }
        let rows = take();
        if rows.is_empty() {
            return Ok(());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        *lock(&self.usage_batch) = Some((id, rows.clone()));
        self.send_usage(id, &rows).await?;
        *lock(&self.usage_batch) = None;
        Ok(())
    }

    async fn send_usage(&self, id: u64, rows: &[Row]) -> Result<(), StoreDown> {
        let mut inv = self.usage.prepare_invoke();
        inv.key(decide::usage_batch_key(&self.cfg.prefix, &self.edge, id))
            .arg(decide::USAGE_BATCH_TTL_S)
            .arg(decide::USAGE_TTL_S);
        let mut hours: Vec<u64> = Vec::new();
        for row in rows {
            let index = match hours.iter().position(|h| *h == row.hour) {
                Some(i) => i,
                None => {
                    hours.push(row.hour);
                    inv.key(decide::usage_key(&self.cfg.prefix, row.hour));
                    hours.len() - 1
                }
            };
            for (field, value) in decide::usage_fields(row) {
                // KEYS[1] is the marker: the hours start at 2.
                inv.arg(index + 2).arg(field).arg(value);
            }
        }
        self.call(StoreOp::Ledger, |mut conn| async move {
            inv.invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// One check of the store (PING); marks it up or down.
    pub async fn check(&self) -> bool {
        self.call(StoreOp::Ping, |mut conn| async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .is_ok()
    }

    /// The background duty of an edge with a store: checks it every
    /// `interval` (so a store that came back is used again without a
    /// restart), adds the tokens used while it was away to the fleet's quotas,
    /// and renews the leases of requests in flight.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let renew_every = self.cfg.lease_ttl / 3;
        let mut last_renew = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            if self.check().await {
                if let Err(e) = self.pay_back().await {
                    log::warn!(
                        "shared store: adding the tokens used while it was away failed ({}); retrying",
                        e.0
                    );
                }
            }
            if last_renew.elapsed() >= renew_every {
                last_renew = tokio::time::Instant::now();
                if let Err(e) = self.renew_leases().await {
                    log::warn!("shared store: renewing leases failed: {}", e.0);
                }
            }
        }
    }
}

/// The store answered that it does not have a script (restarted, flushed).
fn is_no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fleet's ledger from `since_hour` on, for `llm-edge usage` (no
/// runtime: a blocking connection, one pipelined round trip).
pub fn read_usage(cfg: &SharedConfig, since_hour: u64, now_hour: u64) -> Result<Vec<Row>, String> {
    let client = redis::Client::open(cfg.url.expose()).map_err(|e| format!("state.redis: {e}"))?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| format!("state.redis: cannot connect: {e}"))?;
    let hours: Vec<u64> = (since_hour..=now_hour).collect();
    let mut pipe = redis::pipe();
    for hour in &hours {
        pipe.hgetall(decide::usage_key(&cfg.prefix, *hour));
    }
    let hashes: Vec<Vec<(String, u64)>> = pipe
        .query(&mut conn)
        .map_err(|e| format!("state.redis: {e}"))?;
    Ok(hours
        .iter()
        .zip(&hashes)
        .flat_map(|(hour, fields)| decide::usage_rows(*hour, fields))
        .collect())
}

/// The last five arguments of `admit.lua` and `settle.lua`: the token
/// limits (0: none) and how long the quota counters live.
fn token_args(inv: &mut redis::ScriptInvocation<'_>, t: &TokenLimits) {
    inv.arg(arg(t.per_minute))
        .arg(arg(t.per_day))
        .arg(arg(t.per_month))
        .arg(DAY_TTL_S)
        .arg(MONTH_TTL_S);
}

/// One request's claim on its key's shared limits: settled with what it
/// used when it ends, or given back whole when dropped unsettled.
#[derive(Debug)]
pub struct KeyAdmission {
    store: Option<Arc<SharedState>>,
    lease: Option<u64>,
    member: String,
    names: KeyNames,
    limits: KeyLimits,
    tokens: u64,
    requests_left: u64,
}

impl KeyAdmission {
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The key's requests-per-minute window across every edge, as the
    /// rate-limit headers state it (`None`: no such limit).
    pub fn request_window(&self) -> Option<Window> {
        let limit = u64::from(self.limits.requests_per_minute?);
        Some(decide::request_window(limit, self.requests_left))
    }

    /// Ends the concurrent-request lease and replaces the token
    /// reservation with `used`, in the background (off the response).
    pub fn settle(mut self, used: u64) {
        self.release(used);
    }

    fn release(&mut self, used: u64) {
        let Some(store) = self.store.take() else {
            return;
        };
        if let Some(n) = self.lease {
            store.forget(n);
        }
        if self.lease.is_none() && (self.tokens == 0 || self.tokens == used) {
            return;
        }
        let (member, names, limits, reserved) = (
            std::mem::take(&mut self.member),
            self.names.clone(),
            self.limits,
            self.tokens,
        );
        SharedState::spawn(async move {
            let t = limits.tokens;
            let settled: Result<i64, StoreDown> = store
                .call(StoreOp::Settle, |mut conn| {
                    let mut inv = store.settle.prepare_invoke();
                    inv.key(&names.concurrent)
                        .key(&names.tpm)
                        .key(&names.day)
                        .key(&names.month)
                        .arg(&member)
                        .arg(reserved)
                        .arg(used);
                    token_args(&mut inv, &t);
                    async move { inv.invoke_async(&mut conn).await }
                })
                .await;
            if let Err(e) = settled {
                log::warn!(
                    "shared store: could not settle a request ({}); its lease expires on its own, its reservation stays counted",
                    e.0
                );
            }
        });
    }
}

impl Drop for KeyAdmission {
    fn drop(&mut self) {
        self.release(0);
    }
}

/// One upstream slot held across edges; released when dropped.
#[derive(Debug)]
pub struct SlotLease {
    store: Arc<SharedState>,
    n: u64,
    key: String,
    member: String,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.store.forget(self.n);
        let store = self.store.clone();
        let (key, member) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        SharedState::spawn(async move {
            let released = store
                .call(StoreOp::Release, |mut conn| async move {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&member)
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await;
            if let Err(e) = released {
                log::warn!(
                    "shared store: could not release an upstream slot ({}); it expires on its own",
                    e.0
                );
            }
        });
    }
}
