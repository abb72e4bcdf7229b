//! Unit tests of the pure parts: settings, hints, transport classes, the
//! stream scan and the report.

use std::time::Duration;

use serde_json::{json, Value};

use super::hints::{gateway_code_hint, LOADING_HINT};
use super::*;
use crate::errors::{code, ApiError};

fn args(base: Option<&str>) -> CheckArgs {
    CheckArgs {
        base_url: base.map(str::to_string),
        api_key: None,
        model: None,
        json: false,
        timeout: 30,
    }
}

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn base_url_with_or_without_v1() {
    for raw in [
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8000/",
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8000/v1/",
        " http://127.0.0.1:8000/v1// ",
    ] {
        let b = normalize_base_url(raw).unwrap();
        assert_eq!(b.root, "http://127.0.0.1:8000", "{raw}");
        assert_eq!(b.api, "http://127.0.0.1:8000/v1", "{raw}");
        assert_eq!(
            (b.host.as_str(), b.port, b.https),
            ("127.0.0.1", 8000, false)
        );
    }
    let b = normalize_base_url("https://llm.example.com/edge/v1").unwrap();
    assert_eq!(b.root, "https://llm.example.com/edge");
    assert_eq!(b.api, "https://llm.example.com/edge/v1");
    assert_eq!(b.port, 443);
    assert!(b.https);
    let b = normalize_base_url("http://[::1]:9/v1").unwrap();
    assert_eq!(b.root, "http://[::1]:9");
}

#[test]
fn bad_base_urls_are_usage_errors() {
    for raw in [
        "",
        "127.0.0.1:8000",
        "ftp://host/",
        "http://",
        "http://h/?a=1",
        "http://u:p@h/",
    ] {
        assert!(normalize_base_url(raw).is_err(), "{raw}");
    }
}

#[test]
fn flags_win_then_llm_then_test_variables() {
    let env = env_of(&[
        ("LLM_BASE_URL", "http://llm:1/v1"),
        ("TEST_BASE_URL", "http://test:2"),
        ("LLM_API_KEY", ""),
        ("TEST_API_KEY", "sk-test"),
        ("TEST_MODEL", "m-test"),
    ]);
    let s = resolve_settings(&args(None), &env).unwrap();
    assert_eq!(s.base.root, "http://llm:1");
    assert_eq!(s.api_key.as_deref(), Some("sk-test"));
    assert_eq!(s.key_source, Some("TEST_API_KEY"));
    assert_eq!(s.model.as_deref(), Some("m-test"));

    let mut a = args(Some("http://flag:3"));
    a.api_key = Some("sk-flag".into());
    a.model = Some("m-flag".into());
    let s = resolve_settings(&a, &env).unwrap();
    assert_eq!(s.base.root, "http://flag:3");
    assert_eq!(s.key_source, Some("--api-key"));
    assert_eq!(s.model.as_deref(), Some("m-flag"));

    let env = env_of(&[("TEST_BASE_URL", "http://test:2")]);
    let s = resolve_settings(&args(None), &env).unwrap();
    assert_eq!(s.base.root, "http://test:2");
    assert_eq!(s.api_key, None);
}

#[test]
fn missing_url_or_bad_timeout_is_a_usage_error() {
    let none = |_: &str| None;
    assert!(resolve_settings(&args(None), &none)
        .unwrap_err()
        .contains("LLM_BASE_URL"));
    let mut a = args(Some("http://h:1"));
    a.timeout = 0;
    assert!(resolve_settings(&a, &none).is_err());
    a.timeout = u64::MAX;
    assert!(resolve_settings(&a, &none).is_err());
}

