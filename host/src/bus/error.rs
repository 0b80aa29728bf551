//! The bus's typed errors.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a request failed, as the caller sees it.
///
/// Whether a failed request may be retried is decided by
/// [`BusError::is_retryable`]; the bus retries only idempotent messages, and
/// only for the retryable kinds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// One attempt got no answer within its timeout.
    #[error("`{message}` timed out after {after:?}")]
    Timeout {
        message: &'static str,
        after: Duration,
    },

    /// The overall deadline ran out, across all attempts.
    #[error("`{message}` exceeded its deadline of {deadline:?} after {attempts} attempt(s){}", last_error_suffix(.last_error))]
    DeadlineExceeded {
        message: &'static str,
        deadline: Duration,
        attempts: u32,
        /// The error of the last attempt, if one finished before the deadline.
        last_error: Option<Box<BusError>>,
    },

    /// The peer already has `limit` requests in flight; nothing was sent.
    #[error("peer `{peer}` is overloaded: {limit} requests already in flight")]
    Overloaded { peer: String, limit: usize },

    /// The peer is gone (exited, closed its pipe, or was shut down). Requests
    /// in flight on it fail with this at once rather than at their timeout.
    #[error("peer `{peer}` is gone: {reason}")]
    PeerGone { peer: String, reason: String },

    /// The peer answered with an error.
    #[error("remote error: {0}")]
    Remote(#[from] RemoteError),

    /// A payload could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode { what: String, reason: CodecProblem },

    /// A payload could not be encoded.
    #[error("cannot encode {what}: {reason}")]
    Encode { what: String, reason: CodecProblem },

    /// A frame exceeds the transport's maximum size.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { size: usize, max: usize },
}

/// Why a payload did not pass through CBOR.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecProblem {
    /// The value does not serialize.
    #[error("{0}")]
    Serialize(#[from] ciborium::ser::Error<std::io::Error>),
    /// The bytes are not CBOR of the expected shape.
    #[error("{0}")]
    Deserialize(#[from] ciborium::de::Error<std::io::Error>),
    /// An in-process payload holds a value of another type.
    #[error("the value is not a `{0}`")]
    WrongType(&'static str),
    /// A transport that carries only values was given bytes.
    #[error("{0}")]
    NotLocal(&'static str),
}

fn last_error_suffix(last: &Option<Box<BusError>>) -> String {
    match last {
        Some(e) => format!("; last error: {e}"),
        None => String::new(),
    }
}

impl BusError {
    /// Whether trying again could succeed without any change to the request:
    /// a timeout, a dead peer (a supervisor may have replaced it), an
    /// overloaded peer, or a peer that says it is temporarily unavailable.
    /// Never a decode, encode, size or validation error: those fail the same
    /// way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            BusError::Timeout { .. } | BusError::PeerGone { .. } | BusError::Overloaded { .. } => {
                true
            }
            BusError::Remote(remote) => remote.code == ErrorCode::Unavailable,
            _ => false,
        }
    }

    /// Whether the request certainly never reached the peer, so retrying it
    /// is safe even for a message that is not idempotent.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            BusError::Overloaded { .. } | BusError::FrameTooLarge { .. } | BusError::Encode { .. }
        )
    }
}

/// The class of an error a handler returned. Travels across processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed or refused; retrying cannot help.
    InvalidRequest,
    /// One input of a batch is refused; `RemoteError::index` names it.
    InvalidInput,
    /// The peer has no handler for the message.
    NoHandler,
    /// The peer could not decode the request.
    Decode,
    /// The request's deadline ran out at the peer.
    DeadlineExceeded,
    /// The request's answer does not fit in a frame.
    FrameTooLarge,
    /// The handler is temporarily unable to serve (for example, the instance
    /// it ran on crashed). Retryable.
    Unavailable,
    /// The handler failed for good (for example, the backend escalated).
    Failed,
    /// Anything else.
    Internal,
}

/// An error returned by the peer's handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}{}", .index.map(|i| format!(" (input {i})")).unwrap_or_default())]
pub struct RemoteError {
    /// What kind of failure, which decides whether the caller retries.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The offending input's position, for [`ErrorCode::InvalidInput`].
    pub index: Option<u32>,
    /// For [`ErrorCode::Unavailable`]: when the peer expects to serve again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl RemoteError {
    /// An error of this code with this message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
            index: None,
            retry_after_ms: None,
        }
    }

    /// The same error, telling the caller to retry after `after` (in
    /// whole milliseconds, saturating), if given.
    #[must_use]
    pub fn retry_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.retry_after_ms = after.map(|d| d.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    /// An [`ErrorCode::InvalidInput`] error naming input `index`.
    pub fn invalid_input(index: u32, message: impl Into<String>) -> Self {
        RemoteError {
            code: ErrorCode::InvalidInput,
            message: message.into(),
            index: Some(index),
            retry_after_ms: None,
        }
    }
}
