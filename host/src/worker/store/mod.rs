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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

/// The database's file name inside the index directory.
pub const DB_FILE: &str = "index.sqlite";

/// Schema version written in `meta`; a database of a newer version is
/// refused with a message rather than misread, an older one is upgraded in
/// place ([`MIGRATIONS`]).
///
/// 1: files, chunks (with vectors), queue, meta.
/// 2: adds `chunks_fts`, the keyword index (FTS5, BM25) of the chunks'
///    text, kept in step with `chunks` by triggers, so a file's keywords are
///    written in the same transaction as its chunks.
/// 3: adds `roots` (the paths `index` was given, for `stats` and
///    `forget`) and `files.cut_from` (the chunks a file would have made
///    when it made more than the cap, `[index] max_file_chunks`).
/// 4: adds `files.attempts`: how many `index` runs in a row the embedder
///    failed a file (`embed_failed`); such a file is tried again by each
///    run until [`limits::MAX_EMBED_ATTEMPTS`].
const SCHEMA_VERSION: i64 = 4;

/// The indexed roots: every path `index` was given, canonical. A file
/// belongs to the roots that are its ancestors (or itself).
const ROOTS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY, added_ns INTEGER NOT NULL);";

/// The keyword index over `chunks.text` and the triggers that keep it in
/// step. `unicode61` with `_` as a token character keeps `snake_case`
/// identifiers whole; `a::b`, `a.b` and `a-b` become adjacent tokens, which
/// a phrase query matches as written.
const FTS_SCHEMA: &str = "
    CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
        text, content = 'chunks', content_rowid = 'id',
        tokenize = \"unicode61 tokenchars '_'\"
    );
    CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    CREATE TRIGGER IF NOT EXISTS chunks_fts_update AFTER UPDATE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    END;";

