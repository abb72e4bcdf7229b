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
    for (path, route) in MODEL_ROUTES {
        assert_eq!(classify("POST", path).unwrap(), *route, "{path}");
        assert_eq!(route.upstream_path(), Some(*path));
        assert!(LABELS.contains(&route.label()));
    }
}

#[test]
fn everything_else_is_404_and_never_passed_on() {
    let paths = "/ /v2/chat /metrics /v1 /healthz /v1/unknown /v1/stream /v1/streams/lookup /v1/chat/completions/control /v1/tokenize /tokenize /props /slots /completion /chat/completions /v1/reranking /infill";
    for p in paths.split(' ') {
        let e = classify("POST", p).unwrap_err();
        assert_eq!(e.status(), 404, "{p}");
        assert!(e.to_string().contains(p), "{e}");
    }
    let long = format!("/{}", "e".repeat(200));
    assert!(classify("GET", &long).unwrap_err().to_string().len() < 300);
}

#[test]
fn passthrough_paths_are_opened_by_the_operator_only() {
    let table = RouteTable::new(vec!["/props".into(), "/v1/tokenize".into()]);
    assert_eq!(table.classify("GET", "/props").unwrap(), Route::Passthrough);
    assert_eq!(
        table.classify("POST", "/v1/tokenize/").unwrap(),
        Route::Passthrough
    );
    assert_eq!(
        table.classify("DELETE", "/props").unwrap_err().status(),
        405
    );
    assert_eq!(table.classify("GET", "/slots").unwrap_err().status(), 404);
    assert_eq!(table.classify("GET", "/pr%6fps").unwrap_err().status(), 400);
}

#[test]
fn wrong_method_is_405_and_says_what_to_use() {
    let e = classify("GET", "/v1/chat/completions").unwrap_err();
    assert_eq!(e.status(), 405);
    assert!(e.to_string().contains("POST"));
    assert_eq!(classify("POST", "/v1/models").unwrap_err().status(), 405);
    assert_eq!(classify("GET", "/v1/messages").unwrap_err().status(), 405);
}

#[test]
fn dot_segments_are_rejected() {
    for p in ["/v1/../health", "/v1/./models", "/v1//models"] {
        assert_eq!(classify("GET", p).unwrap_err().status(), 400, "{p}");
    }
}

#[test]
fn escaped_spellings_are_400_before_routing() {
    for p in [
        "/v1/chat/c%6fmpletions",
        "/v1/%63hat/completions",
        "/v1/embedding%73",
        "/v1/chat/completions%2F",
        "/v1/chat/completions;x",
        "/v1/chat/completions\\",
        "/v1/models/a b",
        "/v1/chat/completions%00",
        "/v1/m\u{e9}ssages",
    ] {
        let e = classify("POST", p).unwrap_err();
        assert_eq!(e.status(), 400, "{p}");
    }
    assert!(classify("POST", "/v1/chat/c%6fmpletions")
        .unwrap_err()
        .to_string()
        .contains("percent-escapes"));
    // a query may hold escapes: it does not route
    assert_eq!(
        classify("POST", "/v1/chat/completions?a=%20").unwrap(),
        Route::ChatCompletions
    );
    assert_eq!(
        classify("GET", "/v1/models/llama3:8b").unwrap(),
        Route::GetModel("llama3:8b".into())
    );
}

#[test]
fn dialects_and_generation() {
    assert_eq!(Route::Messages.dialect(), Dialect::Anthropic);
    assert_eq!(Route::MessagesCountTokens.dialect(), Dialect::Anthropic);
    assert_eq!(Route::Responses.dialect(), Dialect::Responses);
    assert_eq!(Route::Rerank.dialect(), Dialect::OpenAi);
    assert!(Route::Messages.generates());
    assert!(!Route::MessagesCountTokens.generates());
    assert!(Route::MessagesCountTokens.counts_tokens_only());
}

#[test]
fn only_model_routes_have_model_bodies() {
    assert!(Route::ChatCompletions.has_model_body());
    assert!(Route::Rerank.has_model_body());
    assert!(!Route::Passthrough.has_model_body());
}
