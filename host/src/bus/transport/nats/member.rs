//! A member of a NATS pool: serves its router to every request of its
//! model that NATS hands it, with heartbeats, a bound on requests in flight
//! and cancellation.
//!
//! # Invariants
//! - Every request taken is answered `Accepted` at once, then `Working`
//!   every [`limits::NATS_HEARTBEAT`], then `Done`, each naming the model
//!   served at that moment; a request refused (not a request frame, or no
//!   room) gets one `Done` with the error.
//! - At most `room` requests run at once; past it a request is refused
//!   `Unavailable` with a zero retry delay, so the caller's retry can reach
//!   another member.
//! - A cancelled request's handler is dropped and nobody is answered; it
//!   leaves the table of running requests and frees its room either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Cancel, NatsError, QUEUE_GROUP, Reply, SUBJECT_PREFIX, model_token};
use crate::bus::transport::child::Frame;
use crate::bus::{Envelope, ErrorCode, RemoteError, Router};
use crate::limits;

/// The requests running, by reply subject, so that a [`Cancel`] can drop
/// one.
type Running = Arc<Mutex<HashMap<String, CancellationToken>>>;

/// Serves `router` to the pool of `model` on `client` until `stop`: one
/// queue subscription for every verb of the model, at most `room` requests
/// at once, each answered with the model id `serving()` returns. Says on
/// `ready` once subscribed (or why not).
///
/// # Errors
/// [`NatsError::Subscribe`].
pub async fn serve(
    client: async_nats::Client,
    model: &str,
    router: Arc<Router>,
    room: usize,
    serving: Arc<dyn Fn() -> String + Send + Sync>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<Result<(), NatsError>>,
) -> Result<(), NatsError> {
    let wildcard = format!("{SUBJECT_PREFIX}.*.{}", model_token(model));
    let subscribed = client
        .queue_subscribe(wildcard.clone(), QUEUE_GROUP.to_string())
        .await;
    let mut requests = match subscribed {
        Ok(s) => s,
        Err(e) => {
            let error = |e: &dyn std::fmt::Display| NatsError::Subscribe {
                subject: wildcard.clone(),
                message: e.to_string(),
            };
            let _ = ready.send(Err(error(&e)));
            return Err(error(&e));
        }
    };
    let member = Member::new(client.clone(), router, room, serving).await;
    // The subscriptions reach the server before anyone is told we serve.
    let _ = client.flush().await;
    let _ = ready.send(Ok(()));
    tracing::info!(subject = %wildcard, group = QUEUE_GROUP, "serving the pool over NATS");
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        member.take(message).await;
    }
    Ok(())
}

/// Sends [`Reply`] messages to one caller's reply subject.
#[derive(Clone)]
struct Replier {
    client: async_nats::Client,
    reply_to: async_nats::Subject,
}

impl Replier {
    async fn send(&self, reply: Reply) {
        let client = self.client.clone();
        let reply_to = self.reply_to.clone();
        let mut bytes = Vec::new();
        if ciborium::into_writer(&reply, &mut bytes).is_ok() {
            let _ = client.publish(reply_to, Bytes::from(bytes)).await;
        }
    }
}

/// What every request a member takes needs.
struct Member {
    client: async_nats::Client,
    router: Arc<Router>,
    room: usize,
    serving: Arc<dyn Fn() -> String + Send + Sync>,
    running: Running,
    in_flight: Arc<AtomicUsize>,
    /// Where callers send [`Cancel`].
    cancel_inbox: String,
}

impl Member {
    /// A member, listening for cancels on an inbox of its own.
    async fn new(
        client: async_nats::Client,
        router: Arc<Router>,
        room: usize,
        serving: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> Self {
        // Cancels come to this member's own inbox, keyed by the request's reply
        // subject (unique per request).
        let cancel_inbox = client.new_inbox();
        let running: Running = Arc::default();
        match client.subscribe(cancel_inbox.clone()).await {
            Ok(mut cancels) => {
                let running = running.clone();
                tokio::spawn(async move {
                    while let Some(message) = cancels.next().await {
                        if let Ok(cancel) =
                            ciborium::from_reader::<Cancel, _>(message.payload.as_ref())
                            && let Some(token) = running
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&cancel.reply_to)
                        {
                            token.cancel();
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("NATS: no cancel inbox, callers cannot cancel: {e}"),
        }
        Member {
            client,
            router,
            room,
            serving,
            running,
            in_flight: Arc::new(AtomicUsize::new(0)),
            cancel_inbox,
        }
    }

    /// Takes one message: refused at once if it is not a request or there
    /// is no room, else run on a task of its own.
    async fn take(&self, message: async_nats::Message) {
        let Some(reply_to) = message.reply.clone() else {
            return;
        };
        let send = Replier {
            client: self.client.clone(),
            reply_to,
        };
        let model_now = (self.serving)();
        let frame = match ciborium::from_reader::<Frame, _>(message.payload.as_ref())
            .ok()
            .and_then(Frame::into_envelope)
        {
            Some(envelope) => envelope,
            None => {
                let error = RemoteError::new(ErrorCode::Decode, "not a request frame");
                send.send(Reply::Done {
                    model: model_now,
                    result: Err(error),
                })
                .await;
                return;
            }
        };
        let room = self.room;
        if self.in_flight.load(Ordering::Relaxed) >= room {
            let mut busy = RemoteError::new(
                ErrorCode::Unavailable,
                format!("this member is busy ({room} requests in flight)"),
            );
            busy.retry_after_ms = Some(0);
            send.send(Reply::Done {
                model: model_now,
                result: Err(busy),
            })
            .await;
            return;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let key = message
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let cancelled = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), cancelled.clone());
        let request = Request {
            router: self.router.clone(),
            in_flight: self.in_flight.clone(),
            serving: self.serving.clone(),
            running: self.running.clone(),
            key,
            cancelled,
            send,
        };
        tokio::spawn(request.run(frame, model_now, self.cancel_inbox.clone()));
    }
}

/// One request taken, running on a task of its own.
struct Request {
    router: Arc<Router>,
    in_flight: Arc<AtomicUsize>,
    serving: Arc<dyn Fn() -> String + Send + Sync>,
    running: Running,
    /// Its reply subject, its key in `running`.
    key: String,
    cancelled: CancellationToken,
    send: Replier,
}

impl Request {
    /// Accepts `frame`, runs it with heartbeats until it answers or is
    /// cancelled, and answers.
    async fn run(self, frame: Envelope, model_now: String, cancel_to: String) {
        let Request {
            router,
            in_flight,
            serving,
            running,
            key,
            cancelled,
            send,
        } = self;
        send.send(Reply::Accepted {
            model: model_now,
            cancel: cancel_to,
        })
        .await;
        let mut handler = router.dispatch(frame);
        let mut beat = tokio::time::interval(limits::NATS_HEARTBEAT);
        beat.tick().await;
        let result = loop {
            tokio::select! {
                result = &mut handler => break Some(result),
                _ = beat.tick() => send.send(Reply::Working).await,
                // The caller gave up: its handler (and the job it
                // queued) is dropped, and nobody is answered.
                () = cancelled.cancelled() => break None,
            }
        };
        running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let Some(result) = result else {
            in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let result = result.and_then(|body| {
            body.into_bytes("answer")
                .map(|b| serde_bytes::ByteBuf::from(b.to_vec()))
                .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))
        });
        send.send(Reply::Done {
            model: serving(),
            result,
        })
        .await;
        in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
