//! The command line of the real binary: --validate, hash-key, env-only start.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::Gateway;

fn llm_edge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-edge"));
    cmd.env_remove("API_KEYS")
        .env_remove("LISTEN")
        .env_remove("STATE_DIRECTORY")
        .env_remove("LLAMA_BASE_URL")
        .env_remove("DEFAULT_MODEL");
    cmd
}

#[test]
fn validate_accepts_the_shipped_example() {
    let out = llm_edge()
        .args([
            "--validate",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/llm-edge.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_rejects_a_bad_file_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstream:\n  url: http://127.0.0.1:8080\n  conect_timeout: 5s\n",
    )
    .unwrap();
    let out = llm_edge()
        .arg("--validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream.conect_timeout"), "{stderr}");

    std::fs::write(&path, "models:\n  - name: a\ndefault_model: b\n").unwrap();
    let out = llm_edge()
        .arg("--validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("default_model"));

    let out = llm_edge()
        .args(["--validate", "--config", "/nonexistent/llm-edge.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = llm_edge()
        .args(["--validate", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

#[test]
fn pingoras_own_conf_flag_is_not_offered() {
    let out = llm_edge()
        .args(["-c", "x.yaml", "--validate"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn hash_key_trims_one_trailing_newline() {
    let mut child = llm_edge()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"sk-local-abc\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        llm_edge::policy::auth::digest_hex("sk-local-abc")
    );
}

#[test]
fn hash_key_refuses_keys_no_client_can_send() {
    for key in [&b" sk-padded"[..], b"sk-padded \n", b"sk-tab\there"] {
        let mut child = llm_edge()
            .arg("hash-key")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(key).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{:?}",
            String::from_utf8_lossy(key)
        );
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Authorization header"));
    }
}

/// Whether `/proc/net/tcp` has a listening socket on exactly `ip:port`
/// (`ip` as the kernel prints it: 0100007F is 127.0.0.1, 00000000 is any).
fn listening_on(ip_hex: &str, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("{ip_hex}:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
    })
}

/// The README's first run: no config file, no flags, a key from the
/// environment. It must listen on loopback only (127.0.0.1:8000), and the
/// metrics on 127.0.0.1:9464; this is the only test that runs on the default
/// ports.
#[tokio::test]
async fn the_quick_start_listens_on_loopback_and_the_seed_environment_works() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let strong = "sk-edge-0123456789abcdef0123456789abcdef";
    let mut child = llm_edge()
        .env("LLAMA_BASE_URL", mock.url())
        .env("DEFAULT_MODEL", "qwen3-30b-a3b-instruct")
        .env("API_KEYS", format!("{strong},sk-other"))
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let base = "http://127.0.0.1:8000";
    let c = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..400 {
        if c.get(format!("{base}/health")).send().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        ready,
        "the quick start did not answer on {base}:\n{}",
        log()
    );
    assert!(
        listening_on("0100007F", 8000),
        "not bound to 127.0.0.1:8000"
    );
    assert!(
        !listening_on("00000000", 8000),
        "bound to every interface by default"
    );
    let models: Value = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("sk-other")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "qwen3-30b-a3b-instruct");
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(strong)
        .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.last_request().unwrap().json()["model"],
        "qwen3-30b-a3b-instruct"
    );
    let _ = child.kill();
    let _ = child.wait();
    // the short key is called a placeholder by its log id, never by value;
    // the strong one is not mentioned
    let log = log();
    assert!(log.contains("key env-2 looks like a placeholder"), "{log}");
    assert!(!log.contains("env-1 looks like"), "{log}");
    assert!(!log.contains("sk-other") && !log.contains(strong), "{log}");
}

#[test]
fn listen_from_the_environment_opens_it_up_and_the_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "allow_anonymous: true\n").unwrap();
    let run = |env_listen: Option<&str>, flag: Option<&str>| {
        let mut cmd = llm_edge();
        cmd.args(["--validate", "--config"]).arg(&config);
        if let Some(l) = env_listen {
            cmd.env("LISTEN", l);
        }
        if let Some(f) = flag {
            cmd.args(["--listen", f]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // anonymous on loopback (the default) is the operator's call: no warning
    assert!(!run(None, None).contains("allow_anonymous"));
    let open = run(Some("0.0.0.0:18000"), None);
    assert!(
        open.contains("allow_anonymous is on and listen 0.0.0.0:18000 is not a loopback address"),
        "{open}"
    );
    assert!(!run(Some("0.0.0.0:18000"), Some("127.0.0.1:18000")).contains("allow_anonymous"));
    let bad = llm_edge()
        .args(["--validate", "--config"])
        .arg(&config)
        .env("LISTEN", "everywhere")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("listen"));
}

/// The keys printed in the documentation are refused before anything
/// listens, from the environment and from a config file alike.
#[test]
fn a_documented_example_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "keys:\n  - id: example\n    sha256: {}\n",
            support::gateway::sha256_hex("sk-example-change-me")
        ),
    )
    .unwrap();
    for (args, env) in [
        (
            vec!["--listen", "127.0.0.1:1"],
            Some("sk-edge-fine-and-long-enough-0000,sk-change-me"),
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:1",
                "--config",
                config.to_str().unwrap(),
            ],
            None,
        ),
    ] {
        let mut cmd = llm_edge();
        cmd.args(&args);
        if let Some(keys) = env {
            cmd.env("API_KEYS", keys);
        }
        // Bounded: a gateway that starts anyway is killed and fails the test.
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("example key"), "{stderr}");
        assert!(stderr.contains("gen-key"), "{stderr}");
    }
}

#[tokio::test]
async fn without_keys_every_v1_request_is_refused_with_a_reason() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&format!("upstream:\n  url: {}\n", mock.url()));
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no API keys configured"));
    assert!(gw.log().contains("no API keys are configured"));
}

/// `llm-edge gen-key | head -1`: a reader that leaves early is no panic.
#[test]
fn gen_key_into_a_closed_pipe_ends_quietly() {
    let mut child = llm_edge()
        .arg("gen-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
