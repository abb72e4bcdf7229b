//! `scripts/demo.sh` and `scripts/build-llama-server.sh` as a user runs them:
//! the demo with a prebuilt llama-server (`LLAMA_SERVER_BIN`) says what it
//! does, serves chat through the real chain, allows its browser page's
//! origin, and keeps the gateway up (502 with the hint) once llama-server
//! is gone; a build that has to wait for another one says so.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::gateway::free_port;
use support::http::{client, eventually_within};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A script running in its own process group, its output in a file; the
/// whole group is stopped when dropped.
struct Script {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Script {
    fn start(script: &str, args: &[&str], env: &[(&str, &str)]) -> Script {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("bash")
            .arg(Path::new(ROOT).join(script))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap();
        Script {
            child,
            out,
            _dir: dir,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Sends `signal` to the whole group, as a terminal's Ctrl-C does.
    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) with a negative pid (the group this test created).
        unsafe { libc::kill(-(self.child.id() as i32), signal) };
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The last line a helper script prints on stdout (a path), or the test fails.
fn script_output(cmd: &mut Command, what: &str) -> String {
    let out = cmd.current_dir(ROOT).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text.lines().last().unwrap_or_default().to_string();
    assert!(
        out.status.success() && Path::new(&path).exists(),
        "{what} failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A real llama-server and the tiny model: from LLAMA_SERVER_BIN and
/// TINY_MODEL (as tests/python), else from the scripts (instant once cached).
fn llama_server_and_model() -> (String, String) {
    let bin = std::env::var("LLAMA_SERVER_BIN").unwrap_or_else(|_| {
        script_output(
            &mut Command::new("scripts/build-llama-server.sh"),
            "scripts/build-llama-server.sh",
        )
    });
    let model = std::env::var("TINY_MODEL").unwrap_or_else(|_| {
        script_output(
            Command::new(".venv/bin/python").arg("scripts/make-tiny-model.py"),
            "scripts/make-tiny-model.py (needs the .venv of scripts/install-test-deps.sh)",
        )
    });
    (bin, model)
}

/// The word after `prefix` in `text` (up to a space or the line's end).
fn word_after(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    Some(
        text[start..]
            .split(|c: char| c.is_whitespace())
            .next()?
            .to_string(),
    )
}

#[tokio::test]
#[ignore = "needs a real llama-server (scripts/build-llama-server.sh, cached) or LLAMA_SERVER_BIN; scripts/test.sh runs it"]
async fn the_demo_runs_on_a_prebuilt_llama_server_and_outlives_it() {
    let (llama_server, model) = llama_server_and_model();
    let port = free_port();
    let demo = Script::start(
        "scripts/demo.sh",
        &[],
        &[
            ("LLAMA_SERVER_BIN", &llama_server),
            ("TINY_MODEL", &model),
            ("LLM_EDGE_BIN", env!("CARGO_BIN_EXE_llm-edge")),
            ("PORT", &port.to_string()),
        ],
    );
    eventually_within(Duration::from_secs(60), "the demo to be ready", || {
        demo.output().contains("Ctrl-C stops everything.")
    })
    .await;
    let out = demo.output();
    // It said what it used, and built nothing.
    assert!(
        out.contains("[1/4] llama-server: using LLAMA_SERVER_BIN="),
        "{out}"
    );
    assert!(out.contains("[2/4] model: using TINY_MODEL="), "{out}");
    assert!(!out.contains("building"), "{out}");
    let key = word_after(&out, "API key: ").unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let chat = || {
        c.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .body(r#"{"messages":[{"role":"user","content":"Hello"}]}"#)
    };
    let reply = chat().send().await.unwrap();
    assert_eq!(reply.status(), 200);
    assert!(reply
        .text()
        .await
        .unwrap()
        .contains("The quick brown fox jumps over the lazy dog."));

    // The browser page it prints is served, and its origin is allowed.
    let page = word_after(
        &out,
        "Chat from the browser (the key is in the URL: fine for a demo only):\n  ",
    )
    .unwrap();
    assert!(page.contains(&format!("key={key}")), "{page}");
    assert_eq!(reqwest::get(&page).await.unwrap().status(), 200);
    let origin = page.split("/index.html").next().unwrap().to_string();
    let preflight = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/v1/chat/completions"),
        )
        .header("Origin", &origin)
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"]
            .to_str()
            .unwrap(),
        origin
    );

    // llama-server stops: the gateway stays, with the 502 hint, and the demo says why.
    let llama_pid: i32 = word_after(&out, "  kill ").unwrap().parse().unwrap();
    // SAFETY: kill(2) on the llama-server the demo started and named.
    unsafe { libc::kill(llama_pid, libc::SIGTERM) };
    eventually_within(Duration::from_secs(20), "the demo to notice", || {
        demo.output()
            .contains("llama-server exited. llm-edge keeps running")
    })
    .await;
    let down = chat().send().await.unwrap();
    assert_eq!(down.status(), 502);
    let body = down.text().await.unwrap();
    assert!(body.contains("SSH tunnel"), "{body}");
    let health = reqwest::get(format!("{base}/health/upstream"))
        .await
        .unwrap();
    assert_eq!(health.status(), 503);

    // Ctrl-C stops the rest.
    demo.signal_group(libc::SIGINT);
    eventually_within(Duration::from_secs(20), "the demo to stop", || {
        demo.output().contains("demo: stopped")
    })
    .await;
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
}

#[tokio::test]
async fn a_build_waiting_for_another_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("llama.cpp-b11434");
    std::fs::create_dir_all(&dir).unwrap();
    // Another build holds the cache's lock.
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a file this test opened and keeps open.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let build = Script::start(
        "scripts/build-llama-server.sh",
        &[],
        &[("LLM_EDGE_CACHE", cache.path().to_str().unwrap())],
    );
    eventually_within(Duration::from_secs(20), "the waiting message", || {
        build
            .output()
            .contains("another build of llama-server is running")
    })
    .await;
    assert!(
        build.output().contains("5-12 minutes"),
        "{}",
        build.output()
    );
}
