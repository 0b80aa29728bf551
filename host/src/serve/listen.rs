//! The accept loop: hyper's HTTP/1 server on each listener (TCP and the
//! owner's Unix socket), with a timer, a cap on open connections, and a
//! drain that says what it cut off.
//!
//! Invariants, and why:
//! - Every connection runs under hyper's header read timeout
//!   (`[serve] header_timeout_ms`), which hyper starts whenever it waits for
//!   a request head: a slow-loris connection and an idle keep-alive one are
//!   both closed when it passes. (The body's own timeout is the router's,
//!   `serve/admit.rs`.)
//! - At most [`Connections::cap`] connections are open at once, both
//!   listeners together; the cap is below the process's file descriptor
//!   limit (raised to its hard limit at start) by
//!   [`limits::SERVE_FD_RESERVE`]. Past the cap, a new connection closes a
//!   connection without a request in it: one that never sent a whole
//!   request first (an idle or slow-loris flood), the longest-idle kept-alive
//!   one only if there is none (a client between requests would otherwise
//!   lose its connection to every new one); if every
//!   connection has a request in flight, the new one is answered a canned
//!   503 without being read, and closed. So an idle or slow-loris flood never
//!   keeps a new client (or `/health`) out, and nothing past the cap costs
//!   more than an accept and a write.
//! - A connection counts as busy from the moment hyper hands a request to
//!   the router until the response's body has been written (the body holds
//!   a guard), so neither the cap nor the drain cuts a response short.
//! - On stop, the listeners close, connections without a request are closed
//!   at once (they would otherwise hold the drain until their header
//!   timeout), and busy ones finish their request and close. When the grace
//!   period ends the rest are dropped, and [`Drained`] counts them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::limits;

/// The answer a connection past the cap gets, before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 93\r\n\r\n{\"error\":\"too many connections: every one has a request in flight\",\"error_type\":\"Overloaded\"}";

/// A listener the accept loop can serve.
pub trait Accept: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
    /// Writes what it can of `answer` without waiting, then drops `io`.
    fn refuse(io: Self::Io, answer: &[u8]);
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        // Answers are single small writes: send them at once.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
    fn refuse(io: Self::Io, answer: &[u8]) {
        let _ = io.try_write(answer);
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }
    fn refuse(io: Self::Io, answer: &[u8]) {
        let _ = io.try_write(answer);
    }
}

/// One open connection, as the cap and the drain see it.
struct Conn {
    /// Requests handed to the router and not yet fully answered.
    requests: AtomicUsize,
    /// Whether a request has ever been handed to the router.
    served: std::sync::atomic::AtomicBool,
    /// Since when it has had no request (meaningful while `requests` is 0).
    idle_since: Mutex<Instant>,
    /// Closes the connection (it is dropped, not drained).
    close: CancellationToken,
}

/// The open connections of every listener.
pub struct Connections {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    cap: usize,
    /// Connections refused at the cap since the last log line.
    refused: AtomicU64,
    last_refusal_log: Mutex<Option<Instant>>,
    /// Connections closed at the cap to make room.
    evicted: AtomicU64,
    /// Connections without a request closed at once at the stop.
    closed_at_stop: AtomicUsize,
}

/// What the drain closed or cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Connections without a request, closed at once at the stop (both
    /// listeners; [`drain`] fills it in).
    pub closed_idle: usize,
    /// Connections still open when the grace period ended.
    pub cut: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connections {
    /// A table capping connections at `wanted`, lowered to fit the file
    /// descriptor limit `nofile` less [`limits::SERVE_FD_RESERVE`] (half of
    /// `nofile` if that leaves less).
    pub fn new(wanted: usize, nofile: u64) -> Arc<Self> {
        let room = nofile
            .checked_sub(limits::SERVE_FD_RESERVE)
            .filter(|&r| r >= nofile / 2)
            .unwrap_or(nofile / 2)
            .max(1);
        let cap = wanted.min(usize::try_from(room).unwrap_or(usize::MAX));
        Arc::new(Connections {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            cap,
            refused: AtomicU64::new(0),
            last_refusal_log: Mutex::new(None),
            evicted: AtomicU64::new(0),
            closed_at_stop: AtomicUsize::new(0),
        })
    }

    /// The cap in force.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).len()
    }

    /// Connections closed at the cap to make room, in all.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Room for one more connection: its id and state, after closing the
    /// connection idle the longest if the table is full; `None` if every
    /// open connection has a request in flight.
    fn admit(&self) -> Option<(u64, Arc<Conn>)> {
        let mut open = lock(&self.open);
        if open.len() >= self.cap {
            let oldest = open
                .iter()
                .filter(|(_, c)| c.requests.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, c)| (c.served.load(Ordering::SeqCst), *lock(&c.idle_since)))
                .map(|(&id, _)| id)?;
            if let Some(conn) = open.remove(&oldest) {
                conn.close.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            requests: AtomicUsize::new(0),
            served: std::sync::atomic::AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            close: CancellationToken::new(),
        });
        open.insert(id, conn.clone());
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// Counts a refusal and logs the count at most once per
    /// [`limits::SERVE_REFUSAL_LOG_INTERVAL`].
    fn refused(&self) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = lock(&self.last_refusal_log);
        if last.is_none_or(|t| t.elapsed() >= limits::SERVE_REFUSAL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                refused = n,
                cap = self.cap,
                "connections refused: all {} connections have a request in flight ([serve] max_connections)",
                self.cap
            );
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; the soft limit in
/// force afterwards.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// A request being answered on a connection: the connection is busy until
/// this is dropped (with the response's body).
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.requests.fetch_add(1, Ordering::SeqCst);
        conn.served.store(true, Ordering::SeqCst);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.requests.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

