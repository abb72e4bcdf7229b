//! The one error type the gateway answers with.
//!
//! Every rejection llm-edge writes itself becomes an [`ApiError`]: it knows its
//! HTTP status, renders the OpenAI error body (`{"error":{"message","type","param","code"}}`)
//! that every OpenAI SDK can parse, and names itself with a short, bounded label
//! for logs and metrics. The Anthropic Messages routes get the same errors in
//! Anthropic's shape (`{"type":"error","error":{"type","message"}}`), which the
//! `anthropic` SDKs and Claude Code parse. llama-server's own JSON errors are
//! passed through; what it answers that is not JSON becomes one of these.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::json;

use pingora_error::Error;

use crate::labels::AuthFailure;
use crate::policy::routes::Dialect;

/// A failure the gateway reports to the client itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    // Static texts (no allocation per refusal) unless built otherwise.
    #[error("{0}")]
    MissingKey(Cow<'static, str>),
    #[error("{0}")]
    InvalidKey(Cow<'static, str>),
    #[error("the API key '{key_id}' is not allowed to use the model '{model}'")]
    ModelNotAllowed { key_id: String, model: String },
    #[error("{0}")]
    PathNotAllowed(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    #[error("the model '{0}' does not exist")]
    ModelNotFound(String),
    #[error("no route for {method} {path}; this gateway serves the OpenAI API under /v1")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    BodyTimeout(String),
    #[error(
        "request headers are larger than the limit of {limit} bytes (limits.max_header_bytes)"
    )]
    HeadersTooLarge { limit: usize },
    #[error("{0}")]
    Overloaded(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    #[error("{message}")]
    UpstreamBusy { message: String, retry_after: u64 },
    #[error("{0}")]
    UpstreamUnreachable(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    UpstreamUnavailable(String),
    #[error("{0}")]
    UpstreamBroken(String),
    /// llama-server answered, but not with what the route speaks (an HTML
    /// page, plain text or broken JSON where JSON was expected).
    #[error("{message}")]
    UpstreamInvalid { status: u16, message: String },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::MissingKey(_) | ApiError::InvalidKey(_) => 401,
            ApiError::ModelNotAllowed { .. } | ApiError::PathNotAllowed(_) => 403,
            ApiError::InvalidRequest(_) | ApiError::InvalidParam { .. } => 400,
            ApiError::ModelNotFound(_) | ApiError::NotFound { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::BodyTimeout(_) => 408,
            ApiError::HeadersTooLarge { .. } => 431,
            ApiError::RateLimited { .. } => 429,
            ApiError::Overloaded(_)
            | ApiError::UpstreamUnavailable(_)
            | ApiError::UpstreamBusy { .. } => 503,
            ApiError::UpstreamUnreachable(_) | ApiError::UpstreamBroken(_) => 502,
            ApiError::UpstreamTimeout(_) => 504,
            ApiError::UpstreamInvalid { status, .. } => *status,
            ApiError::Internal(_) => 500,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::MissingKey(_) | ApiError::InvalidKey(_) => "authentication_error",
            ApiError::ModelNotAllowed { .. } | ApiError::PathNotAllowed(_) => "permission_error",
            ApiError::InvalidRequest(_)
            | ApiError::InvalidParam { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::HeadersTooLarge { .. } => "invalid_request_error",
            ApiError::Overloaded(_) | ApiError::UpstreamBusy { .. } => "overloaded_error",
            ApiError::RateLimited { .. } => "requests",
            ApiError::UpstreamUnreachable(_)
            | ApiError::UpstreamTimeout(_)
            | ApiError::UpstreamUnavailable(_)
            | ApiError::UpstreamBroken(_)
            | ApiError::UpstreamInvalid { .. }
            | ApiError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`; also the bounded label used in logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingKey(_) => "missing_api_key",
            ApiError::InvalidKey(_) => "invalid_api_key",
            ApiError::ModelNotAllowed { .. } => "model_not_allowed",
            ApiError::PathNotAllowed(_) => "path_not_allowed",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidParam { .. } => "invalid_parameter",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::BodyTimeout(_) => "request_timeout",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::Overloaded(_) => "gateway_overloaded",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::UpstreamBusy { .. } => "upstream_busy",
            ApiError::UpstreamUnreachable(_) => "upstream_unreachable",
            ApiError::UpstreamTimeout(_) => "upstream_timeout",
            ApiError::UpstreamUnavailable(_) => "upstream_unavailable",
            ApiError::UpstreamBroken(_) => "upstream_error",
            ApiError::UpstreamInvalid { .. } => "invalid_response",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// What an operator should check when llama-server cannot be reached.
    pub const TUNNEL_HINT: &'static str = "check that the SSH tunnel from the GPU machine is up (ssh -R ...) and that llama-server is running behind it";

    /// The connection to llama-server broke after the response started.
    pub fn stream_cut(authority: &str, why: &str) -> ApiError {
        ApiError::UpstreamBroken(format!(
            "the connection to the upstream at {authority} broke during the response ({why}): the SSH tunnel or llama-server went away; the reply is incomplete"
        ))
    }

    /// llama-server sent something that is not HTTP (or not the route's format).
    pub fn upstream_malformed(authority: &str, why: &str) -> ApiError {
        ApiError::UpstreamBroken(format!(
            "the upstream at {authority} sent a malformed response ({why}); the reply is incomplete"
        ))
    }

    /// No server is up for a model (or at all).
    pub fn all_down(what: &str, states: &str) -> ApiError {
        ApiError::UpstreamUnavailable(format!(
            "{what} are down or loading: {states}; check their SSH tunnels and llama-server processes"
        ))
    }

    /// llama-server sent no (further) bytes within `limit` (the setting named).
    pub fn upstream_silent(authority: &str, limit: std::time::Duration, setting: &str) -> ApiError {
        ApiError::UpstreamTimeout(format!(
            "the upstream at {authority} sent nothing for {} ({setting}); the reply is incomplete",
            humantime::format_duration(limit)
        ))
    }

    /// The reason a key was refused, when this error is one.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            ApiError::MissingKey(_) => Some(AuthFailure::MissingKey),
            ApiError::InvalidKey(_) => Some(AuthFailure::InvalidKey),
            ApiError::ModelNotAllowed { .. } => Some(AuthFailure::ModelNotAllowed),
            _ => None,
        }
    }

    /// Seconds for a `Retry-After` header, for errors worth retrying.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded(_) => Some(1),
            ApiError::RateLimited { retry_after, .. }
            | ApiError::UpstreamBusy { retry_after, .. } => Some((*retry_after).max(1)),
            _ => None,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidParam { param, .. } => Some(param),
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed { .. } => Some("model"),
            _ => None,
        }
    }

    /// The JSON body, with the request id when one is known.
    ///
    /// Serialized straight from borrowed fields (one buffer) rather than
    /// through a `serde_json::Value` tree, which costs a score of
    /// allocations per refusal; the bytes are the same as [`Self::json`]'s.
    pub fn body(&self, request_id: Option<&str>) -> Bytes {
        encode(&OpenAiEnvelope {
            error: OpenAiError {
                code: self.code(),
                message: Message(self),
                param: self.param(),
                request_id,
                kind: self.error_type(),
            },
        })
    }

    /// The OpenAI error object (`{"error":{...}}`), for callers that add members.
    pub fn json(&self, request_id: Option<&str>) -> serde_json::Value {
        let mut error = json!({
            "message": self.to_string(),
            "type": self.error_type(),
            "param": self.param(),
            "code": self.code(),
        });
        if let Some(id) = request_id {
            error["request_id"] = json!(id);
        }
        json!({ "error": error })
    }

    /// Anthropic's `error.type` for this error's status.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The JSON body in `dialect`'s shape.
    pub fn body_in(&self, dialect: Dialect, request_id: Option<&str>) -> Bytes {
        match dialect {
            Dialect::Anthropic => encode(&AnthropicEnvelope {
                error: AnthropicError {
                    message: Message(self),
                    kind: self.anthropic_type(),
                },
                request_id,
                kind: "error",
            }),
            Dialect::OpenAi | Dialect::Responses => self.body(request_id),
        }
    }

    fn anthropic_json(&self, request_id: Option<&str>) -> serde_json::Value {
        let mut v = json!({
            "type": "error",
            "error": {"type": self.anthropic_type(), "message": self.to_string()},
        });
        if let Some(id) = request_id {
            v["request_id"] = json!(id);
        }
        v
    }

    /// The same error as one SSE event, for a stream that already started:
    /// the client sees why it ended and, without `[DONE]`, knows the reply is cut.
    pub fn sse_event(&self, request_id: Option<&str>) -> Bytes {
        self.sse_event_in(Dialect::OpenAi, request_id)
    }

    /// [`ApiError::sse_event`] in `dialect`'s framing: a `data:` line with
    /// the OpenAI error for chat; `event: error` for Anthropic (its SDKs raise
    /// on it) and for the Responses API (with an `error` member, which the
    /// `openai` SDK raises on).
    pub fn sse_event_in(&self, dialect: Dialect, request_id: Option<&str>) -> Bytes {
        let (prefix, body): (&[u8], Bytes) = match dialect {
            Dialect::OpenAi => (b"data: ", self.body(request_id)),
            Dialect::Anthropic => (
                b"event: error\ndata: ",
                Bytes::from(self.anthropic_json(request_id).to_string()),
            ),
            Dialect::Responses => {
                let mut v = self.json(request_id);
                v["type"] = json!("error");
                v["code"] = json!(self.code());
                v["message"] = json!(self.to_string());
                v["param"] = json!(self.param());
                (b"event: error\ndata: ", Bytes::from(v.to_string()))
            }
        };
        let mut event = Vec::with_capacity(prefix.len() + body.len() + 2);
        event.extend_from_slice(prefix);
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

// The error bodies as borrowed structs. Members in alphabetical order, as
// `serde_json::Value` (a sorted map) writes them, so the bytes do not depend
// on which of the two built a body.

#[derive(serde::Serialize)]
struct OpenAiEnvelope<'a> {
    error: OpenAiError<'a>,
}

#[derive(serde::Serialize)]
struct OpenAiError<'a> {
    code: &'static str,
    message: Message<'a>,
    param: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(serde::Serialize)]
struct AnthropicEnvelope<'a> {
    error: AnthropicError<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(serde::Serialize)]
struct AnthropicError<'a> {
    message: Message<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The error's text, escaped as it is formatted (no intermediate `String`).
struct Message<'a>(&'a ApiError);

impl serde::Serialize for Message<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}

/// `body` as JSON in a buffer of exactly its length, measured by a first
/// pass: a full `Vec` becomes `Bytes` without a second allocation.
fn encode(body: &impl serde::Serialize) -> Bytes {
    let mut len = crate::openai::ByteCount(0);
    // Neither pass can fail: these structs have string keys and no maps,
    // and neither writer refuses bytes.
    let _ = serde_json::to_writer(&mut len, body);
    let mut out = Vec::with_capacity(len.0);
    let _ = serde_json::to_writer(&mut out, body);
    Bytes::from(out)
}

// ---------------------------------------------------------------------------
// How a request handler ends early.
#[derive(Debug)]
pub enum GatewayError {
    /// Answer the client with this error (nothing was written yet).
    Api(ApiError),
    /// The client left; there is nobody to answer.
    ClientGone,
    /// The response already started and must be cut off.
    Aborted(Box<Error>),
}

/// A Pingora error while preparing an answer (building a header): nothing
/// was written yet, so the client gets a 500 it can read. After the response
/// started, a relay ends it with [`GatewayError::Aborted`] explicitly.
impl From<Box<Error>> for GatewayError {
    fn from(e: Box<Error>) -> Self {
        GatewayError::Api(ApiError::Internal(format!(
            "the gateway could not prepare its answer ({})",
            e.etype().as_str()
        )))
    }
}

impl From<ApiError> for GatewayError {
    fn from(e: ApiError) -> Self {
        GatewayError::Api(e)
    }
}

/// The values [`ApiError::code`] returns, for the clients of the gateway
/// (`llm-edge check`) to match without re-typing them. `ALL` lists every one;
/// `check`'s unit tests fail when a variant's code is missing here.
pub mod code {
    pub const MISSING_API_KEY: &str = "missing_api_key";
    pub const INVALID_API_KEY: &str = "invalid_api_key";
    pub const MODEL_NOT_ALLOWED: &str = "model_not_allowed";
    pub const PATH_NOT_ALLOWED: &str = "path_not_allowed";
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const INVALID_PARAMETER: &str = "invalid_parameter";
    pub const MODEL_NOT_FOUND: &str = "model_not_found";
    pub const NOT_FOUND: &str = "not_found";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub const REQUEST_TOO_LARGE: &str = "request_too_large";
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
    pub const GATEWAY_OVERLOADED: &str = "gateway_overloaded";
    pub const RATE_LIMIT_EXCEEDED: &str = "rate_limit_exceeded";
    pub const UPSTREAM_BUSY: &str = "upstream_busy";
    pub const UPSTREAM_UNREACHABLE: &str = "upstream_unreachable";
    pub const UPSTREAM_TIMEOUT: &str = "upstream_timeout";
    pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    pub const INVALID_RESPONSE: &str = "invalid_response";
    pub const INTERNAL_ERROR: &str = "internal_error";

    /// Every code, in the order of [`super::ApiError`]'s variants.
    pub const ALL: &[&str] = &[
        MISSING_API_KEY,
        INVALID_API_KEY,
        MODEL_NOT_ALLOWED,
        PATH_NOT_ALLOWED,
        INVALID_REQUEST,
        INVALID_PARAMETER,
        MODEL_NOT_FOUND,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        REQUEST_TOO_LARGE,
        REQUEST_TIMEOUT,
        HEADERS_TOO_LARGE,
        GATEWAY_OVERLOADED,
        RATE_LIMIT_EXCEEDED,
        UPSTREAM_BUSY,
        UPSTREAM_UNREACHABLE,
        UPSTREAM_TIMEOUT,
        UPSTREAM_UNAVAILABLE,
        UPSTREAM_ERROR,
        INVALID_RESPONSE,
        INTERNAL_ERROR,
    ];
}

#[cfg(test)]
/// One of each [`ApiError`] variant. The `match` stops compiling when a
/// variant is added: add a sample for it below, and its code to `code::ALL`.
pub(crate) fn every_api_error() -> Vec<ApiError> {
    let all = vec![
        ApiError::MissingKey("m".into()),
        ApiError::InvalidKey("m".into()),
        ApiError::ModelNotAllowed {
            key_id: "k".into(),
            model: "m".into(),
        },
        ApiError::PathNotAllowed("m".into()),
        ApiError::InvalidRequest("m".into()),
        ApiError::InvalidParam {
            param: "model".into(),
            message: "m".into(),
        },
        ApiError::ModelNotFound("m".into()),
        ApiError::NotFound {
            method: "GET".into(),
            path: "/x".into(),
        },
        ApiError::MethodNotAllowed {
            method: "GET".into(),
            path: "/v1/chat/completions".into(),
            allowed: "POST",
        },
        ApiError::BodyTooLarge { limit: 10 },
        ApiError::BodyTimeout("m".into()),
        ApiError::HeadersTooLarge { limit: 10 },
        ApiError::Overloaded("m".into()),
        ApiError::RateLimited {
            message: "m".into(),
            retry_after: 3,
        },
        ApiError::UpstreamBusy {
            message: "m".into(),
            retry_after: 3,
        },
        ApiError::UpstreamUnreachable("m".into()),
        ApiError::UpstreamTimeout("m".into()),
        ApiError::UpstreamUnavailable("m".into()),
        ApiError::UpstreamBroken("m".into()),
        ApiError::UpstreamInvalid {
            status: 502,
            message: "m".into(),
        },
        ApiError::Internal("m".into()),
    ];
    for e in &all {
        match e {
            ApiError::MissingKey(_)
            | ApiError::InvalidKey(_)
            | ApiError::ModelNotAllowed { .. }
            | ApiError::PathNotAllowed(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidParam { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::HeadersTooLarge { .. }
            | ApiError::Overloaded(_)
            | ApiError::RateLimited { .. }
            | ApiError::UpstreamBusy { .. }
            | ApiError::UpstreamUnreachable(_)
            | ApiError::UpstreamTimeout(_)
            | ApiError::UpstreamUnavailable(_)
            | ApiError::UpstreamBroken(_)
            | ApiError::UpstreamInvalid { .. }
            | ApiError::Internal(_) => {}
        }
    }
    all
}

#[cfg(test)]
mod tests;
