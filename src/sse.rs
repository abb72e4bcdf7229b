//! Side-channel reading of llama-server responses for accounting.
//!
//! The relay forwards every byte untouched; this module only *reads* copies
//! of the chunks as they pass. Chunk boundaries are not event boundaries, so
//! the scanner carries a partial line over to the next chunk (which also
//! reassembles UTF-8 split across chunks). Token counts come from `usage`
//! when present, else from llama.cpp's `timings` (its `prompt_n` excludes the
//! cached part, so prompt = `prompt_n + cache_n`), else from a count of
//! content deltas.

use serde::Deserialize;
use serde_json::value::RawValue;

/// A partial line longer than this is dropped rather than buffered.
const MAX_CARRY: usize = 1 << 20;
/// Non-streaming bodies larger than this are not parsed for usage.
const MAX_JSON_BODY: usize = 4 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Timings {
    #[serde(default)]
    pub cache_n: u64,
    #[serde(default)]
    pub prompt_n: u64,
    #[serde(default)]
    pub prompt_per_second: Option<f64>,
    #[serde(default)]
    pub predicted_n: u64,
    #[serde(default)]
    pub predicted_per_second: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: u64,
}

/// What one response told us.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseStats {
    pub events: u64,
    pub content_events: u64,
    pub usage: Option<Usage>,
    pub timings: Option<Timings>,
    pub finish_reason: Option<String>,
    pub saw_done: bool,
    pub saw_error: bool,
    pub malformed: u64,
}

/// Token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl ResponseStats {
    pub fn tokens(&self) -> TokenCounts {
        if let Some(u) = self.usage {
            let cached = u
                .prompt_tokens_details
                .map(|d| d.cached_tokens)
                .or(self.timings.map(|t| t.cache_n))
                .unwrap_or(0);
            return TokenCounts {
                prompt: u.prompt_tokens,
                completion: u.completion_tokens,
                cached,
            };
        }
        if let Some(t) = self.timings {
            return TokenCounts {
                prompt: t.prompt_n + t.cache_n,
                completion: t.predicted_n,
                cached: t.cache_n,
            };
        }
        TokenCounts {
            prompt: 0,
            completion: self.content_events,
            cached: 0,
        }
    }

    /// Share of the prompt served from llama.cpp's prompt cache.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let t = self.timings?;
        let total = t.prompt_n + t.cache_n;
        (total > 0).then(|| t.cache_n as f64 / total as f64)
    }

    fn absorb(&mut self, payload: &[u8]) -> bool {
        self.events += 1;
        let event: Event = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(_) => {
                self.malformed += 1;
                return false;
            }
        };
        if event.error.is_some() {
            self.saw_error = true;
        }
        if event.usage.is_some() {
            self.usage = event.usage;
        }
        if event.timings.is_some() {
            self.timings = event.timings;
        }
        let mut has_content = false;
        for choice in event.choices.unwrap_or_default() {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
            let content = choice.delta.and_then(|d| d.content).or(choice.text);
            if content.is_some_and(|c| !matches!(c.get(), "null" | "\"\"")) {
                has_content = true;
            }
        }
        if has_content {
            self.content_events += 1;
        }
        has_content
    }
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// Incremental SSE reader.
#[derive(Debug, Default)]
pub struct SseScanner {
    carry: Vec<u8>,
    overflowed: bool,
    pub stats: ResponseStats,
}

impl SseScanner {
    pub fn new() -> SseScanner {
        SseScanner::default()
    }

    /// Reads one chunk; returns how many events in it carried generated content.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        let mut content = 0;
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line_part, after) = rest.split_at(nl);
            rest = &after[1..];
            if self.overflowed {
                self.overflowed = false;
                self.carry.clear();
                continue;
            }
            let has_content = if self.carry.is_empty() {
                absorb_line(&mut self.stats, line_part)
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(line_part);
                let has_content = absorb_line(&mut self.stats, &line);
                line.clear();
                self.carry = line;
                has_content
            };
            if has_content {
                content += 1;
            }
        }
        if !rest.is_empty() && !self.overflowed {
            if self.carry.len() + rest.len() > MAX_CARRY {
                self.carry.clear();
                self.overflowed = true;
                self.stats.malformed += 1;
            } else {
                self.carry.extend_from_slice(rest);
            }
        }
        content
    }
}

fn absorb_line(stats: &mut ResponseStats, line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return false; // blank separator, comment (":" ping), event:, id:
    };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data == b"[DONE]" {
        stats.saw_done = true;
        return false;
    }
    stats.absorb(data)
}

/// Collects a non-streaming JSON body (bounded) to read its usage at the end.
#[derive(Debug, Default)]
pub struct JsonCollector {
    body: Vec<u8>,
    too_big: bool,
}

impl JsonCollector {
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.too_big {
            return;
        }
        if self.body.len() + chunk.len() > MAX_JSON_BODY {
            self.too_big = true;
            self.body = Vec::new();
        } else {
            self.body.extend_from_slice(chunk);
        }
    }

    pub fn finish(self) -> ResponseStats {
        let mut stats = ResponseStats::default();
        if !self.too_big && !self.body.is_empty() {
            stats.absorb(&self.body);
            // A non-streamed reply is one message: its content is not a delta count.
            stats.content_events = 0;
        }
        stats
    }
}

/// The side-channel reader chosen for one response.
#[derive(Debug, Default)]
pub enum Accounting {
    #[default]
    Off,
    Sse(SseScanner),
    Json(JsonCollector),
}

impl Accounting {
    pub fn for_response(is_sse: bool, content_type: &str) -> Accounting {
        if is_sse {
            Accounting::Sse(SseScanner::new())
        } else if content_type.to_ascii_lowercase().contains("json") {
            Accounting::Json(JsonCollector::default())
        } else {
            Accounting::Off
        }
    }

