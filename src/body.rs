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
    /// Byte offset of the opening `{`.
    object_start: usize,
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
    let object_start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let mut de = serde_json::Deserializer::from_slice(body);
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
    Ok(RequestBody {
        model,
        stream: scan.stream,
        has_members: scan.members > 0,
        object_start,
    })
}

/// Returns `body` with the top-level `model` value replaced by `upstream_name`
/// (or inserted first when the client sent none). Unchanged bodies are returned
/// without a copy.
pub fn rewrite_model(body: Bytes, info: &RequestBody, upstream_name: &str) -> Bytes {
    let encoded = match serde_json::to_string(upstream_name) {
        Ok(s) => s,
        Err(_) => return body,
    };
    match &info.model {
        Some(field) => {
            if body[field.span.clone()] == *encoded.as_bytes() {
                return body;
            }
            let mut out = BytesMut::with_capacity(body.len() - field.span.len() + encoded.len());
            out.extend_from_slice(&body[..field.span.start]);
            out.extend_from_slice(encoded.as_bytes());
            out.extend_from_slice(&body[field.span.end..]);
            out.freeze()
        }
        None => {
            let at = info.object_start + 1;
            let separator: &[u8] = if info.has_members { b"," } else { b"" };
            let mut out = BytesMut::with_capacity(body.len() + encoded.len() + 10);
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(b"\"model\":");
            out.extend_from_slice(encoded.as_bytes());
            out.extend_from_slice(separator);
            out.extend_from_slice(&body[at..]);
            out.freeze()
        }
    }
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