/// Upgrades from each older schema version, each step in one transaction
/// with the version bump: an index is at one version or the next, never
/// between. Nothing is re-embedded: vectors are left as they are.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        // After [`FTS_SCHEMA`]: builds the keyword index from the chunks
        // already stored.
        "INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild');",
    ),
    (
        2,
        // After [`ROOTS_SCHEMA`]. The roots an older index was given were
        // not recorded: its files show as under no root until `index`
        // names them again. No file was cut then.
        "ALTER TABLE files ADD COLUMN cut_from INTEGER;",
    ),
    (
        3,
        // A file that failed before attempts were counted has had one.
        "ALTER TABLE files ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
         UPDATE files SET attempts = 1 WHERE skip_reason = 'embed_failed';",
    ),
];

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

    fn check_model(
        &mut self,
        dir: &Path,
        model_id: &str,
        dimension: u32,
    ) -> Result<(), StoreError> {
        let schema = self.meta("schema")?;
        match schema.as_deref().map(str::parse::<i64>) {
            None => {
                let tx = self
                    .conn
                    .transaction()
                    .map_err(|source| StoreError::Sqlite {
                        path: self.path.clone(),
                        source,
                    })?;
                tx.execute_batch(FTS_SCHEMA)
                    .and_then(|()| tx.execute_batch(ROOTS_SCHEMA))
                    .map_err(|source| StoreError::Sqlite {
                        path: self.path.clone(),
                        source,
                    })?;
                for (key, value) in [
                    ("schema", SCHEMA_VERSION.to_string()),
                    ("model_id", model_id.to_string()),
                    ("dimension", dimension.to_string()),
                ] {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                        params![key, value],
                    )
                    .map_err(|source| StoreError::Sqlite {
                        path: self.path.clone(),
                        source,
                    })?;
                }
                tx.commit().map_err(self.sql())?;
                return Ok(());
            }
            Some(Ok(SCHEMA_VERSION)) => {}
            Some(Ok(old)) if old > 0 && old < SCHEMA_VERSION => self.migrate(old)?,
            Some(found) => {
                return Err(StoreError::Schema {
                    dir: dir.to_path_buf(),
                    found: found.unwrap_or(-1),
                });
            }
        }
        let stored = self.meta("model_id")?.unwrap_or_default();
        let stored_dimension = self
            .meta("dimension")?
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        if stored != model_id || stored_dimension != dimension {
            return Err(StoreError::ModelMismatch {
                dir: dir.to_path_buf(),
                stored,
                stored_dimension,
                current: model_id.to_string(),
                current_dimension: dimension,
            });
        }
        Ok(())
    }

    /// Upgrades the schema from version `from`, one step at a time.
    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        for (version, step) in MIGRATIONS.iter().filter(|(v, _)| *v >= from) {
            let tx = self.conn.transaction().map_err(sql)?;
            match version {
                1 => tx.execute_batch(FTS_SCHEMA).map_err(sql)?,
                2 => tx.execute_batch(ROOTS_SCHEMA).map_err(sql)?,
                _ => {}
            }
            tx.execute_batch(step).map_err(sql)?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                [(version + 1).to_string()],
            )
            .map_err(sql)?;
            tx.commit().map_err(sql)?;
            tracing::info!(from = version, to = version + 1, "index schema upgraded");
        }
        Ok(())
    }

    /// The chunks whose text best matches `query`'s words (BM25), best
    /// first, with their scores (higher is better), at most `limit`.
    ///
    /// Words in a large share of the chunks carry almost no weight in BM25,
    /// yet scoring every chunk they occur in is nearly all of a query's
    /// time. So a word in more than [`limits::KEYWORD_COMMON_SHARE`] of the
    /// chunks is left out when a rarer word is there to rank by; and when
    /// `fused` (the keyword half of a hybrid search, where meaning ranks
    /// too), a word in more than [`limits::KEYWORD_WEIGHTLESS_SHARE`],
    /// which BM25 weighs at zero, is left out even if nothing is left.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn keyword(
        &self,
        query: &str,
        limit: usize,
        fused: bool,
    ) -> Result<Vec<(i64, f32)>, StoreError> {
        let parts = query_parts(query);
        let mut parts = content(&parts);
        if parts.len() > 1 || fused {
            let total = self.total()? as f64;
            // Each part's share of the chunks; `None` for a phrase, which
            // is rarer than its words and always kept.
            let mut shares = Vec::with_capacity(parts.len());
            for part in &parts {
                shares.push(match &part.token {
                    Some(token) => Some(self.documents_with(token)? as f64 / total.max(1.0)),
                    None => None,
                });
            }
            // Common words go only for a rarer word that occurs: one that
            // is in no chunk ranks nothing.
            let rarer_occurs = shares
                .iter()
                .any(|s| s.is_none_or(|s| s > 0.0 && s <= limits::KEYWORD_COMMON_SHARE));
            let under = |share: f64| -> Vec<&Part> {
                parts
                    .iter()
                    .zip(&shares)
                    .filter(|(_, s)| s.is_none_or(|s| s <= share))
                    .map(|(p, _)| *p)
                    .collect()
            };
            if rarer_occurs {
                parts = under(limits::KEYWORD_COMMON_SHARE);
            } else if fused {
                parts = under(limits::KEYWORD_WEIGHTLESS_SHARE);
            }
        }
        let Some(expression) = expression(&parts) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?1
                 ORDER BY bm25(chunks_fts) LIMIT ?2",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![expression, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, -(r.get::<_, f64>(1)? as f32)))
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Chunks stored (counted once, until the next write).
    fn total(&self) -> Result<u64, StoreError> {
        if let Some(n) = self.total.get() {
            return Ok(n);
        }
        let n = self
            .conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get::<_, i64>(0))
            .map_err(self.sql())? as u64;
        self.total.set(Some(n));
        Ok(n)
    }

    /// Chunks whose text holds `token` (as the keyword index folds it), by
    /// FTS5's own vocabulary: one lookup, no scan.
    fn documents_with(&self, token: &str) -> Result<u64, StoreError> {
        if !self.vocab.get() {
            // A temp table: nothing is written to the index file, and it
            // works on an index of any version that has `chunks_fts`.
            self.conn
                .execute_batch(
                    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab
                     USING fts5vocab(main, chunks_fts, row);",
                )
                .map_err(self.sql())?;
            self.vocab.set(true);
        }
        self.conn
            .prepare_cached("SELECT doc FROM temp.chunks_vocab WHERE term = ?1")
            .and_then(|mut s| s.query_row([token], |r| r.get::<_, i64>(0)).optional())
            .map(|n| n.unwrap_or(0) as u64)
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

    /// Queues `paths` (those already queued stay where they are); returns
    /// how many were newly queued.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn enqueue(&mut self, paths: &[PathBuf]) -> Result<u64, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let mut added = 0;
        {
            let next: i64 = tx
                .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM queue", [], |r| {
                    r.get(0)
                })
                .map_err(sql)?;
            let mut stmt = tx
                .prepare("INSERT OR IGNORE INTO queue (path, seq) VALUES (?1, ?2)")
                .map_err(sql)?;
            for (i, path) in paths.iter().enumerate() {
                added += stmt
                    .execute(params![path_text(path), next + i as i64])
                    .map_err(sql)? as u64;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(added)
    }

    /// Records `embedder_id` as the embedder of this index. If another one
    /// was recorded, the files skipped as `embed_failed` are queued again
    /// (the new embedder may embed them); returns how many.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn retry_failed_for(&mut self, embedder_id: &str) -> Result<u64, StoreError> {
        let recorded = self.meta("embedder")?;
        if recorded.as_deref() == Some(embedder_id) {
            return Ok(0);
        }
        let failed = self.paths("SELECT path FROM files WHERE skip_reason = 'embed_failed'")?;
        // Another embedder's failures say nothing of this one's: its runs
        // count from zero.
        self.conn
            .execute(
                "UPDATE files SET attempts = 0 WHERE skip_reason = 'embed_failed'",
                [],
            )
            .map_err(self.sql())?;
        let queued = self.enqueue(&failed)?;
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('embedder', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
                [embedder_id],
            )
            .map_err(self.sql())?;
        Ok(queued)
    }

    /// The queue, oldest first.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn queued(&self) -> Result<Vec<PathBuf>, StoreError> {
        self.paths("SELECT path FROM queue ORDER BY seq")
    }

    /// The paths a query of one text column returns.
    fn paths(&self, query: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut stmt = self.conn.prepare(query).map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.sql())?;
        rows.map(|r| r.map(PathBuf::from))
            .collect::<Result<_, _>>()
            .map_err(self.sql())
    }

    /// Records the file at `path` as indexed with `chunks` (`cut_from`: the
    /// chunks it made, if more than were kept), replacing what the index
    /// had of it, and takes it off the queue: one transaction. Returns the
    /// ids of the chunks it replaced and of the new ones. A file no longer
    /// queued (deleted or forgotten meanwhile) is not written.
    ///
    /// # Errors
    /// SQLite's error; nothing is written then.
    pub fn commit_file(
        &mut self,
        path: &Path,
        meta: &FileMeta,
        hash: &str,
        chunks: &[NewChunk<'_>],
        cut_from: Option<usize>,
    ) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.total.set(None);
        let tx = self.conn.transaction().map_err(sql)?;
        if !queued(&tx, path).map_err(sql)? {
            return Ok((Vec::new(), Vec::new()));
        }
        let old = chunk_ids(&tx, path).map_err(sql)?;
        let file_id: i64 = tx
            .query_row(
                "INSERT INTO files (path, size, mtime_ns, hash, skip_reason, skip_detail, cut_from)
                 VALUES (?1, ?2, ?3, ?4, NULL, NULL, ?5)
                 ON CONFLICT (path) DO UPDATE SET size = ?2, mtime_ns = ?3, hash = ?4,
                     skip_reason = NULL, skip_detail = NULL, cut_from = ?5, attempts = 0
                 RETURNING id",
                params![
                    path_text(path),
                    meta.size as i64,
                    meta.mtime_ns,
                    hash,
                    cut_from.map(|n| n as i64)
                ],
                |r| r.get(0),
            )
            .map_err(sql)?;
        tx.execute("DELETE FROM chunks WHERE file_id = ?1", [file_id])
            .map_err(sql)?;
        let mut new = Vec::with_capacity(chunks.len());
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO chunks (file_id, seq, start_line, end_line, text, vector)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                )
                .map_err(sql)?;
            for (seq, chunk) in chunks.iter().enumerate() {
                let id: i64 = stmt
                    .query_row(
                        params![
                            file_id,
                            seq as i64,
                            chunk.start_line,
                            chunk.end_line,
                            chunk.text,
                            vector_blob(chunk.vector)
                        ],
                        |r| r.get(0),
                    )
                    .map_err(sql)?;
                new.push(id);
            }
        }
        tx.execute("DELETE FROM queue WHERE path = ?1", [path_text(path)])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok((old, new))
    }

    /// Records the file at `path` as not indexed for `reason` (its old
    /// chunks go), and takes it off the queue. Returns the removed chunks.
    ///
    /// # Errors
    /// SQLite's error; nothing is written then.
    pub fn commit_skip(
        &mut self,
        path: &Path,
        meta: &FileMeta,
        reason: &str,
        detail: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.total.set(None);
        let tx = self.conn.transaction().map_err(sql)?;
        if !queued(&tx, path).map_err(sql)? {
            return Ok(Vec::new());
        }
        let old = chunk_ids(&tx, path).map_err(sql)?;
        tx.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, skip_reason, skip_detail, attempts)
             VALUES (?1, ?2, ?3, '', ?4, ?5, ?4 IS 'embed_failed')
             ON CONFLICT (path) DO UPDATE SET size = ?2, mtime_ns = ?3, hash = '',
                 skip_reason = ?4, skip_detail = ?5, cut_from = NULL,
                 attempts = CASE WHEN ?4 IS NOT 'embed_failed' THEN 0
                                 WHEN skip_reason IS 'embed_failed'
                                      AND size = ?2 AND mtime_ns = ?3 THEN attempts + 1
                                 ELSE 1 END",
            params![
                path_text(path),
                meta.size as i64,
                meta.mtime_ns,
                reason,
                detail
            ],
        )
        .map_err(sql)?;
        if let Some(file_id) = file_id(&tx, path).map_err(sql)? {
            tx.execute("DELETE FROM chunks WHERE file_id = ?1", [file_id])
                .map_err(sql)?;
        }
        tx.execute("DELETE FROM queue WHERE path = ?1", [path_text(path)])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(old)
    }

    /// A queued file whose contents did not change (same hash): its new
    /// size and time are recorded and it leaves the queue.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn commit_unchanged(&mut self, path: &Path, meta: &FileMeta) -> Result<(), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        if !queued(&tx, path).map_err(sql)? {
            return Ok(());
        }
        tx.execute(
            "UPDATE files SET size = ?2, mtime_ns = ?3 WHERE path = ?1",
            params![path_text(path), meta.size as i64, meta.mtime_ns],
        )
        .map_err(sql)?;
        tx.execute("DELETE FROM queue WHERE path = ?1", [path_text(path)])
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Forgets the file at `path` (deleted from disk): its row, its chunks
    /// and its place in the queue. Returns the removed chunks.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn remove(&mut self, path: &Path) -> Result<Vec<i64>, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.total.set(None);
        let tx = self.conn.transaction().map_err(sql)?;
        let old = chunk_ids(&tx, path).map_err(sql)?;
        // Chunks go with the file (ON DELETE CASCADE).
        tx.execute("DELETE FROM files WHERE path = ?1", [path_text(path)])
            .map_err(sql)?;
        tx.execute("DELETE FROM queue WHERE path = ?1", [path_text(path)])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(old)
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

    /// Records `roots` (canonical paths) as indexed roots.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn add_roots(&mut self, roots: &[PathBuf]) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        for root in roots {
            tx.execute(
                "INSERT INTO roots (path, added_ns) VALUES (?1, ?2) ON CONFLICT (path) DO NOTHING",
                params![path_text(root), now],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// The recorded roots' paths (canonical).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn root_paths(&self) -> Result<Vec<PathBuf>, StoreError> {
        self.paths("SELECT path FROM roots ORDER BY path")
    }

    /// Every indexed root with its counts, by path; then, if the index
    /// holds files under no recorded root (an index from before roots were
    /// recorded), one entry for them with an empty path.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn roots(&self) -> Result<Vec<RootStats>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT path FROM roots ORDER BY path")
            .map_err(self.sql())?;
        let paths: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        let mut out = Vec::with_capacity(paths.len() + 1);
        let count = |filter: &str,
                     params: &[&dyn rusqlite::ToSql]|
         -> Result<(u64, u64, u64), StoreError> {
            self.conn
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FILTER (WHERE skip_reason IS NULL),
                                COUNT(*) FILTER (WHERE skip_reason IS NOT NULL),
                                COALESCE(SUM((SELECT COUNT(*) FROM chunks WHERE file_id = files.id)), 0)
                         FROM files WHERE {filter}"
                    ),
                    params,
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, i64>(2)? as u64,
                        ))
                    },
                )
                .map_err(self.sql())
        };
        for path in paths {
            let (root, prefix) = under(&path);
            let (files, skipped, chunks) = count(UNDER, &[&root, &prefix])?;
            out.push(RootStats {
                path: PathBuf::from(path),
                files,
                chunks,
                skipped,
            });
        }
        let (files, skipped, chunks) = count(
            "NOT EXISTS (SELECT 1 FROM roots WHERE roots.path = files.path
                 OR substr(files.path, 1, length(roots.path) + 1) = rtrim(roots.path, '/') || '/')",
            &[],
        )?;
        if files + skipped > 0 {
            out.push(RootStats {
                path: PathBuf::new(),
                files,
                chunks,
                skipped,
            });
        }
        Ok(out)
    }

    /// Forgets the root `root` and everything under it (files, chunks,
    /// keywords, queued paths), and the roots inside it, in one
    /// transaction. `root` need not be a recorded root: any indexed folder
    /// or file can be forgotten. Returns the removed chunks and whether
    /// anything was known under `root`.
    ///
    /// # Errors
    /// SQLite's error; nothing is removed then.
    pub fn forget(&mut self, root: &Path) -> Result<(Vec<i64>, bool), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let (root, prefix) = under(&path_text(root));
        self.total.set(None);
        let tx = self.conn.transaction().map_err(sql)?;
        let ids: Vec<i64> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT chunks.id FROM chunks WHERE file_id IN
                     (SELECT id FROM files WHERE {UNDER})"
                ))
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![root, prefix], |r| r.get(0))
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        let mut known = 0;
        for table in ["files", "queue", "roots"] {
            known += tx
                .execute(
                    &format!("DELETE FROM {table} WHERE {UNDER}"),
                    params![root, prefix],
                )
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok((ids, known > 0))
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

/// Whether `path` is queued. A file is committed only while it is: one
/// that left the queue while it was being read or embedded (deleted, or
/// its root forgotten) must not come back as a stale entry.
fn queued(conn: &Connection, path: &Path) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM queue WHERE path = ?1)",
        [path_text(path)],
        |r| r.get(0),
    )
}

