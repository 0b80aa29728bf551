//! Dynamic batching: requests that arrive together share a batch, and a
//! large request does not make a small one wait for all of it.
//!
//! Every request's texts are cut into pieces of at most the token budget
//! (`[serve] max_batch_tokens`) and queued as one entry of a rotation. One
//! lane per instance of the pool (no more: a batch formed ahead of a free
//! instance would be one more batch a new sentence waits behind; forming
//! one takes microseconds) each form a batch, one lane at a time: the first
//! piece of the request at the head of the rotation, then the first piece
//! of the next requests in turn, up to the budget, waiting at most
//! `batch_wait` for more while every instance is busy. The batch goes to
//! [`Supervisor::embed`], which cuts it again across idle instances. The
//! answer is split back into each piece's rows, in order.
//!
//! **The fairness rule:** pieces are taken round-robin by request. A
//! request that gave a piece to a batch goes to the back of the rotation,
//! so a request waits for at most one piece of each request queued before
//! it per round, never for every piece of a large one: a single sentence
//! sent beside the largest legal request is in one of the next batches
//! formed. What it still waits for is about two batches of
//! `max_batch_tokens`: the one running on the instance it gets (a batch is
//! never preempted), and its own, which the rotation fills with the large
//! request's pieces (`cargo bench --bench serve` measures the p99 beside
//! 2,048-sentence requests).
//!
//! Invariants:
//! - A text's vector does not depend on its batch neighbours (every engine
//!   embeds texts independently), so merging never changes an answer.
//! - A request's pieces are answered in order; its rows come back in the
//!   order of its texts.
//! - A poison text fails only its own row: the supervisor isolates it and
//!   every other text of the batch, of any request, gets its vector.
//! - The queue is bounded ([`limits::SERVE_BATCH_QUEUE`] pieces); a request
//!   that does not fit is refused whole, at once ([`EmbedError::Overloaded`]),
//!   never waited on.
//! - A piece whose caller is gone or whose deadline passed is dropped
//!   before it costs an instance any work; a batch whose callers are all
//!   gone is dropped from the supervisor's queue.
//! - The batcher measures what a batch costs (tokens per second, from
//!   batches of at least [`limits::SERVE_THROUGHPUT_MIN_TOKENS`]), so a
//!   request can be told at once that it cannot finish within its deadline
//!   ([`Batcher::estimate`]).

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::job::{EmbedError, Row, TextFailure};
use crate::limits;
use crate::supervisor::{BatchResult, Supervisor, SupervisorError};

/// Merged batch sizes, in texts.
pub const METRIC_BATCH_SIZE: &str = "embed_batch_size";
/// Merged batch sizes, in tokens.
pub const METRIC_BATCH_TOKENS: &str = "embed_batch_tokens";
/// Pieces waiting for a batch.
pub const METRIC_QUEUE_DEPTH: &str = "embed_queue_depth";

/// How batches are formed.
#[derive(Clone, Debug)]
pub struct BatchSettings {
    /// Tokens in one batch, at most (a single larger text goes alone).
    pub max_batch_tokens: usize,
    /// How long a batch waits for more pieces after its first.
    pub wait: Duration,
    /// Batches formed or running at once.
    pub lanes: usize,
    /// The model served, the `model` label of the batcher's metrics.
    pub model: String,
}

struct Piece {
    texts: Vec<String>,
    /// Texts in the piece (`texts` is emptied into the batch).
    count: usize,
    tokens: usize,
    is_query: bool,
    until: Instant,
    /// The whole deadline its request was given, for messages.
    given: Duration,
    reply: oneshot::Sender<Result<Vec<Row>, EmbedError>>,
}

/// One request's pieces not yet taken.
struct Waiting {
    pieces: VecDeque<Piece>,
    tokens: usize,
}

/// The requests waiting, in the order of the round-robin.
#[derive(Default)]
struct Rotation {
    requests: VecDeque<Waiting>,
    pieces: usize,
    closed: bool,
}

impl Rotation {
    /// The first piece of the first request in the rotation whose next
    /// piece is of kind `is_query` (any, if `None`) and fits `room` tokens;
    /// that request goes to the back of the rotation.
    fn take(&mut self, is_query: Option<bool>, room: usize) -> Option<Piece> {
        let i = self.requests.iter().position(|w| {
            w.pieces
                .front()
                .is_some_and(|p| is_query.is_none_or(|q| p.is_query == q) && p.tokens <= room)
        })?;
        let mut waiting = self.requests.remove(i)?;
        let piece = waiting.pieces.pop_front()?;
        waiting.tokens -= piece.tokens;
        self.pieces -= 1;
        if !waiting.pieces.is_empty() {
            self.requests.push_back(waiting);
        }
        Some(piece)
    }
}

