//! The stream scan: reads the streaming step's SSE reply incrementally and
//! counts content deltas, sees `data: [DONE]` and error events, and measures
//! the time to the first token and the decode rate. Pure.

use std::time::Duration;

use serde_json::Value;

use super::hints::ErrorInfo;

/// Reads an SSE reply incrementally: content deltas, `[DONE]`, error events.
#[derive(Debug, Default, Clone)]
pub struct StreamScan {
    pending: Vec<u8>,
    /// `data:` lines seen.
    pub events: u64,
    /// Deltas with content (or `reasoning_content`, as thinking models send first).
    pub tokens: u64,
    pub first_token: Option<Duration>,
    pub last_token: Option<Duration>,
    pub done: bool,
    pub error: Option<ErrorInfo>,
    /// `timings.predicted_per_second`, when llama-server's final chunk has it.
    pub upstream_tokens_per_s: Option<f64>,
    /// `data:` lines that were neither JSON nor `[DONE]`.
    pub bad_events: u64,
    pub text: String,
}

impl StreamScan {
    /// Feeds bytes received `at` (since the request was sent).
    pub fn feed(&mut self, bytes: &[u8], at: Duration) {
        self.pending.extend_from_slice(bytes);
        let Some(last_newline) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        for line in complete.split(|&b| b == b'\n') {
            self.line(&String::from_utf8_lossy(line), at);
        }
    }

    /// The end of the body: a last line without a newline still counts.
    pub fn finish(&mut self, at: Duration) {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            self.line(&String::from_utf8_lossy(&rest), at);
        }
    }

    fn line(&mut self, line: &str, at: Duration) {
        let line = line.trim_end_matches('\r');
        let Some(data) = line.strip_prefix("data:") else {
            return;
        };
        let data = data.trim();
        self.events += 1;
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            self.bad_events += 1;
            return;
        };
        if let Some(err) = v.get("error") {
            self.error = Some(ErrorInfo::from_value(err));
            return;
        }
        if let Some(tps) = v
            .pointer("/timings/predicted_per_second")
            .and_then(Value::as_f64)
        {
            self.upstream_tokens_per_s = Some(tps);
        }
        let choices = v.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let delta = choice.get("delta");
            let piece = ["content", "reasoning_content"]
                .iter()
                .filter_map(|k| delta.and_then(|d| d.get(*k)).and_then(Value::as_str))
                .find(|s| !s.is_empty());
            if let Some(piece) = piece {
                self.tokens += 1;
                self.first_token.get_or_insert(at);
                self.last_token = Some(at);
                if self.text.len() < 200 {
                    self.text.push_str(piece);
                }
            }
        }
    }

    /// The decode rate: the deltas after the first over the time from the
    /// first to the last. None with fewer than two deltas, or when they all
    /// arrived at once.
    pub fn tokens_per_s(&self) -> Option<f64> {
        let (first, last) = (self.first_token?, self.last_token?);
        let span = last.checked_sub(first)?.as_secs_f64();
        (self.tokens >= 2 && span > 0.0).then(|| (self.tokens - 1) as f64 / span)
    }

    pub fn generation(&self) -> Option<Duration> {
        self.last_token?.checked_sub(self.first_token?)
    }
}
