//! Request-body inspection and the byte-exact `model` rewrite.
//!
//! The gateway must route and authorize on the JSON `model` field, then hand
//! llama-server the name it expects. Re-serialising the body would reorder
//! keys, change number formatting and cost a full parse of prompts that can be
//! tens of MiB, so instead we find the exact byte span of the top-level
//! `model` value and splice the new name in; every other byte stays as the
//! client sent it.
//!
//! The same scan finds what sets how much llama-server generates, so a key's
//! token ceiling can be enforced by splicing too. What llama-server (b11434)
//! reads, by field and place in its source (`tools/server/`):
//!
//! - `n_predict`, then its aliases `max_completion_tokens` and `max_tokens`:
//!   the first that is present and not null is the generation length
//!   (`server-schema.cpp`, `make_llama_cmpl_schema`, field `n_predict`; read as
//!   an `int32_t` with nlohmann's conversions: `7.5` is 7, `true` is 1, `-1`
//!   is unlimited). Chat, completions and Responses bodies reach it with every
//!   member copied (`oaicompat_chat_params_parse` in `server-common.cpp`).
//! - `max_output_tokens`: the Responses API's length, renamed to `max_tokens`
//!   (`server-chat.cpp`, `server_chat_convert_responses_to_chatcmpl`).
//! - `max_tokens` on Anthropic Messages: the only member the converter keeps
//!   as a length, 4096 when absent (`server-chat.cpp`,
//!   `server_chat_convert_anthropic_to_oai`; it drops `n`, `n_predict`, ...).
//! - `n_cmpl`, then its alias `n`: generations per prompt, 1 to the slot count
//!   (`make_llama_cmpl_schema`, field `n_cmpl`; child tasks in
//!   `handle_completions_impl`, `server-context.cpp`).
//! - `prompt` on `/v1/completions`: an array with no integer element is one
//!   prompt per element, each generating `n_cmpl` times (`server-common.cpp`,
//!   `tokenize_input_prompts`; an array holding an integer is one tokenized
//!   prompt). Chat-style routes replace `prompt` with the rendered messages.
//! - `best_of` is read nowhere; it is counted anyway (OpenAI defines it as a
//!   number of generations).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::errors::ApiError;

/// What the gateway needs to know about a JSON request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBody {
    /// The top-level `model`, unescaped, with the byte span of its JSON value.
    pub model: Option<ModelField>,
    /// `"stream": true` at the top level.
    pub stream: bool,
    /// Whether the top-level object has any member at all.
    pub has_members: bool,
    /// Top-level generation-length fields (`max_tokens`, ...), in body order.
    pub token_limits: Vec<TokenLimitField>,
    /// Top-level fields that multiply the generation (`n`, `n_cmpl`,
    /// `best_of`, `prompt`), in body order, repeats included.
    pub multipliers: Vec<Multiplier>,
    /// How many generations the body can start: the number of prompts times
    /// the largest of `n`, `n_cmpl` and `best_of` (1 by default, saturating;
    /// `u64::MAX` when a multiplier's count is unreadable). Counted on every
    /// route, though only `/v1/completions` splits `prompt` and the Anthropic
    /// converter drops `n`: counting more only lowers the cap.
    pub choices: u64,
    /// Byte offset of the opening `{`.
    object_start: usize,
}

/// A field that caps how many tokens llama-server generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimitField {
    pub name: &'static str,
    /// `None` when absent as a positive integer (e.g. llama.cpp's `-1`: unlimited).
    pub value: Option<u64>,
    pub span: Range<usize>,
}

/// Names llama-server reads as the generation limit (see the module docs).
const TOKEN_LIMIT_FIELDS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
];

/// Names whose value is a number of generations per prompt.
const CHOICE_FIELDS: [&str; 3] = ["n", "n_cmpl", "best_of"];

/// A field that multiplies how many generations llama-server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multiplier {
    /// `n`, `n_cmpl`, `best_of` or `prompt`.
    pub name: &'static str,
    /// Generations it asks for: at least 1 (values llama-server refuses, such
    /// as `0`, `"8"` or `false`, count 1); `None` when it is a number
    /// llama-server could read as any count (negative, which can wrap into
    /// range, or a non-integer beyond `i32`), which the gateway cannot check.
    pub count: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelField {
    pub name: String,
    pub span: Range<usize>,
}

