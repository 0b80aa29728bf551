//! The receiving side of the bus: handlers by message name.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use super::{Body, BoxFuture, Envelope, ErrorCode, Message, RemoteError, RequestId, TraceContext};

/// What a handler knows about the request it serves.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// This attempt's id.
    pub id: RequestId,
    /// Time the caller left for the answer when the request arrived.
    pub deadline: Option<Duration>,
    /// The caller's trace.
    pub trace: TraceContext,
}

type ErasedHandler =
    dyn Fn(RequestContext, Body) -> BoxFuture<Result<Body, RemoteError>> + Send + Sync;

/// Handlers by message name. Build it, then hand it to a transport's server
/// side ([`super::transport::InProcess::new`],
/// [`super::transport::child::serve_stdio`]).
///
/// Dispatch enforces the request's deadline: a handler still running when the
/// time the caller left runs out is dropped, and the caller gets
/// [`ErrorCode::DeadlineExceeded`].
#[derive(Clone, Default)]
pub struct Router {
    handlers: HashMap<&'static str, Arc<ErasedHandler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Router {
    /// A router with no handlers.
    pub fn new() -> Self {
        Router::default()
    }

    /// Registers the handler of message `M`, replacing any earlier one.
    pub fn handle<M, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        M: Message,
        F: Fn(RequestContext, M::Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Response, RemoteError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased =
            move |ctx: RequestContext, body: Body| -> BoxFuture<Result<Body, RemoteError>> {
                let request = match body.decode::<M::Request>(M::NAME) {
                    Ok(request) => request,
                    Err(e) => {
                        return futures::future::ready(Err(RemoteError::new(
                            ErrorCode::Decode,
                            e.to_string(),
                        )))
                        .boxed();
                    }
                };
                let handler = handler.clone();
                async move { handler(ctx, request).await.map(Body::local) }.boxed()
            };
        self.handlers.insert(M::NAME, Arc::new(erased));
        self
    }

    /// Runs the handler for `envelope` within its deadline, in a span that
    /// carries the caller's trace id.
    pub fn dispatch(&self, envelope: Envelope) -> BoxFuture<Result<Body, RemoteError>> {
        self.dispatch_inner(envelope, true)
    }

    /// [`Router::dispatch`] without the peer-side deadline timer, for a
    /// caller in this process: its own timeout drops the request, which
    /// drops the handler (see `InProcess`), so a second timer for the same
    /// instant would only cost time.
    pub(crate) fn dispatch_local(
        &self,
        envelope: Envelope,
    ) -> BoxFuture<Result<Body, RemoteError>> {
        self.dispatch_inner(envelope, false)
    }

    fn dispatch_inner(
        &self,
        envelope: Envelope,
        enforce_deadline: bool,
    ) -> BoxFuture<Result<Body, RemoteError>> {
        let Envelope {
            id,
            message,
            deadline,
            trace,
            body,
        } = envelope;
        let Some(handler) = self.handlers.get(message.as_ref()).cloned() else {
            let error =
                RemoteError::new(ErrorCode::NoHandler, format!("no handler for `{message}`"));
            return futures::future::ready(Err(error)).boxed();
        };
        let span = tracing::debug_span!("bus.handle", message = %message, request_id = id.0, trace_id = trace.trace_id);
        let ctx = RequestContext {
            id,
            deadline,
            trace,
        };
        let fut = trace.scope(handler(ctx, body));
        async move {
            match deadline.filter(|_| enforce_deadline) {
                None => fut.await,
                Some(limit) => match tokio::time::timeout(limit, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(RemoteError::new(
                        ErrorCode::DeadlineExceeded,
                        format!("`{message}` ran out of its {limit:?} deadline at the peer"),
                    )),
                },
            }
        }
        .instrument(span)
        .boxed()
    }
}
