//! Streaming latency through llm-edge versus straight to the upstream, in the same run.
//!
//! `cargo bench --bench streaming` builds the release binary, starts the mock
//! llama-server (which stamps every chunk with its send time), and drives the
//! same streams directly and through llm-edge. It prints a markdown table of
//! time to first token and per-chunk delivery delay (receive time minus the
//! send stamp), with the gateway's added time. Loopback only; every loop is
//! bounded. `STREAMS` and `CONCURRENCY` environment variables scale it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use mock_llama::{MockLlama, MockOptions};

const KEY: &str = "sk-bench";

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_gateway(upstream: &str, dir: &std::path::Path) -> (Gateway, String) {
    let port = free_port();
    let config = format!(
        "upstream:\n  url: {upstream}\nmodels:\n  - name: bench\nkeys:\n  - id: bench\n    sha256: {}\nmetrics:\n  listen: 127.0.0.1:{}\nserver:\n  threads: 2\n  pid_file: {d}/pid\n  upgrade_sock: {d}/sock\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n",
        llm_edge::policy::auth::digest_hex(KEY),
        free_port(),
        d = dir.display()
    );
    let path = dir.join("bench.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_llm-edge"))
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llm-edge");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "llm-edge did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Gateway(child), format!("http://127.0.0.1:{port}"))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[derive(Default)]
struct Sample {
    ttft_us: Vec<f64>,
    chunk_delay_us: Vec<f64>,
    errors: usize,
}

async fn one_stream(
    client: &reqwest::Client,
    base: &str,
    tokens: usize,
    delay_ms: u64,
    out: &mut Sample,
) {
    let body = r#"{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-mock-tokens", tokens.to_string())
        .header("x-mock-delay-ms", delay_ms.to_string())
        .body(body)
        .send()
        .await;
    let Ok(resp) = resp else {
        out.errors += 1;
        return;
    };
    if !resp.status().is_success() {
        out.errors += 1;
        return;
    }
    let mut stream = resp.bytes_stream();
    let mut carry = Vec::new();
    let mut first = true;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            out.errors += 1;
            return;
        };
        let received = now_us();
        carry.extend_from_slice(&chunk);
        while let Some(end) = carry.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = carry.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            if let Some(i) = text.find("\"mock_sent_us\":") {
                let digits: String = text[i + 15..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(sent) = digits.parse::<u64>() {
                    if first {
                        out.ttft_us.push(start.elapsed().as_micros() as f64);
                        first = false;
                    }
                    out.chunk_delay_us
                        .push(received.saturating_sub(sent) as f64);
                }
            }
        }
    }
}

async fn run(
    base: &str,
    streams: usize,
    concurrency: usize,
    tokens: usize,
    delay_ms: u64,
) -> Sample {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let mut total = Sample::default();
    let mut done = 0;
    while done < streams {
        let batch = concurrency.min(streams - done);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let client = client.clone();
                let base = base.to_string();
                tokio::spawn(async move {
                    let mut s = Sample::default();
                    one_stream(&client, &base, tokens, delay_ms, &mut s).await;
                    s
                })
            })
            .collect();
        for t in tasks {
            let s = t.await.unwrap();
            total.ttft_us.extend(s.ttft_us);
            total.chunk_delay_us.extend(s.chunk_delay_us);
            total.errors += s.errors;
        }
        done += batch;
    }
    total
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it with no args: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let streams = env_usize("STREAMS", if quick { 4 } else { 400 });
    let concurrency = env_usize("CONCURRENCY", if quick { 2 } else { 200 });
    let (tokens, delay_ms) = (if quick { 5 } else { 100 }, 10);
    // The mock gets its own thread and runtime, so the load generator does not delay it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mock = MockLlama::start(MockOptions::default()).await;
            tx.send(mock.url()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let upstream = rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_gw, gateway) = start_gateway(&upstream, dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // warm both paths
        run(&upstream, 2, 2, 2, 0).await;
        run(&gateway, 2, 2, 2, 0).await;
        for (streams, concurrency) in [(streams.min(50), 1), (streams, concurrency)] {
            report(&upstream, &gateway, streams, concurrency, tokens, delay_ms).await;
        }
    });
}

async fn report(
    upstream: &str,
    gateway: &str,
    streams: usize,
    concurrency: usize,
    tokens: usize,
    delay_ms: u64,
) {
    {
        let mut direct = run(upstream, streams, concurrency, tokens, delay_ms).await;
        let mut via = run(gateway, streams, concurrency, tokens, delay_ms).await;
        println!("\n{streams} streams ({concurrency} concurrent) of {tokens} tokens {delay_ms} ms apart; microseconds\n");
        println!("| metric | direct | via llm-edge | added |");
        println!("|---|---:|---:|---:|");
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (d, g) = (pct(&mut direct.ttft_us, p), pct(&mut via.ttft_us, p));
            println!(
                "| time to first token {name} | {d:.0} | {g:.0} | {:.0} |",
                g - d
            );
        }
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (d, g) = (
                pct(&mut direct.chunk_delay_us, p),
                pct(&mut via.chunk_delay_us, p),
            );
            println!(
                "| per-chunk delivery delay {name} | {d:.0} | {g:.0} | {:.0} |",
                g - d
            );
        }
        println!("| errors | {} | {} | |", direct.errors, via.errors);
        println!(
            "| chunks measured | {} | {} | |",
            direct.chunk_delay_us.len(),
            via.chunk_delay_us.len()
        );
    }
}
