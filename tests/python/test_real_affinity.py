"""End to end: cache-affinity routing in front of two real llama-servers.

Each conversation's second turn must go where its first turn went and be served
from that llama-server's prompt cache (`timings.cache_n` > 0). Under least load
the turns would alternate between the servers, and a server that never saw the
conversation has nothing to reuse. See benches/affinity.rs for the measurement.
"""

import re

import pytest
from real_llama import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    Gateway,
    LlamaServer,
    artifacts,  # noqa: F401 (fixture)
    http,
    metric,
    reply,  # noqa: F401 (fixture)
    wait_until,
)


@pytest.fixture(scope="module")
def two_llamas(artifacts, tmp_path_factory):
    servers = [LlamaServer(*artifacts, tmp_path_factory.mktemp(f"llama{i}"), parallel=2, ctx=8192) for i in range(2)]
    yield servers
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def affinity_gateway(two_llamas, tmp_path_factory):
    servers = [("a", two_llamas[0].url), ("b", two_llamas[1].url)]
    gw = Gateway(None, str(tmp_path_factory.mktemp("gateway")), upstream_extra={"health_interval": "1s"}, servers=servers)
    yield gw
    gw.stop()


def chat(gw, messages):
    status, body = http(
        "POST",
        gw.url + "/v1/chat/completions",
        {"Authorization": f"Bearer {CLIENT_KEY}"},
        {"model": PUBLIC_MODEL, "messages": messages, "max_tokens": 16},
        timeout=60,
    )
    assert status == 200, body
    return body


def test_the_second_turn_is_served_from_the_first_turns_cache(affinity_gateway, two_llamas, reply):
    gw = affinity_gateway
    conversations = [
        [{"role": "system", "content": f"Conversation {i}. " + "You answer questions about prompt caches. " * 40}]
        for i in range(4)
    ]
    for conv in conversations:
        conv.append({"role": "user", "content": "What is a prompt cache?"})
        first = chat(gw, conv)
        assert first["choices"][0]["message"]["content"] == reply[0]
        conv.append({"role": "assistant", "content": first["choices"][0]["message"]["content"]})
    for conv in conversations:
        conv.append({"role": "user", "content": "And why does routing matter?"})
        second = chat(gw, conv)
        cache_n = second["timings"]["cache_n"]
        assert cache_n > 0, second["timings"]
        # Everything up to the new user message was reused.
        assert cache_n >= second["usage"]["prompt_tokens"] - 40, (cache_n, second["usage"])
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cache_n

    # The access log names each turn's server and its reuse: the two turns
    # of every conversation went to one server.
    # (each line is written just after its response: wait for the last one)
    def access_lines():
        found = [ln for ln in gw.log().splitlines() if '"POST /v1/chat/completions"' in ln]
        return found if len(found) == 8 else None

    lines = wait_until(access_lines, 10, interval=0.05, what="eight access-log lines")
    servers = [re.search(r" upstream=(\w+)", ln).group(1) for ln in lines]
    cached = [int(re.search(r" cached=(\d+)", ln).group(1)) for ln in lines]
    assert servers[:4] == servers[4:], servers
    assert set(servers[:4]) == {"a", "b"}, f"new conversations spread over both servers: {servers}"
    assert all(c > 0 for c in cached[4:]), cached

    # (totals are recorded just after each access-log line)
    def recorded():
        m = gw.metrics()
        return m if metric(m, "llm_edge_upstream_prompt_tokens_total", kind="cached") == sum(cached) else None

    samples = wait_until(recorded, 10, interval=0.05, what="the cached prompt tokens in the metrics")
    assert metric(samples, "llm_edge_routing_total", outcome="hit") == 4
    predicted = metric(samples, "llm_edge_upstream_prompt_tokens_total", kind="predicted_cached")
    assert predicted > 0
    print(f"servers {servers}, cached {cached}, predicted {predicted:.0f}")
