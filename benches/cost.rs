//! Deterministic cost figures: instructions and heap allocations per
//! non-streamed request, per
//! relayed SSE chunk and per 401, for llm-edge and (when installed) nginx,
//! counted by valgrind's callgrind on a fixed scripted workload.
//!
//! `cargo bench --bench cost` (or `scripts/cost.sh`, which runs it three
//! times) starts the mock llama-server in this process, then each proxy under
//! `valgrind --tool=callgrind`; after a warm-up it zeroes the counters
//! (`callgrind_control -z`), runs one phase of sequential requests on one
//! keep-alive connection, and dumps them (`callgrind_control -d`): the
//! instructions of that phase divided by its requests (or chunks). Wall-clock
//! noise does not enter: the same binary, inputs and phase give the same count
//! within a fraction of a percent, so a regression of a few percent shows.
//! Under `cargo test --benches` it runs a tiny version that only checks that
//! it works. Knobs: `COST_REQUESTS` (default 400), `COST_STREAMS` (20 streams
//! of `COST_CHUNKS`, default 100, chunks), `NGINX_BIN` (`none` to skip nginx),
//! `LLM_EDGE_BIN`, `COST_DUMPS=DIR` (keep the dumps for `callgrind_annotate`),
//! `COST_VALGRIND_ARGS` (more callgrind options, for a diagnostic run).
//! Only 127.0.0.1; every loop is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mock_llama::{MockLlama, MockOptions};

const KEY: &str = "sk-bench";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A proxy running under callgrind.
struct Profiled {
    child: Child,
    addr: SocketAddr,
    out_dir: PathBuf,
    name: &'static str,
}

impl Profiled {
    fn start(
        name: &'static str,
        program: &str,
        args: &[String],
        port: u16,
        dir: &Path,
    ) -> Profiled {
        let out_dir = dir.join(format!("cg-{name}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}/cg.%p", out_dir.display()))
            .args(["--dump-instr=no", "--dump-line=no", "--trace-children=no"])
            .args(extra_valgrind_args())
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("valgrind (Debian package valgrind) must be installed");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut p = Profiled {
            child,
            addr,
            out_dir,
            name,
        };
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "{name} exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen under valgrind"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn control(&self, flag: &str) {
        let status = Command::new("callgrind_control")
            .arg(flag)
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("callgrind_control");
        assert!(
            status.success(),
            "callgrind_control {flag} failed for {}",
            self.name
        );
    }

    /// Instructions executed while `phase` ran.
    fn count(&self, phase: impl FnOnce(SocketAddr)) -> Cost {
        self.control("-z");
        phase(self.addr);
        let before: Vec<PathBuf> = dumps(&self.out_dir);
        self.control("-d");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let new: Vec<PathBuf> = dumps(&self.out_dir)
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            if let Some(cost) = new
                .iter()
                .filter_map(|p| summary(p))
                .max_by_key(|c| c.instructions)
            {
                return cost;
            }
            assert!(
                Instant::now() < deadline,
                "no callgrind dump from {}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Profiled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `COST_VALGRIND_ARGS`: more callgrind options, space-separated, for a
/// diagnostic run, e.g. `--separate-callers20=_rjem_malloc` to see whole
/// caller chains of allocations in a kept dump (the counts printed then
/// miss those allocations: their names change).
fn extra_valgrind_args() -> Vec<String> {
    std::env::var("COST_VALGRIND_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn dumps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// What one phase cost: instructions, and heap allocations (calls into
/// jemalloc's allocating entry points from outside jemalloc).
#[derive(Clone, Copy, Default)]
struct Cost {
    instructions: u64,
    allocations: u64,
}

/// The `summary:` (or `totals:`) instruction count of a finished dump, and
/// the calls it records into the allocator.
fn summary(path: &Path) -> Option<Cost> {
    let text = std::fs::read_to_string(path).ok()?;
    let instructions = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(Cost {
        instructions,
        allocations: allocator_calls(&text),
    })
}

/// Sums `calls=` lines whose callee is an allocating entry point of
/// jemalloc (`_rjem_malloc`, `mallocx`, `calloc`, `realloc`, `rallocx`) and
/// whose caller is not jemalloc itself. Callgrind compresses names: the
/// first `fn=(id) name` or `cfn=(id) name` names an id, later ones repeat
/// only `(id)`.
fn allocator_calls(dump: &str) -> u64 {
    let mut names: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut resolve = |spec: &str| -> String {
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, rest)) if !rest.trim().is_empty() => {
                names.insert(id.to_string(), rest.trim().to_string());
                rest.trim().to_string()
            }
            Some((id, _)) => names.get(id).cloned().unwrap_or_default(),
            None => spec.to_string(),
        }
    };
    let allocating = |name: &str| {
        [
            "_rjem_malloc",
            "_rjem_mallocx",
            "_rjem_calloc",
            "_rjem_realloc",
            "_rjem_rallocx",
        ]
        .contains(&name)
    };
    let (mut caller, mut callee, mut total) = (String::new(), String::new(), 0u64);
    for line in dump.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            caller = resolve(spec);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            callee = resolve(spec);
        } else if let Some(rest) = line.strip_prefix("calls=") {
            if allocating(&callee) && !caller.starts_with("_rjem_") {
                total += rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn chat(stream: bool, key: &str, tokens: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"bench","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Write a haiku about load balancers."}}],"stream":{stream}}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nx-mock-tokens: {tokens}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends `req` on `conn` (reconnecting when the server closed it) and reads
/// the whole response; returns its status.
fn exchange(conn: &mut Option<BufReader<TcpStream>>, addr: SocketAddr, req: &[u8]) -> u16 {
    for _ in 0..2 {
        let c = conn.get_or_insert_with(|| {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            BufReader::new(s)
        });
        if c.get_mut().write_all(req).is_err() {
            *conn = None;
            continue;
        }
        match read_response(c) {
            Some((status, close)) => {
                if close {
                    *conn = None;
                }
                return status;
            }
            None => *conn = None,
        }
    }
    panic!("no response from {addr}");
}

/// Status and whether the server closes; the body is read by its
/// Content-Length or chunked coding.
fn read_response(c: &mut BufReader<TcpStream>) -> Option<(u16, bool)> {
    let mut line = String::new();
    c.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut len, mut chunked, mut close) = (0usize, false, false);
    loop {
        line.clear();
        c.read_line(&mut line).ok()?;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        } else if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        } else if l.starts_with("connection:") && l.contains("close") {
            close = true;
        }
    }
    if chunked {
        loop {
            line.clear();
            c.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            c.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).ok()?;
    }
    Some((status, close))
}

