//! The child-process transport: length-delimited CBOR frames over a byte
//! stream (a child's stdin and stdout).
//!
//! # Wire format
//! Each frame is a 4-byte big-endian length followed by that many bytes of
//! CBOR: one [`Frame`] (see [`FrameCodec`]). Payloads inside a frame are themselves CBOR byte
//! strings, so the envelope can be read without knowing the message types,
//! and f32 vectors travel as byte strings, not arrays of floats.
//!
//! # Invariants
//! - No frame larger than `max_frame` is sent or accepted. Sending one fails
//!   that request with [`BusError::FrameTooLarge`] and leaves the connection
//!   up; receiving one (or any bytes that are not a frame) means the stream
//!   can no longer be trusted, so the connection is closed and every request
//!   in flight fails at once with [`BusError::PeerGone`] naming the cause.
//! - A request's caller that gives up (drops its future) removes its pending
//!   entry and sends a `Cancel` frame; the peer drops the handler's future.
//!   A reply for an id no longer pending is dropped and counted
//!   (`bus_late_replies_total`).
//! - End of stream or a read error fails every pending request at once,
//!   rather than at its timeout.

use std::collections::HashMap;
use std::io;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

use crate::bus::{
    Body, BoxFuture, BusError, Envelope, ErrorCode, RemoteError, RequestId, Router, TraceContext,
};
use crate::limits;

/// Metric: replies that arrived after their caller gave up.
pub const METRIC_LATE_REPLIES: &str = "bus_late_replies_total";

/// Length of the frame header.
const HEADER: usize = 4;

/// One unit on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// A request: the envelope of [`crate::bus::Envelope`] on the wire.
    Request {
        id: u64,
        message: String,
        /// Microseconds left before the caller's deadline.
        deadline_us: Option<u64>,
        trace: TraceContext,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The answer to the request `id`.
    Response {
        id: u64,
        result: Result<serde_bytes::ByteBuf, RemoteError>,
    },
    /// The caller of request `id` gave up: the peer drops its handler.
    Cancel { id: u64 },
}

impl Frame {
    /// The request frame of `envelope`: its body as CBOR, its deadline as
    /// microseconds left. Every transport that crosses a process boundary
    /// (this one, NATS) sends requests so.
    ///
    /// # Errors
    /// [`BusError::Encode`] if the body cannot be encoded.
    pub fn request(envelope: Envelope) -> Result<Frame, BusError> {
        let body = envelope.body.into_bytes(&envelope.message)?;
        Ok(Frame::Request {
            id: envelope.id.0,
            message: envelope.message.into_owned(),
            deadline_us: envelope
                .deadline
                .map(|d| d.as_micros().min(u64::MAX as u128) as u64),
            trace: envelope.trace,
            body: body.into(),
        })
    }

    /// The envelope a request frame carries, or `None` for another frame.
    pub fn into_envelope(self) -> Option<Envelope> {
        match self {
            Frame::Request {
                id,
                message,
                deadline_us,
                trace,
                body,
            } => Some(Envelope {
                id: RequestId(id),
                message: message.into(),
                deadline: deadline_us.map(Duration::from_micros),
                trace,
                body: Body::Encoded(body.into()),
            }),
            _ => None,
        }
    }
}

/// Why the frame layer failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("malformed frame: {0}")]
    /// Bytes that are not a CBOR frame.
    Malformed(String),
    #[error("i/o error: {0}")]
    /// Reading or writing the stream failed.
    Io(#[from] io::Error),
}

/// Length-delimited frames (a 4-byte big-endian length, then the bytes)
/// with an explicit maximum, reporting an oversized frame as
/// [`FrameError::TooLarge`] from its header alone, before reading or
/// allocating for it.
///
/// Stateless by design: the header stays in the buffer until the whole frame
/// has arrived, so a frame that arrives in pieces is checked exactly once.
/// (tokio-util's `LengthDelimitedCodec` consumes the header early, which
/// leaves no place to report the size in a typed error.)
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec accepting frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameCodec { max }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if src.len() < HEADER {
            return Ok(None);
        }
        let size = (&src[..HEADER]).get_u32() as usize;
        if size > self.max {
            return Err(FrameError::TooLarge {
                size,
                max: self.max,
            });
        }
        if src.len() < HEADER + size {
            src.reserve(HEADER + size - src.len());
            return Ok(None);
        }
        src.advance(HEADER);
        Ok(Some(src.split_to(size)))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        if item.len() > self.max {
            return Err(FrameError::TooLarge {
                size: item.len(),
                max: self.max,
            });
        }
        dst.reserve(HEADER + item.len());
        dst.put_u32(item.len() as u32);
        dst.extend_from_slice(&item);
        Ok(())
    }
}

