#!/usr/bin/env bash
# The README's test command: every unit, integration and plugin test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_wasm_target
cargo fmt --all --check
cargo test --workspace --locked "$@"
