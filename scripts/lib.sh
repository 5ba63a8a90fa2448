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
