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
//!
//! # Layout
//! - this file: the client end ([`Connection`]): pending calls, the reader
//!   that answers them, cancellation;
//! - `frame`: the frames and their codec;
//! - `server`: the serving end ([`serve_stream`], [`serve_stdio`]);
//! - `process`: a child process serving the bus ([`ChildProcess`]).

mod frame;
mod process;
mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite};

pub use frame::{Frame, FrameCodec, FrameError};
pub use process::{ChildProcess, MarkerWatch};
pub use server::{serve_stdio, serve_stream};

use crate::bus::{Body, BoxFuture, BusError, Envelope};
use frame::{decode_frame, encode_frame};

/// Metric: replies that arrived after their caller gave up.
pub const METRIC_LATE_REPLIES: &str = "bus_late_replies_total";

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
