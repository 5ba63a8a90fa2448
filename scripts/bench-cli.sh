#!/usr/bin/env bash
# Whole-process timings of warm CLI runs (BENCHMARKS.md, "Warm CLI runs").
#
#   scripts/bench-cli.sh [RUNS]      (default 15 counted runs after 3 warm-ups)
#
# Builds pde and the example plugins in release, makes the demo's example
# workspace (four plugins installed, pinned and signed), runs `pde package
# 42` once so the state directory and with it the compile cache exist, then
# times each command RUNS times and prints the median, minimum and maximum
# of wall and CPU (user + system) milliseconds.
# Set PDE_BENCH_CPU=N to pin every run to CPU N with taskset.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
ensure_wasm_target

runs=${1:-15}
# A captured backtrace on every internal error is not what users run.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
cargo build --locked -q --release -p pde-cli -p pde-plugin-artifacts
target_dir=${CARGO_TARGET_DIR:-$root/target}
pde="$target_dir/release/pde"
wasm_dir="$root/target/wasm-plugins/wasm32-wasip2/plugin"

work=$(mktemp -d "${TMPDIR:-/tmp}/pde-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
example_workspace "$pde" "$wasm_dir" "$work"
"$pde" -C "$work" package 42 >/dev/null
# Warm means written in an earlier session: a cache entry changed less than
# a second ago is rehashed on every use (it cannot be trusted by its stamp).
sleep 1.5

# One Python process runs every command: wall time from a monotonic clock,
# CPU from the child's own rusage (os.wait4), both at microsecond resolution.
python3 - "$runs" "${PDE_BENCH_CPU:-}" "$pde" "$work" <<'PY'
import os, statistics, subprocess, sys, time

runs, cpu, pde, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
pin = ["taskset", "-c", cpu] if cpu else []

def one(args):
    start = time.perf_counter()
    child = subprocess.Popen(pin + [pde, "-C", work] + args,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: pde {' '.join(args)} failed")
    return wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000

def show(values):
    return f"{statistics.median(values):.1f} [{min(values):.1f} {max(values):.1f}]"

print("| command | wall ms, median [min max] | CPU ms (user+sys), median [min max] |")
print("|---|---|---|")
for args in (["validate", "42", "--env", "production"], ["validate", "42"],
             ["plugin", "list"], ["--version"]):
    for _ in range(3):
        one(args)
    samples = [one(args) for _ in range(runs)]
    print(f"| `pde {' '.join(args)}` | {show([w for w, _ in samples])} | {show([c for _, c in samples])} |")
PY
