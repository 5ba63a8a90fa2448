/// Variables the outer cargo sets for the build that is running, which must
/// not leak into a nested `cargo build` for another target (wasm32-wasip2):
/// rustflags meant for the host, the outer target dir, the outer jobserver.
/// Shared by this crate's build script (`include!`) and by tests that run
/// cargo themselves.
pub const OUTER_CARGO_VARS: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS_WRAPPER",
];
