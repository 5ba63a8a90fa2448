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

/// Bytes of heap that are part of the module's initial memory. A gate on
/// two sides of 20,000 samples each fits in it (its input, the values and
/// their sorted keys come to about 1.3 MB).
const ARENA_BYTES: usize = 2 << 20;
/// A wasm page.
const PAGE_BYTES: usize = 64 * 1024;

/// The heap: a bump allocator, first over an arena in the module's own
/// memory, then over pages grown on demand.
///
/// Why a bump allocator: pde runs every call in a fresh instance and
/// throws it away afterwards, so nothing freed during a call would ever be
/// reused by a later one; an allocation is a pointer bump, and a `Vec`
/// that grows at the end of the heap grows in place. Why an arena: growing
/// memory in a call is a host round trip (the pool makes the pages
/// accessible, and takes them back at the reset), while heap that is
/// already in the initial memory costs neither, and the pages a call does
/// not touch cost nothing at all. Against talc over the same arena (a
/// free-list allocator; dlmalloc is `std`'s), this saves about 4 µs of a
/// 2 × 1,000-sample call. The price is memory: a call that frees and
/// allocates again keeps both, within the plugin's memory limit.
struct Bump {
    /// Where the next allocation may start.
    next: Cell<usize>,
    /// The end of the memory `next` bumps through.
    end: Cell<usize>,
    arena: UnsafeCell<[u8; ARENA_BYTES]>,
}

// SAFETY: this is `wasm32` without threads (`wasm32-wasip2`): one thread
// only ever touches the heap.
unsafe impl Sync for Bump {}

impl Bump {
    /// Takes `layout` from the current memory, or `None` when it does not fit.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if self.end.get() == 0 {
            // The first allocation of the instance: the arena's address is
            // not a constant, so it is taken here.
            let arena = self.arena.get() as usize;
            self.next.set(arena);
            self.end.set(arena + ARENA_BYTES);
        }
        let start = self.next.get().checked_next_multiple_of(layout.align())?;
        let end = start.checked_add(layout.size())?;
        if end > self.end.get() {
            return None;
        }
        self.next.set(end);
        Some(start as *mut u8)
    }

    /// Grows the memory by enough pages for `layout` and bumps through them.
    fn grow(&self, layout: Layout) -> Option<*mut u8> {
        let pages = layout
            .size()
            .checked_add(layout.align())?
            .div_ceil(PAGE_BYTES);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            // The host's memory limit: the allocation fails and the guest traps.
            return None;
        }
        self.next.set(previous * PAGE_BYTES);
        self.end.set((previous + pages) * PAGE_BYTES);
        self.bump(layout)
    }
}

// SAFETY: every block is carved from memory no other block overlaps (the
// bump only moves forward, or back over the block just freed), aligned as
// asked, and never handed out twice.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.bump(layout)
            .or_else(|| self.grow(layout))
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
        // The last block grows or shrinks in place when the memory allows.
        if start + layout.size() == self.next.get()
            && start
                .checked_add(new_size)
                .is_some_and(|end| end <= self.end.get())
        {
            self.next.set(start + new_size);
            return block;
        }
        // SAFETY: as the trait's contract, which the caller upholds.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            let moved = self.alloc(new);
            if !moved.is_null() {
                core::ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
            }
            moved
        }
    }
}

#[global_allocator]
static HEAP: Bump = Bump {
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
    // SAFETY: the ABI guarantees a non-zero power-of-two `align`, and that
    // `old` came from here with this layout.
    let block = unsafe {
        let new = Layout::from_size_align_unchecked(new_len, align);
        if old_len == 0 {
            HEAP.alloc(new)
        } else {
            HEAP.realloc(
                old,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
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
