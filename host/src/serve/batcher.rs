//! Dynamic batching: requests that arrive together share a batch.
//!
//! Every request's texts are cut into pieces of at most the token budget
//! (`[serve] max_batch_tokens`) and queued. A few lanes (one more than the
//! pool has instances, so a batch is always ready when an instance frees)
//! each take the oldest piece, add whatever else is queued up to the budget,
//! wait at most `batch_wait` for more while every instance is busy, and send the merged batch to
//! [`Supervisor::embed`], which cuts it again across idle instances. The
//! answer is split back into each piece's rows, in order.
//!
//! Invariants:
//! - A text's vector does not depend on its batch neighbours (every engine
//!   embeds texts independently), so merging never changes an answer.
//! - A poison text fails only its own row: the supervisor isolates it and
//!   every other text of the batch, of any request, gets its vector.
//! - The queue is bounded ([`limits::SERVE_BATCH_QUEUE`]); a full queue is
//!   refused at once ([`BatchError::Overloaded`]), never waited on.
//! - A piece whose caller is gone or whose deadline passed is dropped
//!   before it costs an instance any work; a batch whose callers are all
//!   gone is dropped from the supervisor's queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::limits;
use crate::supervisor::{Supervisor, SupervisorError};

/// Merged batch sizes, in texts.
pub const METRIC_BATCH_SIZE: &str = "embed_batch_size";
/// Merged batch sizes, in tokens.
pub const METRIC_BATCH_TOKENS: &str = "embed_batch_tokens";
/// Pieces waiting for a batch.
pub const METRIC_QUEUE_DEPTH: &str = "embed_queue_depth";

/// One text's answer: its vector, or why it could not be embedded.
pub type Row = Result<Vec<f32>, String>;

/// Why a request got no rows at all.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BatchError {
    /// The queue is full: retry shortly.
    #[error("the service is overloaded: {0} requests wait for the embedder")]
    Overloaded(usize),
    /// The pool stopped (the service is shutting down or was reloaded).
    #[error("the embedder pool was stopped")]
    Stopped,
    /// The supervisor's error for the whole batch.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// How batches are formed.
#[derive(Clone, Copy, Debug)]
pub struct BatchSettings {
    /// Tokens in one batch, at most (a single larger text goes alone).
    pub max_batch_tokens: usize,
    /// How long a batch waits for more pieces after its first.
    pub wait: Duration,
    /// Batches formed or running at once.
    pub lanes: usize,
}

struct Piece {
    texts: Vec<String>,
    /// Texts in the piece (`texts` is emptied into the batch).
    count: usize,
    tokens: usize,
    is_query: bool,
    until: Instant,
    reply: oneshot::Sender<Result<Vec<Row>, BatchError>>,
}

struct Queue {
    rx: mpsc::Receiver<Piece>,
    /// A piece taken that did not fit the batch being formed: the next
    /// batch starts with it, so order is kept.
    carry: Option<Piece>,
}

/// The queue and its lanes. Dropping it (or [`Batcher::close`]) lets the
/// lanes finish what is queued and end.
pub struct Batcher {
    tx: std::sync::Mutex<Option<mpsc::Sender<Piece>>>,
    lanes: std::sync::Mutex<Vec<JoinHandle<()>>>,
    settings: BatchSettings,
}

impl Batcher {
    /// Starts the lanes over `supervisor`.
    pub fn start(supervisor: Supervisor, settings: BatchSettings) -> Self {
        let (tx, rx) = mpsc::channel(limits::SERVE_BATCH_QUEUE);
        let queue = Arc::new(Mutex::new(Queue { rx, carry: None }));
        let lanes = (0..settings.lanes.max(1))
            .map(|_| {
                let (queue, supervisor, tx) = (queue.clone(), supervisor.clone(), tx.downgrade());
                tokio::spawn(lane(queue, supervisor, settings, tx))
            })
            .collect();
        Batcher {
            tx: std::sync::Mutex::new(Some(tx)),
            lanes: std::sync::Mutex::new(lanes),
            settings,
        }
    }

