//! Serving one instance of a slot: calls from the shared queue, health
//! checks between (and, for backends that can, during) calls, and planned
//! make-before-break recycling.
//!
//! # Invariants
//! - An instance runs one call at a time; a job whose caller is gone or out
//!   of time when it is taken is dropped, never started.
//! - A call runs under the backend's own deadline
//!   ([`limits::UNBOUNDED_BY_CALLER`]), never its caller's.
//! - A failed, late or persistently slow health check ends the instance as
//!   a crash; a passed one proves it.
//! - A recycle starts the replacement first and swaps it in between two
//!   calls: it fails no request and is not a failure (the old instance has
//!   no call in flight). A replacement that fails to start keeps the
//!   current instance.
//! - Every crash is reported with the incarnation that died; the call's
//!   reply is sent before the instance is given up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CallError, FailureReason, Health, Inner, Job, METRIC_RESTARTS, Started, Worker, lock};
use crate::bus::BoxFuture;
use crate::limits;
use crate::vectors::Vectors;

/// How a slot's serving loop ended.
pub(super) enum Ended {
    /// The instance crashed.
    Crashed(Crash),
    /// The instance ended normally (a child that exited 0 on its own).
    /// `true` if the call it ended on was a suspected poison text alone.
    Normal(String, bool),
    Shutdown,
}

/// How an instance crashed.
pub(super) struct Crash {
    pub(super) reason: FailureReason,
    pub(super) message: String,
    /// Whether the call was a suspected poison text alone (see
    /// [`super::Job::suspect`]).
    pub(super) suspect: bool,
    /// Whether the instance had served (a call or a health check) before.
    pub(super) proven: bool,
    /// Whether it crashed during a call (judged by the slot's crash rate,
    /// see [`super::Intensity::on_call_crash`]) rather than at a health check.
    pub(super) call: bool,
    /// Calls the slot answered since its last failure, for the crash rate.
    pub(super) answered: u64,
}

/// Counts a slot as busy while alive (so a cancelled call is counted out).
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn next_job(inner: &Inner) -> Option<Job> {
    inner.queue.lock().await.recv().await
}

/// Health answers slower than [`limits::HEALTH_SLOW_SHARE_PERCENT`] of
/// their timeout, in a row: [`limits::HEALTH_SLOW_STRIKES`] of them fail
/// the instance's health check.
#[derive(Default)]
struct SlowHealth(u32);

impl SlowHealth {
    /// Records an answer that took `took`; the failure's message once the
    /// strikes are reached.
    fn answered(&mut self, took: Duration, timeout: Duration) -> Option<String> {
        let share = timeout / 100 * limits::HEALTH_SLOW_SHARE_PERCENT;
        if took <= share {
            self.0 = 0;
            return None;
        }
        self.0 += 1;
        metrics::counter!(METRIC_HEALTH_SLOW).increment(1);
        (self.0 >= limits::HEALTH_SLOW_STRIKES).then(|| {
            format!(
                "health answered in {took:?}, more than {}% of its {timeout:?} timeout, {} times in a row (limits::HEALTH_SLOW_SHARE_PERCENT)",
                limits::HEALTH_SLOW_SHARE_PERCENT, self.0
            )
        })
    }
}

/// Metric: health answers slower than their share of the timeout.
pub const METRIC_HEALTH_SLOW: &str = "supervisor_health_slow_total";

/// One instance being served, with what its slot learned of it.
struct Serving<'a> {
    inner: &'a Arc<Inner>,
    slot: usize,
    /// The slot's latest incarnation: runs ahead of `serving` while a
    /// replacement starts.
    incarnation: &'a mut u64,
    worker: Box<dyn Worker>,
    health: tokio::time::Interval,
    replacement: Option<BoxFuture<Started>>,
    /// The incarnation serving calls.
    serving: u64,
    /// Whether this instance has served: a call or a health check.
    proven: bool,
    /// Calls answered (by any incarnation of this loop), for the crash rate.
    answered: u64,
    slow_health: SlowHealth,
}

