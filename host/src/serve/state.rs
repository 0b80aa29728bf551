//! The service's shared state ([`State`]): the pool serving now, the
//! worker of its model, the watch on the index's roots, the index jobs, and
//! the counters the drain reports.
//!
//! # Invariants
//! - Ready while any pool can serve: a reload (whose old pool serves until
//!   the new one is up) does not take the service out of a load balancer.
//! - Every request is counted while it runs ([`State::running`]); once the
//!   listeners stop, a request dropped without its response is counted as
//!   cut off, so the last line says what was answered and what was cut.
//! - The index jobs remembered are bounded
//!   ([`limits::SERVE_INDEX_JOBS_KEPT`]).
//! - A request's deadline is its header's, within
//!   [`limits::SERVE_MAX_REQUEST_DEADLINE`], else the configured default.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::{DEADLINE_HEADER, ServeOptions, api, listen};
use crate::embedder::{Embedder, Generation};
use crate::limits;
use crate::worker::{Worker, WorkerError};

/// Why the service is not ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The first pool is starting.
    Starting,
    /// Serving.
    Ready,
    /// A reload is starting a new pool (the old one still serves).
    Reloading,
}

/// Why the index cannot be served: it did not open for the current model.
#[derive(Debug, thiserror::Error)]
#[error("the index at `{}` cannot be used: {source}", .db.display())]
pub(crate) struct IndexUnusable {
    pub(crate) db: PathBuf,
    #[source]
    pub(crate) source: WorkerError,
}

/// The worker of the current model, or why there is none.
#[derive(Clone)]
pub(crate) struct WorkerEntry {
    pub(crate) worker: Result<Worker, Arc<IndexUnusable>>,
    pub(super) model: (String, u32),
}

/// What is being watched, by which worker, and how to stop it.
pub(super) struct Watching {
    pub(super) roots: Vec<PathBuf>,
    pub(super) worker: Worker,
    pub(super) stop: CancellationToken,
}

/// One `POST /index`, as `GET /index` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IndexJob {
    /// Its number.
    pub id: u64,
    /// What was asked.
    pub paths: Vec<PathBuf>,
    /// `walking`, `queued` (the files are in the durable queue) or `failed`.
    pub state: &'static str,
    /// Files the walk queued.
    pub queued: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Everything the routes share.
pub struct State {
    pub(super) options: ServeOptions,
    /// `[serve]` as read at start (changes need a restart).
    pub settings: crate::config::ServeSection,
    /// The index directory.
    pub db: PathBuf,
    /// The front door every route, the worker and a NATS member use: the
    /// default model's.
    pub embedder: Arc<Embedder>,
    /// The models served beside it (`[[models]]`), by the name each is
    /// served under; each swapped in and out by a reload on its own.
    pub others: Mutex<std::collections::BTreeMap<String, Arc<Embedder>>>,
    pub(super) phase: Mutex<Phase>,
    pub(super) generations: AtomicU64,
    pub(super) worker: Mutex<Option<WorkerEntry>>,
    /// The watch keeping the index's roots fresh (`[serve] watch`).
    pub(super) watching: tokio::sync::Mutex<Option<Watching>>,
    pub(super) jobs: Mutex<VecDeque<IndexJob>>,
    pub(super) next_job: AtomicU64,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The key every off-loopback request must carry.
    pub api_key: Option<String>,
    /// Where clients may index, resolved.
    pub roots: Vec<PathBuf>,
    /// Pools stopping after a reload.
    pub(super) retiring: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Requests being handled now.
    pub(super) in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests answered since SIGTERM.
    pub(super) drained: std::sync::atomic::AtomicUsize,
    /// Requests dropped unanswered since SIGTERM (the grace period ended).
    pub(super) cut: std::sync::atomic::AtomicUsize,
    /// Set once SIGTERM has stopped the listeners.
    pub(super) stopping: std::sync::atomic::AtomicBool,
    /// The service's one admission limit (`[serve] max_concurrent_requests`),
    /// taken by every route that costs work once its body is read.
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Cancelled at SIGTERM: bodies still arriving are answered 503 at once.
    pub draining: CancellationToken,
    /// The open connections of both listeners, and their cap.
    pub connections: Arc<listen::Connections>,
    /// Bytes of request bodies held now, at most
    /// [`limits::SERVE_BODY_BYTES_IN_FLIGHT`].
    pub bodies: Arc<tokio::sync::Semaphore>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// The pool serving now, or why none does (503 with its reason).
    ///
    /// # Errors
    /// The reason, while the service starts or the pool cools down.
    pub fn pool(&self) -> Result<Arc<Generation>, api::ApiError> {
        Ok(self.embedder.generation()?)
    }

