//! The typed message bus.
//!
//! A [`Bus`] sends typed requests ([`Message`]) to one peer through a
//! [`Transport`] and returns typed responses. A [`Router`] on the peer's side
//! dispatches each request to the handler registered for its message.
//!
//! # Invariants
//! - Every request carries an id, its message name, the time left before its
//!   deadline (a duration, not a wall-clock time) and a trace context.
//! - Dropping the future returned by [`Bus::send`] cancels the request at the
//!   peer: the handler's future is dropped there too.
//! - A reply that arrives after its caller gave up is dropped. Ids are unique
//!   per attempt, so it can never be delivered to another caller.
//! - At most `max_in_flight` requests are in flight per peer; past it the
//!   caller gets [`BusError::Overloaded`] at once, never an unbounded queue.
//! - Only idempotent messages are retried, and only for errors that
//!   [`BusError::is_retryable`] allows; every attempt and every backoff delay
//!   fits inside the overall deadline.
//! - All timing goes through `tokio::time`, so tests run on a paused clock.

mod envelope;
mod error;
pub mod middleware;
mod router;
pub mod transport;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

pub use envelope::{Body, Empty, Envelope, LocalPayload, Message, RequestId, TraceContext};
pub use error::{BusError, CodecProblem, ErrorCode, RemoteError};
pub use router::{RequestContext, Router};
pub use transport::Transport;

use crate::limits;

/// A boxed, sendable future, as transports return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How one [`Bus::send`] behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct SendOptions {
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// Attempts after the first, for idempotent messages and retryable errors.
    pub retries: u32,
    /// Time allowed for all attempts and backoff delays together. `None`:
    /// bounded only by `timeout` per attempt.
    pub deadline: Option<Duration>,
    /// Delay before the first retry; later ones grow by `backoff_factor`.
    pub backoff_min: Duration,
    /// Largest delay between attempts.
    pub backoff_max: Duration,
    /// Growth of the delay between attempts.
    pub backoff_factor: f32,
    /// Full jitter: each delay is drawn from `[d, 2d)` so that callers that
    /// failed together do not retry together.
    pub jitter: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            timeout: limits::DEFAULT_REQUEST_TIMEOUT,
            retries: 0,
            deadline: None,
            backoff_min: limits::DEFAULT_BACKOFF_MIN,
            backoff_max: limits::DEFAULT_BACKOFF_MAX,
            backoff_factor: limits::DEFAULT_BACKOFF_FACTOR,
            jitter: true,
        }
    }
}

impl SendOptions {
    /// These options with a per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// These options with `retries` retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    /// These options with an overall deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
    /// These options with a backoff starting at `min`, capped at `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }
    /// These options with or without jitter.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    fn delays(&self) -> impl Iterator<Item = Duration> {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .with_factor(self.backoff_factor)
            .with_max_times(self.retries as usize);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build()
    }
}

/// How a [`Bus`] treats its peer.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// Requests in flight before [`BusError::Overloaded`].
    pub max_in_flight: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            max_in_flight: limits::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

type Stack = BoxCloneSyncService<Envelope, Body, BusError>;

/// The sending side of the bus, connected to one peer. Cheap to clone.
///
/// # Example
/// ```
/// # use embedhost::bus::{Bus, Router, SendOptions, transport::InProcess};
/// # use embedhost::messages::{EmbedderHealth, HealthResponse};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut router = Router::new();
/// router.handle::<EmbedderHealth, _, _>(|_ctx, _req| async {
///     Ok(HealthResponse { memory: 1024, processed_count: 7 })
/// });
/// let bus = Bus::new(InProcess::new(router));
/// let health = bus.send::<EmbedderHealth>(Default::default(), SendOptions::default()).await.unwrap();
/// assert_eq!(health.processed_count, 7);
/// # }
/// ```
#[derive(Clone)]
pub struct Bus {
    stack: Stack,
    peer: Arc<str>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus to the transport's peer, with the default [`BusConfig`].
    pub fn new(transport: impl Transport) -> Self {
        Self::with_config(transport, BusConfig::default())
    }

