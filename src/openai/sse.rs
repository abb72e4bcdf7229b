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
//! llama-server speaks three dialects ([`Dialect`]), all read into the same
//! [`ResponseStats`], so the same generation gives the same counts, the same
//! content events and the same end whichever route asked for it. As
//! llama-server b11434 writes them:
//!
//! - OpenAI (`/v1/chat/completions`, `/v1/completions`): `data: {"choices":
//!   [...]}` chunks, usage (with `stream_options.include_usage`) and
//!   `timings` on the last chunk, then `data: [DONE]`. An error mid-stream is
//!   `data: {"error":{...}}`.
//! - Responses (`/v1/responses`): `event: <type>` + `data: {"type":"<type>",
//!   ...}`. Content is `response.output_text.delta` (also
//!   `response.reasoning_text.delta`, `response.function_call_arguments.delta`:
//!   any `response.*.delta` with a non-empty `delta`). The stream ends with
//!   `response.completed`, whose `response.usage` has `input_tokens` (the
//!   whole prompt), `output_tokens` and `input_tokens_details.cached_tokens`,
//!   and whose `data` has llama.cpp's `timings`; there is no `[DONE]`. An
//!   error mid-stream is written as in the OpenAI dialect, `data:
//!   {"error":{...}}` without an `event:` line. A non-streamed reply is
//!   `{"object":"response",...,"usage":{...}}` (no `timings`).
//! - Anthropic (`/v1/messages`): `event: <type>` + `data: {"type":"<type>",
//!   ...}`. `message_start` has `message.usage` with `input_tokens` (the
//!   prompt *without* its cached part) and `cache_read_input_tokens`;
//!   content is `content_block_delta` (`text_delta`, `thinking_delta`,
//!   `input_json_delta`: all generated tokens; not `signature_delta`);
//!   `message_delta` has `usage.output_tokens`; `message_stop` ends the
//!   stream; there is no `[DONE]` and no `timings`. An error mid-stream is
//!   `event: error` + `data: {"code":500,"message":"...","type":"server_error"}`
//!   (llama.cpp's error object, whose `type` is not `"error"`: the `event:`
//!   line is what says so). A non-streamed reply is `{"type":"message",...,
//!   "usage":{...}}`.
//!
//! In every dialect a content event is one that carries generated text of
//! any kind: answer text, reasoning text or tool-call arguments (in the
//! OpenAI dialect `delta.content`, `delta.reasoning_content`, a
//! `delta.tool_calls` entry with `function.arguments`, or a completion's
//! `text`). An event that only opens a block, names a tool or closes
//! something is not one.
//!
//! Most events of a stream are token deltas that carry neither `usage`,
//! `timings`, `error` nor a `finish_reason`: for those only "has content"
//! matters. In the OpenAI dialect, a small validating scanner
//! ([`quick_content`]) answers that without serde; it accepts only events
//! that serde certainly parses with that result, and hands everything else
//! (the final event, errors, anything unusual) to the full parse.
//! [`fast_path_agrees`] is the oracle the property tests and the fuzzer hold
//! it to; the request path never runs it. The other two dialects always take
//! the full parse.
//!
//! One cohesive thing, longer than most files: the scanner, its three
//! dialects' wire shapes and the accounting they feed belong together (the
//! fast path is in `fast.rs`, the tests in `tests.rs`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::policy::routes::Dialect;

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
    /// Time spent on the prompt and on generation: the GPU time the ledger
    /// records.
    #[serde(default)]
    pub prompt_ms: f64,
    #[serde(default)]
    pub predicted_ms: f64,
}