/// A response body that keeps its connection busy until it is written.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `stop`; then drains until `cut`.
pub async fn serve<A: Accept>(
    listener: A,
    router: axum::Router,
    connections: Arc<Connections>,
    header_timeout: Duration,
    stop: CancellationToken,
    cut: CancellationToken,
) -> Drained {
    let mut tasks = JoinSet::new();
    let mut accept_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.next() => accepted,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Logged at most once per interval: the failure repeats
                // every pause while it lasts.
                if accept_logged.is_none_or(|t| t.elapsed() >= limits::SERVE_REFUSAL_LOG_INTERVAL) {
                    accept_logged = Some(Instant::now());
                    tracing::warn!("accept failed: {e}; pausing");
                }
                tokio::time::sleep(limits::SERVE_ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some((id, conn)) = connections.admit() else {
            A::refuse(io, REFUSAL);
            connections.refused();
            continue;
        };
        let (router, connections, stop) = (router.clone(), connections.clone(), stop.clone());
        tasks.spawn(async move {
            connection(io, conn, &connections, router, header_timeout, stop).await;
            connections.remove(id);
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    tokio::select! {
        () = async { while tasks.join_next().await.is_some() {} } => {}
        () = cut.cancelled() => {}
    }
    let cut = tasks.len();
    tasks.shutdown().await;
    Drained {
        closed_idle: 0,
        cut,
    }
}

/// Waits for both listeners' drains for at most `grace`, then cuts what is
/// left; what they closed and cut, together.
pub async fn drain(
    tcp: tokio::task::JoinHandle<Drained>,
    socket: tokio::task::JoinHandle<Drained>,
    connections: &Connections,
    grace: Duration,
    cut: &CancellationToken,
) -> Drained {
    let both = async { (tcp.await, socket.await) };
    let mut both = std::pin::pin!(both);
    let (tcp, socket) = match tokio::time::timeout(grace, both.as_mut()).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!("requests still running after the {grace:?} grace period are cut off");
            cut.cancel();
            both.await
        }
    };
    let (tcp, socket) = (tcp.unwrap_or_default(), socket.unwrap_or_default());
    Drained {
        closed_idle: connections.closed_at_stop.load(Ordering::SeqCst),
        cut: tcp.cut + socket.cut,
    }
}

/// One connection, until it closes, is closed, or (after `stop`) has
/// answered its request.
async fn connection<I>(
    io: I,
    conn: Arc<Conn>,
    connections: &Connections,
    router: axum::Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn({
        let conn = conn.clone();
        move |request: hyper::Request<Incoming>| {
            let busy = Busy::new(conn.clone());
            let router = router.clone();
            async move {
                use tower::ServiceExt as _;
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| Body::new(Tracked { inner, _busy: busy })),
                )
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut served = pin!(builder.serve_connection(TokioIo::new(io), service));
    tokio::select! {
        _ = served.as_mut() => return,
        () = conn.close.cancelled() => return,
        () = stop.cancelled() => {}
    }
    // Idle or slow (headers still arriving): closed at once, not left to
    // hold the drain until its header timeout.
    if conn.requests.load(Ordering::SeqCst) == 0 {
        connections.closed_at_stop.fetch_add(1, Ordering::SeqCst);
        return;
    }
    served.as_mut().graceful_shutdown();
    tokio::select! {
        _ = served.as_mut() => {}
        () = conn.close.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_whole_http_answer() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn the_cap_leaves_the_reserve_and_evicts_the_longest_idle_first() {
        assert_eq!(Connections::new(4096, 1024).cap(), 768);
        assert_eq!(Connections::new(100, 1024).cap(), 100);
        // A tiny limit keeps half for the rest.
        assert_eq!(Connections::new(4096, 300).cap(), 150);
        let table = Connections::new(3, 1 << 20);
        let (_, kept) = table.admit().unwrap();
        drop(Busy::new(kept.clone()));
        let (_, first) = table.admit().unwrap();
        let (_, second) = table.admit().unwrap();
        let _busy = Busy::new(second.clone());
        // Full: the idle one that never sent a request goes, not the
        // kept-alive one idle for longer.
        let (_, third) = table.admit().unwrap();
        assert!(first.close.is_cancelled() && !second.close.is_cancelled());
        assert!(!kept.close.is_cancelled());
        assert_eq!(table.evicted(), 1);
        // Then the kept-alive one.
        let _busy3 = Busy::new(third);
        let (_, fourth) = table.admit().unwrap();
        assert!(kept.close.is_cancelled());
        // Full of busy connections: refused.
        let _busy4 = Busy::new(fourth);
        assert!(table.admit().is_none());
        assert_eq!(table.open(), 3);
    }
}
