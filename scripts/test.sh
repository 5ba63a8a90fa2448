#!/usr/bin/env bash
# The README's test command: formatting, every unit, integration and plugin
# test, then clippy with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_wasm_target
cargo fmt --all --check
# CI builds once from cold: the incremental cache would only add gigabytes.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
# One Python venv from PyPI (scripts/requirements-test.txt): an independent
# RFC 8785 and ed25519 implementation for tests/all/jcs.rs, maturin and pytest
# for the policy_deploy package, componentize-py for tests/all/python_plugin.rs.
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
pyenv=$(ensure_pyenv "$target_dir")
export PDE_TEST_PYTHON="$pyenv/bin/python"
# A throw-away PostgreSQL 15 cluster on loopback for the team-state tests
# (tests/all/team.rs), as an unprivileged user, stopped however this script ends.
# Those tests fail, not skip, without it when CI is set.
pg_dir="${TMPDIR:-/tmp}/pde-test-pg.$$"
trap 'scripts/pg-cluster.sh stop "$pg_dir"' EXIT
read -r PDE_TEST_PG_URL PDE_TEST_PG_PASSWORD < <(scripts/pg-cluster.sh start "$pg_dir")
export PDE_TEST_PG_URL PDE_TEST_PG_PASSWORD
# A real OCI registry binary for tests/all/oci.rs (each test runs its own on
# a free loopback port with storage in a temp dir, killed when it ends).
PDE_TEST_REGISTRY_BIN=$(ensure_docker_registry)
export PDE_TEST_REGISTRY_BIN
# A real Prometheus for the rollout tests; each test runs its own server
# from this binary (see ensure_prometheus in scripts/lib.sh).
PDE_TEST_PROMETHEUS=$(ensure_prometheus)
export PDE_TEST_PROMETHEUS
# Debian's Chromium and chromedriver for the web console's browser tests
# (tests/all/console.rs), which start their own chromedriver on loopback.
ensure_chromium
# --no-fail-fast: one CI run names every failing suite, not just the first.
cargo test --workspace --locked --no-fail-fast "$@"
# Every bench once, in criterion's test mode (debug profile, same target
# dir): a bench whose inputs a change broke fails here, not in BENCHMARKS.md.
cargo test --workspace --locked --no-fail-fast --benches
# The Python binding: the wheel built with maturin from the same target dir,
# tested with pytest against real `pde agent` processes.
build_python_binding "$target_dir" "$pyenv"
cargo build --locked -q -p pde-cli
PDE_BIN="$target_dir/debug/pde" "$pyenv/bin/pytest" -q host/python/tests
# The binaries install from the checkout as users install them (`cargo
# install --path`), without the wasm target or the example plugins; debug
# profile and this target dir, so nothing is compiled twice.
install_root=$(mktemp -d "${TMPDIR:-/tmp}/pde-install.XXXXXX")
for crate in host/cli host/agent; do
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target} \
        cargo install --locked --debug --quiet --path "$crate" --root "$install_root"
done
"$install_root/bin/pde" --version
"$install_root/bin/pde-agent" --version
rm -rf "$install_root"
cargo clippy --workspace --all-targets --locked -- -D warnings
