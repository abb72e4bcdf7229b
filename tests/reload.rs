//! Zero-downtime reload, done exactly as `systemd/llm-edge.service` does it.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_llama::{reply_text, MockLlama, MockOptions};
use support::gateway::{free_port, sha256_hex, KEY};
use support::unit::{commands, read_unit, run_sequence, UNIT_BINARY, UNIT_CONFIG};

/// A gateway run the way systemd runs it: daemonized, followed through its pid file.
struct Daemon {
    dir: tempfile::TempDir,
    config: PathBuf,
    pid_file: PathBuf,
    base: String,
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

impl Daemon {
    fn config_text(
        &self,
        upstream: &str,
        keys: &[(&str, &str)],
        grace: u64,
        port: u16,
        metrics: u16,
    ) -> String {
        let keys: String = keys
            .iter()
            .map(|(id, secret)| format!("  - id: {id}\n    sha256: {}\n", sha256_hex(secret)))
            .collect();
        format!(
            "listen: 127.0.0.1:{port}\nupstream:\n  url: {upstream}\nmodels:\n  - name: qwen\nkeys:\n{keys}metrics:\n  listen: 127.0.0.1:{metrics}\nserver:\n  threads: 2\n  pid_file: {d}/llm-edge.pid\n  upgrade_sock: {d}/upgrade.sock\n  error_log: {d}/error.log\n  grace_period_seconds: {grace}\n  graceful_shutdown_timeout_seconds: 1\n",
            d = self.dir.path().display()
        )
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Runs the unit's `key=` commands with our binary, config and main pid.
    fn systemd(&self, key: &str) -> Result<(), (usize, String)> {
        let unit = read_unit("llm-edge.service");
        let pid = self.pid().to_string();
        let config = self.config.display().to_string();
        run_sequence(&commands(&unit, key), |word| match word {
            UNIT_BINARY => env!("CARGO_BIN_EXE_llm-edge").to_string(),
            UNIT_CONFIG => config.clone(),
            "$MAINPID" => pid.clone(),
            other => other.to_string(),
        })
    }

    fn start(upstream: &str, keys: &[(&str, &str)], grace: u64) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut d = Daemon {
            config: dir.path().join("llm-edge.yaml"),
            pid_file: dir.path().join("llm-edge.pid"),
            base: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let text = d.config_text(upstream, keys, grace, port, free_port());
        std::fs::write(&d.config, text).unwrap();
        d.systemd("ExecStartPre").unwrap();
        d.systemd("ExecStart").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&d.base[7..]).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(alive(d.pid()));
        d.base = d.base.clone();
        d
    }

    /// The daemonized process writes its pid file just after the foreground
    /// process returns (as systemd, which reads it when the old one exits).
    async fn wait_for_new_pid(&self, old_pid: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pid = self.pid();
            if pid != 0 && pid != old_pid && alive(pid) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no new pid in the pid file:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rewrite_config(&self, text: String) {
        std::fs::write(&self.config, text).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for file in ["llm-edge.pid", "llm-edge.pid.old"] {
            if let Some(pid) = std::fs::read_to_string(self.dir.path().join(file))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

async fn wait_for_exit(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what}: pid {pid} still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn chat(stream: bool) -> String {
    support::http::chat_saying("qwen", "hi", stream)
}

/// Sends a request every 20 ms on a fresh connection until stopped; counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn start_load(base: &str) -> Load {
    let (stop, ok, failures) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let (s, o, f, base) = (stop.clone(), ok.clone(), failures.clone(), base.to_string());
    let task = tokio::spawn(async move {
        // No pooling: every request is a new connection, as new clients arrive.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        for _ in 0..10_000 {
            if s.load(Ordering::SeqCst) {
                break;
            }
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(KEY)
                .body(chat(false))
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => f.lock().unwrap().push(format!("status {}", r.status())),
                Err(e) => f.lock().unwrap().push(format!("{e:?}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Load {
        stop,
        ok,
        failures,
        task,
    }
}

impl Load {
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::SeqCst),
            self.failures.lock().unwrap().clone(),
        )
    }
}

#[tokio::test]
async fn reload_drops_nothing() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let d = Daemon::start(&mock.url(), &[("alice", KEY)], 4);
    let old_pid = d.pid();
    let load = start_load(&d.base);

    // Streams of 3 s, shorter than what the old process may still run
    // (Pingora's 5 s hand-over pause plus grace_period_seconds).
    let tokens = 30;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", d.base))
            .bearer_auth(KEY)
            .header("x-mock-tokens", tokens.to_string())
            .header("x-mock-delay-ms", "100")
            .body(chat(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut s = resp.bytes_stream();
        let first = s.next().await.unwrap().unwrap();
        streams.push(tokio::spawn(async move {
            let mut all = first.to_vec();
            while let Some(chunk) = s.next().await {
                all.extend_from_slice(&chunk.expect("stream cut during reload"));
            }
            String::from_utf8(all).unwrap()
        }));
    }

    d.systemd("ExecReload")
        .unwrap_or_else(|(i, e)| panic!("reload step {i}: {e}\n{}", d.log()));
    let new_pid = d.wait_for_new_pid(old_pid).await;
    assert_ne!(new_pid, old_pid, "a new process took over");
    assert!(alive(new_pid), "the new process died:\n{}", d.log());

    for s in streams {
        let text = s.await.unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "stream incomplete: {text}"
        );
        let content: String = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(content, reply_text(tokens));
    }
    wait_for_exit(old_pid, "the old process after its grace period").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "requests failed during the reload: {failures:?}"
    );
    assert!(ok > 50, "only {ok} requests went through");

    // A broken config: the reload stops at validation, the gateway keeps serving.
    let good = std::fs::read_to_string(&d.config).unwrap();
    d.rewrite_config(good.replace("listen:", "listen_typo:"));
    let (step, err) = d.systemd("ExecReload").unwrap_err();
    assert_eq!(step, 0, "validation fails first: {err}");
    assert!(err.contains("listen_typo"), "{err}");
    assert_eq!(d.pid(), new_pid);
    assert!(alive(new_pid));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", d.base))
        .bearer_auth(KEY)
        .body(chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn keys_rotate_with_two_reloads() {
    let mock = MockLlama::start(MockOptions::default()).await;
    const NEW_KEY: &str = "sk-rotated-new";
    let d = Daemon::start(&mock.url(), &[("old", KEY)], 1);
    let config = std::fs::read_to_string(&d.config).unwrap();
    let status = |key: &'static str| {
        let base = d.base.clone();
        async move {
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
                .get(format!("{base}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(NEW_KEY).await, 401);

    // 1. add the new key, reload: both work
    let both = config.replace(
        "keys:\n",
        &format!("keys:\n  - id: new\n    sha256: {}\n", sha256_hex(NEW_KEY)),
    );
    d.rewrite_config(both.clone());
    let old_pid = d.pid();
    d.systemd("ExecReload").unwrap();
    wait_for_exit(old_pid, "first reload").await;
    assert_eq!((status(KEY).await, status(NEW_KEY).await), (200, 200));

    // 2. remove the old key, reload: only the new one works
    let only_new = both.replace(
        &format!("  - id: old\n    sha256: {}\n", sha256_hex(KEY)),
        "",
    );
    assert_ne!(only_new, both);
    d.rewrite_config(only_new);
    let old_pid = d.pid();
    d.systemd("ExecReload").unwrap();
    wait_for_exit(old_pid, "second reload").await;
    assert_eq!((status(KEY).await, status(NEW_KEY).await), (401, 200));
}
