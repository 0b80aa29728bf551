//! The index on disk: one SQLite database (WAL) holding files, chunks,
//! vectors and the queue of files waiting to be indexed.
//!
//! # Invariants
//! - A file's chunks, its row and its leaving the queue are written in one
//!   transaction ([`Store::commit_file`]): after a crash a file is either
//!   indexed whole or still queued, never half-indexed nor indexed twice.
//! - The queue is in the database, so a killed host resumes it.
//! - The index records the model that made its vectors (id and dimension);
//!   opening it for another model is refused ([`StoreError::ModelMismatch`])
//!   rather than mixing vectors of two models.
//! - Vectors are stored as little-endian f32 blobs of exactly `dimension`
//!   values; a blob of another length is reported as corruption, never read
//!   past.

//!
//! # Layout
//! - this file: the types, opening the database, and reading it;
//! - `schema`: the schema version and its migrations;
//! - `queue`: the queue and the writes that take files off it;
//! - `roots`: the indexed roots;
//! - `fts`: the keyword search.

mod fts;
mod queue;
mod roots;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

/// The database's file name inside the index directory.
pub const DB_FILE: &str = "index.sqlite";

pub use fts::{STOPWORDS, fts_query};
use schema::SCHEMA_VERSION;

use crate::limits::{self, INDEX_BUSY_TIMEOUT as BUSY_TIMEOUT};

/// Errors of the index store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the index directory `{dir}`: {source}")]
    /// The index directory cannot be created.
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("index database `{path}`: {source}")]
    /// SQLite failed.
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the index at `{dir}` was built with model `{stored}` ({stored_dimension} dimensions), but the embedder serves `{current}` ({current_dimension} dimensions): re-index into another directory (--db) or delete `{dir}`"
    )]
    /// The index was built with another model: re-index.
    ModelMismatch {
        dir: PathBuf,
        stored: String,
        stored_dimension: u32,
        current: String,
        current_dimension: u32,
    },
    #[error(
        "the index at `{dir}` has schema version {found}; this embedhost reads version {SCHEMA_VERSION}"
    )]
    /// The database is of a schema version this build does not know.
    Schema { dir: PathBuf, found: i64 },
    #[error("no index at `{dir}` (run `embedhost index PATH` first)")]
    /// There is no index in the directory.
    Missing { dir: PathBuf },
    #[error(
        "index database `{path}`: chunk {chunk} has a vector of {bytes} bytes, expected {expected}"
    )]
    /// A stored vector is not of the index's dimension.
    Corrupt {
        path: PathBuf,
        chunk: i64,
        bytes: usize,
        expected: usize,
    },
}

/// What the index remembers of a file, to tell whether it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// A stored file's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    /// Size and modification time when queued.
    pub meta: FileMeta,
    /// Hex sha256 of the contents.
    pub hash: String,
    /// Whether the embedder failed it in fewer than
    /// [`limits::MAX_EMBED_ATTEMPTS`] runs in a row: the next `index` run
    /// tries it again even if it did not change.
    pub retry: bool,
}

/// A file the index holds no chunks of, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SkippedFile {
    /// Its path.
    pub path: PathBuf,
    /// The reason's label (`binary`, `embed_failed`, ...).
    pub reason: String,
    /// The reason in words.
    pub detail: String,
    /// For `embed_failed`: the runs in a row the embedder failed it.
    pub attempts: u32,
}

/// A chunk ready to be stored.
#[derive(Clone, Debug)]
pub struct NewChunk<'a> {
    /// The chunk's text.
    pub text: &'a str,
    /// First line (1-based).
    pub start_line: u32,
    /// Last line (inclusive).
    pub end_line: u32,
    /// Its vector, of the index's dimension.
    pub vector: &'a [f32],
}

/// A stored chunk, as search shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkRow {
    /// The chunk's row id.
    pub id: i64,
    /// The file it is from.
    pub path: PathBuf,
    /// First line (1-based).
    pub start_line: u32,
    /// Last line (inclusive).
    pub end_line: u32,
    /// The chunk's text.
    pub text: String,
}

/// Counts of the index.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Files indexed (with at least zero chunks: an empty file is indexed).
    pub indexed: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Files waiting to be indexed.
    pub queued: u64,
    /// Files not indexed, by reason (`binary`, `too_large`, ...).
    pub skipped: BTreeMap<String, u64>,
    /// Files indexed only up to the chunk cap.
    pub cut: u64,
}

/// An indexed root and what the index holds under it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RootStats {
    /// The path `index` was given, canonical.
    pub path: PathBuf,
    /// Files indexed under it.
    pub files: u64,
    /// Their chunks.
    pub chunks: u64,
    /// Files under it not indexed (any reason).
    pub skipped: u64,
}

