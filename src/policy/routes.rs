//! The route table: every path a client can reach, and nothing else.
//!
//! llama-server serves far more than the API a tenant should see (stored
//! streams of other conversations, slot control, tokenizer, props, ...), so
//! the gateway is default-deny: a path is one of the routes below, or one the
//! operator opened on purpose (`routes.passthrough`), or a 404 that never
//! reaches llama-server.
//!
//! One canonical spelling: llama-server's HTTP library percent-decodes the
//! path before it routes, so `/v1/chat/c%6fmpletions` would be served as a
//! chat completion while the gateway saw an unknown path. A path may
//! therefore hold only bytes that no server decodes (letters, digits,
//! `-._~:@` and `/`); anything else is refused with 400 before routing, and
//! a model route is forwarded under its canonical path, never the client's
//! spelling.
//!
//! The set of routes is fixed, so a route is also a safe, bounded label for
//! logs and metrics (never the raw path). This module must not import
//! Pingora types.

use crate::errors::ApiError;
use crate::openai::body::InsertAs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    HealthUpstream,
    ListModels,
    GetModel(String),
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API.
    Messages,
    Rerank,
    /// Token counting (checked and routed like generations, counted as requests).
    MessagesCountTokens,
    ResponsesInputTokens,
    ChatInputTokens,
    /// A path the operator opened in `routes.passthrough`: key and request
    /// limits apply, the body is not inspected.
    Passthrough,
}

/// The wire format a model route speaks: it decides the shape of the errors
/// the gateway writes and how the response stream is read for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions, completions, embeddings (and llama.cpp's own
    /// fields on them): `data: {"choices":[...]}` chunks, `data: [DONE]`.
    OpenAi,
    /// OpenAI's Responses API: `event: response.output_text.delta`, usage in
    /// `response.completed`.
    Responses,
    /// Anthropic Messages: `event: content_block_delta`, input tokens in
    /// `message_start`, output tokens in `message_delta`.
    Anthropic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Responses => "responses",
            Dialect::Anthropic => "anthropic",
        }
    }
}

/// Every route label, for metrics initialisation and tests.
pub const LABELS: &[&str] = &[
    "health",
    "health_upstream",
    "models",
    "model",
    "chat_completions",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "rerank",
    "messages_count_tokens",
    "responses_input_tokens",
    "chat_completions_input_tokens",
    "passthrough",
    UNKNOWN_ROUTE,
];

/// The model routes: path, route, and the one method they take.
const MODEL_ROUTES: &[(&str, Route)] = &[
    ("/v1/chat/completions", Route::ChatCompletions),
    ("/v1/completions", Route::Completions),
    ("/v1/embeddings", Route::Embeddings),
    ("/v1/responses", Route::Responses),
    ("/v1/messages", Route::Messages),
    ("/v1/rerank", Route::Rerank),
    ("/v1/messages/count_tokens", Route::MessagesCountTokens),
    ("/v1/responses/input_tokens", Route::ResponsesInputTokens),
    ("/v1/chat/completions/input_tokens", Route::ChatInputTokens),
];

/// `path` as the static string of a model route's upstream path, if it is one
/// (a header built from it then needs no copy of the path).
pub fn static_upstream_path(path: &str) -> Option<&'static str> {
    MODEL_ROUTES.iter().map(|(p, _)| *p).find(|p| *p == path)
}

impl Route {
    pub fn label(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::HealthUpstream => "health_upstream",
            Route::ListModels => "models",
            Route::GetModel(_) => "model",
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Messages => "messages",
            Route::Rerank => "rerank",
            Route::MessagesCountTokens => "messages_count_tokens",
            Route::ResponsesInputTokens => "responses_input_tokens",
            Route::ChatInputTokens => "chat_completions_input_tokens",
            Route::Passthrough => "passthrough",
        }
    }

    /// Routes whose JSON body names a model that is checked and rewritten.
    pub fn has_model_body(&self) -> bool {
        self.upstream_path().is_some()
    }

    /// The path a model route is forwarded under (whatever the client's
    /// spelling, e.g. a trailing slash); `None` for other routes.
    pub fn upstream_path(&self) -> Option<&'static str> {
        MODEL_ROUTES
            .iter()
            .find(|(_, r)| r == self)
            .map(|(path, _)| *path)
    }

    /// Routes that make llama-server generate tokens: the key's token
    /// ceiling applies, and their responses are read for token accounting.
    pub fn generates(&self) -> bool {
        self.ceiling_field().is_some()
    }

    /// How a generating route writes the key's token ceiling into a body
    /// that has none (each dialect has its own field); `None` for the rest.
    pub fn ceiling_field(&self) -> Option<InsertAs> {
        match self {
            Route::Messages => Some(InsertAs::AnthropicMaxTokens),
            Route::Responses => Some(InsertAs::MaxOutputTokens),
            Route::ChatCompletions | Route::Completions => Some(InsertAs::MaxTokens),
            _ => None,
        }
    }

    /// Token-counting routes: requests, never generations.
    pub fn counts_tokens_only(&self) -> bool {
        matches!(
            self,
            Route::MessagesCountTokens | Route::ResponsesInputTokens | Route::ChatInputTokens
        )
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Route::Responses | Route::ResponsesInputTokens => Dialect::Responses,
            Route::Messages | Route::MessagesCountTokens => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }
}

