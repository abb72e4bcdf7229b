#!/usr/bin/env bash
# One command to see llm-edge work: builds (or reuses) a real llama.cpp
# llama-server and a tiny model that always answers "The quick brown fox jumps
# over the lazy dog.", starts llama-server on loopback and llm-edge in front of
# it with a fresh API key, prints commands to try, and stops both on Ctrl-C.
#
#   scripts/demo.sh            # llm-edge on 127.0.0.1:8000 (or a free port if taken)
#   PORT=9000 scripts/demo.sh
#   LLM_EDGE_BIN=target/debug/llm-edge scripts/demo.sh   # skip the release build
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

# 1. Python venv for the model generator (the project's .venv, as the tests use)
if ! .venv/bin/python -c 'import gguf' 2>/dev/null; then
  say "setting up .venv from tests/python/requirements.txt"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q -r tests/python/requirements.txt
fi
# 2. llama-server (first time: a 5-12 minute build, cached afterwards) and the model
llama_bin=$(scripts/build-llama-server.sh)
model=$(.venv/bin/python scripts/make-tiny-model.py)
# 3. llm-edge
edge=${LLM_EDGE_BIN:-}
if [ -z "$edge" ]; then
  say "building llm-edge (cargo build --release)"
  cargo build --release --bin llm-edge
  edge="${CARGO_TARGET_DIR:-target}/release/llm-edge"
fi
edge=$(realpath "$edge")

port=${PORT:-8000}
listening "$port" && { say "port $port is taken, using a free one"; port=$(free_port); }
llama_port=$(free_port)
metrics_port=$(free_port)
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

# -a: llama-server answers as the public name; --sse-ping-interval 1: it stops quickly
"$llama_bin" -m "$model" -a tiny --host 127.0.0.1 --port "$llama_port" -t 1 -np 2 -c 8192 \
  --metrics --sse-ping-interval 1 >"$dir/llama-server.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$llama_port/health" 60 "$!" || { cat "$dir/llama-server.log" >&2; say "llama-server did not start"; exit 1; }

# llm-edge logs (one access-log line per request) go to this terminal
"$edge" --config "$dir/llm-edge.yaml" &
pids+=($!)
wait_for "$port" 30 "$!" || { say "llm-edge did not start"; exit 1; }

base="http://127.0.0.1:$port"
cat <<EOF

llm-edge on $base -> llama-server on 127.0.0.1:$llama_port (model: tiny; llama-server log: $dir/llama-server.log)
API key: $key

Stream a chat completion:
  curl -sN $base/v1/chat/completions -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
    -d '{"model":"tiny","messages":[{"role":"user","content":"Hello"}],"stream":true}'
Run the client-side diagnostics:
  $edge check --base-url $base --api-key $key
Metrics:
  curl -s http://127.0.0.1:$metrics_port/metrics | grep llm_edge_tokens_total

Ctrl-C stops both.
EOF
wait -n "${pids[@]}" || true
say "a process exited"
