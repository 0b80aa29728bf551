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
//! The walk and the indexer task are in `indexer.rs`; searching by meaning,
//! by keyword or both fused, in `search.rs`.
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
mod indexer;
pub mod open;
mod search;
pub mod store;
pub mod vectors;
pub mod watch;

pub use search::fuse;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, RwLock};

use tokio::sync::{Mutex, Notify};

use crate::backend::ModelInfo;
use crate::bus::{ErrorCode, RemoteError, Router};
use crate::embedder::{EmbedError, Embedder};
use crate::messages::{
    IndexRequest, IndexResponse, InitRequest, InitResponse, SearchRequest, SearchResponse,
    StatsResponse, WorkerIndex, WorkerInit, WorkerSearch, WorkerStats,
};
use chunk::{ChunkSettings, Tokens};
use store::{Store, StoreError};
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
            WorkerError::Embedder(EmbedError::Input { .. }) => ErrorCode::InvalidInput,
            WorkerError::Embedder(EmbedError::TooSlow { .. } | EmbedError::Counts { .. }) => {
                ErrorCode::InvalidRequest
            }
            _ => ErrorCode::Failed,
        };
        let retry_after = match &e {
            WorkerError::Embedder(e) => e.retry_after(),
            _ => None,
        };
        RemoteError::new(code, e.to_string()).retry_after(retry_after)
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
    /// vectors, cutting files with `tokens`. Chunks leave room for the
    /// document prompt the front door puts before each of them, so the
    /// model reads every token of a chunk.
    pub fn new(
        embedder: Arc<Embedder>,
        model: ModelInfo,
        tokens: Tokens,
        settings: WorkerSettings,
    ) -> Self {
        let prompt = embedder
            .generation()
            .ok()
            .and_then(|g| {
                g.form
                    .prompt(false)
                    .map(|p| tokens.spans(p).map_or(0, |s| s.len()))
            })
            .unwrap_or(0);
        let window = (model.max_input_tokens as usize).saturating_sub(prompt);
        let settings = WorkerSettings {
            chunk: settings.chunk.fitted(window),
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
        tokio::spawn(indexer::indexer(self.inner.clone(), Arc::downgrade(&state)));
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
        let queued = blocking(move || indexer::walk(&state, &paths, roots)).await?;
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
