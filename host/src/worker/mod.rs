//! The worker: a semantic index of a person's files, inside the host. It
//! serves `worker.*` on the bus and asks the front door
//! ([`crate::embedder::Embedder`]) for vectors, handing it the token counts
//! its chunker already has, so no chunk is tokenized twice.
//!
//! # How indexing flows
//! `worker.index` walks the paths (ripgrep's rules, through `ignore`),
//! forgets files that are gone, and queues the new and changed ones (size or
//! time differ) in the database; it answers at once with how many it queued.
//! The indexer task then drains the queue in three overlapping stages:
//! 1. read, hash, extract and chunk files on blocking threads
//!    ([`INDEX_READERS`] at a time, a contents hash equal to the stored one
//!    skips the file);
//! 2. embed chunks in batches of `batch_chunks`, keeping `in_flight` batches
//!    at the embedder so every instance of its pool stays busy;
//! 3. commit each file whose chunks all have vectors, in one transaction
//!    ([`store::Store::commit_file`]), then update the in-memory index.
//!
//! # Invariants
//! - A file leaves the queue only in the transaction that indexes or skips
//!   it, so a kill at any moment leaves every file indexed once or queued;
//!   the next start resumes the queue.
//! - A file that cannot be indexed (binary, too large, undecodable,
//!   unreadable, refused by the embedder) is recorded with its reason and
//!   counted, never retried forever, never fatal.
//! - If the embedder itself fails (not one text: the whole request), nothing
//!   is committed for the files in that round: they stay queued, the error
//!   is reported in `stats` as `stalled`, and the next `worker.index` (or a
//!   restart) tries again.

pub mod chunk;
pub mod extract;
pub mod open;
pub mod store;
pub mod vectors;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, RwLock};
use std::time::UNIX_EPOCH;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::{Mutex, Notify, mpsc};

use crate::backend::ModelInfo;
use crate::bus::{ErrorCode, RemoteError, Router};
use crate::embedder::{EmbedError, Embedder, Job, Row};
use crate::messages::{
    IndexRequest, IndexResponse, InitRequest, InitResponse, SearchMode, SearchRequest,
    SearchResponse, SearchResult, StatsResponse, WorkerIndex, WorkerInit, WorkerSearch,
    WorkerStats,
};
use chunk::{Chunk, ChunkSettings, Tokens};
use extract::Skip;
use store::{FileMeta, NewChunk, Store, StoreError};
use vectors::VectorIndex;

/// Files read, hashed and chunked at once: two keep a core busy while the
/// other waits on the disk, and reading is far faster than embedding.
pub const INDEX_READERS: usize = 2;

/// Prepared files waiting for the embedder: enough to fill the next batches
/// without holding much text in memory.
const PREPARED_AHEAD: usize = 64;

pub use crate::limits::{DEFAULT_BATCH_CHUNKS, DEFAULT_MAX_FILE_BYTES};

pub use crate::limits::{INDEX_EMBED_TIMEOUT, SEARCH_EMBED_TIMEOUT};

/// How the worker indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSettings {
    /// How files are cut into chunks.
    pub chunk: ChunkSettings,
    /// Larger files are skipped as `too_large`.
    pub max_file_bytes: u64,
    /// Chunks per `embedder.embed` request.
    pub batch_chunks: usize,
    /// Batches at the embedder at once (its pool size, plus one queued so an
    /// instance never waits for the next).
    pub in_flight: usize,
    /// Index machine-made text too (generated, minified, lock files), which
    /// is skipped as `generated` otherwise.
    pub include_generated: bool,
    /// A file's chunks past this many are not indexed; the file is
    /// recorded as cut (`stats` lists it).
    pub max_file_chunks: usize,
}

