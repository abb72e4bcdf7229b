//! Several upstream servers through the real binary: least-in-flight
//! balancing (cache-affinity routing: `tests/affinity.rs`), active health checks, failover when a connect fails, a 503
//! naming every server when all are down, recovery, per-model servers and
//! per-server slots.

mod support;

use std::time::{Duration, Instant};

use mock_llama::{MockLlama, MockOptions};
use serde_json::{json, Value};
use support::gateway::{sha256_hex, Gateway, KEY};

/// `servers`: (name, url); `server_extra`: fields added to each server;
/// `models`: YAML for `models:`. Health checks every 200 ms.
fn config(servers: &[(&str, String)], server_extra: &str, models: &str) -> String {
    config_with(servers, server_extra, models, "200ms", "")
}

/// [`config`] with another `health_interval` and more `upstream` fields.
fn config_with(
    servers: &[(&str, String)],
    server_extra: &str,
    models: &str,
    health_interval: &str,
    upstream_extra: &str,
) -> String {
    let mut yaml = format!(
        "upstream:\n  connect_timeout: 2s\n  health_interval: {health_interval}\n  health_timeout: 1s\n  queue_timeout: 20s\n{upstream_extra}  servers:\n",
    );
    for (name, url) in servers {
        yaml.push_str(&format!(
            "    - name: {name}\n      url: {url}\n{server_extra}"
        ));
    }
    yaml.push_str(models);
    yaml.push_str(&format!(
        "keys:\n  - id: alice\n    sha256: {}\n",
        sha256_hex(KEY)
    ));
    yaml
}

const ONE_MODEL: &str = "models:\n  - name: qwen\n";

/// `upstream.routing: least_load`, for tests of least-load spreading.
const LEAST_LOAD: &str = "  routing: least_load\n";

