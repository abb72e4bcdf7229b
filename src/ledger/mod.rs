//! The usage ledger: per key, per model, per UTC hour, the requests, prompt,
//! cached and completion tokens, errors, client cancellations and GPU time.
//!
//! The request path only adds to an in-memory aggregate (one lock, no
//! allocation once a key and model were seen); a background service writes
//! the aggregate to [`store`] (SQLite under `state_dir`) every
//! `ledger.flush_interval` and at shutdown, so a crash loses at most one
//! interval. Without `state_dir` the rows stay in memory for the process's
//! life. After every flush the ledger tells the token budget what other
//! processes sharing the file (the other side of a zero-downtime hand-over)
//! used today and this month, and at start-up what was used before. With
//! `state.redis` it also keeps what it recorded since the last flush for the
//! fleet's ledger in the store ([`Ledger::take_fleet_rows`]).
//!
//! Owns the ledger's rows and their storage; must not import the gateway,
//! upstream or metrics modules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::policy::tokens::{self, TokenBudget};

pub mod command;
pub mod report;
pub mod store;

#[cfg(test)]
mod tests;

/// The counts of one (key, model, hour).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub errors: u64,
    pub cancelled: u64,
    pub gpu_ms: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.cached_tokens += other.cached_tokens;
        self.completion_tokens += other.completion_tokens;
        self.errors += other.errors;
        self.cancelled += other.cancelled;
        self.gpu_ms += other.gpu_ms;
    }

    /// What counts against token limits and quotas.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// One row of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub key: String,
    pub model: String,
    /// Hours since the epoch (UTC).
    pub hour: u64,
    #[serde(flatten)]
    pub counts: Counts,
}

type Aggregate = HashMap<String, HashMap<String, HashMap<u64, Counts>>>;

fn add_to(agg: &mut Aggregate, key: &str, model: &str, hour: u64, counts: &Counts) {
    // Looked up by &str first: a key and model seen before cost no allocation.
    if !agg.contains_key(key) {
        agg.insert(key.to_string(), HashMap::new());
    }
    let Some(models) = agg.get_mut(key) else {
        return;
    };
    if !models.contains_key(model) {
        models.insert(model.to_string(), HashMap::new());
    }
    let Some(hours) = models.get_mut(model) else {
        return;
    };
    hours.entry(hour).or_default().add(counts);
}

