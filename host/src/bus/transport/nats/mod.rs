//! The NATS transport: embedder pools on several machines.
//!
//! A request travels as the child transport's [`Frame::Request`] (CBOR:
//! id, message, remaining deadline, trace context, body) on the subject
//! `embedhost.<verb>.<model>` (`embedhost.embed.all-minilm-l6-v2`); every
//! `embedhost serve --nats` of that model subscribes in the queue group
//! [`QUEUE_GROUP`], so NATS hands each request to one member.
//!
//! The answer comes back on the caller's inbox as [`Reply`] messages: at
//! once `Accepted` (the member took it), then `Working` every
//! [`limits::NATS_HEARTBEAT`] while it runs, then `Done` with the result.
//! So a caller learns within [`limits::NATS_ACCEPT_TIMEOUT`] that no member
//! took its request, and within [`limits::NATS_HEARTBEAT_TIMEOUT`] that the
//! member died, instead of waiting out a long embedding deadline. Both are
//! [`ErrorCode::Unavailable`] with a retry delay: the request is idempotent
//! and is sent again, and NATS picks a member again.
//!
//! Invariants:
//! - Every reply names the member's model ([`Reply::Accepted`],
//!   [`Reply::Done`]); the first one seen is the pool's, and a member of
//!   another model is refused, never mixed into an index.
//! - A member takes a request only while it has room (its pool's instances
//!   times [`limits::NATS_PENDING_PER_INSTANCE`]); past it, it answers
//!   `Unavailable` at once, so the caller's retry can reach another.
//! - The remaining deadline travels with the request; the member's router
//!   enforces it, and its supervisor drops a queued job whose caller is
//!   gone, so no member starts work its caller gave up on. A caller that
//!   gives up before its deadline (drops its future) sends [`Cancel`] to the
//!   member that accepted the request, which drops it the same way.
//!
//! The member's side, serving a pool, is in `member`.

mod member;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::child::Frame;
use crate::bus::{Body, BoxFuture, BusError, Envelope, ErrorCode, RemoteError};
use crate::limits;

pub use member::serve;

/// Every subject starts with this.
pub const SUBJECT_PREFIX: &str = "embedhost";
/// The queue group every member joins.
pub const QUEUE_GROUP: &str = "embedhost";

/// One message back to a caller.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// A member of `model` took the request.
    Accepted {
        /// The member's model id.
        model: String,
        /// Where the caller sends [`Cancel`] if it gives up first.
        cancel: String,
    },
    /// Still running.
    Working,
    /// The answer.
    Done {
        /// The member's model id.
        model: String,
        /// The handler's CBOR answer or its error.
        result: Result<serde_bytes::ByteBuf, RemoteError>,
    },
}

/// A caller that gave up on the request it sent with reply subject
/// `reply_to`: the member drops the request's handler (as the child
/// transport's `Cancel` frame does).
#[derive(Debug, Serialize, Deserialize)]
pub struct Cancel {
    /// The request's reply subject, unique per request.
    pub reply_to: String,
}

/// Errors setting up NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached or refused us.
    #[error("cannot connect to NATS at `{url}`: {message}")]
    Connect {
        /// The server.
        url: String,
        /// Why.
        message: String,
    },
    /// A subscription failed.
    #[error("NATS subscription to `{subject}` failed: {message}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        message: String,
    },
}

/// Credentials and TLS, passed through to the client.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NatsOptions {
    /// A `.creds` file (JWT and NKey).
    pub creds: Option<PathBuf>,
    /// CA certificates to trust (PEM).
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse a connection without TLS.
    pub require_tls: bool,
}

