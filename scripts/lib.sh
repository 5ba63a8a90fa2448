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
            "$pde" plugin sign "plugins/$name.wasm" --key keys/security-team.ed25519 >/dev/null
        done
        git init -q
        git add -A
        git -c user.name="HMS Policy Office" -c user.email=policy@hms.example.gov \
            commit -qm "HMS policies 42, 43, 44"
    )
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
