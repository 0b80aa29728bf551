//! The in-process transport.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use tokio::sync::oneshot;

use crate::bus::{Body, BoxFuture, BusError, Envelope, Router};

/// A peer in this process: each request runs its handler on its own tokio
/// task, and the answer comes back on a oneshot channel.
///
/// Cancellation: when the caller drops its future, the reply channel closes,
/// and the handler's task drops the handler's future at its next await.
#[derive(Clone, Debug)]
pub struct InProcess {
    router: Arc<Router>,
    name: Arc<str>,
    closed: Arc<AtomicBool>,
}

impl InProcess {
    /// A transport to `router`, served in this process.
    pub fn new(router: Router) -> Self {
        Self::named("in-process", router)
    }

    /// The same, with a peer name for logs.
    pub fn named(name: &str, router: Router) -> Self {
        InProcess {
            router: Arc::new(router),
            name: name.into(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shuts the peer down: later requests fail with [`BusError::PeerGone`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl super::Transport for InProcess {
    fn peer(&self) -> &str {
        &self.name
    }

    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>> {
        if self.closed.load(Ordering::Acquire) {
            let error = BusError::PeerGone {
                peer: self.name.to_string(),
                reason: "the peer was shut down".into(),
            };
            return futures::future::ready(Err(error)).boxed();
        }
        let (reply, answer) = oneshot::channel();
        let handler = self.router.dispatch_local(envelope);
        tokio::spawn(serve_one(handler, reply));
        let peer = self.name.clone();
        async move {
            match answer.await {
                Ok(result) => result.map_err(BusError::Remote),
                Err(_) => Err(BusError::PeerGone {
                    peer: peer.to_string(),
                    reason: "the handler's task ended without answering".into(),
                }),
            }
        }
        .boxed()
    }
}

async fn serve_one(
    handler: BoxFuture<Result<Body, crate::bus::RemoteError>>,
    mut reply: oneshot::Sender<Result<Body, crate::bus::RemoteError>>,
) {
    tokio::select! {
        biased;
        () = reply.closed() => tracing::debug!("request cancelled by its caller"),
        result = handler => {
            // The caller may have gone between the handler's end and now; the
            // answer is then dropped with the channel.
            let _ = reply.send(result);
        }
    }
}
