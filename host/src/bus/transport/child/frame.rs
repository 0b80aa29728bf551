//! The frames of the child transport and their codec: a 4-byte big-endian
//! length, then that many bytes of CBOR holding one [`Frame`].
//!
//! # Invariants
//! - No frame larger than its `max` is encoded ([`BusError::FrameTooLarge`],
//!   before anything is written) or decoded ([`FrameError::TooLarge`], from
//!   the header alone, before reading or allocating for the body).
//! - A frame that arrives in pieces is checked exactly once: the header
//!   stays in the buffer until the whole frame is there.

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::bus::{Body, BusError, Envelope, RemoteError, RequestId, TraceContext};

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

pub(super) fn encode_frame(frame: &Frame, max: usize) -> Result<Bytes, BusError> {
    let mut out = Vec::new();
    ciborium::into_writer(frame, &mut out).map_err(|e| BusError::Encode {
        what: "frame".into(),
        reason: e.into(),
    })?;
    if out.len() > max {
        return Err(BusError::FrameTooLarge {
            size: out.len(),
            max,
        });
    }
    Ok(out.into())
}

pub(super) fn decode_frame(bytes: &[u8]) -> Result<Frame, FrameError> {
    ciborium::from_reader(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}