fn chat_body(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

async fn chat(gw: &Gateway, model: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .body(chat_body(model, false));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("gateway answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A streamed chat of `tokens` tokens `delay_ms` apart; (status, whole text).
fn spawn_stream(url: String, tokens: u32, delay_ms: u32) -> tokio::task::JoinHandle<(u16, String)> {
    tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-mock-tokens", tokens.to_string())
            .header("x-mock-delay-ms", delay_ms.to_string())
            .body(chat_body("qwen", true))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

/// Chat requests (not health probes) a mock received.
fn chats(mock: &MockLlama) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count()
}

async fn upstream_health(gw: &Gateway) -> (u16, Value) {
    let resp = reqwest::get(format!("{}/health/upstream", gw.url()))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Waits (bounded) until `/health/upstream` reports `status` for server `name`.
async fn wait_for_server_status(gw: &Gateway, name: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = upstream_health(gw).await;
        let found = body["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == name && s["status"] == status);
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_requests_go_to_the_server_with_the_fewest_in_flight() {
    let mocks = [
        MockLlama::start(MockOptions::default()).await,
        MockLlama::start(MockOptions::default()).await,
        MockLlama::start(MockOptions::default()).await,
    ];
    let servers = [
        ("a", mocks[0].url()),
        ("b", mocks[1].url()),
        ("c", mocks[2].url()),
    ];
    let gw = Gateway::start(&config(&servers, "", ONE_MODEL));

    // Two long generations, started one after the other, land on two
    // different servers.
    let mut long = Vec::new();
    for started in 1..=2usize {
        long.push(spawn_stream(gw.url(), 100, 50));
        let deadline = Instant::now() + Duration::from_secs(10);
        while mocks.iter().map(MockLlama::active).sum::<usize>() < started {
            assert!(Instant::now() < deadline, "stream {started} never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let busy: Vec<usize> = mocks.iter().map(MockLlama::active).collect();
    assert_eq!(busy.iter().filter(|&&n| n == 1).count(), 2, "{busy:?}");
    let idle = busy.iter().position(|&n| n == 0).unwrap();

    // Meanwhile every new request goes to the idle one.
    for _ in 0..6 {
        let (status, body) = chat(&gw, "qwen", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let got: Vec<usize> = mocks.iter().map(chats).collect();
    assert_eq!(
        got[idle], 6,
        "all short requests to the idle server: {got:?}"
    );
    for t in long {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(text.ends_with("data: [DONE]\n\n"));
    }

    // With nothing in flight, equal servers take turns.
    for _ in 0..30 {
        assert_eq!(chat(&gw, "qwen", &[]).await.0, 200);
    }
    let got: Vec<usize> = mocks.iter().map(chats).collect();
    assert!(got.iter().all(|&n| n >= 8), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_is_failed_over_marked_down_and_rejoins_after_restart() {
    let a = MockLlama::start(MockOptions::default()).await;
    let b = MockLlama::start(MockOptions::default()).await;
    let a_port = a.addr.port();
    // Least load spreads these identical requests (affinity would keep them together).
    let gw = Gateway::start(&config_with(
        &[("a", a.url()), ("b", b.url())],
        "",
        ONE_MODEL,
        "200ms",
        LEAST_LOAD,
    ));
    wait_for_server_status(&gw, "a", "ok").await;
    for _ in 0..10 {
        assert_eq!(chat(&gw, "qwen", &[]).await.0, 200);
    }
    assert!(
        chats(&a) >= 3 && chats(&b) >= 3,
        "{} / {}",
        chats(&a),
        chats(&b)
    );

    // Killed: its port is closed. No request fails, whether the health
    // check noticed yet or not: a refused connect moves on to b.
    a.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(a.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "a's port never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_b = chats(&b);
    for i in 0..20 {
        let (status, body) = chat(&gw, "qwen", &[]).await;
        assert_eq!(status, 200, "request {i} after the kill: {body}");
    }
    assert_eq!(chats(&b) - before_b, 20);
    wait_for_server_status(&gw, "a", "unreachable").await;
    let (status, health) = upstream_health(&gw).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );
    // `llm-edge check` on a client machine says so, and still passes the chat.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-edge"))
        .args(["check", "--json", "--base-url", &gw.url(), "--api-key", KEY])
        .env_remove("LLM_API_KEY")
        .env_remove("LLM_BASE_URL")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("check finished")
        .expect("check ran");
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let step = |name: &str| {
        report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(step("upstream")["status"], "warn", "{report:#}");
    assert!(
        step("upstream")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("a (unreachable)"),
        "{report:#}"
    );
    assert_eq!(step("chat")["status"], "pass", "{report:#}");
    let scrape = gw.scrape().await;
    assert_eq!(metric(&scrape, "llm_edge_upstream_up{upstream=\"a\"}"), 0.0);
    assert_eq!(metric(&scrape, "llm_edge_upstream_up{upstream=\"b\"}"), 1.0);
    // A failed connect counts against a: once per request that tried a.
    assert!(
        metric(
            &scrape,
            "llm_edge_upstream_errors_total{kind=\"refused\",upstream=\"a\"}"
        ) >= 1.0,
        "{scrape}"
    );
    assert_eq!(
        metric(
            &scrape,
            "llm_edge_upstream_errors_total{kind=\"refused\",upstream=\"b\"}"
        ),
        0.0
    );

    // Restarted on the same port: the health check brings it back.
    let a = MockLlama::start_on(a_port, MockOptions::default()).await;
    wait_for_server_status(&gw, "a", "ok").await;
    let (status, health) = upstream_health(&gw).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    for _ in 0..10 {
        assert_eq!(chat(&gw, "qwen", &[]).await.0, 200);
    }
    assert!(chats(&a) >= 3, "a takes traffic again: {}", chats(&a));
    assert!(gw.log().contains("upstream a (127.0.0.1"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_servers_down_or_loading_is_a_503_naming_each() {
    let a = MockLlama::start(MockOptions::default()).await;
    let b = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&config(&[("a", a.url()), ("b", b.url())], "", ONE_MODEL));
    a.set_loading(true);
    b.stop();
    wait_for_server_status(&gw, "a", "loading").await;
    wait_for_server_status(&gw, "b", "unreachable").await;

    let (status, body) = chat(&gw, "qwen", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    for part in [
        "all 2 upstream servers for model 'qwen'",
        "a (loading",
        "b (down",
    ] {
        assert!(message.contains(part), "{message} lacks {part}");
    }
    assert_eq!(chats(&a), 0, "a loading server gets no generations");
    let (status, health) = upstream_health(&gw).await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["error"]["code"], "upstream_unavailable");
    // The gateway itself keeps serving.
    let models = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);

    // Model loaded: back without a restart of the gateway.
    a.set_loading(false);
    wait_for_server_status(&gw, "a", "ok").await;
    assert_eq!(chat(&gw, "qwen", &[]).await.0, 200);
    assert_eq!(chats(&a), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_server_refusing_is_a_503_naming_each() {
    let (_held_a, port_a) = support::gateway::refused_port();
    let (_held_b, port_b) = support::gateway::refused_port();
    let servers = [
        ("a", format!("http://127.0.0.1:{port_a}")),
        ("b", format!("http://127.0.0.1:{port_b}")),
    ];
    // No health check in this test: the request itself tries both.
    let gw = Gateway::start(&config_with(&servers, "", ONE_MODEL, "1h", ""));
    let (status, body) = chat(&gw, "qwen", &[]).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("a (down: connection refused)") && message.contains("b (down"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_pinned_to_servers_go_only_there() {
    let a = MockLlama::start(MockOptions::default()).await;
    let b = MockLlama::start(MockOptions::default()).await;
    let models =
        "models:\n  - name: big\n    upstreams: [a]\n  - name: small\n    upstreams: [b]\n";
    let gw = Gateway::start(&config(&[("a", a.url()), ("b", b.url())], "", models));
    for _ in 0..5 {
        assert_eq!(chat(&gw, "big", &[]).await.0, 200);
        assert_eq!(chat(&gw, "small", &[]).await.0, 200);
    }
    assert_eq!((chats(&a), chats(&b)), (5, 5));
    for r in a
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
    {
        assert_eq!(r.json()["model"], "big");
    }

    // big's only server is gone: its own error (the tunnel hint), while
    // small is unaffected.
    a.stop();
    let (status, body) = chat(&gw, "big", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("SSH tunnel"));
    assert_eq!(chat(&gw, "small", &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_server_gets_at_most_its_slots() {
    let a = MockLlama::start(MockOptions::default()).await;
    let b = MockLlama::start(MockOptions::default()).await;
    let slots = "      max_in_flight: 1\n";
    let gw = Gateway::start(&config_with(
        &[("a", a.url()), ("b", b.url())],
        slots,
        ONE_MODEL,
        "200ms",
        LEAST_LOAD,
    ));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(spawn_stream(gw.url(), 5, 20));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!((a.max_active(), b.max_active()), (1, 1));
    assert_eq!(chats(&a) + chats(&b), 8);
    assert!(
        chats(&a) >= 2 && chats(&b) >= 2,
        "{} / {}",
        chats(&a),
        chats(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_and_other_v1_paths_fail_over_too() {
    let (_held, dead) = support::gateway::refused_port();
    let b = MockLlama::start(MockOptions::default()).await;
    let servers = [("a", format!("http://127.0.0.1:{dead}")), ("b", b.url())];
    // No health check in this test: the failed connects move the requests on.
    let yaml =
        config_with(&servers, "", ONE_MODEL, "1h", "") + "routes:\n  passthrough: [/v1/tokenize]\n";
    let gw = Gateway::start(&yaml);
    let client = reqwest::Client::new();
    for i in 0..6 {
        let resp = client
            .post(format!("{}/v1/embeddings", gw.url()))
            .bearer_auth(KEY)
            .body(json!({"model": "qwen", "input": "hi"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "embeddings request {i}");
        // An operator-opened passthrough path: relayed as it is, retried on b.
        let resp = client
            .post(format!("{}/v1/tokenize", gw.url()))
            .bearer_auth(KEY)
            .body(r#"{"content":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "b's own answer, not a gateway error");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["message"], "File Not Found");
    }
    let count = |path: &str| b.requests().iter().filter(|r| r.path == path).count();
    assert_eq!((count("/v1/embeddings"), count("/v1/tokenize")), (6, 6));
    // Each path found a refused once (then a was marked down and skipped).
    let scrape = gw.scrape().await;
    let refused = metric(
        &scrape,
        "llm_edge_upstream_errors_total{kind=\"refused\",upstream=\"a\"}",
    );
    assert!((1.0..=12.0).contains(&refused), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_server_hands_requests_to_one_with_room() {
    let a = MockLlama::start(MockOptions::default()).await;
    let b = MockLlama::start(MockOptions::default()).await;
    // a has 1 slot, b 4; nothing may wait in a queue.
    let yaml = config_with(
        &[("a", a.url()), ("b", b.url())],
        "",
        ONE_MODEL,
        "200ms",
        "  max_queued: 0\n",
    )
    .replace(
        &format!("      url: {}\n", a.url()),
        &format!("      url: {}\n      max_in_flight: 1\n", a.url()),
    )
    .replace(
        &format!("      url: {}\n", b.url()),
        &format!("      url: {}\n      max_in_flight: 4\n", b.url()),
    );
    let gw = Gateway::start(&yaml);
    let streams: Vec<_> = (0..5).map(|_| spawn_stream(gw.url(), 20, 50)).collect();
    for t in streams {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!((a.max_active(), chats(&a) + chats(&b)), (1, 5));
    assert!(b.max_active() <= 4, "{}", b.max_active());

    // Both full: the sixth is refused at once, not queued.
    let streams: Vec<_> = (0..5).map(|_| spawn_stream(gw.url(), 40, 50)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.active() + b.active() < 5 {
        assert!(Instant::now() < deadline, "the five never all started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = chat(&gw, "qwen", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_busy");
    for t in streams {
        assert_eq!(t.await.unwrap().0, 200);
    }
}
