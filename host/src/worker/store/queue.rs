//! The queue of files waiting to be indexed, and the writes that take a
//! file off it.
//!
//! # Invariants
//! - A file's chunks, its row and its leaving the queue are written in one
//!   transaction: after a crash a file is either indexed whole or still
//!   queued, never half-indexed nor indexed twice.
//! - A file is committed only while it is queued: one that left the queue
//!   while it was read or embedded (deleted, or its root forgotten) does not
//!   come back as a stale entry.
//! - Every write of chunks forgets the cached chunk count.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::{FileMeta, NewChunk, Store, StoreError, path_text};

impl Store {
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
    pub(super) fn paths(&self, query: &str) -> Result<Vec<PathBuf>, StoreError> {
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
