"""The official `openai` Python client, unmodified, against llm-edge."""

import time

import openai
import pytest
from conftest import KEY, KEY_LIMITED

REPLY = "".join(f"tok{i} " for i in range(8))


def client(gateway, key=KEY):
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=30)


def test_lists_public_models_and_aliases(gateway):
    ids = [m.id for m in client(gateway).models.list()]
    assert ids == ["qwen3", "small", "qwen"]
    assert client(gateway).models.retrieve("qwen").id == "qwen"


def test_chat_completion(gateway):
    resp = client(gateway).chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hello"}]
    )
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 0


def test_streaming_arrives_token_by_token(gateway):
    start = time.monotonic()
    stream = client(gateway).chat.completions.create(
        model="qwen3",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        extra_headers={"x-mock-delay-ms": "100", "x-mock-tokens": "10"},
    )
    arrivals, text = [], ""
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == "".join(f"tok{i} " for i in range(10))
    first, last = arrivals[0], arrivals[-1]
    # tokens are 100 ms apart: the first must not wait for the last
    assert last - first > 0.6, arrivals
    assert first * 3 < last, arrivals


def test_include_usage_reaches_the_client(gateway):
    stream = client(gateway).chat.completions.create(
        model="qwen",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].choices == []


def test_wrong_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(gateway, key="sk-wrong").chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "hi"}]
        )
    assert exc.value.status_code == 401
    assert "invalid API key" in exc.value.message
    with pytest.raises(openai.AuthenticationError):
        client(gateway, key="sk-wrong").models.list()


def test_unknown_model_and_forbidden_model(gateway):
    with pytest.raises(openai.NotFoundError) as exc:
        client(gateway).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, key=KEY_LIMITED).chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": "hi"}]
        )


def test_completions_and_embeddings(gateway):
    c = client(gateway)
    comp = c.completions.create(model="small", prompt="Once", max_tokens=3)
    assert comp.choices[0].text == "tok0 tok1 tok2 "
    emb = c.embeddings.create(model="qwen", input="hello")
    assert len(emb.data[0].embedding) == 3
