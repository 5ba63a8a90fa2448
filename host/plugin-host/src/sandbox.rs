//! The sandbox every plugin call runs in, and the one place its rules live.
//!
//! Why each choice:
//! - **A fresh `Store` per call.** A trap poisons a wasmtime instance for
//!   good, and a reused instance would carry one policy's state into the next.
//!   Instantiating from a cached `InstancePre` costs microseconds, so every
//!   call starts clean and a misbehaving call cannot hurt the next one.
//! - **Instances come from a pool.** The store is fresh, but its linear
//!   memory is a pre-reserved slot reset to the component's initial image
//!   (only the dirtied pages) rather than a new mmap per call: that was most
//!   of the per-call cost. The pool is sized so the limiter, never the pool,
//!   decides the memory limit, and [`CallGate`] keeps callers within it.
//! - **WASI p2, deny by default.** A Rust `wasm32-wasip2` guest imports about a
//!   dozen WASI interfaces even when it never uses them, so they must be linked,
//!   but nothing stands behind them: no preopened directory, no environment
//!   variable, no argument, no socket (TCP, UDP and name lookup off, and every
//!   address refused). stdin is empty. stdout and stderr go into bounded
//!   in-memory buffers that become the call's log; output past the bound is
//!   dropped (and says so), never an error the guest could trip over.
//! - **Three limits, each reported by name.** Fuel (CPU) ends as
//!   `Trap::OutOfFuel`; memory is capped by `StoreLimits`, but a refused
//!   `memory.grow` is not a trap (the guest sees -1 and usually aborts), so
//!   [`Limiter`] records the refusal and the call is reported as a
//!   memory-limit failure whatever the guest did next.
//! - **Wall time bounds the whole call, whatever the guest does.** Every
//!   call runs as a wasmtime async call on a fiber, with the WASI host
//!   functions linked async, inside a host-side `tokio::time::timeout`. Two
//!   things can make a call last: a guest waiting in a host call (e.g. on a
//!   `wasi:clocks/monotonic-clock` pollable, `std::thread::sleep`), which
//!   yields to the timer by itself; and guest code running, which is made to
//!   yield every [`FUEL_PER_YIELD`] units of fuel
//!   (`Store::fuel_async_yield_interval`). When the timer fires, the call's
//!   future is dropped (which unwinds the fiber; the store is thrown away
//!   anyway). Host calls cost no fuel, so each one's return to the guest
//!   also checks the deadline (a call hook): a guest looping over an
//!   expensive host call ends there. So one deadline bounds all of it, to
//!   within a slice of about a millisecond of guest code or one host call.
//!   Before, guest code was stopped by epoch interruption (a ticker thread
//!   and an epoch check on every loop iteration): those checks were 12% of
//!   a sort-bound gate call, where the
//!   fuel slices cost nothing more than the fuel checks every loop already
//!   pays (BENCHMARKS.md, "A gate plugin's cost"; docs/ARCHITECTURE.md
//!   "Decisions"). The timer is armed only once the call first yields: most
//!   calls finish within their first slice, so they pay for no timer (see
//!   [`run`]).
//! - **Data copied out of the guest is bounded while it is copied.**
//!   wasmtime's per-host-call copy budget ("hostcall fuel", 128 MiB by
//!   default) is set to [`HOSTCALL_COPY_BYTES`], just above pde's own result
//!   bounds, so a flood is refused before the host allocates it.
//! - **One bounded log per call.** `host.log` lines, stdout and stderr lines
//!   share one byte budget ([`MAX_LOG_BYTES`]); lines past it are counted and
//!   a note says how many were dropped. The log is traced once (escaped, see
//!   [`pde_core::term`]) or handed back for the caller to print, never both.
//!
//! The version shims in `wit/` only translate types; they call [`run`] and
//! [`HostState::log`], so no WIT version can skip a check (Zed's #55533).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable, Val};
use wasmtime::{
    CallHook, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{MAX_RESULT_BYTES, MAX_RESULT_ITEMS, PluginError};
use crate::limits::Limits;
use pde_core::term::escape;

/// Fuel a call's guest code may burn before it yields to the host-side
/// timer, which then checks the wall-time limit. One fuel unit is about one
/// wasm instruction, so this is about a millisecond of guest code: the
/// limit is kept to within that, and a call that ends within its first
/// slice (most do) never arms a timer.
pub const FUEL_PER_YIELD: u64 = 1_000_000;
/// Most bytes one `wasi:random` call may ask for; more traps the guest.
pub const MAX_RANDOM_BYTES: u64 = 1024 * 1024;
/// Bytes of log (`host.log` lines, stdout and stderr lines together) kept
/// per call; lines past the budget are counted, not kept.
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// Bytes of one log line kept; the rest of a longer line is cut off.
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// Bytes wasmtime may copy out of the guest in one host call or one call's
/// result ("hostcall fuel"). Just above the most a result within pde's own
/// bounds can take (strings of [`MAX_RESULT_BYTES`] plus
/// [`MAX_RESULT_ITEMS`] records of at most 256 bytes as host values), so
/// everything pde would accept gets through and a flood is refused while
/// being copied, not after.
pub const HOSTCALL_COPY_BYTES: usize = MAX_RESULT_BYTES + MAX_RESULT_ITEMS * 256;

/// Most plugin calls that can run at once on one host; further calls wait
/// for a slot (see [`CallGate`]). Sizes the instance pool.
pub const MAX_CONCURRENT_CALLS: u32 = 32;
/// Core instances one plugin component may hold in the pool (a Rust
/// `wasm32-wasip2` component has a handful).
pub const MAX_CORE_INSTANCES_PER_PLUGIN: u32 = 16;
/// Linear memories one plugin component may hold in the pool (Rust: one).
pub const MAX_MEMORIES_PER_PLUGIN: u32 = 2;
/// Tables one plugin component may hold in the pool.
pub const MAX_TABLES_PER_PLUGIN: u32 = 16;
/// Elements one pooled table may reach.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Bytes of each pooled linear memory that are reset in place (only the
/// pages the call dirtied, found with `PAGEMAP_SCAN` where the kernel has
/// it) instead of being handed back to the kernel: the next call then takes
/// no page faults on them. A Rust guest touches about 1 MiB.
pub const MEMORY_KEEP_RESIDENT: usize = 4 * 1024 * 1024;
/// Same as [`MEMORY_KEEP_RESIDENT`], for tables.
pub const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// The largest size, in bytes, one linear memory may reach under `limits`.
pub fn memory_limit_bytes(limits: &Limits) -> usize {
    usize::try_from(limits.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

/// Builds the one engine all plugins share: fuel on, instances from a pool.
///
/// `limits` are the workspace's; a plugin's own limits may only tighten them,
/// so every pool slot is large enough for any plugin of this host.
///
/// Why a pool: without one, every call mmaps a fresh linear memory, faults
/// its pages in and munmaps it again, which was most of the per-call cost
/// (see BENCHMARKS.md "Plugin calls"). Pooled slots are reserved once and
/// reset to the component's initial image after each call, so a call still
/// starts from a clean memory, just without the kernel round trips. The pool
/// never enforces the memory limit itself: each slot holds at least the
/// workspace limit, so the [`Limiter`] refuses first and the refusal is
/// reported as `MemoryLimit`.
pub fn engine(limits: &Limits) -> Result<Engine, PluginError> {
    // A 32-bit memory cannot exceed 4 GiB, and the pool's slots may not be
    // larger than the 4 GiB reservation either; the limiter enforces smaller caps.
    let slot_bytes = memory_limit_bytes(limits).min(4 << 30);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(MAX_CONCURRENT_CALLS)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_PLUGIN)
        .total_core_instances(MAX_CONCURRENT_CALLS * MAX_CORE_INSTANCES_PER_PLUGIN)
        .max_memories_per_component(MAX_MEMORIES_PER_PLUGIN)
        .total_memories(MAX_CONCURRENT_CALLS * MAX_MEMORIES_PER_PLUGIN)
        .max_tables_per_component(MAX_TABLES_PER_PLUGIN)
        .total_tables(MAX_CONCURRENT_CALLS * MAX_TABLES_PER_PLUGIN)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(slot_bytes)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto)
        // Every call runs on a fiber (see the module docs); one stack per
        // call that may run at once. Stacks are not zeroed between calls:
        // wasm cannot read its native stack, so nothing leaks through them.
        .total_stacks(MAX_CONCURRENT_CALLS);
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    // Pooled memories never move (each slot is reserved up front, at least
    // the memory limit), so compiled code may keep a memory's base address
    // in a register across calls and loops instead of reloading it: 4% of a
    // sort-bound gate call (BENCHMARKS.md, "A gate plugin's cost").
    config.memory_may_move(false);
    config.memory_init_cow(true);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))
}