fn run(addr: SocketAddr, req: &[u8], n: usize, want: u16) {
    let mut conn = None;
    for _ in 0..n {
        assert_eq!(exchange(&mut conn, addr, req), want);
    }
}

struct Row {
    name: &'static str,
    per_request: f64,
    per_chunk: f64,
    per_401: f64,
    allocs_per_request: f64,
    allocs_per_chunk: f64,
    allocs_per_401: f64,
}

fn measure(p: &Profiled, requests: usize, streams: usize, chunks: usize) -> Row {
    let ns = chat(false, KEY, 8);
    let st = chat(true, KEY, chunks);
    let wrong = chat(false, "sk-wrong", 8);
    // warm-up: pools, lazy statics, allocator arenas
    run(p.addr, &ns, 20, 200);
    run(p.addr, &st, 2, 200);
    run(p.addr, &wrong, 20, 401);
    let ns = p.count(|a| run(a, &ns, requests, 200));
    let st = p.count(|a| run(a, &st, streams, 200));
    let wrong = p.count(|a| run(a, &wrong, requests, 401));
    let per = |c: u64| c as f64 / requests as f64;
    // a stream is a request plus its chunks (one per token, plus the end)
    let per_chunk =
        |c: u64, request: f64| (c as f64 - request * streams as f64) / (streams * chunks) as f64;
    Row {
        name: p.name,
        per_request: per(ns.instructions),
        per_chunk: per_chunk(st.instructions, per(ns.instructions)),
        per_401: per(wrong.instructions),
        allocs_per_request: per(ns.allocations),
        allocs_per_chunk: per_chunk(st.allocations, per(ns.allocations)),
        allocs_per_401: per(wrong.allocations),
    }
}

fn edge_args(upstream: SocketAddr, port: u16, dir: &Path) -> Vec<String> {
    let config = dir.join("llm-edge.yaml");
    std::fs::write(
        &config,
        format!(
            "upstream:\n  url: http://{upstream}\nmodels:\n  - name: bench\n    upstream_name: mock-model\nkeys:\n  - id: bench\n    sha256: {}\nmetrics:\n  listen: null\ndownstream:\n  max_auth_failures_per_minute: null\nserver:\n  threads: 1\n  pid_file: {d}/edge.pid\n  upgrade_sock: {d}/edge.sock\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n",
            llm_edge::policy::auth::digest_hex(KEY),
            d = dir.display()
        ),
    )
    .unwrap();
    vec![
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ]
}

