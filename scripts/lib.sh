# Shared set-up for the README's commands. Sourced, not run.

# The plugins are WebAssembly components built for wasm32-wasip2; install the
# target when rustup is available, and otherwise say exactly what is missing.
ensure_wasm_target() {
    local libdir
    libdir=$(rustc --print target-libdir --target wasm32-wasip2 2>/dev/null || true)
    if [ -n "$libdir" ] && ls "$libdir"/libstd-*.rlib >/dev/null 2>&1; then
        return 0
    fi
    if command -v rustup >/dev/null 2>&1; then
        echo "==> installing the wasm32-wasip2 target (rustup target add wasm32-wasip2)" >&2
        rustup target add wasm32-wasip2
    else
        echo "error: the Rust target wasm32-wasip2 is missing and rustup is not available;" >&2
        echo "       install it with your toolchain manager, then run this again." >&2
        exit 2
    fi
}

# A Python virtual environment with the pinned test tools from PyPI
# (maturin builds the policy_deploy wheel, pytest runs its tests,
# componentize-py builds the Python plugins). Made once under the target
# dir, remade when scripts/requirements-test.txt changes; prints its path.
ensure_pyenv() {
    local target_dir=$1 env="$1/pyenv"
    if [ ! -x "$env/bin/pytest" ] || ! cmp -s scripts/requirements-test.txt "$env/requirements-test.txt"; then
        echo "==> creating the Python test environment in $env" >&2
        python3 -m venv "$env" >&2
        "$env/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt >&2
        cp scripts/requirements-test.txt "$env/requirements-test.txt"
    fi
    echo "$env"
}

# Builds the policy_deploy wheel (debug profile, the shared target dir) and
# installs it into the Python test environment.
build_python_binding() {
    local target_dir=$1 env=$2
    rm -rf "$target_dir/wheels"
    (cd host/python && CARGO_TARGET_DIR="$target_dir" "$env/bin/maturin" build --locked \
        --profile dev --quiet --out "$target_dir/wheels" >&2)
    "$env/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps \
        "$target_dir"/wheels/policy_deploy-*.whl >&2
}

# Makes the example workspace in DIR as the demo runs it: a copy of
# examples/workspace with release and security-team keys, the four example
# plugins (built in WASM_DIR) installed, pinned and signed, all committed.
example_workspace() {
    local pde=$1 wasm_dir=$2 work=$3 root name wasm sum
    root=$(pwd)
    cp -R examples/workspace/. "$work/"
    (
        cd "$work"
        "$pde" keygen --out keys --name release.ed25519 >/dev/null
        "$pde" keygen --out keys --name security-team.ed25519 >/dev/null
        printf '.pde/\nagents/\nkeys/*.ed25519\n' > .gitignore
        for name in eligibility-bounds pii-guard effective-date category-router; do
            wasm="$wasm_dir/${name//-/_}.wasm"
            cp "$wasm" "plugins/$name.wasm"
            sum=$(sha256sum "plugins/$name.wasm" | cut -d' ' -f1)
            { echo "sha256 = \"$sum\""; grep -v '^sha256' "$root/plugins/$name/$name.toml"; } > "plugins/$name.toml"
            "$pde" plugin sign "plugins/$name.wasm" --key keys/security-team.ed25519 --signer "HMS Security Team" >/dev/null
        done
        git init -q
        git add -A
        git -c user.name="HMS Policy Office" -c user.email=policy@hms.example.gov \
            commit -qm "HMS policies 42, 43, 44"
    )
}

# The OCI delivery tests (tests/all/oci.rs, issue 23) run a real registry:
# Debian's docker-registry (the CNCF distribution registry 2.8). Installs it
# when missing (as root, with apt-get) and prints the binary's path; each
# test starts its own on a free 127.0.0.1 port with storage in a temp dir,
# because the tests stop, restart and corrupt it. Without it they fail.
ensure_docker_registry() {
    local bin
    bin=$(command -v docker-registry || true)
    if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing docker-registry (apt-get install -y docker-registry)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-registry >&2; }
        # The package enables a system service on :5000; the tests start their own.
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now docker-registry >/dev/null 2>&1 || true; fi
        bin=$(command -v docker-registry || true)
    fi
    if [ -z "$bin" ]; then
        echo "error: docker-registry is missing; install it (apt-get install -y docker-registry)" >&2
        exit 2
    fi
    echo "$bin"
}

# A real Prometheus for the rollout tests (tests/all/rollout.rs): Debian's
# `prometheus` package, installed when missing. Each rollout test starts its
# own server from this binary on a free loopback port, with a generated
# config (1 s scrape interval, its own exporters as targets) and storage in
# a temp dir, and stops it when the test ends. Prints the binary's path.
ensure_prometheus() {
    local bin
    bin=$(command -v prometheus || true)
    if [ -z "$bin" ] && [ -x /usr/bin/prometheus ]; then bin=/usr/bin/prometheus; fi
    if [ -z "$bin" ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing prometheus (apt-get install -y prometheus)" >&2
            # No service of its own is wanted: the tests start their servers.
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >&2 ||
                { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >&2; }
            bin=/usr/bin/prometheus
        else
            echo "error: prometheus is missing and cannot be installed here (needs apt-get as root);" >&2
            echo "       install Debian's prometheus package, then run this again." >&2
            exit 2
        fi
    fi
    echo "$bin"
}

# Debian's Chromium and its WebDriver for the web console's browser tests
# (tests/all/console.rs), installed with apt-get when missing. Those tests
# fail, naming the packages, when they cannot be had.
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "==> installing chromium and chromium-driver (apt-get)" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
    else
        echo "warning: chromium and chromedriver are missing and cannot be installed here" >&2
        echo "         (apt-get as root); the console's browser tests will fail." >&2
    fi
}