impl WorkerSettings {
    /// The settings `config`'s `[index]` asks for, with one batch in
    /// flight more than the pool has instances.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let index = &config.index;
        WorkerSettings {
            chunk: ChunkSettings {
                tokens: index.chunk_tokens,
                overlap: index.chunk_overlap,
            },
            max_file_bytes: index.max_file_bytes,
            batch_chunks: index.batch_chunks,
            in_flight: config.supervisor_config().pool_size + 1,
            include_generated: index.include_generated,
            max_file_chunks: index.max_file_chunks,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            chunk: ChunkSettings::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            batch_chunks: DEFAULT_BATCH_CHUNKS,
            in_flight: 2,
            include_generated: false,
            max_file_chunks: crate::limits::DEFAULT_MAX_FILE_CHUNKS,
        }
    }
}

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker is not initialized (send worker.init first)")]
    /// `worker.init` has not been called.
    NotInitialized,
    #[error(transparent)]
    /// The index database failed.
    Store(#[from] StoreError),
    #[error("embedder: {0}")]
    /// The embedder could not be reached or failed.
    Embedder(#[from] EmbedError),
    #[error("cannot index `{path}`: {reason}")]
    /// A path given to `index` cannot be walked.
    Path { path: PathBuf, reason: String },
    #[error("nothing is indexed under `{0}` (`embedhost stats` lists the roots)")]
    /// `forget` was given a path the index knows nothing under.
    NotIndexed(PathBuf),
    #[error("the embedder returned no vector for the query: {0}")]
    /// The query cannot be searched (empty, or refused by the embedder).
    Query(String),
}

impl From<WorkerError> for RemoteError {
    fn from(e: WorkerError) -> Self {
        let code = match &e {
            WorkerError::NotInitialized | WorkerError::Path { .. } | WorkerError::NotIndexed(_) => {
                ErrorCode::InvalidInput
            }
            WorkerError::Embedder(e) if e.retry_after().is_some() => ErrorCode::Unavailable,
            _ => ErrorCode::Failed,
        };
        RemoteError::new(code, e.to_string())
    }
}

/// The worker. Cheap to clone; every clone is the same worker.
///
/// # Example
/// A worker on the stub embedder, indexing a folder and searching it.
/// ```
/// # #[tokio::main] async fn main() {
/// use embedhost::embedder::{Embedder, Generation};
/// use embedhost::supervisor::{Supervisor, SupervisorConfig};
/// use embedhost::wasm::{InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner};
/// use embedhost::worker::{Worker, WorkerSettings, chunk::Tokens};
///
/// let engine = WasmEngine::new(None).unwrap();
/// let spawner = WasmSpawner {
///     plugin: WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap(),
///     limits: InstanceLimits::default(),
///     config: vec![],
/// };
/// let supervisor = Supervisor::start(spawner, SupervisorConfig::default()).await.unwrap();
/// let model = supervisor.model_info();
/// let embedder = Embedder::serving(Generation::local(supervisor, Tokens::Words, Default::default()));
/// let worker = Worker::new(embedder.into(), model, Tokens::Words, WorkerSettings::default());
///
/// let root = tempfile::tempdir().unwrap();
/// std::fs::write(root.path().join("tyres.txt"), "fixing a flat bicycle tyre").unwrap();
/// std::fs::write(root.path().join("bread.txt"), "baking sourdough bread").unwrap();
/// worker.init(&root.path().join("index")).await.unwrap();
/// worker.index(vec![root.path().to_path_buf()]).await.unwrap();
/// while worker.stats().await.unwrap().indexed < 2 {
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// let hits = worker.search("flat tyre".into(), 1).await.unwrap();
/// assert!(hits[0].path.ends_with("tyres.txt"));
/// # }
/// ```
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    embedder: Arc<Embedder>,
    /// What identifies the embedder beyond its model (plugin, engine,
    /// settings): files it failed to embed are tried again when it changes.
    embedder_id: String,
    model: ModelInfo,
    tokens: Tokens,
    settings: WorkerSettings,
    opened: Mutex<Option<Arc<Opened>>>,
}

/// An open index and its indexer.
struct Opened {
    dir: PathBuf,
    store: Arc<SyncMutex<Store>>,
    index: Arc<RwLock<VectorIndex>>,
    /// Wakes the indexer: files were queued, or the worker is gone.
    wake: Arc<Notify>,
    processing: AtomicU64,
    /// The embedder's last whole-request failure, while files wait for it.
    stalled: SyncMutex<Option<String>>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        // The indexer holds only a weak reference: woken, it finds the
        // index gone and ends.
        self.wake.notify_one();
    }
}

impl Worker {
    /// A worker asking `embedder` (the front door, serving `model`) for
    /// vectors, cutting files with `tokens`.
    pub fn new(
        embedder: Arc<Embedder>,
        model: ModelInfo,
        tokens: Tokens,
        settings: WorkerSettings,
    ) -> Self {
        let settings = WorkerSettings {
            chunk: settings.chunk.fitted(model.max_input_tokens as usize),
            batch_chunks: settings.batch_chunks.max(1),
            in_flight: settings.in_flight.max(1),
            ..settings
        };
        Worker {
            inner: Arc::new(Inner {
                embedder,
                embedder_id: String::new(),
                model,
                tokens,
                settings,
                opened: Mutex::new(None),
            }),
        }
    }

