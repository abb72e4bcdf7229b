//! The pure side of the shared store: the names of the keys the edges share,
//! the replies of the scripts turned into admissions or refusals, and the
//! back-off of a request waiting for an upstream slot held by another edge.
//! No I/O.

use std::time::Duration;

use crate::labels::LimitReason;
use crate::ledger::{Counts, Row};
use crate::policy::limits::{KeyLimits, Refusal};
use crate::policy::ratelimit::Window;
use crate::policy::tokens::{day_of, month_of, next_month_start};

/// The store keys of one API key's limits. Every key of one API key shares
/// the hash tag `{k:<id>}`, so on Redis Cluster one script touches one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyNames {
    pub rpm: String,
    pub concurrent: String,
    pub tpm: String,
    pub day: String,
    pub month: String,
}

pub fn key_names(prefix: &str, key_id: &str, now_ms: u64) -> KeyNames {
    let tag = format!("{prefix}:{{k:{key_id}}}");
    KeyNames {
        rpm: format!("{tag}:rpm"),
        concurrent: format!("{tag}:conc"),
        tpm: format!("{tag}:tpm"),
        day: format!("{tag}:day:{}", day_of(now_ms)),
        month: format!("{tag}:month:{}", month_of(now_ms).0),
    }
}

/// The leases of one upstream's slots (by its configured name, which must
/// be the same on every edge).
pub fn slot_key(prefix: &str, upstream: &str) -> String {
    format!("{prefix}:{{u:{upstream}}}:slots")
}

/// The fleet's ledger: one hash per UTC hour, a field per key, model and
/// counter (summed by every edge's flushes with HINCRBY).
pub fn usage_key(prefix: &str, hour: u64) -> String {
    format!("{prefix}:usage:{hour}")
}

/// The marker of one edge's ledger batch `id` (`edge`: the process's
/// random id), set when the batch is applied.
pub fn usage_batch_key(prefix: &str, edge: &str, id: u64) -> String {
    format!("{prefix}:usage-batch:{edge}:{id}")
}

/// How long a batch's marker outlives it: far longer than any retry.
pub const USAGE_BATCH_TTL_S: u64 = 86_400;

/// How long an hour of the fleet's ledger is kept (about 13 months).
pub const USAGE_TTL_S: u64 = 400 * 86_400;

const COUNTERS: [&str; 7] = [
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "errors",
    "cancelled",
    "gpu_ms",
];

fn counter_values(c: &Counts) -> [u64; 7] {
    [
        c.requests,
        c.prompt_tokens,
        c.cached_tokens,
        c.completion_tokens,
        c.errors,
        c.cancelled,
        c.gpu_ms,
    ]
}

/// The `(field, increment)` pairs of one row (zeros left out). Key ids and
/// model names contain no control characters, so a tab separates them.
pub fn usage_fields(row: &Row) -> Vec<(String, u64)> {
    COUNTERS
        .iter()
        .zip(counter_values(&row.counts))
        .filter(|(_, v)| *v > 0)
        .map(|(name, v)| (format!("{}\t{}\t{name}", row.key, row.model), v))
        .collect()
}

/// The rows of one hour's hash (fields it does not know are skipped).
pub fn usage_rows(hour: u64, fields: &[(String, u64)]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for (field, value) in fields {
        let mut parts = field.splitn(3, '\t');
        let (Some(key), Some(model), Some(counter)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(i) = COUNTERS.iter().position(|c| *c == counter) else {
            continue;
        };
        let at = match rows.iter().position(|r| r.key == key && r.model == model) {
            Some(at) => at,
            None => {
                rows.push(Row {
                    key: key.to_string(),
                    model: model.to_string(),
                    hour,
                    counts: Counts::default(),
                });
                rows.len() - 1
            }
        };
        let c = &mut rows[at].counts;
        let slot = [
            &mut c.requests,
            &mut c.prompt_tokens,
            &mut c.cached_tokens,
            &mut c.completion_tokens,
            &mut c.errors,
            &mut c.cancelled,
            &mut c.gpu_ms,
        ];
        *slot[i] += value;
    }
    rows.sort_by(|a, b| (&a.key, &a.model).cmp(&(&b.key, &b.model)));
    rows
}

/// How long the quota counters outlive their period: a day's for two days,
/// a month's for 32 days past the month's first (bounded memory).
pub const DAY_TTL_S: u64 = 2 * 86_400;
pub const MONTH_TTL_S: u64 = 63 * 86_400;

/// `0` for no limit, as the scripts take it.
pub fn arg(limit: Option<u64>) -> u64 {
    limit.unwrap_or(0)
}

/// A requests-per-minute window with `left` requests in a bucket of
/// `limit` refilled over a minute.
pub fn request_window(limit: u64, left: u64) -> Window {
    let limit = limit.max(1);
    let left = left.min(limit);
    Window {
        limit,
        remaining: left,
        reset: Duration::from_millis((limit - left) * 60_000 / limit),
    }
}

/// What `admit.lua` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted {
        requests_left: u64,
        tokens_left: u64,
    },
    Refused(ScriptRefusal),
}

