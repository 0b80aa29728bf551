//! The host's allocator settings, applied once at start-up by the binary
//! (and by the soak test, which stands in for a long-running host).
//!
//! # Why
//! glibc raises its mmap threshold each time a large block it had mapped
//! is freed, so later large blocks (an index's vectors, a batch's buffers,
//! a database's page cache) come from the heap instead, where freeing them
//! leaves holes the process keeps. A host that opens index after index, or
//! runs for days, then grows with no leak at all: the soak measured 98 MiB
//! to 159 MiB over 35 rounds without a single fault, and 98 to 102 MiB
//! with the threshold fixed. A fixed threshold
//! ([`limits::MALLOC_MMAP_THRESHOLD`]) keeps large blocks mapped, so freeing
//! one returns it to the system.
//!
//! Many small blocks freed together (a tokenizer's state for megabytes of
//! text) stay with the process too, spread over the heaps of the threads
//! that made them: [`give_back`] returns their pages after such a burst.

use crate::limits;

/// Applies the settings above. Harmless to call more than once; a no-op
/// where the C library is not glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let threshold =
            libc::c_int::try_from(limits::MALLOC_MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes the allocator's parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        }
    }
}

/// Whether a trim is running: one at a time is enough.
static TRIMMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Returns the free pages of every heap to the system (glibc's
/// `malloc_trim`), after work that allocated and freed many small blocks:
/// 32 costly texts tokenized for the real model left the service 513 MB
/// above where it started without it. Costs milliseconds (it walks every
/// heap); a call while another trims returns at once. A no-op where the C
/// library is not glibc.
pub fn give_back() {
    use std::sync::atomic::Ordering;
    if TRIMMING.swap(true, Ordering::AcqRel) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; it takes the heaps' locks.
    unsafe {
        libc::malloc_trim(0);
    }
    TRIMMING.store(false, Ordering::Release);
}