/// Token usage, in the OpenAI dialect's terms: the other dialects' usage is
/// converted to it (`prompt_tokens` is the whole prompt, cached part included).
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
    /// The dialect's own word for why generation stopped: OpenAI's
    /// `finish_reason`, Anthropic's `stop_reason`, the Responses API's
    /// `status` of the response in its final event.
    pub finish_reason: Option<String>,
    /// The stream said it is complete: `data: [DONE]`, `response.completed`
    /// (or `response.incomplete`), `message_stop`.
    pub saw_done: bool,
    /// The stream reported an error of its own: an `error` member, an
    /// `error` event, `response.failed`.
    pub saw_error: bool,
    pub malformed: u64,
    /// Anthropic's usage as read so far (it comes in two events); boxed,
    /// so the other dialects' scanners do not carry it.
    anthropic: Option<Box<AnthropicUsage>>,
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
        // A cut Anthropic stream may have told its prompt (`message_start`)
        // but not yet its output.
        let anthropic = self.anthropic.as_deref().copied().unwrap_or_default();
        TokenCounts {
            prompt: anthropic.prompt(),
            completion: self.content_events,
            cached: anthropic.cache_read.unwrap_or(0),
        }
    }

    /// Share of the prompt served from llama.cpp's prompt cache: from
    /// `timings`, else (the Anthropic dialect has none) from the usage.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let Some(t) = self.timings else {
            let u = self.usage?;
            let cached = u.prompt_tokens_details?.cached_tokens;
            let total = u.prompt_tokens;
            // Upstream numbers: keep the ratio in 0..=1 whatever they say.
            return (total > 0).then(|| cached.min(total) as f64 / total as f64);
        };
        // Saturating, so `cache_n <= total` still holds and the ratio stays in 0..=1.
        let total = t.prompt_n.saturating_add(t.cache_n);
        (total > 0).then(|| t.cache_n as f64 / total as f64)
    }

    /// Reads one stream event (a `data:` payload, `event` the type its
    /// `event:` line gave, if any); returns whether it carried content (a
    /// delta, counted in `content_events`).
    fn absorb(&mut self, dialect: Dialect, event: Option<EventType>, payload: &[u8]) -> bool {
        self.events += 1;
        let quick = match dialect {
            Dialect::OpenAi => quick_content(payload),
            Dialect::Responses | Dialect::Anthropic => None,
        };
        let has_content = match quick {
            Some(has_content) => has_content,
            None => self.absorb_full(dialect, event, payload),
        };
        if has_content {
            self.content_events += 1;
        }
        has_content
    }

    /// The full parse of one JSON document in `dialect`: records everything
    /// but the counts (`events`, `content_events` are the caller's); returns
    /// whether it carried content.
    fn absorb_full(&mut self, dialect: Dialect, event: Option<EventType>, payload: &[u8]) -> bool {
        match dialect {
            Dialect::OpenAi => self.absorb_parsed(payload),
            Dialect::Responses => self.absorb_responses(event, payload),
            Dialect::Anthropic => self.absorb_anthropic(event, payload),
        }
    }

    /// The full parse of one OpenAI-dialect JSON document: records everything
    /// but the counts (`events`, `content_events` are the caller's); returns
    /// whether it carried content.
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

    /// `payload` as a `T`, or `None` after counting it malformed (an
    /// `event:` line still says how the stream ends).
    fn parse_event<'a, T: Deserialize<'a>>(
        &mut self,
        line_type: Option<EventType>,
        payload: &'a [u8],
    ) -> Option<T> {
        let parsed = serde_json::from_slice(payload).ok();
        if parsed.is_none() {
            self.malformed += 1;
            self.end_by_type(line_type);
        }
        parsed
    }

    /// One Responses API event (or a whole non-streamed response).
    fn absorb_responses(&mut self, line_type: Option<EventType>, payload: &[u8]) -> bool {
        let Some(event) = self.parse_event::<ResponsesEvent>(line_type, payload) else {
            return false;
        };
        let kind = EventType::effective(line_type, event.kind.as_deref());
        self.end_by_type(kind);
        if event.error.is_some() {
            self.saw_error = true;
        }
        let (usage, status) = match event.response {
            Some(r) => (event.usage.or(r.usage), r.status.or(event.status)),
            None => (event.usage, event.status),
        };
        if let Some(u) = usage {
            self.usage = Some(u.into());
        }
        if event.timings.is_some() {
            self.timings = event.timings;
        }
        if status.is_some() && (kind.is_some_and(EventType::is_final) || event.usage.is_some()) {
            self.finish_reason = status;
        }
        kind == Some(EventType::OutputDelta) && is_text(event.delta)
    }

    /// One Anthropic Messages event (or a whole non-streamed message).
    fn absorb_anthropic(&mut self, line_type: Option<EventType>, payload: &[u8]) -> bool {
        let Some(event) = self.parse_event::<AnthropicEvent>(line_type, payload) else {
            return false;
        };
        let kind = EventType::effective(line_type, event.kind.as_deref());
        self.end_by_type(kind);
        if event.error.is_some() {
            self.saw_error = true;
        }
        let message = event
            .message
            .and_then(|m| serde_json::from_str::<AnthropicMessage>(m.get()).ok());
        if let Some(u) = message.and_then(|m| m.usage) {
            // `message_start`: its `output_tokens` is a placeholder (0).
            self.anthropic.get_or_insert_default().merge(u, false);
        }
        if let Some(u) = event.usage {
            self.anthropic.get_or_insert_default().merge(u, true);
        }
        if let Some(a) = self.anthropic.as_deref().filter(|a| a.output.is_some()) {
            self.usage = Some(a.usage());
        }
        if event.timings.is_some() {
            self.timings = event.timings;
        }
        let delta = event.delta.unwrap_or_default();
        if let Some(reason) = delta.stop_reason.or(event.stop_reason) {
            self.finish_reason = Some(reason);
        }
        kind == Some(EventType::ContentBlockDelta)
            && (is_text(delta.text) || is_text(delta.thinking) || is_text(delta.partial_json))
    }

    /// What an event's type alone says about the end of the stream.
    fn end_by_type(&mut self, kind: Option<EventType>) {
        match kind {
            Some(EventType::Error | EventType::ResponseFailed) => self.saw_error = true,
            Some(EventType::ResponseCompleted | EventType::MessageStop) => self.saw_done = true,
            _ => {}
        }
    }
}

