#!/usr/bin/env bash
# One command to see llm-edge work: builds (or reuses) a real llama.cpp
# llama-server and a tiny model that always answers "The quick brown fox jumps
# over the lazy dog.", starts llama-server on loopback and llm-edge in front of
# it with a fresh API key, serves the browser example page (its origin allowed
# in the gateway's CORS config), prints commands to try, and stops all on Ctrl-C.
# When llama-server stops (kill the pid it prints), llm-edge keeps running, so
# you see what clients get when the GPU machine or the tunnel is down (a 502
# with a hint).
#
#   scripts/demo.sh            # llm-edge on 127.0.0.1:8000 (or a free port if taken)
#   PORT=9000 scripts/demo.sh
#   LLM_EDGE_BIN=target/debug/llm-edge scripts/demo.sh   # skip the release build
#   LLAMA_SERVER_BIN=/usr/local/bin/llama-server scripts/demo.sh
#                              # a llama-server you have: no 5-12 minute build
#   TINY_MODEL=/path/model.gguf scripts/demo.sh   # serve that model instead
#   LLAMA_BUILD_VERBOSE=1 scripts/demo.sh         # show the compiler's output
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "demo: $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # URL_OR_PORT SECONDS PID
  for _ in $(seq $(($2 * 10))); do
    kill -0 "$3" 2>/dev/null || return 1
    if [[ $1 == http* ]]; then
      python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null && return 0
    else
      listening "$1" && return 0
    fi
    sleep 0.1
  done
  return 1
}

# 1. llama-server: a given one, the cached build, or a build now (once)
cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/llama.cpp-b11434"
if [ -n "${LLAMA_SERVER_BIN:-}" ]; then
  [ -x "$LLAMA_SERVER_BIN" ] || { say "LLAMA_SERVER_BIN=$LLAMA_SERVER_BIN is not an executable"; exit 1; }
  llama_bin=$(realpath "$LLAMA_SERVER_BIN")
  say "[1/4] llama-server: using LLAMA_SERVER_BIN=$llama_bin (no build)"
elif [ -x "$cache/llama-server" ]; then
  llama_bin="$cache/llama-server"
  say "[1/4] llama-server: using the cached build $llama_bin"
else
  say "[1/4] llama-server: building llama.cpp b11434 from source once (CPU only; usually"
  say "      5-12 minutes on 2 cores; progress every 20 s; cached in $cache)."
  say "      LLAMA_BUILD_VERBOSE=1 shows the compiler's output; LLAMA_SERVER_BIN=/path/to/llama-server"
  say "      uses one you already have instead."
  llama_bin=$(scripts/build-llama-server.sh)
fi

# 2. the model: a given one, or the tiny one (needs the project's .venv for `gguf`)
if [ -n "${TINY_MODEL:-}" ]; then
  [ -f "$TINY_MODEL" ] || { say "TINY_MODEL=$TINY_MODEL does not exist"; exit 1; }
  model=$(realpath "$TINY_MODEL")
  say "[2/4] model: using TINY_MODEL=$model"
else
  if ! .venv/bin/python -c 'import gguf' 2>/dev/null; then
    say "[2/4] model: setting up .venv from tests/python/requirements.txt (pip; a minute or two)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q -r tests/python/requirements.txt
  fi
  # its tokenizer comes with the llama.cpp source (a download, no compiler)
  [ -s "$cache/ggml-vocab-llama-spm.gguf" ] || scripts/build-llama-server.sh --vocab-only >/dev/null
  model=$(.venv/bin/python scripts/make-tiny-model.py)
  say "[2/4] model: $model"
fi

# 3. llm-edge
edge=${LLM_EDGE_BIN:-}
if [ -z "$edge" ]; then
  say "[3/4] llm-edge: cargo build --release (a few minutes the first time)"
  cargo build --release --bin llm-edge
  edge="${CARGO_TARGET_DIR:-target}/release/llm-edge"
else
  say "[3/4] llm-edge: using LLM_EDGE_BIN=$edge"
