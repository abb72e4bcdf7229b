//! Starts the real `llm-edge` binary for a test, on an ephemeral port.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "sk-test-alice";
pub const KEY_LIMITED: &str = "sk-test-bob";

pub struct Gateway {
    pub addr: SocketAddr,
    /// The metrics listener (None when the test's config sets its own).
    pub metrics_addr: Option<SocketAddr>,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    log_path: PathBuf,
}

/// A free loopback port, found by binding port 0. Ports are never handed out
/// twice in one test process: between this call and the child's bind, a
/// parallel test could otherwise get the same port and talk to the wrong gateway.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind port 0")
            .local_addr()
            .expect("local addr")
            .port();
        let mut seen = HANDED_OUT.lock().unwrap();
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

/// A loopback port where connections are refused: bound but never listening,
/// so no other test (or the kernel's ephemeral range) can take it meanwhile.
/// Keep the returned socket alive as long as the port must stay dead.
pub fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind port 0");
    let port = socket.local_addr().expect("local addr").port();
    (socket, port)
}

pub fn sha256_hex(secret: &str) -> String {
    llm_edge::policy::auth::digest_hex(secret)
}

/// A config with two keys (`alice`: every model, `bob`: only `small`) and
/// two models in front of `upstream_url`; `extra` is appended verbatim.
pub fn standard_config(upstream_url: &str, extra: &str) -> String {
    format!(
        r#"
upstream:
  url: {upstream_url}
  connect_timeout: 2s
  first_byte_timeout: 20s
  idle_timeout: 20s
  pool_idle_timeout: 4s
  health_timeout: 2s
default_model: qwen3
models:
  - name: qwen3
    aliases: [qwen, default]
    upstream_name: /models/qwen3-30b.gguf
  - name: small
    upstream_name: small-upstream
keys:
  - id: alice
    sha256: {alice}
  - id: bob
    sha256: {bob}
    models: [small]
{extra}
"#,
        alice = sha256_hex(KEY),
        bob = sha256_hex(KEY_LIMITED),
    )
}

impl Gateway {
    /// Starts the gateway with `yaml` (listen address and server paths are added).
    pub fn start(yaml: &str) -> Gateway {
        Self::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let server = if yaml.contains("\nserver:") {
            String::new()
        } else {
            format!(
                "server:\n  threads: 2\n  pid_file: {d}/llm-edge.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n",
                d = dir.path().display()
            )
        };
        let metrics_addr: Option<SocketAddr> = (!yaml.contains("\nmetrics:"))
            .then(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let metrics = metrics_addr.map_or(String::new(), |a| format!("metrics:\n  listen: {a}\n"));
        let config_path = dir.path().join("llm-edge.yaml");
        std::fs::write(&config_path, format!("{yaml}\n{server}{metrics}")).expect("write config");
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-edge"));
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(addr.to_string())
            .env("RUST_LOG", "info")
            .env_remove("API_KEYS")
            .env_remove("LISTEN")
            .env_remove("STATE_DIRECTORY")
            .env_remove("LLAMA_BASE_URL")
            .env_remove("DEFAULT_MODEL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn llm-edge");
        let mut gw = Gateway {
            addr,
            metrics_addr,
            child: Some(child),
            dir,
            log_path,
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                std::thread::sleep(Duration::from_millis(50));
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "llm-edge exited ({status}) although its port answers:\n{}",
                        self.log()
                    );
                }
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("llm-edge exited early ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("llm-edge did not start listening:\n{}", self.log());
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// One scrape of the metrics listener.
    pub async fn scrape(&self) -> String {
        let addr = self.metrics_addr.expect("metrics listener");
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `http://host:port` of the metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr.expect("metrics listener"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A mock llama-server and a gateway in front of it with [`standard_config`]
/// plus `extra`.
pub async fn setup(extra: &str) -> (mock_llama::MockLlama, Gateway) {
    let mock = mock_llama::MockLlama::start(mock_llama::MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), extra));
    (mock, gw)
}
