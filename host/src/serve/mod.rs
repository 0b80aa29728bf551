//! `embedhost serve`: a long-running embedding service over HTTP.
//!
//! The parts: [`routes`] (the OpenAI-, TEI- and embedhost-shaped
//! routes, every one through the front door, [`crate::embedder`]), [`api`] (error shapes and field-by-field body reading) and
//! [`client`] (the CLI's way to a running service, over its Unix socket).
//! Here: binding and starting ([`run`] in steps); the shared state in
//! `state.rs`; the signals, reload, drain and shutdown in `lifecycle.rs`.
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
mod lifecycle;
pub mod listen;
mod models;
mod openai;
pub mod routes;
mod settings;
mod state;
mod tei;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::embedder::Embedder;
use crate::limits;
use lifecycle::Signals;
pub use state::{IndexJob, Phase, Running, State};

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
    Backend(#[from] crate::launch::LaunchError),
    /// One of the models beside the default one did not start.
    #[error("the model `{name}` did not start: {source}")]
    Model {
        /// The name it is served under.
        name: String,
        /// Why.
        #[source]
        source: crate::launch::LaunchError,
    },
    /// The models' pools do not fit the machine's memory together.
    #[error(transparent)]
    Memory(crate::ceilings::ModelsMemoryError),
    /// SIGTERM or Ctrl-C came before the backend was up.
    #[error("the embedder backend did not start: stopped before the backend was up")]
    StoppedStarting,
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

/// The socket a service for the index in `db` listens on.
pub fn socket_path(db: &Path) -> PathBuf {
    db.join(SOCKET_DIR).join(SOCKET_FILE)
}

/// Runs the service until SIGTERM or Ctrl-C: binds its addresses, builds
/// its state, starts the listeners, starts the backend and serves the
/// signals until a stop, then drains.
///
/// # Errors
/// [`ServeError`] if it cannot start; once started it stops cleanly.
pub async fn run(options: ServeOptions) -> Result<(), ServeError> {
    let config = Config::discover(options.config.as_deref())
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let config_nats = config.nats.url.clone();
    let bound = bind(&options, &config).await?;
    let db = bound.db.clone();
    let state = new_state(
        options,
        config.serve.clone(),
        bound.db,
        bound.api_key,
        bound.roots,
    );
    let stop = CancellationToken::new();
    let (listeners, cut) = start_listeners(&state, bound.tcp, bound.unix, &stop);
    announce(bound.local, &db);
    let mut signals = Signals::new().map_err(|e| ServeError::Config(format!("signals: {e}")))?;
    let result = lifecycle::serve_signals(&state, config, config_nats, &stop, &mut signals).await;
    lifecycle::stop(&state, listeners, &stop, &cut, &db).await;
    result
}

/// What [`bind`] opened and resolved.
struct Bound {
    db: PathBuf,
    api_key: Option<String>,
    roots: Vec<PathBuf>,
    tcp: tokio::net::TcpListener,
    local: SocketAddr,
    unix: tokio::net::UnixListener,
}

/// Resolves the index directory, the address, the API key (refusing to
/// serve off loopback without one) and `[serve] index_roots`, then binds
/// the TCP address and the owner-only socket.
async fn bind(options: &ServeOptions, config: &Config) -> Result<Bound, ServeError> {
    let settings = &config.serve;
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
    let api_key = api_key(options, settings)?;
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
    let tcp = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(|e| ServeError::Listen {
            addr: listen.clone(),
            message: e.to_string(),
        })?;
    let local = tcp.local_addr().map_err(|e| ServeError::Listen {
        addr: listen.clone(),
        message: e.to_string(),
    })?;
    let unix = bind_socket(&db).await?;
    Ok(Bound {
        db,
        api_key,
        roots,
        tcp,
        local,
        unix,
    })
}

/// The service's state before its backend starts, with the connection cap
/// under the file descriptor limit (raised first).
fn new_state(
    options: ServeOptions,
    settings: crate::config::ServeSection,
    db: PathBuf,
    api_key: Option<String>,
    roots: Vec<PathBuf>,
) -> Arc<State> {
    let settings_concurrency = settings.max_concurrent_requests;
    let nofile = listen::raise_nofile();
    let connections = listen::Connections::new(settings.max_connections, nofile);
    tracing::info!(
        nofile,
        max_connections = connections.cap(),
        "file descriptor limit and connection cap"
    );
    Arc::new(State {
        options,
        settings,
        db,
        embedder: Arc::new(Embedder::new()),
        others: Mutex::default(),
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
        connections,
        bodies: Arc::new(tokio::sync::Semaphore::new(
            limits::SERVE_BODY_BYTES_IN_FLIGHT,
        )),
    })
}

/// The running listeners and the metrics' upkeep, until the drain.
struct Listeners {
    tcp: tokio::task::JoinHandle<listen::Drained>,
    socket: tokio::task::JoinHandle<listen::Drained>,
    upkeep: tokio::task::JoinHandle<()>,
}

/// Starts the metrics' upkeep and both listeners (the network's routes on
/// `tcp`, the owner's on `unix`) until `stop`; the token returned cuts
/// their connections at the end of the drain.
fn start_listeners(
    state: &Arc<State>,
    tcp: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    stop: &CancellationToken,
) -> (Listeners, CancellationToken) {
    let header_timeout = Duration::from_millis(state.settings.header_timeout_ms);
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
        tcp,
        public,
        state.connections.clone(),
        header_timeout,
        stop.clone(),
        cut.clone(),
    ));
    let socket = tokio::spawn(listen::serve(
        unix,
        private,
        state.connections.clone(),
        header_timeout,
        stop.clone(),
        cut.clone(),
    ));
    let listeners = Listeners {
        tcp,
        socket,
        upkeep,
    };
    (listeners, cut)
}

/// One line on stdout, for people and for programs that started us on
/// port 0.
fn announce(local: SocketAddr, db: &Path) {
    use std::io::Write as _;
    let line = format!(
        "embedhost serve: listening on http://{local} (socket {})\n",
        socket_path(db).display()
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
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