fi
edge=$(realpath "$edge")

port=${PORT:-8000}
listening "$port" && { say "port $port is taken, using a free one"; port=$(free_port); }
llama_port=$(free_port)
metrics_port=$(free_port)
page_port=$(free_port)
key="sk-demo-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
dir=$(mktemp -d "${TMPDIR:-/tmp}/llm-edge-demo.XXXXXX")
cat >"$dir/llm-edge.yaml" <<EOF
listen: 127.0.0.1:$port
upstream:
  url: http://127.0.0.1:$llama_port
models:
  - name: tiny
keys:
  - id: demo
    sha256: $(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
metrics:
  listen: 127.0.0.1:$metrics_port
cors:
  # the browser example page this script serves
  allowed_origins: ['http://127.0.0.1:$page_port', 'http://localhost:$page_port']
server:
  pid_file: $dir/llm-edge.pid
  upgrade_sock: $dir/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
EOF

pids=()
cleanup() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 30); do
    alive=0
    for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
  rm -rf "$dir"
  say "stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "[4/4] starting llama-server, llm-edge and the browser page"
# -a: llama-server answers as the public name; --sse-ping-interval 1: it stops quickly
llama_cmd=("$llama_bin" -m "$model" -a tiny --host 127.0.0.1 --port "$llama_port" -t 1 -np 2 -c 8192
  --metrics --sse-ping-interval 1)
"${llama_cmd[@]}" >"$dir/llama-server.log" 2>&1 &
llama_pid=$!
pids+=("$llama_pid")
wait_for "http://127.0.0.1:$llama_port/health" 60 "$llama_pid" || { cat "$dir/llama-server.log" >&2; say "llama-server did not start"; exit 1; }

# llm-edge logs (one access-log line per request) go to this terminal
"$edge" --config "$dir/llm-edge.yaml" &
edge_pid=$!
pids+=("$edge_pid")
wait_for "$port" 30 "$edge_pid" || { say "llm-edge did not start"; exit 1; }

# The browser example from its own origin (the one allowed above), as a real page is.
python3 -m http.server --bind 127.0.0.1 --directory examples/browser "$page_port" >"$dir/page.log" 2>&1 &
pids+=($!)
wait_for "$page_port" 10 "$!" || say "the browser page could not be served (see $dir/page.log)"

base="http://127.0.0.1:$port"
cat <<EOF

llm-edge on $base -> llama-server on 127.0.0.1:$llama_port (model: tiny; llama-server log: $dir/llama-server.log)
API key: $key

Stream a chat completion:
  curl -sN $base/v1/chat/completions -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
    -d '{"model":"tiny","messages":[{"role":"user","content":"Hello"}],"stream":true}'
Run the client-side diagnostics:
  $edge check --base-url $base --api-key $key
Chat from the browser (the key is in the URL: fine for a demo only):
  http://127.0.0.1:$page_port/index.html?base=$base&key=$key&model=tiny
Metrics:
  curl -s http://127.0.0.1:$metrics_port/metrics | grep llm_edge_tokens_total
See what clients get when llama-server (or the SSH tunnel to it) is down; llm-edge keeps running:
  kill $llama_pid    # llama-server; then the curl above answers 502 with a hint

Ctrl-C stops everything.
EOF

# Runs until llm-edge exits or Ctrl-C; llama-server may stop meanwhile.
while kill -0 "$edge_pid" 2>/dev/null; do
  wait -n "$edge_pid" "$llama_pid" 2>/dev/null || true
  if kill -0 "$edge_pid" 2>/dev/null && ! kill -0 "$llama_pid" 2>/dev/null; then
    say "llama-server exited. llm-edge keeps running: a chat request now gets a 502 whose message"
    say "names the unreachable upstream and the SSH tunnel to check, and $base/health/upstream"
    say "answers 503 unreachable. Start llama-server again (another terminal) to see it recover:"
    say "  ${llama_cmd[*]}"
    wait "$edge_pid" || true
  fi
done
say "llm-edge exited"