/// What the lanes share.
struct Shared {
    rotation: std::sync::Mutex<Rotation>,
    /// Woken when pieces are queued or the batcher closes.
    queued: Notify,
    /// One lane forms a batch at a time.
    forming: tokio::sync::Mutex<()>,
    /// The fastest rate, in tokens per second, one batch of this pool has
    /// been embedded at, once measured. The fastest, not an average: a
    /// batch slowed by a restart or a busy machine must not make the
    /// estimate refuse requests that would finish, and with large requests
    /// refused nothing would measure the pool again.
    rate: std::sync::Mutex<Option<f64>>,
    /// The `model` label of its metrics.
    model: String,
}

impl Shared {
    fn rotation(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long a request would take, as [`Batcher::estimate`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Its own tokens alone, on the whole pool.
    pub alone: Duration,
    /// With what the fairness rule puts ahead of it in the queue.
    pub queued: Duration,
}

/// The queue and its lanes. Dropping it (or [`Batcher::close`]) lets the
/// lanes finish what is queued and end.
pub struct Batcher {
    shared: Arc<Shared>,
    /// The lanes, spawned by the first [`Batcher::embed`] (so a batcher
    /// can be made outside a runtime, as a library user may).
    lanes: std::sync::Mutex<Option<Vec<JoinHandle<()>>>>,
    supervisor: Supervisor,
    settings: BatchSettings,
}

impl Batcher {
    /// A batcher over `supervisor`; its lanes start with its first job.
    pub fn start(supervisor: Supervisor, settings: BatchSettings) -> Self {
        let shared = Arc::new(Shared {
            rotation: std::sync::Mutex::new(Rotation::default()),
            queued: Notify::new(),
            forming: tokio::sync::Mutex::new(()),
            rate: std::sync::Mutex::new(None),
            model: settings.model.clone(),
        });
        Batcher {
            shared,
            lanes: std::sync::Mutex::new(None),
            supervisor,
            settings,
        }
    }

    /// Embeds `texts` (with their token counts) by `until`: ordered by
    /// length, longest first, so that each piece holds texts of about one
    /// length (an engine pads a batch to its longest text) and the longest
    /// pieces start first; cut into pieces of at most the budget, so that
    /// the lanes share the work by tokens, not by texts; queued; gathered
    /// back in the caller's order.
    ///
    /// # Errors
    /// [`EmbedError`] when no row can be given: the queue is full, the pool
    /// stopped, or the supervisor failed the whole batch.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        tokens: &[usize],
        is_query: bool,
        until: Instant,
    ) -> Result<Vec<Row>, EmbedError> {
        if texts.len() != tokens.len() {
            return Err(EmbedError::Counts {
                counts: tokens.len(),
                texts: texts.len(),
            });
        }
        // Nothing to queue: an empty request would stay in the rotation
        // for good.
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let given = until.saturating_duration_since(Instant::now());
        let order = longest_first(tokens);
        let sorted_tokens: Vec<usize> = order.iter().map(|&i| tokens[i]).collect();
        let mut slots: Vec<Option<String>> = texts.into_iter().map(Some).collect();
        let mut texts = order.iter().map(|&i| slots[i].take().unwrap_or_default());
        let mut waiting = Waiting {
            pieces: VecDeque::new(),
            tokens: 0,
        };
        let mut answers = Vec::new();
        for range in pieces(&sorted_tokens, self.settings.max_batch_tokens) {
            let piece_texts: Vec<String> = texts.by_ref().take(range.len()).collect();
            let (reply, answer) = oneshot::channel();
            let piece_tokens: usize = sorted_tokens[range].iter().sum();
            waiting.tokens += piece_tokens;
            waiting.pieces.push_back(Piece {
                count: piece_texts.len(),
                texts: piece_texts,
                tokens: piece_tokens,
                is_query,
                until,
                given,
                reply,
            });
            answers.push(answer);
        }
        self.queue(waiting)?;
        let mut sorted = Vec::with_capacity(tokens.len());
        for answer in answers {
            sorted.extend(answer.await.map_err(|_| EmbedError::Stopped)??);
        }
        let mut rows: Vec<Option<Row>> = vec![None; sorted.len()];
        for (row, &i) in sorted.into_iter().zip(&order) {
            rows[i] = Some(row);
        }
        Ok(rows
            .into_iter()
            .map(|row| row.unwrap_or_else(|| Err(TextFailure("no answer came back".into()))))
            .collect())
    }

    /// Spawns the lanes, once, on the runtime of the first job.
    fn lanes_up(&self) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.is_none() {
            let (shared, settings) = (&self.shared, &self.settings);
            *lanes = Some(
                (0..settings.lanes.max(1))
                    .map(|_| {
                        tokio::spawn(lane(
                            shared.clone(),
                            self.supervisor.clone(),
                            settings.clone(),
                        ))
                    })
                    .collect(),
            );
        }
    }

