//! The serving end of the child transport: a router served over a byte
//! stream (a child's stdin and stdout).
//!
//! # Invariants
//! - Each request runs on its own task, recorded until it answers; a
//!   `Cancel` frame aborts it, and so does the end of the stream (no
//!   handler outlives its connection).
//! - Every request is answered with one frame: its result, or, when the
//!   result cannot be encoded within the frame limit, an error naming why
//!   (`FrameTooLarge` or `Internal`).
//! - A client that sends a response frame, or bytes that are not a frame,
//!   ends the connection with the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::FramedRead;

use super::Writer;
use super::frame::{Frame, FrameCodec, FrameError, decode_frame, encode_frame};
use crate::bus::{BusError, Envelope, ErrorCode, RemoteError, Router};

/// The requests running, by id, so that a `Cancel` can abort one.
type Running = Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>;

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
    let running: Running = Arc::default();
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
                spawn_request(&router, envelope, &writer, &running, max_frame);
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

/// Runs `envelope` through `router` on a task of its own, recorded in
/// `running` until it has answered on `writer`.
fn spawn_request(
    router: &Router,
    envelope: Envelope,
    writer: &Arc<Writer>,
    running: &Running,
    max_frame: usize,
) {
    let id = envelope.id.0;
    let handler = router.dispatch(envelope);
    let writer = writer.clone();
    let running_for_task = running.clone();
    // Held until the task is recorded: the task removes itself only after.
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
        let Some(bytes) = response_bytes(id, result, max_frame) else {
            return;
        };
        if let Err(e) = writer.send(bytes).await {
            tracing::debug!(id, error = %e, "cannot write a response; the client is gone");
        }
    });
    table.insert(id, task.abort_handle());
}

/// The response frame to request `id`; when `result` cannot be encoded
/// within `max_frame`, an error saying why (`None` if even that cannot be).
fn response_bytes(id: u64, result: Result<Bytes, RemoteError>, max_frame: usize) -> Option<Bytes> {
    let frame = Frame::Response {
        id,
        result: result.map(|b| serde_bytes::ByteBuf::from(b.to_vec())),
    };
    match encode_frame(&frame, max_frame) {
        Ok(bytes) => Some(bytes),
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
            encode_frame(&frame, max_frame).ok()
        }
    }
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