#[test]
fn error_bodies_and_hints() {
    let models = vec!["qwen3".to_string(), "small".to_string()];
    let ctx = HintCtx {
        model: Some("nope"),
        models: &models,
        key_source: Some("--api-key"),
    };
    let err = parse_error_body(
        br#"{"error":{"message":"the model 'nope' does not exist","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#,
    )
    .unwrap();
    assert_eq!(
        err.describe(Some(404)),
        "404 model_not_found: the model 'nope' does not exist"
    );
    let hint = api_error_hint(Some(404), &err, &ctx);
    assert!(hint.contains("qwen3, small"), "{hint}");

    let key = ErrorInfo {
        code: "invalid_api_key".into(),
        ..ErrorInfo::default()
    };
    let hint = api_error_hint(Some(401), &key, &ctx);
    assert!(
        hint.contains("LLM_API_KEY") && hint.contains("--api-key"),
        "{hint}"
    );
    let no_key = HintCtx {
        key_source: None,
        ..ctx
    };
    assert!(api_error_hint(Some(401), &key, &no_key).contains("no API key"));

    // llama-server's own error, passed through: a numeric code.
    let loading = parse_error_body(
        br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
    )
    .unwrap();
    assert_eq!(loading.code, "503");
    assert_eq!(
        loading.describe(Some(503)),
        "503 unavailable_error: Loading model"
    );
    assert!(api_error_hint(Some(503), &loading, &ctx).contains("still loading"));

    let tunnel = ErrorInfo {
        code: "upstream_unreachable".into(),
        ..ErrorInfo::default()
    };
    assert!(api_error_hint(Some(502), &tunnel, &ctx).contains("SSH tunnel"));
    assert!(api_error_hint(Some(504), &ErrorInfo::default(), &ctx).contains("timeout"));
    assert!(api_error_hint(Some(403), &ErrorInfo::default(), &ctx).contains("may not use"));
    assert!(parse_error_body(b"<html>").is_none());
}

#[test]
fn transport_classes() {
    use std::io::ErrorKind as K;
    assert_eq!(
        classify_transport(false, &[K::ConnectionRefused], "", false),
        TransportKind::Refused
    );
    assert_eq!(
        classify_transport(true, &[], "operation timed out", false),
        TransportKind::Timeout
    );
    assert_eq!(
        classify_transport(
            false,
            &[K::Other],
            "client error (Connect): dns error: failed to lookup address information: Name or service not known",
            false
        ),
        TransportKind::Dns
    );
    assert_eq!(
        classify_transport(
            false,
            &[K::InvalidData],
            "client error (Connect): received corrupt message of type InvalidContentType",
            true
        ),
        TransportKind::Tls
    );
    assert_eq!(
        classify_transport(false, &[], "invalid peer certificate: UnknownIssuer", true),
        TransportKind::Tls
    );
    assert_eq!(
        classify_transport(
            false,
            &[],
            "connection closed before message completed",
            false
        ),
        TransportKind::Closed
    );
    assert_eq!(
        classify_transport(false, &[K::NetworkUnreachable], "", false),
        TransportKind::Unreachable
    );
    assert_eq!(
        classify_transport(false, &[], "weird", false),
        TransportKind::Other
    );
    let base = normalize_base_url("http://10.0.0.9:8000").unwrap();
    let t = Duration::from_secs(5);
    assert!(transport_hint(TransportKind::Refused, &base, t).contains("not running"));
    assert!(transport_hint(TransportKind::Timeout, &base, t).contains("firewall or wrong address"));
    assert!(transport_hint(TransportKind::Dns, &base, t).contains("'10.0.0.9'"));
}

#[test]
fn stream_scan_counts_deltas_and_sees_done_across_chunks() {
    let mut scan = StreamScan::default();
    let ev = |c: &str| {
        format!(
            "data: {}\n\n",
            json!({"choices":[{"index":0,"delta":{"content":c}}]})
        )
    };
    let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\r\n\r\n";
    scan.feed(role.as_bytes(), Duration::from_millis(5));
    let first = ev("tok0 ");
    let (a, b) = first.split_at(10);
    scan.feed(a.as_bytes(), Duration::from_millis(10));
    assert_eq!(scan.tokens, 0);
    scan.feed(b.as_bytes(), Duration::from_millis(20));
    scan.feed(ev("tok1 ").as_bytes(), Duration::from_millis(30));
    scan.feed(
        format!(
            "{}{}",
            ev("tok2 "),
            "data: {\"choices\":[{\"delta\":{}}],\"timings\":{\"predicted_per_second\":41.5}}\n\n"
        )
        .as_bytes(),
        Duration::from_millis(40),
    );
    scan.feed(b"data: [DONE]", Duration::from_millis(41));
    assert!(!scan.done);
    scan.finish(Duration::from_millis(42));
    assert!(scan.done);
    assert_eq!(scan.tokens, 3);
    assert_eq!(scan.first_token, Some(Duration::from_millis(20)));
    assert_eq!(scan.tokens_per_s(), Some(100.0));
    assert_eq!(scan.upstream_tokens_per_s, Some(41.5));
    assert_eq!(scan.text, "tok0 tok1 tok2 ");
    assert!(scan.error.is_none());
}

