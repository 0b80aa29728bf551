//! The service's life after it binds: starting the backend and opening
//! the index ([`install`]), the signals (SIGHUP reloads, SIGTERM and Ctrl-C
//! stop), the make-before-break reload, joining a NATS pool, and the drain
//! and ordered shutdown.
//!
//! # Invariants
//! - A reload (SIGHUP) starts the new pool before the old one stops, and
//!   each request keeps the pool it started on, so a swap fails no request;
//!   a reload that fails leaves the pool in force. The worker stays across
//!   a swap that keeps the model.
//! - SIGTERM and Ctrl-C stop accepting, close connections without a
//!   request at once, let requests in flight finish within the grace
//!   period, then stop the worker and every pool in order (retiring ones
//!   first): no child process outlives the service, and the last line says
//!   what was answered and what was cut.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::state::{IndexUnusable, Phase, State, WorkerEntry, lock};
use super::{Listeners, ServeError, listen, models, socket_path};
use crate::config::Config;
use crate::embedder::Generation;
use crate::limits;
use crate::worker::Worker;

/// Starts the backend (and joins NATS if asked), then serves SIGHUP
/// (reload) until SIGTERM or Ctrl-C; the backend's error if it did not
/// start.
pub(super) async fn serve_signals(
    state: &Arc<State>,
    config: Config,
    config_nats: Option<String>,
    stop: &CancellationToken,
    signals: &mut Signals,
) -> Result<(), ServeError> {
    let started = tokio::select! {
        started = install(state, config) => started,
        _ = signals.terminate() => Err(ServeError::StoppedStarting),
    };
    let nats_url = state.options.nats.clone().or_else(|| config_nats.clone());
    let started = match (started, nats_url) {
        (Ok(()), Some(url)) => join_nats(state, &url, stop.clone()).await,
        (started, _) => started,
    };
    match started {
        Ok(()) => {
            loop {
                match signals.next().await {
                    Signal::Terminate => break,
                    // A stop during a reload abandons the new pool (its
                    // supervisor stops it when dropped) and stops as usual.
                    Signal::Hangup => tokio::select! {
                        () = reload(state) => {}
                        () = signals.terminate() => break,
                    },
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Stops accepting; requests in flight finish within the grace period,
/// connections without one close at once. Then says what the drain
/// answered and cut, removes the socket of the index in `db` and stops
/// the worker and every pool.
pub(super) async fn stop(
    state: &Arc<State>,
    listeners: Listeners,
    stop: &CancellationToken,
    cut: &CancellationToken,
    db: &Path,
) {
    tracing::info!("stopping: draining requests in flight");
    state.stopping.store(true, Ordering::SeqCst);
    let running_at_stop = state.in_flight.load(Ordering::SeqCst);
    stop.cancel();
    state.draining.cancel();
    let grace = Duration::from_millis(state.settings.shutdown_grace_ms);
    let drained = listen::drain(
        listeners.tcp,
        listeners.socket,
        &state.connections,
        grace,
        cut,
    )
    .await;
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
    listeners.upkeep.abort();
    let _ = std::fs::remove_file(socket_path(db));
    shut_down(state).await;
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
    models::shut_down_others(state).await;
}

/// Starts the first pool and opens the index.
async fn install(state: &Arc<State>, config: Config) -> Result<(), ServeError> {
    if !config.models.is_empty() {
        models::check_memory(&config)?;
    }
    let others = config.clone();
    let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
    let budget = config.serve.max_batch_tokens;
    let pool = Generation::start(config, generation, None, budget).await?;
    pool.wait_all_up().await;
    tracing::info!(backend = pool.backend, model = %pool.info.model_id, "embedder pool up");
    state.embedder.install(pool.clone());
    models::start_others(state, &others).await?;
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
        Err(source) => {
            let unusable = IndexUnusable {
                db: state.db.clone(),
                source,
            };
            tracing::warn!("{unusable}");
            Err(Arc::new(unusable))
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
    let same = models::same_embedder(&config, &current.config);
    drop(current);
    // The pools the new config names must fit the machine together, as at
    // the start.
    if !config.models.is_empty()
        && let Err(e) = models::check_memory(&config)
    {
        tracing::error!("reload refused, the config in force stays: {e}");
        return;
    }
    *lock(&state.phase) = Phase::Reloading;
    if same {
        tracing::info!("reload: the default model's embedder is unchanged");
    } else {
        reload_default(state, config.clone()).await;
    }
    models::reload_others(state, &config).await;
    *lock(&state.phase) = Phase::Ready;
}

/// Swaps the default model's pool for one of `config`, once it is up.
async fn reload_default(state: &Arc<State>, config: Config) {
    let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
    let budget = config.serve.max_batch_tokens;
    match Generation::start(config, generation, None, budget).await {
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
            models::retire(state, old);
        }
        Err(e) => tracing::error!("reload failed, the pool in force stays: {e}"),
    }
}

/// Joins the pool of this service's model on the NATS server at `url`,
/// until `stop`.
async fn join_nats(
    state: &Arc<State>,
    url: &str,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    use crate::bus::transport::nats;
    // Only a stop takes the pool away once it is up.
    let pool = state.pool().map_err(|_| ServeError::StoppedStarting)?;
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
    // Each model joins the queue group of its own model id.
    let others: Vec<Arc<crate::embedder::Embedder>> =
        lock(&state.others).values().cloned().collect();
    for embedder in std::iter::once(state.embedder.clone()).chain(others) {
        let Ok(pool) = embedder.generation() else {
            continue;
        };
        let joined = join_model(client.clone(), embedder, &pool, stop.clone()).await;
        joined.map_err(|e| match e {
            Some(e) => fail(e),
            None => ServeError::Listen {
                addr: shown.clone(),
                message: "the NATS task ended".into(),
            },
        })?;
    }
    Ok(())
}

/// Serves `embedder` (whose generation now is `pool`) to its model's queue
/// group on `client`, until `stop`; subscribed when this returns.
///
/// # Errors
/// The subscription's error, or `None` if the task ended first.
async fn join_model(
    client: async_nats::Client,
    embedder: Arc<crate::embedder::Embedder>,
    pool: &Generation,
    stop: CancellationToken,
) -> Result<(), Option<crate::bus::transport::nats::NatsError>> {
    use crate::bus::transport::nats;
    let room = pool.status().len().max(1) * limits::NATS_PENDING_PER_INSTANCE;
    let model = pool.config.model_id().to_string();
    let weak = Arc::downgrade(&embedder);
    let router = Arc::new(crate::embedder::peer::router(
        embedder,
        crate::embedder::peer::Role::Member,
    ));
    let serving: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        weak.upgrade()
            .and_then(|e| e.generation().ok())
            .map(|p| p.info.model_id.to_string())
            .unwrap_or_default()
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let served = nats::serve(client, &model, router, room, serving, stop, ready_tx).await;
        if let Err(e) = served {
            tracing::error!("NATS: {e}");
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Some(e)),
        Err(_) => Err(None),
    }
}

/// SIGTERM, SIGINT and SIGHUP as futures.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn new() -> std::io::Result<Self> {
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
