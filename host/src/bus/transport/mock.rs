//! A scripted transport for unit tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;

use crate::bus::{
    Body, BoxFuture, BusError, CodecProblem, Envelope, Message, RequestId, TraceContext,
};

/// What the mock answers to one request.
#[derive(Debug)]
pub enum MockReply {
    /// Answer with this body.
    Respond(Body),
    /// Fail with this error.
    Fail(BusError),
    /// Never answer (to exercise timeouts and cancellation).
    Hang,
    /// Wait, then answer as the inner reply says.
    After(Duration, Box<MockReply>),
}

impl MockReply {
    /// Answers with a typed response of message `M`.
    pub fn ok<M: Message>(response: M::Response) -> Self {
        MockReply::Respond(Body::local(response))
    }
}

/// A request the mock received.
#[derive(Clone, Debug, PartialEq)]
pub struct SentMessage {
    /// The attempt's id.
    pub id: RequestId,
    /// The message's name.
    pub message: String,
    /// Time the caller left for the answer.
    pub deadline: Option<Duration>,
    /// The caller's trace.
    pub trace: TraceContext,
}

type Responder = Box<dyn FnMut(&Envelope, u32) -> MockReply + Send>;

#[derive(Default)]
struct State {
    sent: Vec<(SentMessage, Body)>,
    responders: HashMap<String, Responder>,
    calls: HashMap<String, u32>,
    cancelled: Vec<RequestId>,
}

/// Answers each request with the reply its message's responder scripts, and
/// records every request, and every request whose caller gave up, for
/// assertions. A message with no responder never gets an answer.
#[derive(Clone, Default)]
pub struct MockTransport {
    state: Arc<Mutex<State>>,
}

impl MockTransport {
    /// A mock with no responders.
    pub fn new() -> Self {
        MockTransport::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Scripts message `M`: `respond(request, n)` is called for the n-th
    /// request of `M` (from 1) and says how to answer it.
    pub fn on<M: Message>(
        &self,
        mut respond: impl FnMut(&M::Request, u32) -> MockReply + Send + 'static,
    ) -> &Self {
        let responder: Responder =
            Box::new(
                move |envelope, n| match envelope.body.downcast_ref::<M::Request>() {
                    Some(request) => respond(request, n),
                    None => MockReply::Fail(BusError::Decode {
                        what: M::NAME.into(),
                        reason: CodecProblem::NotLocal("the mock expected a local value"),
                    }),
                },
            );
        self.lock()
            .responders
            .insert(M::NAME.to_string(), responder);
        self
    }

    /// Every request received, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.lock().sent.iter().map(|(m, _)| m.clone()).collect()
    }

    /// The payloads of every request of message `M` received, in order.
    pub fn requests<M: Message>(&self) -> Vec<M::Request> {
        self.lock()
            .sent
            .iter()
            .filter(|(m, _)| m.message == M::NAME)
            .filter_map(|(_, body)| body.downcast_ref::<M::Request>().cloned())
            .collect()
    }

    /// The requests whose caller dropped its future before the answer.
    pub fn cancelled(&self) -> Vec<RequestId> {
        self.lock().cancelled.clone()
    }
}

impl super::Transport for MockTransport {
    fn peer(&self) -> &str {
        "mock"
    }

    fn call(&self, envelope: Envelope) -> BoxFuture<Result<Body, BusError>> {
        let id = envelope.id;
        let reply = {
            let mut state = self.lock();
            let n = {
                let count = state.calls.entry(envelope.message.to_string()).or_default();
                *count += 1;
                *count
            };
            let reply = match state.responders.get_mut(envelope.message.as_ref()) {
                Some(respond) => respond(&envelope, n),
                None => MockReply::Hang,
            };
            let sent = SentMessage {
                id,
                message: envelope.message.to_string(),
                deadline: envelope.deadline,
                trace: envelope.trace,
            };
            state.sent.push((sent, envelope.body));
            reply
        };
        let guard = CancelGuard {
            state: self.state.clone(),
            id,
            done: false,
        };
        async move {
            // Move the whole guard in (not just the field it writes).
            let mut guard = guard;
            let result = play(reply).await;
            guard.done = true;
            result
        }
        .boxed()
    }
}

fn play(reply: MockReply) -> BoxFuture<Result<Body, BusError>> {
    async move {
        match reply {
            MockReply::Respond(body) => Ok(body),
            MockReply::Fail(error) => Err(error),
            MockReply::Hang => futures::future::pending().await,
            MockReply::After(delay, then) => {
                tokio::time::sleep(delay).await;
                play(*then).await
            }
        }
    }
    .boxed()
}

struct CancelGuard {
    state: Arc<Mutex<State>>,
    id: RequestId,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.cancelled.push(self.id);
        }
    }
}
