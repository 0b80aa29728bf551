//! `embedhost serve`: a long-running embedding service over HTTP.
//!
//! The parts: [`routes`] (the OpenAI-, TEI- and embedhost-shaped
//! routes, every one through the front door, [`crate::embedder`]), [`api`] (error shapes and field-by-field body reading) and
//! [`client`] (the CLI's way to a running service, over its Unix socket).
//!
//! Invariants, and why:
//! - The listener is up before the backend: `/health` answers at once and
//!   `/ready` says why the service is not ready (starting, reloading,
//!   cooling down after an escalation), as a load balancer needs.
//! - Off loopback, every route but `/health` needs the API key, compared
//!   in constant time; the service refuses to start off loopback without
//!   one. The Unix socket is owner-only (a private directory), so it needs
//!   no key.
//! - A reload (SIGHUP) starts the new pool before the old one stops, and
//!   each request keeps the pool it started on, so a swap fails no request.
//! - SIGTERM and Ctrl-C stop accepting, close connections without a
//!   request at once, let requests in flight finish within the grace
//!   period, then stop every pool in order: no child process outlives the
//!   service, and the last line says what was answered and what was cut.
//! - Everything a client can make large or slow is bounded: connections
//!   ([`listen`]: a cap below the fd limit, header and keep-alive time),
//!   body size, time and bytes in flight, requests at once (one admission
//!   limit, taken after the body: [`admit`]), inputs per request, tokens
//!   per input (counted from words before tokenizing), text being
//!   tokenized, the time a request would take against its deadline, the
//!   batch queue (round-robin by request: [`crate::embedder::batcher`]), the deadline, the
//!   index jobs remembered.

pub mod admit;
pub mod api;
pub mod client;
pub mod listen;
mod openai;
pub mod routes;
mod settings;
mod tei;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::embedder::{Embedder, Generation};
use crate::limits;
use crate::worker::Worker;

/// Environment variable holding the API key.
pub const API_KEY_ENV: &str = "EMBEDHOST_API_KEY";

/// The header a request sets its own deadline with, in milliseconds.
pub const DEADLINE_HEADER: &str = "x-embedhost-deadline-ms";

/// The socket's directory inside the index directory (owner-only).
pub const SOCKET_DIR: &str = "serve";
/// The socket's file name.
pub const SOCKET_FILE: &str = "embedhost.sock";

/// Errors of `embedhost serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration could not be read.
    #[error("{0}")]
    Config(String),
    /// The address is not loopback and there is no API key.
    #[error(
        "`{0}` is not a loopback address: set an API key (--api-key, {API_KEY_ENV} or [serve] api_key_file) to serve beyond this machine"
    )]
    NoApiKey(String),
    /// The API key is too short to be safe.
    #[error("the API key is {0} bytes; it must be at least {min}", min = limits::MIN_API_KEY_BYTES)]
    WeakKey(usize),
    /// The address could not be resolved or bound.
    #[error("cannot listen on `{addr}`: {message}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// Another service already serves this index.
    #[error("a service already serves the index at `{0}` (its socket answers)")]
    AlreadyServing(PathBuf),
    /// The backend did not start.
    #[error("the embedder backend did not start: {0}")]
    Backend(String),
}

/// What `embedhost serve` was asked on its command line.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// `--db`.
    pub db: Option<PathBuf>,
    /// `--nats`.
    pub nats: Option<String>,
}

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

/// The worker of the current model, or why there is none.
#[derive(Clone)]
pub(crate) struct WorkerEntry {
    pub(crate) worker: Result<Worker, String>,
    model: (String, u32),
}

/// What is being watched, by which worker, and how to stop it.
struct Watching {
    roots: Vec<PathBuf>,
    worker: Worker,
    stop: CancellationToken,
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
    options: ServeOptions,
    /// `[serve]` as read at start (changes need a restart).
    pub settings: crate::config::ServeSection,
    /// The index directory.
    pub db: PathBuf,
    /// The front door every route, the worker and a NATS member use.
    pub embedder: Arc<Embedder>,
    phase: Mutex<Phase>,
    generations: AtomicU64,
    worker: Mutex<Option<WorkerEntry>>,
    /// The watch keeping the index's roots fresh (`[serve] watch`).
    watching: tokio::sync::Mutex<Option<Watching>>,
    jobs: Mutex<VecDeque<IndexJob>>,
    next_job: AtomicU64,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The key every off-loopback request must carry.
    pub api_key: Option<String>,
    /// Where clients may index, resolved.
    pub roots: Vec<PathBuf>,
    /// Pools stopping after a reload.
    retiring: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Requests being handled now.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests answered since SIGTERM.
    drained: std::sync::atomic::AtomicUsize,
    /// Requests dropped unanswered since SIGTERM (the grace period ended).
    cut: std::sync::atomic::AtomicUsize,
    /// Set once SIGTERM has stopped the listeners.
    stopping: std::sync::atomic::AtomicBool,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
            Some(Err(e)) => Err(api::ApiError::new(axum::http::StatusCode::CONFLICT, e)),
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