/// Parses `body` far enough to find the top-level `model` and `stream`,
/// checking that the whole body is one well-formed JSON object.
pub fn inspect(body: &[u8]) -> Result<RequestBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidRequest(
            "the request body is empty; send a JSON object such as {\"model\": ..., \"messages\": [...]}"
                .into(),
        ));
    }
    // JSON text is UTF-8 (RFC 8259 section 8.1). The visitor below skips most
    // values without decoding them, so check the whole body here: a body that
    // is not UTF-8 must not reach llama-server. After this check serde_json
    // reads the text without validating each string again.
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "the request body is not valid JSON: it is not UTF-8 text (invalid byte sequence at byte offset {}); send the JSON encoded as UTF-8",
            e.valid_up_to()
        ))
    })?;
    let object_start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let mut de = serde_json::Deserializer::from_str(text);
    let scan = de
        .deserialize_map(TopLevelVisitor {
            base: body.as_ptr() as usize,
        })
        .and_then(|scan| de.end().map(|()| scan))
        .map_err(|e| ApiError::InvalidRequest(describe_json_error(&e)))?;
    if scan.model_count > 1 {
        return Err(ApiError::InvalidParam {
            param: "model".into(),
            message: "the request body has more than one top-level \"model\" key; send exactly one"
                .into(),
        });
    }
    let model = match scan.model {
        None => None,
        Some(span) => {
            let raw = &body[span.clone()];
            let name =
                serde_json::from_slice::<String>(raw).map_err(|_| ApiError::InvalidParam {
                    param: "model".into(),
                    message: format!(
                        "\"model\" must be a string, got {}",
                        truncate(&String::from_utf8_lossy(raw), 40)
                    ),
                })?;
            Some(ModelField { name, span })
        }
    };
    let token_limits = scan
        .token_limits
        .into_iter()
        .map(|(name, span)| TokenLimitField {
            name,
            value: serde_json::from_slice::<u64>(&body[span.clone()]).ok(),
            span,
        })
        .collect();
    let choices = choices(&scan.multipliers);
    Ok(RequestBody {
        model,
        stream: scan.stream,
        has_members: scan.members > 0,
        token_limits,
        multipliers: scan.multipliers,
        choices,
        object_start,
    })
}

/// Prompts times generations per prompt; `u64::MAX` for an unreadable count.
fn choices(multipliers: &[Multiplier]) -> u64 {
    let (mut prompts, mut per_prompt) = (1u64, 1u64);
    for m in multipliers {
        let Some(count) = m.count else {
            return u64::MAX;
        };
        // Repeated keys: llama-server keeps the last, any of them is counted.
        // `n` and `n_cmpl` are one parameter; `best_of` is OpenAI's total of
        // candidates (at least `n`), so the largest of them is the count.
        if m.name == "prompt" {
            prompts = prompts.max(count);
        } else {
            per_prompt = per_prompt.max(count);
        }
    }
    prompts.saturating_mul(per_prompt)
}

/// The count llama-server reads from an `n`-like value (an `int32_t` through
/// nlohmann's conversions: floats truncate, `true` is 1, large integers wrap).
fn choice_count(raw: &str) -> Option<u64> {
    match raw.as_bytes().first() {
        // null is absent; strings, arrays, objects are refused ("type must
        // be number"); booleans are 0 or 1.
        Some(b'n' | b't' | b'f' | b'"' | b'[' | b'{') | None => Some(1),
        // Refused below 1, but a large negative integer wraps into range.
        Some(b'-') => None,
        Some(_) => {
            if let Ok(n) = raw.parse::<u64>() {
                // Wrapping only makes the count llama-server uses smaller.
                return Some(n.max(1));
            }
            let f = raw.parse::<f64>().ok()?;
            // Beyond i32 the float-to-int conversion is undefined.
            (f < 2_147_483_648.0).then(|| (f as u64).max(1))
        }
    }
}

/// How many prompts llama-server makes of a `prompt` value (see
/// `tokenize_input_prompts`): an array without integer elements is one
/// prompt per element; anything else is one.
fn prompt_count(raw: &str) -> Option<u64> {
    if !raw.starts_with('[') {
        return Some(1);
    }
    serde_json::from_str::<PromptCount>(raw).ok().map(|p| p.0)
}

struct PromptCount(u64);

impl<'de> serde::Deserialize<'de> for PromptCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(PromptCountVisitor)
    }
}

struct PromptCountVisitor;

impl<'de> Visitor<'de> for PromptCountVisitor {
    type Value = PromptCount;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<PromptCount, A::Error> {
        let mut elements = 0u64;
        let mut has_integer = false;
        while let Some(e) = seq.next_element::<&'de RawValue>()? {
            elements += 1;
            has_integer |= is_json_integer(e.get());
        }
        // An empty array is refused ("prompt" must not be empty).
        Ok(PromptCount(if has_integer { 1 } else { elements.max(1) }))
    }
}

