//! What travels on the bus: the [`Message`] trait, the [`Envelope`] around
//! every request, and its [`Body`].
//!
//! A body stays a typed Rust value on the in-process transport (no
//! serialization at all: the value is moved) and becomes CBOR only when a
//! transport has to cross a process boundary. Decoding is checked both ways:
//! a value of the wrong type is a [`BusError::Decode`], never a panic.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{BusError, CodecProblem};

/// A message type of the bus: a unique name, a request type and a response
/// type.
///
/// # Example
/// ```
/// use embedhost::bus::Message;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Ping { nonce: u64 }
/// #[derive(Serialize, Deserialize)]
/// struct Pong { nonce: u64 }
///
/// struct PingMessage;
/// impl Message for PingMessage {
///     const NAME: &'static str = "example.ping";
///     const IDEMPOTENT: bool = true;
///     type Request = Ping;
///     type Response = Pong;
/// }
/// ```
pub trait Message: Send + Sync + 'static {
    /// Unique name on the wire, `area.verb` (`"embedder.embed"`).
    const NAME: &'static str;
    /// Whether running the request twice is harmless. Only idempotent
    /// messages are retried after a timeout or a dead peer, because the peer
    /// may have run the first attempt.
    const IDEMPOTENT: bool;
    /// The request payload. `Clone` so that a retry can send it again.
    type Request: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// The response payload.
    type Response: Serialize + DeserializeOwned + Send + 'static;
}

/// Identifies one attempt of one request, unique within the process (and so
/// within every connection). A retry is a new attempt with a new id, so a late
/// reply to an earlier attempt can never be mistaken for the answer to a
/// later one, nor delivered to another caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A fresh id.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RequestId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Lets one request be followed across process boundaries: every span that
/// handles it, on either side, records the same `trace_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// Shared by every request caused by one top-level request.
    pub trace_id: u64,
    /// The span that sent this request.
    pub parent_span: u64,
}

tokio::task_local! {
    static CURRENT_TRACE: TraceContext;
}

impl TraceContext {
    /// The trace of the request being handled on this task, or a new trace.
    pub fn current_or_new() -> Self {
        CURRENT_TRACE
            .try_with(|t| *t)
            .unwrap_or_else(|_| TraceContext {
                trace_id: fastrand::u64(1..),
                parent_span: 0,
            })
    }

    /// A child context for a request sent from within this one.
    pub fn child(self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            parent_span: fastrand::u64(1..),
        }
    }

    /// Runs `fut` with `self` as the current trace, so that requests it sends
    /// join this trace.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT_TRACE.scope(self, fut).await
    }
}

/// One request on the bus.
#[derive(Debug)]
pub struct Envelope {
    /// This attempt's id.
    pub id: RequestId,
    /// The message's [`Message::NAME`].
    pub message: Cow<'static, str>,
    /// Time left for the peer to answer, as a duration (clocks of two
    /// processes need not agree; a duration survives the crossing).
    pub deadline: Option<Duration>,
    /// The trace the request belongs to.
    pub trace: TraceContext,
    /// The request payload.
    pub body: Body,
}

/// A request or response payload.
pub enum Body {
    /// A typed value, moved without serialization (in-process transport).
    Local(Box<dyn LocalPayload>),
    /// CBOR bytes (child-process transport).
    Encoded(Bytes),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Local(_) => f.write_str("Body::Local(..)"),
            Body::Encoded(b) => write!(f, "Body::Encoded({} bytes)", b.len()),
        }
    }
}

/// A payload that can stay a value or become CBOR on demand.
pub trait LocalPayload: Send + 'static {
    /// Encodes the value as CBOR.
    ///
    /// # Errors
    /// The serializer's error if the value does not serialize.
    fn encode(&self) -> Result<Vec<u8>, ciborium::ser::Error<std::io::Error>>;
    /// The value, for a downcast.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// The value, for inspection (the mock transport).
    fn as_any(&self) -> &(dyn Any + Send);
}

impl<T: Serialize + Send + 'static> LocalPayload for T {
    fn encode(&self) -> Result<Vec<u8>, ciborium::ser::Error<std::io::Error>> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out)?;
        Ok(out)
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    fn as_any(&self) -> &(dyn Any + Send) {
        self
    }
}

impl Body {
    /// Wraps a typed value.
    pub fn local<T: Serialize + Send + 'static>(value: T) -> Self {
        Body::Local(Box::new(value))
    }

    /// The payload as CBOR bytes.
    ///
    /// # Errors
    /// [`BusError::Encode`] if the value cannot be serialized.
    pub fn into_bytes(self, what: &str) -> Result<Bytes, BusError> {
        match self {
            Body::Encoded(bytes) => Ok(bytes),
            Body::Local(value) => value
                .encode()
                .map(Bytes::from)
                .map_err(|e| BusError::Encode {
                    what: what.to_string(),
                    reason: e.into(),
                }),
        }
    }

    /// The payload as a `T`.
    ///
    /// # Errors
    /// [`BusError::Decode`] if the bytes are not a CBOR `T`, or the value is
    /// of another type.
    pub fn decode<T: DeserializeOwned + 'static>(self, what: &str) -> Result<T, BusError> {
        match self {
            Body::Local(value) => {
                value
                    .into_any()
                    .downcast::<T>()
                    .map(|b| *b)
                    .map_err(|_| BusError::Decode {
                        what: what.to_string(),
                        reason: CodecProblem::WrongType(std::any::type_name::<T>()),
                    })
            }
            Body::Encoded(bytes) => {
                ciborium::from_reader(bytes.as_ref()).map_err(|e| BusError::Decode {
                    what: what.to_string(),
                    reason: e.into(),
                })
            }
        }
    }

    /// A reference to the typed value, if this body is one of type `T`.
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        match self {
            Body::Local(value) => value.as_any().downcast_ref::<T>(),
            Body::Encoded(_) => None,
        }
    }
}

/// The empty request or response (`worker.stats {}`, `embedder.health {}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}