/// The index database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    dimension: usize,
    /// Chunks stored, once counted; every write of chunks forgets it.
    total: std::cell::Cell<Option<u64>>,
    /// Whether this connection has made its `temp.chunks_vocab` table.
    vocab: std::cell::Cell<bool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens or creates the index in `dir` for the model `model_id` of
    /// `dimension`.
    ///
    /// # Errors
    /// The directory or database cannot be opened,
    /// [`StoreError::ModelMismatch`], or [`StoreError::Schema`].
    pub fn open(dir: &Path, model_id: &str, dimension: u32) -> Result<Store, StoreError> {
        make_private(dir)
            .and_then(|()| make_private_db(dir))
            .map_err(|source| StoreError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        let path = dir.join(DB_FILE);
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // WAL: readers do not block the writer. synchronous = NORMAL: a
        // commit survives the process being killed (the WAL is written
        // before the commit returns); only a power cut may lose the last
        // commits, and never corrupts the database.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS files (
                 id INTEGER PRIMARY KEY,
                 path TEXT NOT NULL UNIQUE,
                 size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL,
                 hash TEXT NOT NULL,
                 skip_reason TEXT,
                 skip_detail TEXT,
                 cut_from INTEGER,
                 attempts INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS chunks (
                 id INTEGER PRIMARY KEY,
                 file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                 seq INTEGER NOT NULL,
                 start_line INTEGER NOT NULL,
                 end_line INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 vector BLOB NOT NULL,
                 UNIQUE (file_id, seq)
             );
             CREATE TABLE IF NOT EXISTS queue (path TEXT PRIMARY KEY, seq INTEGER NOT NULL);",
        )
        .map_err(sql)?;
        let mut store = Store {
            conn,
            path: path.clone(),
            dimension: dimension as usize,
            total: Default::default(),
            vocab: Default::default(),
        };
        store.check_model(dir, model_id, dimension)?;
        Ok(store)
    }

    /// Opens an existing index to read its counts, whatever its model,
    /// upgrading an older schema in place.
    ///
    /// # Errors
    /// [`StoreError::Missing`] if there is none, [`StoreError::Schema`] for
    /// a newer schema, or SQLite's error.
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        if !path.is_file() {
            return Err(StoreError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mut store = Store {
            conn,
            path: path.clone(),
            dimension: 0,
            total: Default::default(),
            vocab: Default::default(),
        };
        store.dimension = store
            .meta("dimension")?
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        // An older index is upgraded here too (the steps are transactions
        // that re-embed nothing), so a command that only reads it, such as
        // `stats`, sees the current schema; a newer one is refused.
        match store.meta("schema")?.map(|v| v.parse::<i64>()) {
            Some(Ok(SCHEMA_VERSION)) | None => {}
            Some(Ok(old)) if old > 0 && old < SCHEMA_VERSION => store.migrate(old)?,
            Some(found) => {
                return Err(StoreError::Schema {
                    dir: dir.to_path_buf(),
                    found: found.unwrap_or(-1),
                });
            }
        }
        Ok(store)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// A value of the `meta` table.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.sql())
    }

    /// What the index knows of the file at `path`.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn file(&self, path: &Path) -> Result<Option<StoredFile>, StoreError> {
        self.conn
            .query_row(
                "SELECT size, mtime_ns, hash,
                        skip_reason IS 'embed_failed' AND attempts < ?2
                 FROM files WHERE path = ?1",
                params![path_text(path), limits::MAX_EMBED_ATTEMPTS],
                |r| {
                    Ok(StoredFile {
                        meta: FileMeta {
                            size: r.get::<_, i64>(0)? as u64,
                            mtime_ns: r.get(1)?,
                        },
                        hash: r.get(2)?,
                        retry: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql())
    }

    /// Every indexed or skipped file's path under `root` (itself included).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn files_under(&self, root: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let (root, prefix) = under(&path_text(root));
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT path FROM files WHERE {UNDER}"))
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![root, prefix], |r| r.get::<_, String>(0))
            .map_err(self.sql())?;
        rows.map(|r| r.map(PathBuf::from))
            .collect::<Result<_, _>>()
            .map_err(self.sql())
    }

    /// Every chunk's id and vector, for the in-memory search index.
    ///
    /// # Errors
    /// SQLite's error, or [`StoreError::Corrupt`] for a vector of the wrong
    /// length.
    pub fn vectors(&self) -> Result<(Vec<i64>, Vec<f32>), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, vector FROM chunks ORDER BY id")
            .map_err(self.sql())?;
        let mut rows = stmt.query([]).map_err(self.sql())?;
        let (mut ids, mut data) = (Vec::new(), Vec::new());
        let expected = self.dimension * 4;
        while let Some(row) = rows.next().map_err(self.sql())? {
            let id: i64 = row.get(0).map_err(self.sql())?;
            let blob = row.get_ref(1).map_err(self.sql())?;
            let bytes = blob.as_blob().map_err(|e| self.sql()(e.into()))?;
            if bytes.len() != expected {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    chunk: id,
                    bytes: bytes.len(),
                    expected,
                });
            }
            ids.push(id);
            data.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok((ids, data))
    }

    /// The chunks with `ids`, in that order (ids not found are left out).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn chunks(&self, ids: &[i64]) -> Result<Vec<ChunkRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT chunks.id, files.path, start_line, end_line, text
                 FROM chunks JOIN files ON files.id = chunks.file_id WHERE chunks.id = ?1",
            )
            .map_err(self.sql())?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = stmt
                .query_row([id], |r| {
                    Ok(ChunkRow {
                        id: r.get(0)?,
                        path: PathBuf::from(r.get::<_, String>(1)?),
                        start_line: r.get(2)?,
                        end_line: r.get(3)?,
                        text: r.get(4)?,
                    })
                })
                .optional()
                .map_err(self.sql())?;
            out.extend(row);
        }
        Ok(out)
    }

    /// The index's counts.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let count = |sql: &str| -> Result<u64, StoreError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(self.sql())
        };
        let mut stats = StoreStats {
            indexed: count("SELECT COUNT(*) FROM files WHERE skip_reason IS NULL")?,
            chunks: count("SELECT COUNT(*) FROM chunks")?,
            queued: count("SELECT COUNT(*) FROM queue")?,
            skipped: BTreeMap::new(),
            cut: count("SELECT COUNT(*) FROM files WHERE cut_from IS NOT NULL")?,
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT skip_reason, COUNT(*) FROM files WHERE skip_reason IS NOT NULL GROUP BY skip_reason",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.sql())?;
        for row in rows {
            let (reason, n) = row.map_err(self.sql())?;
            stats.skipped.insert(reason, n as u64);
        }
        Ok(stats)
    }

    /// Files indexed only up to the chunk cap: each path with the chunks
    /// kept and the chunks it would have made, for `stats`.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn cut(&self) -> Result<Vec<(PathBuf, u64, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, (SELECT COUNT(*) FROM chunks WHERE file_id = files.id), cut_from
                 FROM files WHERE cut_from IS NOT NULL ORDER BY path",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    PathBuf::from(r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Skipped files with their reason and detail, for `stats`.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn skipped(&self) -> Result<Vec<SkippedFile>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT path, skip_reason, COALESCE(skip_detail, ''), attempts FROM files WHERE skip_reason IS NOT NULL ORDER BY path")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SkippedFile {
                    path: PathBuf::from(r.get::<_, String>(0)?),
                    reason: r.get(1)?,
                    detail: r.get(2)?,
                    attempts: r.get(3)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }
}