/// Serves `worker` in slot `slot` until it crashes, ends, or `stop`.
pub(super) async fn serve(
    inner: &Arc<Inner>,
    slot: usize,
    stop: &CancellationToken,
    incarnation: &mut u64,
    worker: Box<dyn Worker>,
) -> Ended {
    let config = &inner.config;
    let mut health = tokio::time::interval_at(
        Instant::now() + config.health_interval,
        config.health_interval,
    );
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let serving = *incarnation;
    let mut s = Serving {
        inner,
        slot,
        incarnation,
        worker,
        health,
        replacement: None,
        serving,
        proven: false,
        answered: 0,
        slow_health: SlowHealth::default(),
    };
    loop {
        let replacement = &mut s.replacement;
        let pending_replacement = async {
            match replacement.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return s.stopped().await,
            started = pending_replacement => s.replaced(started).await,
            _ = s.health.tick() => {
                if let Some(ended) = s.health_check().await {
                    return ended;
                }
            }
            job = next_job(inner) => {
                let Some(job) = job else {
                    return s.stopped().await;
                };
                if let Some(ended) = s.run_job(job).await {
                    return ended;
                }
            }
        }
    }
}

impl Serving<'_> {
    /// The slot is stopping: so is the instance.
    async fn stopped(self) -> Ended {
        self.worker.stop().await;
        let (slot, incarnation) = (self.slot, self.serving);
        tracing::info!(slot, incarnation, "instance stopped");
        Ended::Shutdown
    }

    /// The instance crashed.
    fn crashed(&self, reason: FailureReason, message: String, suspect: bool, call: bool) -> Ended {
        Ended::Crashed(Crash {
            reason,
            message,
            suspect,
            proven: self.proven,
            call,
            answered: self.answered,
        })
    }

    /// A planned replacement started (or failed to).
    async fn replaced(&mut self, started: Started) {
        let (inner, slot) = (self.inner, self.slot);
        self.replacement = None;
        match started {
            Ok((fresh, _)) => {
                // Make-before-break: the old instance has no call in
                // flight (a slot runs one at a time); stop it and swap.
                let old = std::mem::replace(&mut self.worker, fresh);
                old.stop().await;
                lock(&inner.slots)[slot].pid = self.worker.pid();
                metrics::counter!(METRIC_RESTARTS, "reason" => "recycle").increment(1);
                let mut slots = lock(&inner.slots);
                *slots[slot].restarts.entry("recycle".into()).or_default() += 1;
                slots[slot].incarnation = *self.incarnation;
                slots[slot].up_since = Some(Instant::now());
                tracing::info!(
                    slot,
                    old = self.serving,
                    incarnation = *self.incarnation,
                    "instance recycled"
                );
                self.serving = *self.incarnation;
            }
            Err(error) => {
                tracing::warn!(slot, message = %error, "replacement failed to start; keeping the current instance")
            }
        }
    }

    /// A health check between calls; how the instance ended if it failed.
    async fn health_check(&mut self) -> Option<Ended> {
        let config = &self.inner.config;
        let asked = Instant::now();
        let checked = tokio::time::timeout(
            config.health_timeout,
            self.worker.health(config.health_timeout),
        )
        .await;
        let (reason, message) = match checked {
            Err(_) => (
                FailureReason::HealthTimeout,
                format!("no health report within {:?}", config.health_timeout),
            ),
            Ok(Err(CallError::Crash {
                reason: FailureReason::Deadline,
                message,
            })) => (FailureReason::HealthTimeout, message),
            Ok(Err(CallError::Crash { message, .. })) => (FailureReason::HealthFailed, message),
            Ok(Err(CallError::Refused(e))) => (FailureReason::HealthFailed, e.to_string()),
            Ok(Ok(report)) => {
                // --- sandbox, second round (issue 26): a slow answer counts.
                match self
                    .slow_health
                    .answered(asked.elapsed(), config.health_timeout)
                {
                    Some(message) => (FailureReason::HealthFailed, message),
                    None => {
                        self.passed(&report);
                        return None;
                    }
                }
            }
        };
        Some(self.crashed(reason, message, false, false))
    }

    /// A passed health check: the instance is proven, and recycled (a
    /// replacement started) when over a threshold.
    fn passed(&mut self, report: &Health) {
        let (inner, slot) = (self.inner, self.slot);
        let config = &inner.config;
        self.proven = true;
        lock(&inner.slots)[slot].memory_bytes = report.memory_bytes;
        let over = if report.memory_bytes > config.max_memory_bytes {
            Some(format!(
                "memory {} > {} bytes",
                report.memory_bytes, config.max_memory_bytes
            ))
        } else if report.processed > config.max_processed {
            Some(format!(
                "processed {} > {}",
                report.processed, config.max_processed
            ))
        } else {
            None
        };
        if let (Some(why), None) = (over, self.replacement.as_ref()) {
            tracing::info!(slot, %why, "planned recycle: starting a replacement");
            *self.incarnation += 1;
            self.replacement = Some(inner.spawner.start(slot, *self.incarnation));
        }
    }

    /// Runs one job from the queue; how the instance ended if it did.
    async fn run_job(&mut self, job: Job) -> Option<Ended> {
        let (inner, slot) = (self.inner, self.slot);
        // The caller's time is measured when the job starts, not
        // when it was queued: a job whose caller gave up is dropped.
        if job.reply.is_closed() || Instant::now() >= job.until {
            return None;
        }
        // The call runs under the backend's own call deadline, not
        // the caller's: a caller that gives up early is not a hung
        // instance, so its impatience never kills one (or counts
        // towards restart intensity). The result is then dropped.
        let busy = Busy::enter(&inner.busy);
        let texts = job.texts.len() as u64;
        let call = self
            .worker
            .embed(job.texts, job.is_query, limits::UNBOUNDED_BY_CALLER);
        let mut result = if self.worker.health_during_calls() {
            watch_call(inner, slot, &mut self.worker, &mut self.health, call).await
        } else {
            call.await
        };
        drop(busy);
        lock(&inner.slots)[slot].served += 1;
        if result.is_ok() {
            lock(&inner.slots)[slot].texts += texts;
            self.proven = true;
            self.answered += 1;
            // The pool serves again: the next escalation's cooldown
            // starts from the shortest.
            inner.escalations.store(0, Ordering::Relaxed);
        }
        let suspect = job.suspect;
        let crash = match &mut result {
            Err(CallError::Crash { reason, message }) => {
                // Name the incarnation that died, for the caller and the log.
                *message = format!("instance {slot} incarnation {}: {message}", self.serving);
                Some((reason.clone(), message.clone()))
            }
            _ => None,
        };
        let _ = job.reply.send((Some(slot), result));
        let (reason, message) = crash?;
        if matches!(reason, FailureReason::Exited(_)) && self.worker.exited_normally().await {
            return Some(Ended::Normal(message, suspect));
        }
        Some(self.crashed(reason, message, suspect, true))
    }
}

