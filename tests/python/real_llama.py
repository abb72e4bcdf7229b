"""Helpers for the end-to-end tests against a real llama.cpp llama-server.

llama-server (tag b11434) and a tiny deterministic GGUF model come from
scripts/build-llama-server.sh and scripts/make-tiny-model.py (both instant once
cached), or from the environment variables LLAMA_SERVER_BIN and TINY_MODEL.
If the binary cannot be built the tests fail: they never skip.

Everything runs on loopback with ephemeral ports; every wait is bounded.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

PUBLIC_MODEL = "tiny"
PUBLIC_ALIAS = "tiny-chat"
UPSTREAM_MODEL = "tiny-upstream"  # llama-server -a: its own id for the model
UPSTREAM_KEY = "sk-llama-upstream-secret"  # llama-server --api-key
CLIENT_KEY = "sk-real-alice"  # what clients present to the gateway


def _run_script(cmd, what):
    try:
        out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"{what} failed: {e}")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not os.path.isfile(lines[-1]):
        pytest.fail(f"{what} failed (exit {out.returncode}); output: {out.stdout!r}")
    return lines[-1]


def llama_server_bin():
    path = os.environ.get("LLAMA_SERVER_BIN")
    if path:
        if not os.access(path, os.X_OK):
            pytest.fail(f"LLAMA_SERVER_BIN={path} is not an executable")
        return path
    return _run_script([os.path.join(REPO, "scripts", "build-llama-server.sh")], "scripts/build-llama-server.sh")


def tiny_model():
    path = os.environ.get("TINY_MODEL")
    if path:
        if not os.path.isfile(path):
            pytest.fail(f"TINY_MODEL={path} does not exist")
        return path
    return _run_script([sys.executable, os.path.join(REPO, "scripts", "make-tiny-model.py")], "scripts/make-tiny-model.py")


def model_reply(model_path):
    """The sentence the tiny model always answers, and its token count (from its metadata)."""
    from gguf import GGUFReader

    r = GGUFReader(model_path)
    return r.fields["llm_edge.reply"].contents(), int(r.fields["llm_edge.reply_tokens"].contents())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def http(method, url, headers=None, body=None, timeout=10):
    """A plain HTTP request; returns (status, parsed JSON or text). Never raises on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def parse_prometheus(text):
    """{(name, ((label, value), ...)): float} from Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        labels = ()
        if "{" in series:
            name, _, rest = series.partition("{")
            pairs = []
            for part in rest.rstrip("}").split('",'):
                if part:
                    k, _, v = part.partition("=")
                    pairs.append((k.strip(), v.strip().strip('"')))
            labels = tuple(sorted(pairs))
        else:
            name = series
        out[(name, labels)] = float(value)
    return out


def metric(samples, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for (n, ls), v in samples.items():
        if n == name and all((k, v2) in ls for k, v2 in labels.items()):
            total += v
    return total


def wait_until(predicate, timeout, interval=0.01, what="condition"):
    """Polls until predicate() is truthy; returns its value. Fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


