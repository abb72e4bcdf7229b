"""End to end in the three dialects: the official `anthropic` and `openai` SDKs,
unmodified -> llm-edge -> a real llama.cpp llama-server (b11434, tiny model).

Chat completions, the OpenAI Responses API (`/v1/responses`) and Anthropic
Messages (`/v1/messages`) all reach the same llama-server; the tiny model
answers every prompt with the same sentence, so texts and token counts can be
compared exactly across dialects and against llama-server's own /metrics.

A RecordingRelay sits between the gateway and llama-server and shows what
llama-server actually received (the rewritten model name, the forwarded
headers, and that refused requests never arrived).
"""

import json
import time

import anthropic
import openai
import pytest
from real_llama import (
    CLIENT_KEY,
    PUBLIC_ALIAS,
    PUBLIC_MODEL,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    Gateway,
    RecordingRelay,
    artifacts,  # noqa: F401 (fixture)
    http,
    llama,  # noqa: F401 (fixture)
    metric,
    reply,  # noqa: F401 (fixture)
    sha256,
)

# a key allowed only the second model, which the first is not
LIMITED_KEY = "sk-real-bob"
OTHER_MODEL = "other"
OTHER_UPSTREAM = "other-upstream"
EXTRA_MODELS = f"  - name: {OTHER_MODEL}\n    upstream_name: {OTHER_UPSTREAM}\n"
EXTRA_KEYS = f"  - id: bob\n    sha256: {sha256(LIMITED_KEY)}\n    models: [{OTHER_MODEL}]\n"

HELLO = [{"role": "user", "content": "Hello"}]
MAX_TOKENS = 64  # far above the sentence: every reply ends with the model's own stop


@pytest.fixture(scope="module")
def relay(llama):
    r = RecordingRelay(llama.url)
    yield r
    r.close()


@pytest.fixture(scope="module")
def gateway(relay, tmp_path_factory):
    gw = Gateway(relay.url, str(tmp_path_factory.mktemp("gateway")),
                 extra_models=EXTRA_MODELS, extra_keys=EXTRA_KEYS)
    yield gw
    gw.stop()


def claude(gateway, key=CLIENT_KEY):
    # no /v1: the SDK appends /v1/messages itself. (anthropic 2.x sends api_key
    # as `Authorization: Bearer`; see test_anthropic_x_api_key for `x-api-key`.)
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=60)


def claude_x_api_key(gateway, key=CLIENT_KEY):
    """The SDK with the key only in `x-api-key`, as Anthropic's own clients send it."""
    return anthropic.Anthropic(base_url=gateway.url, api_key=None, auth_token=None, max_retries=0,
                               timeout=60, default_headers={"x-api-key": key})


def gpt(gateway, key=CLIENT_KEY):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def upstream_requests(relay, marker):
    """What llama-server received with the string `marker` (whole) in its body:
    [(method, path, headers, json)]."""
    quoted = json.dumps(marker).encode()
    return [(m, t, h, json.loads(b)) for m, t, h, b in relay.requests() if quoted in b]


def assert_forwarded_as_upstream(relay, marker, path, model=UPSTREAM_MODEL):
    """Exactly one request with `marker` reached llama-server, on `path`, with the
    upstream model name and llama-server's key (never the client's)."""
    got = upstream_requests(relay, marker)
    assert [(m, t) for m, t, _, _ in got] == [("POST", path)], got
    _, _, headers, body = got[0]
    assert body["model"] == model, body
    assert headers.get("authorization") == f"Bearer {UPSTREAM_KEY}", headers
    assert "x-api-key" not in headers, headers
    assert CLIENT_KEY.encode() not in relay.raw() and LIMITED_KEY.encode() not in relay.raw()
    return headers, body


def extra(obj, name):
    return (getattr(obj, "model_extra", None) or {}).get(name)


# --- Anthropic Messages with the official anthropic SDK ----------------------------


