//! Side-channel reading of llama-server responses for accounting.
//!
//! The relay forwards every byte untouched; this module only *reads* copies
//! of the chunks as they pass. Chunk boundaries are not event boundaries, so
//! the scanner carries a partial line over to the next chunk (which also
//! reassembles UTF-8 split across chunks). Token counts come from `usage`
//! when present, else from llama.cpp's `timings` (its `prompt_n` excludes the
//! cached part, so prompt = `prompt_n + cache_n`), else from a count of
//! content deltas.
//!
//! Most events of a stream are token deltas that carry neither `usage`,
//! `timings`, `error` nor a `finish_reason`: for those only "has content"
//! matters. A small validating scanner ([`quick_content`]) answers that
//! without serde; it accepts only events that serde certainly parses with
//! that result, and hands everything else (the final event, errors, anything
//! unusual) to the full parse. [`fast_path_agrees`] is the oracle the
//! property tests and the fuzzer hold it to; the request path never runs it.

use std::fmt;

use serde::de::{Deserializer, SeqAccess, Visitor};
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
                // Upstream numbers: saturate rather than overflow.
                prompt: t.prompt_n.saturating_add(t.cache_n),
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
        // Saturating, so `cache_n <= total` still holds and the ratio stays in 0..=1.
        let total = t.prompt_n.saturating_add(t.cache_n);
        (total > 0).then(|| t.cache_n as f64 / total as f64)
    }

    /// Reads one stream event (a `data:` payload); returns whether it carried
    /// content (a delta, counted in `content_events`).
    fn absorb(&mut self, payload: &[u8]) -> bool {
        self.events += 1;
        let has_content = match quick_content(payload) {
            Some(has_content) => has_content,
            None => self.absorb_parsed(payload),
        };
        if has_content {
            self.content_events += 1;
        }
        has_content
    }

    /// The full parse of one JSON document: records everything but the
    /// counts (`events`, `content_events` are the caller's); returns whether
    /// it carried content.
    fn absorb_parsed(&mut self, payload: &[u8]) -> bool {
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
        let choices = event.choices.unwrap_or_default();
        if choices.finish_reason.is_some() {
            self.finish_reason = choices.finish_reason;
        }
        choices.has_content
    }
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(default)]
    choices: Option<Choices>,
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

impl Choice<'_> {
    fn has_content(&self) -> bool {
        let content = self.delta.as_ref().and_then(|d| d.content).or(self.text);
        content.is_some_and(|c| !matches!(c.get(), "null" | "\"\""))
    }
}

/// What the event's `choices` array says, folded while it is read (the same
/// elements, errors and order as a `Vec<Choice>`, without allocating one).
#[derive(Default)]
struct Choices {
    has_content: bool,
    /// The last non-null `finish_reason`.
    finish_reason: Option<String>,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoicesVisitor;

        impl<'de> Visitor<'de> for ChoicesVisitor {
            type Value = Choices;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut out = Choices::default();
                while let Some(choice) = seq.next_element::<Choice<'de>>()? {
                    out.has_content |= choice.has_content();
                    if choice.finish_reason.is_some() {
                        out.finish_reason = choice.finish_reason;
                    }
                }
                Ok(out)
            }
        }

        deserializer.deserialize_seq(ChoicesVisitor)
    }
}

// ---------------------------------------------------------------------------
// The fast path

/// Whether the fast path, where it decides `payload` (one `data:` payload),
/// decides it as the full parse would: the same "has content" and nothing
/// else recorded. For tests and fuzzing.
pub fn fast_path_agrees(payload: &[u8]) -> bool {
    let Some(has_content) = quick_content(payload) else {
        return true;
    };
    let mut full = ResponseStats::default();
    let full_content = full.absorb_parsed(payload);
    full_content == has_content && full == ResponseStats::default()
}

/// Nesting the fast path follows inside a value it skips; deeper events take
/// the full parse.
const QUICK_MAX_DEPTH: u32 = 16;