/// Whether a value read as `Option<&RawValue>` is generated text: present,
/// not null, not `""`.
fn is_text(value: Option<&RawValue>) -> bool {
    value.is_some_and(|c| !matches!(c.get(), "null" | "\"\""))
}

/// The event types the accounting acts on, from an `event:` line or a
/// payload's `type` (the same names in both places).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    /// `error`: both dialects (and the Responses API's spelling of it).
    Error,
    /// Responses: `response.<anything>.delta`, generated output.
    OutputDelta,
    /// Responses: `response.completed`, and `response.incomplete` (it also
    /// tells the client how the reply ends: cut short, with a reason).
    ResponseCompleted,
    /// Responses: `response.failed`.
    ResponseFailed,
    /// Anthropic: `content_block_delta`.
    ContentBlockDelta,
    /// Anthropic: `message_stop`.
    MessageStop,
    /// Any other type (`message_start` and `message_delta` are read by
    /// their members, not their names).
    Other,
}

impl EventType {
    fn of(name: &[u8]) -> EventType {
        match name {
            b"error" => EventType::Error,
            b"response.completed" | b"response.incomplete" => EventType::ResponseCompleted,
            b"response.failed" => EventType::ResponseFailed,
            b"content_block_delta" => EventType::ContentBlockDelta,
            b"message_stop" => EventType::MessageStop,
            _ if name.starts_with(b"response.") && name.ends_with(b".delta") => {
                EventType::OutputDelta
            }
            _ => EventType::Other,
        }
    }

    /// The type of an event from its `event:` line and its payload's `type`:
    /// `error` in either place wins, then a type the line names, then the
    /// payload's. (llama.cpp's Anthropic error event is `event: error` with
    /// a payload whose `type` is the error's kind, e.g. `"server_error"`.)
    fn effective(line: Option<EventType>, payload: Option<&str>) -> Option<EventType> {
        let payload = payload.map(|t| EventType::of(t.as_bytes()));
        match (line, payload) {
            (Some(EventType::Error), _) | (_, Some(EventType::Error)) => Some(EventType::Error),
            (Some(l), _) if l != EventType::Other => Some(l),
            (l, None) => l,
            (_, p) => p,
        }
    }

    fn is_final(self) -> bool {
        matches!(
            self,
            EventType::ResponseCompleted | EventType::ResponseFailed
        )
    }
}

// ---------------------------------------------------------------------------
// The OpenAI dialect's full parse

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
    #[serde(borrow, default)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

