"""examples/browser/index.html in headless Chromium, against llm-edge with CORS.

The page is served from its own loopback origin, so every request to the
gateway is cross-origin (with a preflight) as it is for a real user.
tests/browser/run_page.mjs drives the system Chromium through playwright-core.
"""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import KEY, run_gateway

ROOT = Path(__file__).resolve().parents[2]
PAGE_DIR = ROOT / "examples" / "browser"
RUNNER = ROOT / "tests" / "browser" / "run_page.mjs"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
REPLY = "".join(f"tok{i} " for i in range(8))


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """Serves examples/browser; POST /v1/chat/completions answers a canned SSE
    stream written a few bytes at a time, so events (and UTF-8 characters) are
    split across network reads."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        body = "".join(
            f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]}, ensure_ascii=False)}{sep}"
            for piece, sep in SPLIT_PIECES
        ) + "data: [DONE]\r\n\r\n"
        data = body.encode()
        for i in range(0, len(data), 5):
            self.wfile.write(data[i : i + 5])
            self.wfile.flush()
            time.sleep(0.002)


SPLIT_PIECES = [("héllo ", "\n\n"), ("wörld ", "\r\n\r\n"), ("✓ ", "\n\n"), ("", "\n\n"), ("🦀", "\n\n")]


@pytest.fixture
def site():
    """The page's own origin: a static HTTP server on a free loopback port."""
    handler = functools.partial(PageHandler, directory=str(PAGE_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def cors_gateway(mock_llama, tmp_path, site):
    with run_gateway(mock_llama, tmp_path, f"cors:\n  allowed_origins: ['{site}']\n") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-test-deps.sh (Debian package chromium)")
    if not shutil.which("node"):
        pytest.fail("node is missing: CI has it; install Node.js 20+")
    if not (RUNNER.parent / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/browser/node_modules is missing: run scripts/install-test-deps.sh")

    def open_page(site, **params):
        url = f"{site}/index.html?" + urllib.parse.urlencode({**params, "autostart": "1"})
        proc = subprocess.run(
            ["node", str(RUNNER), url, "30000"], capture_output=True, text=True, timeout=90
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return open_page


def test_page_streams_the_reply(browser, site, cors_gateway):
    # no model given: the page takes the first one from /v1/models
    result = browser(site, base=cors_gateway, key=KEY, prompt="hello")
    assert result["state"] == "done", result
    assert result["reply"] == REPLY, result
    assert result["error"] == "", result
    assert result["appends"] >= 2, result  # text is added as it arrives, not at the end


def test_page_with_v1_url_and_model(browser, site, cors_gateway):
    result = browser(site, base=cors_gateway + "/v1/", key=KEY, model="small", prompt="hi")
    assert result["state"] == "done", result
    assert result["reply"] == REPLY, result


def test_page_shows_the_gateway_error_for_a_wrong_key(browser, site, cors_gateway):
    result = browser(site, base=cors_gateway, key="sk-wrong", model="qwen", prompt="hello")
    assert result["state"] == "error", result
    assert result["error"].startswith("401: invalid API key"), result
    assert result["reply"] == "", result


def test_page_reassembles_events_split_across_reads(browser, site):
    # the page's own server plays the gateway here: same origin, a dribbled stream
    result = browser(site, base=site, key="sk-any", model="m", prompt="hello")
    assert result["state"] == "done", result
    assert result["reply"] == "".join(piece for piece, _ in SPLIT_PIECES), result