/// Runs `call` while the health checks go on; a failed or late check fails
/// the call as a crash (the instance is hung or gone), which ends the
/// instance. Thresholds are left for the next check between calls.
async fn watch_call(
    inner: &Arc<Inner>,
    slot: usize,
    worker: &mut Box<dyn Worker>,
    health: &mut tokio::time::Interval,
    mut call: BoxFuture<Result<Vectors, CallError>>,
) -> Result<Vectors, CallError> {
    let timeout = inner.config.health_timeout;
    loop {
        tokio::select! {
            biased;
            result = &mut call => return result,
            _ = health.tick() => {
                let check = tokio::time::timeout(timeout, worker.health(timeout));
                let (reason, message) = tokio::select! {
                    biased;
                    // The call may end (the child died) while the check waits.
                    result = &mut call => return result,
                    checked = check => match checked {
                        Ok(Ok(report)) => {
                            lock(&inner.slots)[slot].memory_bytes = report.memory_bytes;
                            continue;
                        }
                        Err(_) => (FailureReason::HealthTimeout, format!("no health report within {timeout:?} during a call")),
                        Ok(Err(CallError::Crash { reason: FailureReason::Deadline, message })) => (FailureReason::HealthTimeout, format!("no health report during a call: {message}")),
                        Ok(Err(CallError::Crash { message, .. })) => (FailureReason::HealthFailed, message),
                        Ok(Err(CallError::Refused(e))) => (FailureReason::HealthFailed, e.to_string()),
                    },
                };
                return Err(CallError::Crash { reason, message });
            }
        }
    }
}