class LlamaServer:
    """One real llama-server process on 127.0.0.1; restartable on the same port."""

    def __init__(self, binary, model, log_dir, parallel=2, ctx=8192, api_key=UPSTREAM_KEY, extra=()):
        self.binary, self.model, self.parallel, self.ctx = binary, model, parallel, ctx
        self.api_key, self.extra = api_key, list(extra)
        self.port = free_port()
        self.log_path = os.path.join(str(log_dir), f"llama-server-{self.port}.log")
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout=60):
        cmd = [
            self.binary, "-m", self.model, "-a", UPSTREAM_MODEL,
            "--host", "127.0.0.1", "--port", str(self.port),
            "-t", "1", "-np", str(self.parallel), "-c", str(self.ctx),
            "--metrics", "--sse-ping-interval", "1",
        ] + (["--api-key", self.api_key] if self.api_key else []) + self.extra
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{_tail(self.log_path)}")
            try:
                if http("GET", self.url + "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"llama-server did not become healthy:\n{_tail(self.log_path)}")

    def kill(self):
        """SIGKILL, like a crash (SIGTERM would wait for an SSE ping)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def slots(self):
        status, body = http("GET", self.url + "/slots", self.auth, timeout=5)
        assert status == 200, body
        return body

    def busy_slots(self):
        return sum(1 for s in self.slots() if s.get("is_processing"))

    def metrics(self):
        req = urllib.request.Request(self.url + "/metrics", headers=self.auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return parse_prometheus(resp.read().decode())

    def log(self):
        return _tail(self.log_path, 20000)

    def log_offset(self):
        return os.path.getsize(self.log_path)

    def wait_log(self, pattern, offset, timeout, count=1):
        """Waits (bounded) until `pattern` has appeared `count` times in the log
        after byte `offset`. Reading the log is passive: unlike polling /slots or
        /metrics it creates no server task (see test_real_llama.py)."""
        import re

        def seen():
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return len(re.findall(pattern, f.read().decode(errors="replace"))) >= count

        wait_until(seen, timeout, what=f"{pattern!r} x{count} in the llama-server log")


class Gateway:
    """The real llm-edge binary in front of a llama-server."""

    def __init__(self, llama_url, tmp_dir, upstream_extra=None, env=None, extra_models="", extra_keys="",
                 servers=None, extra_top=""):
        """`extra_models` / `extra_keys`: YAML list items appended to `models:` / `keys:`;
        `servers`: [(name, url)] for `upstream.servers` instead of `llama_url`;
        `extra_top`: top-level sections (e.g. `state:`)."""
        binary = os.environ.get("LLM_EDGE_BIN") or os.path.join(REPO, "target", "debug", "llm-edge")
        if not os.path.exists(binary):
            pytest.fail(f"{binary} is missing: run `cargo build --bins` (scripts/test.sh does)")
        os.makedirs(tmp_dir, exist_ok=True)
        self.port, self.metrics_port = free_port(), free_port()
        self.config = os.path.join(tmp_dir, "llm-edge.yaml")
        upstream = {"api_key": UPSTREAM_KEY, **(upstream_extra or {})}
        if not servers:
            upstream = {"url": llama_url, **upstream}
        upstream_yaml = "".join(f"  {k}: {v}\n" for k, v in upstream.items())
        if servers:
            upstream_yaml += "  servers:\n" + "".join(f"    - name: {n}\n      url: {u}\n" for n, u in servers)
        config = os.path.join(tmp_dir, "llm-edge.yaml")
        with open(config, "w") as f:
            f.write(
                f"""upstream:
{upstream_yaml}default_model: {PUBLIC_MODEL}
models:
  - name: {PUBLIC_MODEL}
    aliases: [{PUBLIC_ALIAS}]
    upstream_name: {UPSTREAM_MODEL}
{extra_models}keys:
  - id: alice
    sha256: {sha256(CLIENT_KEY)}
{extra_keys}{extra_top}metrics:
  listen: 127.0.0.1:{self.metrics_port}
server:
  threads: 2
  pid_file: {tmp_dir}/llm-edge.pid
  upgrade_sock: {tmp_dir}/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
"""
            )
        self.log_path = os.path.join(tmp_dir, "gateway.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [binary, "--config", config, "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("llm-edge exited:\n" + _tail(self.log_path))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llm-edge did not start:\n" + _tail(self.log_path))
                time.sleep(0.05)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        import openai

        opts = {"timeout": 60, "max_retries": 0, **kw}
        return openai.OpenAI(base_url=self.url + "/v1", api_key=CLIENT_KEY, **opts)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return parse_prometheus(resp.read().decode())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self):
        return _tail(self.log_path, 20000)


class RawRequest:
    """A request written on a plain socket, so a test decides exactly when the
    client goes away (close() sends FIN at once)."""

    def __init__(self, base_url, path, body, key=CLIENT_KEY):
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)

    def read_some(self, n=4096):
        return self.sock.recv(n)

    def close(self):
        self.sock.close()


def gateway_connections_to(port):
    """Local ports of ESTABLISHED loopback TCP connections whose far end is `port`
    (seen from /proc/net/tcp): the gateway's pooled connections to llama-server."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                ports.add(int(local.split(":")[1], 16))
    return ports


def _parse_http_request(data):
    """(request, rest of data) for the first complete request in `data`, else None."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = data[:head_end].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    rest = data[head_end + 4:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, pos = b"", 0
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(rest[pos:eol].split(b";")[0], 16)
            if size == 0:
                end = rest.find(b"\r\n\r\n", eol)  # no trailers expected
                if end < 0:
                    return None
                return (method, target, headers, body), rest[end + 4:]
            if len(rest) < eol + 2 + size + 2:
                return None
            body += rest[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
    n = int(headers.get("content-length", "0"))
    if len(rest) < n:
        return None
    return (method, target, headers, rest[:n]), rest[n:]


class RecordingRelay:
    """A loopback TCP relay that records every byte a client sends through it.

    Put between llm-edge and its upstream, it shows exactly what the upstream
    received (request lines, headers, the rewritten body), or that it received
    nothing. Responses pass back untouched.
    """

    def __init__(self, target_url):
        import threading

        self._target = target_url.removeprefix("http://").rsplit(":", 1)
        self._lock = threading.Lock()
        self._conns = []  # bytearray per accepted connection, in order
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._closed = False
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        import threading

        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((self._target[0], int(self._target[1])), timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                # no Nagle delay: the relay must not hold back a small write (a token)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            with self._lock:
                self._conns.append(buf)
            threading.Thread(target=self._pump, args=(client, upstream, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    with self._lock:
                        record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def raw(self):
        """Everything received so far, all connections concatenated."""
        with self._lock:
            return b"".join(bytes(b) for b in self._conns)

    def requests(self):
        """The complete HTTP/1.1 requests received so far, as
        (method, target, {lower-case header: value}, body), connection by
        connection (Content-Length and chunked bodies)."""
        with self._lock:
            conns = [bytes(b) for b in self._conns]
        out = []
        for data in conns:
            while True:
                parsed = _parse_http_request(data)
                if parsed is None:
                    break
                request, data = parsed
                out.append(request)
        return out

    def close(self):
        self._closed = True
        self._sock.close()


# Module-scoped fixtures shared by the real-llama test modules (import them
# by name into a test module to use them there).


@pytest.fixture(scope="module")
def artifacts():
    return llama_server_bin(), tiny_model()


@pytest.fixture(scope="module")
def reply(artifacts):
    """(sentence, its token count)"""
    return model_reply(artifacts[1])


@pytest.fixture(scope="module")
def llama(artifacts, tmp_path_factory):
    """Two slots of 4096 tokens, behind --api-key."""
    server = LlamaServer(*artifacts, tmp_path_factory.mktemp("llama"), parallel=2, ctx=8192)
    yield server
    server.kill()
