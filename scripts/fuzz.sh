#!/usr/bin/env bash
# Fuzzes llm-edge's pure parsers (request bodies, the SSE scanner, the config,
# routes and keys) with cargo-fuzz / libFuzzer: every target in fuzz/ runs for
# SECONDS (default 20) on its seed corpus, and the script fails on any crash.
#
#   scripts/fuzz.sh          # CI: 20 s per target
#   scripts/fuzz.sh 1800     # a long run: 30 min per target (do it after
#                            # changing body.rs, sse.rs, config.rs, routes.rs
#                            # or auth.rs, and before a release)
#   FUZZ_TARGETS="sse_scanner" scripts/fuzz.sh 600   # some targets only
#   FUZZ_JOBS=1 scripts/fuzz.sh                      # one target at a time
#                                       # (default: as many as there are CPUs)
#
# A crash leaves its input in fuzz/artifacts/<target>/; replay or shrink it:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/crash-...
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin -s none <target> fuzz/artifacts/<target>/crash-...
# then add it as a regression test to tests/props.rs (the checks are shared:
# fuzz/src/lib.rs).
#
# The build (release, debug assertions, no sanitizer: the code is safe Rust)
# and the growing working corpus live outside the work tree, in
# $FUZZ_WORK (default ~/.cache/llm-edge-fuzz), so later runs on the same
# machine rebuild only llm-edge and continue from the inputs found before.
# The committed seeds in fuzz/corpus/<target>/ are only read. A cold build
# takes 3-6 minutes on 2 cores; a warm one about a minute.
#
# cargo-fuzz needs nightly-only rustc flags; RUSTC_BOOTSTRAP=1 allows them on
# the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS per target]" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
work=${FUZZ_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-edge-fuzz}
flags=(--sanitizer none --codegen-units 16 --target-dir "$work/target")
bin_dir=$work/target/x86_64-unknown-linux-gnu/release

echo "== building the fuzz targets (in $work/target)"
start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "built in $(($(date +%s) - start)) s"

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
jobs=${FUZZ_JOBS:-$(nproc)}

# Runs one target; its output goes to $work/<target>.log, its exit code to
# $work/<target>.status.
run_target() {
    local target=$1 corpus=$work/corpus/$1 log=$work/$1.log status=0
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    # Keep the working corpus small enough to load quickly: once it passes
    # 3000 inputs, merge it down to the ones that add coverage.
    if [ "$(find "$corpus" -type f | wc -l)" -gt 3000 ]; then
        rm -rf "$corpus.merged" && mkdir "$corpus.merged"
        if "$bin_dir/$target" -merge=1 "$corpus.merged" "$corpus" >"$log" 2>&1; then
            rm -rf "$corpus" && mv "$corpus.merged" "$corpus"
        fi
    fi
    # New inputs go to the first corpus directory; the seeds are only read.
    "$bin_dir/$target" \
        -max_total_time="$seconds" \
        -timeout=25 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$target/" \
        "$corpus" "fuzz/corpus/$target" >"$log" 2>&1 || status=$?
    echo "$status" >"$work/$target.status"
}

echo "== fuzzing ${seconds} s per target, ${jobs} at a time: $(echo $targets)"
pids=()
for target in $targets; do
    rm -f "$work/$target.status"
    run_target "$target" &
    pids+=($!)
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
wait

failed=()
for target in $targets; do
    log=$work/$target.log
    status=$(cat "$work/$target.status" 2>/dev/null || echo "?")
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    files=$(find "$work/corpus/$target" "fuzz/corpus/$target" -type f | wc -l)
    if [ "$status" != 0 ]; then
        failed+=("$target")
        echo "FAILED $target (exit $status); the last lines of $log:"
        grep -v '^#[0-9]' "$log" | tail -40
    else
        echo "ok $target: ${runs:-?} runs, ${rate:-?} exec/s, corpus ${files} files"
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: every target ran ${seconds} s without a crash"