/// Admits at most [`MAX_CONCURRENT_CALLS`] calls at once, so the instance
/// pool can never run out: a call past the bound waits for a slot instead
/// of failing.
#[derive(Default)]
pub struct CallGate {
    state: std::sync::Mutex<GateState>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    running: u32,
    waiting: u32,
}

/// A slot of the [`CallGate`], given back when dropped.
pub struct CallSlot<'a>(&'a CallGate);

impl CallGate {
    /// Waits for a free slot.
    pub fn enter(&self) -> CallSlot<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while state.running >= MAX_CONCURRENT_CALLS {
            state.waiting += 1;
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
        }
        state.running += 1;
        CallSlot(self)
    }
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.running -= 1;
        // Waking costs a system call; only pay it when someone waits.
        if state.waiting > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// The severity of a `host.log` line, independent of any WIT version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `error`
    Error,
    /// `warn`
    Warn,
    /// `info`
    Info,
    /// `debug`
    Debug,
    /// `trace`
    Trace,
}

/// The log of one call: `host.log` lines and the lines the guest wrote to
/// stdout and stderr, in order, under one byte budget ([`MAX_LOG_BYTES`]).
///
/// Nothing here can fail: a chatty plugin loses log lines, it does not crash,
/// and the report says how many were dropped.
#[derive(Clone)]
pub struct CallLog {
    inner: Arc<std::sync::Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Denied capability attempts, each once.
    denied: Vec<String>,
    bytes: usize,
    dropped: usize,
    /// Unfinished stdout and stderr lines, each at most [`MAX_LOG_LINE_BYTES`].
    partial: [Vec<u8>; 2],
}