/// A refusal as the script states it: which limit, when to retry, and a
/// number for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptRefusal {
    pub code: i64,
    pub retry_ms: u64,
    pub detail: u64,
}

/// Reads `admit.lua`'s reply; `None` when it is not one.
pub fn verdict(reply: &[i64]) -> Option<Verdict> {
    let [code, a, b] = *reply else {
        return None;
    };
    let (a, b) = (a.max(0) as u64, b.max(0) as u64);
    match code {
        0 => Some(Verdict::Admitted {
            requests_left: a,
            tokens_left: b,
        }),
        1..=5 => Some(Verdict::Refused(ScriptRefusal {
            code,
            retry_ms: a,
            detail: b,
        })),
        _ => None,
    }
}

/// The refusal the client gets, in the words of the local limits, saying
/// the limit holds across every edge.
pub fn refusal(
    r: ScriptRefusal,
    key_id: &str,
    limits: &KeyLimits,
    tokens: u64,
    now_ms: u64,
) -> Refusal {
    const DAY_MS: u64 = 86_400_000;
    let (reason, message, retry_ms) = match r.code {
        1 => (
            LimitReason::KeyConcurrency,
            format!(
                "the API key '{key_id}' already has {} requests in progress across all gateways, its limit; wait for one to finish",
                limits.max_concurrent.unwrap_or_default()
            ),
            r.retry_ms,
        ),
        2 => (
            LimitReason::KeyRate,
            format!(
                "the API key '{key_id}' is over its limit of {} requests per minute (across all gateways)",
                limits.requests_per_minute.unwrap_or_default()
            ),
            r.retry_ms,
        ),
        3 => (
            LimitReason::KeyTokensPerMinute,
            format!(
                "the API key '{key_id}' is over its limit of {} tokens per minute across all gateways (this request reserves {tokens}: its prompt and max_tokens; {} left)",
                limits.tokens.per_minute.unwrap_or_default(),
                r.detail
            ),
            r.retry_ms,
        ),
        4 => (
            LimitReason::KeyTokensPerDay,
            format!(
                "the API key '{key_id}' has used its quota of {} tokens for today (UTC, all gateways; {} used, this request reserves {tokens}); it renews at midnight UTC",
                limits.tokens.per_day.unwrap_or_default(),
                r.detail
            ),
            (day_of(now_ms) + 1) * DAY_MS - now_ms,
        ),
        _ => {
            let first = next_month_start(month_of(now_ms).0) * DAY_MS;
            (
                LimitReason::KeyTokensPerMonth,
                format!(
                    "the API key '{key_id}' has used its quota of {} tokens for this month (UTC, all gateways; {} used, this request reserves {tokens}); it renews on the 1st",
                    limits.tokens.per_month.unwrap_or_default(),
                    r.detail
                ),
                first.saturating_sub(now_ms),
            )
        }
    };
    Refusal {
        reason,
        message,
        retry_after: Duration::from_millis(retry_ms.max(1)),
    }
}

/// The waits between two tries for an upstream slot another edge holds:
/// 5 ms doubling to 50 ms, so a freed slot is taken within 50 ms while an
/// edge polls the store at most 20 times a second per waiting request.
pub fn slot_backoff(attempt: u32) -> Duration {
    Duration::from_millis((5u64 << attempt.min(4)).min(50))
}