    /// Reads a chunk on its way to the client; returns the number of
    /// content-bearing stream events in it.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        match self {
            Accounting::Off => 0,
            Accounting::Sse(scanner) => scanner.feed(chunk),
            Accounting::Json(collector) => {
                collector.feed(chunk);
                0
            }
        }
    }

    /// What was seen, however the response ended (a cut stream included).
    pub fn finish(&mut self) -> Option<ResponseStats> {
        match std::mem::take(self) {
            Accounting::Off => None,
            Accounting::Sse(scanner) => Some(scanner.stats),
            Accounting::Json(collector) => Some(collector.finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded llama.cpp b11434 chat stream (3 tokens, the last with a split emoji).
    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
        ":\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"lo \"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"wörld 🦙\"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\",\"timings\":{\"cache_n\":4,\"prompt_n\":6,\"prompt_ms\":1.0,\"prompt_per_token_ms\":0.1,\"prompt_per_second\":6000.0,\"predicted_n\":3,\"predicted_ms\":2.0,\"predicted_per_token_ms\":0.6,\"predicted_per_second\":1500.0}}\n\n",
        "data: [DONE]\n\n",
    );

    fn scan_whole(s: &[u8]) -> (ResponseStats, u64) {
        let mut sc = SseScanner::new();
        let n = sc.feed(s);
        (sc.stats, n)
    }

    #[test]
    fn reads_a_llama_stream() {
        let (stats, content) = scan_whole(STREAM.as_bytes());
        assert_eq!(content, 3);
        assert!(stats.saw_done);
        assert_eq!(stats.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            stats.tokens(),
            TokenCounts {
                prompt: 10,
                completion: 3,
                cached: 4
            }
        );
        assert_eq!(stats.cache_hit_ratio(), Some(0.4));
        assert_eq!(stats.malformed, 0);
    }

    #[test]
    fn every_split_point_gives_the_same_counts() {
        let bytes = STREAM.as_bytes();
        let (expected, _) = scan_whole(bytes);
        for split in 0..=bytes.len() {
            let mut sc = SseScanner::new();
            let n = sc.feed(&bytes[..split]) + sc.feed(&bytes[split..]);
            assert_eq!(n, 3, "split at {split}");
            assert_eq!(sc.stats, expected, "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_and_three_way_splits() {
        let bytes = STREAM.as_bytes();
        let (expected, _) = scan_whole(bytes);
        let mut sc = SseScanner::new();
        for b in bytes {
            sc.feed(std::slice::from_ref(b));
        }
        assert_eq!(sc.stats, expected);
        for a in (0..bytes.len()).step_by(7) {
            for b in (a..bytes.len()).step_by(13) {
                let mut sc = SseScanner::new();
                sc.feed(&bytes[..a]);
                sc.feed(&bytes[a..b]);
                sc.feed(&bytes[b..]);
                assert_eq!(sc.stats, expected, "{a} {b}");
            }
        }
    }

    #[test]
    fn usage_wins_over_timings() {
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":1,\"prompt_tokens\":9,\"total_tokens\":10},\"timings\":{\"cache_n\":2,\"prompt_n\":7,\"predicted_n\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        let (stats, _) = scan_whole(s.as_bytes());
        assert_eq!(
            stats.tokens(),
            TokenCounts {
                prompt: 9,
                completion: 1,
                cached: 2
            }
        );
    }

    #[test]
    fn without_usage_or_timings_content_deltas_are_counted() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n";
        let (stats, n) = scan_whole(s.as_bytes());
        assert_eq!(n, 2);
        assert_eq!(stats.tokens().completion, 2);
        assert!(!stats.saw_done, "a cut stream");
    }

    #[test]
    fn malformed_lines_do_not_panic() {
        for junk in [
            &b"data: {not json}\n\n"[..],
            b"data: \xff\xfe\n\n",
            b"data:\n\n",
            b"data: {\"choices\":\"x\"}\n",
            b"data: {\"choices\":[{\"delta\":7}]}\n",
            b"\n\n\n\r\n",
            b"event: x\nid: 1\nretry: 5\n",
        ] {
            let (stats, n) = scan_whole(junk);
            assert_eq!(n, 0);
            assert!(stats.tokens().completion == 0);
        }
    }

    #[test]
    fn error_events_are_noticed() {
        let (stats, _) = scan_whole(b"data: {\"error\":{\"message\":\"x\"}}\n\n");
        assert!(stats.saw_error);
    }

    #[test]
    fn an_endless_line_is_bounded() {
        let mut sc = SseScanner::new();
        let big = vec![b'a'; 600 * 1024];
        sc.feed(b"data: ");
        sc.feed(&big);
        sc.feed(&big);
        assert!(sc.carry.len() <= MAX_CARRY);
        sc.feed(b"\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        assert_eq!(sc.stats.content_events, 1);
    }

    #[test]
    fn non_streaming_usage() {
        let mut c = JsonCollector::default();
        let body = br#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"completion_tokens":8,"prompt_tokens":5,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":3}},"timings":{"cache_n":3,"prompt_n":2,"predicted_n":8,"prompt_per_second":100.0,"predicted_per_second":50.0}}"#;
        c.feed(&body[..10]);
        c.feed(&body[10..]);
        let stats = c.finish();
        assert_eq!(
            stats.tokens(),
            TokenCounts {
                prompt: 5,
                completion: 8,
                cached: 3
            }
        );
        assert_eq!(stats.timings.unwrap().predicted_per_second, Some(50.0));
    }
}