#[test]
fn stream_scan_sees_an_error_event_and_reasoning() {
    let mut scan = StreamScan::default();
    scan.feed(
        b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n\n",
        Duration::from_millis(1),
    );
    scan.feed(
        b"data: {\"error\":{\"message\":\"cut\",\"type\":\"server_error\",\"code\":\"upstream_error\"}}\n\n",
        Duration::from_millis(2),
    );
    scan.finish(Duration::from_millis(3));
    assert_eq!(scan.tokens, 1);
    assert_eq!(scan.tokens_per_s(), None);
    assert!(!scan.done);
    assert_eq!(scan.error.unwrap().code, "upstream_error");
}

#[test]
fn report_lines_json_and_exit() {
    let base = normalize_base_url("http://127.0.0.1:1/v1").unwrap();
    let report = Report {
        base,
        model: Some("m".into()),
        checks: vec![
            Check::pass(
                "connection",
                "gateway at http://127.0.0.1:1 answered in 3 ms",
            )
            .with("latency_ms", 3),
            Check::warn("upstream", "503 loading: x", LOADING_HINT),
            Check::fail("chat", "404 model_not_found: no", "pick another"),
            Check::skipped("streaming", "the chat step failed"),
        ],
    };
    assert!(!report.ok());
    assert_eq!(
        report.checks[0].line(),
        "PASS connection  gateway at http://127.0.0.1:1 answered in 3 ms"
    );
    assert_eq!(
        report.checks[2].line(),
        "FAIL chat        404 model_not_found: no -> hint: pick another"
    );
    assert_eq!(
        report.summary(),
        "result: FAILED (1 passed, 1 warning, 1 failed, 1 skipped) for http://127.0.0.1:1/v1"
    );
    let v = report.to_json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["base_url"], "http://127.0.0.1:1/v1");
    assert_eq!(v["checks"][0]["latency_ms"], 3);
    assert_eq!(v["checks"][0]["hint"], Value::Null);
    assert_eq!(v["checks"][1]["ok"], false);
    assert_eq!(v["checks"][1]["status"], "warn");
    assert_eq!(v["checks"][3]["status"], "skipped");

    let warn_only = Report {
        checks: report.checks[..2].to_vec(),
        ..report
    };
    assert!(warn_only.ok());
}

#[test]
fn the_code_list_is_every_code_the_gateway_answers_with() {
    let mut answered: Vec<&str> = crate::errors::every_api_error()
        .iter()
        .map(ApiError::code)
        .collect();
    answered.sort_unstable();
    answered.dedup();
    let mut listed = code::ALL.to_vec();
    listed.sort_unstable();
    let len = listed.len();
    listed.dedup();
    assert_eq!(len, listed.len(), "a code is listed twice in code::ALL");
    assert_eq!(answered, listed);
}

#[test]
fn every_gateway_error_code_has_a_hint() {
    let models = vec!["qwen3".to_string()];
    let ctx = HintCtx {
        model: Some("qwen3"),
        models: &models,
        key_source: Some("--api-key"),
    };
    for &c in code::ALL {
        let err = ErrorInfo {
            code: c.to_string(),
            ..ErrorInfo::default()
        };
        for status in [None, Some(400), Some(502)] {
            assert!(
                gateway_code_hint(status, &err, &ctx).is_some(),
                "`llm-edge check` has no hint for the gateway's error code {c:?}"
            );
        }
    }
    // As the gateway sends them: the body check reads, its status.
    for e in crate::errors::every_api_error() {
        let err = parse_error_body(&e.body(Some("req-1"))).unwrap();
        assert_eq!(err.code, e.code());
        let hint = gateway_code_hint(Some(e.status()), &err, &ctx);
        assert!(hint.is_some_and(|h| !h.is_empty()), "{e:?}");
    }
    // llama-server's own codes are not the gateway's.
    let passed_through = ErrorInfo {
        code: "503".into(),
        ..ErrorInfo::default()
    };
    assert_eq!(gateway_code_hint(Some(503), &passed_through, &ctx), None);
}

#[test]
fn the_tls_hint_knows_llm_edge_has_a_tls_listener() {
    // llm-edge serves TLS itself on `tls.listen` when configured: the hint
    // must not say it only speaks plain HTTP.
    let base = normalize_base_url("https://edge.example:8443/v1").unwrap();
    let hint = transport_hint(TransportKind::Tls, &base, Duration::from_secs(5));
    assert!(
        hint.starts_with("TLS error talking to https://edge.example:8443"),
        "{hint}"
    );
    assert!(!hint.contains("speaks plain HTTP"), "{hint}");
    assert!(hint.contains("tls.listen"), "{hint}");
    assert!(hint.contains("http://"), "{hint}");
}