/// Whether the stream event `payload` carries content, decided without serde,
/// or `None` when the full parse must decide.
///
/// `Some` only for a payload that `serde_json::from_slice::<Event>` certainly
/// parses, with no `usage`, `timings` or `error` and every `finish_reason`
/// null or absent: then "has content" is the event's only effect. It checks
/// the whole payload: valid UTF-8, JSON syntax as strict as serde_json's,
/// one top-level object, `choices` null or an array of objects, `delta` null
/// or an object. It gives up (`None`) on whatever it does not need to handle:
/// keys of those objects spelled with escapes, duplicate known keys (a serde
/// error), deep nesting, a non-null `finish_reason`, any `usage`, `timings`
/// or `error` key.
fn quick_content(payload: &[u8]) -> Option<bool> {
    std::str::from_utf8(payload).ok()?;
    let mut q = Quick { b: payload, i: 0 };
    if q.peek()? != b'{' {
        return None;
    }
    q.i += 1;
    let mut has_content = false;
    let mut seen_choices = false;
    let mut first = true;
    while let Some(key) = q.next_key(&mut first, true)? {
        match key {
            b"choices" => {
                if std::mem::replace(&mut seen_choices, true) {
                    return None;
                }
                has_content = q.choices()?;
            }
            b"usage" | b"timings" | b"error" => return None,
            _ => q.skip_value(QUICK_MAX_DEPTH)?,
        }
    }
    if q.peek().is_some() {
        return None; // trailing characters
    }
    Some(has_content)
}

