//! Tokens are the budget: per-key token limits and quotas reserved before
//! and settled after, the rate-limit headers, and the usage ledger that
//! survives a crash, through the real binary.

mod support;

use serde_json::Value;
use support::gateway::{setup, sha256_hex, Gateway, KEY};
use support::http::{client, error_of, eventually_async, post_chat};

const CAROL: &str = "sk-carol-0123456789abcdef0123456789";

fn carol(limits: &str) -> String {
    format!(
        "  - id: carol\n    sha256: {}\n    limits:\n{limits}",
        sha256_hex(CAROL)
    )
}

async fn usage(gw: &Gateway, query: &str) -> Value {
    client()
        .get(format!("{}/usage?{query}", gw.metrics_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One chat body: its size fixes the prompt estimate (bytes / 3).
fn body(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"qwen","messages":[{{"role":"user","content":"count me"}}],"max_tokens":{max_tokens}}}"#
    )
}

#[tokio::test]
async fn fifty_concurrent_requests_never_pass_the_minute_budget_and_every_token_is_counted() {
    let b = body(20);
    let worst = (b.len() as u64).div_ceil(3) + 20;
    // room for exactly ten worst cases
    let (mock, gw) = setup(&carol(&format!(
        "      tokens_per_minute: {}\n",
        worst * 10
    )))
    .await;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, b) = (gw.url(), b.clone());
            tokio::spawn(async move {
                client()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(CAROL)
                    .header("x-mock-delay-ms", "20")
                    .body(b)
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (mut ok, mut limited, mut reported) = (0, 0, 0u64);
    for t in tasks {
        let resp = t.await.unwrap();
        match resp.status().as_u16() {
            200 => {
                ok += 1;
                let v: Value = resp.json().await.unwrap();
                reported += v["usage"]["total_tokens"].as_u64().unwrap();
            }
            429 => {
                limited += 1;
                assert!(resp.headers().contains_key("retry-after"));
                assert_eq!(
                    resp.headers()["x-ratelimit-limit-tokens"],
                    (worst * 10).to_string()
                );
                let (_, e) = error_of(resp).await;
                assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{e}");
                assert!(e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("tokens per minute"));
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok + limited, 50);
    assert_eq!(
        mock.requests().len(),
        ok,
        "a refused request reached the upstream"
    );
    // Ten worst cases fit at once; a request that used less than it
    // reserved gives the rest back, so a later one may take its place, but
    // what was used never passes the budget (plus its refill meanwhile).
    assert!(ok >= 10, "{ok} admitted: the budget fits 10 worst cases");
    assert!(mock.max_active() <= 10, "{} at once", mock.max_active());
    let budget = (worst * 10) as f64 * (1.0 + started.elapsed().as_secs_f64() / 60.0);
    assert!(
        reported as f64 <= budget,
        "{reported} tokens used, budget {budget}"
    );
    // every token the upstream reported is in the ledger, no more
    let doc = usage(&gw, "key=carol").await;
    assert_eq!(doc["total"]["total_tokens"], reported, "{doc}");
    // refused ones are requests too, with an error
    assert_eq!(doc["total"]["requests"], 50, "{doc}");
    assert_eq!(doc["total"]["errors"], limited as u64, "{doc}");
    let scrape = gw.scrape().await;
    assert!(
        scrape.contains(
            "llm_edge_rate_limited_total{key=\"carol\",reason=\"key_tokens_per_minute\"}"
        ),
        "{scrape}"
    );
}

#[tokio::test]
async fn a_request_without_max_tokens_is_held_to_what_the_budget_has_left() {
    let (mock, gw) = setup(&carol("      tokens_per_minute: 500\n")).await;
    let resp = post_chat(
        &gw,
        CAROL,
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let sent = mock.last_request().unwrap().json();
    let written = sent["max_tokens"].as_u64().expect("a length was written");
    assert!(written > 0 && written < 500, "{sent}");
    // headers on the answer: this key has a token limit only
    assert!(resp.headers().contains_key("x-ratelimit-remaining-tokens"));
    assert!(!resp.headers().contains_key("x-ratelimit-limit-requests"));
    // a key without limits gets none
    let free = post_chat(&gw, KEY, r#"{"messages":[]}"#, &[]).await;
    assert!(!free.headers().contains_key("x-ratelimit-limit-tokens"));
}

#[tokio::test]
async fn a_spent_daily_quota_is_an_anthropic_429_on_messages_and_never_reaches_the_upstream() {
    let (mock, gw) = setup(&carol(
        "      tokens_per_day: 200\n      requests_per_minute: 100\n",
    ))
    .await;
    let messages = |max: u64| {
        client()
            .post(format!("{}/v1/messages", gw.url()))
            .header("x-api-key", CAROL)
            .header("anthropic-version", "2023-06-01")
            .body(format!(r#"{{"model":"qwen","max_tokens":{max},"messages":[{{"role":"user","content":"hi"}}]}}"#))
    };
    let first = messages(100).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first
        .headers()
        .contains_key("anthropic-ratelimit-requests-remaining"));
    assert!(first.headers()["anthropic-ratelimit-requests-reset"]
        .to_str()
        .unwrap()
        .ends_with('Z'));
    let seen = mock.requests().len();
    let refused = messages(150).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 86_400, "{retry}");
    let (_, e) = error_of(refused).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("today"),
        "{e}"
    );
    assert_eq!(mock.requests().len(), seen);
}

#[tokio::test]
async fn the_ledger_survives_sigkill_within_one_flush_and_restores_the_days_quota() {
    let state = tempfile::tempdir().unwrap();
    let mock = mock_llama::MockLlama::start(mock_llama::MockOptions::default()).await;
    let yaml = support::gateway::standard_config(
        &mock.url(),
        &(carol("      tokens_per_day: 100000\n")
            + &format!(
                "state_dir: {}\nledger:\n  flush_interval: 200ms\n",
                state.path().display()
            )),
    );
    let gw = Gateway::start(&yaml);
    let mut total = 0;
    for _ in 0..5 {
        let resp = post_chat(&gw, CAROL, body(10), &[]).await;
        let v: Value = resp.json().await.unwrap();
        total += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    let ledger = state.path().join("usage.sqlite3");
    eventually_async("the ledger file holds the five requests", async || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-edge"))
            .args(["usage", "--json", "--config"])
            .arg(gw.dir.path().join("llm-edge.yaml"))
            .output()
            .unwrap();
        ledger.exists()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["total"]["requests"] == 5)
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-KILL", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(gw);
    // a new process: the day's quota starts from what the ledger holds
    let quota = total + 30;
    let yaml = yaml.replace(
        "tokens_per_day: 100000",
        &format!("tokens_per_day: {quota}"),
    );
    let gw = Gateway::start(&yaml);
    let doc = usage(&gw, "").await;
    assert_eq!(doc["quotas"]["carol"]["day"]["used"], total, "{doc}");
    let refused = post_chat(&gw, CAROL, body(20), &[]).await;
    assert_eq!(refused.status(), 429, "the restart reset the quota");
    // and `llm-edge usage` prints the table with totals
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-edge"))
        .args(["usage", "--by", "model", "--config"])
        .arg(gw.dir.path().join("llm-edge.yaml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    println!("{table}");
    assert!(table.lines().any(|l| l.starts_with("qwen3 ")), "{table}");
    let total_line = table.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(total_line.contains(&total.to_string()), "{table}");
}

#[tokio::test]
async fn usage_on_the_metrics_listener_answers_bad_parameters_with_400() {
    let (_mock, gw) = setup("").await;
    let resp = client()
        .get(format!("{}/usage?by=colour", gw.metrics_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let doc = usage(&gw, "since=7d&by=day").await;
    assert_eq!(doc["by"], "day");
}

/// A passthrough path is relayed without reading its body for tokens: a
/// key whose tokens are counted may not use one (another key may).
#[tokio::test]
async fn a_key_with_token_limits_cannot_spend_uncounted_tokens_on_a_passthrough_path() {
    let (mock, gw) =
        setup(&(carol("      tokens_per_day: 1000\n") + "routes:\n  passthrough: [/completion]\n"))
            .await;
    let send = |key: &'static str| {
        client()
            .post(format!("{}/completion", gw.url()))
            .bearer_auth(key)
            .body(r#"{"prompt":"hi","n_predict":100000}"#)
            .send()
    };
    let before = mock.requests().len();
    let refused = send(CAROL).await.unwrap();
    let (status, e) = error_of(refused).await;
    assert_eq!(status, 403, "{e}");
    assert_eq!(e["error"]["code"], "path_not_allowed", "{e}");
    assert_eq!(mock.requests().len(), before, "it reached the upstream");
    // a key without token limits still may
    assert_ne!(send(KEY).await.unwrap().status(), 403);
}

/// llama-server reports only the first generation's usage: a request for
/// several is charged at least what was reserved for all of them.
#[tokio::test]
async fn several_generations_are_charged_for_all_of_them() {
    let (_mock, gw) = setup(&carol("      tokens_per_day: 100000\n")).await;
    let body =
        r#"{"model":"qwen","n":3,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post_chat(&gw, CAROL, body, &[]).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["usage"]["completion_tokens"], 10,
        "the mock reports one choice: {v}"
    );
    eventually_async("the ledger charges all three", async || {
        usage(&gw, "key=carol").await["total"]["completion_tokens"] == 30
    })
    .await;
}

/// A client that leaves before any answer (a non-streamed answer's header
/// comes last) is charged its prompt: llama-server may have worked on it.
#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_charged_its_prompt() {
    let (_mock, gw) = setup(&carol("      tokens_per_day: 100000\n")).await;
    let b = body(10);
    let gone = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(CAROL)
        .header("x-mock-first-token-delay-ms", "3000")
        .header("x-mock-delay-ms", "300")
        .timeout(std::time::Duration::from_millis(300))
        .body(b.clone())
        .send()
        .await;
    assert!(gone.is_err(), "it was answered: {gone:?}");
    let estimate = (b.len() as u64).div_ceil(3);
    eventually_async("the prompt is charged", async || {
        let doc = usage(&gw, "key=carol").await;
        doc["total"]["cancelled"] == 1 && doc["total"]["prompt_tokens"] == estimate
    })
    .await;
    assert_eq!(
        usage(&gw, "key=carol").await["total"]["completion_tokens"],
        0
    );
}