    /// A bus to the transport's peer.
    pub fn with_config(transport: impl Transport, config: BusConfig) -> Self {
        let peer: Arc<str> = transport.peer().into();
        let limit = config.max_in_flight;
        let transport = transport::TransportService::new(transport);
        let overloaded_peer = peer.clone();
        let stack = ServiceBuilder::new()
            .layer(middleware::TraceLayer::new(peer.clone()))
            .layer(middleware::MetricsLayer)
            .map_err(move |e: tower::BoxError| match e.downcast::<BusError>() {
                Ok(bus) => *bus,
                // The only other error of the stack: load shedding.
                Err(_) => BusError::Overloaded {
                    peer: overloaded_peer.to_string(),
                    limit,
                },
            })
            .load_shed()
            .concurrency_limit(limit)
            .service(transport);
        Bus {
            stack: BoxCloneSyncService::new(stack),
            peer,
        }
    }

    /// The peer's name, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends a request and waits for its response.
    ///
    /// # Errors
    /// - [`BusError::Timeout`] when the last attempt timed out;
    /// - [`BusError::DeadlineExceeded`] when the overall deadline ran out;
    /// - [`BusError::Overloaded`], [`BusError::PeerGone`],
    ///   [`BusError::FrameTooLarge`], [`BusError::Decode`],
    ///   [`BusError::Encode`], or the peer's [`BusError::Remote`] error.
    ///
    /// # Cancellation
    /// Dropping the returned future cancels the request at the peer.
    pub async fn send<M: Message>(
        &self,
        request: M::Request,
        options: SendOptions,
    ) -> Result<M::Response, BusError> {
        let started = Instant::now();
        let deadline_at = options.deadline.map(|d| started + d);
        let mut delays = options.delays();
        let trace = TraceContext::current_or_new();
        let mut attempts = 0u32;
        let mut request = Some(request);
        loop {
            attempts += 1;
            let remaining = deadline_at.map(|at| at.saturating_duration_since(Instant::now()));
            let attempt_timeout = match remaining {
                Some(r) => r.min(options.timeout),
                None => options.timeout,
            };
            let cut_by_deadline = remaining.is_some_and(|r| r < options.timeout);
            // The last possible attempt moves the request; earlier ones clone it.
            let payload = if options.retries == 0 {
                request.take().expect("one attempt without retries")
            } else {
                request
                    .clone()
                    .expect("the request is kept while retries remain")
            };
            let envelope = Envelope {
                id: RequestId::next(),
                message: M::NAME.into(),
                deadline: Some(attempt_timeout),
                trace: trace.child(),
                body: Body::local(payload),
            };
            let mut stack = self.stack.clone();
            let attempt = async move { stack.ready().await?.call(envelope).await };
            let error = match tokio::time::timeout(attempt_timeout, attempt).await {
                Ok(Ok(body)) => return body.decode::<M::Response>(M::NAME),
                Ok(Err(e)) => e,
                Err(_) if cut_by_deadline => BusError::DeadlineExceeded {
                    message: M::NAME,
                    deadline: options.deadline.unwrap_or_default(),
                    attempts,
                    last_error: None,
                },
                Err(_) => BusError::Timeout {
                    message: M::NAME,
                    after: attempt_timeout,
                },
            };
            let retry_allowed = error.is_retryable() && (M::IDEMPOTENT || error.never_sent());
            if !retry_allowed || matches!(error, BusError::DeadlineExceeded { .. }) {
                return Err(error);
            }
            let Some(delay) = delays.next() else {
                return Err(error);
            };
            if let (Some(at), Some(deadline)) = (deadline_at, options.deadline)
                && Instant::now() + delay >= at
            {
                return Err(BusError::DeadlineExceeded {
                    message: M::NAME,
                    deadline,
                    attempts,
                    last_error: Some(Box::new(error)),
                });
            }
            tracing::debug!(message = M::NAME, attempt = attempts, ?delay, error = %error, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// [`Bus::send`] with default options.
    ///
    /// # Errors
    /// As [`Bus::send`].
    pub async fn request<M: Message>(&self, request: M::Request) -> Result<M::Response, BusError> {
        self.send::<M>(request, SendOptions::default()).await
    }
}

/// The transport as the innermost tower service.
impl Service<Envelope> for transport::TransportService {
    type Response = Body;
    type Error = BusError;
    type Future = BoxFuture<Result<Body, BusError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BusError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        self.transport.call(envelope)
    }
}
