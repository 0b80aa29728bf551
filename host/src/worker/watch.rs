//! Keeping an index fresh: `embedhost index --watch`.
//!
//! Filesystem events (the `notify` crate: inotify on Linux) only say
//! *where* to look; what changed is decided by the same walk as `index`
//! (size and modification time, then the contents' hash), so a missed or
//! merged event costs at most a later look, never a wrong index.
//!
//! Invariants, and why:
//! - Events are debounced: a burst (an editor's save: write a temporary
//!   file, rename it over the original) is one batch, taken once the tree
//!   has been quiet for [`limits::WATCH_QUIET`] or at the latest
//!   [`limits::WATCH_MAX_DELAY`] after its first event, so a file being
//!   written for ever still gets indexed.
//! - A batch re-walks the nearest existing folder of each changed path
//!   (within its root), so deletions, moves and new folders are all seen as
//!   the walk sees them, `.gitignore` included.
//! - The event queue is bounded ([`limits::WATCH_EVENT_QUEUE`]); on overflow
//!   the whole tree is walked again instead, so nothing is missed.
//! - On start everything is walked once: changes made while nothing watched
//!   are found (the durable queue makes that cheap), and a folder that
//!   disappeared is skipped with a warning, never fatal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Worker, WorkerError};
use crate::limits;
use crate::messages::StatsResponse;

/// One batch of changes, as `index --watch` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Filesystem events in the batch.
    pub events: usize,
    /// Folders walked again.
    pub folders: Vec<PathBuf>,
    /// The index's counts once the batch was indexed.
    pub stats: StatsResponse,
}

/// Watches `roots` and keeps `worker`'s index of them fresh until `stop`,
/// calling `report` after each batch (and once after the first walk, with
/// zero events).
///
/// # Errors
/// The watcher could not be started, or the worker failed.
pub async fn watch(
    worker: &Worker,
    roots: &[PathBuf],
    stop: CancellationToken,
    mut report: impl FnMut(&Batch),
) -> Result<(), WorkerError> {
    let roots: Vec<PathBuf> = roots
        .iter()
        .map(|r| {
            r.canonicalize().map_err(|e| WorkerError::Path {
                path: r.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    // Kept until the end: dropping it stops the events.
    let (_watcher, mut rx, overflow) = start_watcher(&roots)?;
    // Everything once: what changed while nothing watched.
    let stats = reindex(worker, &roots, &stop).await?;
    report(&Batch {
        events: 0,
        folders: roots.clone(),
        stats,
    });
    loop {
        let Some(changed) = next_burst(&mut rx, &stop).await else {
            return Ok(());
        };
        let folders = if overflow.swap(false, Ordering::Relaxed) {
            roots.clone()
        } else {
            folders_to_walk(&roots, &changed, worker.db_dir().await.as_deref())
        };
        if folders.is_empty() {
            continue;
        }
        let stats = reindex(worker, &folders, &stop).await?;
        report(&Batch {
            events: changed.len(),
            folders,
            stats,
        });
    }
}

/// A watcher of `roots` (canonical), sending each changed path; the flag is
/// set when paths were lost (a full queue, a broken watch): walk all.
fn start_watcher(
    roots: &[PathBuf],
) -> Result<
    (
        notify::RecommendedWatcher,
        mpsc::Receiver<PathBuf>,
        Arc<AtomicBool>,
    ),
    WorkerError,
> {
    let (tx, rx) = mpsc::channel::<PathBuf>(limits::WATCH_EVENT_QUEUE);
    let overflow = Arc::new(AtomicBool::new(false));
    let flag = overflow.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) => {
                for path in event.paths {
                    if tx.try_send(path).is_err() {
                        flag.store(true, Ordering::Relaxed);
                    }
                }
            }
            // The kernel's own queue overflowed, or a watch broke: walk all.
            Err(_) => flag.store(true, Ordering::Relaxed),
        }
    })
    .map_err(|e| WorkerError::Path {
        path: roots.first().cloned().unwrap_or_default(),
        reason: format!("cannot watch: {e}"),
    })?;
    for root in roots {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| WorkerError::Path {
                path: root.clone(),
                reason: format!("cannot watch: {e}"),
            })?;
    }
    Ok((watcher, rx, overflow))
}

/// The paths of the next burst of events: from the first, until the tree
/// has been quiet for [`limits::WATCH_QUIET`] or [`limits::WATCH_MAX_DELAY`]
/// has passed. `None` once stopped (or the watcher is gone).
async fn next_burst(
    rx: &mut mpsc::Receiver<PathBuf>,
    stop: &CancellationToken,
) -> Option<Vec<PathBuf>> {
    let first = tokio::select! {
        () = stop.cancelled() => return None,
        path = rx.recv() => path?,
    };
    let mut changed = vec![first];
    let started = tokio::time::Instant::now();
    loop {
        let quiet = tokio::time::Instant::now() + limits::WATCH_QUIET;
        let until = quiet.min(started + limits::WATCH_MAX_DELAY);
        tokio::select! {
            () = stop.cancelled() => return None,
            next = tokio::time::timeout_at(until, rx.recv()) => match next {
                Ok(Some(p)) => changed.push(p),
                Ok(None) | Err(_) => break,
            },
        }
    }
    Some(changed)
}

/// Walks `folders` (those that still exist) and waits until the queue is
/// empty.
async fn reindex(
    worker: &Worker,
    folders: &[PathBuf],
    stop: &CancellationToken,
) -> Result<StatsResponse, WorkerError> {
    let existing: Vec<PathBuf> = folders
        .iter()
        .filter(|f| {
            let there = f.exists();
            if !there {
                tracing::warn!(folder = %f.display(), "a watched folder is gone; skipped");
            }
            there
        })
        .cloned()
        .collect();
    if !existing.is_empty() {
        // Walked, not recorded as roots: the roots are what was asked.
        worker.refresh(existing).await?;
    }
    loop {
        let stats = worker.stats().await?;
        if stats.queued == 0 && stats.processing == 0 || stats.stalled.is_some() {
            return Ok(stats);
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(stats),
            () = tokio::time::sleep(limits::INDEX_PROGRESS_INTERVAL) => {}
        }
    }
}

/// The folders to walk again for `changed` paths: each path's nearest
/// existing folder (itself if it is one), kept within its root; folders
/// inside another in the set are dropped. Paths in the index's own
/// directory are ignored.
pub fn folders_to_walk(roots: &[PathBuf], changed: &[PathBuf], db: Option<&Path>) -> Vec<PathBuf> {
    let mut set = BTreeSet::new();
    for path in changed {
        if db.is_some_and(|db| path.starts_with(db)) {
            continue;
        }
        let Some(root) = roots.iter().find(|r| path.starts_with(r)) else {
            continue;
        };
        let mut folder = path.as_path();
        while !folder.is_dir() && folder != root.as_path() {
            match folder.parent() {
                Some(parent) => folder = parent,
                None => break,
            }
        }
        set.insert(folder.to_path_buf());
    }
    let all: Vec<PathBuf> = set.into_iter().collect();
    all.iter()
        .filter(|f| !all.iter().any(|g| g != *f && f.starts_with(g)))
        .cloned()
        .collect()
}