fn rows_of(agg: &Aggregate) -> Vec<Row> {
    let mut rows = Vec::new();
    for (key, models) in agg {
        for (model, hours) in models {
            for (&hour, counts) in hours {
                rows.push(Row {
                    key: key.clone(),
                    model: model.clone(),
                    hour,
                    counts: *counts,
                });
            }
        }
    }
    rows
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Ledger {
    /// Not yet written.
    pending: Mutex<Aggregate>,
    /// The file, or in memory-only mode every row so far.
    backing: Backing,
    /// What this process wrote, per key and UTC day / month: subtracted
    /// from the file's totals to see what other processes used.
    own: Mutex<HashMap<String, OwnTotals>>,
    budget: Arc<TokenBudget>,
    /// With a shared store (`state.redis`): what is not yet added to the
    /// fleet's ledger there ([`Ledger::take_fleet_rows`]).
    fleet: Option<Mutex<Aggregate>>,
}

enum Backing {
    Memory(Mutex<Aggregate>),
    /// Opened when first needed: `--daemon` forks after start-up, and an
    /// SQLite connection must not cross a fork.
    File {
        dir: std::path::PathBuf,
        store: Mutex<Option<store::Store>>,
    },
}

impl Backing {
    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut store::Store) -> Result<T, String>,
    ) -> Option<Result<T, String>> {
        let Backing::File { dir, store } = self else {
            return None;
        };
        let mut store = lock(store);
        if store.is_none() {
            match store::Store::open(dir) {
                Ok(s) => *store = Some(s),
                Err(e) => return Some(Err(e)),
            }
        }
        store.as_mut().map(f)
    }

    fn close(&self) {
        if let Backing::File { store, .. } = self {
            *lock(store) = None;
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct OwnTotals {
    day: (u64, u64),
    month: (u64, u64),
}

impl Ledger {
    /// The ledger in `state_dir` (created if missing), or in memory. The
    /// token budget is told at once what the file holds for today and this
    /// month.
    pub fn open(state_dir: Option<&Path>, budget: Arc<TokenBudget>) -> Result<Ledger, String> {
        let backing = match state_dir {
            None => Backing::Memory(Mutex::new(HashMap::new())),
            Some(dir) => Backing::File {
                dir: dir.to_path_buf(),
                store: Mutex::new(Some(store::Store::open(dir)?)),
            },
        };
        let ledger = Ledger {
            pending: Mutex::new(HashMap::new()),
            backing,
            own: Mutex::new(HashMap::new()),
            budget,
            fleet: None,
        };
        ledger.sync_quotas(tokens::now_ms())?;
        ledger.backing.close();
        Ok(ledger)
    }

    pub fn path(&self) -> Option<std::path::PathBuf> {
        match &self.backing {
            Backing::Memory(_) => None,
            Backing::File { dir, .. } => Some(dir.join(store::FILE_NAME)),
        }
    }

    /// Keeps what this edge records for the fleet's ledger too (with
    /// `state.redis`); call before serving.
    pub fn share_with_fleet(&mut self) {
        self.fleet = Some(Mutex::new(HashMap::new()));
    }

    /// Adds one request's counts (the request path: memory only).
    pub fn record(&self, key: &str, model: &str, now_ms: u64, counts: &Counts) {
        let hour = now_ms / 3_600_000;
        add_to(&mut lock(&self.pending), key, model, hour, counts);
        if let Some(fleet) = &self.fleet {
            add_to(&mut lock(fleet), key, model, hour, counts);
        }
    }

    /// The hourly rows recorded since the last call, for the fleet's
    /// ledger (the shared store keeps them until they are written).
    pub fn take_fleet_rows(&self) -> Vec<Row> {
        self.fleet
            .as_ref()
            .map(|f| rows_of(&std::mem::take(&mut *lock(f))))
            .unwrap_or_default()
    }

    /// Writes what is pending; then refreshes the quotas from the file.
    pub fn flush(&self) -> Result<(), String> {
        let pending = std::mem::take(&mut *lock(&self.pending));
        if pending.is_empty() && matches!(self.backing, Backing::Memory(_)) {
            return Ok(());
        }
        let rows = rows_of(&pending);
        match &self.backing {
            Backing::Memory(all) => {
                let mut all = lock(all);
                for r in &rows {
                    add_to(&mut all, &r.key, &r.model, r.hour, &r.counts);
                }
            }
            Backing::File { .. } => {
                if let Some(Err(e)) = self.backing.with_store(|s| s.add(&rows)) {
                    // Kept for the next attempt: nothing is lost to a busy disk.
                    let mut back = lock(&self.pending);
                    for r in &rows {
                        add_to(&mut back, &r.key, &r.model, r.hour, &r.counts);
                    }
                    return Err(e);
                }
                let mut own = lock(&self.own);
                for r in &rows {
                    let ms = r.hour * 3_600_000;
                    let totals = own.entry(r.key.clone()).or_default();
                    let (day, month) = (tokens::day_of(ms), tokens::month_of(ms).0);
                    for (slot, index) in [(&mut totals.day, day), (&mut totals.month, month)] {
                        if slot.0 != index {
                            *slot = (index, 0);
                        }
                        slot.1 += r.counts.tokens();
                    }
                }
            }
        }
        self.sync_quotas(tokens::now_ms())
    }

    /// Tells the token budget what other processes used today and this month.
    fn sync_quotas(&self, now_ms: u64) -> Result<(), String> {
        let day = tokens::day_of(now_ms);
        let (month, month_first_day) = tokens::month_of(now_ms);
        let totals = self.backing.with_store(|s| {
            Ok((
                s.tokens_since(day * 24)?,
                s.tokens_since(month_first_day * 24)?,
            ))
        });
        let Some(totals) = totals else {
            return Ok(());
        };
        let (day_totals, month_totals) = totals?;
        let own = lock(&self.own);
        for key in self.budget.keys() {
            let mine = own.get(key).copied().unwrap_or_default();
            let mine_day = if mine.day.0 == day { mine.day.1 } else { 0 };
            let mine_month = if mine.month.0 == month {
                mine.month.1
            } else {
                0
            };
            let all_day = day_totals.get(key).copied().unwrap_or(0);
            let all_month = month_totals.get(key).copied().unwrap_or(0);
            self.budget.set_external(
                key,
                (day, all_day.saturating_sub(mine_day)),
                (month, all_month.saturating_sub(mine_month)),
                now_ms,
            );
        }
        Ok(())
    }

    /// Every row from `since_hour` on, written or not.
    pub fn rows(&self, since_hour: u64) -> Result<Vec<Row>, String> {
        let mut agg: Aggregate = HashMap::new();
        let stored = match &self.backing {
            Backing::Memory(all) => rows_of(&lock(all)),
            Backing::File { .. } => self
                .backing
                .with_store(|s| s.rows(since_hour))
                .unwrap_or(Ok(Vec::new()))?,
        };
        let pending = rows_of(&lock(&self.pending));
        for r in stored
            .iter()
            .chain(&pending)
            .filter(|r| r.hour >= since_hour)
        {
            add_to(&mut agg, &r.key, &r.model, r.hour, &r.counts);
        }
        let mut rows = rows_of(&agg);
        rows.sort_by(|a, b| (a.hour, &a.key, &a.model).cmp(&(b.hour, &b.key, &b.model)));
        Ok(rows)
    }
}
