//! Generations of slots: the pool starts one, escalation ends it and (after
//! a cooldown) starts the next, and shutdown ends the last.
//!
//! # Invariants
//! - One escalation per generation: the first slot to escalate sets the
//!   cooldown; later ones in the same generation return at once.
//! - The cooldown doubles with each escalation in a row, capped at
//!   [`limits::ESCALATION_COOLDOWN_MAX`], and the pool always comes back
//!   after it (unless it is shutting down, or has no slot left to restart).
//! - The old generation's slots are stopped (each within
//!   [`limits::SHUTDOWN_SLOT_TIMEOUT`]) before the next one starts.
//! - A queued job never waits for a pool that is down: escalation and
//!   shutdown refuse every queued job at once.
//! - A slot task that panics counts as down and escalates the pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::slot::{FirstInstance, run_slot};
use super::{CallError, Cooldown, Inner, METRIC_ESCALATIONS, Supervisor, lock};
use crate::bus::{ErrorCode, RemoteError};
use crate::limits;

impl Supervisor {
    /// Stops the pool: each slot's instance is stopped in reverse start
    /// order (a native child gets `shutdown` and exits 0), each within
    /// [`limits::SHUTDOWN_SLOT_TIMEOUT`]. Later calls fail at once. A
    /// program's normal exit waits for this, so no child is killed.
    pub async fn shutdown(&self) {
        let slots = std::mem::take(&mut lock(&self.inner.generation).slots);
        for (token, task) in slots.into_iter().rev() {
            token.cancel();
            if let Some(task) = task
                && tokio::time::timeout(limits::SHUTDOWN_SLOT_TIMEOUT, task)
                    .await
                    .is_err()
            {
                tracing::warn!(
                    "a slot did not stop within {:?}",
                    limits::SHUTDOWN_SLOT_TIMEOUT
                );
            }
        }
        self.inner.shutdown.cancel();
        // No slot is left to take them: queued calls fail now, not at
        // their own deadlines, and later sends fail at once.
        fail_queued(&self.inner, "the pool was shut down", true).await;
    }
}

/// Starts a generation of slots: slot 0 with `first` if given, the others
/// fresh, each under a child token of `stop`.
pub(super) fn start_generation(
    inner: &Arc<Inner>,
    first: Option<FirstInstance>,
    stop: CancellationToken,
) {
    let pool = inner.config.pool_size.max(1);
    let mut first = first;
    let mut generation = lock(&inner.generation);
    generation.slots.clear();
    for slot in 0..pool {
        let token = stop.child_token();
        let run = run_slot(
            inner.clone(),
            slot,
            if slot == 0 { first.take() } else { None },
            token.clone(),
        );
        let watched = inner.clone();
        let task = tokio::spawn(async move {
            // A panic (a bug in the host) ends the slot's task: the slot no
            // longer counts as up, and the pool escalates and recovers,
            // rather than leave callers queued for a slot that is gone. The
            // call in flight was answered when its reply was dropped.
            if futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run))
                .await
                .is_err()
            {
                lock(&watched.slots)[slot].up_since = None;
                escalate(
                    &watched,
                    format!("the task of instance {slot} panicked"),
                    true,
                )
                .await;
            }
        });
        generation.slots.push((token, Some(task)));
    }
}

/// A temporary slot that ended leaves the pool; when none is left, queued
/// and later calls fail at once instead of waiting for their deadlines.
pub(super) async fn leave_pool(inner: &Arc<Inner>, slot: usize) {
    let left = {
        let mut slots = lock(&inner.slots);
        slots[slot].gone = true;
        slots.iter().filter(|s| !s.gone).count()
    };
    if left == 0 {
        escalate(
            inner,
            "every instance of the pool has ended and none is restarted (restart = transient or temporary)".into(),
            false,
        )
        .await;
    }
}

/// The pool goes down: every slot of this generation stops, queued jobs get
/// [`SupervisorError::Unavailable`], and (when `recover`) the whole pool is
/// started again after a cooldown that doubles with each escalation in a
/// row (OTP's escalation to a parent, which restarts the subtree).
pub(super) async fn escalate(inner: &Arc<Inner>, why: String, recover: bool) {
    let cooldown = {
        let mut down = lock(&inner.cooldown);
        if down.is_some() {
            // Another slot escalated this generation already: one
            // escalation, one step of the cooldown.
            return;
        }
        let n = inner.escalations.fetch_add(1, Ordering::Relaxed);
        let cooldown = limits::ESCALATION_COOLDOWN_MIN
            .saturating_mul(1u32 << n.min(16))
            .min(limits::ESCALATION_COOLDOWN_MAX);
        *down = Some(Cooldown {
            reason: why,
            until: Instant::now() + cooldown,
            recovering: recover,
        });
        cooldown
    };
    metrics::counter!(METRIC_ESCALATIONS).increment(1);
    let slots = std::mem::take(&mut lock(&inner.generation).slots);
    for (token, _) in &slots {
        token.cancel();
    }
    // Fail what waits in the queue; later submissions fail at once (the
    // cooldown is set).
    fail_queued(inner, "the pool escalated", false).await;
    if !recover || inner.shutdown.is_cancelled() {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        // The old generation's instances are stopped before the new one
        // starts (a native child gets its grace period).
        for (_, task) in slots {
            if let Some(task) = task {
                let _ = tokio::time::timeout(limits::SHUTDOWN_SLOT_TIMEOUT, task).await;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(cooldown) => {}
            () = inner.shutdown.cancelled() => return,
        }
        tracing::info!(?cooldown, "cooldown over: restarting the pool");
        *lock(&inner.cooldown) = None;
        let stop = inner.shutdown.child_token();
        start_generation(&inner, None, stop);
    });
}

/// Refuses every job waiting in the queue (`why`, as unavailable), so
/// their callers learn at once rather than at their deadlines; with
/// `close`, later sends fail at once too. The lock is bounded: a slot that
/// did not stop in time might still hold it.
async fn fail_queued(inner: &Inner, why: &str, close: bool) {
    let queue = tokio::time::timeout(limits::SHUTDOWN_SLOT_TIMEOUT, inner.queue.lock());
    let Ok(mut queue) = queue.await else {
        tracing::warn!("the job queue stayed locked; its jobs end at their deadlines");
        return;
    };
    if close {
        queue.close();
    }
    while let Ok(job) = queue.try_recv() {
        let refusal = RemoteError::new(ErrorCode::Unavailable, why);
        let _ = job.reply.send((None, Err(CallError::Refused(refusal))));
    }
}
