#!/usr/bin/env python3
"""Chat with an llm-edge gateway using the official OpenAI Python client.

    pip install openai
    export LLM_BASE_URL=http://HOST:8000/v1   # "/v1" is added when missing
    export LLM_API_KEY=sk-...                 # the key you were given for the gateway
    export LLM_MODEL=qwen3                    # optional: default is the first listed model

    python example_client.py                  # one chat, then one streamed chat
    python example_client.py --interactive    # a conversation; /quit or Ctrl-D to leave
"""

import argparse
import os
import sys

import openai


def base_url():
    url = (os.environ.get("LLM_BASE_URL") or "http://localhost:8000/v1").rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def stream_reply(client, model, messages):
    """Prints the reply token by token as it arrives; returns the whole text."""
    stream = client.chat.completions.create(model=model, messages=messages, stream=True)
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(parts[-1], end="", flush=True)
    print()
    return "".join(parts)


def demo(client, model):
    print(f"== chat ({model})")
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
    )
    print(resp.choices[0].message.content)

    print(f"== stream ({model})")
    stream_reply(client, model, [{"role": "user", "content": "Count from 1 to 10."}])


def interactive(client, model):
    print(f"Chatting with {model}. Type /quit or press Ctrl-D to leave.")
    history = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line == "/quit":
            return
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = stream_reply(client, model, history)
        history.append({"role": "assistant", "content": reply})


def reason(error):
    """The gateway's own message from an OpenAI error body."""
    body = error.body if isinstance(error.body, dict) else {}
    return body.get("message") or error.message


def available_models(client):
    try:
        return ", ".join(m.id for m in client.models.list()) or "(none)"
    except openai.APIError:
        return "(could not list them: is LLM_BASE_URL the gateway's /v1 URL?)"


def main():
    parser = argparse.ArgumentParser(description="Chat with an llm-edge gateway.")
    parser.add_argument("--interactive", action="store_true", help="hold a conversation on stdin")
    args = parser.parse_args()

    api_key = os.environ.get("LLM_API_KEY")
    if not api_key:
        sys.exit("error: set LLM_API_KEY to the API key you were given for the gateway")
    url = base_url()
    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=1, timeout=120)

    try:
        model = os.environ.get("LLM_MODEL")
        if not model:
            models = client.models.list().data
            if not models:
                sys.exit(f"error: {url} lists no models; set LLM_MODEL")
            model = models[0].id
        if args.interactive:
            interactive(client, model)
        else:
            demo(client, model)
    except openai.AuthenticationError as e:
        sys.exit(f"error: the gateway rejected LLM_API_KEY: {reason(e)}\n"
                 "hint: check LLM_API_KEY, or ask the gateway's operator for a key")
    except openai.APIConnectionError:
        sys.exit(f"error: cannot reach {url}\n"
                 "hint: is the gateway running, and is LLM_BASE_URL right?")
    except openai.NotFoundError as e:
        sys.exit(f"error: {reason(e)}\n"
                 f"hint: set LLM_MODEL to one of the models available: {available_models(client)}")
    except openai.APIStatusError as e:
        sys.exit(f"error: the gateway answered {e.status_code}: {reason(e)}")
    except openai.APIError as e:  # e.g. an error event in the middle of a stream
        sys.exit(f"error: {e.message}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
