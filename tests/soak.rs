//! Soak: at least 100,000 mixed requests through the real `llm-edge` binary
//! (debug build) in front of the mock llama-server, on loopback, 32 at a
//! time: JSON replies, streams read to the end, streams the client abandons
//! mid-way, embeddings, the gateway's own model list and unknown models.
//!
//! It checks every reply, then that the gateway's memory did not grow after
//! warm-up (< 10 %), that its file descriptors are back to their baseline,
//! and that the metrics account for every request. Run it with
//! `cargo test --test soak -- --nocapture` to see the figures;
//! `SOAK_REQUESTS=N` changes the count (for a quick local try).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_llama::{reply_text, MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::{standard_config, Gateway, KEY};
use support::http::{chat_saying, fd_count, metric, proc_status_kb};

const CONCURRENCY: usize = 32;
const WARM_UP: usize = 10_000;
const REQUESTS: usize = 100_000;
/// Hard bound on the whole run (warm-up included).
const TIME_LIMIT: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    json: AtomicUsize,
    streamed: AtomicUsize,
    abandoned: AtomicUsize,
    embeddings: AtomicUsize,
    models: AtomicUsize,
    refused: AtomicUsize,
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces), then utime, stime at 14, 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn chat(stream: bool) -> String {
    chat_saying("qwen", "hi", stream)
}

/// One request of the mix, chosen by `i`; panics on any wrong reply.
async fn one(c: &reqwest::Client, base: &str, i: usize, tally: &Tally) {
    let chat_url = format!("{base}/v1/chat/completions");
    match i % 20 {
        // 8 in 20: a short JSON reply
        0..=7 => {
            let r = c
                .post(&chat_url)
                .bearer_auth(KEY)
                .header("x-mock-tokens", "2")
                .body(chat(false))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], reply_text(2));
            tally.json.fetch_add(1, Ordering::Relaxed);
        }
        // 7 in 20: a short stream, read to its end
        8..=14 => {
            let r = c
                .post(&chat_url)
                .bearer_auth(KEY)
                .header("x-mock-tokens", "3")
                .body(chat(true))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i}");
            let text = r.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "request {i}: {text}");
            tally.streamed.fetch_add(1, Ordering::Relaxed);
        }
        // 2 in 20: a longer stream the client abandons after its first chunk
        15 | 16 => {
            let r = c
                .post(&chat_url)
                .bearer_auth(KEY)
                .header("x-mock-tokens", "40")
                .header("x-mock-delay-ms", "5")
                .body(chat(true))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i}");
            let mut s = r.bytes_stream();
            s.next().await.unwrap().unwrap();
            drop(s);
            tally.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        17 => {
            let r = c
                .post(format!("{base}/v1/embeddings"))
                .bearer_auth(KEY)
                .body(r#"{"model":"qwen","input":"hi"}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["data"][0]["object"], "embedding");
            tally.embeddings.fetch_add(1, Ordering::Relaxed);
        }
        18 => {
            let r = c
                .get(format!("{base}/v1/models"))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "request {i}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["object"], "list");
            tally.models.fetch_add(1, Ordering::Relaxed);
        }
        // refused by the gateway itself: an unknown model
        _ => {
            let r = c
                .post(&chat_url)
                .bearer_auth(KEY)
                .body(r#"{"model":"gpt-nope","messages":[]}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "request {i}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "model_not_found");
            tally.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally.sent.fetch_add(1, Ordering::Relaxed);
}

/// Runs requests `range` with `CONCURRENCY` workers, each on its own client
/// (its own keep-alive connections), bounded by `deadline`.
async fn run(
    gw: &Gateway,
    range: std::ops::Range<usize>,
    tally: &Arc<Tally>,
    deadline: Instant,
) -> Duration {
    let base = gw.url();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(range.start));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (base, next, tally, end) = (base.clone(), next.clone(), tally.clone(), range.end);
            tokio::spawn(async move {
                let c = reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end || Instant::now() > deadline {
                        break;
                    }
                    one(&c, &base, i, &tally).await;
                }
            })
        })
        .collect();
    for w in workers {
        if let Err(e) = w.await {
            let log = gw.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{e}\ngateway log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
    }
    started.elapsed()
}

