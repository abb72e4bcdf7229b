//! Per-key token budgets: `tokens_per_minute` (a bucket refilled
//! continuously, a minute's worth as its size) and the quotas
//! `tokens_per_day` / `tokens_per_month` (UTC calendar days and months).
//!
//! A request reserves its worst case at admission (a prompt estimate plus the
//! generation length written upstream); the reservation is replaced by the
//! real usage when the response ends ([`TokenReservation::settle`]), or given
//! back whole if the request never reached a server. Concurrent requests
//! therefore can never together pass a limit by more than a prompt estimate's
//! error, and that error is charged to the next requests: no token goes
//! uncounted.
//!
//! Pure logic: no Pingora, no I/O; the wall clock is passed in (milliseconds
//! since the epoch) so tests can drive it. It must not import the gateway,
//! the ledger's storage or the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::labels::LimitReason;
use crate::policy::limits::Refusal;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenLimits {
    pub per_minute: Option<u64>,
    pub per_day: Option<u64>,
    pub per_month: Option<u64>,
}

impl TokenLimits {
    pub fn is_empty(&self) -> bool {
        *self == TokenLimits::default()
    }
}

const DAY_MS: u64 = 86_400_000;

/// The UTC day (days since the epoch) of `ms`.
pub fn day_of(ms: u64) -> u64 {
    ms / DAY_MS
}

/// The UTC month of `ms` as `year * 12 + month0`, and its first day.
pub fn month_of(ms: u64) -> (u64, u64) {
    let (y, m, _) = civil_from_days(day_of(ms) as i64);
    (
        y as u64 * 12 + (m - 1) as u64,
        days_from_civil(y, m, 1) as u64,
    )
}

