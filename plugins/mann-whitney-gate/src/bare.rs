//! What `std` would otherwise provide on wasm: a heap, `cabi_realloc`, a
//! panic handler and `memcmp`.
//!
//! Why `no_std`: a `std` component imports wasi:cli, wasi:io and their
//! terminal interfaces (for panics' messages, `exit` and the standard
//! streams), and pde links every one of them into every fresh instance,
//! once per call. A gate needs none: it reads its input and returns a
//! judgement. Dropping them cut the sandbox's own share of a gate call by
//! about 2 µs (BENCHMARKS.md, "A gate plugin's cost").
//!
//! The cost: a panic traps without its message. pde still reports the
//! trap as this plugin's fault (exit 5); the statistics are tested
//! natively, where a panic does print, on NaNs, infinities, empty sides
//! and ties.

// The allocator and the canonical ABI's entry points are unsafe by nature;
// each block says why it holds.
#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::{Cell, UnsafeCell};

#[cfg(target_feature = "atomics")]
compile_error!("the bump heap below is for single-threaded wasm only");

/// Bytes of heap that are part of the module's initial memory. A gate on
/// two sides of 20,000 samples each fits in it (its input, the values and
/// their sorted keys come to about 1.5 MB).
const ARENA_BYTES: usize = 2 << 20;
/// Memory is grown in steps of at least 1 MiB (16 pages): each step is a
/// host call.
const MIN_GROW_PAGES: usize = 16;
const PAGE_BYTES: usize = 64 * 1024;

/// The heap: a bump allocator, first over an arena in the module's own
/// memory, then over pages grown on demand.
///
/// Why a bump allocator: pde runs every call in a fresh instance and
/// throws it away afterwards, so nothing freed during a call would ever be
/// reused by a later one; an allocation is a pointer bump, and the last
/// block (a `Vec` being filled) grows in place. Why an arena: growing
/// memory in a call is a host round trip (the pool makes the pages
/// accessible, and takes them back at the reset), while heap that is
/// already in the initial memory costs neither, and the pages a call does
/// not touch cost nothing at all. Against talc over the same arena (a
/// free-list allocator, the SDK's heap; dlmalloc is `std`'s), this saves
/// 4–5 µs of a 2 × 1,000-sample call. The price is memory: a call that
/// frees and allocates again keeps both, within the plugin's memory limit.
struct Bump {
    /// Whether `next` and `end` have been pointed at the arena.
    started: Cell<bool>,
    /// Where the next allocation may start.
    next: Cell<usize>,
    /// The end of the memory `next` bumps through.
    end: Cell<usize>,
    arena: UnsafeCell<[u8; ARENA_BYTES]>,
}

// SAFETY: this is `wasm32` without threads (`wasm32-wasip2`, and the
// `compile_error!` above refuses `atomics`): one thread only ever touches
// the heap.
unsafe impl Sync for Bump {}

impl Bump {
    /// Takes `layout` from the current memory, or `None` when it does not fit.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if !self.started.get() {
            // The arena's address is not a constant, so the first
            // allocation of the instance takes it.
            let arena = self.arena.get() as usize;
            self.next.set(arena);
            self.end.set(arena + ARENA_BYTES);
            self.started.set(true);
        }
        let start = self.next.get().checked_next_multiple_of(layout.align())?;
        let end = start.checked_add(layout.size())?;
        if end > self.end.get() {
            return None;
        }
        self.next.set(end);
        Some(start as *mut u8)
    }

    /// Grows the memory by at least `bytes`. Pages right after the current
    /// end extend it, so the last block can keep growing in place; others
    /// start a new stretch. False when the host refuses (the memory limit).
    fn grow(&self, bytes: usize) -> bool {
        let pages = bytes.div_ceil(PAGE_BYTES).max(MIN_GROW_PAGES);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return false;
        }
        // A 32-bit memory of exactly 4 GiB ends past `usize::MAX`: refused
        // rather than wrapped around onto the arena.
        let Some((start, end)) = previous
            .checked_mul(PAGE_BYTES)
            .and_then(|start| Some((start, start.checked_add(pages.checked_mul(PAGE_BYTES)?)?)))
        else {
            return false;
        };
        if start != self.end.get() {
            self.next.set(start);
        }
        self.end.set(end);
        true
    }
}

// SAFETY: every block is carved from memory no other block overlaps (the
// bump only moves forward, or back over the block just freed, and grown
// memory is new), aligned as asked, and never handed out twice.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.bump(layout)
            .or_else(|| {
                let room = layout.size().checked_add(layout.align())?;
                self.grow(room).then(|| self.bump(layout)).flatten()
            })
            .unwrap_or(core::ptr::null_mut())
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // The last block is taken back (a temporary's buffer); others stay.
        if block as usize + layout.size() == self.next.get() {
            self.next.set(block as usize);
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let start = block as usize;
        let is_last = || start + layout.size() == self.next.get();
        // The last block grows or shrinks in place, growing the memory
        // first when it must; if the grown pages are not contiguous, it
        // moves to them below.
        if let Some(new_end) = start.checked_add(new_size)
            && is_last()
        {
            if new_end > self.end.get() {
                self.grow(new_size.saturating_add(layout.align()));
            }
            if is_last() && new_end <= self.end.get() {
                self.next.set(new_end);
                return block;
            }
        }
        // Shrinking never needs to move.
        if new_size <= layout.size() {
            return block;
        }
        // SAFETY: as the trait's contract, which the caller upholds.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            let moved = self.alloc(new);
            if !moved.is_null() {
                core::ptr::copy_nonoverlapping(block, moved, layout.size());
            }
            moved
        }
    }
}

#[global_allocator]
static HEAP: Bump = Bump {
    started: Cell::new(false),
    next: Cell::new(0),
    end: Cell::new(0),
    arena: UnsafeCell::new([0; ARENA_BYTES]),
};

/// The canonical ABI's allocator: the host calls it to place the call's
/// arguments in the guest's memory. (`std` builds get it from wasi-libc.)
///
/// # Safety
/// Called by the host as the canonical ABI specifies: `old` is null or a
/// block it got from here with `old_len` bytes and `align`.
#[unsafe(no_mangle)]
unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        // The ABI's zero-sized block: any aligned, non-null address.
        return align as *mut u8;
    }
    // The sizes are the host's: a size and alignment that make no layout
    // trap here, before anything unchecked uses them.
    let (Ok(new), Ok(previous)) = (
        Layout::from_size_align(new_len, align),
        Layout::from_size_align(old_len, align),
    ) else {
        core::arch::wasm32::unreachable()
    };
    // SAFETY: `new` is non-zero (checked above), and the ABI guarantees
    // that a non-null `old` came from here with `previous`.
    let block = unsafe {
        if old_len == 0 {
            HEAP.alloc(new)
        } else {
            HEAP.realloc(old, previous, new_len)
        }
    };
    if block.is_null() {
        core::arch::wasm32::unreachable()
    }
    block
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

// `memcmp`, which core's slice comparisons call: from the wasi-libc that
// rustc ships for this target. It calls no WASI function, so the component
// still imports none.
#[link(name = "c")]
unsafe extern "C" {}