    /// Puts one request's pieces in the rotation, or refuses all of them.
    fn queue(&self, waiting: Waiting) -> Result<(), EmbedError> {
        {
            let mut rotation = self.shared.rotation();
            if rotation.closed {
                return Err(EmbedError::Stopped);
            }
            self.lanes_up();
            if rotation.pieces + waiting.pieces.len() > limits::SERVE_BATCH_QUEUE {
                return Err(EmbedError::Overloaded(rotation.pieces));
            }
            rotation.pieces += waiting.pieces.len();
            metrics::gauge!(METRIC_QUEUE_DEPTH, "model" => self.shared.model.clone())
                .set(rotation.pieces as f64);
            rotation.requests.push_back(waiting);
        }
        self.shared.queued.notify_waiters();
        Ok(())
    }

    /// How long `tokens` more tokens would take on the pool's `instances`,
    /// alone and behind what the fairness rule puts ahead of them (of each
    /// queued request, at most as many tokens as these), at the fastest rate
    /// measured; `None` until a batch large enough to measure has run. The
    /// rate of one batch times
    /// the instances overstates the pool's speed when the supervisor split
    /// that batch across instances, so the estimate errs short: it refuses
    /// only what cannot finish.
    pub fn estimate(&self, tokens: usize, instances: usize) -> Option<Estimate> {
        let rate = (*self.shared.rate.lock().unwrap_or_else(|p| p.into_inner()))?;
        let pool = rate * instances.max(1) as f64;
        let ahead: usize = self
            .shared
            .rotation()
            .requests
            .iter()
            .map(|w| w.tokens.min(tokens))
            .sum();
        Some(Estimate {
            alone: Duration::from_secs_f64(tokens as f64 / pool),
            queued: Duration::from_secs_f64((tokens + ahead) as f64 / pool),
        })
    }

    /// Requests with pieces waiting in the rotation.
    pub fn queued(&self) -> usize {
        self.shared.rotation().requests.len()
    }

    /// Stops taking pieces and waits until the lanes have answered every
    /// piece already queued.
    pub async fn close(&self) {
        self.shared.rotation().closed = true;
        self.shared.queued.notify_waiters();
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner()).take();
        for lane in lanes.into_iter().flatten() {
            let _ = lane.await;
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.rotation().closed = true;
        self.shared.queued.notify_waiters();
    }
}

/// The positions of `tokens`, longest first (ties in their order).
pub fn longest_first(tokens: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tokens[i]));
    order
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

async fn lane(shared: Arc<Shared>, supervisor: Supervisor, settings: BatchSettings) {
    loop {
        let batch = {
            let _forming = shared.forming.lock().await;
            let Some(first) = next_piece(&shared).await else {
                return;
            };
            gather(&shared, first, &settings, &supervisor).await
        };
        metrics::gauge!(METRIC_QUEUE_DEPTH, "model" => shared.model.clone())
            .set(shared.rotation().pieces as f64);
        run(&shared, &supervisor, batch, settings.max_batch_tokens).await;
    }
}

/// The next piece in the rotation, waiting for one; `None` once the
/// batcher is closed and nothing is left.
async fn next_piece(shared: &Shared) -> Option<Piece> {
    loop {
        let mut queued = pin!(shared.queued.notified());
        queued.as_mut().enable();
        {
            let mut rotation = shared.rotation();
            if let Some(piece) = rotation.take(None, usize::MAX) {
                return Some(piece);
            }
            if rotation.closed {
                return None;
            }
        }
        queued.await;
    }
}

