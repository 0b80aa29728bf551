//! One slot of the pool, and the generations of slots: a slot's task
//! starts an instance, serves it (see [`super::instance`]), and on failure
//! restarts it after the delay its restart intensity decides, or
//! escalates; an escalation ends the generation and (after a cooldown)
//! starts the next.
//!
//! # Invariants
//! - A crashed worker is dropped, never called again; the slot starts a new
//!   incarnation (counted even when its start fails).
//! - Every failure is counted (metric and status) and charged to exactly
//!   one budget: a suspected poison text's crash to the poison budget, any
//!   other to the slot's intensity. Refunds for crashes a poison text
//!   explained are taken back before the next charge.
//! - A new instance reporting another model than the pool's is a start
//!   failure: one pool never mixes two vector spaces.
//! - A start in progress is finished, then stopped, when the slot is
//!   cancelled: a native child is never killed half-way through its
//!   handshake.
//! - OTP restart types: a permanent slot restarts after any end, a
//!   transient one only after a crash, a temporary one never (it leaves
//!   the pool).
//! - One escalation per generation: the first slot to escalate sets the
//!   cooldown; later ones in the same generation return at once. The
//!   cooldown doubles with each escalation in a row, capped at
//!   [`limits::ESCALATION_COOLDOWN_MAX`], and the pool comes back after it
//!   (unless it is shutting down, or has no slot left to restart).
//! - The old generation's slots are stopped (each within
//!   [`limits::SHUTDOWN_SLOT_TIMEOUT`]) before the next one starts.
//! - A queued job never waits for a pool that is down: escalation and
//!   shutdown refuse every queued job at once.
//! - A slot task that panics counts as down and escalates the pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::instance::{Crash, Ended, serve};
use super::{
    CallError, Cooldown, Decision, FailureReason, Inner, Intensity, IntensityConfig,
    METRIC_ESCALATIONS, METRIC_RESTARTS, RestartType, SpawnError, SupervisorConfig, Worker, lock,
};
use crate::bus::{ErrorCode, RemoteError};
use crate::limits;

/// Whether a failed slot restarts, or why not.
pub(super) enum Restart {
    Yes,
    No(String),
}

/// One failure of a slot's instance, to record and charge.
pub(super) struct Failure {
    pub(super) reason: FailureReason,
    pub(super) message: String,
    /// How long the instance was up.
    pub(super) uptime: Duration,
    /// Judged by the crash rate of calls rather than as a restart.
    pub(super) call: bool,
    /// Charged to the poison budget rather than the slot's intensity.
    pub(super) suspect: bool,
}

impl Failure {
    /// A start that failed with `error` (its text is the log's and the
    /// escalation's message).
    pub(super) fn init(error: &SpawnError) -> Self {
        Failure {
            reason: FailureReason::InitFailed,
            message: error.to_string(),
            uptime: Duration::ZERO,
            call: false,
            suspect: false,
        }
    }
}

/// The jitter seed of `slot`'s restart intensity.
fn slot_intensity(config: &SupervisorConfig, slot: usize) -> Intensity {
    match config.jitter_seed {
        Some(seed) => Intensity::with_seed(config.intensity, seed.wrapping_add(slot as u64)),
        None => Intensity::new(config.intensity),
    }
}

/// The instance `start` brought up, with its incarnation and the intensity
/// its start-up failures already used.
type FirstInstance = (Box<dyn Worker>, u64, Intensity);

/// What a slot does after trying to start an instance.
enum Next {
    /// Serve this instance.
    Serve(Box<dyn Worker>),
    /// The start failed; try again (the backoff was waited out).
    Retry,
    /// The slot ends (stopped, or the pool escalated).
    End,
}

/// A slot's task: its context and its two restart budgets.
pub(super) struct Slot {
    pub(super) inner: Arc<Inner>,
    pub(super) slot: usize,
    pub(super) stop: CancellationToken,
    pub(super) incarnation: u64,
    pub(super) intensity: Intensity,
    /// Crashes of suspected poison texts have a budget of their own: a bad
    /// input is not a bad instance, but a plugin that crashes on every text
    /// must still escalate.
    poison_budget: Intensity,
}