/// Waits (bounded) for the gateway to be idle: nothing in flight, no stream,
/// and its fd count at or below `floor` (when given).
async fn quiesce(gw: &Gateway, floor: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = gw.scrape().await;
        let busy = metric(&m, "llm_edge_requests_in_flight", &[])
            + metric(&m, "llm_edge_streams_active", &[]);
        let fds = fd_count(gw.pid());
        if busy == 0.0 && floor.is_none_or(|f| fds <= f) {
            return fds;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not settle: busy {busy}, fds {fds}, floor {floor:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for about 6 minutes; scripts/test.sh runs it"]
async fn soak_mixed_requests() {
    let total: usize = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REQUESTS);
    let warm_up = WARM_UP.min(total / 10);
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    let pid = gw.pid();
    let base = gw.url();
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + TIME_LIMIT;

    // Warm-up: threads, pools, allocator arenas reach their working size.
    let warm_time = run(&gw, 0..warm_up, &tally, deadline).await;
    // Idle keep-alive connections (client side, upstream pool) are closed:
    // the pool after 4 s, llama-server's side after 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fds_base = quiesce(&gw, None).await;
    let rss_base = proc_status_kb(pid, "VmRSS:");

    let main_time = run(&gw, warm_up..total, &tally, deadline).await;
    let sent = tally.sent.load(Ordering::Relaxed);
    let rss_loaded = proc_status_kb(pid, "VmRSS:");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fds_end = quiesce(&gw, Some(fds_base)).await;
    let rss_end = proc_status_kb(pid, "VmRSS:");
    let rss_hwm = proc_status_kb(pid, "VmHWM:");

    let (gw_cpu, test_cpu) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let m = gw.scrape().await;
    let counted = metric(&m, "llm_edge_requests_total", &[]);
    let growth = (rss_end as f64 - rss_base as f64) / rss_base as f64 * 100.0;
    let main_n = sent - warm_up;
    println!(
        "soak: {sent} requests ({warm_up} warm-up in {warm_time:.1?}, {main_n} in {main_time:.1?} = {:.0}/s) at concurrency {CONCURRENCY}",
        main_n as f64 / main_time.as_secs_f64()
    );
    println!(
        "soak: json {} streamed {} abandoned {} embeddings {} models {} refused {}",
        tally.json.load(Ordering::Relaxed),
        tally.streamed.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed),
        tally.embeddings.load(Ordering::Relaxed),
        tally.models.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
    );
    println!(
        "soak: gateway RSS {rss_base} kB after warm-up, {rss_loaded} kB at the end of the load, {rss_end} kB idle at the end ({growth:+.1} %), peak {rss_hwm} kB; fds {fds_base} after warm-up, {fds_end} at the end"
    );
    println!(
        "soak: CPU used: gateway {gw_cpu:.1} s, test process (clients and mock) {test_cpu:.1} s"
    );
    println!(
        "soak: upstream completed {} cancelled {} connections {}; gateway counted {counted} requests, {} client disconnects, {} upstream errors",
        mock.completed(),
        mock.aborted(),
        mock.connections(),
        metric(&m, "llm_edge_client_disconnects_total", &[]),
        metric(&m, "llm_edge_upstream_errors_total", &[]),
    );

    assert_eq!(sent, total, "the run hit its time limit");
    assert_eq!(
        counted as usize, total,
        "every request is in requests_total"
    );
    assert_eq!(metric(&m, "llm_edge_upstream_errors_total", &[]), 0.0);
    let abandoned = tally.abandoned.load(Ordering::Relaxed);
    assert!(
        metric(&m, "llm_edge_client_disconnects_total", &[]) <= abandoned as f64,
        "only abandoned streams are disconnects"
    );
    assert!(
        growth < 10.0,
        "RSS grew {growth:.1} % after warm-up ({rss_base} -> {rss_end} kB)"
    );
    assert!(fds_end <= fds_base, "fds {fds_base} -> {fds_end}");
    // Still serving after all that.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
