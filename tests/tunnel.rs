//! A real SSH reverse tunnel between the gateway and llama-server, as on
//! Machines A and B: Debian's sshd on loopback with throwaway keys, and
//! `ssh -N -R` exactly as the GPU machine runs it.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_llama::{reply_text, MockLlama, MockOptions};
use serde_json::Value;
use support::gateway::{free_port, standard_config, Gateway, KEY};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (Debian package openssh-client)")
        .success();
    assert!(ok);
}

/// sshd on 127.0.0.1 (Machine B's side), accepting one throwaway client key.
fn start_sshd(dir: &Path) -> (Killed, u16) {
    assert!(
        unsafe_is_root(),
        "the tunnel test runs sshd, which needs root (CI runs as root)"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    keygen(&dir.join("host_key"));
    keygen(&dir.join("client_key"));
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nAllowTcpForwarding remote\nGatewayPorts no\nClientAliveInterval 5\nLogLevel ERROR\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd (Debian package openssh-server)");
    wait_listening(port, "sshd");
    (Killed(child), port)
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Machine A's side: `ssh -N -R 127.0.0.1:FORWARD:127.0.0.1:LLAMA` to sshd.
fn open_tunnel(dir: &Path, sshd_port: u16, forward: u16, llama: u16) -> Killed {
    let child = Command::new("ssh")
        .args([
            "-N",
            "-R",
            &format!("127.0.0.1:{forward}:127.0.0.1:{llama}"),
        ])
        .args(["-p", &sshd_port.to_string(), "-i"])
        .arg(dir.join("client_key"))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("ssh");
    wait_listening(forward, "the reverse tunnel");
    Killed(child)
}

fn chat(stream: bool) -> String {
    support::http::chat_saying("qwen", "hi", stream)
}

async fn post(gw: &Gateway, stream: bool, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(KEY)
        .body(chat(stream));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn upstream_health(gw: &Gateway) -> (u16, Value) {
    let r = reqwest::get(format!("{}/health/upstream", gw.url()))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Starts a long stream, reads its first chunks, runs `cut`, and returns the
/// rest of what the client received.
async fn stream_cut_by(gw: &Gateway, cut: impl FnOnce()) -> String {
    let resp = post(
        gw,
        true,
        &[("x-mock-tokens", "300"), ("x-mock-delay-ms", "50")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut text = String::new();
    for _ in 0..3 {
        text.push_str(&String::from_utf8_lossy(&s.next().await.unwrap().unwrap()));
    }
    cut();
    // Bounded: the stream would otherwise run 15 s; the gateway's idle timeout is 20 s.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = s.next().await {
            match chunk {
                Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
        text
    })
    .await;
    rest.expect("the client was left hanging after the upstream went away")
}

fn assert_cut_with_error_event(text: &str) {
    assert!(
        !text.contains("[DONE]"),
        "a cut stream must not look complete: {text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap_or(last))
        .unwrap_or_else(|_| panic!("last event is not JSON: {last}"));
    assert!(event["error"]["message"].as_str().is_some(), "{event}");
}

async fn assert_502_with_hint(gw: &Gateway) {
    let r = post(gw, false, &[]).await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("SSH tunnel"), "{msg}");
}

#[tokio::test]
#[ignore = "needs sshd and ssh (and root to run sshd); scripts/test.sh runs it"]
async fn through_a_real_ssh_reverse_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let mut mock = MockLlama::start(MockOptions::default()).await;
    let llama_port = mock.addr.port();
    let (_sshd, sshd_port) = start_sshd(dir.path());
    let forward = free_port();
    let mut tunnel = open_tunnel(dir.path(), sshd_port, forward, llama_port);
    let gw = Gateway::start(&standard_config(&format!("http://127.0.0.1:{forward}"), ""));

    // Through the tunnel: models, chat, a stream.
    let models = reqwest::Client::new()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let r = post(&gw, false, &[]).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], reply_text(8));
    let streamed = post(&gw, true, &[]).await.text().await.unwrap();
    assert!(streamed.ends_with("data: [DONE]\n\n"));
    assert_eq!(upstream_health(&gw).await.0, 200);

    // The tunnel dies mid-stream.
    let text = stream_cut_by(&gw, || drop(tunnel)).await;
    assert_cut_with_error_event(&text);
    assert_502_with_hint(&gw).await;
    let (status, health) = upstream_health(&gw).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("unreachable"))
    );

    // Tunnel back: served again without restarting the gateway.
    tunnel = open_tunnel(dir.path(), sshd_port, forward, llama_port);
    assert_eq!(post(&gw, false, &[]).await.status(), 200);
    assert_eq!(upstream_health(&gw).await.0, 200);

    // llama-server dies while the tunnel stays up.
    let m = mock.clone();
    let text = stream_cut_by(&gw, move || m.stop()).await;
    assert_cut_with_error_event(&text);
    assert_502_with_hint(&gw).await;
    let (status, health) = upstream_health(&gw).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("unreachable")),
        "{health}"
    );

    // llama-server back on its port: served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    mock = MockLlama::start_on(llama_port, MockOptions::default()).await;
    let r = post(&gw, true, &[]).await.text().await.unwrap();
    assert!(r.ends_with("data: [DONE]\n\n"), "{r}");
    assert_eq!(upstream_health(&gw).await.0, 200);
    assert!(!mock.requests().is_empty());
    drop(tunnel);
}