/// Whether nlohmann's parser makes `raw` an integer (`is_number_integer`):
/// digits only, within `i64` when negative and `u64` otherwise. `-0` is
/// left out: when unsure, an element is not an integer, which counts more
/// prompts, never fewer.
fn is_json_integer(raw: &str) -> bool {
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, raw),
    };
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && if negative {
            raw.parse::<i64>().is_ok_and(|n| n != 0)
        } else {
            raw.parse::<u64>().is_ok()
        }
}

impl RequestBody {
    /// The largest generation length the body asks for; `None`: unlimited.
    pub fn requested_max_tokens(&self) -> Option<u64> {
        if self.token_limits.is_empty() || self.token_limits.iter().any(|f| f.value.is_none()) {
            return None;
        }
        self.token_limits.iter().filter_map(|f| f.value).max()
    }
}

/// The generation-length field a route's dialect inserts when the body sets
/// none that llama-server reads on that route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertAs {
    /// `max_tokens`: OpenAI chat completions and completions, where
    /// llama-server also reads `max_completion_tokens` and `n_predict`.
    MaxTokens,
    /// `max_tokens` on Anthropic Messages: llama-server's converter keeps no
    /// other length (and asks for 4096 tokens without one).
    AnthropicMaxTokens,
    /// `max_output_tokens`: the Responses API, whose converter also passes
    /// `max_tokens`, `max_completion_tokens` and `n_predict` through.
    MaxOutputTokens,
}

impl InsertAs {
    /// The name inserted.
    pub fn field(self) -> &'static str {
        match self {
            InsertAs::MaxTokens | InsertAs::AnthropicMaxTokens => "max_tokens",
            InsertAs::MaxOutputTokens => "max_output_tokens",
        }
    }

    /// The names llama-server takes the generation length from on this
    /// route: when the body has one (capped), nothing is inserted.
    pub fn read_by_upstream(self) -> &'static [&'static str] {
        match self {
            InsertAs::MaxTokens => &["max_tokens", "max_completion_tokens", "n_predict"],
            InsertAs::AnthropicMaxTokens => &["max_tokens"],
            InsertAs::MaxOutputTokens => &[
                "max_output_tokens",
                "max_tokens",
                "max_completion_tokens",
                "n_predict",
            ],
        }
    }
}

/// What to change in a body on its way upstream.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    pub upstream_model: &'a str,
    /// Cap every generation-length field at this value, inserting
    /// `insert_as` when the body has no length llama-server reads there.
    /// `None` for routes that do not generate.
    pub max_tokens: Option<u64>,
    /// Which length field the route's dialect inserts.
    pub insert_as: InsertAs,
}

/// One change to a body: `span`'s bytes replaced by `text` (an empty span
/// at the object start inserts).
struct Edit {
    span: Range<usize>,
    text: Text,
}

/// What an edit writes, rendered straight into the result (and once into a
/// counter, for the result's exact size).
#[derive(Clone, Copy)]
enum Text {
    /// The upstream model name, as a JSON string.
    Model,
    /// The token cap.
    Cap,
    /// Inserted members (`"model":...`, then the cap's field), with a comma
    /// after them when the object already had members.
    Members { model: bool, cap: bool, comma: bool },
}

impl Text {
    /// Writes the edit's bytes. Nothing here can fail (serializing a `&str`,
    /// writers that never refuse bytes), so a rewrite is never skipped.
    fn render(self, w: &mut impl std::io::Write, rw: &Rewrite, cap: u64) {
        let _ = self.write(w, rw, cap);
    }

    fn write(self, w: &mut impl std::io::Write, rw: &Rewrite, cap: u64) -> std::io::Result<()> {
        match self {
            Text::Model => serde_json::to_writer(&mut *w, rw.upstream_model)?,
            Text::Cap => write!(w, "{cap}")?,
            Text::Members {
                model,
                cap: with_cap,
                comma,
            } => {
                if model {
                    w.write_all(b"\"model\":")?;
                    serde_json::to_writer(&mut *w, rw.upstream_model)?;
                }
                if with_cap {
                    if model {
                        w.write_all(b",")?;
                    }
                    write!(w, "\"{}\":{cap}", rw.insert_as.field())?;
                }
                if comma {
                    w.write_all(b",")?;
                }
            }
        }
        Ok(())
    }

    /// How many bytes [`Text::render`] writes.
    fn len(self, rw: &Rewrite, cap: u64) -> usize {
        let mut count = super::ByteCount(0);
        self.render(&mut count, rw, cap);
        count.0
    }
}

