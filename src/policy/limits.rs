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
                reason: LimitReason::GlobalConcurrency,
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
                reason: LimitReason::KeyConcurrency,
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
        assert_eq!(refused.reason, LimitReason::KeyRate);
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
        assert_eq!(
            l.admit("alice", t0).unwrap_err().reason,
            LimitReason::KeyConcurrency
        );
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
        assert_eq!(refused.reason, LimitReason::GlobalConcurrency);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
    }

    fn body(json: &str) -> RequestBody {
        crate::openai::body::inspect(json.as_bytes()).unwrap()
    }

    fn ceiling(n: u64, mode: OverMaxTokens) -> KeyLimits {
        KeyLimits {
            max_tokens: Some(n),
            over_max_tokens: mode,
            ..Default::default()
        }
    }

    fn send(limits: &KeyLimits, json: &str) -> Result<Option<u64>, ApiError> {
        max_tokens_to_send(limits, &body(json))
    }

    /// `(status, param, message)` of a refusal.
    fn refused(limits: &KeyLimits, json: &str) -> (u16, String, String) {
        let err = send(limits, json).expect_err(json);
        (
            err.status(),
            err.param().unwrap().to_string(),
            err.to_string(),
        )
    }

    #[test]
    fn max_tokens_ceiling() {
        let clamp = ceiling(100, OverMaxTokens::Clamp);
        let reject = ceiling(100, OverMaxTokens::Reject);
        assert_eq!(
            send(&KeyLimits::default(), r#"{"max_tokens":10000,"n":64}"#),
            Ok(None),
            "no ceiling: no checks at all"
        );
        // the cap is always returned: rewrite leaves smaller values as sent
        assert_eq!(send(&clamp, r#"{"max_tokens":50}"#), Ok(Some(100)));
        assert_eq!(send(&clamp, r#"{"max_tokens":500}"#), Ok(Some(100)));
        assert_eq!(
            send(&clamp, "{}"),
            Ok(Some(100)),
            "unlimited requests get the ceiling"
        );
        assert_eq!(send(&reject, "{}"), Ok(Some(100)));
        assert_eq!(send(&reject, r#"{"n_predict":-1}"#), Ok(Some(100)));
        assert_eq!(send(&reject, r#"{"max_tokens":100}"#), Ok(Some(100)));
        let (status, param, message) = refused(&reject, r#"{"max_tokens":500}"#);
        assert_eq!((status, param.as_str()), (400, "max_tokens"));
        assert_eq!(
            message,
            "max_tokens is 500, above this API key's limit of 100"
        );
    }

    #[test]
    fn every_length_field_is_held_to_the_ceiling() {
        let reject = ceiling(100, OverMaxTokens::Reject);
        let clamp = ceiling(100, OverMaxTokens::Clamp);
        for name in [
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "n_predict",
        ] {
            let over = format!(r#"{{"{name}":101}}"#);
            assert_eq!(send(&clamp, &over), Ok(Some(100)), "{name}");
            let (status, param, message) = refused(&reject, &over);
            assert_eq!((status, param.as_str()), (400, name));
            assert!(message.starts_with(&format!("{name} is 101")), "{message}");
            let within = format!(r#"{{"{name}":100}}"#);
            assert_eq!(send(&reject, &within), Ok(Some(100)), "{name}");
        }
        // the largest of several is the one named
        let (_, param, _) = refused(&reject, r#"{"max_tokens":5,"n_predict":300}"#);
        assert_eq!(param, "n_predict");
        // a stated length over the ceiling is refused even beside an unlimited one
        let (_, param, _) = refused(&reject, r#"{"max_tokens":500,"n_predict":-1}"#);
        assert_eq!(param, "max_tokens");
    }

    #[test]
    fn clamp_shares_the_ceiling_between_generations() {
        let clamp = ceiling(16, OverMaxTokens::Clamp);
        assert_eq!(send(&clamp, r#"{"n":8}"#), Ok(Some(2)));
        assert_eq!(send(&clamp, r#"{"n":3,"max_tokens":100}"#), Ok(Some(5)));
        assert_eq!(send(&clamp, r#"{"n_cmpl":4}"#), Ok(Some(4)));
        assert_eq!(send(&clamp, r#"{"best_of":5}"#), Ok(Some(3)));
        assert_eq!(send(&clamp, r#"{"n":2.0}"#), Ok(Some(8)));
        assert_eq!(send(&clamp, r#"{"prompt":["a","b","c","d"]}"#), Ok(Some(4)));
        assert_eq!(send(&clamp, r#"{"prompt":[1,2,3,4]}"#), Ok(Some(16)));
        assert_eq!(send(&clamp, r#"{"prompt":["a","b"],"n":4}"#), Ok(Some(2)));
        assert_eq!(send(&clamp, r#"{"n":16}"#), Ok(Some(1)));
        // values llama-server refuses on its own count once
        assert_eq!(send(&clamp, r#"{"n":"8"}"#), Ok(Some(16)));
        // more generations than tokens: refused, naming the parameter
        let (status, param, message) = refused(&clamp, r#"{"n":17}"#);
        assert_eq!((status, param.as_str()), (400, "n"));
        assert_eq!(
            message,
            "n is 17: 17 generations, more than this API key's limit of 16 tokens allows at 1 token each; ask for at most 16"
        );
        let (_, param, message) = refused(&clamp, r#"{"n":3,"prompt":["a","b","c","d","e","f"]}"#);
        assert_eq!(param, "prompt");
        assert!(
            message.starts_with("n is 3 and \"prompt\" holds 6 prompts: 18 generations"),
            "{message}"
        );
        let (_, param, _) = refused(&clamp, r#"{"best_of":20,"n":2}"#);
        assert_eq!(param, "best_of");
        // a count that could mean anything to llama-server
        for (json, name) in [
            (r#"{"n":-4294967294}"#, "n"),
            (r#"{"n_cmpl":1e400}"#, "n_cmpl"),
            (r#"{"best_of":-1}"#, "best_of"),
        ] {
            let (status, param, message) = refused(&clamp, json);
            assert_eq!((status, param.as_str()), (400, name), "{json}");
            assert!(
                message.contains("must be a positive whole number"),
                "{message}"
            );
        }
    }

    #[test]
    fn reject_refuses_generations_over_the_ceiling() {
        let reject = ceiling(16, OverMaxTokens::Reject);
        assert_eq!(send(&reject, r#"{"n":4,"max_tokens":4}"#), Ok(Some(4)));
        assert_eq!(send(&reject, r#"{"n":3,"max_tokens":5}"#), Ok(Some(5)));
        assert_eq!(
            send(&reject, r#"{"prompt":["a","b"],"max_tokens":8}"#),
            Ok(Some(8))
        );
        let (status, param, message) = refused(&reject, r#"{"n":4,"max_tokens":5}"#);
        assert_eq!((status, param.as_str()), (400, "max_tokens"));
        assert_eq!(
            message,
            "max_tokens is 5 and n is 4: 20 tokens in all, above this API key's limit of 16; ask for at most 4 tokens per generation, or fewer generations"
        );
        let (_, param, message) = refused(&reject, r#"{"max_output_tokens":9,"best_of":2}"#);
        assert_eq!(param, "max_output_tokens");
        assert!(message.contains("18 tokens in all"), "{message}");
        let (_, param, _) = refused(&reject, r#"{"prompt":[[1],[2],[3]],"n_predict":6}"#);
        assert_eq!(param, "n_predict");
        // several generations without a limit (absent, null, -1, not a whole number)
        for json in [
            r#"{"n":2}"#,
            r#"{"n":2,"max_tokens":null}"#,
            r#"{"n":2,"n_predict":-1}"#,
            r#"{"n":2,"max_tokens":7.5}"#,
            r#"{"n":2,"max_tokens":4,"max_completion_tokens":-1}"#,
        ] {
            let (status, param, message) = refused(&reject, json);
            assert_eq!((status, param.as_str()), (400, "n"), "{json}");
            assert!(message.contains("without a token limit"), "{message}");
            assert!(message.contains("at most 8"), "{message}");
        }
        let (_, param, _) = refused(&reject, r#"{"n":17,"max_tokens":1}"#);
        assert_eq!(param, "n");
        // products that overflow u64 are over any ceiling
        let huge = ceiling(u64::MAX, OverMaxTokens::Reject);
        let (_, param, _) = refused(&huge, r#"{"max_tokens":2,"n":18446744073709551615}"#);
        assert_eq!(param, "n");
        let (_, param, _) = refused(&huge, r#"{"max_tokens":2,"n":9223372036854775808}"#);
        assert_eq!(param, "max_tokens");
        let clamp = ceiling(u64::MAX, OverMaxTokens::Clamp);
        let (_, param, _) = refused(&clamp, r#"{"n":9223372036854775808,"prompt":["a","b"]}"#);
        assert_eq!(param, "n");
        // an overflowing product is still refused
        let (_, param, message) = refused(&reject, r#"{"n":2,"max_tokens":18446744073709551615}"#);
        assert_eq!(param, "max_tokens");
        assert!(
            message.contains("36893488147419103230 tokens in all"),
            "{message}"
        );
    }

    #[test]
    fn the_written_cap_fits_llama_servers_int32() {
        for mode in [OverMaxTokens::Clamp, OverMaxTokens::Reject] {
            let huge = ceiling(u64::MAX, mode);
            assert_eq!(send(&huge, "{}"), Ok(Some(MAX_WRITTEN_TOKENS)));
            assert_eq!(
                send(&huge, r#"{"n":2}"#).ok(),
                if mode == OverMaxTokens::Clamp {
                    Some(Some(MAX_WRITTEN_TOKENS))
                } else {
                    None
                }
            );
        }
    }

    /// The bypasses this ceiling had, end to end through `body::rewrite`.
    #[test]
    fn known_bypasses_are_closed() {
        use crate::openai::body::{self, InsertAs, Rewrite};
        let clamp = ceiling(16, OverMaxTokens::Clamp);
        for (json, insert_as, expected) in [
            (
                r#"{"model":"m","input":"hi","max_output_tokens":100000}"#,
                InsertAs::MaxOutputTokens,
                r#"{"model":"m","input":"hi","max_output_tokens":16}"#,
            ),
            (
                r#"{"model":"m","messages":[],"n":8}"#,
                InsertAs::MaxTokens,
                r#"{"max_tokens":2,"model":"m","messages":[],"n":8}"#,
            ),
            (
                r#"{"model":"m","messages":[],"best_of":8,"max_tokens":16}"#,
                InsertAs::MaxTokens,
                r#"{"model":"m","messages":[],"best_of":8,"max_tokens":2}"#,
            ),
            (
                r#"{"model":"m","prompt":["a","b","c","d"],"max_tokens":16}"#,
                InsertAs::MaxTokens,
                r#"{"model":"m","prompt":["a","b","c","d"],"max_tokens":4}"#,
            ),
            (
                r#"{"model":"m","messages":[],"n_predict":5}"#,
                InsertAs::AnthropicMaxTokens,
                r#"{"max_tokens":16,"model":"m","messages":[],"n_predict":5}"#,
            ),
        ] {
            let info = body(json);
            let cap = max_tokens_to_send(&clamp, &info).unwrap();
            let rw = Rewrite {
                upstream_model: "m",
                max_tokens: cap,
                insert_as,
            };
            let out = body::rewrite(bytes::Bytes::from(json.to_string()), &info, &rw);
            assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
        }
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
            assert_eq!(
                l.admit("alice", t0).unwrap_err().reason,
                LimitReason::KeyRate
            );
        }
        assert_eq!(l.global_in_flight.load(Ordering::SeqCst), 0);
    }
}
