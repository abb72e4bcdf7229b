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

use bytes::{Bytes, BytesMut};
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

/// Applies `rw` by splicing bytes; every other byte stays as the client sent it.
pub fn rewrite(body: Bytes, info: &RequestBody, rw: &Rewrite) -> Bytes {
    let Ok(model_json) = serde_json::to_string(rw.upstream_model) else {
        return body;
    };
    // (span, replacement) edits; an empty span at the object start inserts.
    let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::new();
    let mut inserted: Vec<String> = Vec::new();
    match &info.model {
        // Compare decoded names: `"m\u0061"` already is `ma` and stays as sent.
        Some(field) if field.name != rw.upstream_model => {
            edits.push((field.span.clone(), model_json.into_bytes()));
        }
        Some(_) => {}
        None => inserted.push(format!("\"model\":{model_json}")),
    }
    if let Some(cap) = rw.max_tokens {
        let read = rw.insert_as.read_by_upstream();
        if !info.token_limits.iter().any(|f| read.contains(&f.name)) {
            inserted.push(format!("\"{}\":{cap}", rw.insert_as.field()));
        }
        for field in &info.token_limits {
            if field.value.is_none_or(|v| v > cap) {
                edits.push((field.span.clone(), cap.to_string().into_bytes()));
            }
        }
    }
    if !inserted.is_empty() {
        let at = info.object_start + 1;
        let mut text = inserted.join(",");
        if info.has_members {
            text.push(',');
        }
        edits.push((at..at, text.into_bytes()));
    }
    if edits.is_empty() {
        return body;
    }
    edits.sort_by_key(|(span, _)| span.start);
    let grow: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + grow);
    let mut pos = 0;
    for (span, replacement) in &edits {
        out.extend_from_slice(&body[pos..span.start]);
        out.extend_from_slice(replacement);
        pos = span.end;
    }
    out.extend_from_slice(&body[pos..]);
    out.freeze()
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
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
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
mod tests {
    use super::*;

