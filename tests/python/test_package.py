"""The Debian package and the three systemd units, installed and run under a real systemd.

scripts/package-deb.sh packages the binary under test (LLM_EDGE_BIN). The
package is checked with dpkg-deb, then installed into a Debian bookworm booted
with systemd-nspawn (root from scripts/make-test-rootfs.sh, made once and
cached; booted with --volatile=overlay so the cache never changes and nothing
is installed on this machine). Inside it the shipped units run as on the three
machines: llama-server.service (a real llama-server and the tiny model) with its
own API key, llama-tunnel@edge.service through sshd with the README's
forward-only key line, and the packaged llm-edge.service in front; a chat goes
through all three, `systemctl reload llm-edge` hands over to a new process, and
`dpkg --purge` removes what the package made. Last, the container image
(Containerfile, scripts/build-image.sh) is built with podman and serves /health.

Needs root, systemd-nspawn (Debian package systemd-container), debootstrap,
podman and runc; scripts/install-test-deps.sh installs them. It fails rather
than skips.
"""

import json
import os
import shlex
import subprocess
import tempfile
import time
import urllib.request

import pytest

from real_llama import REPO, free_port, llama_server_bin, model_reply, tiny_model

UNIT_MODEL = "qwen3-30b-a3b-instruct"  # the public name llama-server.service and the config use
LLAMA_PORT = 8090  # llama-server inside (8080 is the tunnel's end, as on Machine B)
EDGE_SSH_PORT = 2222


def _run(cmd, **kw):
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout}"
    return out.stdout


@pytest.fixture(scope="module")
def deb():
    binary = os.environ.get("LLM_EDGE_BIN") or os.path.join(REPO, "target", "debug", "llm-edge")
    assert os.access(binary, os.X_OK), f"{binary} is missing: cargo build --bins (scripts/test.sh does)"
    out = tempfile.mkdtemp(prefix="llm-edge-deb-")
    # uncompressed: the debug binary is large and xz would take a minute
    path = _run([os.path.join(REPO, "scripts", "package-deb.sh"), "--binary", binary, "--out", out, "--compress", "none"])
    path = path.strip().splitlines()[-1]
    yield path
    subprocess.run(["rm", "-rf", out])


def test_deb_contents(deb):
    info = _run(["dpkg-deb", "-I", deb])
    for field in ("Package: llm-edge", "Architecture: ", "Depends: libc6 (>= 2.", "adduser"):
        assert field in info, info
    assert _run(["dpkg-deb", "-f", deb, "Version"]).strip()
    files = {line.split()[-1] for line in _run(["dpkg-deb", "-c", deb]).splitlines()}
    for path in (
        "./usr/bin/llm-edge",
        "./lib/systemd/system/llm-edge.service",
        "./etc/llm-edge/llm-edge.yaml",
        "./usr/share/doc/llm-edge/copyright",
        "./usr/share/doc/llm-edge/systemd/llama-server.service",
        "./usr/share/doc/llm-edge/systemd/llama-tunnel@.service",
    ):
        assert path in files, f"{path} not in the package"
    with tempfile.TemporaryDirectory() as tree:
        _run(["dpkg-deb", "-e", deb, os.path.join(tree, "DEBIAN")])
        assert open(os.path.join(tree, "DEBIAN", "conffiles")).read().split() == ["/etc/llm-edge/llm-edge.yaml"]
        _run(["dpkg-deb", "-x", deb, tree])
        unit = open(os.path.join(tree, "lib/systemd/system/llm-edge.service")).read()
        assert "/usr/local/bin" not in unit and "ExecStart=/usr/bin/llm-edge --daemon" in unit
        config = os.path.join(tree, "etc/llm-edge/llm-edge.yaml")
        text = open(config).read()
        assert "\nkeys: []\n" in text and "llm-edge gen-key" in text
        assert "sha256: 319f30a6" not in text, "the example key's digest is in the packaged config"
        assert "pid_file: /run/llm-edge/llm-edge.pid" in text
        assert "upgrade_sock: /run/llm-edge/upgrade.sock" in text
        _run([os.path.join(tree, "usr/bin/llm-edge"), "--validate", "--config", config])