/// How many slots of an upstream with `max` this edge may use alone when
/// the store is away and `edges` edges share it: rounded up, at least 1.
pub fn local_slots(max: usize, edges: u32) -> usize {
    max.div_ceil(edges.max(1) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tokens::TokenLimits;

    #[test]
    fn one_hash_tag_per_api_key() {
        let n = key_names("edge", "alice", 0);
        for k in [&n.rpm, &n.concurrent, &n.tpm, &n.day, &n.month] {
            assert!(k.starts_with("edge:{k:alice}:"), "{k}");
        }
        assert_eq!(n.day, "edge:{k:alice}:day:0");
        assert_eq!(n.month, "edge:{k:alice}:month:23640");
        assert_eq!(slot_key("edge", "gpu1"), "edge:{u:gpu1}:slots");
    }

    #[test]
    fn replies_read() {
        assert_eq!(
            verdict(&[0, 5, 100]),
            Some(Verdict::Admitted {
                requests_left: 5,
                tokens_left: 100
            })
        );
        assert_eq!(
            verdict(&[2, 1000, 0]),
            Some(Verdict::Refused(ScriptRefusal {
                code: 2,
                retry_ms: 1000,
                detail: 0
            }))
        );
        assert_eq!(verdict(&[9, 0, 0]), None);
        assert_eq!(verdict(&[0, 0]), None);
    }

    #[test]
    fn refusals_name_the_limit_and_the_fleet() {
        let limits = KeyLimits {
            requests_per_minute: Some(60),
            max_concurrent: Some(2),
            tokens: TokenLimits {
                per_minute: Some(1000),
                per_day: Some(5000),
                per_month: Some(9000),
            },
            ..KeyLimits::default()
        };
        let now = 86_400_000 * 10 + 1000;
        let cases = [
            (1, LimitReason::KeyConcurrency, "2 requests in progress"),
            (2, LimitReason::KeyRate, "60 requests per minute"),
            (3, LimitReason::KeyTokensPerMinute, "1000 tokens per minute"),
            (4, LimitReason::KeyTokensPerDay, "5000 tokens for today"),
            (
                5,
                LimitReason::KeyTokensPerMonth,
                "9000 tokens for this month",
            ),
        ];
        for (code, reason, words) in cases {
            let r = refusal(
                ScriptRefusal {
                    code,
                    retry_ms: 1500,
                    detail: 7,
                },
                "alice",
                &limits,
                300,
                now,
            );
            assert_eq!(r.reason, reason);
            assert!(r.message.contains(words), "{}", r.message);
            assert!(r.message.contains("all gateways"), "{}", r.message);
            assert!(r.retry_after >= Duration::from_millis(1));
        }
        let day = refusal(
            ScriptRefusal {
                code: 4,
                retry_ms: 0,
                detail: 0,
            },
            "a",
            &limits,
            1,
            now,
        );
        assert_eq!(day.retry_after, Duration::from_millis(86_400_000 - 1000));
    }

    #[test]
    fn the_fleets_ledger_round_trips_through_its_hash_fields() {
        let row = Row {
            key: "alice".into(),
            model: "qwen3-30b".into(),
            hour: 7,
            counts: Counts {
                requests: 2,
                prompt_tokens: 30,
                completion_tokens: 12,
                gpu_ms: 900,
                ..Counts::default()
            },
        };
        let fields = usage_fields(&row);
        assert_eq!(fields.len(), 4, "zeros are not written: {fields:?}");
        assert!(fields.contains(&("alice\tqwen3-30b\trequests".to_string(), 2)));
        let mut with_noise = fields.clone();
        with_noise.push(("bob\tsmall\trequests".into(), 1));
        with_noise.push(("garbage".into(), 5));
        with_noise.push(("bob\tsmall\tunknown".into(), 5));
        let rows = usage_rows(7, &with_noise);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], row);
        assert_eq!((rows[1].key.as_str(), rows[1].counts.requests), ("bob", 1));
        assert_eq!(usage_key("edge", 7), "edge:usage:7");
    }

    #[test]
    fn the_fleets_request_window() {
        let w = request_window(60, 45);
        assert_eq!((w.limit, w.remaining), (60, 45));
        assert_eq!(w.reset, Duration::from_secs(15));
        assert_eq!(request_window(60, 99).remaining, 60);
        assert_eq!(request_window(0, 0).limit, 1);
    }

    #[test]
    fn backoff_and_local_share() {
        assert_eq!(slot_backoff(0), Duration::from_millis(5));
        assert_eq!(slot_backoff(1), Duration::from_millis(10));
        assert_eq!(slot_backoff(30), Duration::from_millis(50));
        assert_eq!(local_slots(2, 2), 1);
        assert_eq!(local_slots(5, 2), 3);
        assert_eq!(local_slots(1, 4), 1);
        assert_eq!(local_slots(8, 0), 8);
    }
}