impl Choice<'_> {
    fn has_content(&self) -> bool {
        let generated = self.delta.as_ref().is_some_and(|d| {
            is_text(d.reasoning_content) || d.tool_calls.is_some_and(tool_call_arguments)
        });
        generated || is_text(self.delta.as_ref().and_then(|d| d.content).or(self.text))
    }
}

/// Whether a `delta.tool_calls` value streams some arguments: an array with
/// an entry whose `function.arguments` is text. Any other shape is no content
/// (and not an error: the event's other members still count).
fn tool_call_arguments(tool_calls: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct ToolCall<'a> {
        #[serde(borrow, default)]
        function: Option<Function<'a>>,
    }
    #[derive(Deserialize)]
    struct Function<'a> {
        #[serde(borrow, default)]
        arguments: Option<&'a RawValue>,
    }
    serde_json::from_str::<Vec<ToolCall>>(tool_calls.get()).is_ok_and(|calls| {
        calls
            .iter()
            .any(|c| c.function.as_ref().is_some_and(|f| is_text(f.arguments)))
    })
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
// The Responses API's and Anthropic's full parse

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    /// The response object of `response.created`, `response.completed`, ...
    #[serde(default)]
    response: Option<ResponseObject>,
    /// A non-streamed response's usage.
    #[serde(default)]
    usage: Option<ResponsesUsage>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    usage: Option<ResponsesUsage>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_tokens_details: Option<PromptDetails>,
}

impl From<ResponsesUsage> for Usage {
    fn from(u: ResponsesUsage) -> Usage {
        Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            prompt_tokens_details: u.input_tokens_details,
        }
    }
}

#[derive(Deserialize)]
struct AnthropicEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// `content_block_delta`'s text, or `message_delta`'s stop reason.
    #[serde(borrow, default)]
    delta: Option<AnthropicDelta<'a>>,
    /// `message_start`'s message (read when it is an object: in llama.cpp's
    /// error event `message` is the error's text).
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    /// `message_delta`'s usage, or a non-streamed message's.
    #[serde(default)]
    usage: Option<AnthropicUsageWire>,
    /// A non-streamed message's stop reason.
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Default, Deserialize)]
struct AnthropicDelta<'a> {
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow, default)]
    partial_json: Option<&'a RawValue>,
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct AnthropicMessage {
    #[serde(default)]
    usage: Option<AnthropicUsageWire>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct AnthropicUsageWire {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

/// Anthropic's usage as read so far: `message_start` tells the prompt,
/// `message_delta` the output (and may repeat the prompt's counts; the
/// later value of a count wins).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AnthropicUsage {
    /// The prompt tokens that were neither read from nor written to the cache.
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    output: Option<u64>,
}

impl AnthropicUsage {
    fn merge(&mut self, u: AnthropicUsageWire, with_output: bool) {
        self.input = u.input_tokens.or(self.input);
        self.cache_read = u.cache_read_input_tokens.or(self.cache_read);
        self.cache_creation = u.cache_creation_input_tokens.or(self.cache_creation);
        if with_output {
            self.output = u.output_tokens.or(self.output);
        }
    }

    /// The whole prompt: Anthropic's `input_tokens` leaves out the cached part.
    fn prompt(&self) -> u64 {
        // Upstream numbers: saturate rather than overflow.
        self.input
            .unwrap_or(0)
            .saturating_add(self.cache_read.unwrap_or(0))
            .saturating_add(self.cache_creation.unwrap_or(0))
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt(),
            completion_tokens: self.output.unwrap_or(0),
            prompt_tokens_details: self
                .cache_read
                .map(|cached_tokens| PromptDetails { cached_tokens }),
        }
    }
}

/// Incremental SSE reader.
#[derive(Debug)]
pub struct SseScanner {
    carry: Vec<u8>,
    overflowed: bool,
    dialect: Dialect,
    /// The type named by the `event:` line of the event being read, until
    /// the blank line that ends it.
    event: Option<EventType>,
    pub stats: ResponseStats,
}

impl Default for SseScanner {
    fn default() -> SseScanner {
        SseScanner::for_dialect(Dialect::OpenAi)
    }
}

