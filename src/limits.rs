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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_tokens: Option<u64>,
    pub over_max_tokens: OverMaxTokens,
}

/// A refused request: why, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
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

/// Releases the request's concurrency slots when dropped.
#[derive(Debug)]
pub struct LimitGuard {
    counters: Vec<Arc<AtomicUsize>>,
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        for c in &self.counters {
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

    pub fn key_limits(&self, key_id: &str) -> KeyLimits {
        self.keys.get(key_id).map(|k| k.limits).unwrap_or_default()
    }

    /// Admits one request of `key_id`, or says why not.
    pub fn admit(&self, key_id: &str, now: Instant) -> Result<LimitGuard, Refusal> {
        let mut guard = LimitGuard {
            counters: Vec::new(),
        };
        if !try_increment(&self.global_in_flight, self.global_max) {
            return Err(Refusal {
                reason: "global_concurrency",
                message: format!(
                    "the gateway is at its limit of {} concurrent requests (limits.max_concurrent_requests); retry shortly",
                    self.global_max.unwrap_or_default()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        guard.counters.push(self.global_in_flight.clone());
        let Some(key) = self.keys.get(key_id) else {
            return Ok(guard);
        };
        let max_concurrent = key.limits.max_concurrent.map(|n| n as usize);
        if !try_increment(&key.in_flight, max_concurrent) {
            return Err(Refusal {
                reason: "key_concurrency",
                message: format!(
                    "the API key '{key_id}' already has {} requests in progress, its limit; wait for one to finish",
                    max_concurrent.unwrap_or_default()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        guard.counters.push(key.in_flight.clone());
        if let Some(bucket) = &key.bucket {
            let taken = match bucket.lock() {
                Ok(mut b) => b.take(now),
                Err(poisoned) => poisoned.into_inner().take(now),
            };
            if let Err(wait) = taken {
                return Err(Refusal {
                    reason: "key_rate",
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

/// The `max_tokens` to send upstream under `limits`: `None` leaves the body
/// alone; `Some(ceiling)` caps it (inserting it when the client sent none).
pub fn max_tokens_to_send(
    limits: &KeyLimits,
    requested: Option<u64>,
) -> Result<Option<u64>, crate::errors::ApiError> {
    let Some(ceiling) = limits.max_tokens else {
        return Ok(None);
    };
    match (requested, limits.over_max_tokens) {
        (Some(n), _) if n <= ceiling => Ok(None),
        (Some(n), OverMaxTokens::Reject) => Err(crate::errors::ApiError::InvalidParam {
            param: "max_tokens".into(),
            message: format!("max_tokens is {n}, above this API key's limit of {ceiling}"),
        }),
        _ => Ok(Some(ceiling)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limits: KeyLimits, global: Option<usize>, now: Instant) -> Limiter {
        Limiter::new([("alice".to_string(), limits)], global, now)
    }

    #[test]
    fn requests_per_minute_refill_over_time() {
        let t0 = Instant::now();
        let l = limiter(
            KeyLimits {
                requests_per_minute: Some(2),
                ..Default::default()
            },
            None,
            t0,
        );
        assert!(l.admit("alice", t0).is_ok());
        assert!(l.admit("alice", t0).is_ok());
        let refused = l.admit("alice", t0).unwrap_err();
        assert_eq!(refused.reason, "key_rate");
        assert!(
            (29..=30).contains(&refused.retry_after.as_secs()),
            "{refused:?}"
        );
        assert!(l.admit("alice", t0 + Duration::from_secs(29)).is_err());
        assert!(l.admit("alice", t0 + Duration::from_secs(31)).is_ok());
        // other keys are not limited
        assert!(l.admit("bob", t0).is_ok());
    }

    #[test]
    fn concurrency_is_released_by_the_guard() {
        let t0 = Instant::now();
        let l = limiter(
            KeyLimits {
                max_concurrent: Some(2),
                ..Default::default()
            },
            None,
            t0,
        );
        let a = l.admit("alice", t0).unwrap();
        let _b = l.admit("alice", t0).unwrap();
        assert_eq!(l.admit("alice", t0).unwrap_err().reason, "key_concurrency");
        drop(a);
        assert!(l.admit("alice", t0).is_ok());
    }

    #[test]
    fn global_cap_covers_every_key() {
        let t0 = Instant::now();
        let l = limiter(KeyLimits::default(), Some(2), t0);
        let _a = l.admit("alice", t0).unwrap();
        let _b = l.admit("bob", t0).unwrap();
        let refused = l.admit("carol", t0).unwrap_err();
        assert_eq!(refused.reason, "global_concurrency");
        assert_eq!(refused.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn max_tokens_ceiling() {
        let clamp = KeyLimits {
            max_tokens: Some(100),
            ..Default::default()
        };
        let reject = KeyLimits {
            over_max_tokens: OverMaxTokens::Reject,
            ..clamp
        };
        assert_eq!(
            max_tokens_to_send(&KeyLimits::default(), Some(10_000)),
            Ok(None)
        );
        assert_eq!(max_tokens_to_send(&clamp, Some(50)), Ok(None));
        assert_eq!(max_tokens_to_send(&clamp, Some(500)), Ok(Some(100)));
        assert_eq!(
            max_tokens_to_send(&clamp, None),
            Ok(Some(100)),
            "unlimited requests get the ceiling"
        );
        assert_eq!(max_tokens_to_send(&reject, None), Ok(Some(100)));
        let err = max_tokens_to_send(&reject, Some(500)).unwrap_err();
        assert_eq!((err.status(), err.param()), (400, Some("max_tokens")));
    }

    #[test]
    fn a_refusal_does_not_leak_slots() {
        let t0 = Instant::now();
        let l = limiter(
            KeyLimits {
                max_concurrent: Some(1),
                requests_per_minute: Some(1),
                ..Default::default()
            },
            Some(10),
            t0,
        );
        let first = l.admit("alice", t0).unwrap();
        drop(first);
        // rate-limited now: the concurrency and global counters must come back
        for _ in 0..5 {
            assert_eq!(l.admit("alice", t0).unwrap_err().reason, "key_rate");
        }
        assert_eq!(l.global_in_flight.load(Ordering::SeqCst), 0);
    }
}
