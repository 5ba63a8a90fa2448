#!/usr/bin/env bash
# The README's test command: formatting, every unit, integration and plugin
# test, then clippy with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_wasm_target
cargo fmt --all --check
# An independent RFC 8785 + ed25519 implementation for tests/jcs.rs.
PDE_TEST_PYTHON=$(bash scripts/pyenv.sh)
export PDE_TEST_PYTHON
cargo test --workspace --locked "$@"
cargo clippy --workspace --all-targets --locked -- -D warnings
