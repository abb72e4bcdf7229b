//! Request-body inspection and the byte-exact `model` rewrite.
//!
//! The gateway must route and authorize on the JSON `model` field, then hand
//! llama-server the name it expects. Re-serialising the body would reorder
//! keys, change number formatting and cost a full parse of prompts that can be
//! tens of MiB, so instead we find the exact byte span of the top-level
//! `model` value and splice the new name in; every other byte stays as the
//! client sent it.

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

/// Names llama-server reads as the generation limit.
const TOKEN_LIMIT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "n_predict"];

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
    Ok(RequestBody {
        model,
        stream: scan.stream,
        has_members: scan.members > 0,
        token_limits,
        object_start,
    })
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

/// What to change in a body on its way upstream.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite<'a> {
    pub upstream_model: &'a str,
    /// Cap every generation-length field at this value (inserting `max_tokens`
    /// when the body has none).
    pub max_tokens: Option<u64>,
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
        if info.token_limits.is_empty() {
            inserted.push(format!("\"max_tokens\":{cap}"));
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
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let info = inspect(&bytes).unwrap();
        let rw = Rewrite {
            upstream_model: "m",
            max_tokens: Some(cap),
        };
        String::from_utf8(super::rewrite(bytes, &info, &rw).to_vec()).unwrap()
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