fn encode_frame(frame: &Frame, max: usize) -> Result<Bytes, BusError> {
    let mut out = Vec::new();
    ciborium::into_writer(frame, &mut out).map_err(|e| BusError::Encode {
        what: "frame".into(),
        reason: e.to_string(),
    })?;
    if out.len() > max {
        return Err(BusError::FrameTooLarge {
            size: out.len(),
            max,
        });
    }
    Ok(out.into())
}

fn decode_frame(bytes: &[u8]) -> Result<Frame, FrameError> {
    ciborium::from_reader(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

type Pending = HashMap<u64, oneshot::Sender<Result<Body, BusError>>>;

struct Shared {
    peer: String,
    max_frame: usize,
    pending: Mutex<Pending>,
    /// Why the connection is closed, once it is.
    closed: Mutex<Option<String>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gone(&self, reason: &str) -> BusError {
        BusError::PeerGone {
            peer: self.peer.clone(),
            reason: reason.to_string(),
        }
    }

    /// Closes the connection for `reason` and fails every pending request.
    fn close(&self, reason: String) {
        {
            let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            if closed.is_some() {
                return;
            }
            tracing::debug!(peer = %self.peer, %reason, "connection closed");
            *closed = Some(reason.clone());
        }
        for (_, waiter) in self.pending().drain() {
            let _ = waiter.send(Err(self.gone(&reason)));
        }
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The write half of a connection, shared by every task that sends on it.
///
/// Each sender writes its own frame under a lock rather than handing it to a
/// writer task: one task hop less per frame, which is most of the bus's cost
/// across a process boundary. Frames never interleave: a frame is written
/// whole under the lock.
struct Writer {
    sink: tokio::sync::Mutex<FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, FrameCodec>>,
}

impl Writer {
    fn new<W: AsyncWrite + Send + Unpin + 'static>(writer: W, max_frame: usize) -> Arc<Self> {
        let writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(writer);
        Arc::new(Writer {
            sink: tokio::sync::Mutex::new(FramedWrite::new(writer, FrameCodec::new(max_frame))),
        })
    }

    async fn send(&self, frame: Bytes) -> Result<(), FrameError> {
        self.sink.lock().await.send(frame).await
    }

    /// Sends from synchronous code (a `Drop`), on a task of its own.
    fn send_detached(self: &Arc<Self>, frame: Bytes) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let writer = self.clone();
            handle.spawn(async move {
                let _ = writer.send(frame).await;
            });
        }
    }
}

/// The client end of a frame connection: a [`super::Transport`].
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    writer: Arc<Writer>,
}

impl Connection {
    /// Runs a connection over `reader`/`writer` (the peer's stdout and stdin);
    /// its reader runs on a background task, which ends when the stream ends.
    pub fn new<R, W>(peer: &str, reader: R, writer: W, max_frame: usize) -> Self
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let shared = Arc::new(Shared {
            peer: peer.to_string(),
            max_frame,
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        tokio::spawn(client_read_loop(
            FramedRead::new(reader, FrameCodec::new(max_frame)),
            shared.clone(),
        ));
        Connection {
            shared,
            writer: Writer::new(writer, max_frame),
        }
    }

    /// Why the connection is closed, or `None` while it is up.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed_reason()
    }

    /// Closes the connection: every pending request fails with `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        self.shared.close(reason.into());
    }
}

async fn client_read_loop<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    shared: Arc<Shared>,
) {
    let reason = loop {
        let bytes = match frames.next().await {
            None => break "the peer closed its output".to_string(),
            Some(Err(e)) => break format!("bad data from the peer: {e}"),
            Some(Ok(bytes)) => bytes,
        };
        match decode_frame(&bytes) {
            Ok(Frame::Response { id, result }) => {
                let waiter = shared.pending().remove(&id);
                match waiter {
                    Some(waiter) => {
                        let result = result
                            .map(|b| Body::Encoded(Bytes::from(b.into_vec())))
                            .map_err(BusError::Remote);
                        let _ = waiter.send(result);
                    }
                    None => {
                        tracing::debug!(peer = %shared.peer, id, "late reply dropped");
                        metrics::counter!(METRIC_LATE_REPLIES).increment(1);
                    }
                }
            }
            Ok(other) => break format!("the peer sent an unexpected frame: {other:?}"),
            Err(e) => break format!("bad data from the peer: {e}"),
        }
    };
    shared.close(reason);
}