impl Slot {
    /// Slot `slot` at `incarnation`, with the restart `intensity` it has
    /// used (a fresh one when `None`).
    pub(super) fn new(
        inner: Arc<Inner>,
        slot: usize,
        stop: CancellationToken,
        incarnation: u64,
        intensity: Option<Intensity>,
    ) -> Self {
        let intensity = intensity.unwrap_or_else(|| slot_intensity(&inner.config, slot));
        let poison_budget = Intensity::new(IntensityConfig {
            max_restarts: limits::DEFAULT_MAX_POISON_RESTARTS,
            max_unproven: limits::DEFAULT_MAX_POISON_RESTARTS,
            ..inner.config.intensity
        });
        Slot {
            inner,
            slot,
            stop,
            incarnation,
            intensity,
            poison_budget,
        }
    }

    /// Serves instance after instance until the slot is stopped, the pool
    /// escalates, or (restart types) the slot leaves the pool.
    async fn run(mut self, mut first: Option<Box<dyn Worker>>) {
        loop {
            if self.stop.is_cancelled() {
                if let Some(worker) = first.take() {
                    worker.stop().await;
                }
                return;
            }
            let worker = match first.take() {
                Some(worker) => worker,
                None => match self.start_instance().await {
                    Next::Serve(worker) => worker,
                    Next::Retry => continue,
                    Next::End => return,
                },
            };
            let (inner, slot, incarnation) = (&self.inner, self.slot, self.incarnation);
            let started = Instant::now();
            {
                let mut slots = lock(&inner.slots);
                slots[slot].incarnation = incarnation;
                slots[slot].pid = worker.pid();
                slots[slot].up_since = Some(started);
            }
            tracing::info!(slot, incarnation, "instance started");
            let ended = serve(&self.inner, slot, &self.stop, &mut self.incarnation, worker).await;
            lock(&self.inner.slots)[slot].up_since = None;
            let goes_on = match ended {
                Ended::Shutdown => false,
                Ended::Normal(message, suspect) => {
                    self.ended_normally(message, suspect, started.elapsed())
                        .await
                }
                Ended::Crashed(crash) => self.crashed(crash, started.elapsed()).await,
            };
            if !goes_on {
                return;
            }
        }
    }

    /// Starts the next incarnation, checked against the pool's model.
    async fn start_instance(&mut self) -> Next {
        let inner = &self.inner;
        self.incarnation += 1;
        // Recorded even if the start fails, so that a pool restarted
        // after an escalation goes on counting from here.
        lock(&inner.slots)[self.slot].incarnation = self.incarnation;
        // A start in progress is finished, not abandoned: dropping
        // it would kill a native child half-way through its
        // handshake. It is bounded by the init deadline.
        let started = inner.spawner.start(self.slot, self.incarnation).await;
        if self.stop.is_cancelled() {
            if let Ok((worker, _)) = started {
                worker.stop().await;
            }
            return Next::End;
        }
        let first_info = lock(&inner.info).clone();
        let checked = match started {
            Ok((worker, info)) => match first_info {
                // Another model behind the same pool would mix
                // vectors of two spaces in one index.
                Some(known) if known != info => {
                    worker.stop().await;
                    Err(SpawnError::OtherModel {
                        reported: Box::new(info),
                        serving: Box::new(known),
                    })
                }
                _ => Ok(worker),
            },
            Err(error) => Err(error),
        };
        match checked {
            Ok(worker) => Next::Serve(worker),
            Err(error) => match self.on_failure(Failure::init(&error)).await {
                Restart::Yes => Next::Retry,
                Restart::No(_) => Next::End,
            },
        }
    }

    /// The instance ended normally: whether the slot goes on.
    async fn ended_normally(&mut self, message: String, suspect: bool, uptime: Duration) -> bool {
        // OTP: a permanent child is restarted after any exit; a
        // transient or temporary one only after an abnormal exit.
        if self.inner.config.restart != RestartType::Permanent {
            let (slot, incarnation) = (self.slot, self.incarnation);
            tracing::info!(slot, incarnation, %message, "instance ended normally; not restarted");
            leave_pool(&self.inner, self.slot).await;
            return false;
        }
        // An exit on a suspect's call is charged as its crash would be.
        let failure = Failure {
            reason: FailureReason::Exited(message.clone()),
            message,
            uptime,
            call: false,
            suspect,
        };
        matches!(self.on_failure(failure).await, Restart::Yes)
    }

