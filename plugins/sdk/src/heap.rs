//! The plugin's heap in the sandbox: talc over a static first arena, then
//! linear memory grown in 1 MiB steps.
//!
//! Why not the default allocator: a Rust `wasm32-wasip2` plugin otherwise
//! allocates through wasi-libc's dlmalloc, four calls deep per allocation
//! (`__rust_alloc` → `__rdl_alloc` → `malloc` → `dlmalloc`), each paying the
//! sandbox's fuel checks. A validator is mostly JSON parsing,
//! which is mostly allocation; with talc as the global allocator the same
//! 1,000-rule check takes about a fifth less time and a third less fuel
//! (BENCHMARKS.md, issue 15).
//!
//! Why this source rather than talc's own `WasmGrowAndExtend`:
//! - **A static first arena.** Every call runs in a fresh instance, so the
//!   first allocation of every call would otherwise grow memory, a host
//!   call the empty call cannot afford. [`ARENA_BYTES`] in the module's own
//!   zeroed data serve small calls without growing at all.
//! - **Growth in [`GROW_PAGES`] steps**, not one 64 KiB page per shortfall:
//!   a 1,000-rule policy would take a hundred `memory.grow` host calls.
//!   The step costs at most one step of the memory limit: a plugin whose
//!   heap would end within 1 MiB of `memory_mib` hits the limit a little
//!   earlier than with exact growth.
//!
//! Only the arena and memory this source grows are handed to talc, so C
//! code in wasi-libc that calls `malloc` (it rarely does in a plugin) keeps
//! its own heap and the two never overlap.
//!
//! Authors who want their own `#[global_allocator]` turn the SDK's default
//! feature `heap` off.

use core::alloc::Layout;
use core::mem::MaybeUninit;
use core::ptr::NonNull;

use talc::base::Talc;
use talc::base::binning::Binning;
use talc::cell::TalcSyncCell;
use talc::source::Source;
use talc::wasm::WasmBinning;

/// Bytes of the static arena used before linear memory is grown.
pub const ARENA_BYTES: usize = 256 * 1024;
/// Wasm pages (64 KiB each) added per `memory.grow` at the least.
pub const GROW_PAGES: usize = 16;
const PAGE_BYTES: usize = 64 * 1024;

static mut ARENA: [MaybeUninit<u8>; ARENA_BYTES] = [MaybeUninit::uninit(); ARENA_BYTES];

/// Where talc gets memory: the arena once, then grown linear memory.
#[derive(Debug)]
pub struct PluginHeap {
    arena_claimed: bool,
    /// End of the heap grown from linear memory, to extend it in place when
    /// the next growth is contiguous.
    end: Option<NonNull<u8>>,
}

// SAFETY: `acquire` only claims memory nothing else uses (the private
// arena, or pages `memory.grow` just returned) and never allocates.
unsafe impl Source for PluginHeap {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        if !talc.source.arena_claimed {
            talc.source.arena_claimed = true;
            // SAFETY: the arena is private to this module and claimed once.
            let claimed = unsafe { talc.claim((&raw mut ARENA).cast::<u8>(), ARENA_BYTES) };
            if claimed.is_some() {
                return Ok(());
            }
        }
        // Generous for talc's chunk header and alignment: too few pages
        // would make talc ask again and again.
        let needed = layout.size().checked_add(layout.align() + 256).ok_or(())?;
        let pages = needed.div_ceil(PAGE_BYTES).max(GROW_PAGES);
        let previous = core::arch::wasm32::memory_grow::<0>(pages);
        if previous == usize::MAX {
            return Err(());
        }
        // A 32-bit memory of exactly 4 GiB ends past `usize::MAX`: refused
        // rather than wrapped around to address 0.
        let start = previous.checked_mul(PAGE_BYTES).ok_or(())?;
        let bytes = pages.checked_mul(PAGE_BYTES).ok_or(())?;
        start.checked_add(bytes).ok_or(())?;
        let base = start as *mut u8;
        let new_end = base.wrapping_add(bytes);
        if let Some(old_end) = talc.source.end.take()
            && old_end.as_ptr() == base
        {
            // SAFETY: `old_end` ends a heap of this talc, and the pages from
            // it to `new_end` were just grown for it.
            talc.source.end = Some(unsafe { talc.extend(old_end, new_end) });
            return Ok(());
        }
        // SAFETY: the pages were just grown and belong to nobody else.
        talc.source.end = unsafe { talc.claim(base, bytes) };
        Ok(())
    }
}

/// The SDK's global allocator on wasm (feature `heap`, on by default).
#[global_allocator]
static HEAP: TalcSyncCell<PluginHeap, WasmBinning> = TalcSyncCell::new_wasm(PluginHeap {
    arena_claimed: false,
    end: None,
});