impl super::Transport for Connection {
    fn peer(&self) -> &str {
        &self.shared.peer
    }

    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>> {
        let shared = self.shared.clone();
        let writer = self.writer.clone();
        async move {
            if let Some(reason) = shared.closed_reason() {
                return Err(shared.gone(&reason));
            }
            let id = envelope.id.0;
            let frame = Frame::request(envelope)?;
            let bytes = encode_frame(&frame, shared.max_frame)?;
            let (tx, rx) = oneshot::channel();
            shared.pending().insert(id, tx);
            // `close` sets `closed` before it drains `pending`: an entry
            // inserted after the drain is caught here, never left waiting.
            if let Some(reason) = shared.closed_reason() {
                shared.pending().remove(&id);
                return Err(shared.gone(&reason));
            }
            // From here on, dropping this future cancels the request.
            let mut guard = CancelOnDrop {
                shared: shared.clone(),
                writer: writer.clone(),
                id,
                armed: true,
            };
            if let Err(e) = writer.send(bytes).await {
                guard.armed = false;
                shared.pending().remove(&id);
                shared.close(format!("cannot write to the peer: {e}"));
                return Err(shared.gone(&shared.closed_reason().unwrap_or_default()));
            }
            let result = match rx.await {
                Ok(result) => result,
                Err(_) => Err(shared.gone(&shared.closed_reason().unwrap_or_default())),
            };
            guard.armed = false;
            result
        }
        .boxed()
    }
}

struct CancelOnDrop {
    shared: Arc<Shared>,
    writer: Arc<Writer>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.shared.pending().remove(&self.id).is_some()
            && let Ok(frame) = encode_frame(&Frame::Cancel { id: self.id }, self.shared.max_frame)
        {
            // Best effort: if it cannot be sent, the reply will be
            // dropped as late.
            self.writer.send_detached(frame);
        }
    }
}

/// Serves `router` to the client at the other end of `reader`/`writer` until
/// the stream ends. Each request runs on its own task; a `Cancel` frame
/// aborts it.
///
/// # Errors
/// Returns why the connection ended, if not by a clean end of stream.
pub async fn serve_stream<R, W>(
    router: Router,
    reader: R,
    writer: W,
    max_frame: usize,
) -> Result<(), FrameError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let router = Arc::new(router);
    let writer = Writer::new(writer, max_frame);
    let running: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>> = Arc::default();
    let mut frames = FramedRead::new(reader, FrameCodec::new(max_frame));
    let result = loop {
        let bytes = match frames.next().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(bytes)) => bytes,
        };
        match decode_frame(&bytes) {
            Ok(frame @ Frame::Request { .. }) => {
                let Some(envelope) = frame.into_envelope() else {
                    continue;
                };
                let id = envelope.id.0;
                let handler = router.dispatch(envelope);
                let writer = writer.clone();
                let running_for_task = running.clone();
                let mut table = running.lock().unwrap_or_else(|p| p.into_inner());
                let task = tokio::spawn(async move {
                    let result = match handler.await {
                        Ok(body) => body
                            .into_bytes("response")
                            .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string())),
                        Err(e) => Err(e),
                    };
                    running_for_task
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    let frame = Frame::Response {
                        id,
                        result: result.map(|b| serde_bytes::ByteBuf::from(b.to_vec())),
                    };
                    let bytes = match encode_frame(&frame, max_frame) {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            let code = if matches!(e, BusError::FrameTooLarge { .. }) {
                                ErrorCode::FrameTooLarge
                            } else {
                                ErrorCode::Internal
                            };
                            let frame = Frame::Response {
                                id,
                                result: Err(RemoteError::new(code, e.to_string())),
                            };
                            match encode_frame(&frame, max_frame) {
                                Ok(bytes) => bytes,
                                Err(_) => return,
                            }
                        }
                    };
                    if let Err(e) = writer.send(bytes).await {
                        tracing::debug!(id, error = %e, "cannot write a response; the client is gone");
                    }
                });
                table.insert(id, task.abort_handle());
            }
            Ok(Frame::Cancel { id }) => {
                if let Some(task) = running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
                {
                    tracing::debug!(id, "request cancelled by the client");
                    task.abort();
                }
            }
            Ok(Frame::Response { .. }) => {
                break Err(FrameError::Malformed(
                    "a client sent a response frame".into(),
                ));
            }
            Err(e) => break Err(e),
        }
    };
    for (_, task) in running.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        task.abort();
    }
    result
}

/// Serves `router` on this process's stdin/stdout: the body of a child
/// process. Nothing else may write to stdout.
///
/// When stdin and stdout are pipes (as the host spawns its children) they are
/// switched to non-blocking mode and driven by the reactor; tokio's own
/// `stdin()`/`stdout()` would hand every read and write to a blocking thread,
/// which costs several times the bus's own overhead per frame.
///
/// # Errors
/// As [`serve_stream`].
pub async fn serve_stdio(router: Router, max_frame: usize) -> Result<(), FrameError> {
    use std::os::fd::AsFd;
    use tokio::net::unix::pipe;
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(pipe::Receiver::from_owned_fd);
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(pipe::Sender::from_owned_fd);
    match (stdin, stdout) {
        (Ok(stdin), Ok(stdout)) => serve_stream(router, stdin, stdout, max_frame).await,
        _ => serve_stream(router, tokio::io::stdin(), tokio::io::stdout(), max_frame).await,
    }
}

