"""The client examples in examples/ run as users would run them, against llm-edge."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KEY, free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON_EXAMPLE = ROOT / "examples" / "python" / "example_client.py"
NODE_EXAMPLE = ROOT / "examples" / "node" / "client.mjs"
REPLY = "".join(f"tok{i} " for i in range(8))


def run(cmd, base_url, key=KEY, model=None, stdin=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(LLM_BASE_URL=base_url, LLM_API_KEY=key)
    if model:
        env["LLM_MODEL"] = model
    return subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=60)


def python_example(*args):
    return [sys.executable, str(PYTHON_EXAMPLE), *args]


@pytest.fixture(scope="module")
def node_example():
    if not shutil.which("node"):
        pytest.fail("node is missing: CI has it; install Node.js 20+")
    if not (NODE_EXAMPLE.parent / "node_modules" / "openai").is_dir():
        pytest.fail("examples/node/node_modules is missing: run scripts/install-test-deps.sh")
    return ["node", str(NODE_EXAMPLE)]


def assert_chat_and_stream(result, model="qwen3"):
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"== chat ({model})\n{REPLY}\n" in out, out
    assert f"== stream ({model})\n{REPLY}\n" in out, out


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_python_chat_and_stream(gateway, suffix):
    # LLM_MODEL unset: the first model the gateway lists
    assert_chat_and_stream(run(python_example(), gateway + suffix))


def test_python_interactive_keeps_talking_until_eof(gateway):
    result = run(python_example("--interactive"), gateway + "/v1", model="qwen", stdin="hello\nand now?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(REPLY) == 2, result.stdout
    assert "Chatting with qwen" in result.stdout


def test_python_interactive_quit(gateway):
    result = run(python_example("--interactive"), gateway, model="small", stdin="hello\n/quit\nnot sent\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(REPLY) == 1, result.stdout


def test_python_wrong_key(gateway):
    result = run(python_example(), gateway + "/v1", key="sk-wrong")
    assert result.returncode != 0
    assert "rejected LLM_API_KEY" in result.stderr and "invalid API key" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert REPLY not in result.stdout


def test_python_unknown_model_lists_models(gateway):
    result = run(python_example(), gateway + "/v1", model="gpt-9")
    assert result.returncode != 0
    assert "gpt-9" in result.stderr and "qwen3, small, qwen" in result.stderr, result.stderr


def test_python_gateway_not_running():
    result = run(python_example(), f"http://127.0.0.1:{free_port()}/v1")
    assert result.returncode != 0
    assert "cannot reach" in result.stderr and "gateway running" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_python_missing_key(gateway):
    result = run(python_example(), gateway, key="")
    assert result.returncode != 0
    assert "set LLM_API_KEY" in result.stderr


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_node_chat_and_stream(gateway, node_example, suffix):
    assert_chat_and_stream(run(node_example, gateway + suffix))


def test_node_wrong_key(gateway, node_example):
    result = run(node_example, gateway + "/v1", key="sk-wrong")
    assert result.returncode != 0
    assert "rejected LLM_API_KEY" in result.stderr and "invalid API key" in result.stderr, result.stderr
    assert REPLY not in result.stdout


def test_node_unknown_model_lists_models(gateway, node_example):
    result = run(node_example, gateway + "/v1", model="gpt-9")
    assert result.returncode != 0
    assert "gpt-9" in result.stderr and "qwen3, small, qwen" in result.stderr, result.stderr


def test_node_gateway_not_running(node_example):
    result = run(node_example, f"http://127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "cannot reach" in result.stderr and "gateway running" in result.stderr, result.stderr