/// Connects to `url` (reconnecting for ever after a loss: requests in
/// flight then fail as `Unavailable` and are retried).
///
/// # Errors
/// [`NatsError::Connect`].
pub async fn connect(
    url: &str,
    options: &NatsOptions,
    name: &str,
) -> Result<async_nats::Client, NatsError> {
    // Credentials in the URL (`nats://user:pass@host`, or `nats://token@host`)
    // are given to the client as such, and never appear in a message.
    let (url, user, pass) = split_credentials(url);
    let fail = |message: String| NatsError::Connect {
        url: url.clone(),
        message,
    };
    let mut connect = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(limits::NATS_CONNECT_TIMEOUT)
        .require_tls(options.require_tls);
    match (user, pass) {
        (Some(user), Some(pass)) => connect = connect.user_and_password(user, pass),
        (Some(token), None) => connect = connect.token(token),
        _ => {}
    }
    if let Some(creds) = &options.creds {
        connect = connect
            .credentials_file(creds)
            .await
            .map_err(|e| fail(format!("credentials `{}`: {e}", creds.display())))?;
    }
    if let Some(ca) = &options.tls_ca {
        connect = connect.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &options.tls_cert {
        connect = connect.add_client_certificate(cert.clone(), key.clone());
    }
    connect
        .connect(url.as_str())
        .await
        .map_err(|e| fail(e.to_string()))
}

/// The URL without its user information, and the user (or token) and
/// password it carried.
pub fn split_credentials(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None, None);
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return (url.to_string(), None, None);
    };
    let (info, host) = (&rest[..at], &rest[at + 1..]);
    let (user, pass) = match info.split_once(':') {
        Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
        None => (Some(info.to_string()), None),
    };
    (format!("{scheme}://{host}"), user, pass)
}

/// The subject token of a model id: NATS separates tokens with `.` and
/// reserves `*` and `>`.
pub fn model_token(model: &str) -> String {
    model
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect()
}

/// The subject of `message` (`embedder.embed`) for `model`.
pub fn subject(message: &str, model: &str) -> String {
    let verb = message.rsplit('.').next().unwrap_or(message);
    format!("{SUBJECT_PREFIX}.{verb}.{}", model_token(model))
}

fn unavailable(message: impl Into<String>) -> BusError {
    let mut e = RemoteError::new(ErrorCode::Unavailable, message);
    e.retry_after_ms = Some(limits::NATS_RETRY_AFTER.as_millis() as u64);
    BusError::Remote(e)
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::Sender<Reply>>>>;

/// A connection to the pool of members serving one model.
pub struct Nats {
    client: async_nats::Client,
    model: String,
    inbox: String,
    pending: Pending,
    /// The model the pool serves: set by the first reply.
    pool_model: Arc<Mutex<Option<String>>>,
    listener: tokio::task::JoinHandle<()>,
    peer: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Nats {
    /// A transport to the members serving `model` (the configured model id).
    ///
    /// # Errors
    /// [`NatsError::Subscribe`] if the reply inbox cannot be subscribed.
    pub async fn new(client: async_nats::Client, model: &str) -> Result<Self, NatsError> {
        let inbox = client.new_inbox();
        let wildcard = format!("{inbox}.*");
        let mut replies =
            client
                .subscribe(wildcard.clone())
                .await
                .map_err(|e| NatsError::Subscribe {
                    subject: wildcard,
                    message: e.to_string(),
                })?;
        let pending: Pending = Arc::default();
        let routes = pending.clone();
        let listener = tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let Some(id) = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                let Ok(reply) = ciborium::from_reader::<Reply, _>(message.payload.as_ref()) else {
                    tracing::warn!(id, "a NATS reply that is not a Reply frame was dropped");
                    continue;
                };
                let sender = routes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned();
                match sender {
                    Some(sender) => {
                        let _ = sender.try_send(reply);
                    }
                    None => metrics::counter!(super::child::METRIC_LATE_REPLIES).increment(1),
                }
            }
        });
        Ok(Nats {
            peer: format!("nats:{}", subject("embedder.embed", model)),
            client,
            model: model.to_string(),
            inbox,
            pending,
            pool_model: Arc::default(),
            listener,
        })
    }
}

