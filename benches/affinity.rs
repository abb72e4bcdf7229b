//! Cache-affinity routing against least load, with real llama-servers, in one run.
//!
//! `cargo bench --bench affinity` starts three real llama-server processes (tag
//! b11434 and the tiny deterministic model from `scripts/build-llama-server.sh`
//! and `scripts/make-tiny-model.py`, both cached in `~/.cache/llm-edge`; or
//! `LLAMA_SERVER_BIN` and `TINY_MODEL`), each with `-np 2 -t 1` and a context
//! of 16384 tokens per slot, and llm-edge (the release binary cargo built, or
//! `LLM_EDGE_BIN`) in front of them. For each routing, `least_load` then
//! `cache_affinity`, on freshly started servers (empty caches), it runs the
//! same workload: `AFFINITY_CONVERSATIONS` conversations (default 24) of
//! `AFFINITY_TURNS` turns (default 10), sharing one long system prompt (about
//! 1,000 tokens), each user turn adding about 1,300 tokens (a pasted page,
//! `AFFINITY_USER_WORDS`, default 1200), each reply the model's one sentence;
//! `AFFINITY_WORKERS` clients (default 12: two per slot, so every server stays
//! busy and requests queue at the gateway, as with more users than slots)
//! each run their share of the conversations one after the other, each turn
//! after a pause (uniform, 0 to twice `AFFINITY_THINK_MS`, default 800 ms:
//! the user reads and types). Every request streams (with
//! `stream_options.include_usage`).
//!
//! Why two conversations per slot, with pauses: llama-server (b11434) gives a
//! request the slot whose cached prompt shares the largest fraction with it
//! (`--slot-prompt-similarity`), and when that would keep less than half of
//! the slot's cached prompt it saves it to its host-RAM prompt cache
//! (`--cache-ram`) and restores the saved prompt that matches the request
//! best; so a conversation that comes back to the server that served it
//! finds its history in a slot or in RAM. With one client per slot and short
//! pauses, least load is itself sticky (the server a conversation just left
//! is the one with a free slot when it comes back), which hides the
//! difference a real fleet with more users than slots sees; with short user
//! turns and long pauses the servers idle and time to first token is the
//! same for both. Earlier workloads and their figures are in
//! docs/PERFORMANCE.md.
//!
//! `AFFINITY_ROUNDS` (default 2) interleaved rounds of both (least load
//! first, then affinity first, ...), each on fresh servers, are pooled.
//!
//! It prints one markdown table: the share of prompt tokens served from
//! llama-server's cache (as it reports them), overall and for the part past the
//! shared system prompt (what routing decides); time to first token p50 and
//! p99; completion tokens per second; and the load spread (requests and
//! evaluated prompt tokens of the busiest server over the mean), with the
//! affinity/least-load ratios.
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs 3
//! conversations of 2 turns when llama-server is already cached (else it says
//! so and returns): a check that the bench works, not a measurement. Loopback
//! only; every wait is bounded.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "sk-bench";
const SERVERS: usize = 3;
const SLOTS: usize = 2;
const CTX_PER_SLOT: usize = 16384;
const MAX_TOKENS: u64 = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cache_dir() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/llm-edge/llama.cpp-b11434")
}

/// The last line of a script's output (the path it prints).
fn run_script(cmd: &mut Command) -> Option<PathBuf> {
    let out = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(text.trim().lines().last()?.trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// llama-server and the tiny model: from the environment, the cache, or
/// (full runs only) the scripts that build them.
fn llama_files(build: bool) -> Option<(PathBuf, PathBuf)> {
    let bin = std::env::var("LLAMA_SERVER_BIN")
        .map(PathBuf::from)
        .ok()
        .or_else(|| Some(cache_dir().join("llama-server")).filter(|p| p.is_file()))
        .or_else(|| {
            build
                .then(|| run_script(&mut Command::new("scripts/build-llama-server.sh")))
                .flatten()
        })?;
    let model = std::env::var("TINY_MODEL")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::fs::read_dir(cache_dir())
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("tiny-chatml-") && n.ends_with(".gguf"))
                })
        })
        .or_else(|| {
            build
                .then(|| run_script(Command::new("python3").arg("scripts/make-tiny-model.py")))
                .flatten()
        })?;
    Some((bin, model))
}

struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn wait_http(&mut self, url: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(resp) = probe::http_status(url) {
                if resp == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{} did not come up", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking GET (status only), so start-up needs no runtime.
mod probe {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub fn http_status(url: &str) -> std::io::Result<u16> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = TcpStream::connect(host)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        Ok(text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }
}

fn start_llama(bin: &Path, model: &Path, dir: &Path, i: usize) -> (Proc, u16) {
    let port = free_port();
    let log = dir.join(format!("llama-{i}.log"));
    let child = Command::new(bin)
        .args(["-m"])
        .arg(model)
        .args(["-a", "tiny", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["-t", "1", "-np"])
        .arg(SLOTS.to_string())
        .arg("-c")
        .arg((SLOTS * CTX_PER_SLOT).to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start llama-server");
    let mut p = Proc {
        child,
        name: format!("llama-server {i}"),
        log,
    };
    p.wait_http(
        &format!("http://127.0.0.1:{port}/health"),
        Duration::from_secs(60),
    );
    (p, port)
}

fn start_edge(dir: &Path, ports: &[u16], routing: &str) -> (Proc, SocketAddr, PathBuf) {
    let port = free_port();
    let mut servers = String::new();
    for (i, p) in ports.iter().enumerate() {
        servers.push_str(&format!(
            "    - name: s{i}\n      url: http://127.0.0.1:{p}\n      context: {}\n",
            SLOTS * CTX_PER_SLOT
        ));
    }
    let config = format!(
        "upstream:\n  routing: {routing}\n  max_in_flight: {SLOTS}\n  health_interval: 1s\n  queue_timeout: 120s\n  servers:\n{servers}models:\n  - name: tiny\nkeys:\n  - id: bench\n    sha256: {}\nmetrics:\n  listen: 127.0.0.1:{}\nserver:\n  threads: 1\n  pid_file: {d}/edge-{port}.pid\n  upgrade_sock: {d}/edge-{port}.sock\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n",
        llm_edge::policy::auth::digest_hex(KEY),
        free_port(),
        d = dir.display()
    );
    let path = dir.join(format!("edge-{routing}.yaml"));
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("edge-{routing}.log"));
    let bin = std::env::var("LLM_EDGE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_llm-edge").to_string());
    let child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::fs::File::create(dir.join(format!("edge-{routing}.out"))).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start llm-edge");
    let mut p = Proc {
        child,
        name: "llm-edge".into(),
        log: log.clone(),
    };
    p.wait_http(
        &format!("http://127.0.0.1:{port}/health"),
        Duration::from_secs(30),
    );
    (p, SocketAddr::from(([127, 0, 0, 1], port)), log)
}

/// Deterministic filler text of about `words` words, varied by `seed`.
fn text(seed: usize, words: usize) -> String {
    const VOCAB: [&str; 24] = [
        "cache",
        "server",
        "prompt",
        "token",
        "slot",
        "routing",
        "gateway",
        "model",
        "context",
        "latency",
        "history",
        "conversation",
        "engineer",
        "measure",
        "prefix",
        "reuse",
        "load",
        "tunnel",
        "machine",
        "answer",
        "question",
        "request",
        "stream",
        "batch",
    ];
    let mut x = seed as u64 * 2_654_435_761 + 1;
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            VOCAB[(x % VOCAB.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Turn {
    ttft: Duration,
    prompt: u64,
    cached: u64,
    completion: u64,
}

/// One streamed turn; the reply text is appended to `messages`.
async fn turn(client: &reqwest::Client, edge: SocketAddr, messages: &mut Vec<Value>) -> Turn {
    use futures_util::StreamExt;
    let body = json!({"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS,
        "stream": true, "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let resp = client
        .post(format!("http://{edge}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let (mut buf, mut reply) = (Vec::new(), String::new());
    let mut out = Turn {
        ttft: Duration::ZERO,
        prompt: 0,
        cached: 0,
        completion: 0,
    };
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.expect("stream"));
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                if out.ttft.is_zero() {
                    out.ttft = start.elapsed();
                }
                reply.push_str(c);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                out.prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
                out.completion = u["completion_tokens"].as_u64().unwrap_or(0);
                out.cached = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
    }
    messages.push(json!({"role": "assistant", "content": reply}));
    out
}

struct Workload {
    conversations: usize,
    turns: usize,
    workers: usize,
    system_words: usize,
    user_words: usize,
    /// Mean pause between a reply and the next turn.
    think: Duration,
}

struct Outcome {
    turns: Vec<Turn>,
    wall: Duration,
    requests_per_server: Vec<u64>,
    evaluated_per_server: Vec<u64>,
    system_tokens: u64,
    /// Routing hits, misses, fallbacks, closed-loop corrections.
    outcomes: [u64; 4],
}

impl Outcome {
    /// Two runs of the same routing as one.
    fn merge(mut self, o: Outcome) -> Outcome {
        self.turns.extend(o.turns);
        self.wall += o.wall;
        let add = |a: &mut Vec<u64>, b: Vec<u64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.requests_per_server, o.requests_per_server);
        add(&mut self.evaluated_per_server, o.evaluated_per_server);
        for (x, y) in self.outcomes.iter_mut().zip(o.outcomes) {
            *x += y;
        }
        self
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

async fn run_phase(edge: SocketAddr, w: &Workload, system: &str) -> (Vec<Turn>, Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let start = Instant::now();
    let per_worker = w.conversations.div_ceil(w.workers);
    let mut tasks = Vec::new();
    for worker in 0..w.workers {
        let ids: Vec<usize> = (0..per_worker)
            .map(|k| worker + k * w.workers)
            .filter(|&c| c < w.conversations)
            .collect();
        let (client, system) = (client.clone(), system.to_string());
        let (turns, user_words, think) = (w.turns, w.user_words, w.think);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut rng = (worker as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(1);
            for &id in &ids {
                let mut conv = vec![json!({"role": "system", "content": system})];
                for t in 0..turns {
                    let content = format!(
                        "Conversation {id} turn {t}: {}",
                        text(id * 1000 + t, user_words)
                    );
                    conv.push(json!({"role": "user", "content": content}));
                    out.push((t, turn(&client, edge, &mut conv).await));
                    // The user reads and types: a pause of 0 to 2 x think.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let pause = if think.is_zero() {
                        Duration::ZERO
                    } else {
                        think.mul_f64((rng % 2001) as f64 / 1000.0)
                    };
                    tokio::time::sleep(pause).await;
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    // Turn order does not matter for the figures.
    let turns = all.into_iter().map(|(_, t)| t).collect();
    (turns, start.elapsed())
}

/// Evaluated (not cached) prompt tokens per server, and the routing
/// outcomes (hit, miss, fallback, forgotten), from the gateway's metrics.
async fn from_metrics(metrics: SocketAddr) -> (Vec<u64>, [u64; 4]) {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |labels: &[&str]| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("llm_edge_upstream_prompt_tokens_total"))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let evaluated = (0..SERVERS)
        .map(|s| {
            let up = format!("upstream=\"s{s}\"");
            let prompt = value(&[&up, "kind=\"prompt\""]);
            let cached = value(&[&up, "kind=\"cached\""]);
            prompt - cached.min(prompt)
        })
        .collect();
    let count = |name: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let outcomes = [
        count("llm_edge_routing_total", "outcome=\"hit\""),
        count("llm_edge_routing_total", "outcome=\"miss\""),
        count("llm_edge_routing_total", "outcome=\"fallback\""),
        count("llm_edge_affinity_forgotten_total", ""),
    ];
    (evaluated, outcomes)
}

fn metrics_addr(config: &Path) -> SocketAddr {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("listen: 127.0.0.1:"))
        .unwrap();
    line.trim().trim_start_matches("listen: ").parse().unwrap()
}

/// Requests per server, from the access log's `upstream=` fields.
fn requests_from_log(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    (0..SERVERS)
        .map(|s| {
            let want = format!(" upstream=s{s} ");
            text.lines()
                .filter(|l| l.contains("/v1/chat/completions") && l.contains(&want))
                .count() as u64
        })
        .collect()
}

async fn tokenize_len(port: u16, content: &str) -> u64 {
    let v: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/tokenize"))
        .json(&json!({"content": content}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["tokens"].as_array().map_or(0, |t| t.len() as u64)
}

async fn run(
    routing: &str,
    files: &(PathBuf, PathBuf),
    w: &Workload,
    system: &str,
    dir: &Path,
) -> Outcome {
    let mut llamas = Vec::new();
    let mut ports = Vec::new();
    for i in 0..SERVERS {
        let (p, port) = start_llama(&files.0, &files.1, dir, i);
        llamas.push(p);
        ports.push(port);
    }
    // The system message as the template renders it, roughly: its text and
    // the role markers.
    let system_tokens = tokenize_len(ports[0], system).await + 4;
    let (edge, addr, log) = start_edge(dir, &ports, routing);
    let (turns, wall) = run_phase(addr, w, system).await;
    let (evaluated, outcomes) =
        from_metrics(metrics_addr(&dir.join(format!("edge-{routing}.yaml")))).await;
    // The access log line is written as each request ends: all are there.
    let requests = requests_from_log(&log);
    drop(edge);
    drop(llamas);
    Outcome {
        turns,
        wall,
        requests_per_server: requests,
        evaluated_per_server: evaluated,
        system_tokens,
        outcomes,
    }
}

struct Figures {
    cached_fraction: f64,
    growing_cached_fraction: f64,
    ttft_p50: Duration,
    ttft_p99: Duration,
    throughput: f64,
    requests_spread: f64,
    evaluated_spread: f64,
    requests: Vec<u64>,
}

fn spread(v: &[u64]) -> f64 {
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let max = v.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 {
        max / mean
    } else {
        0.0
    }
}

fn figures(o: &Outcome) -> Figures {
    let prompt: u64 = o.turns.iter().map(|t| t.prompt).sum();
    let cached: u64 = o.turns.iter().map(|t| t.cached).sum();
    let completion: u64 = o.turns.iter().map(|t| t.completion).sum();
    let s = o.system_tokens;
    let grow_prompt: u64 = o.turns.iter().map(|t| t.prompt.saturating_sub(s)).sum();
    let grow_cached: u64 = o.turns.iter().map(|t| t.cached.saturating_sub(s)).sum();
    let mut ttfts: Vec<Duration> = o.turns.iter().map(|t| t.ttft).collect();
    ttfts.sort();
    Figures {
        cached_fraction: cached as f64 / prompt.max(1) as f64,
        growing_cached_fraction: grow_cached as f64 / grow_prompt.max(1) as f64,
        ttft_p50: quantile(&ttfts, 0.5),
        ttft_p99: quantile(&ttfts, 0.99),
        throughput: completion as f64 / o.wall.as_secs_f64(),
        requests_spread: spread(&o.requests_per_server),
        evaluated_spread: spread(&o.evaluated_per_server),
        requests: o.requests_per_server.clone(),
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let Some(files) = llama_files(full) else {
        println!(
            "affinity bench: no llama-server in {} (scripts/build-llama-server.sh builds it; LLAMA_SERVER_BIN, TINY_MODEL): not run",
            cache_dir().display()
        );
        return;
    };
    let w = if full {
        Workload {
            conversations: env_usize("AFFINITY_CONVERSATIONS", 24),
            turns: env_usize("AFFINITY_TURNS", 10),
            workers: env_usize("AFFINITY_WORKERS", 12),
            system_words: env_usize("AFFINITY_SYSTEM_WORDS", 900),
            user_words: env_usize("AFFINITY_USER_WORDS", 1200),
            think: Duration::from_millis(env_usize("AFFINITY_THINK_MS", 800) as u64),
        }
    } else {
        Workload {
            conversations: 3,
            turns: 2,
            workers: 3,
            system_words: 100,
            user_words: 20,
            think: Duration::ZERO,
        }
    };
    let system = format!(
        "You are the assistant of a team that runs language models. {}",
        text(7, w.system_words)
    );
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{} rounds of {} conversations x {} turns, {} clients, think time {} ms (mean), system prompt {} words, user turns {} words; {SERVERS} llama-servers (-np {SLOTS}, -c {}), {} and {}{}\n",
        if full { env_usize("AFFINITY_ROUNDS", 2) } else { 1 },
        w.conversations,
        w.turns,
        w.workers,
        w.think.as_millis(),
        w.system_words,
        w.user_words,
        SLOTS * CTX_PER_SLOT,
        files.0.display(),
        files.1.display(),
        if full { "" } else { " (quick run: not a measurement)" }
    );
    // Interleaved rounds (L A, then A L, ...), so a change in the machine's
    // other load weighs on both routings alike.
    let rounds = if full {
        env_usize("AFFINITY_ROUNDS", 2)
    } else {
        1
    };
    let (mut least, mut affinity): (Option<Outcome>, Option<Outcome>) = (None, None);
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            ["least_load", "cache_affinity"]
        } else {
            ["cache_affinity", "least_load"]
        };
        for routing in order {
            let o = rt.block_on(run(routing, &files, &w, &system, dir.path()));
            let slot = if routing == "least_load" {
                &mut least
            } else {
                &mut affinity
            };
            *slot = Some(match slot.take() {
                None => o,
                Some(acc) => acc.merge(o),
            });
        }
    }
    let (least, affinity) = (least.unwrap(), affinity.unwrap());
    let (l, a) = (figures(&least), figures(&affinity));
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let ratio = |x: f64, y: f64| {
        if y > 0.0 {
            format!("{:.2}x", x / y)
        } else {
            "-".into()
        }
    };
    println!("| | least_load | cache_affinity | affinity / least_load |");
    println!("|---|---|---|---|");
    println!(
        "| prompt tokens from cache (all) | {:.2} | {:.2} | {} |",
        l.cached_fraction,
        a.cached_fraction,
        ratio(a.cached_fraction, l.cached_fraction)
    );
    println!(
        "| prompt tokens from cache (past the {}-token system prompt) | {:.2} | {:.2} | {} |",
        affinity.system_tokens,
        l.growing_cached_fraction,
        a.growing_cached_fraction,
        ratio(a.growing_cached_fraction, l.growing_cached_fraction)
    );
    println!(
        "| time to first token p50 | {} | {} | {} |",
        ms(l.ttft_p50),
        ms(a.ttft_p50),
        ratio(a.ttft_p50.as_secs_f64(), l.ttft_p50.as_secs_f64())
    );
    println!(
        "| time to first token p99 | {} | {} | {} |",
        ms(l.ttft_p99),
        ms(a.ttft_p99),
        ratio(a.ttft_p99.as_secs_f64(), l.ttft_p99.as_secs_f64())
    );
    println!(
        "| completion tokens/s | {:.1} | {:.1} | {} |",
        l.throughput,
        a.throughput,
        ratio(a.throughput, l.throughput)
    );
    println!(
        "| requests per server (busiest / mean) | {:?} ({:.2}) | {:?} ({:.2}) | |",
        l.requests, l.requests_spread, a.requests, a.requests_spread
    );
    println!(
        "| evaluated prompt tokens (busiest / mean) | {:.2} | {:.2} | |",
        l.evaluated_spread, a.evaluated_spread
    );
    println!(
        "| wall time | {:.1} s | {:.1} s | |",
        least.wall.as_secs_f64(),
        affinity.wall.as_secs_f64()
    );
    let [hit, miss, fallback, forgot] = affinity.outcomes;
    println!(
        "\nAffinity routing: {hit} hits, {miss} misses, {fallback} fallbacks for load, {forgot} closed-loop corrections."
    );
}