/// The first day (days since the epoch) of the month after `month`.
pub fn next_month_start(month: u64) -> u64 {
    let next = month + 1;
    days_from_civil((next / 12) as i64, (next % 12 + 1) as u32, 1) as u64
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic
/// Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Used tokens of one calendar period: what this process settled, what
/// other processes sharing the ledger reported, and what is reserved now.
#[derive(Debug, Default, Clone, Copy)]
struct Period {
    /// The day or month these counts belong to.
    index: u64,
    settled: u64,
    external: u64,
}

impl Period {
    fn roll(&mut self, index: u64) {
        if self.index != index {
            *self = Period {
                index,
                ..Period::default()
            };
        }
    }

    fn used(&self) -> u64 {
        self.settled.saturating_add(self.external)
    }
}

#[derive(Debug)]
struct Account {
    limits: TokenLimits,
    /// Tokens in the per-minute bucket; below zero after a request used
    /// more than it reserved (the debt delays the next ones).
    bucket: f64,
    bucket_ms: u64,
    /// Reserved and not yet settled (counted against the quotas).
    reserved: u64,
    day: Period,
    month: Period,
}

impl Account {
    fn refill(&mut self, now_ms: u64) {
        if let Some(per_minute) = self.limits.per_minute {
            let elapsed = now_ms.saturating_sub(self.bucket_ms) as f64 / 60_000.0;
            self.bucket = (self.bucket + elapsed * per_minute as f64).min(per_minute as f64);
        }
        self.bucket_ms = self.bucket_ms.max(now_ms);
        self.day.roll(day_of(now_ms));
        self.month.roll(month_of(now_ms).0);
    }

    /// The most one more request may reserve now (`None`: no token limit).
    fn room(&self) -> Option<u64> {
        let minute = self.limits.per_minute.map(|_| self.bucket.max(0.0) as u64);
        let day = self
            .limits
            .per_day
            .map(|q| q.saturating_sub(self.day.used() + self.reserved));
        let month = self
            .limits
            .per_month
            .map(|q| q.saturating_sub(self.month.used() + self.reserved));
        [minute, day, month].into_iter().flatten().min()
    }

    /// Why `tokens` do not fit now, and when to retry.
    fn refusal(&self, key_id: &str, tokens: u64, now_ms: u64) -> Option<Refusal> {
        if let Some(per_minute) = self.limits.per_minute {
            if (tokens as f64) > self.bucket {
                let wait_ms = if tokens > per_minute {
                    60_000.0
                } else {
                    (tokens as f64 - self.bucket) / per_minute as f64 * 60_000.0
                };
                let hint = if tokens > per_minute {
                    "; this request alone needs more than a minute's budget: lower max_tokens or shorten the prompt"
                } else {
                    ""
                };
                return Some(Refusal {
                    reason: LimitReason::KeyTokensPerMinute,
                    message: format!(
                        "the API key '{key_id}' is over its limit of {per_minute} tokens per minute (this request reserves {tokens}: its prompt and max_tokens){hint}"
                    ),
                    retry_after: Duration::from_millis(wait_ms.ceil() as u64),
                });
            }
        }
        if let Some(quota) = self.limits.per_day {
            if self.day.used() + self.reserved + tokens > quota {
                let next = (day_of(now_ms) + 1) * DAY_MS;
                return Some(Refusal {
                    reason: LimitReason::KeyTokensPerDay,
                    message: format!(
                        "the API key '{key_id}' has used its quota of {quota} tokens for today (UTC; {} used, this request reserves {tokens}); it renews at midnight UTC",
                        self.day.used() + self.reserved
                    ),
                    retry_after: Duration::from_millis(next - now_ms),
                });
            }
        }
        if let Some(quota) = self.limits.per_month {
            if self.month.used() + self.reserved + tokens > quota {
                let next = next_month_start(self.month.index) * DAY_MS;
                return Some(Refusal {
                    reason: LimitReason::KeyTokensPerMonth,
                    message: format!(
                        "the API key '{key_id}' has used its quota of {quota} tokens for this month (UTC; {} used, this request reserves {tokens}); it renews on the 1st",
                        self.month.used() + self.reserved
                    ),
                    retry_after: Duration::from_millis(next.saturating_sub(now_ms)),
                });
            }
        }
        None
    }
}

fn lock(account: &Mutex<Account>) -> MutexGuard<'_, Account> {
    account
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The token accounts of the keys that have token limits (bounded by the
/// configured keys).
#[derive(Debug, Default)]
pub struct TokenBudget {
    accounts: HashMap<String, Arc<Mutex<Account>>>,
}

/// A key's token limits as the rate-limit response headers state them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenState {
    pub per_minute: Option<u64>,
    /// Tokens left in the per-minute budget now.
    pub remaining: u64,
    /// Until the per-minute budget is full again.
    pub reset: Duration,
    /// Used / quota of the day and of the month (reserved tokens included).
    pub day: Option<(u64, u64)>,
    pub month: Option<(u64, u64)>,
}

impl TokenBudget {
    pub fn new(limits: impl IntoIterator<Item = (String, TokenLimits)>, now_ms: u64) -> Self {
        let accounts = limits
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(id, limits)| {
                let account = Account {
                    limits,
                    bucket: limits.per_minute.unwrap_or(0) as f64,
                    bucket_ms: now_ms,
                    reserved: 0,
                    day: Period {
                        index: day_of(now_ms),
                        ..Period::default()
                    },
                    month: Period {
                        index: month_of(now_ms).0,
                        ..Period::default()
                    },
                };
                (id, Arc::new(Mutex::new(account)))
            })
            .collect();
        TokenBudget { accounts }
    }

    pub fn limits(&self, key_id: &str) -> Option<TokenLimits> {
        self.accounts.get(key_id).map(|a| lock(a).limits)
    }

    /// The most one request of `key_id` may reserve now; `None` when the key
    /// has no token limit.
    pub fn room(&self, key_id: &str, now_ms: u64) -> Option<u64> {
        let mut a = lock(self.accounts.get(key_id)?);
        a.refill(now_ms);
        a.room()
    }

    /// Reserves `tokens` for one request of `key_id`, or says why not. A key
    /// without token limits gets an empty reservation.
    pub fn reserve(
        &self,
        key_id: &str,
        tokens: u64,
        now_ms: u64,
    ) -> Result<TokenReservation, Refusal> {
        let Some(account) = self.accounts.get(key_id) else {
            return Ok(TokenReservation::none());
        };
        let mut a = lock(account);
        a.refill(now_ms);
        if let Some(refusal) = a.refusal(key_id, tokens, now_ms) {
            return Err(refusal);
        }
        if a.limits.per_minute.is_some() {
            a.bucket -= tokens as f64;
        }
        a.reserved += tokens;
        Ok(TokenReservation {
            account: Some(account.clone()),
            tokens,
        })
    }

    /// What other processes sharing the ledger used in the current day and
    /// month (restored at start-up, refreshed at every flush).
    pub fn set_external(&self, key_id: &str, day: (u64, u64), month: (u64, u64), now_ms: u64) {
        let Some(account) = self.accounts.get(key_id) else {
            return;
        };
        let mut a = lock(account);
        a.refill(now_ms);
        if a.day.index == day.0 {
            a.day.external = day.1;
        }
        if a.month.index == month.0 {
            a.month.external = month.1;
        }
    }

    pub fn state(&self, key_id: &str, now_ms: u64) -> Option<TokenState> {
        let mut a = lock(self.accounts.get(key_id)?);
        a.refill(now_ms);
        let (remaining, reset) = match a.limits.per_minute {
            Some(per_minute) => {
                let missing = (per_minute as f64 - a.bucket).max(0.0);
                (
                    a.bucket.max(0.0) as u64,
                    Duration::from_secs_f64(missing / per_minute as f64 * 60.0),
                )
            }
            None => (0, Duration::ZERO),
        };
        Some(TokenState {
            per_minute: a.limits.per_minute,
            remaining,
            reset,
            day: a.limits.per_day.map(|q| (a.day.used() + a.reserved, q)),
            month: a.limits.per_month.map(|q| (a.month.used() + a.reserved, q)),
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(String::as_str)
    }
}

/// Tokens held for one request until it settles. Dropped unsettled (the
/// request never reached a server) it gives them all back.
#[derive(Debug)]
pub struct TokenReservation {
    account: Option<Arc<Mutex<Account>>>,
    tokens: u64,
}

impl TokenReservation {
    pub fn none() -> TokenReservation {
        TokenReservation {
            account: None,
            tokens: 0,
        }
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Replaces the reservation with what the request really used.
    pub fn settle(mut self, used: u64, now_ms: u64) {
        self.release(used, now_ms);
    }

    fn release(&mut self, used: u64, now_ms: u64) {
        let Some(account) = self.account.take() else {
            return;
        };
        let mut a = lock(&account);
        a.refill(now_ms);
        if a.limits.per_minute.is_some() {
            a.bucket += self.tokens as f64 - used as f64;
            if let Some(per_minute) = a.limits.per_minute {
                a.bucket = a.bucket.min(per_minute as f64);
            }
        }
        a.reserved = a.reserved.saturating_sub(self.tokens);
        a.day.settled += used;
        a.month.settled += used;
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        if self.account.is_some() {
            self.release(0, now_ms());
        }
    }
}

/// The wall clock in milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The worst case of a request's prompt, from its body alone: one token per
/// `BYTES_PER_TOKEN` bytes of the body, which is JSON around the prompt.
/// An over-estimate for ordinary text (llama.cpp's tokenizers average 3-4
/// bytes per token on English); the error is charged back at settlement.
pub fn estimate_prompt_tokens(body_len: usize) -> u64 {
    const BYTES_PER_TOKEN: u64 = 3;
    (body_len as u64).div_ceil(BYTES_PER_TOKEN)
}

#[cfg(test)]
mod tests;
