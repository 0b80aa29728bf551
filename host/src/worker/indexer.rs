//! The indexer: the walk that queues files, and the task that drains the
//! queue in three overlapping stages (read and cut, embed in batches,
//! commit), as the [worker's doc](super) describes.
//!
//! # Invariants
//! - A file leaves the queue only in the transaction that indexes or skips
//!   it ([`commit_other`], [`commit_pending`]), so a kill at any moment
//!   leaves every file indexed once or queued; the next start resumes the
//!   queue.
//! - A file that cannot be indexed (binary, too large, undecodable,
//!   unreadable, refused by the embedder) is recorded with its reason and
//!   counted, never retried forever, never fatal.
//! - If the embedder itself fails (not one text: the whole request), the
//!   round ends with its error and nothing more is committed for its
//!   files: they stay queued, the error is reported in `stats` as
//!   `stalled`, and the next `worker.index` (or a restart) tries again.
//! - The in-memory index changes right after the store's transaction, from
//!   the ids that transaction removed and added.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::UNIX_EPOCH;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use super::chunk::{self, Chunk};
use super::extract::{self, Skip};
use super::store::{FileMeta, NewChunk, Store};
use super::{
    INDEX_EMBED_TIMEOUT, INDEX_READERS, Inner, Opened, PREPARED_AHEAD, WorkerError, blocking, lock,
    open,
};
use crate::embedder::{EmbedError, Job, Row};