fn file_id(conn: &Connection, path: &Path) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT id FROM files WHERE path = ?1",
        [path_text(path)],
        |r| r.get(0),
    )
    .optional()
}

fn chunk_ids(conn: &Connection, path: &Path) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "SELECT chunks.id FROM chunks JOIN files ON files.id = chunks.file_id WHERE files.path = ?1",
    )?;
    let rows = stmt.query_map([path_text(path)], |r| r.get(0))?;
    rows.collect()
}

fn vector_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Words left out of a keyword query (unless quoted, or all there is): the
/// commonest English function words. They occur in nearly every chunk, so
/// they carry no topic, yet BM25 still rewards a chunk for them: left in,
/// "why is my plant dying" ranks any text full of "why", "is" and "my"
/// above the one about plants, and hybrid search gets worse than meaning
/// alone on questions.
pub const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "because", "been", "before", "being", "but", "by", "can", "could", "did", "do", "does",
    "doing", "for", "from", "get", "got", "had", "has", "have", "having", "he", "her", "here",
    "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "just", "keep", "keeps", "me",
    "more", "most", "my", "no", "not", "of", "on", "one", "or", "our", "out", "over", "she",
    "should", "so", "some", "than", "that", "the", "their", "them", "then", "there", "these",
    "they", "this", "those", "to", "too", "up", "us", "very", "was", "we", "were", "what", "when",
    "where", "which", "while", "who", "why", "will", "with", "would", "you", "your",
];