/// The labels of the routes that generate (their token series are created
/// at start-up, at 0).
pub fn generating_labels() -> impl Iterator<Item = &'static str> {
    MODEL_ROUTES
        .iter()
        .filter(|(_, r)| r.generates())
        .map(|(_, r)| r.label())
}

/// Label for requests that matched no route.
pub const UNKNOWN_ROUTE: &str = "unknown";

/// The routes plus the paths the operator opened (`routes.passthrough`).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    passthrough: Vec<String>,
}

impl RouteTable {
    pub fn new(passthrough: Vec<String>) -> RouteTable {
        RouteTable { passthrough }
    }

    /// Classifies a request by method and path (the query, if any, is
    /// ignored); unknown paths are 404, wrong methods 405, and paths outside
    /// the canonical alphabet 400.
    pub fn classify(&self, method: &str, path: &str) -> Result<Route, ApiError> {
        let path = path.split('?').next().unwrap_or("");
        check_canonical(path)?;
        let normalized = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let (route, allowed): (Route, &'static str) = match normalized {
            "/health" => (Route::Health, "GET"),
            "/health/upstream" => (Route::HealthUpstream, "GET"),
            "/v1/models" => (Route::ListModels, "GET"),
            p if p.starts_with("/v1/models/") => {
                (Route::GetModel(p["/v1/models/".len()..].to_string()), "GET")
            }
            p => match MODEL_ROUTES.iter().find(|(path, _)| *path == p) {
                Some((_, route)) => (route.clone(), "POST"),
                None if self.passthrough.iter().any(|open| open == p) => {
                    return match method {
                        "GET" | "HEAD" | "POST" => Ok(Route::Passthrough),
                        _ => Err(ApiError::MethodNotAllowed {
                            method: method.to_string(),
                            path: normalized.to_string(),
                            allowed: "GET, HEAD, POST",
                        }),
                    };
                }
                None => {
                    return Err(ApiError::NotFound {
                        method: shorten(method),
                        path: shorten(path),
                    })
                }
            },
        };
        let method_ok = method == allowed || (allowed == "GET" && method == "HEAD");
        if !method_ok {
            return Err(ApiError::MethodNotAllowed {
                method: shorten(method),
                path: normalized.to_string(),
                allowed,
            });
        }
        Ok(route)
    }
}

/// [`RouteTable::classify`] with no passthrough paths.
pub fn classify(method: &str, path: &str) -> Result<Route, ApiError> {
    RouteTable::default().classify(method, path)
}

/// Bytes a path may hold: RFC 3986's unreserved set, `/`, and `:` and `@`
/// (which no server decodes or routes on; model ids such as `llama3:8b`
/// need `:`). No `%`: an escape is a second spelling of the same path.
pub fn is_canonical_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'@')
}

/// Refuses every path that has a second spelling: escapes and other bytes
/// outside [`is_canonical_byte`], `.`/`..` segments, empty segments.
pub fn check_canonical(path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::InvalidRequest(
            "the request path must start with '/'".into(),
        ));
    }
    if let Some(bad) = path.bytes().find(|b| !is_canonical_byte(*b)) {
        let what = if bad == b'%' {
            "percent-escapes ('%')".to_string()
        } else if bad.is_ascii_graphic() {
            format!("the character '{}'", bad as char)
        } else {
            format!("the byte 0x{bad:02x}")
        };
        return Err(ApiError::InvalidRequest(format!(
            "the request path must be spelled plainly, with letters, digits, '-', '.', '_', '~', ':', '@' and '/' only; it contains {what}"
        )));
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") || path.contains("//") {
        return Err(ApiError::InvalidRequest(
            "the request path must not contain '.', '..' or empty segments".into(),
        ));
    }
    Ok(())
}

fn shorten(path: &str) -> String {
    if path.len() <= 100 {
        path.to_string()
    } else {
        let mut end = 100;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &path[..end])
    }
}

#[cfg(test)]
mod tests;