/// Removes a request's pending entry when its caller is done or gone.
struct PendingGuard(Pending, u64);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl super::Transport for Nats {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>> {
        let id = envelope.id.0;
        let subject = subject(&envelope.message, &self.model);
        let reply_to = format!("{}.{id}", self.inbox);
        let payload = match request_payload(envelope) {
            Ok(payload) => payload,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let (tx, mut rx) = mpsc::channel(limits::NATS_REPLIES_BUFFERED);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let guard = PendingGuard(self.pending.clone(), id);
        let client = self.client.clone();
        let this_model = self.pool_model.clone();
        let checker = ModelCheck(this_model);
        async move {
            let _guard = guard;
            // Until `Done`, dropping this future tells the member to drop
            // the request.
            let mut cancel = CancelOnDrop {
                client: client.clone(),
                to: None,
                reply_to: reply_to.clone(),
            };
            client
                .publish_with_reply(subject.clone(), reply_to, Bytes::from(payload))
                .await
                .map_err(|e| unavailable(format!("cannot publish to `{subject}`: {e}")))?;
            let mut wait = limits::NATS_ACCEPT_TIMEOUT;
            loop {
                let reply = match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => return Err(unavailable("the NATS reply listener stopped")),
                    Err(_) if wait == limits::NATS_ACCEPT_TIMEOUT => {
                        return Err(unavailable(format!(
                            "no member of `{subject}` took the request within {wait:?}"
                        )));
                    }
                    Err(_) => {
                        return Err(unavailable(format!(
                            "the member serving the request went silent for {wait:?} (lost)"
                        )));
                    }
                };
                match reply {
                    Reply::Accepted { model, cancel: to } => {
                        checker.check(&model)?;
                        cancel.to = Some(to);
                        wait = limits::NATS_HEARTBEAT_TIMEOUT;
                    }
                    Reply::Working => wait = limits::NATS_HEARTBEAT_TIMEOUT,
                    Reply::Done { model, result } => {
                        cancel.to = None;
                        checker.check(&model)?;
                        return match result {
                            Ok(bytes) => Ok(Body::Encoded(Bytes::from(bytes.into_vec()))),
                            Err(remote) => Err(BusError::Remote(remote)),
                        };
                    }
                }
            }
        }
        .boxed()
    }
}

/// Sends [`Cancel`] to the member that accepted a request, if the request
/// is dropped before its answer.
struct CancelOnDrop {
    client: async_nats::Client,
    to: Option<String>,
    reply_to: String,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(to) = self.to.take() else { return };
        let mut bytes = Vec::new();
        let cancel = Cancel {
            reply_to: std::mem::take(&mut self.reply_to),
        };
        if ciborium::into_writer(&cancel, &mut bytes).is_err() {
            return;
        }
        let client = self.client.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.publish(to, Bytes::from(bytes)).await;
            });
        }
    }
}

/// The pool's model, checked from a call's future.
struct ModelCheck(Arc<Mutex<Option<String>>>);

impl ModelCheck {
    fn check(&self, model: &str) -> Result<(), BusError> {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match pool.as_deref() {
            None => {
                *pool = Some(model.to_string());
                Ok(())
            }
            Some(expected) if expected == model => Ok(()),
            Some(expected) => Err(BusError::Remote(RemoteError::new(
                ErrorCode::Failed,
                format!(
                    "a NATS member serves `{model}`, but the pool serves `{expected}`: its answer is refused"
                ),
            ))),
        }
    }
}

/// The request frame of `envelope` as a NATS payload, within
/// [`limits::MAX_FRAME_BYTES`].
fn request_payload(envelope: Envelope) -> Result<Vec<u8>, BusError> {
    let what = envelope.message.to_string();
    let frame = Frame::request(envelope)?;
    let mut payload = Vec::new();
    if let Err(e) = ciborium::into_writer(&frame, &mut payload) {
        return Err(BusError::Encode {
            what,
            reason: e.into(),
        });
    }
    if payload.len() > limits::MAX_FRAME_BYTES {
        return Err(BusError::FrameTooLarge {
            size: payload.len(),
            max: limits::MAX_FRAME_BYTES,
        });
    }
    Ok(payload)
}