    fn finish_job(&self, id: u64, result: Result<u64, String>) {
        if let Some(job) = lock(&self.jobs).iter_mut().find(|j| j.id == id) {
            match result {
                Ok(queued) => {
                    job.state = "queued";
                    job.queued = queued;
                }
                Err(e) => {
                    job.state = "failed";
                    job.error = Some(e);
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
            let result = worker.index(paths).await.map_err(|e| e.to_string());
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

/// The socket a service for the index in `db` listens on.
pub fn socket_path(db: &Path) -> PathBuf {
    db.join(SOCKET_DIR).join(SOCKET_FILE)
}

/// Runs the service until SIGTERM or Ctrl-C.
///
/// # Errors
/// [`ServeError`] if it cannot start; once started it stops cleanly.
pub async fn run(options: ServeOptions) -> Result<(), ServeError> {
    let config = Config::discover(options.config.as_deref())
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let settings = config.serve.clone();
    let config_nats = config.nats.url.clone();
    let db = config
        .index_dir(options.db.as_deref())
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let listen = options
        .listen
        .clone()
        .or_else(|| settings.listen.clone())
        .unwrap_or_else(|| limits::DEFAULT_SERVE_LISTEN.to_string());
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&listen)
        .await
        .map_err(|e| ServeError::Listen {
            addr: listen.clone(),
            message: e.to_string(),
        })?
        .collect();
    let loopback = !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback());
    let api_key = api_key(&options, &settings)?;
    if !loopback && api_key.is_none() {
        return Err(ServeError::NoApiKey(listen));
    }
    let roots = settings
        .index_roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(r).map_err(|e| {
                ServeError::Config(format!("[serve] index_roots: `{}`: {e}", r.display()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(|e| ServeError::Listen {
            addr: listen.clone(),
            message: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| ServeError::Listen {
        addr: listen.clone(),
        message: e.to_string(),
    })?;
    let unix = bind_socket(&db).await?;
    let settings_concurrency = settings.max_concurrent_requests;
    let nofile = listen::raise_nofile();
    let connections = listen::Connections::new(settings.max_connections, nofile);
    tracing::info!(
        nofile,
        max_connections = connections.cap(),
        "file descriptor limit and connection cap"
    );
    let header_timeout = Duration::from_millis(settings.header_timeout_ms);

    let state = Arc::new(State {
        options,
        settings,
        db: db.clone(),
        embedder: Arc::new(Embedder::new()),
        phase: Mutex::new(Phase::Starting),
        generations: AtomicU64::new(0),
        worker: Mutex::new(None),
        watching: tokio::sync::Mutex::new(None),
        jobs: Mutex::new(VecDeque::new()),
        next_job: AtomicU64::new(0),
        prometheus: routes::prometheus(),
        api_key,
        roots,
        retiring: Mutex::new(Vec::new()),
        in_flight: Arc::default(),
        drained: Default::default(),
        cut: Default::default(),
        stopping: Default::default(),
        admission: Arc::new(tokio::sync::Semaphore::new(settings_concurrency)),
        draining: CancellationToken::new(),
        connections: connections.clone(),
        bodies: Arc::new(tokio::sync::Semaphore::new(
            limits::SERVE_BODY_BYTES_IN_FLIGHT,
        )),
    });

    let stop = CancellationToken::new();
    let upkeep = tokio::spawn({
        let handle = state.prometheus.clone();
        async move {
            let mut tick = tokio::time::interval(limits::SERVE_METRICS_UPKEEP);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        }
    });
    let public = routes::router(state.clone(), routes::Access::Network);
    let private = routes::router(state.clone(), routes::Access::Owner);
    let cut = CancellationToken::new();
    let tcp = tokio::spawn(listen::serve(
        listener,
        public,
        connections.clone(),
        header_timeout,
        stop.clone(),
        cut.clone(),
    ));
    let socket = tokio::spawn(listen::serve(
        unix,
        private,
        connections.clone(),
        header_timeout,
        stop.clone(),
        cut.clone(),
    ));
    // One line on stdout, for people and for programs that started us on
    // port 0.
    {
        use std::io::Write as _;
        let line = format!(
            "embedhost serve: listening on http://{local} (socket {})\n",
            socket_path(&db).display()
        );
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    }

    let mut signals = Signals::new().map_err(|e| ServeError::Config(format!("signals: {e}")))?;
    let started = tokio::select! {
        started = install(&state, config) => started,
        _ = signals.terminate() => Err("stopped before the backend was up".to_string()),
    };
    let nats_url = state.options.nats.clone().or_else(|| config_nats.clone());
    let started = match (started, nats_url) {
        (Ok(()), Some(url)) => join_nats(&state, &url, stop.clone())
            .await
            .map_err(|e| e.to_string()),
        (started, _) => started,
    };
    let result = match started {
        Ok(()) => {
            loop {
                match signals.next().await {
                    Signal::Terminate => break,
                    // A stop during a reload abandons the new pool (its
                    // supervisor stops it when dropped) and stops as usual.
                    Signal::Hangup => tokio::select! {
                        () = reload(&state) => {}
                        () = signals.terminate() => break,
                    },
                }
            }
            Ok(())
        }
        Err(e) => Err(ServeError::Backend(e)),
    };

    // Stop accepting; requests in flight finish within the grace period,
    // connections without one close at once.
    tracing::info!("stopping: draining requests in flight");
    state.stopping.store(true, Ordering::SeqCst);
    let running_at_stop = state.in_flight.load(Ordering::SeqCst);
    stop.cancel();
    state.draining.cancel();
    let grace = Duration::from_millis(state.settings.shutdown_grace_ms);
    let drained = listen::drain(tcp, socket, &state.connections, grace, &cut).await;
    // One last line on stdout, for people and for the programs that watch
    // us: what the drain answered and what it had to cut off.
    let line = format!(
        "embedhost serve: stopped; {} request(s) were running at the stop, {} answered during the drain, {} cut off; {} connection(s) without a request closed at once, {} cut at the end of the grace period\n",
        running_at_stop,
        state.drained.load(Ordering::SeqCst),
        state.cut.load(Ordering::SeqCst) + state.in_flight.load(Ordering::SeqCst),
        drained.closed_idle,
        drained.cut,
    );
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    }
    upkeep.abort();
    let _ = std::fs::remove_file(socket_path(&db));
    shut_down(&state).await;
    result
}

/// Stops the worker, then every pool (retiring ones first), in order.
async fn shut_down(state: &Arc<State>) {
    if let Some(watching) = state.watching.lock().await.take() {
        watching.stop.cancel();
    }
    lock(&state.worker).take();
    let retiring = std::mem::take(&mut *lock(&state.retiring));
    for task in retiring {
        task.abort();
    }
    if let Some(pool) = state.embedder.take() {
        pool.shutdown().await;
    }
}

/// The API key from `--api-key`, the environment or the key file.
fn api_key(
    options: &ServeOptions,
    settings: &crate::config::ServeSection,
) -> Result<Option<String>, ServeError> {
    let key = match (
        &options.api_key,
        std::env::var(API_KEY_ENV).ok(),
        &settings.api_key_file,
    ) {
        (Some(k), _, _) => Some(k.clone()),
        (None, Some(k), _) if !k.is_empty() => Some(k),
        (None, _, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                ServeError::Config(format!("[serve] api_key_file `{}`: {e}", file.display()))
            })?;
            Some(text.lines().next().unwrap_or_default().trim().to_string())
        }
        _ => None,
    };
    match key {
        Some(k) if k.len() < limits::MIN_API_KEY_BYTES => Err(ServeError::WeakKey(k.len())),
        key => Ok(key),
    }
}

/// Binds the owner-only socket of the index in `db`, refusing if a live
/// service already holds it and removing one left by a dead service.
async fn bind_socket(db: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(db);
    let dir = db.join(SOCKET_DIR);
    let fail = |e: std::io::Error| ServeError::Listen {
        addr: path.display().to_string(),
        message: e.to_string(),
    };
    // The index directory is private (0700) before anything is made in it.
    crate::worker::store::make_private(db).map_err(fail)?;
    std::fs::create_dir_all(&dir).map_err(fail)?;
    // The directory is the access check: only the owner can reach the
    // socket inside it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(ServeError::AlreadyServing(db.to_path_buf()));
        }
        std::fs::remove_file(&path).map_err(fail)?;
    }
    tokio::net::UnixListener::bind(&path).map_err(fail)
}

/// Starts the first pool and opens the index.
async fn install(state: &Arc<State>, config: Config) -> Result<(), String> {
    let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
    let pool = Generation::start(config, generation, None)
        .await
        .map_err(|e| e.to_string())?;
    pool.wait_all_up().await;
    tracing::info!(backend = pool.backend, model = %pool.info.model_id, "embedder pool up");
    state.embedder.install(pool.clone());
    open_worker(state, &pool).await;
    *lock(&state.phase) = Phase::Ready;
    state.rewatch().await;
    Ok(())
}

/// Opens the index with a worker for `pool`'s model, unless the worker in
/// place already serves that model (a swap of backend keeps it: the same
/// model gives the same vectors).
async fn open_worker(state: &Arc<State>, pool: &Arc<Generation>) {
    let model = (pool.info.model_id.to_string(), pool.info.dimension);
    if lock(&state.worker)
        .as_ref()
        .is_some_and(|w| w.model == model)
    {
        return;
    }
    let worker = Worker::new(
        state.embedder.clone(),
        pool.info.clone(),
        pool.tokens.clone(),
        crate::worker::WorkerSettings::from_config(&pool.config),
    )
    .with_embedder_id(pool.config.embedder_id());
    let opened = match worker.init(&state.db).await {
        Ok(()) => Ok(worker),
        Err(e) => {
            tracing::warn!("the index at {} is not served: {e}", state.db.display());
            Err(format!(
                "the index at `{}` cannot be used: {e}",
                state.db.display()
            ))
        }
    };
    *lock(&state.worker) = Some(WorkerEntry {
        worker: opened,
        model,
    });
}

/// SIGHUP: re-reads the config; a changed backend, plugin, model or pool
/// starts a new pool, which is swapped in once it is up; the old one stops
/// when its last request is answered.
async fn reload(state: &Arc<State>) {
    let config = match Config::discover(state.options.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, the config in force stays: {e}");
            return;
        }
    };
    let Ok(current) = state.pool() else { return };
    if config.serve != current.config.serve {
        tracing::warn!("[serve] changes take effect at the next start");
    }
    let same = config.embedder_id() == current.config.embedder_id()
        && config.supervisor_config() == current.config.supervisor_config()
        && config.instance_limits() == current.config.instance_limits()
        && config.native == current.config.native
        && config.model == current.config.model;
    if same {
        tracing::info!("reload: the embedder's configuration is unchanged");
        return;
    }
    drop(current);
    *lock(&state.phase) = Phase::Reloading;
    let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
    match Generation::start(config, generation, None).await {
        Ok(pool) => {
            pool.wait_all_up().await;
            let old = state.embedder.install(pool.clone());
            open_worker(state, &pool).await;
            state.rewatch().await;
            tracing::info!(
                backend = pool.backend,
                generation,
                "reload: new embedder pool swapped in"
            );
            if let Some(old) = old {
                let task = tokio::spawn(old.retire());
                let mut retiring = lock(&state.retiring);
                retiring.retain(|t| !t.is_finished());
                retiring.push(task);
            }
        }
        Err(e) => tracing::error!("reload failed, the pool in force stays: {e}"),
    }
    *lock(&state.phase) = Phase::Ready;
}

/// Joins the pool of this service's model on the NATS server at `url`,
/// until `stop`.
async fn join_nats(
    state: &Arc<State>,
    url: &str,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    use crate::bus::transport::nats;
    let pool = state.pool().map_err(|e| ServeError::Backend(e.message))?;
    let shown = nats::split_credentials(url).0;
    let fail = |e: nats::NatsError| ServeError::Listen {
        addr: shown.clone(),
        message: e.to_string(),
    };
    let client = nats::connect(url, &pool.config.nats_options(), "embedhost serve")
        .await
        .map_err(fail)?;
    if pool.backend == "remote" {
        return Err(ServeError::Config(
            "a service whose embedder is remote ([embedder] remote) cannot also serve a NATS pool"
                .into(),
        ));
    }
    let room = pool.status().len().max(1) * limits::NATS_PENDING_PER_INSTANCE;
    let model = pool.config.model_id().to_string();
    let router = Arc::new(crate::embedder::peer::router(
        state.embedder.clone(),
        crate::embedder::peer::Role::Member,
    ));
    let weak = Arc::downgrade(state);
    let serving: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        weak.upgrade()
            .and_then(|s| s.pool().ok())
            .map(|p| p.info.model_id.to_string())
            .unwrap_or_default()
    });
    // Subscribed before this returns, so a caller started after us finds us.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let served = nats::serve(client, &model, router, room, serving, stop, ready_tx).await;
        if let Err(e) = served {
            tracing::error!("NATS: {e}");
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(ServeError::Listen {
            addr: shown.clone(),
            message: "the NATS task ended".into(),
        }),
    }
}

/// SIGTERM, SIGINT and SIGHUP as futures.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn terminate(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}

enum Signal {
    Terminate,
    Hangup,
}
