"""The TLS listener (rustls, HTTP/2 over ALPN) with the official openai client
trusting a throwaway CA made for this test."""

import ssl
import subprocess

import openai
import pytest
from conftest import KEY, free_port, run_gateway
from real_llama import RecordingRelay

# Current openai releases are built on httpx2 (older ones on httpx): use what it uses.
try:
    import httpx2 as httpx

    OpenAIHttpClient = openai.DefaultHttpx2Client
except ImportError:  # pragma: no cover - older openai
    import httpx

    OpenAIHttpClient = openai.DefaultHttpxClient

REPLY = "".join(f"tok{i} " for i in range(8))


def make_ca_and_cert(d):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=llm-edge test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def tls_gateway(mock_llama, tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path)
    port = free_port()
    extra = f"tls:\n  listen: 127.0.0.1:{port}\n  cert: {cert}\n  key: {key}\n"
    with run_gateway(mock_llama, tmp_path, extra_yaml=extra) as plain:
        yield f"https://127.0.0.1:{port}", plain, ca


def test_openai_client_over_tls_and_http2(tls_gateway):
    url, _, ca = tls_gateway
    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key=KEY,
        http_client=OpenAIHttpClient(verify=ssl.create_default_context(cafile=str(ca)), http2=True),
        max_retries=0,
    )
    resp = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == REPLY
    stream = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == REPLY
    assert [m.id for m in client.models.list()] == ["qwen3", "small", "qwen"]
    # ALPN chose HTTP/2
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), http2=True) as h2:
        assert h2.get(url + "/health").http_version == "HTTP/2"
    # HTTP/1.1 clients are served on the same port
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), http2=False) as h1:
        assert h1.get(url + "/health").http_version == "HTTP/1.1"


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_gateway):
    url, _, _ = tls_gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_plain_http_stays_available(tls_gateway):
    _, plain, _ = tls_gateway
    client = openai.OpenAI(base_url=plain + "/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id == "qwen3"


@pytest.fixture
def tls_gateway_with_relay(mock_llama, tmp_path):
    """The TLS gateway with a RecordingRelay in front of the mock: the relay shows
    every byte the upstream received."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    relay = RecordingRelay(mock_llama)
    port = free_port()
    extra = f"tls:\n  listen: 127.0.0.1:{port}\n  cert: {cert}\n  key: {key}\n"
    try:
        with run_gateway(relay.url, tmp_path, extra_yaml=extra):
            yield f"https://127.0.0.1:{port}", relay, ca
    finally:
        relay.close()


@pytest.mark.parametrize("path", ["/v1/chat/c%6fmpletions", "/v1/chat/c%6Fmpletions", "/v1/%63hat/completions",
                                  "/v1/chat%2Fcompletions", "/v1/chat/completions%2F"])
def test_escaped_path_over_http2_is_400_and_never_forwarded(tls_gateway_with_relay, path):
    url, relay, ca = tls_gateway_with_relay
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), http2=True, timeout=10) as h2:
        req = h2.build_request("POST", url + path, json=body, headers=auth)
        # httpx sends the escape as written: it is the :path of the HTTP/2 request
        assert req.url.raw_path == path.encode()
        resp = h2.send(req)
        assert resp.http_version == "HTTP/2"
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        # (%2F is refused by the earlier encoded-slash check, the others by the route table)
        assert err["type"] == "invalid_request_error" and err["message"], err
        # the same request under the canonical spelling, same connection, is served
        ok = h2.post(url + "/v1/chat/completions", json=body, headers=auth)
        assert ok.http_version == "HTTP/2" and ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == REPLY
    # the upstream saw only the canonical request (and the gateway's health checks)
    seen = [(m, t) for m, t, _, _ in relay.requests() if not t.startswith("/health")]
    assert seen == [("POST", "/v1/chat/completions")], seen
    assert b"%" not in relay.raw()