/// Walks `paths` (recorded as roots if `record`), forgets deleted files,
/// queues new and changed ones.
pub(super) fn walk(state: &Opened, paths: &[PathBuf], record: bool) -> Result<u64, WorkerError> {
    let db_dir = state
        .dir
        .canonicalize()
        .unwrap_or_else(|_| state.dir.clone());
    let mut candidates = Vec::new();
    let mut removed = Vec::new();
    let roots = paths
        .iter()
        .map(|path| {
            path.canonicalize().map_err(|e| WorkerError::Path {
                path: path.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if record {
        lock(&state.store).add_roots(&roots)?;
    }
    for root in roots {
        let mut seen = HashSet::new();
        let walker = ignore::WalkBuilder::new(&root)
            // .gitignore applies in any folder, as a person reading it
            // expects, not only inside a git repository.
            .require_git(false)
            .follow_links(false)
            .filter_entry({
                let db_dir = db_dir.clone();
                move |entry| !entry.path().starts_with(&db_dir)
            })
            .build();
        let store = lock(&state.store);
        for entry in walker {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an entry the walk cannot read");
                    continue;
                }
            };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.into_path();
            if path.to_str().is_none() {
                tracing::warn!(path = %path.display(), "skipping a path that is not UTF-8");
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let meta = file_meta(&meta);
            seen.insert(path.clone());
            match store.file(&path)? {
                // A file the embedder failed is tried again by the next
                // runs, up to `limits::MAX_EMBED_ATTEMPTS`.
                Some(stored) if stored.meta == meta && !stored.retry => {}
                _ => candidates.push(path),
            }
        }
        for known in store.files_under(&root)? {
            if !seen.contains(&known) {
                removed.push(known);
            }
        }
    }
    let mut store = lock(&state.store);
    for path in removed {
        let ids = store.remove(&path)?;
        let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            index.remove(id);
        }
    }
    Ok(store.enqueue(&candidates)?)
}

fn file_meta(meta: &std::fs::Metadata) -> FileMeta {
    FileMeta {
        size: meta.len(),
        mtime_ns: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
    }
}

/// A queued file, read and cut.
enum Prepared {
    /// No longer on disk.
    Gone(PathBuf),
    /// Same contents as indexed.
    Unchanged(PathBuf, FileMeta),
    Skipped(PathBuf, FileMeta, Skip),
    Chunks {
        path: PathBuf,
        meta: FileMeta,
        hash: String,
        chunks: Vec<Chunk>,
        /// The chunks the file made, when more than the cap kept.
        cut_from: Option<usize>,
    },
}

/// Reads and cuts the queued file at `path`, opened as [`open`] requires
/// (no link followed, no blocking, a regular file inside `roots`).
fn prepare(inner: &Inner, store: &SyncMutex<Store>, roots: &[PathBuf], path: PathBuf) -> Prepared {
    let limit = inner.settings.max_file_bytes;
    let (meta, bytes) = match open::read_queued(&path, roots, limit) {
        Ok((meta, bytes)) => (file_meta(&meta), bytes),
        Err(open::NotRead::Gone) => return Prepared::Gone(path),
        Err(open::NotRead::Skip(skip)) => {
            // The metadata of what is at the path now, without following
            // it: a link's own, a FIFO's.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                return Prepared::Gone(path);
            };
            return Prepared::Skipped(path, file_meta(&meta), skip);
        }
    };
    let hash = crate::files::sha256_hex(&bytes);
    let stored = lock(store).file(&path).ok().flatten();
    if stored.is_some_and(|s| s.hash == hash) {
        return Prepared::Unchanged(path, meta);
    }
    let text = match extract::extract(&path, &bytes) {
        Ok(text) => text,
        Err(skip) => return Prepared::Skipped(path, meta, skip),
    };
    if !inner.settings.include_generated
        && let Some(why) = extract::generated(&text)
    {
        return Prepared::Skipped(path, meta, Skip::Generated(why));
    }
    match chunk::chunk(&text, &inner.tokens, inner.settings.chunk) {
        Ok(mut chunks) => {
            let cap = inner.settings.max_file_chunks.max(1);
            let cut_from = (chunks.len() > cap).then_some(chunks.len());
            chunks.truncate(cap);
            Prepared::Chunks {
                path,
                meta,
                hash,
                chunks,
                cut_from,
            }
        }
        Err(e) => Prepared::Skipped(path, meta, Skip::Unreadable(format!("tokenizer: {e}"))),
    }
}

/// A file whose chunks are at the embedder.
struct Pending {
    path: PathBuf,
    meta: FileMeta,
    hash: String,
    chunks: Vec<Chunk>,
    cut_from: Option<usize>,
    vectors: Vec<Option<Vec<f32>>>,
    missing: usize,
    failed: Option<String>,
}

/// Drains the queue whenever woken, until the worker is dropped.
pub(super) async fn indexer(inner: Arc<Inner>, state: std::sync::Weak<Opened>) {
    loop {
        let Some(opened) = state.upgrade() else {
            return;
        };
        let store = opened.store.clone();
        let queue = match blocking(move || Ok(lock(&store).queued()?)).await {
            Ok(queue) => queue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the index queue");
                Vec::new()
            }
        };
        let stalled = opened
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if queue.is_empty() || stalled {
            let wake = opened.wake.clone();
            let woken = wake.notified();
            drop(opened);
            woken.await;
            continue;
        }
        if let Err(e) = index_round(&inner, &opened, queue).await {
            tracing::warn!(error = %e, "indexing stalled; the files stay queued");
            *opened.stalled.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
        opened.processing.store(0, Ordering::Relaxed);
    }
}

/// One pass over `queue`: read, embed and commit every file in it.
async fn index_round(
    inner: &Arc<Inner>,
    opened: &Arc<Opened>,
    queue: Vec<PathBuf>,
) -> Result<(), WorkerError> {
    opened
        .processing
        .store(queue.len() as u64, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Prepared>(PREPARED_AHEAD);
    let roots = {
        let store = opened.store.clone();
        Arc::new(blocking(move || lock(&store).root_paths().map_err(WorkerError::from)).await?)
    };
    let reader = spawn_reader(inner, opened, queue, roots, tx);
    let result = Round::new(inner, opened).run(&mut rx).await;
    reader.abort();
    result
}

/// Stage 1: reads and cuts the files of `queue` on blocking threads,
/// [`INDEX_READERS`] at a time, in order, into `tx`.
fn spawn_reader(
    inner: &Arc<Inner>,
    opened: &Opened,
    queue: Vec<PathBuf>,
    roots: Arc<Vec<PathBuf>>,
    tx: mpsc::Sender<Prepared>,
) -> tokio::task::JoinHandle<()> {
    let (inner, store) = (inner.clone(), opened.store.clone());
    tokio::spawn(async move {
        let mut prepared = futures::stream::iter(queue)
            .map(|path| {
                let (inner, store, roots) = (inner.clone(), store.clone(), roots.clone());
                tokio::task::spawn_blocking(move || prepare(&inner, &store, &roots, path))
            })
            .buffered(INDEX_READERS);
        while let Some(file) = prepared.next().await {
            let Ok(file) = file else { continue };
            if tx.send(file).await.is_err() {
                return;
            }
        }
    })
}

/// The state of one round: the files at the embedder, the chunks waiting
/// for a batch, the batches in flight.
struct Round<'a> {
    inner: &'a Arc<Inner>,
    opened: &'a Arc<Opened>,
    pending: HashMap<u64, Pending>,
    next_file: u64,
    batch: Vec<(u64, usize)>,
    in_flight: FuturesOrdered<BoxFuture<'static, BatchResult>>,
    input_open: bool,
}

impl<'a> Round<'a> {
    fn new(inner: &'a Arc<Inner>, opened: &'a Arc<Opened>) -> Self {
        Round {
            inner,
            opened,
            pending: HashMap::new(),
            next_file: 0,
            batch: Vec::new(),
            in_flight: FuturesOrdered::new(),
            input_open: true,
        }
    }

    /// Stages 2 and 3: batches the chunks read from `rx`, keeps up to
    /// `in_flight` batches at the embedder, commits each file done, until
    /// everything read is committed (or something fails).
    async fn run(mut self, rx: &mut mpsc::Receiver<Prepared>) -> Result<(), WorkerError> {
        let settings = self.inner.settings;
        loop {
            let room = self.in_flight.len() < settings.in_flight;
            tokio::select! {
                file = rx.recv(), if self.input_open && room => {
                    self.take(file).await?;
                    self.send_after_read(rx.is_empty());
                }
                Some((keys, response)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.answered(keys, response).await?;
                    if !self.batch.is_empty()
                        && (!self.input_open || rx.is_empty())
                        && self.in_flight.len() < settings.in_flight
                    {
                        self.send_rest();
                    }
                }
                else => return Ok(()),
            }
        }
    }

    /// A file read (or the end of the input): its chunks join the batch;
    /// a file with nothing to embed is committed now.
    async fn take(&mut self, file: Option<Prepared>) -> Result<(), WorkerError> {
        match file {
            None => self.input_open = false,
            Some(Prepared::Chunks {
                path,
                meta,
                hash,
                chunks,
                cut_from,
            }) if !chunks.is_empty() => {
                let n = chunks.len();
                self.batch.extend((0..n).map(|i| (self.next_file, i)));
                self.pending.insert(
                    self.next_file,
                    Pending {
                        path,
                        meta,
                        hash,
                        chunks,
                        cut_from,
                        vectors: vec![None; n],
                        missing: n,
                        failed: None,
                    },
                );
                self.next_file += 1;
            }
            Some(other) => commit_other(self.opened, other).await?,
        }
        Ok(())
    }

    /// Full batches go now; a partial one when nothing else is coming soon
    /// (`nothing_read`: no file waits in the channel) or the embedder is
    /// idle.
    fn send_after_read(&mut self, nothing_read: bool) {
        let settings = self.inner.settings;
        while self.batch.len() >= settings.batch_chunks && self.in_flight.len() < settings.in_flight
        {
            let rest = self.batch.split_off(settings.batch_chunks);
            let keys = std::mem::replace(&mut self.batch, rest);
            self.in_flight
                .push_back(send_batch(self.inner, &self.pending, keys));
        }
        if !self.batch.is_empty()
            && (!self.input_open || (nothing_read && self.in_flight.is_empty()))
        {
            self.send_rest();
        }
    }

    /// Sends the partial batch.
    fn send_rest(&mut self) {
        let keys = std::mem::take(&mut self.batch);
        self.in_flight
            .push_back(send_batch(self.inner, &self.pending, keys));
    }

    /// A batch came back: its vectors go to their files, and each file
    /// whose chunks all came back is committed.
    async fn answered(
        &mut self,
        keys: Vec<(u64, usize)>,
        response: Result<Vec<Row>, EmbedError>,
    ) -> Result<(), WorkerError> {
        let rows = response.map_err(WorkerError::Embedder)?;
        let mut done = Vec::new();
        for ((file, chunk), row) in keys.into_iter().zip(rows) {
            let Some(p) = self.pending.get_mut(&file) else {
                continue;
            };
            match row {
                Err(reason) => p.failed = Some(reason.0),
                Ok(vector) => p.vectors[chunk] = Some(vector),
            }
            p.missing -= 1;
            if p.missing == 0 {
                done.push(file);
            }
        }
        let dimension = self.inner.model.dimension as usize;
        for file in done {
            let Some(p) = self.pending.remove(&file) else {
                continue;
            };
            commit_pending(self.opened, p, dimension).await?;
        }
        Ok(())
    }
}

type BatchResult = (Vec<(u64, usize)>, Result<Vec<Row>, EmbedError>);

fn send_batch(
    inner: &Arc<Inner>,
    pending: &HashMap<u64, Pending>,
    keys: Vec<(u64, usize)>,
) -> BoxFuture<'static, BatchResult> {
    let (texts, counts): (Vec<String>, Vec<usize>) = keys
        .iter()
        .map(|(file, chunk)| {
            pending
                .get(file)
                .map(|p| (p.chunks[*chunk].text.clone(), p.chunks[*chunk].tokens))
                .unwrap_or_default()
        })
        .unzip();
    let embedder = inner.embedder.clone();
    async move {
        // An embedder pool that escalated says when it will serve again:
        // the batch waits out the cooldown (up to a bound) and loses
        // nothing; its texts are never marked as failed for it.
        let patience = tokio::time::Instant::now() + crate::limits::INDEX_UNAVAILABLE_PATIENCE;
        // The embedder's own deadline grows with the batch's text, and a
        // batch may wait for one ahead of it: the caller waits for both.
        let allowance = crate::backend::work_deadline(
            std::time::Duration::ZERO,
            crate::limits::CALL_DEADLINE_PER_KIB,
            &texts,
        );
        let timeout = INDEX_EMBED_TIMEOUT.saturating_add(allowance.saturating_mul(2));
        let response = loop {
            // The chunker's counts go along: the front door does not
            // tokenize a chunk again.
            let job = Job::new(texts.clone())
                .deadline(timeout)
                .counted(counts.clone());
            let response = embedder.embed(job).await.map(|done| done.rows);
            match &response {
                Err(e) if e.retry_after().is_some() && tokio::time::Instant::now() < patience => {
                    let left = patience.saturating_duration_since(tokio::time::Instant::now());
                    let wait = e
                        .retry_after()
                        .unwrap_or_default()
                        .max(crate::limits::INDEX_UNAVAILABLE_POLL)
                        .min(left);
                    tracing::info!(?wait, "the embedder is recovering; waiting");
                    tokio::time::sleep(wait).await;
                }
                _ => break response,
            }
        };
        (keys, response)
    }
    .boxed()
}

