//! The request policy of [`Supervisor::embed`]: a batch is cut across the
//! free instances, each part is run one call at a time, a crashed batch is
//! retried text by text, a poison text is isolated, and every answer is
//! checked.
//!
//! # Invariants
//! - No text is lost: every index of a part ends with a row or in `failed`
//!   (or the whole part fails with the supervisor's own error).
//! - A text is poison only with evidence: `poison_after` crashes, the last
//!   one alone, after which the pool answered [`CONTROL_TEXT`], and one
//!   more crash alone. A poison text is remembered ([`PoisonMemory`]) and
//!   never sent again; the batch crash it caused is refunded to the slot
//!   that ran it, once per batch crash.
//! - An answer with a missing row or the wrong dimension fails the part; a
//!   non-finite value fails its text alone.
//! - Splitting never changes an answer: parts are isolated on their own and
//!   gathered in input order, with their indices shifted back.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{
    BatchResult, CallError, FailedInput, FailureReason, Inner, Job, Reply, Supervisor,
    SupervisorError, lock,
};
use crate::bus::{ErrorCode, RemoteError};
use crate::limits;
use crate::vectors::Vectors;

/// The text a poison verdict is checked against: a suspect that crashed
/// an instance alone `poison_after` times is poison only if the pool then
/// answers this one. Short and plain, so that any working embedder
/// answers it.
pub const CONTROL_TEXT: &str = "control";

