//! The command line of the real binary: --validate, hash-key, env-only start.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::{free_port, Gateway};

fn llm_edge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-edge"));
    cmd.env_remove("API_KEYS")
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

#[tokio::test]
async fn the_seed_environment_works_without_a_config_file() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No config file at all (so metrics take their default 127.0.0.1:9464;
    // this is the only test that runs on defaults).
    let mut child = llm_edge()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("LLAMA_BASE_URL", mock.url())
        .env("DEFAULT_MODEL", "qwen3-30b-a3b-instruct")
        .env("API_KEYS", "sk-local-abc,sk-other")
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..400 {
        if c.get(format!("{base}/health")).send().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready);
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
        .bearer_auth("sk-local-abc")
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