fn nginx_args(upstream: SocketAddr, port: u16, dir: &Path) -> Vec<String> {
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
daemon off;
master_process off;
user root root;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    map $http_authorization $llm_key_ok {{ "Bearer {KEY}" 1; default 0; }}
    upstream llama {{ server {upstream}; keepalive 16; keepalive_timeout 4s; }}
    server {{
        listen 127.0.0.1:{port};
        location /v1/ {{
            if ($llm_key_ok = 0) {{
                return 401 '{{"error":{{"message":"invalid API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}';
            }}
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    vec![
        "-p".into(),
        d.to_string(),
        "-c".into(),
        path.display().to_string(),
        "-e".into(),
        format!("{d}/nginx-error.log"),
    ]
}

fn find_nginx() -> Option<String> {
    match std::env::var("NGINX_BIN") {
        Ok(v) if v == "none" || v.is_empty() => None,
        Ok(v) => Some(v),
        Err(_) => ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .map(str::to_string),
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let requests = if quick {
        10
    } else {
        env_or("COST_REQUESTS", 400)
    };
    let streams = if quick { 2 } else { env_or("COST_STREAMS", 20) };
    let chunks = if quick {
        10
    } else {
        env_or("COST_CHUNKS", 100)
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mock = rt.block_on(MockLlama::start(MockOptions::default()));
    let upstream: SocketAddr = mock.url().trim_start_matches("http://").parse().unwrap();
    // COST_DUMPS=DIR keeps the callgrind dumps (for callgrind_annotate).
    let kept = std::env::var("COST_DUMPS").ok().map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = kept.as_deref().unwrap_or(tmp.path());
    std::fs::create_dir_all(dir).unwrap();

    let mut rows = Vec::new();
    let bin = std::env::var("LLM_EDGE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_llm-edge").to_string());
    let port = free_port();
    let edge = Profiled::start("llm-edge", &bin, &edge_args(upstream, port, dir), port, dir);
    rows.push(measure(&edge, requests, streams, chunks));
    drop(edge);
    match find_nginx() {
        Some(nginx) if !quick => {
            let port = free_port();
            let args = nginx_args(upstream, port, dir);
            let p = Profiled::start("nginx", &nginx, &args, port, dir);
            rows.push(measure(&p, requests, streams, chunks));
        }
        Some(_) => {}
        None => eprintln!(
            "cost: no nginx (install Debian's nginx, or set NGINX_BIN) — its column is left out"
        ),
    }

    println!(
        "\n| callgrind | {} |",
        rows.iter().map(|r| r.name).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---:|".repeat(rows.len()));
    type Get = fn(&Row) -> f64;
    let metrics: [(&str, Get); 6] = [
        ("instructions per non-streamed request", |r| r.per_request),
        ("instructions per relayed SSE chunk", |r| r.per_chunk),
        ("instructions per 401 (wrong key)", |r| r.per_401),
        ("heap allocations per non-streamed request", |r| {
            r.allocs_per_request
        }),
        ("heap allocations per relayed SSE chunk", |r| {
            r.allocs_per_chunk
        }),
        ("heap allocations per 401", |r| r.allocs_per_401),
    ];
    for (what, get) in metrics {
        let cells: Vec<String> = rows
            .iter()
            .map(|r| {
                // nginx allocates from its own pools, not through jemalloc
                if r.name == "nginx" && what.starts_with("heap") {
                    "n/a".to_string()
                } else {
                    format!("{:.1}", get(r))
                }
            })
            .collect();
        let ratio = if rows.len() == 2 && what.starts_with("instructions") {
            format!(" ({:.2}× nginx)", get(&rows[0]) / get(&rows[1]))
        } else {
            String::new()
        };
        println!("| {what} | {}{ratio} |", cells.join(" | "));
    }
    println!("\n({requests} requests, {streams} streams of {chunks} chunks, 1 worker thread each; same workload for every column)");
    for r in &rows {
        assert!(
            r.per_request > 0.0 && r.per_401 > 0.0,
            "{}: nothing counted",
            r.name
        );
    }
    drop(mock);
}