/// Texts known to crash instances, by a keyed hash of their content, so
/// that the same text never crashes an instance twice, in any batch.
/// Bounded by [`limits::MAX_REMEMBERED_POISON`] (oldest forgotten first).
pub(super) struct PoisonMemory {
    keys: std::hash::RandomState,
    reasons: std::collections::HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl PoisonMemory {
    pub(super) fn new() -> Self {
        PoisonMemory {
            keys: std::hash::RandomState::new(),
            reasons: std::collections::HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn key(&self, text: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.keys, text)
    }

    fn get(&self, text: &str) -> Option<&String> {
        self.reasons.get(&self.key(text))
    }

    fn remember(&mut self, text: &str, reason: String) {
        let key = self.key(text);
        if self.reasons.insert(key, reason).is_none() {
            self.order.push_back(key);
            while self.order.len() > limits::MAX_REMEMBERED_POISON {
                if let Some(old) = self.order.pop_front() {
                    self.reasons.remove(&old);
                }
            }
        }
    }
}

/// One part of a batch being embedded: which texts are answered, failed or
/// waiting, and the crash evidence against each.
struct Part {
    texts: Vec<String>,
    is_query: bool,
    /// When the caller stops waiting.
    until: Instant,
    /// The caller's deadline, for its error.
    deadline: Duration,
    dimension: usize,
    rows: Vec<Option<Vec<f32>>>,
    crashes: Vec<u32>,
    /// Suspects after whose crashes the pool answered the control text.
    controlled: Vec<bool>,
    failed: Vec<FailedInput>,
    work: VecDeque<Vec<usize>>,
    /// For each text, the batch crash it was in (a number) and the slot
    /// that crashed: when the text turns out to be poison, that crash was
    /// the input's doing, and the slot's restart intensity is refunded
    /// (once per batch).
    batch_crash: Vec<Option<(usize, usize)>>,
    batch_crashes: usize,
    refunded: HashSet<usize>,
}

impl Part {
    /// A part of `texts`; those known to be poison are failed at once, the
    /// rest wait as one batch.
    fn new(
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
        dimension: usize,
        poison: &PoisonMemory,
    ) -> Self {
        let n = texts.len();
        let mut failed = Vec::new();
        let mut fresh = Vec::with_capacity(n);
        for (i, text) in texts.iter().enumerate() {
            match poison.get(text) {
                Some(reason) => failed.push(FailedInput {
                    index: i as u32,
                    reason: format!("a known poison input: {reason}"),
                }),
                None => fresh.push(i),
            }
        }
        let mut work = VecDeque::new();
        if !fresh.is_empty() {
            work.push_back(fresh);
        }
        Part {
            texts,
            is_query,
            until: Instant::now() + deadline,
            deadline,
            dimension,
            rows: vec![None; n],
            crashes: vec![0; n],
            controlled: vec![false; n],
            failed,
            work,
            batch_crash: vec![None; n],
            batch_crashes: 0,
            refunded: HashSet::new(),
        }
    }

    /// The time left, or the caller's deadline error.
    fn remaining(&self) -> Result<Duration, SupervisorError> {
        let remaining = self.until.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(SupervisorError::DeadlineExceeded(self.deadline));
        }
        Ok(remaining)
    }

    /// Records the rows of `batch`, checked.
    fn answered(&mut self, batch: &[usize], vectors: &Vectors) -> Result<(), SupervisorError> {
        // One place checks every backend's answer: a missing
        // row would shift every later text's vector by one.
        if let Err(reason) = check_rows(vectors, batch.len(), self.dimension) {
            return Err(SupervisorError::Refused(RemoteError::new(
                ErrorCode::Failed,
                reason.to_string(),
            )));
        }
        for (k, &i) in batch.iter().enumerate() {
            let row = vectors.get(k).map(<[f32]>::to_vec);
            match row.as_deref().and_then(non_finite) {
                // A NaN or an infinity is that text's failure.
                Some(bad) => self.failed.push(FailedInput {
                    index: i as u32,
                    reason: format!("the embedder returned {bad} in its vector"),
                }),
                None => self.rows[i] = row,
            }
        }
        Ok(())
    }

    /// Counts a crash of `batch` (run on slot `ran_on`). A batch of several
    /// texts is requeued text by text (`None`); a text alone is returned
    /// for the poison policy.
    fn crashed(&mut self, batch: Vec<usize>, ran_on: Option<usize>) -> Option<usize> {
        for &i in &batch {
            self.crashes[i] += 1;
        }
        if batch.len() == 1 {
            return Some(batch[0]);
        }
        self.batch_crashes += 1;
        if let Some(slot) = ran_on {
            for &i in &batch {
                self.batch_crash[i] = Some((self.batch_crashes, slot));
            }
        }
        // Which text crashed is unknown: retry each alone, so a
        // poison text costs one more crash, not one per
        // bisection level (which would exceed the restart
        // intensity for any large batch).
        for &i in batch.iter().rev() {
            self.work.push_front(vec![i]);
        }
        None
    }

    /// Text `i` is poison: remembered, refunded to the slot whose batch it
    /// crashed, and failed.
    fn convict(&mut self, i: usize, inner: &Inner, reason: &FailureReason, message: &str) {
        tracing::warn!(index = i, crashes = self.crashes[i], %reason, "poison input isolated");
        let why = format!(
            "crashed {} instances, the last alone after the pool answered a control text ({reason}): {message}",
            self.crashes[i]
        );
        lock(&inner.poison).remember(&self.texts[i], why.clone());
        if let Some((crash, slot)) = self.batch_crash[i]
            && self.refunded.insert(crash)
        {
            lock(&inner.slots)[slot].refunds += 1;
        }
        self.failed.push(FailedInput {
            index: i as u32,
            reason: why,
        });
    }

    /// The plugin refused input `k` of `batch`: it fails alone, the rest
    /// go on.
    fn refused_input(
        &mut self,
        batch: Vec<usize>,
        k: u32,
        message: String,
    ) -> Result<(), SupervisorError> {
        let Some(&i) = batch.get(k as usize) else {
            return Err(SupervisorError::Refused(RemoteError::new(
                ErrorCode::Failed,
                format!("the plugin named input {k} of a batch of {}", batch.len()),
            )));
        };
        self.failed.push(FailedInput {
            index: i as u32,
            reason: message,
        });
        let rest: Vec<usize> = batch.into_iter().filter(|&j| j != i).collect();
        if !rest.is_empty() {
            self.work.push_front(rest);
        }
        Ok(())
    }

    /// Too large to send or to answer in one frame: halves go separately,
    /// and a text too large alone fails alone.
    fn too_large(&mut self, batch: Vec<usize>, message: String) {
        if batch.len() > 1 {
            let mut first = batch;
            let second = first.split_off(first.len() / 2);
            self.work.push_front(second);
            self.work.push_front(first);
        } else {
            self.failed.push(FailedInput {
                index: batch[0] as u32,
                reason: message,
            });
        }
    }

    /// The part's answer: its rows in input order and its failed texts.
    fn finish(mut self) -> Result<BatchResult, SupervisorError> {
        self.failed.sort_by_key(|f| f.index);
        let data: Vec<f32> = self.rows.into_iter().flatten().flatten().collect();
        batch_result(self.dimension, data, self.failed)
    }
}

impl Supervisor {
    /// Embeds `texts` within `deadline`, surviving crashes: see the module
    /// docs for how a crashed batch is split and a poison text isolated.
    ///
    /// # Errors
    /// [`SupervisorError::Escalated`], [`SupervisorError::DeadlineExceeded`],
    /// or [`SupervisorError::Refused`] for an error other than one input.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> Result<BatchResult, SupervisorError> {
        // One call occupies one instance: a batch large enough to share is
        // cut into contiguous parts, one per free instance (not busy with a
        // call, nor claimed by a queued job; one still starting counts as
        // free, it takes its part when up), run at once and gathered in
        // order. With every instance busy the batch stays whole: the
        // instance that frees first takes all of it, which is more texts
        // per call. Each part is isolated on its own (a poison text fails
        // only itself), so splitting never changes an answer.
        let parts = split_parts(texts.len(), self.free_instances().max(1));
        if parts <= 1 {
            return self.embed_part(texts, is_query, deadline).await;
        }
        let per_part = texts.len().div_ceil(parts);
        let mut offsets = Vec::with_capacity(parts);
        let mut calls = Vec::with_capacity(parts);
        let mut rest = texts;
        let mut offset = 0;
        while !rest.is_empty() {
            let tail = rest.split_off(per_part.min(rest.len()));
            offsets.push(offset);
            offset += rest.len();
            calls.push(self.embed_part(std::mem::replace(&mut rest, tail), is_query, deadline));
        }
        let results = futures::future::try_join_all(calls).await?;
        let dimension = self.model_info().dimension as usize;
        let mut data = Vec::new();
        let mut failed = Vec::new();
        for (result, offset) in results.into_iter().zip(offsets) {
            data.extend_from_slice(result.vectors.as_flat());
            failed.extend(result.failed.into_iter().map(|f| FailedInput {
                index: f.index + offset as u32,
                ..f
            }));
        }
        batch_result(dimension, data, failed)
    }

