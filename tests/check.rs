//! `llm-edge check` against a real gateway in front of the mock llama-server,
//! and against broken setups: nothing listening, a silent port, a wrong key,
//! an unknown model, a dead tunnel, a loading model, a broken stream.

mod support;

use std::process::Stdio;
use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};
use serde_json::{json, Value};
use support::gateway::{standard_config, Gateway, KEY, KEY_LIMITED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const NAMES: [&str; 5] = ["connection", "upstream", "models", "chat", "streaming"];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `llm-edge check ARGS` with only `env` of the check variables set.
/// Async, so the mock keeps serving on this runtime meanwhile; bounded.
async fn check(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-edge"));
    cmd.arg("check").args(args);
    for var in [
        "LLM_BASE_URL",
        "LLM_API_KEY",
        "LLM_MODEL",
        "TEST_BASE_URL",
        "TEST_API_KEY",
        "TEST_MODEL",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("llm-edge check finished within 60 s")
        .expect("run llm-edge check");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn check_json(args: &[&str], env: &[(&str, &str)]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let run = check(&all, env).await;
    let v = run.json();
    (run.code, v)
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {v:#}"))
}

fn status_of(v: &Value) -> Vec<String> {
    NAMES
        .iter()
        .map(|n| step(v, n)["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn hint(v: &Value, name: &str) -> String {
    step(v, name)["hint"].as_str().unwrap_or("").to_string()
}

async fn setup() -> (MockLlama, Gateway) {
    let mock = MockLlama::start(MockOptions {
        // Tokens spaced in time, so that a rate can be measured.
        token_delay: Duration::from_millis(5),
        ..MockOptions::default()
    })
    .await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    (mock, gw)
}

#[tokio::test]
async fn everything_passes_against_a_healthy_gateway() {
    let (mock, gw) = setup().await;
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", KEY], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["base_url"], format!("{}/v1", gw.url()));
    assert_eq!(v["root_url"], gw.url());
    assert_eq!(v["model"], "qwen3", "the first listed model");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, NAMES);
    for c in v["checks"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["status"], "pass", "{c}");
        assert!(c["hint"].is_null(), "{c}");
    }
    assert!(step(&v, "connection")["latency_ms"].is_u64());
    assert_eq!(step(&v, "upstream")["upstream_status"], "ok");
    assert_eq!(
        step(&v, "models")["models"],
        json!(["qwen3", "small", "qwen", "default"])
    );
    let chat = step(&v, "chat");
    assert_eq!(chat["model"], "qwen3");
    assert_eq!(chat["completion_tokens"], 16, "max_tokens 16: {chat}");
    assert!(chat["reply"].as_str().unwrap().starts_with("tok0 tok1"));

    let stream = step(&v, "streaming");
    assert_eq!(stream["done"], true);
    assert_eq!(stream["tokens"], 16, "{stream}");
    assert!(stream["ttft_ms"].is_u64(), "{stream}");
    assert!(
        stream["tokens_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{stream}"
    );
    assert!(stream["generation_ms"].is_u64(), "{stream}");

    // What reached llama-server: the short streamed request, under the upstream name.
    let last = mock.last_request().unwrap().json();
    assert_eq!(last["model"], "/models/qwen3-30b.gguf");
    assert_eq!(last["stream"], true);
    assert_eq!(last["max_tokens"], 16);

    // The human form: one line per step, then the summary.
    let run = check(&["--base-url", &gw.url(), "--api-key", KEY], &[]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", run.stdout);
    assert!(
        lines[0].starts_with(&format!(
            "PASS connection  gateway at {} answered in ",
            gw.url()
        )),
        "{}",
        run.stdout
    );
    for (line, name) in lines.iter().zip(NAMES) {
        assert!(line.starts_with(&format!("PASS {name:<10}  ")), "{line}");
    }
    assert!(lines[4].contains("data: [DONE] after 16 tokens; first token after "));
    assert!(lines[4].contains("tokens/s"), "{}", lines[4]);
    assert!(
        lines[5].starts_with("result: ok (5 passed)"),
        "{}",
        lines[5]
    );
}

#[tokio::test]
async fn the_base_url_may_end_in_v1_and_a_slash() {
    let (_mock, gw) = setup().await;
    for url in [
        format!("{}/v1", gw.url()),
        format!("{}/v1/", gw.url()),
        format!("{}/", gw.url()),
    ] {
        let (code, v) = check_json(&["--base-url", &url, "--api-key", KEY], &[]).await;
        assert_eq!(code, 0, "{url}: {v:#}");
        assert_eq!(v["base_url"], format!("{}/v1", gw.url()), "{url}");
        assert_eq!(status_of(&v), ["pass"; 5], "{url}");
    }
}

#[tokio::test]
async fn settings_come_from_llm_then_test_variables() {
    let (_mock, gw) = setup().await;
    let url = format!("{}/v1", gw.url());

    let (code, v) = check_json(
        &[],
        &[
            ("LLM_BASE_URL", &url),
            ("LLM_API_KEY", KEY),
            ("LLM_MODEL", "small"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["model"], "small");
    assert_eq!(step(&v, "chat")["model"], "small");

    // The seed's variables alone.
    let (code, v) = check_json(
        &[],
        &[
            ("TEST_BASE_URL", &gw.url()),
            ("TEST_API_KEY", KEY),
            ("TEST_MODEL", "qwen"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["model"], "qwen");

    // LLM_* wins over TEST_*, and a flag over both.
    let (code, v) = check_json(
        &[],
        &[
            ("LLM_BASE_URL", &url),
            ("TEST_BASE_URL", "http://127.0.0.1:1"),
            ("LLM_API_KEY", KEY),
            ("TEST_API_KEY", "sk-wrong"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    let (code, v) = check_json(
        &["--api-key", "sk-wrong", "--model", "small"],
        &[
            ("LLM_BASE_URL", &url),
            ("LLM_API_KEY", KEY),
            ("LLM_MODEL", "qwen3"),
        ],
    )
    .await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["model"], "small");
    assert_eq!(step(&v, "models")["http_status"], 401);
}

#[tokio::test]
async fn no_base_url_is_a_usage_error() {
    let run = check(&[], &[]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("LLM_BASE_URL"), "{}", run.stderr);

    let run = check(&["--json"], &[("LLM_API_KEY", KEY)]).await;
    assert_eq!(run.code, 2);
    let v = run.json();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("--base-url"));

    for bad in [
        vec!["--base-url", "127.0.0.1:8000"],
        vec!["--base-url", "ftp://127.0.0.1/"],
        vec!["--base-url", "http://127.0.0.1:1", "--timeout", "0"],
    ] {
        let run = check(&bad, &[]).await;
        assert_eq!(run.code, 2, "{bad:?}: {}{}", run.stdout, run.stderr);
    }
}

#[tokio::test]
async fn connection_refused_says_the_gateway_is_not_running() {
    let (_dead, port) = support::gateway::refused_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let (code, v) = check_json(&["--base-url", &url, "--api-key", KEY], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["ok"], false);
    assert_eq!(
        status_of(&v),
        ["fail", "skipped", "skipped", "skipped", "skipped"]
    );
    let conn = step(&v, "connection");
    assert_eq!(conn["ok"], false);
    assert_eq!(conn["error"], "connection_refused", "{conn}");
    assert!(
        hint(&v, "connection").contains("gateway not running or port closed"),
        "{conn}"
    );
    assert!(step(&v, "chat")["detail"]
        .as_str()
        .unwrap()
        .starts_with("skipped"));

    let run = check(&["--base-url", &url], &[]).await;
    assert_eq!(run.code, 1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("FAIL connection  "), "{}", run.stdout);
    assert!(
        lines[0].contains(" -> hint: gateway not running"),
        "{}",
        run.stdout
    );
    assert!(
        lines[1].starts_with("SKIP upstream    skipped: "),
        "{}",
        run.stdout
    );
    assert!(
        lines[5].starts_with("result: FAILED (0 passed, 1 failed, 4 skipped)"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_silent_port_times_out_with_the_firewall_hint() {
    // Accepts connections, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let url = format!("http://{addr}");
    let (code, v) = check_json(&["--base-url", &url, "--timeout", "1"], &[]).await;
    holder.abort();
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(status_of(&v)[0], "fail");
    let conn = step(&v, "connection");
    assert_eq!(conn["error"], "timeout", "{conn}");
    assert!(
        conn["detail"].as_str().unwrap().contains("within 1 s"),
        "{conn}"
    );
    assert!(
        hint(&v, "connection").contains("firewall or wrong address"),
        "{conn}"
    );
    assert_eq!(step(&v, "streaming")["status"], "skipped");
}

#[tokio::test]
async fn https_to_a_plain_http_port_is_a_tls_failure() {
    let (_mock, gw) = setup().await;
    let url = format!("https://{}/v1", gw.addr);
    let (code, v) = check_json(&["--base-url", &url, "--timeout", "5"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    let conn = step(&v, "connection");
    assert_eq!(conn["error"], "tls", "{conn}");
    assert!(hint(&v, "connection").contains("TLS"), "{conn}");
}

#[tokio::test]
async fn a_wrong_or_missing_key_fails_auth_with_the_key_hint() {
    let (_mock, gw) = setup().await;
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", "sk-wrong"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        status_of(&v),
        ["pass", "pass", "fail", "skipped", "skipped"]
    );
    let models = step(&v, "models");
    assert_eq!(models["http_status"], 401);
    assert_eq!(models["error_code"], "invalid_api_key");
    let h = hint(&v, "models");
    assert!(h.starts_with("key missing/wrong: check LLM_API_KEY"), "{h}");

    // The key from the environment: the hint names the variable.
    let (_, v) = check_json(
        &[],
        &[("LLM_BASE_URL", &gw.url()), ("LLM_API_KEY", "sk-wrong")],
    )
    .await;
    assert_eq!(hint(&v, "models"), "key missing/wrong: check LLM_API_KEY");

    let (code, v) = check_json(&["--base-url", &gw.url()], &[]).await;
    assert_eq!(code, 1);
    assert_eq!(step(&v, "models")["error_code"], "missing_api_key");
    assert!(hint(&v, "models").contains("LLM_API_KEY"), "{v:#}");
}

#[tokio::test]
async fn an_unknown_model_lists_the_available_ones() {
    let (_mock, gw) = setup().await;
    let (code, v) = check_json(
        &["--base-url", &gw.url(), "--api-key", KEY, "--model", "nope"],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(status_of(&v), ["pass", "pass", "pass", "fail", "skipped"]);
    let chat = step(&v, "chat");
    assert_eq!(chat["http_status"], 404);
    assert_eq!(chat["error_code"], "model_not_found");
    assert!(chat["detail"]
        .as_str()
        .unwrap()
        .starts_with("404 model_not_found: "));
    let h = hint(&v, "chat");
    assert!(
        h.contains("'nope'") && h.contains("qwen3, small, qwen, default"),
        "{h}"
    );

    let run = check(
        &["--base-url", &gw.url(), "--api-key", KEY, "--model", "nope"],
        &[],
    )
    .await;
    let chat_line = run.stdout.lines().nth(3).unwrap_or("").to_string();
    assert!(
        chat_line.starts_with("FAIL chat        404 model_not_found: "),
        "{}",
        run.stdout
    );
    assert!(
        chat_line.contains(" -> hint: the model 'nope'"),
        "{chat_line}"
    );
}

#[tokio::test]
async fn a_model_the_key_may_not_use_is_a_403_with_its_models() {
    let (_mock, gw) = setup().await;
    let (code, v) = check_json(
        &[
            "--base-url",
            &gw.url(),
            "--api-key",
            KEY_LIMITED,
            "--model",
            "qwen3",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(step(&v, "models")["models"], json!(["small"]));
    let chat = step(&v, "chat");
    assert_eq!(chat["http_status"], 403);
    assert_eq!(chat["error_code"], "model_not_allowed");
    let h = hint(&v, "chat");
    assert!(
        h.contains("may not use the model 'qwen3'") && h.contains("small"),
        "{h}"
    );

    // Without --model, the first model the key lists is used.
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", KEY_LIMITED], &[]).await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["model"], "small");
}

#[tokio::test]
async fn a_dead_tunnel_is_named_by_upstream_and_chat() {
    // The gateway points at a port where nothing listens: the tunnel is down.
    let (_dead, port) = support::gateway::refused_port();
    let gw = Gateway::start(&standard_config(&format!("http://127.0.0.1:{port}"), ""));
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", KEY], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        status_of(&v),
        ["pass", "warn", "pass", "fail", "skipped"],
        "{v:#}"
    );
    let up = step(&v, "upstream");
    assert_eq!(up["ok"], false);
    assert_eq!(up["upstream_status"], "unreachable");
    assert!(hint(&v, "upstream").contains("SSH tunnel on the edge (Machine B) is down"));
    let chat = step(&v, "chat");
    assert_eq!(chat["http_status"], 502);
    assert_eq!(chat["error_code"], "upstream_unreachable");
    assert!(
        hint(&v, "chat").contains(
            "the SSH tunnel on the edge (Machine B) is down or llama-server is not running"
        ),
        "{chat}"
    );
}

#[tokio::test]
async fn a_loading_model_is_reported_as_loading() {
    let (mock, gw) = setup().await;
    mock.set_loading(true);
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", KEY], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        status_of(&v),
        ["pass", "warn", "pass", "fail", "skipped"],
        "{v:#}"
    );
    assert_eq!(step(&v, "upstream")["upstream_status"], "loading");
    assert!(
        hint(&v, "upstream").starts_with("model still loading"),
        "{v:#}"
    );
    assert_eq!(step(&v, "chat")["http_status"], 503);
    assert!(hint(&v, "chat").starts_with("model still loading"), "{v:#}");

    mock.set_loading(false);
    let (code, v) = check_json(&["--base-url", &gw.url(), "--api-key", KEY], &[]).await;
    assert_eq!(code, 0, "{v:#}");
}

// --- A hand-written gateway for the stream endings a real one rarely shows ---

#[derive(Clone, Copy)]
enum StreamEnd {
    /// One delta, then an OpenAI error event, then the connection closes.
    ErrorEvent,
    /// One delta, then the connection closes: no `[DONE]`.
    Cut,
}

async fn fake_gateway(end: StreamEnd) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut stream).await else {
                    return;
                };
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (ctype, payload) = match path.as_str() {
                    "/health" | "/health/upstream" => {
                        ("application/json", r#"{"status":"ok"}"#.to_string())
                    }
                    "/v1/models" => (
                        "application/json",
                        r#"{"object":"list","data":[{"id":"m1","object":"model"}]}"#.into(),
                    ),
                    _ if body.contains("\"stream\":true") => {
                        let delta = r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
                        let tail = match end {
                            StreamEnd::ErrorEvent => "data: {\"error\":{\"message\":\"the upstream at 127.0.0.1:8080 failed mid-reply\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_error\"}}\n\n",
                            StreamEnd::Cut => "",
                        };
                        ("text/event-stream", format!("{delta}\n\n{tail}"))
                    }
                    _ => (
                        "application/json",
                        r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"completion_tokens":1}}"#.into(),
                    ),
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n{payload}"
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some((head, text[end + 4..].to_string()));
            }
        }
    }
}

#[tokio::test]
async fn a_stream_ending_in_an_error_event_fails_naming_it() {
    let url = fake_gateway(StreamEnd::ErrorEvent).await;
    let (code, v) = check_json(&["--base-url", &url, "--api-key", "k"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        status_of(&v),
        ["pass", "pass", "pass", "pass", "fail"],
        "{v:#}"
    );
    let s = step(&v, "streaming");
    assert_eq!(s["done"], false);
    assert_eq!(s["tokens"], 1);
    assert_eq!(s["error_code"], "upstream_error");
    assert!(
        s["detail"]
            .as_str()
            .unwrap()
            .contains("upstream_error: the upstream at 127.0.0.1:8080 failed mid-reply"),
        "{s}"
    );
    assert!(hint(&v, "streaming").contains("SSH tunnel"), "{s}");
}

#[tokio::test]
async fn a_stream_without_done_fails() {
    let url = fake_gateway(StreamEnd::Cut).await;
    let (code, v) = check_json(&["--base-url", &url, "--api-key", "k"], &[]).await;
    assert_eq!(code, 1, "{v:#}");
    let s = step(&v, "streaming");
    assert_eq!(s["status"], "fail", "{s}");
    assert_eq!(s["done"], false);
    assert!(
        s["detail"]
            .as_str()
            .unwrap()
            .contains("without data: [DONE] after 1 tokens"),
        "{s}"
    );
}
