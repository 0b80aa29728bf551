//! The precompiled-artifact cache.
//!
//! Compiling a component takes seconds; loading a precompiled one takes
//! milliseconds. An artifact is stored under a key made of the plugin's
//! sha256 and wasmtime's precompile compatibility hash (which covers the
//! wasmtime version and every setting that changes compiled code), so a
//! changed plugin or a changed engine never loads a stale artifact.
//!
//! # Invariants
//! - Entries are written atomically (temporary file, fsync, rename), so a
//!   crash mid-write leaves no entry rather than a torn one.
//! - An entry is trusted only if its own sha256 matches the digest stored
//!   beside it when it was written: mapping an artifact runs its machine code,
//!   so a corrupt or tampered one is discarded and recompiled, never loaded.
//! - The cache never holds more than its budget
//!   ([`crate::limits::DEFAULT_CACHE_MAX_BYTES`], `[cache] max_mb`): after
//!   each write the least recently used entries (by modification time,
//!   refreshed on every hit) are removed until it fits, and an entry larger
//!   than the whole budget is not written at all. Snapshots are as large as
//!   a loaded model, and one is made per plugin, model and setting, so
//!   without a budget the cache grows with every change.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A directory of precompiled components.
#[derive(Clone, Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ArtifactCache {
    /// A cache in `dir` (created on first write), within the default budget.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ArtifactCache {
            dir: dir.into(),
            max_bytes: crate::limits::DEFAULT_CACHE_MAX_BYTES,
        }
    }

    /// The same cache within a budget of `max_bytes`.
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The cache's budget in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes the cache's entries take now.
    pub fn size(&self) -> u64 {
        self.entries().iter().map(|e| e.bytes).sum()
    }

    /// Every entry: its artifact, size (artifact and digest) and last use.
    fn entries(&self) -> Vec<Entry> {
        let Ok(listing) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for item in listing.flatten() {
            let path = item.path();
            if path.extension().and_then(|e| e.to_str()) != Some("cwasm") {
                continue;
            }
            let Ok(meta) = item.metadata() else { continue };
            let digest = path.with_extension("sha256");
            let digest_bytes = std::fs::metadata(&digest).map_or(0, |m| m.len());
            entries.push(Entry {
                used: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                bytes: meta.len() + digest_bytes,
                artifact: path,
                digest,
            });
        }
        entries
    }

    /// Removes the least recently used entries, other than `keep`, until
    /// the cache fits its budget.
    fn evict(&self, keep: &Path) {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by_key(|e| e.used);
        for entry in entries {
            if total <= self.max_bytes {
                break;
            }
            if entry.artifact == keep {
                continue;
            }
            tracing::info!(artifact = %entry.artifact.display(), bytes = entry.bytes, budget = self.max_bytes, "evicting the least recently used cache entry");
            let _ = std::fs::remove_file(&entry.artifact);
            let _ = std::fs::remove_file(&entry.digest);
            total = total.saturating_sub(entry.bytes);
        }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key(&self, engine: &Engine, plugin_sha256: &str) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{plugin_sha256}-{:016x}", hasher.finish())
    }

    /// The compiled component for `bytes`, from the cache when a verified
    /// entry exists, otherwise compiled and stored. Cache failures are logged
    /// and never fatal: the component is then compiled in memory.
    ///
    /// # Errors
    /// The compilation error, if `bytes` is not a valid component.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        self.load_or_make(engine, &sha256_hex(bytes), || Ok(bytes.to_vec()))
    }

    /// The compiled component stored under `id` (a hex digest of whatever
    /// determines the component), or the one `make` returns, compiled and
    /// stored under `id`. `make` runs only on a miss: it is how a
    /// pre-initialized snapshot, which takes seconds to make, is made once.
    ///
    /// # Errors
    /// `make`'s error, or the compilation error of what it made.
    pub fn load_or_make(
        &self,
        engine: &Engine,
        id: &str,
        make: impl FnOnce() -> wasmtime::Result<Vec<u8>>,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let key = self.key(engine, id);
        let artifact = self.dir.join(format!("{key}.cwasm"));
        let digest = self.dir.join(format!("{key}.sha256"));
        if artifact.exists() {
            match self.load_verified(engine, &artifact, &digest) {
                Ok(component) => {
                    // Refresh its last use, which eviction goes by.
                    if let Ok(file) = std::fs::File::options().append(true).open(&artifact) {
                        let _ = file.set_modified(std::time::SystemTime::now());
                    }
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(reason) => {
                    tracing::warn!(artifact = %artifact.display(), %reason, "discarding a cache entry that does not verify");
                    let _ = std::fs::remove_file(&artifact);
                    let _ = std::fs::remove_file(&digest);
                }
            }
        }
        let serialized = engine.precompile_component(&make()?)?;
        // SAFETY: `serialized` was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &serialized)? };
        if let Err(e) = self.store(&artifact, &digest, &serialized) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the artifact cache; continuing without it");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn load_verified(
        &self,
        engine: &Engine,
        artifact: &Path,
        digest: &Path,
    ) -> Result<Component, String> {
        let expected = std::fs::read_to_string(digest).map_err(|e| format!("no digest: {e}"))?;
        let bytes = std::fs::read(artifact).map_err(|e| format!("unreadable: {e}"))?;
        if sha256_hex(&bytes) != expected.trim() {
            return Err("its sha256 does not match the digest written with it".into());
        }
        drop(bytes);
        // SAFETY: the artifact was written by `store` from this engine's
        // `precompile_component` (the key includes the engine's compatibility
        // hash), and its digest matches what was written, so it is unaltered;
        // wasmtime checks the compatibility again on load.
        unsafe { Component::deserialize_file(engine, artifact) }
            .map_err(|e| format!("wasmtime refused it: {e}"))
    }

    fn store(&self, artifact: &Path, digest: &Path, serialized: &[u8]) -> std::io::Result<()> {
        if serialized.len() as u64 > self.max_bytes {
            tracing::warn!(
                bytes = serialized.len(),
                budget = self.max_bytes,
                "not caching an artifact larger than the whole cache budget"
            );
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        write_atomic(digest, sha256_hex(serialized).as_bytes())?;
        write_atomic(artifact, serialized)?;
        self.evict(artifact);
        Ok(())
    }
}

struct Entry {
    artifact: PathBuf,
    digest: PathBuf,
    bytes: u64,
    used: std::time::SystemTime,
}

/// Whether a load hit the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Found in the cache and mapped.
    Hit,
    /// Compiled now (and stored).
    Compiled,
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced, then renamed over `path`.
///
/// # Errors
/// Any I/O error; `path` is then untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        fastrand::u64(..)
    ));
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
