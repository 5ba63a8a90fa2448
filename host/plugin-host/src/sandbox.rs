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
//!   `Trap::OutOfFuel`; wall time uses epoch interruption, with one ticker
//!   thread per host, and ends as `Trap::Interrupt`; memory is capped by
//!   `StoreLimits`, but a refused `memory.grow` is not a trap (the guest sees
//!   -1 and usually aborts), so [`Limiter`] records the refusal and the call is
//!   reported as a memory-limit failure whatever the guest did next.
//!
//! The version shims in `wit/` only translate types; they call [`run`] and
//! [`HostState::log`], so no WIT version can skip a check (Zed's #55533).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{
    Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginError;
use crate::limits::Limits;

/// How often the epoch advances; wall-time limits are accurate to about this.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Bytes of stdout plus stderr kept per call.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// Lines of `host.log` kept per call.
pub const MAX_LOG_LINES: usize = 1000;
/// Bytes of one `host.log` message kept.
pub const MAX_LOG_LINE_BYTES: usize = 4096;

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

/// Builds the one engine all plugins share: fuel and epochs on, instances
/// from a pool.
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
        .pagemap_scan(Enabled::Auto);
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
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

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`.
    pub fn start(engine: &Engine) -> Result<EpochTicker, PluginError> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pde-plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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

/// A bounded, shared byte buffer behind the guest's stdout or stderr.
///
/// Unlike `MemoryOutputPipe`, writes past the bound are dropped rather than
/// failing: a chatty plugin loses log lines, it does not crash.
#[derive(Clone)]
pub struct CapturedOutput {
    inner: Arc<std::sync::Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl CapturedOutput {
    fn new() -> Self {
        CapturedOutput {
            inner: Arc::new(std::sync::Mutex::new(Captured::default())),
        }
    }

    fn push(&self, data: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_OUTPUT_BYTES.saturating_sub(c.bytes.len());
        let take = room.min(data.len());
        c.bytes.extend_from_slice(&data[..take]);
        c.dropped += data.len() - take;
    }

    /// The captured text as lines, with a note if output was dropped.
    fn lines(&self, stream: &str) -> Vec<String> {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = String::from_utf8_lossy(&c.bytes)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| format!("{stream}: {l}"))
            .collect();
        if c.dropped > 0 {
            out.push(format!(
                "{stream}: ({} more bytes dropped: output is limited to {MAX_OUTPUT_BYTES} bytes per call)",
                c.dropped
            ));
        }
        out
    }
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
        self.push(&bytes);
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
        self.push(buf);
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
    plugin: String,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    log: Vec<String>,
    log_dropped: usize,
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
    /// `host.log`, the same for every WIT version: bounded, attributed, traced.
    pub fn log(&mut self, level: LogLevel, message: &str) {
        if self.log.len() >= MAX_LOG_LINES {
            self.log_dropped += 1;
            return;
        }
        let mut end = message.len().min(MAX_LOG_LINE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let plugin = self.plugin.as_str();
        match level {
            LogLevel::Error => tracing::error!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
        }
        let tag = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        self.log.push(format!("{tag}: {message}"));
    }

    fn collect_log(&self) -> Vec<String> {
        let mut log = self.log.clone();
        if self.log_dropped > 0 {
            log.push(format!(
                "({} more log lines dropped: at most {MAX_LOG_LINES} per call)",
                self.log_dropped
            ));
        }
        for line in self.stdout.lines("stdout") {
            tracing::info!(plugin = self.plugin.as_str(), "{line}");
            log.push(line);
        }
        for line in self.stderr.lines("stderr") {
            tracing::info!(plugin = self.plugin.as_str(), "{line}");
            log.push(line);
        }
        log
    }
}

/// A fresh store for one call of `plugin`, with its limits applied.
pub fn new_store(engine: &Engine, plugin: &str, limits: &Limits) -> Store<HostState> {
    let stdout = CapturedOutput::new();
    let stderr = CapturedOutput::new();
    // Nothing inherited: no preopens, env, args; sockets off and every address refused.
    let mut builder = WasiCtx::builder();
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    let memory_bytes = memory_limit_bytes(limits);
    let state = HostState {
        plugin: plugin.to_string(),
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
        stdout,
        stderr,
        log: Vec::new(),
        log_dropped: 0,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // set_fuel only fails when fuel is not enabled, which `engine()` does.
    let _ = store.set_fuel(limits.fuel);
    let ticks = limits.timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1;
    store.set_epoch_deadline(ticks);
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
    /// `host.log` lines, then captured stdout and stderr.
    pub log: Vec<String>,
}

/// Runs `call` in a fresh store and turns every way it can end into a named
/// result. The version shims pass a closure that instantiates and calls.
pub fn run<R>(
    engine: &Engine,
    plugin: &str,
    limits: &Limits,
    call: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<(R, CallStats), PluginError> {
    let start = Instant::now();
    let mut store = new_store(engine, plugin, limits);
    let outcome = call(&mut store);
    let elapsed = start.elapsed();
    let fuel_left = store.get_fuel().unwrap_or(0);
    let state = store.data();
    let stats = CallStats {
        fuel_used: limits.fuel.saturating_sub(fuel_left),
        peak_memory_bytes: state.limiter.peak as u64,
        elapsed,
        log: state.collect_log(),
    };
    match outcome {
        Ok(value) => Ok((value, stats)),
        Err(error) => Err(classify(plugin, limits, &error, state, &stats)),
    }
}

fn classify(
    plugin: &str,
    limits: &Limits,
    error: &wasmtime::Error,
    state: &HostState,
    stats: &CallStats,
) -> PluginError {
    let plugin = plugin.to_string();
    // Checked first: a refused grow usually ends in an abort trap, but the
    // cause is the memory limit.
    if state.limiter.hit {
        return PluginError::MemoryLimit {
            plugin,
            limit_mib: limits.memory_mib,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
            plugin,
            fuel: limits.fuel,
        },
        Some(Trap::Interrupt) => PluginError::Timeout {
            plugin,
            timeout_ms: limits.timeout_ms,
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
