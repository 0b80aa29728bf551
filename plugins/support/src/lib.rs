//! Helpers shared by the plugins in this workspace.

use std::sync::{Mutex, MutexGuard};

/// The WebAssembly page size.
const PAGE: u64 = 65_536;

/// The instance's linear memory, in bytes: what `health` reports, so the
/// host can recycle an instance that grows.
pub fn linear_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * PAGE
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = PAGE;
        0
    }
}

/// Locks `m`, recovering it if poisoned. A poisoned lock only means an
/// earlier call trapped mid-way, which the host answers by discarding the
/// instance; recovering the guard avoids a second trap on the way.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
