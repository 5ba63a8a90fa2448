#!/usr/bin/env bash
# The README's main command: the whole pipeline on the example workspace,
# pushing to real `pde agent` processes on loopback. Needs no external server.
#
# It builds pde and the example plugins, copies examples/workspace to a temp
# Git repository, installs and signs the plugins as a security team would,
# starts one agent per service, and deploys policies 42 and 43 to dev, staging
# and production (production only takes what staging already runs; it rolls
# out in two waves, canary first, behind an `http` gate). Each
# service holds both policies side by side (push protocol v2); the script ends
# with the policy x service matrix of every environment and each agent's own
# list of active policies.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
ensure_wasm_target

echo "==> building pde and the example plugins"
cargo build --locked -q -p pde-cli -p pde-plugin-artifacts
target_dir=${CARGO_TARGET_DIR:-$root/target}
pde="$target_dir/debug/pde"
wasm_dir="$root/target/wasm-plugins/wasm32-wasip2/plugin"

work=$(mktemp -d "${TMPDIR:-/tmp}/pde-demo.XXXXXX")
echo "==> example workspace: $work (plugins installed and signed)"
example_workspace "$pde" "$wasm_dir" "$work"
cd "$work"
"$pde" plugin list

echo "==> starting one agent per service"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for port in 18701 18711 18712 18713 18721 18722 18723; do
    "$pde" agent --listen "127.0.0.1:$port" --data-dir "agents/$port" \
        --trusted-key keys/release.ed25519.pub >"agents-$port.log" 2>&1 &
    pids+=($!)
done
for env in dev staging production; do
    for _ in $(seq 1 100); do
        "$pde" env check "$env" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

export PDE_ACTOR="release-engineer@hms.example.gov"
for env in dev staging; do
    for policy in 42 43; do
        echo
        echo "==> pde deploy $policy --env $env"
        "$pde" deploy "$policy" --env "$env"
    done
done

# Production rolls out progressively: HMS-API first, baked and judged by an
# `http` gate on what each agent of the wave serves (GET /active/<id> must
# show the digest just pushed), then the rest. No server beyond the agents.
cat >> pde.toml <<'TOML'

[environments.production.rollout]
poll_ms = 200

[[environments.production.rollout.gates]]
kind = "http"
name = "serves-the-new-digest"
url = "${service_url}/active/${policy_id}"
json_field = "/digest"
equals = "${digest}"

[[environments.production.rollout.waves]]
name = "canary"
services = ["HMS-API"]
bake = "1s"

[[environments.production.rollout.waves]]
name = "rest"
TOML
git -c user.name="HMS Policy Office" -c user.email=policy@hms.example.gov \
    commit -qam "production: roll out in two waves"
echo
echo "==> pde plan 42 --env production (the waves; each gate is evaluated once, now, before anything is pushed)"
"$pde" plan 42 --env production
for policy in 42 43; do
    echo
    echo "==> pde deploy $policy --env production (two waves)"
    "$pde" deploy "$policy" --env production
done
echo
echo "==> pde rollout status 42 --env production"
"$pde" rollout status 42 --env production

echo
echo "==> pde status (what each service runs, per policy)"
"$pde" status
echo
if command -v curl >/dev/null 2>&1; then
    echo "==> what the production agents report themselves (GET /active)"
    for port in 18721 18722 18723; do
        # Each agent lists every policy it has active: 43 never displaced 42.
        echo "127.0.0.1:$port $(curl -s "http://127.0.0.1:$port/active")"
    done
fi
echo
echo "==> pde audit verify"
"$pde" audit verify
echo
echo "==> pde report --html report.html (overview, histories, rollouts, the audit chain: one offline file)"
"$pde" report --html report.html
echo
echo "workspace kept at $work (tags: git -C $work tag -l)"
echo "web console: $pde -C $work serve   (then open http://127.0.0.1:8470/; report: $work/report.html)"
