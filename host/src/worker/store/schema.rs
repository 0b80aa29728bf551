//! The index's schema: its version, the tables a new index starts with
//! beyond the base ones, and the migrations from each older version.
//!
//! # Invariants
//! - A new index is written at [`SCHEMA_VERSION`] with its model, in one
//!   transaction.
//! - Each migration step runs in one transaction with its version bump: an
//!   index is at one version or the next, never between; nothing is
//!   re-embedded.
//! - A newer schema is refused ([`StoreError::Schema`]), never misread; an
//!   index of another model is refused ([`StoreError::ModelMismatch`]).

use std::path::Path;

use rusqlite::params;

use super::{Store, StoreError};

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
///    run until [`crate::limits::MAX_EMBED_ATTEMPTS`].
pub(super) const SCHEMA_VERSION: i64 = 4;

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

impl Store {
    pub(super) fn check_model(
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
    pub(super) fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
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
}
