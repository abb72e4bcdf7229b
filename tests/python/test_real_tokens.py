"""Token budgets against a real llama-server: reservations hold under
concurrency, the counted tokens equal llama-server's own counters, the
prompt estimate's error is measured, and the official `openai` client reads
the rate-limit headers.
"""

import concurrent.futures
import json
import math
import time
import urllib.error
import urllib.request

import openai
import pytest
from real_llama import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    Gateway,
    artifacts,  # noqa: F401 (fixture)
    llama,  # noqa: F401 (fixture)
    metric,
    reply,  # noqa: F401 (fixture)
    sha256,
    wait_until,
)

CAROL = "sk-carol-real-tokens-0123456789abcdef"
BYTES_PER_TOKEN = 3  # the gateway's prompt estimate: body bytes / 3, rounded up


def carol(limits):
    return f"  - id: carol\n    sha256: {sha256(CAROL)}\n    limits:\n" + "".join(
        f"      {k}: {v}\n" for k, v in limits.items())


def usage(gw, query=""):
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/usage?{query}", timeout=10) as r:
        return json.loads(r.read())


def llama_tokens(llama):
    m = llama.metrics()
    return (metric(m, "llamacpp:prompt_tokens_total") + metric(m, "llamacpp:prompt_tokens_cached_total")
            + metric(m, "llamacpp:tokens_predicted_total"))


def post(url, body, key):
    """(status, JSON body, headers) of a POST, errors included."""
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def chat_body(i, max_tokens):
    return json.dumps({"model": PUBLIC_MODEL, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": f"budget request {i:02d}"}]})


def test_fifty_concurrent_requests_fit_the_budget_and_every_token_is_counted(llama, tmp_path):
    max_tokens = 16
    worst = math.ceil(len(chat_body(0, max_tokens)) / BYTES_PER_TOKEN) + max_tokens
    budget = worst * 10
    gw = Gateway(llama.url, str(tmp_path), extra_keys=carol({"tokens_per_minute": budget}))
    try:
        before = llama_tokens(llama)
        started = time.monotonic()

        def one(i):
            return post(gw.url + "/v1/chat/completions", chat_body(i, max_tokens), CAROL)

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50), timeout=180))
        elapsed = time.monotonic() - started
        ok = [body for status, body, _ in results if status == 200]
        limited = [(body, h) for status, body, h in results if status == 429]
        assert len(ok) + len(limited) == 50, [s for s, _, _ in results]
        assert len(ok) >= 10, f"{len(ok)} admitted; the budget fits ten worst cases"
        for body, headers in limited:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert int(headers["retry-after"]) >= 1
        used = sum(b["usage"]["total_tokens"] for b in ok)
        # what was used never passes the budget (plus what refilled meanwhile)
        assert used <= budget * (1 + elapsed / 60), (used, budget, elapsed)

        def counted():
            doc = usage(gw, "key=carol")
            return doc if doc["total"]["total_tokens"] == used else None

        doc = wait_until(counted, 10, interval=0.1, what="the ledger to hold every token")
        delta = llama_tokens(llama) - before
        print(f"\n50 concurrent, budget {budget} tokens/min ({worst} per worst case): {len(ok)} admitted, "
              f"{len(limited)} refused, {used} tokens used, llama-server counted {delta:.0f}; "
              f"ledger {doc['total']}")
        assert delta == used == doc["total"]["total_tokens"]
    finally:
        gw.stop()


ENGLISH = ("The gateway reserves a worst case for every request before it reaches the GPU, "
           "and settles it with the usage llama-server reports when the response ends. ")


@pytest.mark.parametrize("repeat", [1, 8, 64])
def test_the_prompt_estimate_over_counts_ordinary_text_and_its_error_is_measured(llama, tmp_path, repeat):
    gw = Gateway(llama.url, str(tmp_path))
    try:
        body = json.dumps({"model": PUBLIC_MODEL, "max_tokens": 1,
                           "messages": [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": ENGLISH * repeat}]})
        status, answer, _ = post(gw.url + "/v1/chat/completions", body, CLIENT_KEY)
        assert status == 200, answer
        actual = answer["usage"]["prompt_tokens"]
        estimate = math.ceil(len(body) / BYTES_PER_TOKEN)
        print(f"\nprompt of {len(body)} bytes: estimate {estimate}, llama-server {actual}, "
              f"ratio {estimate / actual:.2f}")
        # never under: the reservation is the worst case
        assert estimate >= actual
    finally:
        gw.stop()


def test_the_openai_client_reads_the_rate_limit_headers(llama, tmp_path):
    gw = Gateway(llama.url, str(tmp_path),
                 extra_keys=carol({"tokens_per_minute": 100000, "requests_per_minute": 60}))
    try:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=CAROL, max_retries=0, timeout=60)
        raw = c.chat.completions.with_raw_response.create(
            model=PUBLIC_MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}])
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "60"
        assert int(h["x-ratelimit-remaining-requests"]) == 59
        assert h["x-ratelimit-reset-requests"].endswith("s")
        assert h["x-ratelimit-limit-tokens"] == "100000"
        # this request's reservation is taken from what remains
        assert int(h["x-ratelimit-remaining-tokens"]) < 100000
        completion = raw.parse()
        assert completion.usage.total_tokens > 0
    finally:
        gw.stop()
