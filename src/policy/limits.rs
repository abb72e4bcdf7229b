//! Per-key request limits and the global cap on concurrent requests.
//!
//! Checked after authentication and before anything reaches the upstream:
//! requests per minute (a token bucket that allows a minute's worth as a
//! burst), concurrent requests per key, and a global cap across all keys.
//! Keys are the configured ones, so the state is bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::labels::LimitReason;
use crate::policy::ratelimit::Window;
use crate::policy::tokens::TokenLimits;

use crate::errors::ApiError;
use crate::openai::body::{Multiplier, RequestBody};

/// What to do with a request asking for more tokens than its key's ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverMaxTokens {
    /// Lower the request's `max_tokens` to the ceiling.
    #[default]
    Clamp,
    /// Refuse it with 400.
    Reject,
}

/// What an edge does when the shared store (`state.redis`) cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Enforce this edge's own limits, each divided by `state.expected_edges`.
    #[default]
    Local,
    /// Refuse with 503 until the store answers again.
    Deny,
}

impl KeyLimits {
    /// This edge's share of fleet-wide limits when `edges` edges share them
    /// and the store is away: each count divided, rounded up, at least 1.
    pub fn scaled(&self, edges: u32) -> KeyLimits {
        let edges = edges.max(1);
        let div32 = |n: u32| n.div_ceil(edges).max(1);
        let div64 = |n: u64| n.div_ceil(u64::from(edges)).max(1);
        KeyLimits {
            requests_per_minute: self.requests_per_minute.map(div32),
            max_concurrent: self.max_concurrent.map(div32),
            tokens: TokenLimits {
                per_minute: self.tokens.per_minute.map(div64),
                per_day: self.tokens.per_day.map(div64),
                per_month: self.tokens.per_month.map(div64),
            },
            ..*self
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_tokens: Option<u64>,
    pub over_max_tokens: OverMaxTokens,
    pub tokens: TokenLimits,
}

/// A refused request: why, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: LimitReason,
    pub message: String,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(per_minute: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(per_minute.max(1));
        TokenBucket {
            tokens: capacity,
            capacity,
            per_second: capacity / 60.0,
            updated: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[derive(Debug)]
struct KeyState {
    limits: KeyLimits,
    bucket: Option<Mutex<TokenBucket>>,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug)]
pub struct Limiter {
    keys: HashMap<String, KeyState>,
    global_max: Option<usize>,
    global_in_flight: Arc<AtomicUsize>,
}

/// Releases the request's concurrency slots when dropped: the global one
/// and, for a configured key, the key's (two fixed slots, no `Vec`).
#[derive(Debug)]
pub struct LimitGuard {
    global: Option<Arc<AtomicUsize>>,
    key: Option<Arc<AtomicUsize>>,
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        for c in [&self.global, &self.key].into_iter().flatten() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Increments `counter` unless that would pass `max`.
fn try_increment(counter: &Arc<AtomicUsize>, max: Option<usize>) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match max {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        })
        .is_ok()
}

impl Limiter {
    pub fn new(
        keys: impl IntoIterator<Item = (String, KeyLimits)>,
        global_max: Option<usize>,
        now: Instant,
    ) -> Limiter {
        let keys = keys
            .into_iter()
            .map(|(id, limits)| {
                let bucket = limits
                    .requests_per_minute
                    .map(|rpm| Mutex::new(TokenBucket::new(rpm, now)));
                let state = KeyState {
                    limits,
                    bucket,
                    in_flight: Arc::new(AtomicUsize::new(0)),
                };
                (id, state)
            })
            .collect();
        Limiter {
            keys,
            global_max,
            global_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The key's requests-per-minute limit as the rate-limit headers state it.
    pub fn request_window(&self, key_id: &str, now: Instant) -> Option<Window> {
        let key = self.keys.get(key_id)?;
        let mut b = match key.bucket.as_ref()?.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.per_second).min(b.capacity);
        b.updated = b.updated.max(now);
        Some(Window {
            limit: b.capacity as u64,
            remaining: b.tokens.max(0.0) as u64,
            reset: Duration::from_secs_f64((b.capacity - b.tokens).max(0.0) / b.per_second),
        })
    }

    pub fn key_limits(&self, key_id: &str) -> KeyLimits {
        self.keys.get(key_id).map(|k| k.limits).unwrap_or_default()
    }

    /// Admits one request of `key_id`, or says why not.
    pub fn admit(&self, key_id: &str, now: Instant) -> Result<LimitGuard, Refusal> {
        let mut guard = LimitGuard {
            global: None,
            key: None,
        };
        if !try_increment(&self.global_in_flight, self.global_max) {
            return Err(Refusal {
                reason: LimitReason::GlobalConcurrency,
                message: format!(
                    "the gateway is at its limit of {} concurrent requests (limits.max_concurrent_requests); retry shortly",
                    self.global_max.unwrap_or_default()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        guard.global = Some(self.global_in_flight.clone());
        let Some(key) = self.keys.get(key_id) else {
            return Ok(guard);
        };
        let max_concurrent = key.limits.max_concurrent.map(|n| n as usize);
        if !try_increment(&key.in_flight, max_concurrent) {
            return Err(Refusal {
                reason: LimitReason::KeyConcurrency,
                message: format!(
                    "the API key '{key_id}' already has {} requests in progress, its limit; wait for one to finish",
                    max_concurrent.unwrap_or_default()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        guard.key = Some(key.in_flight.clone());
        if let Some(bucket) = &key.bucket {
            let taken = match bucket.lock() {
                Ok(mut b) => b.take(now),
                Err(poisoned) => poisoned.into_inner().take(now),
            };
            if let Err(wait) = taken {
                return Err(Refusal {
                    reason: LimitReason::KeyRate,
                    message: format!(
                        "the API key '{key_id}' is over its limit of {} requests per minute",
                        key.limits.requests_per_minute.unwrap_or_default()
                    ),
                    retry_after: wait,
                });
            }
        }
        Ok(guard)
    }
}

/// The largest generation length written upstream: llama-server reads
/// lengths as `int32_t` and refuses (or wraps) anything larger.
pub const MAX_WRITTEN_TOKENS: u64 = i32::MAX as u64;

/// The per-generation cap to write into `body` under `limits`.
///
/// `Ok(None)`: the key has no ceiling, leave the body alone. `Ok(Some(cap))`:
/// cap every generation-length field at `cap` and insert one where the route
/// needs it (`body::rewrite`); fields already within `cap` stay as sent.
///
/// The ceiling bounds every generation of the request together: the body's
/// `choices` (prompts × `n`/`best_of`) times the tokens of each. In `Clamp`
/// mode each generation gets `ceiling / choices`; in `Reject` mode a request
/// asking for more is refused with 400, as is one asking for several
/// generations without a token limit. More generations than the ceiling
/// has tokens, or a count the gateway cannot read, are refused in both.
pub fn max_tokens_to_send(limits: &KeyLimits, body: &RequestBody) -> Result<Option<u64>, ApiError> {
    let Some(ceiling) = limits.max_tokens else {
        return Ok(None);
    };
    if let Some(m) = body.multipliers.iter().find(|m| m.count.is_none()) {
        return Err(ApiError::InvalidParam {
            param: m.name.into(),
            message: format!(
                "\"{}\" must be a positive whole number: this API key's limit of {ceiling} tokens is shared by every generation a request asks for",
                m.name
            ),
        });
    }
    let choices = body.choices.max(1);
    // `choices` saturates: u64::MAX may stand for more than any ceiling.
    if choices > ceiling || choices == u64::MAX {
        return Err(ApiError::InvalidParam {
            param: largest_multiplier(body).into(),
            message: format!(
                "{}: {choices} generations, more than this API key's limit of {ceiling} tokens allows at 1 token each; ask for at most {ceiling}",
                describe_multipliers(body)
            ),
        });
    }
    let per_choice = (ceiling / choices).min(MAX_WRITTEN_TOKENS);
    if limits.over_max_tokens == OverMaxTokens::Clamp {
        return Ok(Some(per_choice));
    }
    // Every length the client states must fit, whatever the others say.
    let stated = body.token_limits.iter().filter(|f| f.value.is_some());
    if let Some(field) = stated.max_by_key(|f| (f.value, std::cmp::Reverse(f.span.start))) {
        let n = field.value.unwrap_or_default();
        if n.checked_mul(choices).is_none_or(|total| total > ceiling) {
            let message = if choices == 1 {
                format!(
                    "{} is {n}, above this API key's limit of {ceiling}",
                    field.name
                )
            } else {
                format!(
                    "{} is {n} and {}: {} tokens in all, above this API key's limit of {ceiling}; ask for at most {per_choice} tokens per generation, or fewer generations",
                    field.name,
                    describe_multipliers(body),
                    u128::from(n) * u128::from(choices),
                )
            };
            return Err(ApiError::InvalidParam {
                param: field.name.into(),
                message,
            });
        }
    }
    // No limit asked for (absent, null, -1, or not a whole number): one
    // generation is capped at the ceiling, as before; several are refused.
    if choices > 1 && body.requested_max_tokens().is_none() {
        return Err(ApiError::InvalidParam {
            param: largest_multiplier(body).into(),
            message: format!(
                "{}: {choices} generations without a token limit, and this API key allows {ceiling} tokens per request in all; set max_tokens (max_output_tokens on /v1/responses) to at most {per_choice}",
                describe_multipliers(body)
            ),
        });
    }
    Ok(Some(per_choice))
}

/// The multiplier with the largest count (the first of equals).
fn largest_multiplier(body: &RequestBody) -> &'static str {
    body.multipliers
        .iter()
        .filter(|m| m.count.is_some_and(|c| c > 1))
        .fold(None::<&Multiplier>, |best, m| match best {
            Some(b) if b.count >= m.count => Some(b),
            _ => Some(m),
        })
        .map_or("n", |m| m.name)
}

/// "n is 4", "\"prompt\" holds 3 prompts and n is 2", ... (a repeated key
/// once, with its largest count).
fn describe_multipliers(body: &RequestBody) -> String {
    let mut seen: Vec<(&'static str, u64)> = Vec::new();
    for m in &body.multipliers {
        let Some(count) = m.count.filter(|&c| c > 1) else {
            continue;
        };
        match seen.iter_mut().find(|(name, _)| *name == m.name) {
            Some((_, c)) => *c = (*c).max(count),
            None => seen.push((m.name, count)),
        }
    }
    if seen.is_empty() {
        return "the request".into();
    }
    let parts: Vec<String> = seen
        .iter()
        .map(|&(name, count)| {
            if name == "prompt" {
                format!("\"prompt\" holds {count} prompts")
            } else {
                format!("{name} is {count}")
            }
        })
        .collect();
    parts.join(" and ")
}

#[cfg(test)]
mod tests;