class Container:
    """A booted Debian with systemd (nspawn, private network), commands run inside with nsenter."""

    def __init__(self, rootfs, binds):
        args = ["systemd-nspawn", "-q", "-D", rootfs, "--volatile=overlay", "--keep-unit",
                "--register=no", "--private-network", "-b"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in binds]
        self.log = tempfile.NamedTemporaryFile(prefix="nspawn-", suffix=".log", delete=False)
        self.nspawn = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.leader = None
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, "systemd-nspawn exited:\n" + self.console()
            if self.leader is None:
                self.leader = self._find_leader()
            if self.leader is not None:
                state = self.sh("systemctl is-system-running || true", check=False).strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise AssertionError(f"the container did not boot (state {state!r}):\n" + self.console())

    def _find_leader(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.nspawn.pid and "(systemd)" in stat:
                return int(pid)
        return None

    def console(self):
        return open(self.log.name, errors="replace").read()[-4000:]

    def run(self, script, timeout=120):
        cmd = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "/bin/sh", "-c", script]
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def sh(self, script, check=True, timeout=120):
        out = self.run(script, timeout)
        if check:
            assert out.returncode == 0, f"in the container: {script}\nexit {out.returncode}\n{out.stdout}"
        return out.stdout

    def write(self, path, text, mode="0644", owner="root:root"):
        self.sh(f"cat > {path} <<'EOF'\n{text}EOF\nchmod {mode} {path} && chown {owner} {path}")

    def wait(self, script, what, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(script)
            if out.returncode == 0:
                return out.stdout
            if time.monotonic() > deadline:
                logs = self.sh("journalctl --no-pager -n 60", check=False)
                raise AssertionError(f"{what}: {out.stdout}\n{logs}")
            time.sleep(0.3)

    def stop(self):
        self.nspawn.terminate()
        try:
            self.nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait()
        os.unlink(self.log.name)


@pytest.fixture
def container(deb):
    rootfs = _run([os.path.join(REPO, "scripts", "make-test-rootfs.sh")]).strip().splitlines()[-1]
    binds = [
        (deb, "/pkg/llm-edge.deb"),
        (llama_server_bin(), "/pkg/llama-server"),
        (tiny_model(), "/pkg/model.gguf"),
        (os.path.join(REPO, "systemd"), "/pkg/systemd"),
    ]
    c = Container(rootfs, binds)
    yield c
    c.stop()


def test_deb_installs_and_the_units_run_under_systemd(container, deb):
    c = container
    reply, _ = model_reply(tiny_model())

    # --- the package: installs, adds its user, starts nothing (no key yet)
    out = c.sh("dpkg -i /pkg/llm-edge.deb 2>&1")
    assert "add an API key" in out, out
    assert c.sh("id -u llm-edge").strip()
    assert c.sh("stat -c '%a %U:%G' /etc/llm-edge /etc/llm-edge/llm-edge.yaml").split("\n")[:2] == [
        "750 root:llm-edge",
        "640 root:llm-edge",
    ]
    assert c.sh("systemctl is-enabled llm-edge.service || true").strip() == "disabled"
    assert c.sh("systemctl is-active llm-edge.service || true").strip() == "inactive"

    # --- Machine A: llama-server.service as shipped, with its own key; the model is
    # readable only through the supplementary group video (as /dev/nvidia* and /dev/dri are)
    upstream_key = "sk-llama-" + os.urandom(8).hex()
    c.sh(
        "install -m 0755 /pkg/llama-server /usr/local/bin/llama-server && "
        "getent group render >/dev/null || groupadd --system render; "
        "useradd --system --no-create-home --shell /usr/sbin/nologin --groups video,render llama && "
        f"install -d /srv/models && install -m 0640 -g video /pkg/model.gguf /srv/models/{UNIT_MODEL}.gguf && "
        "install -d -m 0700 /etc/llama-server && "
        f"sed 's/--port 8080/--port {LLAMA_PORT}/' /pkg/systemd/llama-server.service > /etc/systemd/system/llama-server.service"
    )
    c.write("/etc/llama-server/api-key", upstream_key + "\n", mode="0600")

    # --- Machine B's sshd with the README's forward-only user and key line
    c.sh(
        "useradd --system --create-home --home-dir /var/lib/tunnel --shell /usr/sbin/nologin tunnel && "
        "usermod -p '*' tunnel && "
        "useradd --system --create-home --home-dir /var/lib/llama-tunnel --shell /usr/sbin/nologin llama-tunnel && "
        "su -s /bin/sh llama-tunnel -c \"ssh-keygen -q -t ed25519 -N '' -f /var/lib/llama-tunnel/id_ed25519\" && "
        "install -d -m 0700 -o tunnel -g tunnel /var/lib/tunnel/.ssh && mkdir -p /run/sshd"
    )
    pub = c.sh("cat /var/lib/llama-tunnel/id_ed25519.pub").strip()
    c.write(
        "/var/lib/tunnel/.ssh/authorized_keys",
        f'restrict,port-forwarding,permitlisten="127.0.0.1:8080",command="/bin/false" {pub}\n',
        mode="0600",
        owner="tunnel:tunnel",
    )
    c.write(
        "/etc/ssh/sshd_edge",
        f"Port {EDGE_SSH_PORT}\nListenAddress 127.0.0.1\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPidFile /run/sshd-edge.pid\n"
        "Match User tunnel\n    AllowTcpForwarding remote\n    GatewayPorts no\n"
        "    X11Forwarding no\n    PermitTTY no\n    ClientAliveInterval 15\n    ClientAliveCountMax 3\n",
    )
    c.sh("systemd-run --unit=sshd-edge /usr/sbin/sshd -D -e -f /etc/ssh/sshd_edge")
    c.wait(f"ssh-keyscan -p {EDGE_SSH_PORT} 127.0.0.1 2>/dev/null | grep -q ed25519", "sshd on the edge side")
    c.sh(f"ssh-keyscan -p {EDGE_SSH_PORT} 127.0.0.1 2>/dev/null > /var/lib/llama-tunnel/known_hosts")

    # --- Machine A's tunnel: the template unit, one instance
    c.sh("install -d /etc/llama-tunnel && install -m 0644 '/pkg/systemd/llama-tunnel@.service' /etc/systemd/system/")
    c.write(
        "/etc/llama-tunnel/edge.conf",
        f"EDGE=tunnel@127.0.0.1\nEDGE_SSH_PORT={EDGE_SSH_PORT}\nREMOTE_PORT=8080\nLOCAL_PORT={LLAMA_PORT}\n",
    )

    # --- llm-edge's config: one key (gen-key's lines), llama-server's key upstream
    gen = c.sh("llm-edge gen-key --id alice")
    client_key = next(line for line in gen.splitlines() if line.startswith("sk-"))
    entry = "\n".join(line for line in gen.splitlines() if line.startswith("  "))
    config = c.sh("cat /etc/llm-edge/llm-edge.yaml")
    assert "\nkeys: []\n" in config
    config = config.replace("\nkeys: []\n", "\nkeys:\n" + entry + "\n")
    config = config.replace("  # api_key: change-me\n", f"  api_key: {upstream_key}\n")
    assert upstream_key in config
    c.write("/etc/llm-edge/llm-edge.yaml", config, mode="0640", owner="root:llm-edge")

    c.sh("systemctl daemon-reload && systemctl start llama-server.service llama-tunnel@edge.service")
    c.wait(f"curl -sf 127.0.0.1:{LLAMA_PORT}/health", "llama-server.service")
    c.wait("curl -sf 127.0.0.1:8080/health", "the tunnel (llama-tunnel@edge.service)")
    # Past the gateway, the tunnel's end asks for llama-server's own key.
    direct = c.sh("curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8080/v1/models")
    assert direct == "401", f"llama-server answered {direct} without its key"

    c.sh("systemctl enable --now llm-edge.service")
    c.wait("curl -sf 127.0.0.1:8000/health/upstream", "llm-edge.service sees llama-server")

    def chat():
        body = json.dumps({"model": UNIT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        out = c.sh(
            "curl -sf 127.0.0.1:8000/v1/chat/completions "
            f"-H {shlex.quote('Authorization: Bearer ' + client_key)} -d {shlex.quote(body)}"
        )
        return json.loads(out)["choices"][0]["message"]["content"]

    assert chat() == reply
    assert c.sh("stat -c '%U %a' /var/lib/llm-edge").strip() == "llm-edge 750"

    # --- zero-downtime reload, as the unit does it
    before = c.sh("systemctl show -P MainPID llm-edge.service").strip()
    c.sh("systemctl reload llm-edge.service")
    after = c.wait(
        f"test \"$(systemctl show -P MainPID llm-edge.service)\" != {before} && systemctl show -P MainPID llm-edge.service",
        "a new main process after the reload",
    ).strip()
    assert after != "0" and c.sh("systemctl is-active llm-edge.service").strip() == "active"
    assert chat() == reply
    # the old process leaves as soon as nothing is in flight
    c.wait(f"! kill -0 {before} 2>/dev/null", "the old process to exit", timeout=20)

    # Every unit is up; none logged a sandbox refusal (a system call filtered, a path denied).
    for unit in ("llama-server.service", "llama-tunnel@edge.service", "llm-edge.service"):
        assert c.sh(f"systemctl is-active {unit}").strip() == "active", c.sh(f"systemctl status {unit}", check=False)
    # The sandbox is in force, not skipped: a seccomp filter and no_new_privs on each
    # main process, and llama-server in its own user namespace (PrivateUsers=).
    for unit in ("llama-server.service", "llama-tunnel@edge.service", "llm-edge.service"):
        pid = c.sh(f"systemctl show -P MainPID {unit}").strip()
        status = c.sh(f"grep -E '^(Seccomp|NoNewPrivs):' /proc/{pid}/status")
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status, f"{unit}: {status}"
    pid = c.sh("systemctl show -P MainPID llama-server.service").strip()
    assert c.sh(f"cat /proc/{pid}/uid_map").split()[:3] != ["0", "0", "4294967295"]
    journal = c.sh("journalctl --no-pager -o cat -u llama-server -u llama-tunnel@edge -u llm-edge", check=False)
    for refusal in ("Bad system call", "Operation not permitted", "Permission denied", "SECCOMP"):
        assert refusal not in journal, f"{refusal!r} in the journal:\n{journal[-3000:]}"

    # --- remove and purge
    c.sh("systemctl disable --now llm-edge.service && dpkg --purge llm-edge")
    gone = c.sh(
        "for p in /usr/bin/llm-edge /lib/systemd/system/llm-edge.service /etc/llm-edge /var/lib/llm-edge; do "
        "test -e $p && echo $p; done; getent passwd llm-edge; getent group llm-edge; dpkg-statoverride --list | grep llm-edge; true"
    )
    assert gone.strip() == "", f"left after purge: {gone}"


def test_container_image(deb):
    binary = os.environ.get("LLM_EDGE_BIN") or os.path.join(REPO, "target", "debug", "llm-edge")
    tag = "localhost/llm-edge-test:" + os.urandom(4).hex()
    name = "llm-edge-test-" + os.urandom(4).hex()
    port = free_port()
    _run([os.path.join(REPO, "scripts", "build-image.sh"), "--binary", binary, "--tag", tag])
    # runc, not Debian 12's default crun: crun refuses this machine's hybrid cgroup
    # layout ("cgroups in hybrid mode not supported"). Limits within the hard ones
    # here: podman's defaults (nofile 1048576) exceed them and the start fails.
    run = ["podman", "run", "--runtime", "runc", "--ulimit", "nofile=4096:4096",
           "--ulimit", "nproc=1024:1024"]
    try:
        out = _run(run + ["--rm", tag, "--version"])
        assert out.startswith("llm-edge "), out
        _run(run + ["-d", "--name", name, "--network", "host", "-e", "API_KEYS=sk-image-test", tag,
                    "--config", "/etc/llm-edge/llm-edge.yaml", "--listen", f"127.0.0.1:{port}"])
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.load(r) == {"status": "ok"}
                    break
            except OSError:
                assert time.monotonic() < deadline, _run(["podman", "logs", name])
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": "Bearer sk-image-test"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == UNIT_MODEL
        assert _run(["podman", "exec", name, "/usr/bin/id", "-u"]).strip() == "65532"
        # As PID 1 the gateway must still handle SIGTERM (PID 1 ignores signals it
        # has no handler for): the stop is quick with nothing in flight.
        start = time.monotonic()
        _run(["podman", "stop", "-t", "30", name])
        assert time.monotonic() - start < 10, "SIGTERM did not stop the gateway in the container"
    finally:
        subprocess.run(["podman", "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["podman", "rmi", "-f", tag], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