impl SseScanner {
    /// A reader of an OpenAI-dialect stream.
    pub fn new() -> SseScanner {
        SseScanner::default()
    }

    pub fn for_dialect(dialect: Dialect) -> SseScanner {
        SseScanner {
            carry: Vec::new(),
            overflowed: false,
            dialect,
            event: None,
            stats: ResponseStats::default(),
        }
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
            let mut line_state = LineState {
                stats: &mut self.stats,
                dialect: self.dialect,
                event: &mut self.event,
            };
            let has_content = if self.carry.is_empty() {
                line_state.absorb_line(line_part)
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(line_part);
                let has_content = line_state.absorb_line(&line);
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

/// What reading one line needs of the scanner (all of it but the carry).
struct LineState<'s> {
    stats: &'s mut ResponseStats,
    dialect: Dialect,
    event: &'s mut Option<EventType>,
}

impl LineState<'_> {
    fn absorb_line(&mut self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            if line.is_empty() {
                *self.event = None; // the blank line that ends an event
            } else if let Some(name) = line.strip_prefix(b"event:") {
                let name = name.strip_prefix(b" ").unwrap_or(name);
                *self.event = Some(EventType::of(name));
            }
            return false; // comment (":" ping), event:, id:, retry:
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.stats.saw_done = true;
            return false;
        }
        self.stats.absorb(self.dialect, *self.event, data)
    }
}

/// Collects a non-streaming JSON body (bounded) to read its usage at the end.
#[derive(Debug)]
pub struct JsonCollector {
    body: Vec<u8>,
    /// A body handed over whole ([`Accounting::feed_whole`]), read at once
    /// rather than copied for later.
    parsed: Option<ResponseStats>,
    too_big: bool,
    dialect: Dialect,
}

impl Default for JsonCollector {
    /// A collector of an OpenAI-dialect body.
    fn default() -> JsonCollector {
        JsonCollector::for_dialect(Dialect::OpenAi)
    }
}

impl JsonCollector {
    pub fn for_dialect(dialect: Dialect) -> JsonCollector {
        JsonCollector {
            body: Vec::new(),
            parsed: None,
            too_big: false,
            dialect,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.parsed.take().is_some() {
            // More after a whole body: no longer one JSON document.
            self.too_big = true;
        }
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

    /// Takes `body` as the whole response: read now, not copied for later.
    fn feed_whole(&mut self, body: &[u8]) {
        if self.too_big || !self.body.is_empty() || self.parsed.is_some() {
            self.feed(body);
        } else if body.len() > MAX_JSON_BODY {
            self.too_big = true;
        } else {
            self.parsed = Some(Self::read(self.dialect, body));
        }
    }

    pub fn finish(self) -> ResponseStats {
        match self.parsed {
            Some(stats) => stats,
            None if self.too_big => ResponseStats::default(),
            None => Self::read(self.dialect, &self.body),
        }
    }

    fn read(dialect: Dialect, body: &[u8]) -> ResponseStats {
        let mut stats = ResponseStats::default();
        if !body.is_empty() {
            // A whole response, not a delta: straight to the full parse.
            // One message, not a delta: `content_events` stays 0.
            stats.events += 1;
            stats.absorb_full(dialect, None, body);
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
    /// The reader for a response of a route that speaks `dialect`: an SSE
    /// stream, a JSON body, or nothing to read.
    pub fn for_dialect(dialect: Dialect, is_sse: bool, content_type: &str) -> Accounting {
        if is_sse {
            Accounting::Sse(SseScanner::for_dialect(dialect))
        } else if content_type
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
        {
            Accounting::Json(JsonCollector::for_dialect(dialect))
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

    /// [`Accounting::feed`] for a body that is complete: a JSON collector
    /// reads it at once instead of keeping a copy.
    pub fn feed_whole(&mut self, body: &[u8]) -> u64 {
        match self {
            Accounting::Json(collector) => {
                collector.feed_whole(body);
                0
            }
            other => other.feed(body),
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

mod fast;
#[cfg(test)]
mod tests;

pub use fast::fast_path_agrees;
use fast::quick_content;