    /// The generation serving the model `name` (any of its names, see
    /// [`super::openai::serves`]), or the default model's for none.
    ///
    /// # Errors
    /// 404 (`param: model`) naming the models served, for a name none of
    /// them has; the model's own 503 while it is not serving.
    pub fn pool_for(&self, name: Option<&str>) -> Result<Arc<Generation>, api::ApiError> {
        let default = self.pool();
        let Some(name) = name else { return default };
        if let Ok(pool) = &default
            && super::openai::serves(pool, name)
        {
            return default;
        }
        let others: Vec<(String, Arc<Embedder>)> = lock(&self.others)
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (served, embedder) in &others {
            let generation = embedder.generation();
            let named = served.eq_ignore_ascii_case(name.trim())
                || generation
                    .as_ref()
                    .is_ok_and(|g| super::openai::serves(g, name));
            if named {
                return Ok(generation?);
            }
        }
        let mut names: Vec<String> = default
            .iter()
            .map(|p| super::openai::served_id(p))
            .collect();
        names.extend(others.into_iter().map(|(n, _)| n));
        Err(api::ApiError {
            param: Some("model".into()),
            ..api::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!(
                    "the model `{}` is not served here; this service serves `{}`",
                    crate::untrusted::sanitize(name, 256),
                    names.join("`, `")
                ),
            )
        })
    }

    /// Every generation serving now: the default model's first, then the
    /// others' by name.
    pub fn pools(&self) -> Vec<Arc<Generation>> {
        let others: Vec<Arc<Embedder>> = lock(&self.others).values().cloned().collect();
        self.pool()
            .into_iter()
            .chain(others.iter().filter_map(|e| e.generation().ok()))
            .collect()
    }

    /// Counts a request as running until the guard is dropped (answered or
    /// abandoned), so the drain can say what it cut off.
    pub fn running(self: &Arc<Self>) -> Running {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Running {
            state: self.clone(),
            answered: false,
        }
    }

    /// HTTP requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Why the service is not ready, or `None` if it is: ready while any
    /// pool can serve, so a reload (whose old pool serves until the new one
    /// is up) does not take the service out of a load balancer.
    pub fn not_ready(&self) -> Option<String> {
        if *lock(&self.phase) == Phase::Starting {
            return Some("the embedder backend is starting".into());
        }
        let Ok(pool) = self.pool() else {
            return Some("the embedder backend is starting".into());
        };
        pool.escalated()
            .map(|reason| format!("the embedder backend is cooling down after failures: {reason}"))
    }

    /// Whether a reload is starting a new pool (the current one serves).
    pub fn reloading(&self) -> bool {
        *lock(&self.phase) == Phase::Reloading
    }

    /// The worker, or why there is none.
    pub(crate) fn worker(&self) -> Result<Worker, api::ApiError> {
        match lock(&self.worker).as_ref().map(|w| w.worker.clone()) {
            Some(Ok(w)) => Ok(w),
            Some(Err(e)) => Err(api::ApiError::new(
                axum::http::StatusCode::CONFLICT,
                e.to_string(),
            )),
            None => Err(api::ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the index is not open yet: the embedder backend is starting",
            )
            .retry_after(limits::SERVE_RETRY_AFTER)),
        }
    }

    /// Records a new index job and returns its id.
    fn add_job(&self, paths: Vec<PathBuf>) -> u64 {
        let id = self.next_job.fetch_add(1, Ordering::Relaxed) + 1;
        let mut jobs = lock(&self.jobs);
        jobs.push_front(IndexJob {
            id,
            paths,
            state: "walking",
            queued: 0,
            error: None,
        });
        jobs.truncate(limits::SERVE_INDEX_JOBS_KEPT);
        id
    }

    fn finish_job(&self, id: u64, result: Result<u64, WorkerError>) {
        if let Some(job) = lock(&self.jobs).iter_mut().find(|j| j.id == id) {
            match result {
                Ok(queued) => {
                    job.state = "queued";
                    job.queued = queued;
                }
                Err(e) => {
                    job.state = "failed";
                    job.error = Some(e.to_string());
                }
            }
        }
    }

    /// The index jobs, newest first.
    pub fn jobs(&self) -> Vec<IndexJob> {
        lock(&self.jobs).iter().cloned().collect()
    }

    /// Starts indexing `paths` in the background and returns the job's id.
    pub(crate) fn start_index(self: &Arc<Self>, worker: Worker, paths: Vec<PathBuf>) -> u64 {
        let id = self.add_job(paths.clone());
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            let result = worker.index(paths).await;
            if let Some(state) = state.upgrade() {
                let walked = result.is_ok();
                state.finish_job(id, result);
                if walked {
                    state.rewatch().await;
                }
            }
        });
        id
    }

    /// Watches the index's roots (`[serve] watch`), restarting the watch
    /// when the roots or the worker changed: after the index opens, after
    /// a reload that opened another, after `POST /index` and `/forget`.
    /// A watch starts with a walk of every root, so what changed while
    /// nothing watched (the service was down) is indexed too.
    pub(crate) async fn rewatch(self: &Arc<Self>) {
        if !self.settings.watch {
            return;
        }
        let Ok(worker) = self.worker() else { return };
        let roots: Vec<PathBuf> = match worker.roots().await {
            Ok(roots) => roots
                .into_iter()
                .map(|r| r.path)
                .filter(|p| !p.as_os_str().is_empty() && p.exists())
                .collect(),
            Err(e) => {
                tracing::warn!("cannot read the index's roots; not watching: {e}");
                return;
            }
        };
        let mut watching = self.watching.lock().await;
        if watching
            .as_ref()
            .is_some_and(|w| w.roots == roots && w.worker.same(&worker))
        {
            return;
        }
        if let Some(old) = watching.take() {
            old.stop.cancel();
        }
        if roots.is_empty() {
            return;
        }
        let stop = CancellationToken::new();
        tokio::spawn({
            let (worker, roots, stop) = (worker.clone(), roots.clone(), stop.clone());
            async move {
                tracing::info!(roots = roots.len(), "watching the index's roots");
                let result = crate::worker::watch::watch(&worker, &roots, stop, |batch| {
                    if batch.events > 0 {
                        tracing::info!(
                            events = batch.events,
                            folders = batch.folders.len(),
                            files = batch.stats.indexed,
                            chunks = batch.stats.chunks,
                            "index kept fresh"
                        );
                    }
                })
                .await;
                if let Err(e) = result {
                    tracing::warn!("watching the index's roots stopped: {e}");
                }
            }
        });
        *watching = Some(Watching {
            roots,
            worker,
            stop,
        });
    }

    /// The roots being watched now.
    pub(crate) async fn watched(&self) -> Vec<PathBuf> {
        self.watching
            .lock()
            .await
            .as_ref()
            .map(|w| w.roots.clone())
            .unwrap_or_default()
    }

    /// The request's deadline: its header's, within bounds, else the
    /// configured default.
    ///
    /// # Errors
    /// 400 if the header is not a number of milliseconds.
    pub fn deadline(&self, headers: &axum::http::HeaderMap) -> Result<Duration, api::ApiError> {
        match headers.get(DEADLINE_HEADER) {
            None => Ok(Duration::from_millis(self.settings.request_deadline_ms)),
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map(|ms| Duration::from_millis(ms).min(limits::SERVE_MAX_REQUEST_DEADLINE))
                .ok_or_else(|| {
                    api::ApiError::bad(
                        DEADLINE_HEADER,
                        format!("the `{DEADLINE_HEADER}` header must be a positive number of milliseconds"),
                    )
                }),
        }
    }
}

/// A request being handled (see [`State::running`]).
pub struct Running {
    state: Arc<State>,
    answered: bool,
}

impl Running {
    /// The request has its response (dropped without it, it was cut off).
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.state.stopping.load(Ordering::SeqCst) {
            let counter = if self.answered {
                &self.state.drained
            } else {
                &self.state.cut
            };
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}
