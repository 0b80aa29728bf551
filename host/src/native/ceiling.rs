//! The kernel-enforced memory ceiling of a native child.
//!
//! A child's memory is otherwise only seen at each health check (every
//! [`crate::limits::DEFAULT_HEALTH_INTERVAL`]); an engine that leaks, or a
//! crafted model that makes ONNX Runtime allocate without bound, could
//! exhaust the machine between two checks. So each child starts with
//! `RLIMIT_DATA` set to its ceiling: the kernel refuses any private
//! writable mapping (the heap, every allocator arena) past it.
//!
//! Why `RLIMIT_DATA` and not `RLIMIT_AS` or a cgroup: address space counts
//! reservations that are never touched (allocator arenas, guard regions),
//! so `RLIMIT_AS` low enough to matter fails healthy children; a cgroup
//! needs a delegated hierarchy that a user's desktop or a container often
//! does not have. `RLIMIT_DATA` (Linux 4.7+) counts what can become
//! resident, needs no privilege and is inherited by nothing but the child.
//!
//! A refused allocation in the child's Rust code reaches
//! [`CeilingAllocator`], which writes [`CEILING_MARKER`] on stderr and exits
//! with [`CEILING_EXIT_CODE`]: the host reads either and records the
//! restart as `memory_cap`, as it does for a WASM instance's cap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// The line a child writes on stderr when its ceiling refuses memory.
pub const CEILING_MARKER: &str = "embedhost-child: memory ceiling reached";

/// The exit code of a child stopped at its ceiling.
pub const CEILING_EXIT_CODE: i32 = 87;

static ARMED: AtomicBool = AtomicBool::new(false);

/// Makes a refused allocation end this process as [`CEILING_EXIT_CODE`]
/// instead of aborting: called by `embedhost child` only.
pub fn arm() {
    ARMED.store(true, Ordering::Relaxed);
}

/// The system allocator, which ends an armed process (a child) at its
/// memory ceiling with a marker the host recognises. Unarmed (the host),
/// it is the system allocator.
pub struct CeilingAllocator;

impl CeilingAllocator {
    #[cold]
    fn refused(ptr: *mut u8) -> *mut u8 {
        if ptr.is_null() && ARMED.load(Ordering::Relaxed) {
            let line = marker_line();
            // SAFETY: write(2) and _exit(2) are async-signal-safe and
            // allocate nothing; the buffer is a static.
            unsafe {
                libc::write(2, line.as_ptr().cast(), line.len());
                libc::_exit(CEILING_EXIT_CODE);
            }
        }
        ptr
    }
}

const fn marker_line() -> &'static [u8] {
    b"\nembedhost-child: memory ceiling reached\n"
}

// SAFETY: every method forwards to `System` with the same arguments; the
// only addition runs when `System` has already failed.
unsafe impl GlobalAlloc for CeilingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let ptr = unsafe { System.alloc(layout) };
        if ptr.is_null() {
            Self::refused(ptr)
        } else {
            ptr
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if ptr.is_null() {
            Self::refused(ptr)
        } else {
            ptr
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `alloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            Self::refused(new)
        } else {
            new
        }
    }
}

/// Sets this process's data ceiling to `bytes`: called between fork and
/// exec of a child, so only async-signal-safe calls.
///
/// # Errors
/// The `setrlimit` error.
pub fn apply(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marker_line_is_the_constant() {
        let line = super::marker_line();
        assert_eq!(
            std::str::from_utf8(line).unwrap().trim(),
            super::CEILING_MARKER
        );
    }

    /// Unarmed (the host, this test), a refused allocation is the system
    /// allocator's null, for the caller to handle: nothing exits.
    #[test]
    fn an_unarmed_allocator_hands_a_refusal_back_as_null() {
        use std::alloc::{GlobalAlloc, Layout};
        let allocator = super::CeilingAllocator;
        // Far more than any machine's address space.
        let huge = Layout::from_size_align(isize::MAX as usize / 2, 8).unwrap();
        // SAFETY: a valid layout; the null results are never dereferenced,
        // and the small block is freed with its own layout.
        unsafe {
            assert!(allocator.alloc(huge).is_null());
            assert!(allocator.alloc_zeroed(huge).is_null());
            let small = Layout::from_size_align(64, 8).unwrap();
            let block = allocator.alloc(small);
            assert!(!block.is_null());
            block.write_bytes(7, 64);
            assert!(allocator.realloc(block, small, huge.size()).is_null());
            // A refused realloc leaves the block as it was.
            assert_eq!(*block.add(63), 7);
            allocator.dealloc(block, small);
        }
    }
}
