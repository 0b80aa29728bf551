//! Transports carry envelopes to a peer and bring back its answer.
//!
//! - [`InProcess`]: a peer in this process; values move without
//!   serialization, replies come back on tokio oneshot channels.
//! - [`child`]: a peer at the other end of a byte stream (a child process's
//!   stdin/stdout), as length-delimited CBOR frames.
//! - [`nats`]: members of a pool on other machines, through a NATS server,
//!   the child transport's frames as payloads.
//! - [`MockTransport`]: scripted answers for unit tests.

pub mod child;
mod in_process;
mod mock;
pub mod nats;

use std::sync::Arc;

pub use in_process::InProcess;
pub use mock::{MockReply, MockTransport, SentMessage};

use super::{Body, BoxFuture, BusError, Envelope};

/// A connection to one peer.
pub trait Transport: Send + Sync + 'static {
    /// The peer's name, for logs and errors.
    fn peer(&self) -> &str;

    /// Delivers `envelope` and resolves with the peer's answer.
    ///
    /// Dropping the returned future must cancel the request at the peer, and
    /// a reply that arrives after that must be dropped.
    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>>;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn peer(&self) -> &str {
        (**self).peer()
    }
    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>> {
        (**self).call(envelope)
    }
}

/// A transport as a tower service (see `Bus::with_config`).
#[derive(Clone)]
pub(crate) struct TransportService {
    pub(crate) transport: Arc<dyn Transport>,
}

impl TransportService {
    pub(crate) fn new(transport: impl Transport) -> Self {
        TransportService {
            transport: Arc::new(transport),
        }
    }
}
