"""Fixtures that run the real llm-edge binary in front of the mock llama-server.

Both are separate processes on loopback ephemeral ports, as a user would run
them; the binaries come from LLM_EDGE_BIN and MOCK_LLAMA_BIN (set by
scripts/test.sh).
"""

import contextlib
import hashlib
import os
import socket
import subprocess
import time
import urllib.request

import pytest

KEY = "sk-py-alice"
KEY_LIMITED = "sk-py-bob"


def _bin(var, default):
    path = os.environ.get(var) or os.path.join(
        os.path.dirname(__file__), "..", "..", "target", "debug", *default
    )
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run `cargo build --bins --examples` (scripts/test.sh does)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture
def mock_llama():
    proc = subprocess.Popen(
        [_bin("MOCK_LLAMA_BIN", ["examples", "mock-llama-server"]), "--alias", "qwen3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    yield "http://" + line.split()[-1]
    proc.kill()
    proc.wait()


def wait_for_port(port, proc, log_path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("llm-edge exited:\n" + open(log_path).read())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("llm-edge did not start:\n" + open(log_path).read())


@contextlib.contextmanager
def run_gateway(mock_llama, tmp_path, extra_yaml=""):
    """Runs llm-edge with the test config plus `extra_yaml` (top-level YAML
    sections, e.g. a `cors:` block); yields its base URL (no /v1)."""
    port = free_port()
    config = tmp_path / "llm-edge.yaml"
    config.write_text(
        f"""
upstream:
  url: {mock_llama}
default_model: qwen3
models:
  - name: qwen3
    aliases: [qwen]
    upstream_name: /models/qwen3.gguf
  - name: small
keys:
  - id: alice
    sha256: {sha256(KEY)}
  - id: bob
    sha256: {sha256(KEY_LIMITED)}
    models: [small]
metrics:
  listen: 127.0.0.1:{free_port()}
server:
  threads: 2
  pid_file: {tmp_path}/llm-edge.pid
  upgrade_sock: {tmp_path}/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
"""
        + extra_yaml
    )
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [_bin("LLM_EDGE_BIN", ["llm-edge"]), "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def gateway(mock_llama, tmp_path):
    with run_gateway(mock_llama, tmp_path) as url:
        yield url


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()
