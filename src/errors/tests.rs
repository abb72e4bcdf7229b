use super::*;
use serde_json::Value;

fn parse(e: &ApiError) -> Value {
    serde_json::from_slice(&e.body(None)).unwrap()
}

#[test]
fn every_error_has_the_openai_shape() {
    let all = super::every_api_error();
    for e in all {
        let v = parse(&e);
        let err = v["error"].as_object().unwrap();
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(err["type"], e.error_type());
        assert_eq!(err["code"], e.code());
        assert!(err.contains_key("param"));
        assert!((400..600).contains(&e.status()));
    }
}

#[test]
fn statuses_match_the_contract() {
    assert_eq!(ApiError::MissingKey(String::new().into()).status(), 401);
    assert_eq!(
        ApiError::ModelNotAllowed {
            key_id: "a".into(),
            model: "b".into()
        }
        .status(),
        403
    );
    assert_eq!(ApiError::ModelNotFound("x".into()).status(), 404);
    assert_eq!(ApiError::BodyTooLarge { limit: 1 }.status(), 413);
    assert_eq!(ApiError::UpstreamTimeout(String::new()).status(), 504);
    let limited = ApiError::RateLimited {
        message: String::new(),
        retry_after: 0,
    };
    assert_eq!(
        (limited.status(), limited.code(), limited.retry_after()),
        (429, "rate_limit_exceeded", Some(1))
    );
    assert_eq!(ApiError::UpstreamUnreachable(String::new()).status(), 502);
}

#[test]
fn model_errors_name_the_param() {
    let v = parse(&ApiError::ModelNotFound("gpt-9".into()));
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
}

#[test]
fn request_id_is_included_when_known() {
    let e = ApiError::InvalidRequest("bad".into());
    let v: Value = serde_json::from_slice(&e.body(Some("req-1"))).unwrap();
    assert_eq!(v["error"]["request_id"], "req-1");
}

#[test]
fn anthropic_shape() {
    let e = ApiError::ModelNotAllowed {
        key_id: "k".into(),
        model: "m".into(),
    };
    let v: Value = serde_json::from_slice(&e.body_in(Dialect::Anthropic, Some("r"))).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("'m'"));
    assert_eq!(v["request_id"], "r");
    let limited = ApiError::RateLimited {
        message: "slow".into(),
        retry_after: 1,
    };
    assert_eq!(limited.anthropic_type(), "rate_limit_error");
    let ev = ApiError::UpstreamBroken("cut".into()).sse_event_in(Dialect::Anthropic, None);
    assert!(ev.starts_with(b"event: error\ndata: {"));
    let json: Value = serde_json::from_slice(&ev[19..ev.len() - 2]).unwrap();
    assert_eq!(json["error"]["type"], "api_error");
    let ev = ApiError::UpstreamBroken("cut".into()).sse_event_in(Dialect::Responses, None);
    let json: Value = serde_json::from_slice(&ev[19..ev.len() - 2]).unwrap();
    assert_eq!(
        (json["type"].as_str(), json["error"]["code"].as_str()),
        (Some("error"), Some("upstream_error"))
    );
}

#[test]
fn sse_event_is_one_data_frame() {
    let ev = ApiError::UpstreamBroken("cut".into()).sse_event(None);
    assert!(ev.starts_with(b"data: {\"error\":"));
    assert!(ev.ends_with(b"\n\n"));
    let json: Value = serde_json::from_slice(&ev[6..ev.len() - 2]).unwrap();
    assert_eq!(json["error"]["code"], "upstream_error");
}

#[test]
fn bodies_are_the_bytes_of_the_json_trees() {
    for e in super::every_api_error() {
        for id in [None, Some("req-\"1\"")] {
            assert_eq!(e.body(id), e.json(id).to_string().as_bytes(), "{e:?}");
            let anthropic = e.body_in(Dialect::Anthropic, id);
            assert_eq!(
                anthropic,
                e.anthropic_json(id).to_string().as_bytes(),
                "{e:?}"
            );
        }
    }
}
