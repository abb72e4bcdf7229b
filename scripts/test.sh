#!/usr/bin/env bash
# Runs every test of llm-edge: Rust unit and integration tests, then the
# official-client tests in tests/python. Installs missing test dependencies first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo test"
cargo build --bins --examples
# --include-ignored: also the tests `cargo test` alone skips (root, sshd, systemd,
# promtool, minutes-long soak).
cargo test --all-targets -- --include-ignored

echo "== fuzzing the parsers briefly on their seed corpus (scripts/fuzz.sh SECONDS for longer)"
scripts/fuzz.sh 10

echo "== official OpenAI client tests"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export LLM_EDGE_BIN="$target_dir/debug/llm-edge"
export MOCK_LLAMA_BIN="$target_dir/debug/examples/mock-llama-server"
.venv/bin/python -m pytest tests/python -q -p no:cacheprovider
