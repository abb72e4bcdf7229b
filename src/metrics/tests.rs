use super::*;
use crate::openai::sse::SseScanner;

fn metrics() -> Metrics {
    Metrics::new(["qwen"], ["alice"], ["127.0.0.1:8080"])
}

fn text(m: &Metrics) -> String {
    String::from_utf8(m.render()).unwrap()
}

#[test]
fn labels_come_from_bounded_sets() {
    let m = metrics();
    assert_eq!(m.model_label(Some("qwen")), "qwen");
    assert_eq!(m.model_label(Some("gpt-4")), "other");
    assert_eq!(m.model_label(None), "other");
    assert_eq!(m.key_label(Some("alice")), "alice");
    assert_eq!(m.key_label(Some("sk-raw-secret")), "invalid");
    assert_eq!(m.key_label(None), "anonymous");
    assert_eq!(status_label(200), "200");
    assert_eq!(status_label(418), "4xx");
    assert_eq!(status_label(999), "5xx");
}

#[test]
fn a_streamed_request_is_recorded_with_its_tokens() {
    let m = metrics();
    let mut sc = SseScanner::new();
    sc.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"timings\":{\"cache_n\":3,\"prompt_n\":1,\"predicted_n\":1,\"prompt_per_second\":50.0,\"predicted_per_second\":20.0}}\n\n");
    m.record_request(&RequestRecord {
        route: "chat_completions",
        model: Some("qwen"),
        key: Some("alice"),
        status: 200,
        duration: Duration::from_millis(30),
        bytes_in: 10,
        bytes_out: 20,
        stats: Some(&sc.stats),
    });
    let t = text(&m);
    assert!(t.contains(r#"llm_edge_requests_total{code="200",key="alice",model="qwen",route="chat_completions"} 1"#), "{t}");
    assert!(
        t.contains(r#"llm_edge_tokens_total{key="alice",kind="prompt",model="qwen"} 4"#),
        "{t}"
    );
    assert!(
        t.contains(r#"llm_edge_tokens_total{key="alice",kind="cached",model="qwen"} 3"#),
        "{t}"
    );
    assert!(t.contains("llm_edge_upstream_generation_tokens_per_second_count{model=\"qwen\"} 1"));
    assert!(t.contains("llm_edge_prompt_cache_hit_ratio_sum{model=\"qwen\"} 0.75"));
    assert!(t.contains("llm_edge_build_info{version="));
    assert!(
        t.contains("process_resident_memory_bytes"),
        "process collector missing"
    );
}

#[test]
fn guards_keep_gauges_honest() {
    let m = metrics();
    {
        let _r = m.request_started();
        let _s = m.stream_started(Some("qwen"));
        assert!(text(&m).contains("llm_edge_streams_active{model=\"qwen\"} 1"));
        assert!(text(&m).contains("llm_edge_requests_in_flight 1"));
    }
    assert!(text(&m).contains("llm_edge_streams_active{model=\"qwen\"} 0"));
    assert!(text(&m).contains("llm_edge_requests_in_flight 0"));
}

#[test]
fn unknown_values_do_not_add_series() {
    let m = metrics();
    let record = |model: &str, key: &str| {
        m.record_request(&RequestRecord {
            route: "chat_completions",
            model: Some(model),
            key: Some(key),
            status: 401,
            ..RequestRecord::default()
        });
    };
    record("x", "y");
    let before = m.series_count();
    for i in 0..500 {
        record(&format!("model-{i}"), &format!("sk-{i}"));
    }
    assert_eq!(m.series_count(), before);
}

#[test]
fn help_texts_list_every_label_the_code_emits() {
    let m = Metrics::new(["qwen"], ["alice"], ["gpu"]);
    for reason in LimitReason::ALL {
        m.rate_limited(Some("alice"), *reason);
    }
    let text = String::from_utf8(m.render()).unwrap();
    let help = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("# HELP {name} ")))
            .unwrap_or_default()
            .to_string()
    };
    for reason in LimitReason::ALL {
        assert!(
            help("llm_edge_rate_limited_total").contains(reason.as_str()),
            "{reason:?}"
        );
    }
    for kind in UpstreamErrorKind::ALL {
        assert!(help("llm_edge_upstream_errors_total").contains(kind.as_str()));
        // created at 0 for every configured server
        assert!(text.contains(&format!(
            "llm_edge_upstream_errors_total{{kind=\"{}\",upstream=\"gpu\"}} 0",
            kind.as_str()
        )));
    }
    for reason in AuthFailure::ALL {
        assert!(text.contains(&format!(
            "llm_edge_auth_failures_total{{reason=\"{}\"}} 0",
            reason.as_str()
        )));
    }
}

#[test]
fn series_that_panels_and_alerts_read_exist_at_zero_before_any_event() {
    let m = Metrics::new(["qwen"], ["alice", "bob"], ["gpu"]);
    let t = text(&m);
    for key in ["alice", "bob", "anonymous", "invalid"] {
        for reason in LimitReason::ALL {
            let series = format!(
                "llm_edge_rate_limited_total{{key=\"{key}\",reason=\"{}\"}} 0",
                reason.as_str()
            );
            assert!(t.contains(&series), "{series} missing:\n{t}");
        }
    }
    for phase in DisconnectPhase::ALL {
        assert!(t.contains(&format!(
            "llm_edge_client_disconnects_total{{phase=\"{}\"}} 0",
            phase.as_str()
        )));
    }
    for line in [
        r#"llm_edge_streams_active{model="qwen"} 0"#,
        r#"llm_edge_tokens_total{key="bob",kind="completion",model="qwen"} 0"#,
        r#"llm_edge_tokens_total{key="anonymous",kind="prompt",model="qwen"} 0"#,
        r#"llm_edge_route_tokens_total{kind="completion",route="messages"} 0"#,
        r#"llm_edge_time_to_first_token_seconds_count{model="qwen"} 0"#,
        r#"llm_edge_request_bytes_total{route="chat_completions"} 0"#,
        "llm_edge_queue_wait_seconds_count 0",
    ] {
        assert!(t.contains(line), "{line} missing:\n{t}");
    }
    assert!(
        !t.contains(r#"key="invalid",kind="#),
        "a wrong key never has tokens"
    );
    // Bounded by the configuration: one more key adds its limit reasons and
    // its token kinds per model, nothing else.
    let more = Metrics::new(["qwen"], ["alice", "bob", "carol"], ["gpu"]);
    assert_eq!(
        more.series_count() - m.series_count(),
        LimitReason::ALL.len() + 3
    );
}
