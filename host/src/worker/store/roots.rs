//! The indexed roots: the paths `index` was given, and what lies under
//! each.
//!
//! # Invariants
//! - Roots are canonical paths; a file belongs to every root that is its
//!   ancestor (or itself), matched by [`super::UNDER`], so `/a/b` is never
//!   taken for a file of `/a/bc`.
//! - Forgetting a root removes its files, their chunks and its queue
//!   entries in one transaction.

use std::path::{Path, PathBuf};

use rusqlite::params;

use super::{RootStats, Store, StoreError, UNDER, path_text, under};

impl Store {
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
}