    /// The same worker, with `id` identifying its embedder (plugin,
    /// engine, settings; see `Config::embedder_id`). Files the embedder
    /// failed on (`embed_failed`) are queued again when an index is opened
    /// by an embedder of another id: a fixed plugin or model gets its
    /// chance at them. Call before [`Worker::init`].
    #[must_use]
    pub fn with_embedder_id(mut self, id: impl Into<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.embedder_id = id.into();
        }
        self
    }

    /// Whether `other` is this worker (a clone of it), not merely alike.
    pub fn same(&self, other: &Worker) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The open index's directory (resolved), if one is open.
    pub async fn db_dir(&self) -> Option<PathBuf> {
        let opened = self.inner.opened.lock().await;
        opened
            .as_ref()
            .map(|o| o.dir.canonicalize().unwrap_or_else(|_| o.dir.clone()))
    }

    /// The settings in force (chunking fitted to the model).
    pub fn settings(&self) -> WorkerSettings {
        self.inner.settings
    }

    /// `worker.init`: opens (or creates) the index in `db_dir`, loads its
    /// vectors and starts the indexer, which resumes the queue. Opening the
    /// directory already open is a no-op.
    ///
    /// # Errors
    /// The store's error, such as an index of another model.
    pub async fn init(&self, db_dir: &Path) -> Result<(), WorkerError> {
        let mut opened = self.inner.opened.lock().await;
        if opened.as_ref().is_some_and(|o| o.dir == db_dir) {
            return Ok(());
        }
        let (dir, model) = (db_dir.to_path_buf(), self.inner.model.clone());
        let embedder_id = self.inner.embedder_id.clone();
        let (store, index) = blocking(move || {
            let mut store = Store::open(&dir, &model.model_id, model.dimension)?;
            let retried = store.retry_failed_for(&embedder_id)?;
            if retried > 0 {
                tracing::info!(
                    files = retried,
                    "the embedder changed: files it failed on are queued again"
                );
            }
            let (ids, data) = store.vectors()?;
            let index = VectorIndex::new(model.dimension as usize, ids, data);
            Ok::<_, WorkerError>((store, index))
        })
        .await?;
        let state = Arc::new(Opened {
            dir: db_dir.to_path_buf(),
            store: Arc::new(SyncMutex::new(store)),
            index: Arc::new(RwLock::new(index)),
            wake: Arc::new(Notify::new()),
            processing: AtomicU64::new(0),
            stalled: SyncMutex::new(None),
        });
        tokio::spawn(indexer(self.inner.clone(), Arc::downgrade(&state)));
        state.wake.notify_one();
        *opened = Some(state);
        Ok(())
    }

    async fn opened(&self) -> Result<Arc<Opened>, WorkerError> {
        self.inner
            .opened
            .lock()
            .await
            .clone()
            .ok_or(WorkerError::NotInitialized)
    }

    /// `worker.index`: queues the new and changed files under `paths` and
    /// forgets the deleted ones; returns how many were queued. Indexing goes
    /// on in the background.
    ///
    /// # Errors
    /// A path that does not exist, or the store's error.
    pub async fn index(&self, paths: Vec<PathBuf>) -> Result<u64, WorkerError> {
        self.walk(paths, true).await
    }

    /// As [`Worker::index`], for paths inside roots already indexed (a
    /// watcher's changed folders): they are walked, not recorded as roots.
    ///
    /// # Errors
    /// A path that does not exist, or the store's error.
    pub async fn refresh(&self, paths: Vec<PathBuf>) -> Result<u64, WorkerError> {
        self.walk(paths, false).await
    }

    async fn walk(&self, paths: Vec<PathBuf>, roots: bool) -> Result<u64, WorkerError> {
        let opened = self.opened().await?;
        let state = opened.clone();
        let queued = blocking(move || walk(&state, &paths, roots)).await?;
        *opened.stalled.lock().unwrap_or_else(|e| e.into_inner()) = None;
        opened.wake.notify_one();
        Ok(queued)
    }

    /// Forgets `path` (an indexed root, or any folder or file in one) and
    /// everything indexed or queued under it, and the roots inside it: its
    /// chunks leave the store and the in-memory index together, and the
    /// indexer will not bring back a file it was working on. The path
    /// need not exist any more. Returns the chunks removed.
    ///
    /// # Errors
    /// [`WorkerError::NotIndexed`] if nothing is known under `path`, or the
    /// store's error.
    pub async fn forget(&self, path: &Path) -> Result<u64, WorkerError> {
        let opened = self.opened().await?;
        let root = forget_path(path).map_err(|e| WorkerError::Path {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let state = opened.clone();
        let asked = path.to_path_buf();
        blocking(move || {
            let mut store = lock(&state.store);
            let ids = forget_in(&mut store, &root, asked)?;
            // The in-memory index changes under the store's lock, so a
            // search sees both before or both after.
            let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
            for &id in &ids {
                index.remove(id);
            }
            Ok(ids.len() as u64)
        })
        .await
    }

    /// The indexed roots with their counts ([`Store::roots`]).
    ///
    /// # Errors
    /// The store's error.
    pub async fn roots(&self) -> Result<Vec<store::RootStats>, WorkerError> {
        let opened = self.opened().await?;
        let store = opened.store.clone();
        blocking(move || Ok(lock(&store).roots()?)).await
    }

    /// `worker.search`: the `limit` chunks closest in meaning to `query`,
    /// best first.
    ///
    /// # Errors
    /// The embedder's or the store's error.
    pub async fn search(
        &self,
        query: String,
        limit: usize,
    ) -> Result<Vec<SearchResult>, WorkerError> {
        self.search_mode(query, limit, SearchMode::default()).await
    }

    /// `worker.search` in `mode`: by meaning, by keyword, or both fused
    /// with reciprocal rank fusion ([`crate::limits::RRF_K`]). In hybrid
    /// mode each ranking contributes its best
    /// [`crate::limits::HYBRID_CANDIDATES`] (or `limit`, if more), and a
    /// result's score is its fused score.
    ///
    /// # Errors
    /// The embedder's or the store's error.
    pub async fn search_mode(
        &self,
        query: String,
        limit: usize,
        mode: SearchMode,
    ) -> Result<Vec<SearchResult>, WorkerError> {
        let opened = self.opened().await?;
        let candidates = limit.max(crate::limits::HYBRID_CANDIDATES);
        let keyword = match mode {
            SearchMode::Semantic => Vec::new(),
            SearchMode::Keyword | SearchMode::Hybrid => {
                let (store, q) = (opened.store.clone(), query.clone());
                let fused = mode == SearchMode::Hybrid;
                blocking(move || Ok(lock(&store).keyword(&q, candidates, fused)?)).await?
            }
        };
        let (semantic, query_vector) = match mode {
            SearchMode::Keyword => (Vec::new(), Vec::new()),
            SearchMode::Semantic => self.semantic(&opened, query, limit).await?,
            SearchMode::Hybrid => self.semantic(&opened, query, candidates).await?,
        };
        let hits = match mode {
            SearchMode::Semantic => semantic,
            SearchMode::Keyword => keyword.into_iter().take(limit).collect(),
            // Fusion orders the hits; each shows its cosine to the query,
            // a score that means the same from query to query (a fusion
            // score is only a rank: 0.033 for the best and the second).
            SearchMode::Hybrid => {
                let index = opened.index.read().unwrap_or_else(|e| e.into_inner());
                fuse(&[semantic, keyword], limit)
                    .into_iter()
                    .map(|(id, _)| (id, index.score(id, &query_vector).unwrap_or_default()))
                    .collect()
            }
        };
        let store = opened.store.clone();
        let ids: Vec<i64> = hits.iter().map(|h| h.0).collect();
        let rows = blocking(move || Ok(lock(&store).chunks(&ids)?)).await?;
        let scores: HashMap<i64, f32> = hits.into_iter().collect();
        Ok(rows
            .into_iter()
            .map(|row| SearchResult {
                score: scores.get(&row.id).copied().unwrap_or_default(),
                path: row.path,
                start_line: row.start_line,
                end_line: row.end_line,
                text: row.text,
            })
            .collect())
    }

    /// The `limit` chunks closest in meaning to `query`, with their cosine,
    /// and the query's vector.
    async fn semantic(
        &self,
        opened: &Opened,
        query: String,
        limit: usize,
    ) -> Result<(Vec<(i64, f32)>, Vec<f32>), WorkerError> {
        let job = Job::new(vec![query])
            .query(true)
            .deadline(SEARCH_EMBED_TIMEOUT);
        let done = self.inner.embedder.embed(job).await?;
        let vector = match done.rows.into_iter().next() {
            Some(Ok(vector)) => vector,
            Some(Err(reason)) => return Err(WorkerError::Query(reason.0)),
            None => return Err(WorkerError::Query("no reason given".into())),
        };
        let hits = opened
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .search(&vector, limit);
        Ok((hits, vector))
    }

    /// `worker.stats`.
    ///
    /// # Errors
    /// The store's error.
    pub async fn stats(&self) -> Result<StatsResponse, WorkerError> {
        let opened = self.opened().await?;
        let store = opened.store.clone();
        let stored = blocking(move || Ok(lock(&store).stats()?)).await?;
        let processing = opened.processing.load(Ordering::Relaxed);
        Ok(StatsResponse {
            indexed: stored.indexed,
            queued: stored.queued.saturating_sub(processing),
            processing,
            chunks: stored.chunks,
            failures: stored.skipped,
            stalled: opened
                .stalled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    }
}

/// The path `forget` removes for `path`: resolved through links if it
/// still exists, else made absolute as written (a folder deleted from disk
/// can still be forgotten). Callers in another working directory than the
/// service resolve it themselves, with this.
///
/// # Errors
/// The current directory cannot be read (for a relative path).
pub fn forget_path(path: &Path) -> std::io::Result<PathBuf> {
    path.canonicalize().or_else(|_| lexical_absolute(path))
}

/// `path` made absolute (against the working directory) with every `.`
/// and `..` resolved by its text alone, touching no file: `/a/b/../c` is
/// `/a/c`, and `..` never climbs above `/`. A check of this path against
/// a root cannot be escaped by `..`.
///
/// # Errors
/// The working directory cannot be read (for a relative path).
pub fn lexical_absolute(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let absolute = std::path::absolute(path)?;
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// Forgets `root` in `store` ([`Store::forget`]); the removed chunks.
///
/// # Errors
/// [`WorkerError::NotIndexed`] (naming `asked`, the path as the caller
/// gave it) if nothing is known under `root`, or the store's error.
pub fn forget_in(store: &mut Store, root: &Path, asked: PathBuf) -> Result<Vec<i64>, WorkerError> {
    match store.forget(root)? {
        (ids, true) => Ok(ids),
        (_, false) => Err(WorkerError::NotIndexed(asked)),
    }
}

/// Reciprocal rank fusion of `rankings` (each best first): a chunk scores
/// the sum of `1 / (RRF_K + rank)` over the rankings it appears in (rank
/// from 1); the best `limit`, best first. Equal fused scores are ordered by
/// each ranking's own score in turn (the first ranking's first), then by
/// id: the order depends on the texts, not on the order they were stored.
pub fn fuse(rankings: &[Vec<(i64, f32)>], limit: usize) -> Vec<(i64, f32)> {
    let mut scores: HashMap<i64, (f32, Vec<f32>)> = HashMap::new();
    for (r, ranking) in rankings.iter().enumerate() {
        for (rank, (id, own)) in ranking.iter().enumerate() {
            let entry = scores
                .entry(*id)
                .or_insert_with(|| (0.0, vec![f32::NEG_INFINITY; rankings.len()]));
            entry.0 += 1.0 / (crate::limits::RRF_K + rank as f32 + 1.0);
            entry.1[r] = *own;
        }
    }
    let mut fused: Vec<(i64, (f32, Vec<f32>))> = scores.into_iter().collect();
    fused.sort_by(|a, b| {
        let by_own =
            a.1.1
                .iter()
                .zip(&b.1.1)
                .fold(std::cmp::Ordering::Equal, |o, (x, y)| {
                    o.then(y.total_cmp(x))
                });
        b.1.0.total_cmp(&a.1.0).then(by_own).then(a.0.cmp(&b.0))
    });
    fused.truncate(limit);
    fused
        .into_iter()
        .map(|(id, (score, _))| (id, score))
        .collect()
}

/// A router serving `worker.init`, `worker.index`, `worker.search` and
/// `worker.stats` from `worker`.
pub fn router(worker: Worker) -> Router {
    let mut router = Router::new();
    let w = worker.clone();
    router.handle::<WorkerInit, _, _>(move |_, request: InitRequest| {
        let w = w.clone();
        async move {
            w.init(&request.db_dir).await?;
            Ok(InitResponse { ready: true })
        }
    });
    let w = worker.clone();
    router.handle::<WorkerIndex, _, _>(move |_, request: IndexRequest| {
        let w = w.clone();
        async move {
            let queued = w.index(request.paths).await?;
            Ok(IndexResponse { queued })
        }
    });
    let w = worker.clone();
    router.handle::<WorkerSearch, _, _>(move |_, request: SearchRequest| {
        let w = w.clone();
        async move {
            let results = w
                .search_mode(request.query, request.limit as usize, request.mode)
                .await?;
            Ok(SearchResponse { results })
        }
    });
    router.handle::<WorkerStats, _, _>(move |_, _: crate::bus::Empty| {
        let w = worker.clone();
        async move { Ok(w.stats().await?) }
    });
    router
}

fn lock(store: &SyncMutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave the database half-written
    // (every write is a transaction), so the store stays usable.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static,
) -> Result<T, WorkerError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(WorkerError::Query(format!("worker task failed: {e}"))))
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

/// Walks `paths` (recorded as roots if `record`), forgets deleted files,
/// queues new and changed ones.
fn walk(state: &Opened, paths: &[PathBuf], record: bool) -> Result<u64, WorkerError> {
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
async fn indexer(inner: Arc<Inner>, state: std::sync::Weak<Opened>) {
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
    let reader = {
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
    };
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_file = 0u64;
    let mut batch: Vec<(u64, usize)> = Vec::new();
    let mut in_flight = FuturesOrdered::new();
    let mut input_open = true;
    let settings = inner.settings;
    let result = loop {
        let room = in_flight.len() < settings.in_flight;
        tokio::select! {
            file = rx.recv(), if input_open && room => {
                match file {
                    None => input_open = false,
                    Some(Prepared::Chunks { path, meta, hash, chunks, cut_from }) if !chunks.is_empty() => {
                        let n = chunks.len();
                        batch.extend((0..n).map(|i| (next_file, i)));
                        pending.insert(next_file, Pending {
                            path, meta, hash, chunks, cut_from,
                            vectors: vec![None; n],
                            missing: n,
                            failed: None,
                        });
                        next_file += 1;
                    }
                    Some(other) => {
                        if let Err(e) = commit_other(opened, other).await {
                            break Err(e);
                        }
                    }
                }
                // Full batches go now; a partial one when nothing else is
                // coming soon or the embedder is idle.
                while batch.len() >= settings.batch_chunks && in_flight.len() < settings.in_flight {
                    let rest = batch.split_off(settings.batch_chunks);
                    in_flight.push_back(send_batch(inner, &pending, std::mem::replace(&mut batch, rest)));
                }
                if !batch.is_empty() && (!input_open || (rx.is_empty() && in_flight.is_empty())) {
                    in_flight.push_back(send_batch(inner, &pending, std::mem::take(&mut batch)));
                }
            }
            Some((keys, response)) = in_flight.next(), if !in_flight.is_empty() => {
                let rows = match response {
                    Ok(rows) => rows,
                    Err(e) => break Err(WorkerError::Embedder(e)),
                };
                let mut done = Vec::new();
                for ((file, chunk), row) in keys.into_iter().zip(rows) {
                    let Some(p) = pending.get_mut(&file) else { continue };
                    match row {
                        Err(reason) => p.failed = Some(reason.0),
                        Ok(vector) => p.vectors[chunk] = Some(vector),
                    }
                    p.missing -= 1;
                    if p.missing == 0 {
                        done.push(file);
                    }
                }
                let mut failed_commit = None;
                for file in done {
                    let Some(p) = pending.remove(&file) else { continue };
                    if let Err(e) = commit_pending(opened, p, inner.model.dimension as usize).await {
                        failed_commit = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed_commit {
                    break Err(e);
                }
                if !batch.is_empty() && (!input_open || rx.is_empty()) && in_flight.len() < settings.in_flight {
                    in_flight.push_back(send_batch(inner, &pending, std::mem::take(&mut batch)));
                }
            }
            else => break Ok(()),
        }
    };
    reader.abort();
    result
}

type BatchResult = (Vec<(u64, usize)>, Result<Vec<Row>, EmbedError>);

fn send_batch(
    inner: &Arc<Inner>,
    pending: &HashMap<u64, Pending>,
    keys: Vec<(u64, usize)>,
) -> impl std::future::Future<Output = BatchResult> + use<> {
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
                    let wait = e
                        .retry_after()
                        .unwrap_or_default()
                        .max(crate::limits::INDEX_UNAVAILABLE_POLL);
                    tracing::info!(?wait, "the embedder is recovering; waiting");
                    tokio::time::sleep(wait).await;
                }
                _ => break response,
            }
        };
        (keys, response)
    }
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
