//! Error bodies and hints: reads an OpenAI-shaped error body (the gateway's,
//! or llama-server's passed through) and names the likely cause of an error
//! answer as a hint for the user on the client machine. Pure.

use serde_json::Value;

use crate::errors::code;

pub(super) const TUNNEL_HINT: &str = "the gateway is up but cannot reach llama-server behind it: the SSH tunnel on the edge (Machine B) is down or llama-server is not running";
pub(super) const LOADING_HINT: &str =
    "model still loading: llama-server is still loading its model; retry in a minute";

/// The `error` object of an OpenAI-shaped error body (the gateway's, or
/// llama-server's passed through, whose `code` is a number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    pub kind: String,
}

impl ErrorInfo {
    pub(super) fn from_value(err: &Value) -> ErrorInfo {
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        match err {
            Value::String(s) => ErrorInfo {
                message: s.clone(),
                ..ErrorInfo::default()
            },
            _ => ErrorInfo {
                code: text(err.get("code")),
                message: text(err.get("message")),
                kind: text(err.get("type")),
            },
        }
    }

    /// `404 model_not_found: the model 'x' does not exist`
    pub fn describe(&self, status: Option<u16>) -> String {
        let mut out = status.map(|s| s.to_string()).unwrap_or_default();
        let label = if self.code.is_empty() || self.code.parse::<u16>().is_ok() {
            &self.kind
        } else {
            &self.code
        };
        if !label.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(label);
        }
        if !self.message.is_empty() {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&self.message);
        }
        out
    }
}

pub fn parse_error_body(body: &[u8]) -> Option<ErrorInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error").map(ErrorInfo::from_value)
}

/// What the hints need to know about the run.
#[derive(Debug, Clone, Copy)]
pub struct HintCtx<'a> {
    pub model: Option<&'a str>,
    /// The models `/v1/models` listed for this key.
    pub models: &'a [String],
    pub key_source: Option<&'a str>,
}

fn model_list(models: &[String]) -> String {
    if models.is_empty() {
        "none listed for this key".into()
    } else {
        models.join(", ")
    }
}

/// The hint for an error answer (`status` None: an error event in a stream).
pub fn api_error_hint(status: Option<u16>, err: &ErrorInfo, ctx: &HintCtx) -> String {
    gateway_code_hint(status, err, ctx).unwrap_or_else(|| status_hint(status, err, ctx))
}

/// The hint for one of the gateway's own error codes ([`code::ALL`]); None
/// for any other code (llama-server's, passed through, or none at all).
/// Every gateway code has an arm: the unit tests fail when one has none.
pub(super) fn gateway_code_hint(
    status: Option<u16>,
    err: &ErrorInfo,
    ctx: &HintCtx,
) -> Option<String> {
    let model = ctx.model.unwrap_or("?");
    Some(match err.code.as_str() {
        code::MISSING_API_KEY | code::INVALID_API_KEY => key_hint(ctx.key_source),
        code::MODEL_NOT_ALLOWED => format!(
            "this key may not use the model '{model}'; models it may use: {} (pick one with --model or LLM_MODEL)",
            model_list(ctx.models)
        ),
        code::PATH_NOT_ALLOWED => {
            "this key has token limits, so only the /v1 model routes (which count tokens) are open to it; ask the operator for a key without them for this path".to_string()
        }
        code::MODEL_NOT_FOUND => format!(
            "the model '{model}' does not exist on this gateway; available models: {} (pass --model or set LLM_MODEL)",
            model_list(ctx.models)
        ),
        code::NOT_FOUND | code::METHOD_NOT_ALLOWED => path_hint(),
        code::UPSTREAM_UNREACHABLE => TUNNEL_HINT.into(),
        code::UPSTREAM_ERROR => {
            "llama-server broke off the exchange: check the SSH tunnel on the edge (Machine B) and llama-server's log on the GPU machine".into()
        }
        code::UPSTREAM_TIMEOUT => timeout_upstream_hint(),
        code::GATEWAY_OVERLOADED => {
            "the gateway is at its concurrency limit: retry later, or raise its limits on the edge".into()
        }
        // Each of these always comes with the same status, which names the
        // cause (or the message says llama-server is loading).
        code::INVALID_REQUEST
        | code::INVALID_PARAMETER
        | code::REQUEST_TOO_LARGE
        | code::REQUEST_TIMEOUT
        | code::HEADERS_TOO_LARGE
        | code::RATE_LIMIT_EXCEEDED
        | code::UPSTREAM_BUSY
        | code::UPSTREAM_UNAVAILABLE
        | code::INVALID_RESPONSE
        | code::INTERNAL_ERROR => status_hint(status, err, ctx),
        _ => return None,
    })
}

/// The hint from the HTTP status (and a "loading" message), for codes that
/// do not name a cause of their own.
fn status_hint(status: Option<u16>, err: &ErrorInfo, ctx: &HintCtx) -> String {
    let model = ctx.model.unwrap_or("?");
    let loading = err.message.to_ascii_lowercase().contains("loading")
        || err.code.eq_ignore_ascii_case("loading");
    if loading {
        return LOADING_HINT.into();
    }
    match status {
        Some(401) if err.kind == "authentication_error" && err.code.parse::<u16>().is_ok() => {
            "llama-server rejected the gateway's own request: upstream.api_key in the edge's config does not match llama-server's --api-key".into()
        }
        Some(401) => key_hint(ctx.key_source),
        Some(403) => format!(
            "this key may not use the model '{model}'; models it may use: {}",
            model_list(ctx.models)
        ),
        Some(404) | Some(405) => path_hint(),
        Some(400) | Some(422) => "the gateway or llama-server rejected the test request: see the message".into(),
        Some(413) => "the request was too large for the gateway's limits".into(),
        Some(429) => "rate limited: retry later".into(),
        Some(500) => "the gateway failed internally: see its log on the edge (journalctl -u llm-edge)".into(),
        Some(502) => TUNNEL_HINT.into(),
        Some(503) => "llama-server is unavailable (busy or loading): retry in a moment".into(),
        Some(504) => timeout_upstream_hint(),
        Some(s) => format!("unexpected answer {s}: see the message"),
        None => "the gateway ended the stream with an error: see the message".into(),
    }
}

fn key_hint(source: Option<&str>) -> String {
    match source {
        None => "key missing: no API key was given; pass --api-key or set LLM_API_KEY".into(),
        Some("LLM_API_KEY") => "key missing/wrong: check LLM_API_KEY".into(),
        Some(other) => {
            format!("key missing/wrong: check LLM_API_KEY (the key used came from {other})")
        }
    }
}

pub(super) fn path_hint() -> String {
    "no such path on this server: the base URL should be the gateway's root, with or without /v1 (e.g. http://HOST:8000/v1)".into()
}

fn timeout_upstream_hint() -> String {
    "upstream timeout: llama-server did not answer in time (overloaded, stuck, or a very long prompt); check it on the GPU machine, or raise upstream.first_byte_timeout on the edge".into()
}

/// A short, single-line excerpt of a body for the report.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 160 {
        format!("{}...", flat.chars().take(160).collect::<String>())
    } else if flat.is_empty() {
        "(empty body)".into()
    } else {
        flat
    }
}