impl LogState {
    fn push(&mut self, line: String) {
        if self.bytes + line.len() > MAX_LOG_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line);
    }

    fn end_line(&mut self, stream: usize) {
        let bytes = std::mem::take(&mut self.partial[stream]);
        if bytes.is_empty() {
            return;
        }
        let prefix = if stream == 0 { "stdout" } else { "stderr" };
        self.push(format!("{prefix}: {}", String::from_utf8_lossy(&bytes)));
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl CallLog {
    fn new() -> Self {
        CallLog {
            inner: Arc::new(std::sync::Mutex::new(LogState::default())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `host.log` line.
    fn line(&self, tag: &str, message: &str) {
        let message = truncate(message, MAX_LOG_LINE_BYTES);
        self.state().push(format!("{tag}: {message}"));
    }

    /// Bytes written to stdout (`stream` 0) or stderr (1), split into lines.
    fn write(&self, stream: usize, data: &[u8]) {
        let mut state = self.state();
        for (i, piece) in data.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                state.end_line(stream);
            }
            let partial = &mut state.partial[stream];
            let room = MAX_LOG_LINE_BYTES.saturating_sub(partial.len());
            partial.extend_from_slice(&piece[..room.min(piece.len())]);
        }
    }

    /// A denied capability the guest tried to use; each kind is kept once.
    pub fn denied(&self, what: String) {
        let mut state = self.state();
        if state.denied.len() < MAX_DENIED && !state.denied.contains(&what) {
            state.denied.push(what);
        }
    }

    /// The lines, with unfinished stream lines ended and a note when lines
    /// were dropped; then the denied attempts.
    fn finish(&self) -> (Vec<String>, Vec<String>) {
        let mut state = self.state();
        state.end_line(0);
        state.end_line(1);
        let mut lines = std::mem::take(&mut state.lines);
        if state.dropped > 0 {
            lines.push(format!(
                "({} more log lines dropped: the log is limited to {MAX_LOG_BYTES} bytes per call)",
                state.dropped
            ));
        }
        (lines, std::mem::take(&mut state.denied))
    }
}

/// The guest's stdout or stderr: a writer into the call's [`CallLog`].
#[derive(Clone)]
pub struct CapturedOutput {
    log: CallLog,
    stream: usize,
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.log.write(self.stream, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.log.write(self.stream, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Most distinct denied attempts recorded per call.
const MAX_DENIED: usize = 32;

/// The WASI 0.2 version wasmtime-wasi links; guests built against any
/// compatible 0.2.x resolve to it. (A wasmtime upgrade that moves it makes
/// `denied_capabilities_are_reported_at_run_time` fail, not pass silently.)
pub const WASI_VERSION: &str = "0.2.12";

/// Links WASI p2 deny-by-default into `linker`, for every WIT version module.
///
/// Everything wasmtime-wasi provides is linked async (see the module docs),
/// then the entry points of what pde denies are replaced by functions that
/// deny the same way *and* record the attempt, so a reviewer sees that the
/// plugin tried, not only the plugin's own account of it:
/// - `wasi:filesystem/preopens.get-directories`: the guest's libc asks for
///   preopened directories before it opens any path, and gets none. The path
///   itself never reaches the host (with nothing preopened the guest's libc
///   refuses it on its own), so the report names the attempt, not the file;
/// - `wasi:cli/environment.get-environment` and `get-arguments`: empty;
/// - `wasi:sockets/tcp-create-socket`, `udp-create-socket`: access denied;
/// - `wasi:sockets/ip-name-lookup.resolve-addresses`: refused, with the name.
pub fn link_wasi(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    linker.allow_shadowing(true);
    // Each returns what it records and the value the guest gets.
    type Deny = fn(&[Val]) -> (String, Val);
    let entries: [(&str, &str, Deny); 6] = [
        ("wasi:filesystem/preopens", "get-directories", |_| {
            (
                "tried wasi:filesystem: open a file or directory (no directory is preopened): denied".into(),
                Val::List(Vec::new()),
            )
        }),
        ("wasi:cli/environment", "get-environment", |_| {
            (
                "tried wasi:cli/environment: read environment variables (none are given): denied"
                    .into(),
                Val::List(Vec::new()),
            )
        }),
        ("wasi:cli/environment", "get-arguments", |_| {
            (
                "tried wasi:cli/environment: read arguments (none are given): denied".into(),
                Val::List(Vec::new()),
            )
        }),
        (
            "wasi:sockets/tcp-create-socket",
            "create-tcp-socket",
            |_| {
                (
                    "tried wasi:sockets: create a TCP socket: denied".into(),
                    Val::Result(Err(Some(Box::new(Val::Enum("access-denied".into()))))),
                )
            },
        ),
        (
            "wasi:sockets/udp-create-socket",
            "create-udp-socket",
            |_| {
                (
                    "tried wasi:sockets: create a UDP socket: denied".into(),
                    Val::Result(Err(Some(Box::new(Val::Enum("access-denied".into()))))),
                )
            },
        ),
        (
            "wasi:sockets/ip-name-lookup",
            "resolve-addresses",
            |params| {
                let name = match params.get(1) {
                    Some(Val::String(name)) => name.clone(),
                    _ => String::new(),
                };
                (
                    format!("tried wasi:sockets: resolve `{name}`: denied"),
                    // What wasmtime-wasi answers when name lookup is off.
                    Val::Result(Err(Some(Box::new(Val::Enum(
                        "permanent-resolver-failure".into(),
                    ))))),
                )
            },
        ),
    ];
    for (interface, function, deny) in entries {
        let mut instance = linker.instance(&format!("{interface}@{WASI_VERSION}"))?;
        instance.func_new(function, move |store, _ty, params, results| {
            let (what, result) = deny(params);
            store.data().log.denied(what);
            if let Some(slot) = results.first_mut() {
                *slot = result;
            }
            Ok(())
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// Sends a call's log and denied attempts to `tracing`, once, each line
/// escaped and at the level the guest gave it (stdout, stderr, notes and
/// denied attempts at `info`, so `-v` shows them). After a successful call
/// the report carries the warning and error lines
/// ([`crate::PluginNotice`]) and the step that ran the plugin shows them in
/// its own output, so they are traced at `info` (`-v`), not as pde's own
/// warnings and errors: a person reads them once, in the step's words.
pub fn trace_log(plugin: &str, log: &[String], denied: &[String], reported: bool) {
    for what in denied {
        tracing::info!(plugin, "{}", escape(what));
    }
    for line in log {
        let text = escape(line);
        let text = text.as_ref();
        match line.split_once(": ").map(|(tag, _)| tag) {
            Some("error" | "warn") if reported => tracing::info!(plugin, "{text}"),
            Some("error") => tracing::error!(plugin, "{text}"),
            Some("warn") => tracing::warn!(plugin, "{text}"),
            Some("debug") => tracing::debug!(plugin, "{text}"),
            Some("trace") => tracing::trace!(plugin, "{text}"),
            _ => tracing::info!(plugin, "{text}"),
        }
    }
}

/// Wraps `StoreLimits`, remembering the peak and whether a grow was refused.
pub struct Limiter {
    inner: StoreLimits,
    total: usize,
    peak: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let verdict = self.inner.memory_growing(current, desired, maximum);
        match verdict {
            Ok(true) => {
                self.total += desired.saturating_sub(current);
                self.peak = self.peak.max(self.total);
            }
            _ => self.hit = true,
        }
        verdict
    }

    // The limiter said yes but the allocation still failed (a pool slot
    // smaller than this plugin's limit, or the OS): the guest sees -1, and
    // the call is reported as a memory-limit failure like any other refusal.
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        tracing::debug!("plugin memory grow failed after the limiter allowed it: {error:#}");
        self.hit = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let verdict = self.inner.table_growing(current, desired, maximum);
        if !matches!(verdict, Ok(true)) {
            self.hit = true;
        }
        verdict
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// What a store holds for one call.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    log: CallLog,
    /// When the call's wall-time budget runs out; checked each time a host
    /// call returns to the guest (see [`new_store`]).
    deadline: Instant,
    /// A host call returned past `deadline` and the call was stopped there.
    timed_out: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// `host.log`, the same for every WIT version: bounded and attributed.
    /// Kept raw (JSON output must be exact); escaped where it is shown.
    pub fn log(&mut self, level: LogLevel, message: &str) {
        let tag = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        self.log.line(tag, message);
    }
}

/// A fresh store for one call, with its limits applied.
pub fn new_store(engine: &Engine, limits: &Limits) -> Store<HostState> {
    let log = CallLog::new();
    // Nothing inherited: no preopens, env, args; sockets off and every address refused.
    let mut builder = WasiCtx::builder();
    builder
        .stdout(CapturedOutput {
            log: log.clone(),
            stream: 0,
        })
        .stderr(CapturedOutput {
            log: log.clone(),
            stream: 1,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        // One `get-random-bytes` call is host work no fuel pays for:
        // bounded to what a plugin could want (wasmtime allows 64 MiB).
        .max_random_size(MAX_RANDOM_BYTES);
    let memory_bytes = memory_limit_bytes(limits);
    let state = HostState {
        wasi: builder.build(),
        table: ResourceTable::new(),
        limiter: Limiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .table_elements(1_000_000)
                .instances(64)
                .tables(64)
                .memories(16)
                .build(),
            total: 0,
            peak: 0,
            hit: false,
        },
        log,
        deadline: Instant::now() + Duration::from_millis(limits.timeout_ms),
        timed_out: false,
    };
    let mut store = Store::new(engine, state);
    store.set_hostcall_fuel(HOSTCALL_COPY_BYTES);
    store.limiter(|s| &mut s.limiter);
    // Both only fail when fuel is not enabled, which `engine()` does (and
    // the interval is not zero).
    let fuel = store.set_fuel(limits.fuel);
    let yields = store.fuel_async_yield_interval(Some(FUEL_PER_YIELD));
    debug_assert!(fuel.is_ok() && yields.is_ok(), "the engine consumes fuel");
    // Work inside a host call costs no fuel, so a guest looping over an
    // expensive one (`get-random-bytes`, say) could run for long between
    // two fuel yields: the deadline is also checked as every host call
    // returns, and the call ends there as a timeout.
    store.call_hook(|mut ctx, hook| {
        if matches!(hook, CallHook::ReturningFromHost) {
            let state = ctx.data_mut();
            if Instant::now() >= state.deadline {
                state.timed_out = true;
                return Err(wasmtime::Error::msg("past the call's wall-time limit"));
            }
        }
        Ok(())
    });
    store
}

/// Resource use of one finished call.
#[derive(Debug, Clone)]
pub struct CallStats {
    /// Fuel consumed.
    pub fuel_used: u64,
    /// Highest linear memory (and table) size reached, bytes.
    pub peak_memory_bytes: u64,
    /// Wall time of instantiate + call.
    pub elapsed: Duration,
    /// `host.log` lines and stdout/stderr lines, in the order written.
    pub log: Vec<String>,
    /// Denied capabilities the guest tried to use, each once.
    pub denied: Vec<String>,
}

/// How a call treats its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Send the log of a successful call to `tracing` (the log of a failed
    /// call always is, since no report carries it). Off when the caller
    /// prints the report's log itself, so each line is shown once.
    pub trace_log: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { trace_log: true }
    }
}

/// What one call runs under: the shared engine, the plugin's name and
/// effective limits, and how its log is treated. The facade builds it; a
/// version shim only hands it an async closure ([`Sandbox::run`]), so no
/// shim chooses a limit.
#[derive(Clone, Copy)]
pub struct Sandbox<'a> {
    /// The engine every plugin of the host shares.
    pub engine: &'a Engine,
    /// The plugin, for errors and log lines.
    pub plugin: &'a str,
    /// Its effective limits.
    pub limits: &'a Limits,
    /// How the call treats its log.
    pub options: RunOptions,
}

impl Sandbox<'_> {
    /// [`run`] under this sandbox.
    pub fn run<R>(
        &self,
        call: impl AsyncFnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, CallStats), PluginError> {
        run(self.engine, self.plugin, self.limits, self.options, call)
    }
}

/// Runs `call` in a fresh store and turns every way it can end into a named
/// result. The version shims pass an async closure that instantiates and
/// calls; `limits.timeout_ms` bounds all of it, guest code and host waits.
pub fn run<R>(
    engine: &Engine,
    plugin: &str,
    limits: &Limits,
    options: RunOptions,
    call: impl AsyncFnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<(R, CallStats), PluginError> {
    let start = Instant::now();
    let mut store = new_store(engine, limits);
    let budget = Duration::from_millis(limits.timeout_ms);
    let outcome = {
        let mut pending = std::pin::pin!(call(&mut store));
        // First poll without a timer: guest code runs inside it until it
        // returns, waits in a host call, or has burnt its first
        // `FUEL_PER_YIELD` and yields. Most calls do none of that, and arming
        // a tokio timer (plus entering `block_on`) was a measurable part of a
        // call (BENCHMARKS.md). The ambient runtime is entered, as WASI host
        // functions need one.
        let first =
            wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| poll_once(pending.as_mut()));
        match first {
            Some(done) => Ok(done),
            // The guest waits in a host call or has yielded: from here on
            // `in_tokio` drives it, and the host-side timer bounds the rest
            // of the budget.
            None => {
                let rest = budget.saturating_sub(start.elapsed());
                // Built inside the runtime: a tokio timer needs its context.
                wasmtime_wasi::runtime::in_tokio(async {
                    tokio::time::timeout(rest, pending).await
                })
            }
        }
    };
    let elapsed = start.elapsed();
    let fuel_left = store.get_fuel().unwrap_or(0);
    let state = store.data();
    let (log, denied) = state.log.finish();
    let stats = CallStats {
        fuel_used: limits.fuel.saturating_sub(fuel_left),
        peak_memory_bytes: state.limiter.peak as u64,
        elapsed,
        log,
        denied,
    };
    let result = match outcome {
        Ok(Ok(value)) => {
            if options.trace_log {
                trace_log(plugin, &stats.log, &stats.denied, true);
            }
            return Ok((value, stats));
        }
        // The host-side timer fired: the guest ran or waited past the budget.
        Err(_elapsed) => PluginError::Timeout {
            plugin: plugin.to_string(),
            timeout_ms: limits.timeout_ms,
        },
        Ok(Err(error)) => classify(plugin, limits, &error, state, &stats),
    };
    trace_log(plugin, &stats.log, &stats.denied, false);
    Err(result)
}

/// Polls `future` once; `None` when it is not finished. It is polled again
/// later with a real waker, which every future then registers afresh, so the
/// no-op waker of this poll is never relied on.
fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// True when wasmtime refused to copy more than [`HOSTCALL_COPY_BYTES`] out
/// of the guest. Its error type is private, so it is recognised by message.
fn copy_budget_exhausted(error: &wasmtime::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.to_string().contains("fuel allocated for hostcalls"))
}

fn classify(
    plugin: &str,
    limits: &Limits,
    error: &wasmtime::Error,
    state: &HostState,
    stats: &CallStats,
) -> PluginError {
    let plugin = plugin.to_string();
    if state.timed_out {
        return PluginError::Timeout {
            plugin,
            timeout_ms: limits.timeout_ms,
        };
    }
    // Checked first: a refused grow usually ends in an abort trap, but the
    // cause is the memory limit.
    if state.limiter.hit {
        return PluginError::MemoryLimit {
            plugin,
            limit_mib: limits.memory_mib,
        };
    }
    if copy_budget_exhausted(error) {
        return PluginError::ResultTooLarge {
            plugin,
            what: format!(
                "refused while copying it out of the guest: more than {HOSTCALL_COPY_BYTES} bytes \
                 (at most {MAX_RESULT_ITEMS} items and {MAX_RESULT_BYTES} bytes of strings are accepted)"
            ),
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
            plugin,
            fuel: limits.fuel,
        },
        _ => {
            // A Rust guest prints its panic message on stderr before trapping.
            let guest_said: Vec<&str> = stats
                .log
                .iter()
                .filter(|l| l.starts_with("stderr: "))
                .map(|l| l.trim_start_matches("stderr: "))
                .collect();
            // The error chain without the wasm backtrace frames: the trap
            // and its context ("memory fault at wasm address …").
            let mut message = error
                .chain()
                .map(|cause| cause.to_string())
                .filter(|cause| !cause.contains("wasm backtrace:"))
                .collect::<Vec<_>>()
                .join(": ");
            if message.contains("call stack exhausted") {
                message.push_str(
                    " (the guest recursed past the host's wasm stack limit: unbounded recursion?)",
                );
            } else if message.contains("out of bounds memory access") && message.contains("0xfff") {
                message.push_str(
                    " (the guest's stack ran past the start of its memory: unbounded recursion?)",
                );
            }
            if !guest_said.is_empty() {
                message = format!("{message}; the plugin wrote: {}", guest_said.join(" | "));
            }
            PluginError::Trap { plugin, message }
        }
    }
}