/// Applies `rw` by splicing bytes; every other byte stays as the client sent it.
/// Nothing is allocated but the result (the edits are rendered into it).
pub fn rewrite(body: Bytes, info: &RequestBody, rw: &Rewrite) -> Bytes {
    let mut edits: smallvec::SmallVec<[Edit; 4]> = smallvec::SmallVec::new();
    let mut insert_model = false;
    match &info.model {
        // Compare decoded names: `"m\u0061"` already is `ma` and stays as sent.
        Some(field) if field.name != rw.upstream_model => edits.push(Edit {
            span: field.span.clone(),
            text: Text::Model,
        }),
        Some(_) => {}
        None => insert_model = true,
    }
    let mut insert_cap = false;
    let cap = rw.max_tokens.unwrap_or(0);
    if rw.max_tokens.is_some() {
        let read = rw.insert_as.read_by_upstream();
        insert_cap = !info.token_limits.iter().any(|f| read.contains(&f.name));
        for field in &info.token_limits {
            if field.value.is_none_or(|v| v > cap) {
                edits.push(Edit {
                    span: field.span.clone(),
                    text: Text::Cap,
                });
            }
        }
    }
    if insert_model || insert_cap {
        let at = info.object_start + 1;
        edits.push(Edit {
            span: at..at,
            text: Text::Members {
                model: insert_model,
                cap: insert_cap,
                comma: info.has_members,
            },
        });
    }
    if edits.is_empty() {
        return body;
    }
    edits.sort_by_key(|e| e.span.start);
    let size = edits.iter().fold(body.len(), |size, e| {
        size + e.text.len(rw, cap) - e.span.len()
    });
    // Exactly as long as the result: a full `Vec` becomes `Bytes` without
    // a second allocation for its shared header.
    let mut out = Vec::with_capacity(size);
    let mut pos = 0;
    for e in &edits {
        out.extend_from_slice(&body[pos..e.span.start]);
        e.text.render(&mut out, rw, cap);
        pos = e.span.end;
    }
    out.extend_from_slice(&body[pos..]);
    debug_assert_eq!(out.len(), size);
    Bytes::from(out)
}

/// Returns `body` with the top-level `model` value replaced by `upstream_name`
/// (or inserted first when the client sent none).
pub fn rewrite_model(body: Bytes, info: &RequestBody, upstream_name: &str) -> Bytes {
    rewrite(
        body,
        info,
        &Rewrite {
            upstream_model: upstream_name,
            max_tokens: None,
            insert_as: InsertAs::MaxTokens,
        },
    )
}

fn describe_json_error(e: &serde_json::Error) -> String {
    if e.is_data() && e.to_string().contains("expected a JSON object") {
        return "the request body must be a JSON object".into();
    }
    format!("the request body is not valid JSON: {e}")
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

struct Scan {
    token_limits: Vec<(&'static str, Range<usize>)>,
    multipliers: Vec<Multiplier>,
    model: Option<Range<usize>>,
    model_count: usize,
    stream: bool,
    members: usize,
}

struct TopLevelVisitor {
    base: usize,
}

/// A member name, borrowed from the body unless it has escapes (serde's own
/// `Cow<str>` always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = Scan;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan, A::Error> {
        let mut scan = Scan {
            token_limits: Vec::new(),
            multipliers: Vec::new(),
            model: None,
            model_count: 0,
            stream: false,
            members: 0,
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            scan.members += 1;
            match key.as_ref() {
                "model" => {
                    let raw: &'de RawValue = map.next_value()?;
                    // RawValue borrows from the input slice, so its address gives the span.
                    let start = raw.get().as_ptr() as usize - self.base;
                    scan.model = Some(start..start + raw.get().len());
                    scan.model_count += 1;
                }
                name if TOKEN_LIMIT_FIELDS.contains(&name) => {
                    let raw: &'de RawValue = map.next_value()?;
                    let start = raw.get().as_ptr() as usize - self.base;
                    let field = TOKEN_LIMIT_FIELDS
                        .iter()
                        .find(|f| **f == name)
                        .copied()
                        .unwrap_or("max_tokens");
                    scan.token_limits
                        .push((field, start..start + raw.get().len()));
                }
                name if CHOICE_FIELDS.contains(&name) || name == "prompt" => {
                    let raw: &'de RawValue = map.next_value()?;
                    let (name, count) = match CHOICE_FIELDS.iter().find(|f| **f == name) {
                        Some(field) => (*field, choice_count(raw.get())),
                        None => ("prompt", prompt_count(raw.get())),
                    };
                    scan.multipliers.push(Multiplier { name, count });
                }
                "stream" => {
                    let raw: &'de RawValue = map.next_value()?;
                    scan.stream = raw.get() == "true";
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(scan)
    }
}

#[cfg(test)]
mod tests;
