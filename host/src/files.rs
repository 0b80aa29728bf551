//! Small file and hashing utilities shared across the host (the model
//! store, the artifact cache, snapshots, the worker's contents hashes).
//!
//! Invariant: [`write_atomic`] never leaves a partial file under the final
//! name: the bytes are written and synced under a temporary name in the
//! same directory, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A temporary name beside `path`.
pub(crate) fn temporary(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        fastrand::u64(..)
    ))
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced, then renamed over `path`.
///
/// # Errors
/// Any I/O error; `path` is then untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
