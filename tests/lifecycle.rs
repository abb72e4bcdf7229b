//! A running process means a serving gateway: listeners that cannot be bound
//! end the process, a stop ends it as soon as nothing is in flight, SIGHUP
//! does not kill it.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mock_llama::{MockLlama, MockOptions};
use support::gateway::{free_port, standard_config, Gateway, KEY};
use support::http::eventually;

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Whether the process has exited (reaped by its parent's `wait` or gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // a zombie (exited, not yet reaped) counts as gone
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_taken_port_ends_the_process_with_the_address_and_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (flag_listen, metrics) in [
        (addr.to_string(), format!("127.0.0.1:{}", free_port())),
        (format!("127.0.0.1:{}", free_port()), addr.to_string()),
    ] {
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            format!(
                "upstream:\n  url: http://127.0.0.1:1\nmetrics:\n  listen: {metrics}\nserver:\n  pid_file: {d}/p.pid\n  upgrade_sock: {d}/u.sock\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-edge"))
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(&flag_listen)
            .env_remove("API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        // Bounded: a process that stays up (Pingora retries a bind for ~30 s,
        // then lingers with a dead listener) is killed and fails the test.
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let status = status.unwrap_or_else(|| panic!("still running with {addr} taken:\n{log}"));
        assert!(!status.success(), "{log}");
        assert!(log.contains(&addr.to_string()), "{log}");
        assert!(log.contains("cannot listen"), "{log}");
    }
    drop(taken);
}

#[tokio::test]
async fn a_stop_ends_the_process_as_soon_as_nothing_is_in_flight() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // A long grace period: the stop must not wait for it.
    let yaml = standard_config(&mock.url(), "")
        + &format!(
            "server:\n  threads: 2\n  pid_file: {d}/llm-edge.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period_seconds: 60\n  graceful_shutdown_timeout_seconds: 1\n",
            d = dir.path().display()
        );
    let gw = Gateway::start(&yaml);
    let c = reqwest::Client::new();
    // a stream still running when the stop comes finishes first
    let stream = c
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .header("x-mock-tokens", "10")
        .header("x-mock-delay-ms", "100")
        .body(r#"{"model":"qwen","messages":[],"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stopped = Instant::now();
    signal(gw.pid(), "TERM");
    let text = stream.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let pid = gw.pid();
    eventually("the process exits once the stream is over", || gone(pid)).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "waited for the grace period ({:?})",
        stopped.elapsed()
    );
    assert!(gw.log().contains("no request in flight"), "{}", gw.log());
}

#[tokio::test]
async fn sighup_is_logged_and_the_gateway_keeps_serving() {
    let mock = MockLlama::start(MockOptions::default()).await;
    let gw = Gateway::start(&standard_config(&mock.url(), ""));
    signal(gw.pid(), "HUP");
    eventually("SIGHUP is logged", || gw.log().contains("SIGHUP ignored")).await;
    assert!(!gone(gw.pid()));
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