/// Creates the index directory if needed and makes it private to the
/// owner, whatever the umask: a directory made here is 0700; one that was
/// there (an index made by an older embedhost, 0755) is narrowed to 0700
/// when it is this user's and holds nothing but the index's files, and
/// otherwise left as it is, with a warning (`--db` may name a shared or a
/// home folder).
///
/// # Errors
/// The directory cannot be created, or its mode cannot be set.
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o077 == 0 {
        return Ok(());
    }
    // SAFETY: geteuid(2) cannot fail.
    let mine = meta.uid() == unsafe { libc::geteuid() };
    let only_ours = std::fs::read_dir(dir)?.flatten().all(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(DB_FILE) || n == "serve")
    });
    if mine && only_ours {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    } else {
        tracing::warn!(dir = %dir.display(), "the index folder is open to other users and holds other files; its mode is left as it is (the database files are 0600)");
        Ok(())
    }
}

/// Creates the database file 0600 before SQLite opens it (SQLite gives its
/// WAL and shared-memory files the database's mode), and narrows those of
/// an older index to 0600.
///
/// # Errors
/// A file cannot be created or its mode set.
fn make_private_db(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(DB_FILE))?;
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.join(format!("{DB_FILE}{suffix}"));
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// An SQL condition on a row's `path`: it is the root `?1`, or inside it
/// (its text starts with `?2`, the root and a slash: see [`under`]), so
/// `/a/b` is not taken for a file of `/a/bc`.
const UNDER: &str = "(path = ?1 OR substr(path, 1, length(?2)) = ?2)";

/// The parameters of [`UNDER`] for `root`: its text, and its text with one
/// trailing slash.
fn under(root: &str) -> (String, String) {
    (root.to_string(), format!("{}/", root.trim_end_matches('/')))
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
#[cfg(test)]
#[path = "../store_tests.rs"]
mod tests;