/// `first` and the pieces the rotation gives next that fit the budget,
/// waiting up to the batch wait for more while nothing else is queued and
/// every instance is busy (with one free, waiting would only leave it
/// idle; with pieces queued that do not fit, the next batch has them).
async fn gather(
    shared: &Shared,
    first: Piece,
    settings: &BatchSettings,
    supervisor: &Supervisor,
) -> Vec<Piece> {
    let is_query = first.is_query;
    let mut tokens = first.tokens;
    let mut batch = vec![first];
    let stop = Instant::now() + settings.wait;
    while tokens < settings.max_batch_tokens {
        let mut queued = pin!(shared.queued.notified());
        queued.as_mut().enable();
        let left = {
            let mut rotation = shared.rotation();
            match rotation.take(Some(is_query), settings.max_batch_tokens - tokens) {
                Some(piece) => {
                    tokens += piece.tokens;
                    batch.push(piece);
                    continue;
                }
                None => rotation.pieces > 0 || rotation.closed,
            }
        };
        if left || supervisor.free_instances() > 0 {
            break;
        }
        if tokio::time::timeout_at(stop, queued).await.is_err() {
            break;
        }
    }
    batch
}

/// Embeds the live pieces of `batch` as one call and answers each.
async fn run(shared: &Shared, supervisor: &Supervisor, batch: Vec<Piece>, budget: usize) {
    let now = Instant::now();
    let mut live = live_pieces(batch, now);
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
    let model = shared.model.clone();
    metrics::histogram!(METRIC_BATCH_SIZE, "model" => model.clone()).record(texts.len() as f64);
    metrics::histogram!(METRIC_BATCH_TOKENS, "model" => model).record(tokens as f64);
    let n = texts.len();
    // If every caller of the batch gives up, the batch is dropped too: its
    // job leaves the supervisor's queue unrun (or its answer is dropped).
    // The supervisor cuts a batch across the instances free now: the rate
    // measured is then theirs together, and is kept per instance.
    let parts = crate::supervisor::split_parts(n, supervisor.free_instances().max(1));
    let started = Instant::now();
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
    // A budget set below the measuring size still measures its full batches.
    let measurable = limits::SERVE_THROUGHPUT_MIN_TOKENS.min(budget / 2).max(1);
    if result.is_ok() && tokens >= measurable {
        measured(shared, tokens / parts, started.elapsed());
    }
    let rows: Vec<Row> = match result {
        Err(e) => {
            for piece in live {
                let _ = piece.reply.send(Err(EmbedError::Supervisor(e.clone())));
            }
            return;
        }
        Ok(result) => rows_of(result, n),
    };
    // Rows go back piece by piece, in the order the texts were appended.
    let mut rest = rows.into_iter();
    for piece in live {
        let mine: Vec<Row> = rest.by_ref().take(piece.count).collect();
        let _ = piece.reply.send(Ok(mine));
    }
}

/// The pieces of `batch` still worth embedding at `now`: a piece whose
/// caller is gone is dropped, one whose deadline passed is answered so.
fn live_pieces(batch: Vec<Piece>, now: Instant) -> Vec<Piece> {
    let mut live = Vec::with_capacity(batch.len());
    for piece in batch {
        if piece.reply.is_closed() {
            continue;
        }
        if piece.until <= now {
            let _ = piece.reply.send(Err(EmbedError::Supervisor(
                SupervisorError::DeadlineExceeded(piece.given),
            )));
            continue;
        }
        live.push(piece);
    }
    live
}

/// The `n` rows of a batch's answer, in input order: each failed text's
/// reason, every other text's vector.
fn rows_of(result: BatchResult, n: usize) -> Vec<Row> {
    let mut rows: Vec<Option<Row>> = vec![None; n];
    for f in result.failed {
        if let Some(row) = rows.get_mut(f.index as usize) {
            *row = Some(Err(TextFailure(f.reason)));
        }
    }
    let mut vectors = result.vectors.iter();
    rows.into_iter()
        .map(|row| match row {
            Some(failed) => failed,
            None => vectors
                .next()
                .map(<[f32]>::to_vec)
                .ok_or_else(|| TextFailure("the embedder returned too few vectors".into())),
        })
        .collect()
}

/// Keeps one batch's rate (`tokens` in `took`) if it is the fastest yet.
fn measured(shared: &Shared, tokens: usize, took: Duration) {
    let rate = tokens as f64 / took.as_secs_f64().max(1e-6);
    let mut average = shared.rate.lock().unwrap_or_else(|p| p.into_inner());
    *average = Some(match *average {
        None => rate,
        Some(fastest) => fastest.max(rate),
    });
}
