//! Load benchmark: llm-edge against the upstream directly, and against nginx, in one run.
//!
//! `cargo bench --bench load` builds the release binary, starts the fast mock
//! llama-server (crate `mock-llama`, `crates/mock-llama`, on its own thread and runtime,
//! away from the load generator), llm-edge in front of it, and nginx with an
//! equivalent streaming config when an `nginx` binary is installed (the nginx
//! column is skipped otherwise). Lightweight raw-TCP HTTP/1.1 clients (tokio)
//! then drive, against each target in turn:
//!
//! 1. non-streaming chat at concurrency 64: requests/s, latency p50/p99, CPU per request;
//! 2. 200 concurrent streams of 100 tokens 10 ms apart: time to first token and
//!    per-chunk delivery delay (receive time minus the mock's `mock_sent_us` stamp);
//! 3. 2,000 and then 5,000 concurrent slow streams: errors, RSS per open stream
//!    (VmRSS at peak minus idle), CPU seconds per 1,000 streams;
//! 4. wrong-key requests at concurrency 64: requests/s;
//! 5. `state.redis` against none (a real redis-server, when installed): requests/s,
//!    latency and redis-server CPU per request with the per-key limits in the store,
//!    then with the upstream slots there too; and the limit checks per second one
//!    redis-server answers alone (redis-benchmark running `admit.lua`).
//!
//! It prints one markdown table with ratios against direct and nginx. Load only
//! goes to 127.0.0.1; every loop is bounded in count and time.
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs a tiny version
//! in seconds. Environment knobs: `LOAD_ONLY=ns,stream,slow,wrongkey,store` (scenarios),
//! `LOAD_TARGETS=direct,llm-edge,nginx`, `LOAD_SECONDS` (per closed-loop run),
//! `LOAD_ROUNDS` (interleaved rounds), `LOAD_CONCURRENCY` (closed loops),
//! `LOAD_BUDGET=1` (the key gets token limits and the ledger a state_dir),
//! `LOAD_STREAMS` (scenario 2), `LOAD_SLOW=2000,5000`, `NGINX_BIN`
//! (`none` to skip nginx), `LLM_EDGE_BIN` (another llm-edge binary) and
//! `LLM_EDGE_WRAP` (a command prefix such as
//! `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p`).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mock_llama::{MockLlama, MockOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-bench";
const WRONG_KEY: &str = "sk-wrong-key";
/// Hard cap on requests per closed-loop worker, besides the time bound.
const MAX_REQUESTS_PER_WORKER: usize = 1_000_000;

// ---------------------------------------------------------------------------
// Plan

#[derive(Clone)]
struct Plan {
    quick: bool,
    rounds: usize,
    closed_loop_time: Duration,
    ns_concurrency: usize,
    ns_tokens: usize,
    st_clients: usize,
    st_rounds: usize,
    st_tokens: usize,
    st_delay_ms: u64,
    slow: Vec<usize>,
    slow_tokens: usize,
    slow_delay_ms: u64,
    wk_concurrency: usize,
    only: Vec<String>,
    targets: Vec<String>,
}

impl Plan {
    fn from_env(quick: bool) -> Plan {
        let list = |name: &str, default: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let secs: f64 = env_parse("LOAD_SECONDS", if quick { 0.3 } else { 4.0 });
        Plan {
            quick,
            rounds: env_parse("LOAD_ROUNDS", if quick { 1 } else { 3 }),
            closed_loop_time: Duration::from_secs_f64(secs.clamp(0.05, 120.0)),
            ns_concurrency: env_parse("LOAD_CONCURRENCY", if quick { 4 } else { 64 }),
            ns_tokens: 16,
            st_clients: env_parse("LOAD_STREAMS", if quick { 4 } else { 200 }),
            st_rounds: if quick { 1 } else { 3 },
            st_tokens: if quick { 5 } else { 100 },
            st_delay_ms: 10,
            slow: list("LOAD_SLOW", if quick { "20,50" } else { "2000,5000" })
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            slow_tokens: if quick { 3 } else { 20 },
            slow_delay_ms: if quick { 100 } else { 500 },
            wk_concurrency: env_parse("LOAD_CONCURRENCY", if quick { 4 } else { 64 }),
            only: list("LOAD_ONLY", "ns,stream,slow,wrongkey,store"),
            targets: list("LOAD_TARGETS", "direct,llm-edge,nginx"),
        }
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only.iter().any(|s| s == scenario)
    }

    fn wants(&self, kind: Kind) -> bool {
        self.targets.iter().any(|t| t == kind.name())
    }
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Processes: the mock, llm-edge, nginx; /proc readings

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// Raises RLIMIT_NOFILE to its hard limit (inherited by llm-edge and nginx); returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields after the `(comm)` of /proc/PID/stat: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of the processes, in clock ticks.
fn cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            let f = stat_fields(pid)?;
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Sum of VmRSS of the processes, in KiB.
fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Busy and total jiffies of the whole machine (all cores, every tenant), from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Percent of all cores busy since `since` (from [`machine_jiffies`]).
fn busy_since(since: (u64, u64)) -> f64 {
    let now = machine_jiffies();
    let total = now.1.saturating_sub(since.1).max(1);
    100.0 * now.0.saturating_sub(since.0) as f64 / total as f64
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|f| f.get(1)?.parse::<i32>().ok())
                .is_some_and(|ppid| ppid == parent)
        })
        .collect()
}