    /// Embeds `texts` (with their token counts) by `until`: cut into pieces
    /// of at most the budget, queued, gathered in order.
    ///
    /// # Errors
    /// [`BatchError`] when no row can be given: the queue is full, the pool
    /// stopped, or the supervisor failed the whole batch.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        tokens: &[usize],
        is_query: bool,
        until: Instant,
    ) -> Result<Vec<Row>, BatchError> {
        let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Err(BatchError::Stopped);
        };
        let mut waiting = Vec::new();
        let mut texts = texts.into_iter();
        for range in pieces(tokens, self.settings.max_batch_tokens) {
            let piece_texts: Vec<String> = texts.by_ref().take(range.len()).collect();
            let (reply, answer) = oneshot::channel();
            let piece = Piece {
                count: piece_texts.len(),
                texts: piece_texts,
                tokens: tokens[range].iter().sum(),
                is_query,
                until,
                reply,
            };
            match tx.try_send(piece) {
                Ok(()) => waiting.push(answer),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(BatchError::Overloaded(limits::SERVE_BATCH_QUEUE));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(BatchError::Stopped),
            }
        }
        metrics::gauge!(METRIC_QUEUE_DEPTH).set((tx.max_capacity() - tx.capacity()) as f64);
        drop(tx);
        let mut rows = Vec::with_capacity(tokens.len());
        for answer in waiting {
            rows.extend(answer.await.map_err(|_| BatchError::Stopped)??);
        }
        Ok(rows)
    }

    /// Stops taking pieces and waits until the lanes have answered every
    /// piece already queued.
    pub async fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let lanes = std::mem::take(&mut *self.lanes.lock().unwrap_or_else(|p| p.into_inner()));
        for lane in lanes {
            let _ = lane.await;
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Index ranges of consecutive texts whose tokens fit `budget` together (a
/// text over the budget alone makes a piece of its own).
pub fn pieces(tokens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, &t) in tokens.iter().enumerate() {
        if i > start && sum + t > budget {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += t;
    }
    if start < tokens.len() {
        out.push(start..tokens.len());
    }
    out
}

async fn lane(
    queue: Arc<Mutex<Queue>>,
    supervisor: Supervisor,
    settings: BatchSettings,
    tx: mpsc::WeakSender<Piece>,
) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let first = match queue.carry.take() {
                Some(piece) => piece,
                None => match queue.rx.recv().await {
                    Some(piece) => piece,
                    None => return,
                },
            };
            gather(&mut queue, first, &settings, &supervisor).await
        };
        if let Some(tx) = tx.upgrade() {
            metrics::gauge!(METRIC_QUEUE_DEPTH).set((tx.max_capacity() - tx.capacity()) as f64);
        }
        run(&supervisor, batch).await;
    }
}

/// `first` and the pieces queued after it that fit the budget, waiting up to
/// the batch wait for more while the budget is not full and every instance
/// is busy (with one free, waiting would only leave it idle).
async fn gather(
    queue: &mut Queue,
    first: Piece,
    settings: &BatchSettings,
    supervisor: &Supervisor,
) -> Vec<Piece> {
    let is_query = first.is_query;
    let mut tokens = first.tokens;
    let mut batch = vec![first];
    let stop = Instant::now() + settings.wait;
    while tokens < settings.max_batch_tokens {
        let next = match queue.rx.try_recv() {
            Ok(piece) => piece,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if supervisor.free_instances() > 0 => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(stop, queue.rx.recv()).await {
                    Ok(Some(piece)) => piece,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        if next.is_query != is_query || tokens + next.tokens > settings.max_batch_tokens {
            queue.carry = Some(next);
            break;
        }
        tokens += next.tokens;
        batch.push(next);
    }
    batch
}

/// Embeds the live pieces of `batch` as one call and answers each.
async fn run(supervisor: &Supervisor, batch: Vec<Piece>) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for piece in batch {
        if piece.reply.is_closed() {
            continue;
        }
        if piece.until <= now {
            let _ = piece.reply.send(Err(BatchError::Supervisor(
                SupervisorError::DeadlineExceeded(Duration::ZERO),
            )));
            continue;
        }
        live.push(piece);
    }
    let Some(until) = live.iter().map(|p| p.until).max() else {
        return;
    };
    let is_query = live[0].is_query;
    let mut texts = Vec::new();
    let mut tokens = 0;
    for piece in &mut live {
        texts.append(&mut piece.texts);
        tokens += piece.tokens;
    }
    metrics::histogram!(METRIC_BATCH_SIZE).record(texts.len() as f64);
    metrics::histogram!(METRIC_BATCH_TOKENS).record(tokens as f64);
    let n = texts.len();
    // If every caller of the batch gives up, the batch is dropped too: its
    // job leaves the supervisor's queue unrun (or its answer is dropped).
    let result = {
        let gone = futures::future::join_all(live.iter_mut().map(|p| p.reply.closed()));
        tokio::select! {
            result = supervisor.embed(texts, is_query, until.saturating_duration_since(now)) => Some(result),
            _ = gone => None,
        }
    };
    let Some(result) = result else {
        return;
    };
    let rows: Vec<Row> = match result {
        Err(e) => {
            for piece in live {
                let _ = piece.reply.send(Err(BatchError::Supervisor(e.clone())));
            }
            return;
        }
        Ok(result) => {
            let mut rows: Vec<Option<Row>> = vec![None; n];
            for f in result.failed {
                if let Some(row) = rows.get_mut(f.index as usize) {
                    *row = Some(Err(f.reason));
                }
            }
            let mut vectors = result.vectors.iter();
            rows.into_iter()
                .map(|row| match row {
                    Some(failed) => failed,
                    None => vectors
                        .next()
                        .map(<[f32]>::to_vec)
                        .ok_or_else(|| "the embedder returned too few vectors".to_string()),
                })
                .collect()
        }
    };
    // Rows go back piece by piece, in the order the texts were appended.
    let mut rest = rows.into_iter();
    for piece in live {
        let mine: Vec<Row> = rest.by_ref().take(piece.count).collect();
        let _ = piece.reply.send(Ok(mine));
    }
}
