#!/usr/bin/env bash
# Makes docs/dashboard.png, the README's dashboard screenshot, from real data:
# starts a real llama-server (the tiny test model), llm-edge in front of it
# (keys alice, bob with tokens_per_day and carol with requests_per_minute) and
# Prometheus scraping llm-edge every 2 s, all on free loopback ports under a
# temporary directory; drives about 3.5 minutes of traffic (streamed and
# non-streamed chat, completions, messages and responses, wrong keys, 429s,
# clients that leave mid-stream or while queued, llama-server killed for 20 s
# and restarted); then renders conf/grafana/llm-edge.json's queries with
# scripts/render-dashboard.py and stops everything it started. About 4 minutes.
#
#   RENDER_PYTHON=/tmp/render-venv/bin/python scripts/dashboard-demo.sh
#   ... scripts/dashboard-demo.sh --duration 60 --out /tmp/d.png   # options go to the demo mode
#
# Needs: prometheus (Debian: apt-get install prometheus); a Python with
# matplotlib (RENDER_PYTHON, else .venv/bin/python or python3 if they have it;
# python3 -m venv /tmp/render-venv && /tmp/render-venv/bin/pip install matplotlib);
# llm-edge (LLM_EDGE_BIN, else target/release/llm-edge); llama-server
# (LLAMA_SERVER_BIN, else the cached build of scripts/build-llama-server.sh) and
# the tiny model (TINY_MODEL, else scripts/make-tiny-model.py's cached file).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "dashboard-demo: $*" >&2; }

py=${RENDER_PYTHON:-}
if [ -z "$py" ]; then
  for c in .venv/bin/python python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import matplotlib' 2>/dev/null; then py=$c; break; fi
  done
fi
if [ -z "$py" ] || ! "$py" -c 'import matplotlib' 2>/dev/null; then
  say "needs a Python with matplotlib:"
  say "  python3 -m venv /tmp/render-venv && /tmp/render-venv/bin/pip install matplotlib"
  say "  RENDER_PYTHON=/tmp/render-venv/bin/python $0"
  exit 1
fi
command -v prometheus >/dev/null || { say "prometheus is not installed (Debian: apt-get install prometheus)"; exit 1; }

cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/llama.cpp-b11434"
llama=${LLAMA_SERVER_BIN:-}
[ -n "$llama" ] || { [ -x "$cache/llama-server" ] && llama="$cache/llama-server"; } || llama=$(scripts/build-llama-server.sh)
model=${TINY_MODEL:-}
if [ -z "$model" ]; then
  model=$(ls "$cache"/tiny-chatml-*.gguf 2>/dev/null | head -n 1 || true)
  [ -n "$model" ] || model=$(.venv/bin/python scripts/make-tiny-model.py)
fi
edge=${LLM_EDGE_BIN:-target/release/llm-edge}
[ -x "$edge" ] || { say "no llm-edge binary at $edge: cargo build --release, or set LLM_EDGE_BIN"; exit 1; }

exec "$py" scripts/render-dashboard.py demo --llm-edge "$edge" --llama-server "$llama" --model "$model" "$@"