fn done_one(opened: &Opened) {
    let _ = opened
        .processing
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

/// Commits a file that needs no embedding.
async fn commit_other(opened: &Arc<Opened>, file: Prepared) -> Result<(), WorkerError> {
    let state = opened.clone();
    blocking(move || {
        let mut store = lock(&state.store);
        let removed = match file {
            Prepared::Gone(path) => store.remove(&path)?,
            Prepared::Unchanged(path, meta) => {
                store.commit_unchanged(&path, &meta)?;
                Vec::new()
            }
            Prepared::Skipped(path, meta, skip) => {
                tracing::debug!(path = %path.display(), reason = %skip, "not indexed");
                store.commit_skip(&path, &meta, skip.reason(), &skip.to_string())?
            }
            Prepared::Chunks {
                path, meta, hash, ..
            } => {
                // A file without text: indexed, with no chunk.
                store.commit_file(&path, &meta, &hash, &[], None)?.0
            }
        };
        drop(store);
        let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
        for id in removed {
            index.remove(id);
        }
        Ok(())
    })
    .await?;
    done_one(opened);
    Ok(())
}

/// Commits a file whose chunks all came back.
async fn commit_pending(
    opened: &Arc<Opened>,
    mut p: Pending,
    dimension: usize,
) -> Result<(), WorkerError> {
    // The bus validates vectors; a missing or short one is still refused
    // here, since the store would keep it.
    if p.failed.is_none()
        && p.vectors
            .iter()
            .any(|v| v.as_ref().is_none_or(|v| v.len() != dimension))
    {
        p.failed = Some(format!(
            "the embedder returned a vector that is not of {dimension} dimensions"
        ));
    }
    let state = opened.clone();
    blocking(move || {
        let mut store = lock(&state.store);
        if let Some(reason) = p.failed {
            let skip = Skip::EmbedFailed(reason);
            tracing::debug!(path = %p.path.display(), reason = %skip, "not indexed");
            let removed = store.commit_skip(&p.path, &p.meta, skip.reason(), &skip.to_string())?;
            drop(store);
            let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
            removed.into_iter().for_each(|id| index.remove(id));
            return Ok(());
        }
        let vectors: Vec<Vec<f32>> = p
            .vectors
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let chunks: Vec<NewChunk<'_>> = p
            .chunks
            .iter()
            .zip(&vectors)
            .map(|(c, v)| NewChunk {
                text: &c.text,
                start_line: c.start_line,
                end_line: c.end_line,
                vector: v,
            })
            .collect();
        let (old, new) = store.commit_file(&p.path, &p.meta, &p.hash, &chunks, p.cut_from)?;
        drop(store);
        let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
        old.into_iter().for_each(|id| index.remove(id));
        for (id, v) in new.into_iter().zip(&vectors) {
            index.insert(id, v);
        }
        Ok(())
    })
    .await?;
    done_one(opened);
    Ok(())
}