/// A child process serving the bus on its stdin/stdout. Its stderr lines are
/// forwarded to `tracing` with the child's pid, each cut at
/// [`limits::MAX_PLUGIN_LOG_LINE`] and escaped. The child is killed when this
/// value is dropped.
pub struct ChildProcess {
    connection: Connection,
    child: tokio::process::Child,
    pid: u32,
    stderr: tokio::sync::watch::Receiver<StderrState>,
}

/// What the child's stderr has shown so far.
#[derive(Clone, Copy, Debug, Default)]
struct StderrState {
    /// A line equal to the marker given at spawn was seen.
    marker: bool,
    /// Stderr reached its end (the child exited or closed it).
    closed: bool,
}

/// Watches a child's stderr for the marker line given at spawn.
#[derive(Clone, Debug)]
pub struct MarkerWatch(tokio::sync::watch::Receiver<StderrState>);

impl MarkerWatch {
    /// Whether the marker was seen, waiting up to `within` for stderr to
    /// reach its end first (a dying child's last line may arrive after its
    /// stdout closed).
    pub async fn seen(&mut self, within: Duration) -> bool {
        let _ = tokio::time::timeout(within, self.0.wait_for(|s| s.closed || s.marker)).await;
        self.0.borrow().marker
    }
}

impl ChildProcess {
    /// Spawns `command` with piped stdio and connects to it.
    ///
    /// # Errors
    /// The spawn error, if the program cannot be started.
    pub fn spawn(command: tokio::process::Command, name: &str) -> io::Result<Self> {
        Self::spawn_watching(command, name, None)
    }

    /// As [`ChildProcess::spawn`], also watching stderr for a line equal to
    /// `marker` (see [`ChildProcess::marker`]).
    ///
    /// # Errors
    /// The spawn error, if the program cannot be started.
    pub fn spawn_watching(
        mut command: tokio::process::Command,
        name: &str,
        marker: Option<&'static str>,
    ) -> io::Result<Self> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("child has no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child has no stdout"))?;
        let (state, stderr_state) = tokio::sync::watch::channel(StderrState::default());
        if let Some(stderr) = child.stderr.take() {
            let name = name.to_string();
            tokio::spawn(async move {
                let codec =
                    tokio_util::codec::LinesCodec::new_with_max_length(limits::MAX_PLUGIN_LOG_LINE);
                let mut lines = FramedRead::new(stderr, codec);
                while let Some(line) = lines.next().await {
                    let line = match line {
                        Ok(line) => line,
                        // Too long: the codec drops the rest of the line.
                        Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded) => {
                            "[a line past limits::MAX_PLUGIN_LOG_LINE was dropped]".into()
                        }
                        Err(tokio_util::codec::LinesCodecError::Io(_)) => break,
                    };
                    if marker.is_some_and(|m| line.trim() == m) {
                        state.send_modify(|s| s.marker = true);
                    }
                    let line = crate::untrusted::sanitize(&line, limits::MAX_PLUGIN_LOG_LINE);
                    tracing::info!(target: "embedhost::child", child = %name, pid, "{line}");
                }
                state.send_modify(|s| s.closed = true);
            });
        } else {
            state.send_modify(|s| s.closed = true);
        }
        let connection = Connection::new(
            &format!("{name} (pid {pid})"),
            stdout,
            stdin,
            limits::MAX_FRAME_BYTES,
        );
        Ok(ChildProcess {
            connection,
            child,
            pid,
            stderr: stderr_state,
        })
    }

    /// Watches for the marker line given to [`ChildProcess::spawn_watching`].
    pub fn marker(&self) -> MarkerWatch {
        MarkerWatch(self.stderr.clone())
    }

    /// The bus connection to the child.
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the child (SIGKILL) and waits up to
    /// [`crate::limits::CHILD_KILL_REAP_WAIT`] for it to exit (a child in
    /// uninterruptible I/O is left to tokio's orphan reaper).
    ///
    /// # Errors
    /// The error of the kill system call, or `TimedOut` if the child was
    /// not reaped in time.
    pub async fn kill(&mut self) -> io::Result<()> {
        self.child.start_kill()?;
        match self
            .wait_for_exit(crate::limits::CHILD_KILL_REAP_WAIT)
            .await
        {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("child {} was not reaped after SIGKILL", self.pid),
            )),
        }
    }

    /// Sends `signal` to the child, unless it has already been reaped.
    pub fn signal(&mut self, signal: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: `kill` has no memory effects; the pid is our unreaped
            // child, so it cannot have been reused.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits up to `within` for the child to exit; its status if it did.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