    fn rewrite(body: &str, to: &str) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let info = inspect(&bytes).unwrap();
        String::from_utf8(rewrite_model(bytes, &info, to).to_vec()).unwrap()
    }

    #[test]
    fn replaces_only_the_model_value() {
        let body = r#"{ "messages" : [{"role":"user","content":"hi"}],  "model" : "qwen" , "temperature":0.70}"#;
        assert_eq!(
            rewrite(body, "qwen3-30b.gguf"),
            r#"{ "messages" : [{"role":"user","content":"hi"}],  "model" : "qwen3-30b.gguf" , "temperature":0.70}"#
        );
    }

    #[test]
    fn nested_model_keys_are_left_alone() {
        let body = r#"{"tools":[{"model":"x"}],"metadata":{"model":"y"},"model":"a"}"#;
        assert_eq!(
            rewrite(body, "b"),
            r#"{"tools":[{"model":"x"}],"metadata":{"model":"y"},"model":"b"}"#
        );
    }

    #[test]
    fn missing_model_is_inserted() {
        assert_eq!(
            rewrite(r#"{"messages":[]}"#, "m"),
            r#"{"model":"m","messages":[]}"#
        );
        assert_eq!(rewrite("  {}", "m"), r#"  {"model":"m"}"#);
        assert_eq!(rewrite("{ }", "m"), r#"{"model":"m" }"#);
    }

    #[test]
    fn unchanged_name_is_not_copied() {
        let bytes = Bytes::from_static(br#"{"model":"same"}"#);
        let info = inspect(&bytes).unwrap();
        let out = rewrite_model(bytes.clone(), &info, "same");
        assert_eq!(out.as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn escaped_and_unicode_names() {
        let body = r#"{"model":"mod\u00e8le-ü","x":"日本語"}"#;
        let info = inspect(body.as_bytes()).unwrap();
        assert_eq!(info.model.as_ref().unwrap().name, "modèle-ü");
        assert_eq!(rewrite(body, "ñ\"q"), r#"{"model":"ñ\"q","x":"日本語"}"#);
        // an escaped key is still the top-level model key
        let info = inspect(br#"{"mod\u0065l":"a"}"#).unwrap();
        assert_eq!(info.model.unwrap().name, "a");
    }

    #[test]
    fn same_name_spelled_with_escapes_is_left_alone() {
        let bytes = Bytes::from_static(br#"{"model":"m\u0061","messages":[]}"#);
        let info = inspect(&bytes).unwrap();
        let out = rewrite_model(bytes.clone(), &info, "ma");
        assert_eq!(out.as_ptr(), bytes.as_ptr());
        // a different name is still spliced in
        assert_eq!(rewrite(r#"{"model":"m\u0061"}"#, "mb"), r#"{"model":"mb"}"#);
    }

    #[test]
    fn invalid_utf8_anywhere_is_400() {
        for body in [
            &b"{\"messages\":\"R\xff\xfe\"}"[..],
            b"{\"a\":{\"\xc3\":1}}",
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xed\xa0\x80\"}]}",
            b"{\"model\":\"m\"}  \x80",
        ] {
            let err = inspect(body).unwrap_err();
            assert_eq!(err.status(), 400, "{:?}", String::from_utf8_lossy(body));
            assert_eq!(err.code(), "invalid_request");
            assert!(err.to_string().contains("not UTF-8"), "{err}");
        }
        let err = inspect(b"{\"messages\":\"R\xff\"}").unwrap_err();
        assert!(err.to_string().contains("at byte offset 14"), "{err}");
    }

    #[test]
    fn duplicate_model_is_rejected() {
        let err = inspect(br#"{"model":"a","messages":[],"model":"b"}"#).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.param(), Some("model"));
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            &b""[..],
            b"   ",
            b"[1,2]",
            b"\"model\"",
            b"{\"model\":",
            b"{\"model\":\"a\"} trailing",
            b"{\"model\":\"a\"}{}",
            b"\xff\xfe",
            b"{\"model\":\"\xff\"}",
        ] {
            let err = inspect(body).unwrap_err();
            assert_eq!(err.status(), 400, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn non_string_model_is_400_naming_the_param() {
        for body in [
            &br#"{"model":42}"#[..],
            br#"{"model":null}"#,
            br#"{"model":["a"]}"#,
        ] {
            let err = inspect(body).unwrap_err();
            assert_eq!(err.param(), Some("model"));
            assert!(err.to_string().contains("must be a string"));
        }
    }

    #[test]
    fn stream_flag() {
        assert!(inspect(br#"{"stream":true}"#).unwrap().stream);
        assert!(!inspect(br#"{"stream":false}"#).unwrap().stream);
        assert!(!inspect(br#"{"stream":"true"}"#).unwrap().stream);
        assert!(!inspect(br#"{}"#).unwrap().stream);
    }

    fn capped(body: &str, cap: u64) -> String {
        capped_as(body, cap, InsertAs::MaxTokens)
    }

    fn capped_as(body: &str, cap: u64, insert_as: InsertAs) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let info = inspect(&bytes).unwrap();
        let rw = Rewrite {
            upstream_model: "m",
            max_tokens: Some(cap),
            insert_as,
        };
        String::from_utf8(super::rewrite(bytes, &info, &rw).to_vec()).unwrap()
    }

    #[test]
    fn every_length_field_is_read_and_capped() {
        for name in TOKEN_LIMIT_FIELDS {
            let body = format!(r#"{{"model":"m", "{name}" : 5000 ,"x":[1]}}"#);
            let info = inspect(body.as_bytes()).unwrap();
            assert_eq!(info.token_limits.len(), 1, "{name}");
            assert_eq!(info.token_limits[0].name, name);
            assert_eq!(info.requested_max_tokens(), Some(5000), "{name}");
            for insert_as in [
                InsertAs::MaxTokens,
                InsertAs::AnthropicMaxTokens,
                InsertAs::MaxOutputTokens,
            ] {
                let out = capped_as(&body, 16, insert_as);
                let expected = format!(r#"{{"model":"m", "{name}" : 16 ,"x":[1]}}"#);
                if insert_as.read_by_upstream().contains(&name) {
                    assert_eq!(out, expected, "{name} {insert_as:?}");
                } else {
                    // the route does not read this name: its own is inserted too
                    let field = insert_as.field();
                    assert_eq!(
                        out,
                        format!(r#"{{"{field}":16,{}"#, &expected[1..]),
                        "{name} {insert_as:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn insertion_follows_the_dialect() {
        use InsertAs::*;
        let cases: [(&str, InsertAs, &str); 12] = [
            (
                r#"{"model":"m"}"#,
                MaxTokens,
                r#"{"max_tokens":7,"model":"m"}"#,
            ),
            (
                r#"{"model":"m"}"#,
                AnthropicMaxTokens,
                r#"{"max_tokens":7,"model":"m"}"#,
            ),
            (
                r#"{"model":"m"}"#,
                MaxOutputTokens,
                r#"{"max_output_tokens":7,"model":"m"}"#,
            ),
            // chat and completions read the llama.cpp names: nothing to insert
            (
                r#"{"model":"m","n_predict":5}"#,
                MaxTokens,
                r#"{"model":"m","n_predict":5}"#,
            ),
            (
                r#"{"model":"m","max_completion_tokens":-1}"#,
                MaxTokens,
                r#"{"model":"m","max_completion_tokens":7}"#,
            ),
            // ... but not max_output_tokens, which only the Responses converter reads
            (
                r#"{"model":"m","max_output_tokens":5}"#,
                MaxTokens,
                r#"{"max_tokens":7,"model":"m","max_output_tokens":5}"#,
            ),
            // Anthropic: the converter keeps max_tokens only (4096 without it)
            (
                r#"{"model":"m","n_predict":5}"#,
                AnthropicMaxTokens,
                r#"{"max_tokens":7,"model":"m","n_predict":5}"#,
            ),
            (
                r#"{"model":"m","max_tokens":5}"#,
                AnthropicMaxTokens,
                r#"{"model":"m","max_tokens":5}"#,
            ),
            (
                r#"{"model":"m","max_tokens":null}"#,
                AnthropicMaxTokens,
                r#"{"model":"m","max_tokens":7}"#,
            ),
            // Responses: max_tokens and n_predict pass through the converter
            (
                r#"{"model":"m","max_tokens":5}"#,
                MaxOutputTokens,
                r#"{"model":"m","max_tokens":5}"#,
            ),
            (
                r#"{"model":"m","max_output_tokens":100000}"#,
                MaxOutputTokens,
                r#"{"model":"m","max_output_tokens":7}"#,
            ),
            (
                r#"{ }"#,
                MaxOutputTokens,
                r#"{"model":"m","max_output_tokens":7 }"#,
            ),
        ];
        for (body, insert_as, expected) in cases {
            assert_eq!(
                capped_as(body, 7, insert_as),
                expected,
                "{body} {insert_as:?}"
            );
        }
    }

    fn choices_of(body: &str) -> u64 {
        inspect(body.as_bytes()).unwrap().choices
    }

    fn counts(body: &str) -> Vec<(&'static str, Option<u64>)> {
        inspect(body.as_bytes())
            .unwrap()
            .multipliers
            .iter()
            .map(|m| (m.name, m.count))
            .collect()
    }

    #[test]
    fn n_is_read_as_llama_server_reads_it() {
        for (value, count) in [
            ("8", Some(8)),
            ("1", Some(1)),
            ("2.0", Some(2)),
            ("2.9", Some(2)),
            ("1e1", Some(10)),
            ("0", Some(1)),
            ("0.5", Some(1)),
            ("4294967298", Some(4294967298)),
            ("18446744073709551615", Some(u64::MAX)),
            // llama-server refuses these ("type must be number"): one generation at most
            (r#""8""#, Some(1)),
            ("[8]", Some(1)),
            (r#"{"n":8}"#, Some(1)),
            ("true", Some(1)),
            ("false", Some(1)),
            ("null", Some(1)),
            // negative or huge: an int32 cast could land anywhere (-4294967294 is 2)
            ("-1", None),
            ("-4294967294", None),
            ("-0", None),
            ("-2.5", None),
            ("3e9", None),
            ("18446744073709551616", None),
            ("1e400", None),
        ] {
            for name in CHOICE_FIELDS {
                let body = format!(r#"{{"{name}":{value}}}"#);
                assert_eq!(counts(&body), [(name, count)], "{body}");
                let choices = count.unwrap_or(u64::MAX);
                assert_eq!(choices_of(&body), choices, "{body}");
            }
        }
        assert_eq!(counts(r#"{"x":1}"#), []);
        assert_eq!(
            choices_of(r#"{"x":{"n":8},"y":[{"n":8}]}"#),
            1,
            "top level only"
        );
    }

    #[test]
    fn prompt_arrays_are_counted_as_llama_server_splits_them() {
        for (prompt, count) in [
            (r#""one""#, 1),
            (r#"["a","b","c"]"#, 3),
            (r#"["a"]"#, 1),
            (r#"[[1,2],[3,4],[5]]"#, 3),
            (r#"[[1,"a"],"b"]"#, 2),
            (r#"[{"prompt_string":"a"},"b"]"#, 2),
            // an array holding an integer is one (tokenized or mixed) prompt
            (r#"[1,2,3]"#, 1),
            (r#"["a",1,"b"]"#, 1),
            (r#"["a",-5,"b"]"#, 1),
            // floats are not integers to nlohmann: elements again
            (r#"[1.5,"a"]"#, 2),
            (r#"[1e2,2.0,"x"]"#, 3),
            (r#"[18446744073709551616,"x"]"#, 2),
            // when unsure (-0), more prompts rather than fewer
            (r#"[-0,"x"]"#, 2),
            ("[]", 1),
            (r#"{"prompt_string":"a"}"#, 1),
            ("42", 1),
            ("1e400", 1),
            ("null", 1),
        ] {
            let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
            assert_eq!(counts(&body), [("prompt", Some(count))], "{body}");
            assert_eq!(choices_of(&body), count, "{body}");
        }
    }

    #[test]
    fn multipliers_combine() {
        // prompts multiply the generations per prompt
        assert_eq!(choices_of(r#"{"prompt":["a","b","c"],"n":4}"#), 12);
        assert_eq!(choices_of(r#"{"n_cmpl":2,"prompt":[[1],[2]]}"#), 4);
        // n and n_cmpl are one parameter, best_of includes n: the largest
        assert_eq!(choices_of(r#"{"n":2,"n_cmpl":3}"#), 3);
        assert_eq!(choices_of(r#"{"n_cmpl":null,"n":5}"#), 5);
        assert_eq!(choices_of(r#"{"n":2,"best_of":6}"#), 6);
        assert_eq!(choices_of(r#"{"best_of":2,"n":3}"#), 3);
        // a repeated key counts with its largest value (llama-server keeps the last)
        assert_eq!(choices_of(r#"{"n":8,"n":1}"#), 8);
        assert_eq!(choices_of(r#"{"prompt":["a","b"],"prompt":"c"}"#), 2);
        // saturates; an unreadable count is u64::MAX
        assert_eq!(
            choices_of(r#"{"n":18446744073709551615,"prompt":["a","b"]}"#),
            u64::MAX
        );
        assert_eq!(choices_of(r#"{"n":-3,"prompt":["a","b"]}"#), u64::MAX);
        assert_eq!(choices_of(r#"{"model":"m"}"#), 1);
    }

    #[test]
    fn multipliers_and_other_bytes_are_left_as_sent() {
        let body = "{\"n\" : 4,\r\n \"model\":\"a\",\"prompt\":[\"x\",\"y\"],\t\"best_of\":2.0,\"max_tokens\": 900 ,\"n_predict\":1e3,\"temperature\":0.70}";
        let info = inspect(body.as_bytes()).unwrap();
        assert_eq!(info.choices, 8);
        assert_eq!(
            capped(body, 2),
            "{\"n\" : 4,\r\n \"model\":\"m\",\"prompt\":[\"x\",\"y\"],\t\"best_of\":2.0,\"max_tokens\": 2 ,\"n_predict\":2,\"temperature\":0.70}"
        );
        // within the cap: not even copied
        let bytes = Bytes::from_static(br#"{"model":"m","n":3,"max_tokens":2}"#);
        let info = inspect(&bytes).unwrap();
        let out = super::rewrite(
            bytes.clone(),
            &info,
            &Rewrite {
                upstream_model: "m",
                max_tokens: Some(2),
                insert_as: InsertAs::MaxTokens,
            },
        );
        assert_eq!(out.as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn max_tokens_is_read_and_capped() {
        let info = inspect(br#"{"model":"m","max_tokens":50}"#).unwrap();
        assert_eq!(info.requested_max_tokens(), Some(50));
        assert_eq!(
            inspect(br#"{"model":"m"}"#).unwrap().requested_max_tokens(),
            None
        );
        assert_eq!(
            inspect(br#"{"n_predict":-1}"#)
                .unwrap()
                .requested_max_tokens(),
            None
        );
        assert_eq!(
            capped(r#"{"model":"m","max_tokens":5000}"#, 100),
            r#"{"model":"m","max_tokens":100}"#
        );
        assert_eq!(
            capped(r#"{"model":"m","max_tokens":5}"#, 100),
            r#"{"model":"m","max_tokens":5}"#
        );
        assert_eq!(
            capped(r#"{"model":"m","n_predict":-1}"#, 100),
            r#"{"model":"m","n_predict":100}"#
        );
        assert_eq!(
            capped(r#"{"model":"m","x":1}"#, 100),
            r#"{"max_tokens":100,"model":"m","x":1}"#
        );
        assert_eq!(
            capped(r#"{"x":1}"#, 7),
            r#"{"model":"m","max_tokens":7,"x":1}"#
        );
        assert_eq!(capped(r#"{}"#, 7), r#"{"model":"m","max_tokens":7}"#);
        assert_eq!(
            capped(
                r#"{"max_completion_tokens":900,"model":"q","max_tokens":null}"#,
                10
            ),
            r#"{"max_completion_tokens":10,"model":"m","max_tokens":10}"#
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut body = String::from(r#"{"model":"a","x":"#);
        body.push_str(&"[".repeat(100_000));
        let err = inspect(body.as_bytes()).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    fn body_of_size(size: usize) -> Vec<u8> {
        let prefix = br#"{"model":"alias","messages":[{"role":"user","content":""#;
        let suffix = br#""}],"stream":true}"#;
        let fill = size - prefix.len() - suffix.len();
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(prefix);
        body.extend(std::iter::repeat_n(b'x', fill));
        body.extend_from_slice(suffix);
        assert_eq!(body.len(), size);
        body
    }

    #[test]
    fn sizes_from_one_kib_to_32_mib() {
        for size in [1024, 64 * 1024, 64 * 1024 + 1, 1 << 20, 32 << 20] {
            let body = Bytes::from(body_of_size(size));
            let info = inspect(&body).unwrap();
            assert!(info.stream);
            let out = rewrite_model(body.clone(), &info, "upstream-name");
            assert_eq!(out.len(), size + "upstream-name".len() - "alias".len());
            assert_eq!(&out[out.len() - 100..], &body[body.len() - 100..]);
            assert!(out.starts_with(br#"{"model":"upstream-name","messages""#));
        }
    }
}
