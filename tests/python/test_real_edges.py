"""Two llm-edge processes sharing one redis-server (`state.redis`) in front of one
real llama-server: a key's token budget holds across both edges, every token is
counted once, and `llm-edge usage` reads the whole fleet's ledger. redis-server
is Debian's package (scripts/install-test-deps.sh); everything on loopback.
"""

import concurrent.futures
import json
import math
import os
import shutil
import socket
import subprocess
import time

import pytest
from real_llama import (
    PUBLIC_MODEL,
    REPO,
    Gateway,
    artifacts,  # noqa: F401 (fixture)
    free_port,
    llama,  # noqa: F401 (fixture)
    metric,
    sha256,
    wait_until,
)
from test_real_tokens import BYTES_PER_TOKEN, chat_body, llama_tokens, post

CAROL = "sk-carol-real-edges-0123456789abcdef"


@pytest.fixture
def redis_url(tmp_path):
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.fail("redis-server is missing: run scripts/install-test-deps.sh")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(up, 10, what="redis-server to listen")
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait(timeout=10)


def test_two_edges_keep_one_token_budget_on_a_real_llama_server(llama, tmp_path, redis_url):
    max_tokens = 16
    worst = math.ceil(len(chat_body(0, max_tokens)) / BYTES_PER_TOKEN) + max_tokens
    budget = worst * 10
    key = (f"  - id: carol\n    sha256: {sha256(CAROL)}\n    limits:\n"
           f"      tokens_per_minute: {budget}\n")
    state = f"state:\n  redis: {redis_url}\nledger:\n  flush_interval: 200ms\n"
    edges = [Gateway(llama.url, str(tmp_path / name), upstream_extra={"max_in_flight": 2},
                     extra_keys=key, extra_top=state) for name in ("a", "b")]
    try:
        before = llama_tokens(llama)
        started = time.monotonic()

        def one(i):
            return post(edges[i % 2].url + "/v1/chat/completions", chat_body(i, max_tokens), CAROL)

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(one, range(40), timeout=180))
        elapsed = time.monotonic() - started
        ok = [body for status, body, _ in results if status == 200]
        assert len(ok) + sum(1 for s, _, _ in results if s == 429) == 40, [s for s, _, _ in results]
        used = sum(b["usage"]["total_tokens"] for b in ok)
        # one budget for both edges: what was used never passes it (plus the refill)
        assert used <= budget * (1 + elapsed / 60), (used, budget, elapsed)
        assert len(ok) >= 10, f"{len(ok)} admitted; the budget fits ten worst cases"
        # both edges served, and llama-server counted exactly what the edges charged
        for gw in edges:
            served = metric(gw.metrics(), "llm_edge_requests_total", key="carol", code="200")
            assert served > 0, gw.log()
        assert llama_tokens(llama) - before == used

        def fleet_usage():
            binary = os.environ.get("LLM_EDGE_BIN") or os.path.join(REPO, "target", "debug", "llm-edge")
            out = subprocess.run([binary, "--config", edges[0].config, "usage", "--json", "--since", "2h",
                                  "--key", "carol"], stdout=subprocess.PIPE, text=True, timeout=30)
            doc = json.loads(out.stdout)
            return doc if doc["total"]["total_tokens"] == used else None

        doc = wait_until(fleet_usage, 10, interval=0.2, what="the fleet's ledger to hold every token")
        print(f"\ntwo edges, budget {budget} tokens/min: {len(ok)} admitted of 40, {used} tokens, "
              f"fleet ledger {doc['total']}")
    finally:
        for gw in edges:
            gw.stop()
