//! The rate-limit response headers OpenAI and Anthropic clients already
//! read: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, and on
//! `/v1/messages` `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`.
//! Only the limits a key has are stated. Pure: a snapshot in, header pairs out.

use std::time::{Duration, SystemTime};

/// One limit as the headers state it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is whole again.
    pub reset: Duration,
}

/// A key's request and token limits, read when the request was admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitState {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

impl RateLimitState {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// The header pairs in OpenAI's names, or Anthropic's (`anthropic`).
    pub fn headers(&self, anthropic: bool, now: SystemTime) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let windows = [("requests", self.requests), ("tokens", self.tokens)];
        for (what, window) in windows {
            let Some(w) = window else { continue };
            let names: [&'static str; 3] = match (anthropic, what) {
                (false, "requests") => [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
                (false, _) => [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
                (true, "requests") => [
                    "anthropic-ratelimit-requests-limit",
                    "anthropic-ratelimit-requests-remaining",
                    "anthropic-ratelimit-requests-reset",
                ],
                (true, _) => [
                    "anthropic-ratelimit-tokens-limit",
                    "anthropic-ratelimit-tokens-remaining",
                    "anthropic-ratelimit-tokens-reset",
                ],
            };
            let reset = if anthropic {
                // Anthropic states the moment, in RFC 3339.
                let at = now + Duration::from_secs(w.reset.as_secs_f64().ceil() as u64);
                humantime::format_rfc3339_seconds(at).to_string()
            } else {
                openai_duration(w.reset)
            };
            out.push((names[0], w.limit.to_string()));
            out.push((names[1], w.remaining.to_string()));
            out.push((names[2], reset));
        }
        out
    }
}

/// OpenAI's spelling of a wait: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let total = d.as_secs() + u64::from(d.subsec_millis() > 0);
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_spelled_as_openai_does() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn only_the_limits_a_key_has_are_stated_in_the_dialects_names() {
        let state = RateLimitState {
            requests: None,
            tokens: Some(Window {
                limit: 1000,
                remaining: 400,
                reset: Duration::from_millis(36_000),
            }),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let openai = state.headers(false, t);
        assert_eq!(
            openai,
            vec![
                ("x-ratelimit-limit-tokens", "1000".to_string()),
                ("x-ratelimit-remaining-tokens", "400".to_string()),
                ("x-ratelimit-reset-tokens", "36s".to_string()),
            ]
        );
        let anthropic = state.headers(true, t);
        assert_eq!(anthropic[2].0, "anthropic-ratelimit-tokens-reset");
        assert_eq!(anthropic[2].1, "2026-05-28T20:27:16Z");
        assert!(RateLimitState::default().headers(false, t).is_empty());
    }
}