    /// The instance crashed: whether the slot goes on.
    async fn crashed(&mut self, crash: Crash, uptime: Duration) -> bool {
        let Crash {
            reason,
            message,
            suspect,
            proven,
            call,
            answered,
        } = crash;
        if proven {
            self.intensity.on_success();
            self.poison_budget.on_success();
        }
        // The calls it answered count in the crash rate (at most a
        // window's worth matter).
        for _ in 0..answered.min(u64::from(self.inner.config.intensity.rate_window)) {
            self.intensity.on_answer();
        }
        let restart = match self.inner.config.restart {
            RestartType::Temporary => false,
            // A crash is an abnormal exit: transient slots restart
            // after it as permanent ones do.
            RestartType::Permanent | RestartType::Transient => true,
        };
        if !restart {
            let (slot, incarnation) = (self.slot, self.incarnation);
            tracing::warn!(slot, incarnation, %reason, "temporary instance crashed; not restarted");
            leave_pool(&self.inner, self.slot).await;
            return false;
        }
        let refunds = std::mem::take(&mut lock(&self.inner.slots)[self.slot].refunds);
        for _ in 0..refunds {
            self.intensity.forgive();
        }
        let failure = Failure {
            reason,
            message,
            uptime,
            call: call && !suspect,
            suspect,
        };
        matches!(self.on_failure(failure).await, Restart::Yes)
    }

    /// Records a failure, and waits out the backoff. Returns whether the
    /// slot restarts; when it does not, the pool has escalated (or is
    /// stopping).
    pub(super) async fn on_failure(&mut self, failure: Failure) -> Restart {
        let Failure {
            reason,
            message,
            uptime,
            call,
            suspect,
        } = failure;
        let (inner, slot) = (&self.inner, self.slot);
        let intensity = if suspect {
            &mut self.poison_budget
        } else {
            &mut self.intensity
        };
        metrics::counter!(METRIC_RESTARTS, "reason" => reason.label()).increment(1);
        *lock(&inner.slots)[slot]
            .restarts
            .entry(reason.label().to_string())
            .or_default() += 1;
        let decision = if call {
            intensity.on_call_crash(Instant::now(), uptime)
        } else {
            intensity.on_failure(Instant::now(), uptime)
        };
        match decision {
            Decision::Restart { delay } => {
                tracing::warn!(slot, %reason, %message, ?delay, "instance failed; restarting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => Restart::Yes,
                    () = self.stop.cancelled() => Restart::No("the pool is stopping".into()),
                }
            }
            decision @ (Decision::Escalate { .. } | Decision::Unproven { .. }) => {
                let why = match decision {
                    Decision::Escalate { restarts, window } => format!(
                        "instance {slot} failed {restarts} times within {window:?} (last: {reason}: {message})"
                    ),
                    _ => format!(
                        "instance {slot} failed {} times in a row without serving (last: {reason}: {message})",
                        intensity.unproven()
                    ),
                };
                tracing::error!(slot, %why, "restart intensity exceeded; escalating");
                escalate(inner, why.clone(), true).await;
                Restart::No(why)
            }
        }
    }
}

/// The task of slot `slot`: starting with `first` if given (the instance
/// [`super::Supervisor::start`] brought up), until `stop`.
async fn run_slot(
    inner: Arc<Inner>,
    slot: usize,
    first: Option<FirstInstance>,
    stop: CancellationToken,
) {
    let (first, incarnation, intensity) = match first {
        Some((worker, incarnation, intensity)) => (Some(worker), incarnation, Some(intensity)),
        None => (None, lock(&inner.slots)[slot].incarnation, None),
    };
    Slot::new(inner, slot, stop, incarnation, intensity)
        .run(first)
        .await;
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
async fn leave_pool(inner: &Arc<Inner>, slot: usize) {
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
/// [`super::SupervisorError::Unavailable`], and (when `recover`) the whole pool is
/// started again after a cooldown that doubles with each escalation in a
/// row (OTP's escalation to a parent, which restarts the subtree).
async fn escalate(inner: &Arc<Inner>, why: String, recover: bool) {
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
pub(super) async fn fail_queued(inner: &Inner, why: &str, close: bool) {
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