    /// [`Supervisor::embed`] of one part, on one instance at a time.
    async fn embed_part(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> Result<BatchResult, SupervisorError> {
        let dimension = self.model_info().dimension as usize;
        // Texts known to crash instances are answered at once.
        let mut part = Part::new(
            texts,
            is_query,
            deadline,
            dimension,
            &lock(&self.inner.poison),
        );
        while let Some(batch) = part.work.pop_front() {
            let remaining = part.remaining()?;
            let batch_texts = batch.iter().map(|&i| part.texts[i].clone()).collect();
            let suspect = batch.len() == 1 && part.crashes[batch[0]] > 0;
            let (ran_on, result) = self
                .dispatch(batch_texts, is_query, remaining, suspect)
                .await?;
            match result {
                Ok(vectors) => part.answered(&batch, &vectors)?,
                Err(CallError::Crash { reason, message }) => {
                    if let Some(i) = part.crashed(batch, ran_on) {
                        self.crashed_alone(&mut part, i, reason, &message).await?;
                    }
                }
                Err(CallError::Refused(RemoteError {
                    code: ErrorCode::InvalidInput,
                    index: Some(k),
                    message,
                    ..
                })) => part.refused_input(batch, k, message)?,
                Err(CallError::Refused(remote)) if remote.code == ErrorCode::FrameTooLarge => {
                    part.too_large(batch, remote.message);
                }
                Err(CallError::Refused(remote)) => return Err(SupervisorError::Refused(remote)),
            }
        }
        part.finish()
    }

    /// Text `i` crashed an instance alone: after `poison_after` crashes the
    /// pool must answer a control text, and one more crash alone convicts
    /// it; until then it is retried.
    async fn crashed_alone(
        &self,
        part: &mut Part,
        i: usize,
        reason: FailureReason,
        message: &str,
    ) -> Result<(), SupervisorError> {
        if part.crashes[i] >= self.inner.config.poison_after && !part.controlled[i] {
            if self
                .control_answers(part.is_query, part.until, part.deadline)
                .await?
            {
                // The pool answers a harmless text: one more
                // crash of the suspect alone convicts it.
                part.controlled[i] = true;
            } else {
                // A storm, not a poison text: the pool fails a
                // harmless text too. The suspect starts over;
                // the pool's intensity deals with the storm (a
                // restart, or an escalation whose cooldown the
                // caller is told of).
                tracing::warn!(index = i, %reason, "a suspect crashed, and so did the control text: not poison");
                part.crashes[i] = 0;
            }
            part.work.push_front(vec![i]);
        } else if part.controlled[i] {
            part.convict(i, &self.inner, &reason, message);
        } else {
            part.work.push_front(vec![i]);
        }
        Ok(())
    }

    /// Whether the pool answers [`CONTROL_TEXT`] without crashing (the
    /// evidence a poison verdict needs: the pool answers other texts around
    /// the suspect).
    ///
    /// # Errors
    /// The pool's own failure (escalated, out of time).
    async fn control_answers(
        &self,
        is_query: bool,
        until: Instant,
        deadline: Duration,
    ) -> Result<bool, SupervisorError> {
        let remaining = until.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(SupervisorError::DeadlineExceeded(deadline));
        }
        let (_, result) = self
            .dispatch(vec![CONTROL_TEXT.to_string()], is_query, remaining, false)
            .await?;
        // Answered with vectors or a refusal (a plugin may refuse so short
        // a text): the pool works. Only a crash on it too is a storm.
        Ok(!matches!(result, Err(CallError::Crash { .. })))
    }