def test_anthropic_sdk_messages_create(gateway, relay, llama, reply):
    sentence, n_tokens = reply
    marker = "Hello from the anthropic SDK"
    msgs = [{"role": "user", "content": marker}]
    c = claude(gateway)
    msg = c.messages.create(model=PUBLIC_ALIAS, max_tokens=MAX_TOKENS, messages=msgs,
                            extra_headers={"anthropic-beta": "llm-edge-test-2025-01-01"})
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == sentence
    assert msg.stop_reason == "end_turn" and msg.role == "assistant" and msg.type == "message"
    # llama-server echoes its own alias (as on chat completions)
    assert msg.model == UPSTREAM_MODEL
    assert msg.usage.output_tokens == n_tokens + 1  # the sentence plus the end-of-generation token
    assert msg.usage.input_tokens > 0
    headers, body = assert_forwarded_as_upstream(relay, marker, "/v1/messages")
    # the SDK's anthropic-version and anthropic-beta reach llama-server
    assert headers.get("anthropic-version") == c.default_headers["anthropic-version"], headers
    assert headers.get("anthropic-beta") == "llm-edge-test-2025-01-01", headers
    assert body["max_tokens"] == MAX_TOKENS and not body.get("stream")

    # /v1/messages/count_tokens through the same SDK: llama-server's count of the
    # same prompt, which Messages usage splits into fresh and cached tokens
    counted = c.messages.count_tokens(model=PUBLIC_ALIAS, messages=msgs)
    prompt_total = msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == prompt_total, (counted, msg.usage)
    paths = [t for _, t, _, _ in upstream_requests(relay, marker)]
    assert paths == ["/v1/messages", "/v1/messages/count_tokens"], paths
    status, direct = http("POST", llama.url + "/v1/messages/count_tokens", llama.auth,
                          {"model": UPSTREAM_MODEL, "messages": msgs})
    assert status == 200 and direct["input_tokens"] == counted.input_tokens, direct


def test_anthropic_sdk_messages_stream(gateway, relay, reply):
    sentence, n_tokens = reply
    marker = "Hello from the anthropic SDK, streamed"
    with claude(gateway).messages.stream(
        model=PUBLIC_ALIAS, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": marker}]
    ) as s:
        deltas = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(deltas) == sentence
    assert len(deltas) > 1  # arrived in pieces, not as one block
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == sentence
    assert final.stop_reason == "end_turn"
    assert final.model == UPSTREAM_MODEL
    assert final.usage.output_tokens == n_tokens + 1
    assert final.usage.input_tokens > 0
    _, body = assert_forwarded_as_upstream(relay, marker, "/v1/messages")
    assert body["stream"] is True


def test_anthropic_sdk_forbidden_model_unknown_model_and_wrong_key(gateway, relay):
    marker = "Hello from a key that may not use tiny"
    msgs = [{"role": "user", "content": marker}]
    bob = claude(gateway, key=LIMITED_KEY)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        bob.messages.create(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=msgs)
    e = exc.value
    assert e.status_code == 403
    assert e.body["type"] == "error" and e.body["error"]["type"] == "permission_error", e.body
    assert isinstance(e.body["error"]["message"], str) and e.body["error"]["message"], e.body
    # the streaming helper is refused the same way, before any event
    with pytest.raises(anthropic.PermissionDeniedError):
        with bob.messages.stream(model=PUBLIC_ALIAS, max_tokens=MAX_TOKENS, messages=msgs) as s:
            list(s.text_stream)
    with pytest.raises(anthropic.PermissionDeniedError):
        bob.messages.count_tokens(model=PUBLIC_MODEL, messages=msgs)
    assert upstream_requests(relay, marker) == []

    # the same key is served on its own model (so the 403 was the allow-list)
    ok_marker = "Hello from bob on his own model"
    msg = bob.messages.create(model=OTHER_MODEL, max_tokens=MAX_TOKENS,
                              messages=[{"role": "user", "content": ok_marker}])
    assert msg.content[0].text
    assert upstream_requests(relay, ok_marker)[0][3]["model"] == OTHER_UPSTREAM

    with pytest.raises(anthropic.NotFoundError) as exc:
        claude(gateway).messages.create(model="no-such-model", max_tokens=MAX_TOKENS, messages=msgs)
    assert exc.value.body["type"] == "error" and exc.value.body["error"]["type"] == "not_found_error", exc.value.body

    with pytest.raises(anthropic.AuthenticationError) as exc:
        claude(gateway, key="sk-wrong").messages.create(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=msgs)
    e = exc.value
    assert e.status_code == 401
    assert e.body["type"] == "error" and e.body["error"]["type"] == "authentication_error", e.body
    # llama-server's own key is no gateway key either
    with pytest.raises(anthropic.AuthenticationError):
        claude(gateway, key=UPSTREAM_KEY).messages.create(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=msgs)
    assert upstream_requests(relay, marker) == []


