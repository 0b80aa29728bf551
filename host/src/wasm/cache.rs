//! The precompiled-artifact cache.
//!
//! Compiling a component takes seconds; loading a precompiled one takes
//! milliseconds. An artifact is stored under a key made of the plugin's
//! sha256 and wasmtime's precompile compatibility hash (which covers the
//! wasmtime version and every setting that changes compiled code), so a
//! changed plugin or a changed engine never loads a stale artifact.
//!
//! # Trust
//! Mapping an artifact runs its machine code in the host, so the cache
//! trusts only what this host wrote:
//! - Each entry carries an HMAC-SHA256 under a per-cache secret key
//!   ([`KEY_FILE`], 32 random bytes, created 0600 beside the entries) over
//!   the entry's key and its bytes. An entry copied under another key,
//!   swapped, patched or written by anyone without the secret fails the
//!   check and is discarded and rebuilt, never mapped.
//! - The bytes checked are the bytes loaded: the file is read into memory
//!   once, checked, and deserialized from that copy.
//! - The directory is 0700 and every file in it 0600, whatever the umask;
//!   a directory that another user can write (or that another user owns)
//!   is refused with one line ([`CacheError::Unsafe`]), since whoever can
//!   write it could replace the key.
//! - What it does not defend against: the same user, or root, who can
//!   read the key. They can run code as the host anyway.
//!
//! # Invariants
//! - Entries are written atomically (temporary file, fsync, rename), so a
//!   crash mid-write leaves no entry rather than a torn one.
//! - The cache never holds more than its budget
//!   ([`crate::limits::DEFAULT_CACHE_MAX_BYTES`], `[cache] max_mb`): after
//!   each write the least recently used entries (by modification time,
//!   refreshed on every hit) are removed until it fits, and an entry larger
//!   than the whole budget is not written at all. Snapshots are as large as
//!   a loaded model, and one is made per plugin, model and setting, so
//!   without a budget the cache grows with every change.

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};

pub(crate) use crate::files::{sha256_hex, temporary};
use sha2::Sha256;
use wasmtime::Engine;
use wasmtime::component::Component;

/// A directory of precompiled components.
#[derive(Clone, Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
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
            let digest = path.with_extension(MAC_EXTENSION);
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
        engine: &super::WasmEngine,
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
        wasm: &super::WasmEngine,
        id: &str,
        make: impl FnOnce() -> wasmtime::Result<Vec<u8>>,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let engine = wasm.engine();
        let key = self.key(engine, id);
        let secret = self.prepare()?;
        let artifact = self.dir.join(format!("{key}.cwasm"));
        let digest = self.dir.join(format!("{key}.{MAC_EXTENSION}"));
        if artifact.exists() {
            match self.load_verified(engine, &secret, &key, &artifact, &digest) {
                Ok(component) => {
                    // Refresh its last use, which eviction goes by.
                    if let Ok(file) = std::fs::File::options().append(true).open(&artifact) {
                        let _ = file.set_modified(std::time::SystemTime::now());
                    }
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(reason) => {
                    // An entry with no MAC beside it was made by an older
                    // embedhost (or its write was cut short): rebuilt
                    // quietly. One whose MAC does not verify was changed.
                    if digest.exists() {
                        tracing::warn!(artifact = %artifact.display(), %reason, "discarding a cache entry that does not verify");
                    } else {
                        tracing::info!(artifact = %artifact.display(), %reason, "rebuilding a cache entry that has no MAC");
                    }
                    let _ = std::fs::remove_file(&artifact);
                    let _ = std::fs::remove_file(&digest);
                    // The digest an older embedhost kept beside its entries.
                    let _ = std::fs::remove_file(artifact.with_extension("sha256"));
                }
            }
        }
        let serialized = wasm.precompile(&make()?)?;
        // SAFETY: `serialized` was produced just now by this engine (or its
        // compiler child, with the same settings; wasmtime checks them).
        let component = unsafe { Component::deserialize(engine, &serialized)? };
        if let Err(e) = self.store(&secret, &key, &artifact, &digest, &serialized) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the artifact cache; continuing without it");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn load_verified(
        &self,
        engine: &Engine,
        secret: &Secret,
        key: &str,
        artifact: &Path,
        digest: &Path,
    ) -> Result<Component, EntryRefused> {
        let expected = std::fs::read_to_string(digest).map_err(EntryRefused::NoMac)?;
        let expected = decode_hex(expected.trim()).ok_or(EntryRefused::MacNotHex)?;
        // Read once: the bytes checked are the bytes deserialized, whatever
        // happens to the file afterwards.
        let mut bytes = Vec::new();
        open_private(artifact)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(EntryRefused::Unreadable)?;
        entry_mac(secret, key, &bytes)
            .verify_slice(&expected)
            .map_err(|_| EntryRefused::MacMismatch)?;
        // SAFETY: the bytes carry this host's MAC over this key, so they are
        // what `store` wrote from this engine's `precompile_component` (the
        // key includes the engine's compatibility hash); wasmtime checks
        // the compatibility again on load.
        unsafe { Component::deserialize(engine, &bytes) }.map_err(EntryRefused::Wasmtime)
    }

    fn store(
        &self,
        secret: &Secret,
        key: &str,
        artifact: &Path,
        digest: &Path,
        serialized: &[u8],
    ) -> std::io::Result<()> {
        if serialized.len() as u64 > self.max_bytes {
            tracing::warn!(
                bytes = serialized.len(),
                budget = self.max_bytes,
                "not caching an artifact larger than the whole cache budget"
            );
            return Ok(());
        }
        let mac = hex(&entry_mac(secret, key, serialized).finalize().into_bytes());
        write_private(digest, mac.as_bytes())?;
        write_private(artifact, serialized)?;
        self.evict(artifact);
        Ok(())
    }

    /// Makes the directory if it is missing (0700) and checks it, and
    /// returns the cache's secret key, made on first use.
    ///
    /// # Errors
    /// [`CacheError::Unsafe`] for a directory another user owns or can
    /// write, or a key file another user owns; [`CacheError::Io`].
    pub fn prepare(&self) -> Result<Secret, CacheError> {
        let dir = &self.dir;
        let io = |source| CacheError::Io {
            dir: dir.clone(),
            source,
        };
        let unsafe_dir = |reason: String| CacheError::Unsafe {
            dir: dir.clone(),
            reason,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let meta = std::fs::metadata(dir).map_err(io)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(unsafe_dir(format!(
                "it belongs to user {}, not to this user ({me})",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "other users can write it (mode {mode:03o})"
            )));
        }
        if mode != 0o700 {
            // Ours, and nobody else could write it: narrow it (a cache made
            // before this rule was 0755), and its entries with it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            // Only the cache's own regular files, never a folder or a link
            // (a cache pointed at a shared folder leaves the rest alone).
            for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
                let own = entry.file_name().to_str().is_some_and(is_own_file);
                if own && entry.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::set_permissions(
                        entry.path(),
                        std::fs::Permissions::from_mode(0o600),
                    );
                }
            }
        }
        self.secret().map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => unsafe_dir(format!("its key file: {e}")),
            _ => io(e),
        })
    }

    /// The secret in [`KEY_FILE`], made (32 bytes from the system's random
    /// source, 0600) if there is none, or if the one there could have been
    /// read by another user.
    fn secret(&self) -> std::io::Result<Secret> {
        let path = self.dir.join(KEY_FILE);
        if let Ok(mut file) = open_private(&path) {
            let meta = file.metadata()?;
            // SAFETY: as above.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("`{}` belongs to user {}", path.display(), meta.uid()),
                ));
            }
            let mut secret = [0u8; 32];
            if meta.mode() & 0o077 == 0 && meta.len() == 32 && file.read_exact(&mut secret).is_ok()
            {
                return Ok(Secret(secret));
            }
            tracing::warn!(key = %path.display(), "replacing an artifact cache key others could read; every entry will be rebuilt");
            std::fs::remove_file(&path)?;
        }
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
        let tmp = temporary(&path);
        write_new_private(&tmp, &secret)?;
        // A hard link never replaces: of two hosts making a key at once,
        // one wins and the other reads the winner's.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Secret(secret)),
            // Another host made it meanwhile: read theirs, once (a key that
            // exists but cannot be read is an error, not a loop).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut file = open_private(&path)?;
                let mut secret = [0u8; 32];
                file.read_exact(&mut secret)?;
                Ok(Secret(secret))
            }
            Err(e) => Err(e),
        }
    }
}

