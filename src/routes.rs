//! Which part of the API a request is for.
//!
//! The set of routes is fixed, so a route is also a safe, bounded label for
//! logs and metrics (never the raw path).

use crate::errors::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    HealthUpstream,
    ListModels,
    GetModel(String),
    ChatCompletions,
    Completions,
    Embeddings,
    /// Any other `/v1/...` path: passed through to llama-server as it is.
    OtherV1,
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
            Route::OtherV1 => "other_v1",
        }
    }

    /// Routes whose JSON body names a model that is checked and rewritten.
    pub fn has_model_body(&self) -> bool {
        matches!(
            self,
            Route::ChatCompletions | Route::Completions | Route::Embeddings
        )
    }

    pub fn needs_key(&self) -> bool {
        !matches!(self, Route::Health | Route::HealthUpstream)
    }
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

/// Label for requests that matched no route.
pub const UNKNOWN_ROUTE: &str = "unknown";

/// Classifies a request; unknown paths are 404 and wrong methods 405.
pub fn classify(method: &str, path: &str) -> Result<Route, ApiError> {
    let path = path.split('?').next().unwrap_or("");
    let normalized = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    if path.split('/').any(|seg| seg == ".." || seg == ".") || path.contains("//") {
        return Err(ApiError::InvalidRequest(
            "the request path must not contain '.', '..' or empty segments".into(),
        ));
    }
    let (route, allowed): (Route, &'static str) = match normalized {
        "/health" => (Route::Health, "GET"),
        "/health/upstream" => (Route::HealthUpstream, "GET"),
        "/v1/models" => (Route::ListModels, "GET"),
        "/v1/chat/completions" => (Route::ChatCompletions, "POST"),
        "/v1/completions" => (Route::Completions, "POST"),
        "/v1/embeddings" => (Route::Embeddings, "POST"),
        p if p.starts_with("/v1/models/") => {
            (Route::GetModel(p["/v1/models/".len()..].to_string()), "GET")
        }
        p if p.starts_with("/v1/") => return Ok(Route::OtherV1),
        _ => {
            return Err(ApiError::NotFound {
                method: method.to_string(),
                path: shorten(path),
            })
        }
    };
    let method_ok = method == allowed || (allowed == "GET" && method == "HEAD");
    if !method_ok {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: normalized.to_string(),
            allowed,
        });
    }
    Ok(route)
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
mod tests {
    use super::*;

    #[test]
    fn known_routes() {
        assert_eq!(
            classify("POST", "/v1/chat/completions").unwrap(),
            Route::ChatCompletions
        );
        assert_eq!(
            classify("POST", "/v1/chat/completions/").unwrap(),
            Route::ChatCompletions
        );
        assert_eq!(
            classify("POST", "/v1/completions?x=1").unwrap(),
            Route::Completions
        );
        assert_eq!(
            classify("POST", "/v1/embeddings").unwrap(),
            Route::Embeddings
        );
        assert_eq!(classify("GET", "/v1/models").unwrap(), Route::ListModels);
        assert_eq!(
            classify("GET", "/v1/models/org/name").unwrap(),
            Route::GetModel("org/name".into())
        );
        assert_eq!(classify("GET", "/health").unwrap(), Route::Health);
        assert_eq!(classify("HEAD", "/health").unwrap(), Route::Health);
        assert_eq!(
            classify("GET", "/health/upstream").unwrap(),
            Route::HealthUpstream
        );
        assert_eq!(classify("POST", "/v1/rerank").unwrap(), Route::OtherV1);
    }

    #[test]
    fn wrong_method_is_405_and_says_what_to_use() {
        let e = classify("GET", "/v1/chat/completions").unwrap_err();
        assert_eq!(e.status(), 405);
        assert!(e.to_string().contains("POST"));
        assert_eq!(classify("POST", "/v1/models").unwrap_err().status(), 405);
    }

    #[test]
    fn unknown_paths_are_404() {
        for p in ["/", "/v2/chat", "/metrics", "/v1", "/healthz"] {
            assert_eq!(classify("GET", p).unwrap_err().status(), 404, "{p}");
        }
        let long = format!("/{}", "é".repeat(200));
        assert!(classify("GET", &long).unwrap_err().to_string().len() < 300);
    }

    #[test]
    fn dot_segments_are_rejected() {
        for p in ["/v1/../health", "/v1/./models", "/v1//models"] {
            assert_eq!(classify("GET", p).unwrap_err().status(), 400, "{p}");
        }
    }

    #[test]
    fn only_model_routes_have_model_bodies() {
        assert!(Route::ChatCompletions.has_model_body());
        assert!(!Route::OtherV1.has_model_body());
        assert!(!Route::Health.needs_key());
        assert!(Route::ListModels.needs_key());
    }
}
