#!/usr/bin/env bash
# Deterministic cost figures: instructions per non-streamed request, per relayed
# SSE chunk and per 401, for llm-edge and nginx (Debian's nginx, when installed),
# counted by callgrind (benches/cost.rs). Three runs, so their spread shows.
# Usage: scripts/cost.sh   (COST_REQUESTS, COST_STREAMS, COST_CHUNKS, NGINX_BIN)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)"; exit 1; }
cargo bench --bench cost --no-run -q
for run in 1 2 3; do
  echo "== run $run"
  cargo bench --bench cost -q 2>/dev/null | sed -n '/^| callgrind/,/^(/p'
done