    /// One attempt on some idle instance. The outer `Result` is the
    /// supervisor's own failure; the inner one the call's.
    async fn dispatch(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
        suspect: bool,
    ) -> Result<Reply, SupervisorError> {
        if let Some(down) = self.unavailable() {
            return Err(down);
        }
        let (reply, answer) = oneshot::channel();
        let until = Instant::now() + deadline;
        let job = Job {
            texts,
            is_query,
            until,
            suspect,
            reply,
        };
        let exhausted = || SupervisorError::DeadlineExceeded(deadline);
        let stopped = || {
            self.unavailable()
                .unwrap_or_else(|| SupervisorError::Escalated("the pool stopped".into()))
        };
        match tokio::time::timeout_at(until, self.inner.jobs.send(job)).await {
            Err(_) => return Err(exhausted()),
            Ok(Err(_)) => return Err(stopped()),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(until, answer).await {
            Err(_) => Err(exhausted()),
            Ok(Err(_)) => Err(stopped()),
            // A job failed by escalation: report the cooldown itself.
            Ok(Ok((_, Err(CallError::Refused(_))))) if self.unavailable().is_some() => {
                Err(stopped())
            }
            Ok(Ok(reply)) => Ok(reply),
        }
    }
}

/// The rows `data` (of `dimension` each) and the `failed` texts as a
/// [`BatchResult`].
fn batch_result(
    dimension: usize,
    data: Vec<f32>,
    failed: Vec<FailedInput>,
) -> Result<BatchResult, SupervisorError> {
    let vectors = if data.is_empty() {
        Vectors::default()
    } else {
        Vectors::new(dimension, data).map_err(|e| {
            SupervisorError::Refused(RemoteError::new(ErrorCode::Failed, e.to_string()))
        })?
    };
    Ok(BatchResult { vectors, failed })
}

/// How many parts a batch of `texts` is cut into on a pool of `pool`
/// instances: one per instance, but none smaller than
/// [`limits::MIN_SPLIT_TEXTS`].
pub fn split_parts(texts: usize, pool: usize) -> usize {
    (texts / limits::MIN_SPLIT_TEXTS).clamp(1, pool)
}

/// Why an answer's vectors do not fit its batch.
#[derive(Debug, thiserror::Error)]
enum RowsError {
    /// Not one row per text.
    #[error("the embedder returned {rows} vectors for {texts} texts")]
    Count { rows: usize, texts: usize },
    /// Rows of another dimension than the model's.
    #[error("the embedder returned vectors of dimension {got}, but its model declared {dimension}")]
    Dimension { got: usize, dimension: usize },
}

/// `Err` with the reason unless `vectors` has one row of `dimension` per
/// text.
fn check_rows(vectors: &Vectors, texts: usize, dimension: usize) -> Result<(), RowsError> {
    if vectors.len() != texts {
        return Err(RowsError::Count {
            rows: vectors.len(),
            texts,
        });
    }
    if texts > 0 && vectors.dimension() != dimension {
        return Err(RowsError::Dimension {
            got: vectors.dimension(),
            dimension,
        });
    }
    Ok(())
}

/// The first value of `row` that is not finite.
fn non_finite(row: &[f32]) -> Option<f32> {
    row.iter().copied().find(|x| !x.is_finite())
}
