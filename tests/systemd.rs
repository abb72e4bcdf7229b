//! The shipped systemd units pass systemd's own verifier.

mod support;

use std::process::Command;

use support::unit::{commands, read_unit, UNIT_BINARY};

/// Verifies a copy of `name` whose binaries point at ones that exist here.
fn verify(name: &str, replacements: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut text =
        std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for (from, to) in replacements {
        text = text.replace(from, to);
    }
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name}: {stderr}");
    // Unknown or misspelt keys are only warnings for systemd: fail on them too.
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains(name)).collect();
    assert!(complaints.is_empty(), "{name}:\n{}", complaints.join("\n"));
}

#[test]
#[ignore = "needs systemd-analyze (systemd); scripts/test.sh runs it"]
fn llm_edge_unit_verifies() {
    verify(
        "llm-edge.service",
        &[(UNIT_BINARY, env!("CARGO_BIN_EXE_llm-edge"))],
    );
}

#[test]
#[ignore = "needs systemd-analyze (systemd); scripts/test.sh runs it"]
fn llama_server_unit_verifies() {
    // llama-server is not built by default here: verify the unit against a stand-in binary.
    verify(
        "llama-server.service",
        &[("/usr/local/bin/llama-server", "/usr/bin/true")],
    );
}

#[test]
#[ignore = "needs systemd-analyze (systemd); scripts/test.sh runs it"]
fn llama_tunnel_unit_verifies() {
    assert!(
        std::path::Path::new("/usr/bin/autossh").exists(),
        "autossh is installed by scripts/install-test-deps.sh"
    );
    verify("llama-tunnel.service", &[]);
}

#[test]
fn llm_edge_unit_is_hardened_and_reloads_safely() {
    let unit = read_unit("llm-edge.service");
    for directive in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RuntimeDirectory=llm-edge",
        "PIDFile=/run/llm-edge/llm-edge.pid",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=1048576",
        "Restart=on-failure",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == directive),
            "missing {directive}"
        );
    }
    let reload = commands(&unit, "ExecReload");
    assert!(
        reload[0].contains(&"--validate".to_string()),
        "the first reload step validates: {reload:?}"
    );
    assert!(reload.iter().any(|c| c.contains(&"--upgrade".to_string())));
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let example = llm_edge::config::parse_yaml(include_str!("../conf/llm-edge.yaml")).unwrap();
    let grace =
        example.server.grace_period_seconds + example.server.graceful_shutdown_timeout_seconds;
    assert!(
        stop > grace,
        "TimeoutStopSec={stop} must exceed the grace period ({grace} s)"
    );
    let tunnel = read_unit("llama-tunnel.service");
    for opt in [
        "ExitOnForwardFailure=yes",
        "ServerAliveInterval=15",
        "Restart=always",
    ] {
        assert!(tunnel.contains(opt), "tunnel lacks {opt}");
    }
    assert!(
        read_unit("llama-server.service").contains(" -a "),
        "llama-server needs -a <public name>"
    );
}