/// A cursor over one JSON payload. Every method returns `None` as soon as the
/// input is malformed or outside what the fast path handles.
struct Quick<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Quick<'a> {
    /// The next byte after JSON whitespace (not consumed); `None` at the end.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Inside an object: the next member's key (raw, between the quotes) with
    /// its `:` consumed, or `Some(None)` after the closing `}`. With `plain`,
    /// a key containing an escape gives up (it may spell a known name).
    fn next_key(&mut self, first: &mut bool, plain: bool) -> Option<Option<&'a [u8]>> {
        let mut c = self.peek()?;
        if c == b'}' {
            self.i += 1;
            return Some(None);
        }
        if !*first {
            if c != b',' {
                return None;
            }
            self.i += 1;
            c = self.peek()?;
        }
        *first = false;
        if c != b'"' {
            return None;
        }
        self.i += 1;
        let (key, escaped) = self.string()?;
        if plain && escaped {
            return None;
        }
        if self.peek()? != b':' {
            return None;
        }
        self.i += 1;
        Some(Some(key))
    }

    /// Inside an array: whether an element follows (not consumed); `false`
    /// after the closing `]`.
    fn next_element(&mut self, first: &mut bool) -> Option<bool> {
        let c = self.peek()?;
        if c == b']' {
            self.i += 1;
            return Some(false);
        }
        if !*first {
            if c != b',' {
                return None;
            }
            self.i += 1;
        }
        *first = false;
        Some(true)
    }

    /// After an opening quote: the string's raw bytes and whether it has an
    /// escape. Rejects what serde_json rejects: control characters, unknown
    /// escapes, `\u` without four hex digits, a missing closing quote.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i;
        let mut escaped = false;
        loop {
            self.skip_plain();
            let c = *self.b.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return Some((&self.b[start..self.i - 1], escaped)),
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.b.get(self.i + 1..self.i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    /// Inside a string: advances to the next `"`, `\` or control character
    /// (or the end), eight bytes at a time. The same word trick as
    /// serde_json's: in each word, the lowest flagged byte is exactly the
    /// first such byte (borrows only carry into higher bytes).
    fn skip_plain(&mut self) {
        const ONES: u64 = u64::MAX / 255;
        const HIGH: u64 = ONES << 7;
        while let Some(word) = self.b.get(self.i..self.i + 8) {
            let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
            let control = x.wrapping_sub(ONES * 0x20) & !x;
            let q = x ^ (ONES * u64::from(b'"'));
            let quote = q.wrapping_sub(ONES) & !q;
            let bs = x ^ (ONES * u64::from(b'\\'));
            let backslash = bs.wrapping_sub(ONES) & !bs;
            let found = (control | quote | backslash) & HIGH;
            if found != 0 {
                self.i += found.trailing_zeros() as usize / 8;
                return;
            }
            self.i += 8;
        }
        while self
            .b
            .get(self.i)
            .is_some_and(|&c| c != b'"' && c != b'\\' && c >= 0x20)
        {
            self.i += 1;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    /// A number, by JSON's grammar (serde_json checks no range for a value it skips).
    fn number(&mut self) -> Option<()> {
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match *self.b.get(self.i)? {
            b'0' => {
                self.i += 1;
                if self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// Skips one value, checking it; `depth` bounds its nesting.
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string()?;
            }
            b'{' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                let mut first = true;
                while self.next_key(&mut first, false)?.is_some() {
                    self.skip_value(depth)?;
                }
            }
            b'[' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                let mut first = true;
                while self.next_element(&mut first)? {
                    self.skip_value(depth)?;
                }
            }
            b'n' => self.literal(b"null")?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(())
    }

    /// Skips a value that serde reads as `Option<&RawValue>`: `None` for
    /// null, else whether it counts as content (anything but `""`).
    fn raw_content(&mut self) -> Option<Option<bool>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        let start = self.i;
        self.skip_value(QUICK_MAX_DEPTH)?;
        Some(Some(&self.b[start..self.i] != b"\"\""))
    }

    /// The value of `choices`: null, or an array of choice objects.
    fn choices(&mut self) -> Option<bool> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                return Some(false);
            }
            b'[' => self.i += 1,
            _ => return None,
        }
        let mut has_content = false;
        let mut first = true;
        while self.next_element(&mut first)? {
            has_content |= self.choice()?;
        }
        Some(has_content)
    }

    /// One choice object: whether it has content (`delta.content`, else `text`).
    fn choice(&mut self) -> Option<bool> {
        if self.peek()? != b'{' {
            return None; // serde also reads a struct from an array: leave that to it
        }
        self.i += 1;
        let (mut delta, mut text) = (None, None);
        let (mut seen_delta, mut seen_text, mut seen_finish) = (false, false, false);
        let mut first = true;
        while let Some(key) = self.next_key(&mut first, true)? {
            match key {
                b"delta" => {
                    if std::mem::replace(&mut seen_delta, true) {
                        return None;
                    }
                    delta = self.delta()?;
                }
                b"text" => {
                    if std::mem::replace(&mut seen_text, true) {
                        return None;
                    }
                    text = self.raw_content()?;
                }
                b"finish_reason" => {
                    if std::mem::replace(&mut seen_finish, true) {
                        return None;
                    }
                    if self.peek()? != b'n' {
                        return None; // a reason: the full parse records it
                    }
                    self.literal(b"null")?;
                }
                _ => self.skip_value(QUICK_MAX_DEPTH)?,
            }
        }
        Some(delta.or(text) == Some(true))
    }

    /// The value of `delta`: `None` for null or no `content`, else whether
    /// `content` counts as content.
    fn delta(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                return Some(None);
            }
            b'{' => self.i += 1,
            _ => return None,
        }
        let mut content = None;
        let mut seen_content = false;
        let mut first = true;
        while let Some(key) = self.next_key(&mut first, true)? {
            if key == b"content" {
                if std::mem::replace(&mut seen_content, true) {
                    return None;
                }
                content = self.raw_content()?;
            } else {
                self.skip_value(QUICK_MAX_DEPTH)?;
            }
        }
        Some(content)
    }
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
        while let Some(nl) = memchr::memchr(b'\n', rest) {
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
            // A whole response, not a delta: straight to the full parse.
            // One message, not a delta: `content_events` stays 0.
            stats.events += 1;
            stats.absorb_parsed(&self.body);
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
    fn sums_of_huge_timings_saturate() {
        let (stats, _) = scan_whole(b"data: {\"choices\":[],\"timings\":{\"cache_n\":18446744073709551615,\"prompt_n\":5}}\n\n");
        assert_eq!(stats.tokens().prompt, u64::MAX);
        assert_eq!(stats.tokens().cached, u64::MAX);
        assert_eq!(stats.cache_hit_ratio(), Some(1.0));
    }

    /// What the fast path decides itself (`Some`) and what it leaves to serde.
    /// Every case also goes through `absorb`, which (in this debug build)
    /// checks the fast path against the full parse.
    #[test]
    fn the_fast_path_decides_only_plain_events() {
        let cases: &[(&str, Option<bool>)] = &[
            (
                r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hel"}}],"id":"c"}"#,
                Some(true),
            ),
            (
                r#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#,
                Some(false),
            ),
            (r#"{"choices":[{"delta":{"content":""}}]}"#, Some(false)),
            (r#"{"choices":[{"delta":{"content":" "}}]}"#, Some(true)),
            (r#"{"choices":[{"delta":{"content":{}}}]}"#, Some(true)),
            (r#"{"choices":[{"delta":{}}]}"#, Some(false)),
            (r#"{"choices":[{"delta":null,"text":"b"}]}"#, Some(true)),
            (
                r#"{"choices":[{"delta":{"content":""},"text":"b"}]}"#,
                Some(false),
            ),
            (r#"{"choices":[{"delta":{},"text":"b"}]}"#, Some(true)),
            (r#"{"choices":[{"text":""},{"text":"x"}]}"#, Some(true)),
            (
                r#" { "choices" : [ { "delta" : { "content" : "a\u00e9\n\"" } } ] } "#,
                Some(true),
            ),
            (r#"{"choices":null}"#, Some(false)),
            (r#"{"choices":[]}"#, Some(false)),
            (r#"{}"#, Some(false)),
            (
                r#"{"x":[1,-2.5e-3,0,true,false,null,{"a":[],"\u0041":"\ud800"}]}"#,
                Some(false),
            ),
            (r#"{"\u0041":1}"#, None),
            (
                r#"{"choices":[{"delta":{"content":"🦙"}}],"big":1e400}"#,
                Some(true),
            ),
            // left to serde: effects other than content, or shapes it reads specially
            (r#"{"choices":[{"finish_reason":"stop","delta":{}}]}"#, None),
            (
                r#"{"choices":[{"finish_reason" : "stop","delta":{}}]}"#,
                None,
            ),
            (r#"{"choices":[],"usage":null}"#, None),
            (r#"{"timings":{}}"#, None),
            (r#"{"error":{"message":"x"}}"#, None),
            (r#"{"choices":[{"delta":{"cont\u0065nt":"x"}}]}"#, None),
            (r#"{"choices":[],"choices":[]}"#, None),
            (
                r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
                None,
            ),
            (r#"{"choices":[[null,"x"]]}"#, None),
            (r#"{"choices":[{"delta":[]}]}"#, None),
            (r#"{"choices":{}}"#, None),
            (r#"["x"]"#, None),
            // malformed: the full parse counts them
            ("", None),
            ("{", None),
            (r#"{"choices":[{"delta":{"content":"a"}}]} x"#, None),
            (r#"{"choices":[{"delta":{"content":"a"}},]}"#, None),
            (r#"{"a":01}"#, None),
            (r#"{"a":1.}"#, None),
            (r#"{"a":-}"#, None),
            (r#"{"a":"\x"}"#, None),
            (r#"{"a":"\u12"}"#, None),
            ("{\"a\":\"\u{1}\"}", None),
            (r#"{"a":nul}"#, None),
            (r#"{"a":1,}"#, None),
            (r#"{,"a":1}"#, None),
        ];
        for (payload, expected) in cases {
            assert_eq!(quick_content(payload.as_bytes()), *expected, "{payload}");
            let mut stats = ResponseStats::default();
            let content = stats.absorb(payload.as_bytes());
            if let Some(expected) = expected {
                assert_eq!(content, *expected, "{payload}");
            }
        }
        assert_eq!(quick_content(b"{\"a\":\"\xff\"}"), None);
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
        assert_eq!(quick_content(deep.as_bytes()), None);
        let mut stats = ResponseStats::default();
        assert!(!stats.absorb(deep.as_bytes()));
        assert_eq!(stats.malformed, 0);
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