/// Samples the summed VmRSS of `pids` every 50 ms on its own thread, keeping the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<i32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(&pids)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            // bounded: at most 10 minutes of samples
            for _ in 0..12_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                p.fetch_max(rss_kib(&pids), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// The mock llama-server on its own thread and current-thread runtime.
struct Mock {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    fn start() -> Mock {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mock-llama".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mock = MockLlama::start(MockOptions::default()).await;
                    tx.send(mock.addr).unwrap();
                    let _ = stop_rx.await;
                    mock.stop();
                });
            })
            .unwrap();
        Mock {
            addr: rx.recv().expect("mock started"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_listening(addr: SocketAddr, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The llm-edge binary under test: `LLM_EDGE_BIN`, else the one cargo built.
fn edge_bin() -> String {
    std::env::var("LLM_EDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_llm-edge").to_string())
}

struct Edge {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Edge {
    /// llm-edge in front of `upstream`; `extra` is prepended to its config.
    fn start(upstream: SocketAddr, dir: &Path, extra: &str) -> Edge {
        Edge::start_with(upstream, dir, extra, "", "")
    }

    /// Also with `upstream_extra` in its `upstream` section and `key_extra`
    /// in the bench key's entry.
    fn start_with(
        upstream: SocketAddr,
        dir: &Path,
        extra: &str,
        upstream_extra: &str,
        key_extra: &str,
    ) -> Edge {
        let port = free_port();
        // LOAD_BUDGET=1: the key has token limits and quotas (never reached)
        // and the ledger is on disk, to measure what reservation, settlement,
        // rate-limit headers and the ledger cost per request.
        let budget = if std::env::var("LOAD_BUDGET").is_ok_and(|v| v == "1") {
            format!(
                "    limits:\n      requests_per_minute: 100000000\n      tokens_per_minute: 100000000000\n      tokens_per_day: 100000000000000\n      tokens_per_month: 100000000000000\nstate_dir: {}\n",
                dir.join(format!("state-{port}")).display()
            )
        } else {
            String::new()
        };
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "{extra}upstream:\n  url: http://{upstream}\n{upstream_extra}models:\n  - name: bench\n    upstream_name: mock-model\nkeys:\n  - id: bench\n    sha256: {}\n{key_extra}{budget}metrics:\n  listen: {metrics}\nserver:\n  threads: 2\n  pid_file: {d}/edge-{port}.pid\n  upgrade_sock: {d}/edge-{port}.sock\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n",
            llm_edge::policy::auth::digest_hex(KEY),
            d = dir.display()
        );
        let path = dir.join(format!("llm-edge-{port}.yaml"));
        std::fs::write(&path, config).unwrap();
        let bin = edge_bin();
        let wrap: Vec<String> = std::env::var("LLM_EDGE_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let log = dir.join(format!("llm-edge-{port}.log"));
        let mut child = cmd
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start llm-edge");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "llm-edge", &mut child, &log);
        Edge {
            child,
            addr,
            metrics,
        }
    }

    /// The sum of the series on its metrics listener whose line starts
    /// with `series` (a name, or a name and its first labels).
    fn metric(&self, series: &str) -> f64 {
        use std::io::{Read, Write};
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(self.metrics) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            );
            let _ = s.read_to_string(&mut text);
        }
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn pids(&self) -> Vec<i32> {
        vec![self.child.id() as i32]
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SIGTERM first, so a profiler wrapper can write its output.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_nginx() -> Option<PathBuf> {
    match std::env::var("NGINX_BIN") {
        Ok(v) if v == "none" || v.is_empty() => return None,
        Ok(v) => return Some(PathBuf::from(v)),
        Err(_) => {}
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|s| s.split('/').nth(1).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

struct Nginx {
    child: Child,
    addr: SocketAddr,
    pids: Vec<i32>,
}

impl Nginx {
    /// nginx as a child: own prefix and config in `dir`, `daemon off`, 2 workers,
    /// HTTP/1.1 keep-alive to the upstream, `proxy_buffering off`, and the key
    /// checked with a `map`, like llm-edge's 401.
    fn start(bin: &Path, upstream: SocketAddr, dir: &Path, nofile: u64) -> Nginx {
        let port = free_port();
        let d = dir.display();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root root;\n"
        } else {
            ""
        };
        let conns = nofile.saturating_sub(100).clamp(512, 32768);
        let conf = format!(
            r#"{user}worker_processes 2;
daemon off;
master_process on;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {conns};
}}
http {{
    access_log off;
    default_type application/json;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    gzip off;
    map $http_authorization $llm_key_ok {{
        "Bearer {KEY}" 1;
        default 0;
    }}
    upstream llama {{
        server {upstream};
        keepalive 256;
        keepalive_timeout 4s;
        keepalive_requests 100;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /v1/ {{
            if ($llm_key_ok = 0) {{
                return 401 '{{"error":{{"message":"invalid API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}';
            }}
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let log = dir.join("nginx.stderr");
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nginx");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "nginx", &mut child, &log);
        let master = child.id() as i32;
        let mut pids = vec![master];
        for _ in 0..100 {
            let workers = children_of(master);
            if workers.len() >= 2 {
                pids.extend(workers);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, addr, pids }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (fast shutdown; workers exit with it).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for &pid in &self.pids {
            // SAFETY: our nginx master and its workers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Direct,
    Edge,
    Nginx,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Edge => "llm-edge",
            Kind::Nginx => "nginx",
        }
    }
}

#[derive(Clone)]
struct Target {
    kind: Kind,
    addr: SocketAddr,
    /// Processes whose CPU and RSS count (none for direct: the mock runs in-process).
    pids: Vec<i32>,
}

/// One scenario's processes: a fresh mock, llm-edge and nginx in front of it.
struct Stack {
    // dropped in field order: proxies before the mock
    edge: Option<Edge>,
    nginx: Option<Nginx>,
    mock: Mock,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn start(plan: &Plan, env: &Env, edge_extra: &str) -> Stack {
        let mock = Mock::start();
        let dir = tempfile::tempdir().unwrap();
        let edge = plan
            .wants(Kind::Edge)
            .then(|| Edge::start(mock.addr, dir.path(), edge_extra));
        let nginx = match (&env.nginx, plan.wants(Kind::Nginx)) {
            (Some(bin), true) => Some(Nginx::start(bin, mock.addr, dir.path(), env.nofile)),
            _ => None,
        };
        Stack {
            edge,
            nginx,
            mock,
            _dir: dir,
        }
    }

    fn targets(&self, plan: &Plan) -> Vec<Target> {
        let mut t = Vec::new();
        if plan.wants(Kind::Direct) {
            t.push(Target {
                kind: Kind::Direct,
                addr: self.mock.addr,
                pids: vec![],
            });
        }
        if let Some(e) = &self.edge {
            t.push(Target {
                kind: Kind::Edge,
                addr: e.addr,
                pids: e.pids(),
            });
        }
        if let Some(n) = &self.nginx {
            t.push(Target {
                kind: Kind::Nginx,
                addr: n.addr,
                pids: n.pids.clone(),
            });
        }
        t
    }
}

struct Env {
    nginx: Option<PathBuf>,
    nofile: u64,
    ticks: f64,
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client over raw TCP

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// When the last read returned (µs since the epoch).
    read_us: u64,
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

impl Conn {
    async fn open(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(4096),
            pos: 0,
            read_us: 0,
        })
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8192);
        }
        let n = self.s.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.read_us = now_us();
        Ok(())
    }
}

struct Head {
    status: u16,
    length: Option<usize>,
    chunked: bool,
    close: bool,
}

async fn read_head(c: &mut Conn) -> io::Result<Head> {
    for _ in 0..10_000 {
        let parsed = {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(c.avail()) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut h = Head {
                        status: r.code.unwrap_or(0),
                        length: None,
                        chunked: false,
                        close: r.version == Some(0),
                    };
                    for x in r.headers.iter() {
                        if x.name.eq_ignore_ascii_case("content-length") {
                            h.length = std::str::from_utf8(x.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                        } else if x.name.eq_ignore_ascii_case("transfer-encoding") {
                            h.chunked = contains_ci(x.value, b"chunked");
                        } else if x.name.eq_ignore_ascii_case("connection") {
                            h.close = contains_ci(x.value, b"close");
                        }
                    }
                    if !h.chunked && h.length.is_none() {
                        h.close = true; // body delimited by the end of the connection
                    }
                    Some((n, h))
                }
                Ok(httparse::Status::Partial) => None,
                Err(e) => return Err(other(format!("bad response head: {e}"))),
            }
        };
        match parsed {
            Some((n, h)) => {
                c.pos += n;
                return Ok(h);
            }
            None => c.fill().await?,
        }
    }
    Err(other("response head never completed"))
}

/// Reads the body, handing each decoded piece and its arrival time to `sink`.
async fn read_body(c: &mut Conn, h: &Head, mut sink: impl FnMut(&[u8], u64)) -> io::Result<()> {
    if h.chunked {
        for _ in 0..10_000_000 {
            let (size, line) = loop {
                if let Some(i) = find(c.avail(), b"\r\n") {
                    let text =
                        std::str::from_utf8(&c.avail()[..i]).map_err(|_| other("chunk size"))?;
                    let hex = text.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| other("chunk size"))?;
                    break (size, i + 2);
                }
                if c.avail().len() > 1024 {
                    return Err(other("chunk size line too long"));
                }
                c.fill().await?;
            };
            if size == 0 {
                c.pos += line;
                for _ in 0..1000 {
                    if let Some(i) = find(c.avail(), b"\r\n") {
                        c.pos += i + 2;
                        if i == 0 {
                            return Ok(());
                        }
                        continue;
                    }
                    c.fill().await?;
                }
                return Err(other("trailers never ended"));
            }
            while c.avail().len() < line + size + 2 {
                c.fill().await?;
            }
            let start = c.pos + line;
            sink(&c.buf[start..start + size], c.read_us);
            c.pos = start + size + 2;
        }
        Err(other("too many chunks"))
    } else if let Some(len) = h.length {
        let mut left = len;
        loop {
            let take = left.min(c.avail().len());
            if take > 0 {
                sink(&c.buf[c.pos..c.pos + take], c.read_us);
                c.pos += take;
                left -= take;
            }
            if left == 0 {
                return Ok(());
            }
            c.fill().await?;
        }
    } else {
        loop {
            let take = c.avail().len();
            if take > 0 {
                sink(&c.buf[c.pos..c.pos + take], c.read_us);
                c.pos += take;
            }
            match c.fill().await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

fn chat_request(
    addr: SocketAddr,
    key: &str,
    stream: bool,
    tokens: usize,
    delay_ms: u64,
) -> Arc<Vec<u8>> {
    let body = format!(
        r#"{{"model":"bench","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Write a haiku about load balancers."}}],"stream":{stream},"temperature":0.7}}"#
    );
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    Arc::new(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nAccept: {accept}\r\nUser-Agent: llm-edge-load/1\r\nx-mock-tokens: {tokens}\r\nx-mock-delay-ms: {delay_ms}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// One request/response on `conn` (opened or reopened as needed); returns the status.
/// A failure on a reused connection before any response is retried once on a new one.
async fn one_request(conn: &mut Option<Conn>, addr: SocketAddr, req: &[u8]) -> io::Result<u16> {
    for attempt in 0..2 {
        let reused = conn.is_some();
        if conn.is_none() {
            *conn = Some(Conn::open(addr).await?);
        }
        let c = conn.as_mut().unwrap();
        let result = async {
            c.s.write_all(req).await?;
            let h = read_head(c).await?;
            read_body(c, &h, |_, _| {}).await?;
            Ok::<_, io::Error>(h)
        }
        .await;
        match result {
            Ok(h) => {
                if h.close {
                    *conn = None;
                }
                return Ok(h.status);
            }
            Err(e) => {
                *conn = None;
                if !(reused && attempt == 0) {
                    return Err(e);
                }
            }
        }
    }
    Err(other("unreachable"))
}

#[derive(Default)]
struct Closed {
    ok: usize,
    errors: usize,
    lat_us: Vec<f64>,
    secs: f64,
    cpu_s: f64,
    /// Machine busy percent times seconds (a weighted sum over merged runs).
    busy_pct_secs: f64,
}

impl Closed {
    fn merge(&mut self, o: Closed) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.lat_us.extend(o.lat_us);
        self.secs += o.secs;
        self.cpu_s += o.cpu_s;
        self.busy_pct_secs += o.busy_pct_secs;
    }
}

/// `concurrency` workers, each sending `req` back to back on a keep-alive connection for `time`.
async fn closed_loop(
    t: &Target,
    env: &Env,
    req: Arc<Vec<u8>>,
    concurrency: usize,
    time: Duration,
    expect: &'static [u16],
) -> Closed {
    let cpu0 = cpu_ticks(&t.pids);
    let jiffies0 = machine_jiffies();
    let start = Instant::now();
    let deadline = start + time;
    let addr = t.addr;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let req = req.clone();
            tokio::spawn(async move {
                let mut out = Closed::default();
                let mut conn = None;
                for _ in 0..MAX_REQUESTS_PER_WORKER {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        one_request(&mut conn, addr, &req),
                    )
                    .await;
                    match r {
                        Ok(Ok(status)) if expect.contains(&status) => {
                            out.ok += 1;
                            out.lat_us.push(t0.elapsed().as_secs_f64() * 1e6);
                        }
                        other => {
                            out.errors += 1;
                            if out.errors <= 3 && std::env::var_os("LOAD_VERBOSE").is_some() {
                                match other {
                                    Ok(Ok(status)) => eprintln!("{addr}: status {status}"),
                                    Ok(Err(e)) => eprintln!("{addr}: {e}"),
                                    Err(_) => eprintln!("{addr}: timed out"),
                                }
                            }
                            conn = None;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Closed::default();
    for w in workers {
        total.merge(w.await.unwrap());
    }
    total.secs = start.elapsed().as_secs_f64();
    total.cpu_s = (cpu_ticks(&t.pids) - cpu0) as f64 / env.ticks;
    total.busy_pct_secs = busy_since(jiffies0) * total.secs;
    total
}

/// Follows one SSE stream: counts token events, their delay behind the mock's stamp, `[DONE]`.
#[derive(Default)]
struct SseTrack {
    carry: Vec<u8>,
    tokens: usize,
    done: bool,
    first_us: Option<u64>,
}

fn stamp(event: &[u8]) -> Option<u64> {
    const TAG: &[u8] = b"\"mock_sent_us\":";
    let i = find(event, TAG)? + TAG.len();
    let digits = &event[i..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

impl SseTrack {
    fn feed(&mut self, data: &[u8], recv_us: u64, delays: &mut Vec<(u64, f64)>) {
        self.carry.extend_from_slice(data);
        let mut start = 0;
        while let Some(i) = find(&self.carry[start..], b"\n\n") {
            let ev = &self.carry[start..start + i];
            if let Some(sent) = stamp(ev) {
                self.tokens += 1;
                self.first_us.get_or_insert(recv_us);
                delays.push((recv_us, recv_us.saturating_sub(sent) as f64));
            } else if find(ev, b"[DONE]").is_some() {
                self.done = true;
            }
            start += i + 2;
        }
        self.carry.drain(..start);
    }
}

#[derive(Default)]
struct Streams {
    ok: usize,
    errors: usize,
    ttft_us: Vec<f64>,
    delay_us: Vec<f64>,
    cpu_s: f64,
    /// Streams open at once, at most.
    max_open: usize,
    idle_kib: u64,
    peak_kib: u64,
    secs: f64,
    /// Machine busy percent during the run.
    busy_pct: f64,
    /// Chunks received after this time (µs since the epoch; 0: none) also
    /// go to `steady_delay_us`: the delay once every stream is open.
    steady_after_us: u64,
    steady_delay_us: Vec<f64>,
}

impl Streams {
    /// Adds one client task's counts and samples.
    fn add(&mut self, s: Streams) {
        self.ok += s.ok;
        self.errors += s.errors;
        self.ttft_us.extend(s.ttft_us);
        self.delay_us.extend(s.delay_us);
        self.steady_delay_us.extend(s.steady_delay_us);
    }
}

/// Sends `req` on `conn` and follows the SSE stream to its end.
async fn one_stream(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    req: &[u8],
    tokens: usize,
    out: &mut Streams,
) -> io::Result<()> {
    if conn.is_none() {
        *conn = Some(Conn::open(addr).await?);
    }
    let c = conn.as_mut().unwrap();
    let start_us = now_us();
    c.s.write_all(req).await?;
    let h = read_head(c).await?;
    if h.status != 200 {
        let _ = read_body(c, &h, |_, _| {}).await;
        *conn = None;
        return Err(other(format!("status {}", h.status)));
    }
    let mut track = SseTrack::default();
    let mut delays = Vec::with_capacity(tokens);
    let r = read_body(c, &h, |d, t| track.feed(d, t, &mut delays)).await;
    if h.close || r.is_err() {
        *conn = None;
    }
    r?;
    if !track.done || track.tokens != tokens {
        return Err(other(format!(
            "stream incomplete: {} of {tokens} tokens, done={}",
            track.tokens, track.done
        )));
    }
    if let Some(first) = track.first_us {
        out.ttft_us.push(first.saturating_sub(start_us) as f64);
    }
    for (recv, d) in delays {
        out.delay_us.push(d);
        if out.steady_after_us > 0 && recv >= out.steady_after_us {
            out.steady_delay_us.push(d);
        }
    }
    Ok(())
}

/// `clients` connections, each running `rounds` streams one after another (keep-alive).
async fn stream_clients(
    t: &Target,
    env: &Env,
    clients: usize,
    rounds: usize,
    tokens: usize,
    delay_ms: u64,
) -> Streams {
    let req = chat_request(t.addr, KEY, true, tokens, delay_ms);
    let cpu0 = cpu_ticks(&t.pids);
    let jiffies0 = machine_jiffies();
    let start = Instant::now();
    let limit = Duration::from_millis(tokens as u64 * delay_ms) + Duration::from_secs(30);
    let addr = t.addr;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let req = req.clone();
            // spread the starts over one token interval
            let at = tokio::time::Instant::now()
                + Duration::from_micros(i as u64 * delay_ms * 1000 / clients as u64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut out = Streams::default();
                let mut conn = None;
                for _ in 0..rounds {
                    match tokio::time::timeout(
                        limit,
                        one_stream(&mut conn, addr, &req, tokens, &mut out),
                    )
                    .await
                    {
                        Ok(Ok(())) => out.ok += 1,
                        _ => {
                            out.errors += 1;
                            conn = None;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Streams::default();
    for task in tasks {
        total.add(task.await.unwrap());
    }
    total.secs = start.elapsed().as_secs_f64();
    total.cpu_s = (cpu_ticks(&t.pids) - cpu0) as f64 / env.ticks;
    total.busy_pct = busy_since(jiffies0);
    total
}

/// `n` streams, each on its own connection, opened evenly over `ramp` and held to the end.
async fn slow_streams(
    t: &Target,
    env: &Env,
    n: usize,
    tokens: usize,
    delay_ms: u64,
    ramp: Duration,
) -> Streams {
    let req = chat_request(t.addr, KEY, true, tokens, delay_ms);
    let idle_kib = rss_kib(&t.pids);
    let sampler = RssSampler::start(t.pids.clone());
    let cpu0 = cpu_ticks(&t.pids);
    let jiffies0 = machine_jiffies();
    let start = Instant::now();
    // a second after the last stream opened
    let steady_after_us = now_us() + (ramp + Duration::from_secs(1)).as_micros() as u64;
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let limit = ramp + Duration::from_millis(tokens as u64 * delay_ms) + Duration::from_secs(60);
    let addr = t.addr;
    let t0 = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (req, open, max_open) = (req.clone(), open.clone(), max_open.clone());
            let at = t0 + ramp.mul_f64(i as f64 / n as f64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut out = Streams {
                    steady_after_us,
                    ..Streams::default()
                };
                let run = async {
                    let mut conn = Some(Conn::open(addr).await?);
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    max_open.fetch_max(now, Ordering::SeqCst);
                    let r = one_stream(&mut conn, addr, &req, tokens, &mut out).await;
                    drop(conn);
                    open.fetch_sub(1, Ordering::SeqCst);
                    r
                };
                match tokio::time::timeout(limit, run).await {
                    Ok(Ok(())) => out.ok += 1,
                    Ok(Err(e)) => {
                        out.errors += 1;
                        if out.errors == 1 && std::env::var_os("LOAD_VERBOSE").is_some() {
                            eprintln!("stream error: {e}");
                        }
                    }
                    Err(_) => out.errors += 1,
                }
                out
            })
        })
        .collect();
    let mut total = Streams::default();
    for task in tasks {
        total.add(task.await.unwrap());
    }
    total.secs = start.elapsed().as_secs_f64();
    total.cpu_s = (cpu_ticks(&t.pids) - cpu0) as f64 / env.ticks;
    total.busy_pct = busy_since(jiffies0);
    total.peak_kib = sampler.finish();
    total.idle_kib = idle_kib;
    total.max_open = max_open.load(Ordering::SeqCst);
    total
}

/// A few requests and a stream through `t`, so that lazy start-up costs are paid before measuring.
async fn warm(t: &Target) {
    let mut conn = None;
    let req = chat_request(t.addr, KEY, false, 4, 0);
    for _ in 0..20 {
        let _ = one_request(&mut conn, t.addr, &req).await;
    }
    let mut out = Streams::default();
    let req = chat_request(t.addr, KEY, true, 4, 0);
    for _ in 0..5 {
        let _ = one_stream(&mut conn, t.addr, &req, 4, &mut out).await;
    }
}

// ---------------------------------------------------------------------------
// Report

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

/// How the comparison columns are filled for a row.
#[derive(Clone, Copy, PartialEq)]
enum Cmp {
    /// llm-edge ÷ direct and llm-edge ÷ nginx
    Ratio,
    /// only llm-edge ÷ nginx (direct has no such figure)
    NginxRatio,
    None,
}

struct Row {
    scenario: String,
    metric: String,
    vals: [Option<f64>; 3],
    decimals: usize,
    cmp: Cmp,
    target: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(
        &mut self,
        scenario: &str,
        metric: &str,
        vals: [Option<f64>; 3],
        decimals: usize,
        cmp: Cmp,
        target: impl Into<String>,
    ) {
        self.rows.push(Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            vals,
            decimals,
            cmp,
            target: target.into(),
        });
    }

    fn print(&self) {
        println!("| scenario | metric | direct | llm-edge | nginx | llm-edge ÷ direct | llm-edge ÷ nginx | target |");
        println!("|---|---|---:|---:|---:|---:|---:|---|");
        let mut last = String::new();
        for r in &self.rows {
            let cell = |v: Option<f64>| match v {
                Some(x) if x.is_finite() => format!("{:.*}", r.decimals, x),
                _ => "–".to_string(),
            };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
                    format!("{:.2}", a / b)
                }
                _ => String::new(),
            };
            let [d, e, n] = r.vals;
            let (rd, rn) = match r.cmp {
                Cmp::Ratio => (ratio(e, d), ratio(e, n)),
                Cmp::NginxRatio => (String::new(), ratio(e, n)),
                Cmp::None => (String::new(), String::new()),
            };
            let scenario = if r.scenario == last {
                String::new()
            } else {
                r.scenario.clone()
            };
            last = r.scenario.clone();
            println!(
                "| {scenario} | {} | {} | {} | {} | {rd} | {rn} | {} |",
                r.metric,
                cell(d),
                cell(e),
                cell(n),
                r.target
            );
        }
    }
}

fn verdict(ok: Option<bool>, text: &str) -> String {
    match ok {
        Some(true) => format!("{text}: met"),
        Some(false) => format!("{text}: **missed**"),
        None => text.to_string(),
    }
}

/// Values of the three columns from per-target results.
fn cols<T>(results: &[(Kind, T)], f: impl Fn(&T) -> Option<f64>) -> [Option<f64>; 3] {
    let get = |k: Kind| {
        results
            .iter()
            .find(|(kind, _)| *kind == k)
            .and_then(|(_, r)| f(r))
    };
    [get(Kind::Direct), get(Kind::Edge), get(Kind::Nginx)]
}

fn log(msg: &str) {
    eprintln!(
        "[load {:>7.1}s, load avg {}] {msg}",
        START.elapsed().as_secs_f64(),
        loadavg()
    );
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

// ---------------------------------------------------------------------------
// Scenarios

async fn scenario_non_streaming(plan: &Plan, env: &Env, table: &mut Table) {
    let stack = Stack::start(plan, env, "");
    let targets = stack.targets(plan);
    let la = loadavg();
    for t in &targets {
        warm(t).await;
    }
    let mut results: Vec<(Kind, Closed)> = targets
        .iter()
        .map(|t| (t.kind, Closed::default()))
        .collect();
    for round in 0..plan.rounds {
        for i in 0..targets.len() {
            let t = &targets[(i + round) % targets.len()];
            let req = chat_request(t.addr, KEY, false, plan.ns_tokens, 0);
            log(&format!(
                "non-streaming c={} round {} on {}",
                plan.ns_concurrency,
                round + 1,
                t.kind.name()
            ));
            let r = closed_loop(
                t,
                env,
                req,
                plan.ns_concurrency,
                plan.closed_loop_time,
                &[200],
            )
            .await;
            results
                .iter_mut()
                .find(|(k, _)| *k == t.kind)
                .unwrap()
                .1
                .merge(r);
        }
    }
    let sc = format!(
        "non-streaming chat, concurrency {} (load {la})",
        plan.ns_concurrency
    );
    let rps = cols(&results, |r| Some(r.ok as f64 / r.secs));
    let met = match (rps[1], rps[2]) {
        (Some(e), Some(n)) => Some(e >= 0.9 * n),
        _ => None,
    };
    table.add(
        &sc,
        "requests/s",
        rps,
        0,
        Cmp::Ratio,
        verdict(met, "≥ 0.9× nginx"),
    );
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let v = cols(&results, |r| {
            pct(&mut r.lat_us.clone(), p).map(|x| x / 1000.0)
        });
        table.add(&sc, &format!("latency {name} (ms)"), v, 2, Cmp::Ratio, "");
    }
    table.add(
        &sc,
        "errors",
        cols(&results, |r| Some(r.errors as f64)),
        0,
        Cmp::None,
        "",
    );
    let busy = cols(&results, |r| Some(r.busy_pct_secs / r.secs.max(1e-9)));
    table.add(
        &sc,
        "machine CPU busy, all tenants (%)",
        busy,
        0,
        Cmp::None,
        "",
    );
    let cpu = cols(&results, |r| {
        (r.ok > 0 && !r.cpu_s.is_nan()).then(|| r.cpu_s * 1e6 / r.ok as f64)
    });
    table.add(
        &sc,
        "proxy CPU per request (µs)",
        [None, cpu[1], cpu[2]],
        1,
        Cmp::NginxRatio,
        verdict(
            cpu[1].zip(cpu[2]).map(|(e, n)| e <= 1.5 * n),
            "≤ 1.5× nginx",
        ),
    );
    if plan.quick {
        for (k, r) in &results {
            assert!(r.ok > 0, "{}: no non-streaming request succeeded", k.name());
            if *k == Kind::Edge {
                assert_eq!(r.errors, 0, "llm-edge: non-streaming errors");
            }
        }
    }
}

async fn scenario_streams(plan: &Plan, env: &Env, table: &mut Table) {
    let stack = Stack::start(plan, env, "");
    let targets = stack.targets(plan);
    let la = loadavg();
    let mut results: Vec<(Kind, Streams)> = Vec::new();
    for t in &targets {
        warm(t).await;
        log(&format!(
            "{} streams x {} rounds of {} tokens {} ms apart on {}",
            plan.st_clients,
            plan.st_rounds,
            plan.st_tokens,
            plan.st_delay_ms,
            t.kind.name()
        ));
        let r = stream_clients(
            t,
            env,
            plan.st_clients,
            plan.st_rounds,
            plan.st_tokens,
            plan.st_delay_ms,
        )
        .await;
        results.push((t.kind, r));
    }
    let sc = format!(
        "{} concurrent streams, {} tokens {} ms apart (load {la})",
        plan.st_clients, plan.st_tokens, plan.st_delay_ms
    );
    for (label, is_ttft) in [
        ("time to first token", true),
        ("per-chunk delivery delay", false),
    ] {
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let v = cols(&results, |r| {
                let mut s = if is_ttft {
                    r.ttft_us.clone()
                } else {
                    r.delay_us.clone()
                };
                pct(&mut s, p)
            });
            table.add(&sc, &format!("{label} {name} (µs)"), v, 0, Cmp::Ratio, "");
            let added = [
                None,
                v[1].zip(v[0]).map(|(e, d)| e - d),
                v[2].zip(v[0]).map(|(n, d)| n - d),
            ];
            // Per chunk: within 0.5 ms of nginx's added delay.
            let target = if p == 0.99 && !is_ttft {
                verdict(
                    added[1].zip(added[2]).map(|(e, n)| e <= n + 500.0),
                    "≤ nginx's + 500 µs",
                )
            } else {
                String::new()
            };
            table.add(
                &sc,
                &format!("added {label} {name} (µs)"),
                added,
                0,
                Cmp::None,
                target,
            );
        }
    }
    table.add(
        &sc,
        "errors",
        cols(&results, |r| Some(r.errors as f64)),
        0,
        Cmp::None,
        "",
    );
    table.add(
        &sc,
        "chunks measured",
        cols(&results, |r| Some(r.delay_us.len() as f64)),
        0,
        Cmp::None,
        "",
    );
    let busy = cols(&results, |r| Some(r.busy_pct));
    table.add(
        &sc,
        "machine CPU busy, all tenants (%)",
        busy,
        0,
        Cmp::None,
        "",
    );
    let cpu = cols(&results, |r| {
        (!r.delay_us.is_empty()).then(|| r.cpu_s * 1e6 / r.delay_us.len() as f64)
    });
    table.add(
        &sc,
        "proxy CPU per chunk (µs)",
        [None, cpu[1], cpu[2]],
        2,
        Cmp::NginxRatio,
        "",
    );
    if plan.quick {
        for (k, r) in &results {
            assert!(r.ok > 0, "{}: no stream succeeded", k.name());
            if *k == Kind::Edge {
                assert_eq!(r.errors, 0, "llm-edge: stream errors");
            }
        }
    }
}

async fn scenario_slow(plan: &Plan, env: &Env, table: &mut Table, n: usize) {
    // Each stream holds one fd in the client and one in the mock (this process),
    // and two in the proxy.
    let need = 2 * n as u64 + 200;
    if env.nofile < need {
        table.add(
            &format!("{n} concurrent slow streams"),
            &format!("skipped: RLIMIT_NOFILE {} < {need}", env.nofile),
            [None; 3],
            0,
            Cmp::None,
            "",
        );
        return;
    }
    let stack = Stack::start(plan, env, "");
    let targets = stack.targets(plan);
    let la = loadavg();
    let ramp = if plan.quick {
        Duration::from_millis(100)
    } else {
        Duration::from_secs_f64((n as f64 / 2000.0).max(0.5))
    };
    let mut results: Vec<(Kind, Streams)> = Vec::new();
    for t in &targets {
        warm(t).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        log(&format!(
            "{n} slow streams ({} tokens {} ms apart, opened over {:.1} s) on {}",
            plan.slow_tokens,
            plan.slow_delay_ms,
            ramp.as_secs_f64(),
            t.kind.name()
        ));
        let r = slow_streams(t, env, n, plan.slow_tokens, plan.slow_delay_ms, ramp).await;
        results.push((t.kind, r));
        // let the closed connections settle before the next target
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sc = format!(
        "{n} concurrent slow streams, {} tokens {} ms apart (load {la})",
        plan.slow_tokens, plan.slow_delay_ms
    );
    let errors = cols(&results, |r| Some(r.errors as f64));
    table.add(
        &sc,
        "errors",
        errors,
        0,
        Cmp::None,
        verdict(errors[1].map(|e| e == 0.0), "0"),
    );
    table.add(
        &sc,
        "streams open at once (max)",
        cols(&results, |r| Some(r.max_open as f64)),
        0,
        Cmp::None,
        "",
    );
    let proc_col = |f: &dyn Fn(&Streams) -> f64| -> [Option<f64>; 3] {
        let v = cols(&results, |r| Some(f(r)));
        [None, v[1], v[2]]
    };
    table.add(
        &sc,
        "proxy RSS idle (MiB)",
        proc_col(&|r| r.idle_kib as f64 / 1024.0),
        1,
        Cmp::NginxRatio,
        "",
    );
    table.add(
        &sc,
        "proxy RSS peak (MiB)",
        proc_col(&|r| r.peak_kib as f64 / 1024.0),
        1,
        Cmp::NginxRatio,
        "",
    );
    let per =
        proc_col(&|r| r.peak_kib.saturating_sub(r.idle_kib) as f64 / r.max_open.max(1) as f64);
    let met = per[1].zip(per[2]).map(|(e, n)| e <= 2.0 * n);
    table.add(
        &sc,
        "proxy RSS per open stream (KiB)",
        per,
        1,
        Cmp::NginxRatio,
        verdict(met, "≤ 2× nginx"),
    );
    // Every stream's first token while the streams are still opening.
    let ttft = cols(&results, |r| pct(&mut r.ttft_us.clone(), 0.99));
    table.add(&sc, "time to first token p99 (µs)", ttft, 0, Cmp::Ratio, "");
    let added = [
        None,
        ttft[1].zip(ttft[0]).map(|(e, d)| e - d),
        ttft[2].zip(ttft[0]).map(|(n, d)| n - d),
    ];
    table.add(
        &sc,
        "added time to first token p99 (µs)",
        added,
        0,
        Cmp::None,
        verdict(
            added[1].zip(added[2]).map(|(e, n)| e <= 2.0 * n.max(0.0)),
            "≤ 2× nginx's",
        ),
    );
    table.add(
        &sc,
        "proxy CPU seconds per 1,000 streams",
        proc_col(&|r| r.cpu_s * 1000.0 / n as f64),
        3,
        Cmp::NginxRatio,
        "",
    );
    let p99 = cols(&results, |r| pct(&mut r.delay_us.clone(), 0.99));
    table.add(
        &sc,
        "per-chunk delivery delay p99 (µs)",
        p99,
        0,
        Cmp::Ratio,
        "",
    );
    let p99 = cols(&results, |r| pct(&mut r.steady_delay_us.clone(), 0.99));
    table.add(
        &sc,
        "  the same, once every stream is open (µs)",
        p99,
        0,
        Cmp::Ratio,
        "",
    );
    let busy = cols(&results, |r| Some(r.busy_pct));
    table.add(
        &sc,
        "machine CPU busy, all tenants (%)",
        busy,
        0,
        Cmp::None,
        "",
    );
    if plan.quick {
        for (k, r) in &results {
            assert!(r.ok > 0, "{}: no slow stream succeeded", k.name());
            if *k == Kind::Edge {
                assert_eq!(r.errors, 0, "llm-edge: slow stream errors");
            }
        }
    }
}

async fn scenario_wrong_key(plan: &Plan, env: &Env, table: &mut Table) {
    let mut plan = plan.clone();
    plan.targets.retain(|t| t != "direct"); // the mock has no key to check
                                            // Every wrong key gets its 401, as with nginx: the per-IP auth-failure
                                            // throttle (429 after 60 a minute, on by default) is measured in its own rows.
    let stack = Stack::start(
        &plan,
        env,
        "downstream:\n  max_auth_failures_per_minute: null\n",
    );
    let mut targets = stack.targets(&plan);
    let throttled = plan
        .wants(Kind::Edge)
        .then(|| Edge::start(stack.mock.addr, stack._dir.path(), ""));
    if let Some(e) = &throttled {
        targets.push(Target {
            kind: Kind::Direct, // the column that stands for "llm-edge, default throttle" here
            addr: e.addr,
            pids: e.pids(),
        });
    }
    if targets.is_empty() {
        return;
    }
    let la = loadavg();
    let mut results: Vec<(Kind, Closed)> = targets
        .iter()
        .map(|t| (t.kind, Closed::default()))
        .collect();
    for t in &targets {
        warm(t).await;
    }
    for round in 0..plan.rounds {
        for i in 0..targets.len() {
            let t = &targets[(i + round) % targets.len()];
            let req = chat_request(t.addr, WRONG_KEY, false, plan.ns_tokens, 0);
            let (what, expect): (&str, &'static [u16]) = match t.kind {
                Kind::Direct => (
                    "llm-edge with the default auth-failure throttle",
                    &[401, 429],
                ),
                k => (k.name(), &[401]),
            };
            log(&format!(
                "wrong key c={} round {} on {what}",
                plan.wk_concurrency,
                round + 1
            ));
            let r = closed_loop(
                t,
                env,
                req,
                plan.wk_concurrency,
                plan.closed_loop_time,
                expect,
            )
            .await;
            results
                .iter_mut()
                .find(|(k, _)| *k == t.kind)
                .unwrap()
                .1
                .merge(r);
        }
    }
    let sc = format!("wrong key, concurrency {} (load {la})", plan.wk_concurrency);
    let no_direct = |v: [Option<f64>; 3]| [None, v[1], v[2]];
    let rps = cols(&results, |r| Some(r.ok as f64 / r.secs));
    table.add(
        &sc,
        "401 answers/s",
        no_direct(rps),
        0,
        Cmp::NginxRatio,
        verdict(rps[1].zip(rps[2]).map(|(e, n)| e >= n), "≥ nginx"),
    );
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let v = cols(&results, |r| {
            pct(&mut r.lat_us.clone(), p).map(|x| x / 1000.0)
        });
        table.add(
            &sc,
            &format!("latency {name} (ms)"),
            no_direct(v),
            2,
            Cmp::NginxRatio,
            "",
        );
    }
    let errors = cols(&results, |r| Some(r.errors as f64));
    table.add(&sc, "errors", no_direct(errors), 0, Cmp::None, "");
    let busy = cols(&results, |r| Some(r.busy_pct_secs / r.secs.max(1e-9)));
    table.add(
        &sc,
        "machine CPU busy, all tenants (%)",
        no_direct(busy),
        0,
        Cmp::None,
        "",
    );
    let cpu = cols(&results, |r| {
        (r.ok > 0).then(|| r.cpu_s * 1e6 / r.ok as f64)
    });
    table.add(
        &sc,
        "proxy CPU per request (µs)",
        no_direct(cpu),
        1,
        Cmp::NginxRatio,
        "",
    );
    if throttled.is_some() {
        table.add(
            &sc,
            "llm-edge, default throttle (401 then 429): answers/s",
            [None, rps[0], None],
            0,
            Cmp::None,
            "",
        );
        table.add(
            &sc,
            "llm-edge, default throttle: CPU per answer (µs)",
            [None, cpu[0], None],
            1,
            Cmp::None,
            "",
        );
    }
    if plan.quick {
        for (k, r) in &results {
            assert!(r.ok > 0, "{}: no refusal came back", k.name());
        }
    }
}

/// A redis-server of the bench's own (no persistence), or `None` when the
/// Debian package is not installed.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Option<Redis> {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let port = free_port();
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let log = std::env::temp_dir().join("llm-edge-bench-redis.log");
        wait_listening(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "redis-server",
            &mut child,
            &log,
        );
        Some(Redis { child, port })
    }

    /// Limit checks per second this redis-server answers: `admit.lua` (every
    /// limit kind on one hot key, as one busy API key is) from
    /// redis-benchmark, 50 connections pipelining 16 each.
    fn limit_checks_per_second(&self, n: usize) -> Option<f64> {
        let script = include_str!("../src/shared/admit.lua");
        let out = Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string(), "-c", "50", "-P", "16", "-q"])
            .args(["-n", &n.to_string()])
            .args([
                "EVAL",
                script,
                "5",
                "b:{k}:rpm",
                "b:{k}:conc",
                "b:{k}:tpm",
                "b:{k}:day",
                "b:{k}:month",
            ])
            .args([
                "1000000000",
                "1000000000",
                "m",
                "30000",
                "100",
                "1000000000000",
            ])
            .args(["1000000000000000", "1000000000000000", "172800", "5443200"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let at = text.rfind(" requests per second")?;
        let head = &text[..at];
        let num = head.rsplit([' ', ':', '\r']).next()?;
        num.trim().parse().ok()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `state.redis` against none: the same per-key limits checked in the
/// edge's memory, in a real redis-server (one script round trip per
/// request), and with the upstream's slots leased there too (pipelined in
/// the same round trip), non-streaming at the `ns` concurrency; and what one redis-server
/// answers alone.
async fn scenario_store(plan: &Plan, env: &Env, table: &mut Table) {
    let Some(redis) = Redis::start() else {
        log(
            "store: redis-server is not installed (apt-get install redis-server); scenario skipped",
        );
        return;
    };
    let mock = Mock::start();
    let dir = tempfile::tempdir().unwrap();
    let key = "    limits:\n      requests_per_minute: 1000000000\n      max_concurrent: 100000\n      tokens_per_minute: 1000000000000\n";
    let state = format!("state:\n  redis: redis://127.0.0.1:{}/0\n", redis.port);
    let variants = [
        ("no store", String::new(), ""),
        ("store: key limits (1 round trip)", state.clone(), ""),
        (
            "store: key limits + upstream slot (1 round trip, pipelined)",
            state,
            "  max_in_flight: 100000\n",
        ),
    ];
    let la = loadavg();
    let sc = format!(
        "state.redis, non-streaming, concurrency {} (load {la})",
        plan.ns_concurrency
    );
    let mut base: Option<(f64, f64, f64)> = None;
    for (name, extra, upstream) in &variants {
        let edge = Edge::start_with(mock.addr, dir.path(), extra, upstream, key);
        let t = Target {
            kind: Kind::Edge,
            addr: edge.addr,
            pids: edge.pids(),
        };
        warm(&t).await;
        let redis_cpu = cpu_ticks(&[redis.child.id() as i32]);
        let mut r = Closed::default();
        for round in 0..plan.rounds {
            log(&format!("store: {name}, round {}", round + 1));
            let req = chat_request(t.addr, KEY, false, plan.ns_tokens, 0);
            r.merge(
                closed_loop(
                    &t,
                    env,
                    req,
                    plan.ns_concurrency,
                    plan.closed_loop_time,
                    &[200],
                )
                .await,
            );
        }
        let redis_us = (cpu_ticks(&[redis.child.id() as i32]) - redis_cpu) as f64 / env.ticks * 1e6
            / r.ok.max(1) as f64;
        // Round trips on the request's path (admission, and a slot lease on
        // its own), per request the edge answered (the warm-up's included).
        let answered = edge.metric("llm_edge_requests_total{");
        let on_path = edge.metric("llm_edge_store_calls_total{op=\"admit\"}")
            + edge.metric("llm_edge_store_calls_total{op=\"slot\"}");
        let rps = r.ok as f64 / r.secs;
        let p50 = pct(&mut r.lat_us.clone(), 0.5).unwrap_or(f64::NAN) / 1000.0;
        let p99 = pct(&mut r.lat_us.clone(), 0.99).unwrap_or(f64::NAN) / 1000.0;
        let one = |v: f64| [None, Some(v), None];
        table.add(
            &sc,
            &format!("{name}: requests/s"),
            one(rps),
            0,
            Cmp::None,
            "",
        );
        table.add(
            &sc,
            &format!("{name}: latency p50 / p99 (ms)"),
            one(p50),
            2,
            Cmp::None,
            format!("p99 {p99:.2} ms"),
        );
        table.add(
            &sc,
            &format!("{name}: errors"),
            one(r.errors as f64),
            0,
            Cmp::None,
            "",
        );
        if !extra.is_empty() {
            table.add(
                &sc,
                &format!("{name}: store round trips on the path per request"),
                one(on_path / answered.max(1.0)),
                2,
                Cmp::None,
                "",
            );
        }
        match base {
            None => base = Some((rps, p50, p99)),
            Some((b_rps, b50, b99)) => {
                table.add(
                    &sc,
                    &format!("{name}: requests/s ÷ no store"),
                    one(rps / b_rps),
                    2,
                    Cmp::None,
                    "",
                );
                table.add(
                    &sc,
                    &format!("{name}: added latency p50 (ms)"),
                    one(p50 - b50),
                    2,
                    Cmp::None,
                    format!("p99 {:+.2} ms", p99 - b99),
                );
                table.add(
                    &sc,
                    &format!("{name}: redis-server CPU per request (µs)"),
                    one(redis_us),
                    1,
                    Cmp::None,
                    "",
                );
            }
        }
        drop(edge);
    }
    let n = if plan.quick { 2_000 } else { 400_000 };
    if let Some(checks) = redis.limit_checks_per_second(n) {
        table.add(
            &sc,
            "one redis-server alone: limit checks/s (admit.lua, one hot key, redis-benchmark -c 50 -P 16)",
            [None, Some(checks), None],
            0,
            Cmp::None,
            "",
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it with no args: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let _ = *START;
    let plan = Plan::from_env(quick);
    let nofile = raise_nofile();
    let nginx = if plan.wants(Kind::Nginx) {
        find_nginx()
    } else {
        None
    };
    let env = Env {
        nginx: nginx.clone(),
        nofile,
        ticks: clock_ticks_per_sec(),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let la_start = loadavg();
    log(&format!(
        "{} run; RLIMIT_NOFILE {nofile}; nginx: {}",
        if quick { "quick" } else { "full" },
        nginx
            .as_ref()
            .map_or("not found, column skipped".to_string(), |p| p
                .display()
                .to_string())
    ));
    // The load generator: one thread of its own (the mock has another).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut table = Table::default();
    rt.block_on(async {
        if plan.runs("ns") {
            scenario_non_streaming(&plan, &env, &mut table).await;
        }
        if plan.runs("stream") {
            scenario_streams(&plan, &env, &mut table).await;
        }
        if plan.runs("slow") {
            for &n in &plan.slow {
                scenario_slow(&plan, &env, &mut table, n).await;
            }
        }
        if plan.runs("wrongkey") {
            scenario_wrong_key(&plan, &env, &mut table).await;
        }
        if plan.runs("store") {
            scenario_store(&plan, &env, &mut table).await;
        }
    });
    println!(
        "\n## llm-edge load benchmark ({} run)\n\n{cores} cores; load average {la_start} at start, {} at end; llm-edge `server.threads: 2`; nginx {}; \
         one load-generator thread and one mock thread in the bench process. Ratios compare within this run.\n",
        if quick { "quick" } else { "full" },
        loadavg(),
        nginx.as_ref().map_or("absent (column skipped)".to_string(), |p| format!("{} with `worker_processes 2`", nginx_version(p))),
    );
    if quick {
        println!("Quick run (no `--bench` argument, as under `cargo test --benches`): tiny loads against whatever build cargo made; the figures check that the bench works, they are not measurements.\n");
    }
    println!("llm-edge binary: {}\n", edge_bin());
    table.print();
}
