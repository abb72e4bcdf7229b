//! Metrics end to end: the live scrape, cardinality, the token, promtool, and a
//! real Prometheus evaluating every dashboard and alert expression.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use mock_llama::{MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::{free_port, standard_config, Gateway, KEY, KEY_LIMITED};
use support::http::chat;
use support::http::eventually_async;
use support::http::get;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

async fn send(
    gw: &Gateway,
    key: Option<&str>,
    body: String,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// A stream the client abandons after its first chunk.
async fn abandon_stream(gw: &Gateway) {
    let resp = send(
        gw,
        Some(KEY),
        chat("qwen", true),
        &[("x-mock-delay-ms", "50"), ("x-mock-tokens", "100")],
    )
    .await;
    let mut s = resp.bytes_stream();
    let _ = s.next().await;
}

/// The value of one exposition line, e.g. `llm_edge_requests_total{...} 3`.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn series_count(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Traffic of every kind the scrape tells of (200, stream, 401 twice, 403, an
/// abandoned stream), then the scrape.
async fn scrape_after_mixed_traffic(mock: &MockLlama, gw: &Gateway) -> String {
    assert_eq!(
        send(gw, Some(KEY), chat("qwen", false), &[]).await.status(),
        200
    );
    let streamed = send(gw, Some(KEY), chat("qwen", true), &[("x-mock-tokens", "5")]).await;
    streamed.text().await.unwrap();
    assert_eq!(
        send(gw, Some("sk-nope"), chat("qwen", false), &[])
            .await
            .status(),
        401
    );
    assert_eq!(send(gw, None, chat("qwen", false), &[]).await.status(), 401);
    assert_eq!(
        send(gw, Some(KEY_LIMITED), chat("qwen", false), &[])
            .await
            .status(),
        403
    );
    abandon_stream(gw).await;
    eventually_async("the abort", async || mock.aborted() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    gw.scrape().await
}

#[tokio::test]
async fn the_scrape_tells_what_happened() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    let s = scrape_after_mixed_traffic(&mock, &gw).await;
    let get =
        |series: &str| value(&s, series).unwrap_or_else(|| panic!("{series} missing in:\n{s}"));
    assert_eq!(
        get(
            r#"llm_edge_requests_total{code="200",key="alice",model="qwen3",route="chat_completions"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            r#"llm_edge_requests_total{code="401",key="invalid",model="other",route="chat_completions"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"llm_edge_requests_total{code="401",key="anonymous",model="other",route="chat_completions"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"llm_edge_requests_total{code="499",key="alice",model="qwen3",route="chat_completions"}"#
        ),
        1.0
    );
    assert_eq!(
        get(r#"llm_edge_auth_failures_total{reason="invalid_api_key"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_edge_auth_failures_total{reason="missing_api_key"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_edge_auth_failures_total{reason="model_not_allowed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"llm_edge_client_disconnects_total{phase="streaming"}"#),
        1.0
    );
    // 8 tokens (non-streamed usage) + 5 (stream timings) + what the abandoned stream sent (>= 1)
    let completion = get(r#"llm_edge_tokens_total{key="alice",kind="completion",model="qwen3"}"#);
    assert!((14.0..=20.0).contains(&completion), "{completion}");
    assert!(get(r#"llm_edge_tokens_total{key="alice",kind="prompt",model="qwen3"}"#) > 0.0);
    assert_eq!(
        get(r#"llm_edge_time_to_first_token_seconds_count{model="qwen3"}"#),
        2.0
    );
    assert!(get(r#"llm_edge_inter_token_seconds_count{model="qwen3"}"#) >= 4.0);
    assert_eq!(get(r#"llm_edge_streams_active{model="qwen3"}"#), 0.0);
    assert_eq!(
        get("llm_edge_requests_in_flight"),
        0.0,
        "only the scrape itself is not a request"
    );
    assert_eq!(
        get(&format!(
            r#"llm_edge_upstream_up{{upstream="{}"}}"#,
            mock.addr
        )),
        1.0
    );
    assert!(get(r#"llm_edge_upstream_generation_tokens_per_second_count{model="qwen3"}"#) >= 2.0);
    assert!(s.contains("llm_edge_build_info{version="));
    assert!(get("process_resident_memory_bytes") > 0.0);
    assert!(get("process_open_fds") > 0.0);
    for secret in [KEY, KEY_LIMITED, "sk-nope"] {
        assert!(!s.contains(secret));
    }

    // Not on the public port by default.
    let public = reqwest::get(format!("{}/metrics", gw.url())).await.unwrap();
    assert_eq!(public.status(), 404);
}

#[tokio::test]
#[ignore = "needs promtool (Debian package prometheus); scripts/test.sh runs it"]
async fn promtool_accepts_the_scrape() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    let s = scrape_after_mixed_traffic(&mock, &gw).await;
    // promtool agrees with the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(s.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric names an expression reads (`llm_edge_*` and `process_*`).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("llm_edge_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// Created by a request's end, with its status code among the labels: there
/// is no bounded set to create up front (and every panel reading them sums
/// over all of them, so one request anywhere gives the panel data).
const CREATED_BY_THE_FIRST_REQUEST: &[&str] = &[
    "llm_edge_requests_total",
    "llm_edge_request_duration_seconds_bucket",
];

/// Exported only by an edge with a shared store (`state.redis`), from its
/// start (tests/shared.rs reads them): 0 on an edge without one would fire
/// the store alert.
const ONLY_WITH_A_STORE: &[&str] = &[
    "llm_edge_store_up",
    "llm_edge_store_calls_total",
    "llm_edge_store_errors_total",
    "llm_edge_store_fallbacks_total",
];

#[tokio::test]
async fn every_series_a_panel_or_alert_reads_exists_at_zero_from_start_up() {
    let mock = MockLlama::start(MockOptions::default()).await;
    // carol has token quotas: her quota-use gauges exist from the start too
    let carol = format!(
        "  - id: carol\n    sha256: {}\n    limits:\n      tokens_per_day: 1000\n      tokens_per_month: 9000\n",
        support::gateway::sha256_hex("sk-carol-quota-0123456789abcdef")
    );
    let gw = Gateway::start(&standard_config(&mock.url(), &carol));
    // The first scrape, before any request.
    let s = gw.scrape().await;
    let present = |name: &str| {
        s.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
    };
    let mut missing = Vec::new();
    for (what, expr) in dashboard_queries().into_iter().chain(alert_queries()) {
        for name in metric_names(&expr) {
            if !CREATED_BY_THE_FIRST_REQUEST.contains(&name.as_str())
                && !ONLY_WITH_A_STORE.contains(&name.as_str())
                && !present(&name)
            {
                missing.push(format!("{name} ({what})"));
            }
        }
    }
    assert!(missing.is_empty(), "absent at start-up: {missing:?}\n{s}");
    // Every label value a panel groups by, at 0: each configured key (and
    // `anonymous`, `invalid`) × each limit reason, each disconnect phase.
    for key in ["alice", "bob", "carol", "anonymous", "invalid"] {
        for reason in [
            "key_rate",
            "key_concurrency",
            "global_concurrency",
            "queue_full",
            "queue_timeout",
            "ip_auth_failures",
            "ip_concurrency",
            "key_uploads",
            "ip_uploads",
            "key_tokens_per_minute",
            "key_tokens_per_day",
            "key_tokens_per_month",
        ] {
            let series = format!(r#"llm_edge_rate_limited_total{{key="{key}",reason="{reason}"}}"#);
            assert_eq!(value(&s, &series), Some(0.0), "{series}");
        }
    }
    for period in ["day", "month"] {
        let series = format!(r#"llm_edge_key_quota_used_ratio{{key="carol",period="{period}"}}"#);
        assert_eq!(value(&s, &series), Some(0.0), "{series}");
    }
    for phase in ["before_first_token", "streaming"] {
        let series = format!(r#"llm_edge_client_disconnects_total{{phase="{phase}"}}"#);
        assert_eq!(value(&s, &series), Some(0.0), "{series}");
    }
    for model in ["qwen3", "small"] {
        let series = format!(r#"llm_edge_streams_active{{model="{model}"}}"#);
        assert_eq!(value(&s, &series), Some(0.0), "{series}");
    }
}

#[tokio::test]
async fn upstream_outage_is_counted() {
    let (_dead, port) = support::gateway::refused_port();
    let gw = Gateway::start(&standard_config(&format!("http://127.0.0.1:{port}"), ""));
    assert_eq!(
        send(&gw, Some(KEY), chat("qwen", false), &[])
            .await
            .status(),
        502
    );
    // Totals are recorded when the request's log line is written, just after the response.
    let refused =
        format!(r#"llm_edge_upstream_errors_total{{kind="refused",upstream="127.0.0.1:{port}"}}"#);
    eventually_async("the error to be counted", async || {
        value(&gw.scrape().await, &refused).is_some()
    })
    .await;
    let s = gw.scrape().await;
    assert_eq!(
        value(
            &s,
            &format!(
                r#"llm_edge_upstream_errors_total{{kind="refused",upstream="127.0.0.1:{port}"}}"#
            )
        ),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        value(
            &s,
            &format!(r#"llm_edge_upstream_up{{upstream="127.0.0.1:{port}"}}"#)
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn cardinality_is_bounded() {
    let mock = MockLlama::start(MockOptions::default()).await;
    // 1,000 wrong keys from one address would otherwise trip the failed-auth throttle.
    let gw = Gateway::start(&standard_config(
        &mock.url(),
        "downstream:\n  max_auth_failures_per_minute: null\n",
    ));
    let c = reqwest::Client::new();
    // Warm every label combination the flood below can produce once.
    send(&gw, Some("sk-warm"), chat("qwen", false), &[]).await;
    send(&gw, Some(KEY), chat("warm-model", false), &[]).await;
    c.get(format!("{}/warm/path", gw.url()))
        .send()
        .await
        .unwrap();
    get(&gw, "/v1/models/warm", KEY).await;
    let before = series_count(&gw.scrape().await);
    for i in 0..1000 {
        let r = send(
            &gw,
            Some(&format!("sk-random-{i}")),
            chat("qwen", false),
            &[],
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    for i in 0..200 {
        assert_eq!(
            send(&gw, Some(KEY), chat(&format!("model-{i}"), false), &[])
                .await
                .status(),
            404
        );
        c.get(format!("{}/random/{i}/path", gw.url()))
            .send()
            .await
            .unwrap();
        get(&gw, &format!("/v1/models/m{i}"), KEY).await;
    }
    let scrape = gw.scrape().await;
    assert_eq!(
        series_count(&scrape),
        before,
        "new series appeared:\n{scrape}"
    );
    assert!(
        !scrape.contains("sk-random") && !scrape.contains("model-1") && !scrape.contains("random/")
    );
}

#[tokio::test]
async fn metrics_token_and_public_listener() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let yaml = standard_config(
        &mock.url(),
        "metrics:\n  listen: null\n  bearer_token: scrape-secret\n  on_public_listener: true\n",
    );
    let gw = Gateway::start(&yaml);
    let c = reqwest::Client::new();
    let denied = c.get(format!("{}/metrics", gw.url())).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let body: Value = denied.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("metrics token"));
    let wrong = get(&gw, "/metrics", "nope").await;
    assert_eq!(wrong.status(), 401);
    let ok = get(&gw, "/metrics", "scrape-secret").await;
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("llm_edge_build_info"));
}

#[test]
#[ignore = "needs promtool (Debian package prometheus); scripts/test.sh runs it"]
fn alert_rules_pass_their_promtool_unit_tests() {
    let dir = Path::new(ROOT).join("conf/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus.

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(ROOT).join("conf/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: llm-edge\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package; scripts/install-test-deps.sh installs it)");
    let prom = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let ready = format!("{}/-/ready", prom.url);
    eventually_async("prometheus to be ready", async || {
        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    prom
}

impl Prometheus {
    /// Runs an instant query; Err if it does not parse or fails.
    async fn query(&self, expr: &str, at: Option<f64>) -> Result<Vec<Value>, String> {
        let mut params = vec![("query", expr.to_string())];
        if let Some(t) = at {
            params.push(("time", format!("{t:.3}")));
        }
        let resp: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&params)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if resp["status"] != "success" {
            return Err(resp.to_string());
        }
        Ok(resp["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Every PromQL expression the dashboard uses, with its variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("conf/grafana/llm-edge.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert!(
        !text.contains("uid\": \"P"),
        "no hard-coded datasource uids"
    );
    // A fixed uid: a re-import replaces the dashboard instead of adding a
    // copy, and links to it keep working.
    assert_eq!(dash["uid"], "llm-edge");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$model", ".*")
                .replace("$job", "llm-edge");
            out.push((
                format!(
                    "{} / {}",
                    panel["title"].as_str().unwrap(),
                    target["legendFormat"]
                ),
                expr,
            ));
        }
    }
    out
}

fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("conf/prometheus/alerts.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            out.push((
                rule["alert"].as_str().unwrap().to_string(),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// Alerts whose condition is legitimately false in this scenario: the query
/// must still parse and run, and `alerts_test.yml` proves each one fires.
const QUIET_ALERTS: &[(&str, &str)] = &[
    ("LlmEdgeDown", "the gateway is up throughout"),
    ("LlmEdgeAbsent", "the llm-edge target exists"),
    (
        "LlmEdgeSlowTimeToFirstToken",
        "the mock's first token takes milliseconds, not 10 s",
    ),
    ("LlmEdgeNoTokensFlowing", "tokens flow in this scenario"),
    (
        "LlmEdgeStoreUnreachable",
        "no shared store (state.redis) in this scenario: tests/shared.rs checks llm_edge_store_up",
    ),
];

#[tokio::test]
#[ignore = "needs a real prometheus server (Debian package prometheus); scripts/test.sh runs it"]
async fn a_real_prometheus_evaluates_every_dashboard_and_alert_query() {
    let mock = MockLlama::start(MockOptions::default()).await;
    // carol's daily quota: one request without max_tokens is given (and
    // the mock generates) all that is left of it, so her quota alert fires.
    const CAROL: &str = "sk-carol-quota-0123456789abcdef";
    let carol = format!(
        "  - id: carol\n    sha256: {}\n    limits:\n      tokens_per_day: 500\nledger:\n  flush_interval: 200ms\n",
        support::gateway::sha256_hex(CAROL)
    );
    let gw = Gateway::start(&standard_config(&mock.url(), &carol));
    let prom = start_prometheus(gw.metrics_addr.unwrap()).await;
    eventually_async("the first scrape", async || {
        prom.query(r#"up{job="llm-edge"} == 1"#, None)
            .await
            .is_ok_and(|r| !r.is_empty())
    })
    .await;

    // Normal traffic, spread over several scrapes as real traffic is: plain and
    // streamed, auth failures, a forbidden model, disconnects.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            send(&gw, Some(KEY), chat("qwen", false), &[])
                .await
                .status(),
            200
        );
        let s = send(
            &gw,
            Some(KEY),
            chat("qwen", true),
            &[("x-mock-tokens", "5"), ("x-mock-delay-ms", "5")],
        )
        .await;
        s.text().await.unwrap();
    }
    assert_eq!(
        send(&gw, Some(CAROL), chat("qwen", false), &[])
            .await
            .status(),
        200
    );
    send(&gw, Some("sk-wrong"), chat("qwen", false), &[]).await;
    send(&gw, None, chat("qwen", false), &[]).await;
    send(&gw, Some(KEY_LIMITED), chat("qwen", false), &[]).await;
    abandon_stream(&gw).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // An upstream outage: llama-server answers 503 (loading) and connections get cut.
    // Spread over several scrapes: rate() only sees increases after a series first appears.
    mock.set_loading(true);
    for _ in 0..6 {
        send(&gw, Some(KEY), chat("qwen", false), &[]).await;
        send(
            &gw,
            Some(KEY),
            chat("qwen", false),
            &[("x-mock-fault", "close-before-response")],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let during_outage = unix_now();
    eventually_async("upstream_up to drop", async || {
        prom.query("llm_edge_upstream_up == 0", None)
            .await
            .is_ok_and(|r| !r.is_empty())
    })
    .await;
    mock.set_loading(false);
    for _ in 0..5 {
        let s = send(
            &gw,
            Some(KEY),
            chat("small", true),
            &[("x-mock-tokens", "5")],
        )
        .await;
        s.text().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = unix_now();

    let mut empty = Vec::new();
    for (name, expr) in dashboard_queries() {
        let result = prom
            .query(&expr, Some(end))
            .await
            .unwrap_or_else(|e| panic!("{name}: {expr}: {e}"));
        // No store in this scenario: those queries must parse and run.
        let store_only = metric_names(&expr)
            .iter()
            .all(|m| ONLY_WITH_A_STORE.contains(&m.as_str()));
        if result.is_empty() && !store_only {
            empty.push(format!("dashboard {name}: {expr}"));
        }
    }
    for (alert, expr) in alert_queries() {
        let mut has_data = false;
        for at in [during_outage, end] {
            let result = prom
                .query(&expr, Some(at))
                .await
                .unwrap_or_else(|e| panic!("{alert}: {e}"));
            has_data |= !result.is_empty();
        }
        let quiet = QUIET_ALERTS.iter().any(|(a, _)| *a == alert);
        assert!(
            !(quiet && has_data),
            "{alert} fired although nothing is wrong"
        );
        if !quiet && !has_data {
            empty.push(format!("alert {alert}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
}
