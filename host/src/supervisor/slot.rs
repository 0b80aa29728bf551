//! One slot of the pool: its task starts an instance, serves it (see
//! [`super::instance`]), and on failure restarts it after the delay its
//! restart intensity decides, or escalates.
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

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::generation::{escalate, leave_pool};
use super::instance::serve;
use super::{
    Decision, FailureReason, Inner, Intensity, IntensityConfig, METRIC_RESTARTS, RestartType,
    SupervisorConfig, Worker, lock,
};
use crate::limits;

/// Whether a failed slot restarts, or why not.
pub(super) enum Restart {
    Yes,
    No(String),
}

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
    /// see [`Intensity::on_call_crash`]) rather than at a health check.
    pub(super) call: bool,
    /// Calls the slot answered since its last failure, for the crash rate.
    pub(super) answered: u64,
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
    /// A start that failed with `message`.
    pub(super) fn init(message: String) -> Self {
        Failure {
            reason: FailureReason::InitFailed,
            message,
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
pub(super) type FirstInstance = (Box<dyn Worker>, u64, Intensity);

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
                    Err(format!(
                        "the new instance reports model {info:?}, but the pool serves {known:?}"
                    ))
                }
                _ => Ok(worker),
            },
            Err(message) => Err(message),
        };
        match checked {
            Ok(worker) => Next::Serve(worker),
            Err(message) => match self.on_failure(Failure::init(message)).await {
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
pub(super) async fn run_slot(
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