def test_anthropic_x_api_key(gateway, relay, reply, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    marker = "Hello with x-api-key"
    c = claude_x_api_key(gateway)
    msg = c.messages.create(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": marker}])
    assert msg.content[0].text == reply[0]
    assert_forwarded_as_upstream(relay, marker, "/v1/messages")
    with pytest.raises(anthropic.AuthenticationError) as exc:
        claude_x_api_key(gateway, key="sk-wrong").messages.create(
            model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": marker}])
    assert exc.value.body["error"]["type"] == "authentication_error", exc.value.body
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        claude_x_api_key(gateway, key=LIMITED_KEY).messages.create(
            model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": marker}])
    assert exc.value.body["error"]["type"] == "permission_error", exc.value.body
    assert len(upstream_requests(relay, marker)) == 1


# --- OpenAI Responses with the official openai SDK ---------------------------------


def test_openai_sdk_responses_create(gateway, relay, llama, reply):
    sentence, n_tokens = reply
    marker = "Hello from the openai SDK, Responses API"
    c = gpt(gateway)
    resp = c.responses.create(model=PUBLIC_ALIAS, input=marker, max_output_tokens=MAX_TOKENS)
    assert resp.output_text == sentence
    assert resp.status == "completed"
    assert [item.type for item in resp.output] == ["message"]
    assert resp.model == UPSTREAM_MODEL
    assert resp.usage.output_tokens == n_tokens + 1
    assert resp.usage.input_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    _, body = assert_forwarded_as_upstream(relay, marker, "/v1/responses")
    assert body["max_output_tokens"] == MAX_TOKENS

    # /v1/responses/input_tokens: the same count (Responses usage includes cached tokens)
    counted = c.responses.input_tokens.count(model=PUBLIC_ALIAS, input=marker)
    assert counted.input_tokens == resp.usage.input_tokens, (counted, resp.usage)
    paths = [t for _, t, _, _ in upstream_requests(relay, marker)]
    assert paths == ["/v1/responses", "/v1/responses/input_tokens"], paths


def test_openai_sdk_responses_stream(gateway, relay, reply):
    sentence, n_tokens = reply
    marker = "Hello from the openai SDK, Responses API, streamed"
    events = list(gpt(gateway).responses.create(
        model=PUBLIC_ALIAS, input=marker, max_output_tokens=MAX_TOKENS, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == sentence and len(deltas) > 1
    done = [e.text for e in events if e.type == "response.output_text.done"]
    assert done == [sentence]
    completed = events[-1].response
    assert completed.output_text == sentence
    assert completed.model == UPSTREAM_MODEL
    assert completed.usage.output_tokens == n_tokens + 1
    assert completed.usage.input_tokens > 0
    _, body = assert_forwarded_as_upstream(relay, marker, "/v1/responses")
    assert body["stream"] is True


def test_openai_sdk_responses_forbidden_and_wrong_key(gateway, relay):
    marker = "Hello from a key that may not use tiny, Responses API"
    with pytest.raises(openai.PermissionDeniedError) as exc:
        gpt(gateway, key=LIMITED_KEY).responses.create(model=PUBLIC_ALIAS, input=marker)
    assert exc.value.status_code == 403
    with pytest.raises(openai.PermissionDeniedError):
        list(gpt(gateway, key=LIMITED_KEY).responses.create(model=PUBLIC_MODEL, input=marker, stream=True))
    with pytest.raises(openai.AuthenticationError) as exc:
        gpt(gateway, key="sk-wrong").responses.create(model=PUBLIC_MODEL, input=marker)
    assert exc.value.status_code == 401
    with pytest.raises(openai.NotFoundError):
        gpt(gateway).responses.create(model="no-such-model", input=marker)
    assert upstream_requests(relay, marker) == []


# --- one prompt, three dialects: same text, same accounting ------------------------

DIALECTS = ["chat_completions", "responses", "messages"]


def run_dialect(gateway, route):
    """One non-streamed and one streamed request for HELLO in one dialect.
    Returns texts, the usage totals the client saw, the client's time to the
    first text delta of the stream, and llama-server's prompt_ms if it sent timings."""
    out = {"texts": [], "prompt": 0, "completion": 0, "cached": 0, "client_ttft": None, "prompt_ms": None}

    def stream_deltas(t0, events, text_of):
        deltas = []
        for ev in events:
            piece = text_of(ev)
            if piece:
                if out["client_ttft"] is None:
                    out["client_ttft"] = time.monotonic() - t0
                deltas.append(piece)
            yield ev
        out["texts"].append("".join(deltas))

    if route == "chat_completions":
        c = gpt(gateway)
        r = c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, max_tokens=MAX_TOKENS)
        out["texts"].append(r.choices[0].message.content)
        usages = [r.usage]
        t0 = time.monotonic()  # before the request: the SDK returns once the response head is in
        stream = c.chat.completions.create(model=PUBLIC_MODEL, messages=HELLO, max_tokens=MAX_TOKENS, stream=True,
                                           stream_options={"include_usage": True})
        for ch in stream_deltas(t0, stream, lambda ch: ch.choices[0].delta.content if ch.choices else None):
            if ch.usage:
                usages.append(ch.usage)
                out["prompt_ms"] = extra(ch, "timings")["prompt_ms"]
        for u in usages:
            out["prompt"] += u.prompt_tokens
            out["completion"] += u.completion_tokens
            out["cached"] += u.prompt_tokens_details.cached_tokens
    elif route == "responses":
        c = gpt(gateway)
        r = c.responses.create(model=PUBLIC_MODEL, input="Hello", max_output_tokens=MAX_TOKENS)
        out["texts"].append(r.output_text)
        usages = [r.usage]
        t0 = time.monotonic()
        stream = c.responses.create(model=PUBLIC_MODEL, input="Hello", max_output_tokens=MAX_TOKENS, stream=True)
        for ev in stream_deltas(t0, stream, lambda ev: ev.delta if ev.type == "response.output_text.delta" else None):
            if ev.type == "response.completed":
                usages.append(ev.response.usage)
                timings = extra(ev, "timings")
                out["prompt_ms"] = timings and timings["prompt_ms"]
        for u in usages:
            out["prompt"] += u.input_tokens
            out["completion"] += u.output_tokens
            out["cached"] += u.input_tokens_details.cached_tokens
    else:
        c = claude(gateway)
        m = c.messages.create(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=HELLO)
        out["texts"].append("".join(b.text for b in m.content if b.type == "text"))
        usages = [m.usage]
        t0 = time.monotonic()
        with c.messages.stream(model=PUBLIC_MODEL, max_tokens=MAX_TOKENS, messages=HELLO) as s:
            for _ in stream_deltas(t0, s, lambda ev: ev.delta.text if ev.type == "content_block_delta"
                                   and ev.delta.type == "text_delta" else None):
                pass
            usages.append(s.get_final_message().usage)
        for u in usages:
            # Messages usage: input_tokens are the fresh ones, cached ones apart
            out["prompt"] += u.input_tokens + (u.cache_read_input_tokens or 0)
            out["completion"] += u.output_tokens
            out["cached"] += u.cache_read_input_tokens or 0
    return out


def counters(gateway, llama, route):
    g, l = gateway.metrics(), llama.metrics()
    who = {"model": PUBLIC_MODEL, "key": "alice"}
    return {
        "g_prompt": metric(g, "llm_edge_tokens_total", kind="prompt", **who),
        "g_completion": metric(g, "llm_edge_tokens_total", kind="completion", **who),
        "g_cached": metric(g, "llm_edge_tokens_total", kind="cached", **who),
        "route_prompt": metric(g, "llm_edge_route_tokens_total", route=route, kind="prompt"),
        "route_completion": metric(g, "llm_edge_route_tokens_total", route=route, kind="completion"),
        "route_cached": metric(g, "llm_edge_route_tokens_total", route=route, kind="cached"),
        "g_ttft_count": metric(g, "llm_edge_time_to_first_token_seconds_count", model=PUBLIC_MODEL),
        "g_ttft_sum": metric(g, "llm_edge_time_to_first_token_seconds_sum", model=PUBLIC_MODEL),
        "g_inter_token_count": metric(g, "llm_edge_inter_token_seconds_count", model=PUBLIC_MODEL),
        "g_requests_200": metric(g, "llm_edge_requests_total", route=route, code="200", **who),
        "g_duration_count": metric(g, "llm_edge_request_duration_seconds_count", route=route, model=PUBLIC_MODEL),
        "l_prompt": metric(l, "llamacpp:prompt_tokens_total"),
        "l_cached": metric(l, "llamacpp:prompt_tokens_cached_total"),
        "l_predicted": metric(l, "llamacpp:tokens_predicted_total"),
    }


@pytest.fixture(scope="module")
def three_dialects(gateway, llama):
    """{route: (what the client saw, counter deltas)} for one run of each dialect in turn."""
    results = {}
    for route in DIALECTS:
        before = counters(gateway, llama, route)
        try:
            seen = run_dialect(gateway, route)
        except Exception as e:  # reported by the tests of this dialect; the others still run
            results[route] = e
            continue
        # the gateway counts on a side channel: give it a moment, bounded
        deadline = time.monotonic() + 5
        while True:
            after = counters(gateway, llama, route)
            delta = {k: after[k] - before[k] for k in after}
            settled = (delta["g_requests_200"] == 2 and delta["g_completion"] == seen["completion"]
                       and delta["g_ttft_count"] == 1)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(f"\n{route}: client saw {seen}\n{route}: counter deltas {delta}")
        results[route] = (seen, delta)
    return results


@pytest.mark.parametrize("route", DIALECTS)
def test_dialect_counters_agree_with_llama_server(three_dialects, reply, route):
    sentence, n_tokens = reply
    seen, delta = dialect_result(three_dialects, route)
    assert seen["texts"] == [sentence, sentence], seen
    # the requests were counted under their own route
    assert delta["g_requests_200"] == 2, delta
    assert delta["g_duration_count"] == 2, delta
    # generated tokens: what llama-server generated, what the client was told, what the gateway counted
    assert delta["l_predicted"] == seen["completion"] == 2 * (n_tokens + 1), (seen, delta)
    assert delta["g_completion"] == delta["l_predicted"], delta
    # prompt tokens, cached ones included (llama-server counts them apart)
    assert seen["prompt"] == delta["l_prompt"] + delta["l_cached"], (seen, delta)
    assert delta["g_prompt"] == seen["prompt"], delta
    assert delta["g_cached"] == delta["l_cached"] == seen["cached"], (seen, delta)
    # the per-route series count the same tokens
    assert (delta["route_prompt"], delta["route_completion"], delta["route_cached"]) == (
        delta["g_prompt"], delta["g_completion"], delta["g_cached"]), delta
    # one stream, one first token; seen by the gateway after llama-server's own
    # prompt processing and before the client saw it
    assert delta["g_ttft_count"] == 1, delta
    assert 0 < delta["g_ttft_sum"] <= seen["client_ttft"], (seen, delta)
    if seen["prompt_ms"] is not None:
        assert seen["prompt_ms"] / 1000 <= delta["g_ttft_sum"], (seen, delta)


def dialect_result(three_dialects, route):
    result = three_dialects[route]
    if isinstance(result, Exception):
        pytest.fail(f"the {route} requests failed: {type(result).__name__}: {result}")
    return result


def test_three_dialects_same_text_and_same_accounting(three_dialects, reply):
    for route in DIALECTS:
        dialect_result(three_dialects, route)
    texts = {route: seen["texts"] for route, (seen, _) in three_dialects.items()}
    assert texts == {route: [reply[0]] * 2 for route in DIALECTS}, texts
    for kind in ("prompt", "completion"):
        per_route = {route: delta[f"g_{kind}"] for route, (_, delta) in three_dialects.items()}
        assert len(set(per_route.values())) == 1, (kind, per_route)
        client = {route: seen[kind] for route, (seen, _) in three_dialects.items()}
        assert len(set(client.values())) == 1, (kind, client)
    ttft = {route: delta["g_ttft_count"] for route, (_, delta) in three_dialects.items()}
    assert set(ttft.values()) == {1}, ttft
    gaps = {route: delta["g_inter_token_count"] for route, (_, delta) in three_dialects.items()}
    assert len(set(gaps.values())) == 1 and gaps["chat_completions"] > 0, gaps