/// The file in the cache directory that holds its secret key.
pub const KEY_FILE: &str = ".embedhost-cache-key";

/// The extension of an entry's MAC file.
const MAC_EXTENSION: &str = "mac";

/// What the MAC of every entry starts with (changed if what it covers
/// changes).
const MAC_CONTEXT: &[u8] = b"embedhost-artifact-mac-1";

/// A cache's secret key.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The MAC over an entry: its key (so an entry copied under another key
/// fails) and its bytes.
fn entry_mac(secret: &Secret, key: &str, bytes: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(&secret.0)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(MAC_CONTEXT);
    mac.update(&(key.len() as u64).to_le_bytes());
    mac.update(key.as_bytes());
    mac.update(&(bytes.len() as u64).to_le_bytes());
    mac.update(bytes);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why the artifact cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The directory (or its key) could be written by someone else.
    #[error(
        "the artifact cache `{dir}` is refused: {reason}; use a directory of your own (mode 0700) in `[cache] dir` or EMBEDHOST_CACHE_DIR"
    )]
    Unsafe {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// It cannot be made or read.
    #[error("cannot use the artifact cache `{dir}`: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a cache entry is not used (it is then made again).
#[derive(Debug, thiserror::Error)]
enum EntryRefused {
    /// Its MAC file cannot be read.
    #[error("no MAC: {0}")]
    NoMac(#[source] std::io::Error),
    /// Its MAC file is not hex.
    #[error("its MAC file is not hex")]
    MacNotHex,
    /// The entry cannot be read.
    #[error("unreadable: {0}")]
    Unreadable(#[source] std::io::Error),
    /// Its MAC does not verify.
    #[error("its MAC does not match: not written by this host for this key")]
    MacMismatch,
    /// wasmtime would not load it.
    #[error("wasmtime refused it: {0}")]
    Wasmtime(#[source] wasmtime::Error),
}

/// Opens `path` for reading, not following a symbolic link.
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    // A FIFO or a device named as an entry is never read (nor waited on).
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("`{}` is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Whether `name` is one of the files the cache writes: entries, their
/// MACs, the key, temporaries, and an older embedhost's digests.
fn is_own_file(name: &str) -> bool {
    name == KEY_FILE
        || name.contains(".tmp")
        || [".cwasm", ".sha256", &format!(".{MAC_EXTENSION}")]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// Creates `path` (which must not exist) 0600 with `bytes`, fsynced.
fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The mode above is filtered by the umask; 0600 needs no bit a umask
    // could leave, but set it again in case the umask cleared the owner's.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// [`write_atomic`], with the file 0600 whatever the umask.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let result = write_new_private(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
