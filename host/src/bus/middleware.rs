//! The bus's middleware, as tower layers: tracing spans and metrics.
//!
//! The client stack is, outside in: [`TraceLayer`], [`MetricsLayer`],
//! `tower::load_shed`, `tower::limit::concurrency`, then the transport. Load
//! shedding over a concurrency limit is what turns "too many requests in
//! flight" into an immediate `Overloaded` instead of a queue, and it sits
//! inside tracing and metrics so that shed requests are logged and counted.
//!
//! Timeouts, retries and deadlines are not layers: they vary per request
//! (`SendOptions`), while a tower `Timeout` or `Retry` is fixed per service,
//! so they live in [`super::Bus::send`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use tower::{Layer, Service};
use tracing::Instrument;

use super::{Body, BusError, Envelope};

/// Metric: requests sent, by `message` and `outcome`.
pub const METRIC_REQUESTS: &str = "bus_requests_total";
/// Metric: request duration in seconds, by `message`.
pub const METRIC_DURATION: &str = "bus_request_duration_seconds";
/// Metric: requests in flight, by `message`.
pub const METRIC_IN_FLIGHT: &str = "bus_requests_in_flight";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Puts each request in a `bus.request` span carrying the message name, the
/// request id and the trace id, and logs its outcome.
#[derive(Clone, Debug)]
pub struct TraceLayer {
    peer: std::sync::Arc<str>,
}

impl TraceLayer {
    /// A layer for requests to `peer`.
    pub fn new(peer: impl Into<std::sync::Arc<str>>) -> Self {
        TraceLayer { peer: peer.into() }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            peer: self.peer.clone(),
        }
    }
}

/// See [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    peer: std::sync::Arc<str>,
}

impl<S> Service<Envelope> for Trace<S>
where
    S: Service<Envelope, Response = Body, Error = BusError>,
    S::Future: Send + 'static,
{
    type Response = Body;
    type Error = BusError;
    type Future = BoxFuture<Result<Body, BusError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BusError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let span = tracing::debug_span!(
            "bus.request",
            peer = %self.peer,
            message = %envelope.message,
            request_id = envelope.id.0,
            trace_id = envelope.trace.trace_id,
        );
        let fut = {
            let _enter = span.enter();
            self.inner.call(envelope)
        };
        Box::pin(
            async move {
                let result = fut.await;
                match &result {
                    Ok(_) => tracing::trace!("answered"),
                    Err(e) => tracing::debug!(error = %e, "failed"),
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Records [`METRIC_REQUESTS`] (outcome `cancelled` when the caller gave up
/// first, which is how a timeout shows),, [`METRIC_DURATION`] and [`METRIC_IN_FLIGHT`]
/// through the `metrics` facade (free when no recorder is installed).
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsLayer;

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
}

/// The `outcome` label of a finished request.
pub fn outcome(result: &Result<Body, BusError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(BusError::Timeout { .. }) => "timeout",
        Err(BusError::DeadlineExceeded { .. }) => "deadline",
        Err(BusError::Overloaded { .. }) => "overloaded",
        Err(BusError::PeerGone { .. }) => "peer_gone",
        Err(BusError::Remote(_)) => "remote_error",
        Err(BusError::Decode { .. } | BusError::Encode { .. }) => "codec_error",
        Err(BusError::FrameTooLarge { .. }) => "frame_too_large",
    }
}

impl<S> Service<Envelope> for Metrics<S>
where
    S: Service<Envelope, Response = Body, Error = BusError>,
    S::Future: Send + 'static,
{
    type Response = Body;
    type Error = BusError;
    type Future = BoxFuture<Result<Body, BusError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BusError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let message = envelope.message.clone();
        let started = tokio::time::Instant::now();
        let in_flight = metrics::gauge!(METRIC_IN_FLIGHT, "message" => message.clone());
        in_flight.increment(1.0);
        // Runs when the request ends, or when the caller drops it (a timeout
        // or a cancellation), which is then counted as `cancelled`.
        let mut finish = Finish {
            message,
            started,
            in_flight,
            outcome: "cancelled",
        };
        self.inner
            .call(envelope)
            .map(move |result| {
                finish.outcome = outcome(&result);
                drop(finish);
                result
            })
            .boxed()
    }
}

struct Finish {
    message: std::borrow::Cow<'static, str>,
    started: tokio::time::Instant,
    in_flight: metrics::Gauge,
    outcome: &'static str,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
        metrics::counter!(METRIC_REQUESTS, "message" => self.message.clone(), "outcome" => self.outcome).increment(1);
        metrics::histogram!(METRIC_DURATION, "message" => self.message.clone())
            .record(self.started.elapsed().as_secs_f64());
    }
}