/// An FTS5 query for what a person typed: each word ([`STOPWORDS`] left
/// out), and each "quoted phrase", becomes a phrase of its own (so FTS5's syntax characters are
/// only ever text, and `a::b`, `a.b`, `a-b` match as written), any of which
/// may match; BM25 ranks chunks with more and rarer matches first. `None`
/// if nothing searchable is left.
pub fn fts_query(query: &str) -> Option<String> {
    expression(&content(&query_parts(query)))
}

/// One searchable part of a keyword query.
#[derive(Clone, Debug, PartialEq)]
struct Part {
    /// As FTS5 reads it: a quoted phrase.
    phrase: String,
    /// An unquoted stopword.
    stop: bool,
    /// The single token it is, lower-cased, when it is one unquoted word
    /// (its document frequency can be looked up).
    token: Option<String>,
}

/// The parts of `query`: each word, and each "quoted phrase", cleaned to
/// the characters the tokenizer keeps.
fn query_parts(query: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = query;
    while !rest.is_empty() {
        let (part, quoted, next) = match rest.find('"') {
            Some(0) => match rest[1..].find('"') {
                Some(end) => (&rest[1..=end], true, &rest[end + 2..]),
                None => (&rest[1..], true, ""),
            },
            Some(q) => (&rest[..q], false, &rest[q..]),
            None => (rest, false, ""),
        };
        let words: Vec<&str> = if quoted {
            vec![part]
        } else {
            part.split_whitespace().collect()
        };
        for word in words {
            // Only letters, digits and the characters of identifiers count;
            // the tokenizer splits on the rest anyway.
            let clean: String = word
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '_' {
                        c
                    } else {
                        ' '
                    }
                })
                .collect();
            let tokens: Vec<&str> = clean.split_whitespace().collect();
            if tokens.is_empty() {
                continue;
            }
            let lower = tokens.join(" ").to_lowercase();
            parts.push(Part {
                phrase: format!("\"{}\"", tokens.join(" ")),
                stop: !quoted && STOPWORDS.contains(&lower.as_str()),
                token: (!quoted && tokens.len() == 1).then_some(lower),
            });
        }
        rest = next;
    }
    parts
}

/// The parts worth searching: all but the stopwords, or the stopwords if
/// they are all there is.
fn content(parts: &[Part]) -> Vec<&Part> {
    let words: Vec<&Part> = parts.iter().filter(|p| !p.stop).collect();
    if words.is_empty() {
        parts.iter().collect()
    } else {
        words
    }
}

/// The FTS5 expression matching any of `parts`, or `None` if empty.
fn expression(parts: &[&Part]) -> Option<String> {
    (!parts.is_empty()).then(|| {
        parts
            .iter()
            .map(|p| p.phrase.as_str())
            .collect::<Vec<_>>()
            .join(" OR ")
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
