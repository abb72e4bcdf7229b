"""End to end: the official `openai` client -> llm-edge -> a real llama.cpp llama-server.

llama-server is built from source by scripts/build-llama-server.sh (cached) and
serves a tiny deterministic model from scripts/make-tiny-model.py that answers
every chat with the same sentence, so replies, token counts and timings can be
checked exactly. See real_llama.py for how the processes are run.
"""

import concurrent.futures
import os
import time

import openai
import pytest
from real_llama import (
    CLIENT_KEY,
    PUBLIC_ALIAS,
    PUBLIC_MODEL,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    Gateway,
    LlamaServer,
    RawRequest,
    artifacts,  # noqa: F401 (fixture)
    gateway_connections_to,
    http,
    llama,  # noqa: F401 (fixture)
    metric,
    reply,  # noqa: F401 (fixture)
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello"}]
# generous bounds for a loaded 2-core machine; what is measured is printed
SLOT_FREE_BOUND_S = 5.0
GAP_502_BOUND_S = 3.0


@pytest.fixture(scope="module")
def gateway(llama, tmp_path_factory):
    gw = Gateway(llama.url, str(tmp_path_factory.mktemp("gateway")))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def llama1(artifacts, tmp_path_factory):
    """One slot with room for a generation of a minute or more (for cancellation)."""
    server = LlamaServer(*artifacts, tmp_path_factory.mktemp("llama1"), parallel=1, ctx=65536)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateway1(llama1, tmp_path_factory):
    gw = Gateway(llama1.url, str(tmp_path_factory.mktemp("gateway1")))
    yield gw
    gw.stop()


def long_generation(max_tokens=60000):
    """A generation that runs until max_tokens (over a minute for 60000)."""
    return {"ignore_eos": True, "max_tokens": max_tokens}


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


# --- catalogue, replies, usage -------------------------------------------------------


def test_models_lists_public_names_not_llama_id(gateway, llama):
    ids = [m.id for m in gateway.client().models.list()]
    assert ids == [PUBLIC_MODEL, PUBLIC_ALIAS]
    status, own = http("GET", llama.url + "/v1/models", llama.auth)
    assert status == 200 and [m["id"] for m in own["data"]] == [UPSTREAM_MODEL]
    assert UPSTREAM_MODEL not in ids


@pytest.mark.parametrize("model,temperature", [(PUBLIC_MODEL, 0.0), (PUBLIC_ALIAS, 1.0), (PUBLIC_MODEL, 2.0)])
def test_chat_returns_the_models_sentence_and_real_usage(gateway, llama, reply, model, temperature):
    sentence, n_tokens = reply
    resp = gateway.client().chat.completions.create(model=model, messages=HELLO, temperature=temperature)
    assert resp.choices[0].message.content == sentence
    assert resp.choices[0].finish_reason == "stop"
    # llama-server echoes its own alias: the gateway passes responses through untouched
    assert resp.model == UPSTREAM_MODEL
    timings = extra(resp, "timings")
    assert timings, resp
    # the sentence's tokens plus the end-of-generation token llama.cpp sampled
    assert resp.usage.completion_tokens == timings["predicted_n"] == n_tokens + 1
    assert resp.usage.prompt_tokens == timings["prompt_n"] + timings["cache_n"]
    assert resp.usage.prompt_tokens_details.cached_tokens == timings["cache_n"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # prompt_tokens is the real tokenization of the ChatML prompt
    _, templ = http("POST", llama.url + "/apply-template", llama.auth, {"messages": HELLO})
    _, toks = http("POST", llama.url + "/tokenize", llama.auth,
                   {"content": templ["prompt"], "add_special": True, "parse_special": True})
    assert resp.usage.prompt_tokens == len(toks["tokens"])


def test_streaming_arrives_token_by_token(gateway, reply):
    sentence, n_tokens = reply
    start = time.monotonic()
    stream = gateway.client().chat.completions.create(
        model=PUBLIC_MODEL, messages=HELLO, stream=True,
        stream_options={"include_usage": True}, extra_body=long_generation(1500),
    )
    arrivals, deltas, usage = [], [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
            deltas.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    text = "".join(deltas)
    assert text == (sentence * (1500 // n_tokens + 1))[: len(text)]
    assert "".join(deltas[:n_tokens]) == sentence
    # one SSE chunk per token, all of them
    assert usage.completion_tokens == 1500 == len(deltas)
    first, last = arrivals[0], arrivals[-1]
    print(f"\nstreaming 1500 tokens: first token after {first*1000:.0f} ms, last after {last*1000:.0f} ms")
    assert first * 3 < last, (first, last)


def test_include_usage_and_timings_reach_the_client(gateway, reply):
    sentence, n_tokens = reply
    c = gateway.client()
    chunks = list(c.chat.completions.create(
        model=PUBLIC_MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == sentence
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    timings = extra(last, "timings")
    assert timings and timings["predicted_n"] == last.usage.completion_tokens == n_tokens + 1
    assert timings["prompt_n"] + timings["cache_n"] == last.usage.prompt_tokens
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop" and extra(finish, "timings") is None
    assert chunks[0].choices[0].delta.role == "assistant"

    # without include_usage, llama.cpp puts timings on the finish chunk instead
    chunks = list(c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert extra(chunks[-1], "timings")["predicted_n"] == n_tokens + 1
    assert all(ch.usage is None for ch in chunks)


def test_response_format_json_object_succeeds(gateway):
    resp = gateway.client().chat.completions.create(
        model=PUBLIC_MODEL, messages=HELLO, response_format={"type": "json_object"}, max_tokens=24)
    # the tiny model cannot write JSON; the grammar-constrained request must still succeed
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= 24


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_slot_is_llamas_400(gateway, llama, reply, stream):
    sentence, n_tokens = reply
    n_ctx = llama.slots()[0]["n_ctx"]
    prompt = " ".join([sentence] * (n_ctx // n_tokens + 20))
    with pytest.raises(openai.BadRequestError) as exc:
        gateway.client().chat.completions.create(
            model=PUBLIC_MODEL, messages=[{"role": "user", "content": prompt}], stream=stream)
    assert exc.value.status_code == 400
    assert exc.value.type == "exceed_context_size_error", exc.value.body
    assert exc.value.body.get("n_ctx") == n_ctx


def test_upstream_api_key_is_the_gateways_not_the_clients(gateway, llama, reply):
    # llama-server refuses the client's key and no key; /health is public
    for headers in ({"Authorization": f"Bearer {CLIENT_KEY}"}, {}):
        status, body = http("POST", llama.url + "/v1/chat/completions", headers, {"messages": HELLO})
        assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert http("GET", llama.url + "/health")[0] == 200
    # the gateway reaches it with upstream.api_key while the client uses its own key
    resp = gateway.client().chat.completions.create(model=PUBLIC_MODEL, messages=HELLO)
    assert resp.choices[0].message.content == reply[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=UPSTREAM_KEY, max_retries=0).chat.completions.create(
            model=PUBLIC_MODEL, messages=HELLO)


# --- cancellation ------------------------------------------------------------------
#
# How a freed slot is observed matters. llama-server (b11434) notices that the
# client of a non-streamed or a queued request left only when its 1 s wait for a
# result times out, and every result of *any* task (a token of another stream, or
# the answer to a /slots or /metrics request) restarts that wait. Polling /slots
# every few ms would therefore keep a dropped non-streamed request running. So the
# tests watch llama-server's log (passive) and the gateway's upstream connections
# in /proc/net/tcp, and ask /slots only once at the end.

RELEASED = r"release: +id +\d+ \| task \d+ \| stop processing"


def predicted_total(llama):
    return metric(llama.metrics(), "llamacpp:tokens_predicted_total")


def ms_since(t0):
    return (time.monotonic() - t0) * 1000


def assert_slot_freed(llama, offset, t0, count=1):
    llama.wait_log(RELEASED, offset, SLOT_FREE_BOUND_S, count)
    ms = ms_since(t0)
    llama.wait_log("cancel task", offset, 1, count)  # cancelled, not finished
    assert llama.busy_slots() == 0
    return ms


def test_streaming_client_that_leaves_frees_the_slot(gateway1, llama1):
    before = predicted_total(llama1)
    stream = gateway1.client().chat.completions.create(
        model=PUBLIC_MODEL, messages=HELLO, stream=True, extra_body=long_generation())
    for i, _ in enumerate(stream):
        if i == 50:
            break
    offset, t0 = llama1.log_offset(), time.monotonic()
    stream.close()
    ms = assert_slot_freed(llama1, offset, t0)
    print(f"\nstreamed: slot freed {ms:.0f} ms after the client closed")
    assert predicted_total(llama1) - before < 60000


def test_non_streaming_client_that_leaves_frees_the_slot(gateway1, llama1):
    before = predicted_total(llama1)
    offset = llama1.log_offset()
    with pytest.raises(openai.APITimeoutError):
        gateway1.client(timeout=1.5).chat.completions.create(
            model=PUBLIC_MODEL, messages=HELLO, extra_body=long_generation())
    ms = assert_slot_freed(llama1, offset, time.monotonic())
    # llama-server checks a non-streamed client once a second
    print(f"\nnon-streamed: slot freed {ms:.0f} ms after the client timed out")
    assert predicted_total(llama1) - before < 60000


def test_queued_client_that_leaves_is_dropped(gateway1, llama1, reply):
    before = predicted_total(llama1)
    disconnects = lambda: metric(gateway1.metrics(), "llm_edge_client_disconnects_total",  # noqa: E731
                                 phase="before_first_token")
    disconnects_before = disconnects()
    c = gateway1.client()
    busy = c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, stream=True, extra_body=long_generation())
    next(iter(busy))
    idle_conns = gateway_connections_to(llama1.port)
    queued = RawRequest(gateway1.url, "/v1/chat/completions",
                        {"model": PUBLIC_MODEL, "messages": HELLO, "stream": True, **long_generation()})
    wait_until(lambda: metric(llama1.metrics(), "llamacpp:requests_deferred") == 1, 10,
               what="the second request to be queued")
    queued_conns = gateway_connections_to(llama1.port) - idle_conns
    assert len(queued_conns) == 1, queued_conns  # the queued request's own upstream connection
    queued.close()
    t0 = time.monotonic()
    # the gateway closes the queued request's upstream connection at once
    wait_until(lambda: not (gateway_connections_to(llama1.port) & queued_conns), SLOT_FREE_BOUND_S,
               what="the gateway to close the queued request's upstream connection")
    ms = ms_since(t0)
    wait_until(lambda: disconnects() == disconnects_before + 1, SLOT_FREE_BOUND_S, interval=0.05,
               what="llm_edge_client_disconnects_total{phase=before_first_token}")
    print(f"\nqueued: gateway closed the upstream connection {ms:.0f} ms after the client closed")
    # llama-server itself notices only when the slot frees: the first stream keeps
    # waking its wait (see above). Then the abandoned task is cancelled at once.
    offset, t0 = llama1.log_offset(), time.monotonic()
    busy.close()
    ms = assert_slot_freed(llama1, offset, t0, count=2)
    print(f"queued: slot free and the queued task cancelled {ms:.0f} ms after the first client closed")
    assert metric(llama1.metrics(), "llamacpp:requests_deferred") == 0
    resp = c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, timeout=10)
    assert resp.choices[0].message.content == reply[0]
    assert predicted_total(llama1) - before < 60000


# --- connection pool ---------------------------------------------------------------


def short_chat(client, reply):
    resp = client.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO)
    assert resp.choices[0].message.content == reply[0]


def test_pool_survives_idle_and_the_100_request_limit(gateway, llama, reply):
    c = gateway.client()
    short_chat(c, reply)
    time.sleep(5.5)  # llama-server closes keep-alive connections idle for 5 s
    ports = []
    for _ in range(130):  # llama-server closes every connection after 100 requests
        short_chat(c, reply)
        ports.append(tuple(sorted(gateway_connections_to(llama.port))))
    runs = {}
    for p in ports:
        for port in p:
            runs[port] = runs.get(port, 0) + 1
    print(f"\nrequests per pooled gateway->llama connection: {sorted(runs.values(), reverse=True)}")
    assert len(runs) >= 2, ports
    assert 95 <= max(runs.values()) <= 100, runs


def test_pool_kept_longer_than_llamas_keep_alive(llama, reply, tmp_path):
    # a pool that keeps idle connections longer than llama-server's 5 s: the
    # request after the gap must not fail on the connection llama-server closed
    # (Pingora's pool notices the close and drops it; a race would be retried)
    gw = Gateway(llama.url, str(tmp_path), upstream_extra={"pool_idle_timeout": "30s"})
    try:
        c = gw.client()
        short_chat(c, reply)
        pooled = gateway_connections_to(llama.port)
        time.sleep(5.5)
        print(f"\ngateway->llama connections before/after 5.5 s idle: {pooled} / {gateway_connections_to(llama.port)}")
        short_chat(c, reply)
        chunks = list(c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply[0]
    finally:
        gw.stop()


# --- llama-server crash and restart -------------------------------------------------


def test_killed_and_restarted_llama_server(artifacts, reply, tmp_path):
    llama = LlamaServer(*artifacts, tmp_path, parallel=1, ctx=65536)
    gw = Gateway(llama.url, str(tmp_path / "gw"))
    try:
        c = gw.client()
        short_chat(c, reply)

        # a stream in flight when llama-server dies ends with an error, promptly
        stream = c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, stream=True,
                                           extra_body=long_generation())
        it = iter(stream)
        for _ in range(20):
            next(it)
        llama.kill()
        t0 = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in it:
                pass
        stream_end = time.monotonic() - t0
        assert stream_end < GAP_502_BOUND_S

        # requests in the gap: a quick 502 that points at the tunnel
        gap = []
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as exc:
                c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO)
            gap.append(time.monotonic() - t0)
            assert exc.value.status_code == 502 and "SSH tunnel" in exc.value.message
        print(f"\nkill -9: open stream ended {stream_end*1000:.0f} ms later; 502s in "
              + ", ".join(f"{g*1000:.0f}" for g in gap) + " ms")
        assert max(gap) < GAP_502_BOUND_S, gap
        status, body = http("GET", gw.url + "/health/upstream")
        assert status == 503 and body["status"] == "unreachable", body

        llama.start()
        wait_until(lambda: http("GET", gw.url + "/health/upstream")[0] == 200, 30, interval=0.1,
                   what="/health/upstream to recover")
        status, body = http("GET", gw.url + "/health/upstream")
        assert status == 200 and body["status"] == "ok", body
        short_chat(c, reply)
        chunks = list(c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply[0]
    finally:
        gw.stop()
        llama.kill()


# --- concurrency --------------------------------------------------------------------


def test_sixteen_concurrent_streams_on_two_slots(gateway, reply):
    c = gateway.client()

    def one(i):
        stream = c.chat.completions.create(
            model=PUBLIC_MODEL, messages=[{"role": "user", "content": f"client {i}"}], stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16), timeout=120))
    assert texts == [reply[0]] * 16


# --- metrics ------------------------------------------------------------------------


def test_gateway_metrics_agree_with_llama_server(gateway, llama, reply):
    labels = {"model": PUBLIC_MODEL, "key": "alice"}

    def snapshot():
        g, l = gateway.metrics(), llama.metrics()
        return {
            "g_prompt": metric(g, "llm_edge_tokens_total", kind="prompt", **labels),
            "g_completion": metric(g, "llm_edge_tokens_total", kind="completion", **labels),
            "g_cached": metric(g, "llm_edge_tokens_total", kind="cached", **labels),
            "g_ttft_sum": metric(g, "llm_edge_time_to_first_token_seconds_sum", model=PUBLIC_MODEL),
            "g_ttft_count": metric(g, "llm_edge_time_to_first_token_seconds_count", model=PUBLIC_MODEL),
            "l_prompt": metric(l, "llamacpp:prompt_tokens_total"),
            "l_cached": metric(l, "llamacpp:prompt_tokens_cached_total"),
            "l_predicted": metric(l, "llamacpp:tokens_predicted_total"),
        }

    before = snapshot()
    c = gateway.client()
    usage_completion = usage_prompt = 0
    prompt_ms, client_ttft = [], []
    for i in range(3):
        msgs = [{"role": "user", "content": f"non-streamed {i} " * (i * 20 + 1)}]
        resp = c.chat.completions.create(model=PUBLIC_MODEL, messages=msgs, max_tokens=200,
                                         extra_body={"ignore_eos": i == 2})
        usage_completion += resp.usage.completion_tokens
        usage_prompt += resp.usage.prompt_tokens
    for i in range(3):
        msgs = [{"role": "user", "content": f"streamed {i} " * (i * 30 + 1)}]
        t0 = time.monotonic()
        first = None
        for ch in c.chat.completions.create(model=PUBLIC_MODEL, messages=msgs, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "max_tokens": 100 + 50 * i}):
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.monotonic() - t0
            if ch.usage:
                usage_completion += ch.usage.completion_tokens
                usage_prompt += ch.usage.prompt_tokens
                prompt_ms.append(extra(ch, "timings")["prompt_ms"])
        client_ttft.append(first)

    def settled():
        after = snapshot()
        delta = {k: after[k] - before[k] for k in after}
        return delta if delta["g_completion"] == usage_completion and delta["g_ttft_count"] == 3 else None

    delta = wait_until(settled, 5, interval=0.1, what="the gateway's counters")
    print(f"\nmetrics deltas: {delta}; client TTFTs {client_ttft}; llama prompt_ms {prompt_ms}")
    assert delta["l_predicted"] == delta["g_completion"] == usage_completion
    assert delta["g_prompt"] == usage_prompt == delta["l_prompt"] + delta["l_cached"]
    assert delta["g_cached"] == delta["l_cached"]
    # TTFT as the gateway saw it: after llama-server's own prompt processing,
    # before the client saw the first token
    assert sum(prompt_ms) / 1000 <= delta["g_ttft_sum"] <= sum(client_ttft)


def test_the_node_client_example_against_the_real_server(gateway, reply):
    """One check with the official Node client: the example, unmodified."""
    import subprocess

    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {**os.environ, "LLM_BASE_URL": gateway.url + "/v1", "LLM_API_KEY": CLIENT_KEY, "LLM_MODEL": "tiny"}
    out = subprocess.run(
        ["node", os.path.join(repo, "examples", "node", "client.mjs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # the simple chat and the stream both print the model's sentence
    assert out.stdout.count(reply[0]) >= 2, out.stdout
