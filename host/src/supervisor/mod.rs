//! The supervisor: a pool of embedder instances, each restarted on failure
//! with OTP's semantics (restart types, restart intensity) plus backoff,
//! health checks, planned make-before-break recycling, poison-input
//! isolation, and escalation that recovers.
//!
//! It is generic over what it supervises ([`Spawner`] starts a [`Worker`],
//! both from [`crate::backend`]): a WASM instance (a `Store` on its own
//! thread) or a native child process. Tests supervise scripted workers on
//! tokio's paused clock.
//!
//! # Invariants
//! - A slot runs one call at a time, pulled from one shared queue: a request
//!   goes to an idle instance, and a crash fails only the call running on the
//!   crashed instance.
//! - A call runs under the backend's own call deadline, never its caller's:
//!   a caller that gives up is not the instance's failure. A job whose
//!   caller is gone (or out of time) when a slot takes it is dropped.
//! - A crashed worker is dropped, never called again; its slot starts a new
//!   incarnation after the delay [`Intensity`] decides.
//! - More than `max_restarts` failures of one slot within `window`, or more
//!   than `max_unproven` in a row with no success, escalate: the pool goes
//!   down for a cooldown that doubles with each escalation in a row (capped),
//!   every queued and later request gets [`SupervisorError::Unavailable`]
//!   with the time left, and then the whole pool restarts (OTP's escalation
//!   to a parent that restarts the subtree). No silent restart loop, and no
//!   pool down for good. Why intensity is per slot and not per supervisor:
//!   the slots are identical instances sharing one load, so a supervisor-wide
//!   MaxR would make a larger pool escalate sooner under the same fault rate
//!   per instance (see `limits::DEFAULT_MAX_RESTARTS`).
//! - A planned recycle (a health threshold) starts the replacement first and
//!   swaps it in between two calls, so it fails no request. It is not a
//!   failure and does not count toward intensity.
//! - [`Supervisor::embed`] never loses a text: the texts of a crashed batch
//!   are retried one by one; a text present in `poison_after` crashes (the
//!   last ones alone) is answered with an error naming its index, and the
//!   rest of the batch is embedded without it, but only with evidence: the
//!   pool must then answer a control text ([`CONTROL_TEXT`]), and the
//!   suspect must crash alone once more after it. When the control fails
//!   too, the fault is the pool's (a storm), no text is poison, and the
//!   suspect starts over under the caller's deadline while intensity
//!   restarts or escalates the pool. A poison text is remembered
//!   and never sent again; its crashes alone are charged to a poison budget
//!   and the batch crash it caused is refunded, so bad inputs do not
//!   escalate a healthy pool, while a plugin that crashes on every text
//!   still does.
//! - Every backend's answer is checked here: one row of the model's
//!   dimension per text, finite values (a NaN fails its text alone), and the
//!   same `ModelInfo` from every incarnation.
//! - [`Supervisor::shutdown`] stops the slots in reverse start order, each
//!   within a timeout; a start in progress is finished, then stopped.
//!
//! # Layout
//! - this file: the public types, the shared state of the pool (`Inner`),
//!   and [`Supervisor`]'s start, status and shutdown;
//! - `calls`: the request policy of [`Supervisor::embed`] (splitting across
//!   instances, poison isolation, answer checks);
//! - `slot`: one slot's task (start, restart, intensity), and the
//!   generations of slots (escalation and recovery of the whole pool);
//! - `instance`: serving one instance (calls, health, recycle).
//!
//! No import runs in a circle: `calls` and `instance` use only this file,
//! `slot` uses `instance`, and this file uses the three.

mod calls;
mod instance;
mod intensity;
mod slot;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use calls::{CONTROL_TEXT, split_parts};
pub use instance::METRIC_HEALTH_SLOW;
pub use intensity::{Decision, Intensity, IntensityConfig};

pub use crate::backend::{
    CallError, FailureReason, Health, ModelInfo, SpawnError, Spawner, Started, Worker,
};

use crate::bus::{BoxFuture, ErrorCode, RemoteError};
use crate::limits;
pub use crate::messages::FailedInput;
use crate::vectors::Vectors;
use calls::PoisonMemory;
use slot::{Failure, Restart, Slot, fail_queued, start_generation};

/// Metric: restarts, by `reason`.
pub const METRIC_RESTARTS: &str = "restarts_total";

/// Metric: escalations of the pool (each followed by a cooldown and a
/// restart of the whole pool).
pub const METRIC_ESCALATIONS: &str = "escalations_total";

/// Whether a slot's instance is restarted (OTP's restart types).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartType {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (a crash); a normal stop ends
    /// the slot.
    Transient,
    /// Never restarted.
    Temporary,
}

/// The supervisor's settings. Defaults: the seed's thresholds and OTP's
/// intensity.
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorConfig {
    /// Instances in the pool.
    pub pool_size: usize,
    /// Whether a stopped instance is restarted.
    pub restart: RestartType,
    /// How many restarts within which window, and the backoff between them.
    pub intensity: IntensityConfig,
    /// Interval between health checks of an instance.
    pub health_interval: Duration,
    /// Deadline of one health check.
    pub health_timeout: Duration,
    /// Recycle an instance whose memory exceeds this.
    pub max_memory_bytes: u64,
    /// Recycle an instance that has processed more texts than this.
    pub max_processed: u64,
    /// A text present in this many crashes (the last one alone) is poison.
    /// Random faults can look like poison: with a crash probability `p` per
    /// call, a text is falsely isolated with probability about
    /// `p^poison_after`.
    pub poison_after: u32,
    /// Seed of the restart delays' jitter (slot `n` draws from `seed + n`),
    /// so a test can reproduce a schedule; `None` draws a random one.
    pub jitter_seed: Option<u64>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            pool_size: std::thread::available_parallelism().map_or(1, |n| n.get()),
            restart: RestartType::Permanent,
            intensity: IntensityConfig::default(),
            health_interval: limits::DEFAULT_HEALTH_INTERVAL,
            health_timeout: limits::DEFAULT_HEALTH_TIMEOUT,
            max_memory_bytes: limits::DEFAULT_RECYCLE_MEMORY_BYTES,
            max_processed: limits::DEFAULT_RECYCLE_PROCESSED,
            poison_after: limits::DEFAULT_POISON_AFTER,
            jitter_seed: None,
        }
    }
}

/// Errors of the supervisor.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No instance could be started within the restart intensity (at
    /// [`Supervisor::start`]), or the pool was shut down.
    #[error("the embedder backend failed: {0}")]
    Escalated(String),
    /// The pool escalated and is down until its cooldown ends; it then
    /// restarts by itself. Retry after `retry_after`.
    #[error(
        "the embedder backend is recovering after too many failures ({reason}); retry in {retry_after:?}"
    )]
    Unavailable {
        /// Why the pool escalated.
        reason: String,
        /// Time left in the cooldown.
        retry_after: Duration,
    },
    /// The request's deadline ran out (while waiting, retrying or isolating
    /// a poison input).
    #[error("embedding ran out of its {0:?} deadline")]
    DeadlineExceeded(Duration),
    /// An instance refused the request.
    #[error("{0}")]
    Refused(RemoteError),
}

impl From<SupervisorError> for RemoteError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Escalated(_) => RemoteError::new(ErrorCode::Failed, e.to_string()),
            SupervisorError::Unavailable { retry_after, .. } => {
                RemoteError::new(ErrorCode::Unavailable, e.to_string())
                    .retry_after(Some(retry_after))
            }
            SupervisorError::DeadlineExceeded(_) => {
                RemoteError::new(ErrorCode::DeadlineExceeded, e.to_string())
            }
            SupervisorError::Refused(remote) => remote,
        }
    }
}

/// The answer to a batch: a vector for every text that could be embedded.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchResult {
    /// Rows of the texts not in `failed`, in input order.
    pub vectors: Vectors,
    /// Texts that could not be embedded, by index.
    pub failed: Vec<FailedInput>,
}

/// One instance's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The slot in the pool.
    pub slot: usize,
    /// The slot's current incarnation, counting from 1.
    pub incarnation: u64,
    /// The child's process id (native backend).
    pub pid: Option<u32>,
    /// Started and serving (false while restarting).
    pub up: bool,
    /// Since the incarnation started.
    pub uptime_ms: u64,
    /// Calls answered by this incarnation.
    pub served: u64,
    /// At the last health check.
    pub memory_bytes: u64,
    /// Restarts of this slot, by reason label.
    pub restarts: BTreeMap<String, u64>,
}

struct Job {
    texts: Vec<String>,
    is_query: bool,
    /// When the caller stops waiting: a job whose caller is gone, or whose
    /// time ran out in the queue, is dropped when a slot takes it, never
    /// started.
    until: Instant,
    /// One text retried alone after it was in a crash: if it crashes
    /// again, the crash is charged to the poison budget, not to the
    /// instance's restart intensity (the input is at fault, not the
    /// instance).
    suspect: bool,
    reply: oneshot::Sender<Reply>,
}

/// A job's answer, with the slot that ran it (none if no slot did).
type Reply = (Option<usize>, Result<Vectors, CallError>);

#[derive(Default)]
struct SlotState {
    /// A temporary slot whose instance ended: it left the pool.
    gone: bool,
    /// Crashes of this slot since explained by a poison input, to take
    /// back from its restart intensity.
    refunds: u32,
    incarnation: u64,
    pid: Option<u32>,
    up_since: Option<Instant>,
    served: u64,
    /// Texts embedded by the slot's instances (all incarnations).
    texts: u64,
    memory_bytes: u64,
    restarts: BTreeMap<String, u64>,
}

struct Inner {
    config: SupervisorConfig,
    /// Cancelled by [`Supervisor::shutdown`] or when the last `Supervisor`
    /// handle is dropped: every slot stops its instance and ends for good.
    shutdown: CancellationToken,
    /// The slots now running (one generation: the pool from its start, or
    /// from its last recovery). Escalation cancels them; recovery starts
    /// the next generation.
    generation: Mutex<Generation>,
    jobs: mpsc::Sender<Job>,
    queue: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    /// Set while the pool is down after an escalation.
    cooldown: Mutex<Option<Cooldown>>,
    /// Escalations since the pool last served a call: the cooldown's
    /// exponent.
    escalations: AtomicU32,
    slots: Mutex<Vec<SlotState>>,
    spawner: Arc<dyn Spawner>,
    info: Mutex<Option<ModelInfo>>,
    poison: Mutex<PoisonMemory>,
    /// Slots running a call now: a batch is cut only across the others.
    busy: AtomicUsize,
}

/// One generation of slots: a token per slot, cancelled in reverse start
/// order on shutdown, and the slots' tasks.
#[derive(Default)]
struct Generation {
    slots: Vec<(CancellationToken, Option<tokio::task::JoinHandle<()>>)>,
}

/// Why and until when the pool is down.
#[derive(Clone, Debug)]
struct Cooldown {
    reason: String,
    until: Instant,
    /// Whether the pool restarts when the cooldown ends (false: a pool with
    /// no slot left, which fails every call at once).
    recovering: bool,
}

/// A supervised pool of embedder instances. Cheap to clone.
///
/// # Example
/// A pool of two stub WASM instances; a text that traps its instance is
/// answered with an error, the rest of the batch with vectors, and the pool
/// goes on serving from a fresh instance.
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use embedhost::supervisor::{Supervisor, SupervisorConfig};
/// use embedhost::wasm::{InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner};
///
/// let engine = WasmEngine::new(None).unwrap();
/// let spawner = WasmSpawner {
///     plugin: WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap(),
///     limits: InstanceLimits::default(),
///     config: vec![("fault.trap_marker".into(), "BOOM".into())],
/// };
/// let config = SupervisorConfig { pool_size: 2, ..SupervisorConfig::default() };
/// let supervisor = Supervisor::start(spawner, config).await.unwrap();
///
/// let texts = vec!["hello".to_string(), "BOOM".to_string(), "world".to_string()];
/// let batch = supervisor.embed(texts, false, Duration::from_secs(30)).await.unwrap();
/// assert_eq!(batch.vectors.len(), 2);
/// assert_eq!(batch.failed[0].index, 1);
/// assert!(supervisor.status().iter().any(|i| i.restarts.get("trap").is_some()));
/// # }
/// ```
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
    _stop_on_drop: Arc<tokio_util::sync::DropGuard>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Jobs waiting for an idle instance before submitters wait: a few per
/// instance keeps every instance busy without queueing without bound.
const QUEUE_PER_INSTANCE: usize = 4;

impl Supervisor {
    /// Starts the pool and waits until one instance is up.
    ///
    /// A first instance that fails to start is restarted like any other,
    /// within the restart intensity: a transient failure (a child killed at
    /// start-up) is ridden out, a permanent one (`init` refuses the
    /// configuration, a child that always exits) escalates after
    /// `max_restarts` restarts with the last failure's message.
    ///
    /// # Errors
    /// [`SupervisorError::Escalated`] if no instance comes up within the
    /// restart intensity.
    pub async fn start(
        spawner: impl Spawner,
        config: SupervisorConfig,
    ) -> Result<Self, SupervisorError> {
        let pool = config.pool_size.max(1);
        let (jobs, queue) = mpsc::channel(pool * QUEUE_PER_INSTANCE);
        let shutdown = CancellationToken::new();
        // Until a `Supervisor` owns the token, a start that fails (or is
        // dropped) stops what it spawned: an escalation's recovery task
        // would otherwise restart the pool after its cooldown, forever.
        let abandon = shutdown.clone().drop_guard();
        let inner = Arc::new(Inner {
            config,
            shutdown: shutdown.clone(),
            generation: Mutex::new(Generation::default()),
            jobs,
            queue: tokio::sync::Mutex::new(queue),
            cooldown: Mutex::new(None),
            escalations: AtomicU32::new(0),
            slots: Mutex::new((0..pool).map(|_| SlotState::default()).collect()),
            spawner: Arc::new(spawner),
            info: Mutex::new(None),
            poison: Mutex::new(PoisonMemory::new()),
            busy: AtomicUsize::new(0),
        });
        // The first instance is started here, so a plugin that cannot start at
        // all is reported to the caller rather than retried in the background.
        let stop = shutdown.child_token();
        let mut slot = Slot::new(inner.clone(), 0, stop.clone(), 0, None);
        let (first, info) = loop {
            slot.incarnation += 1;
            match inner.spawner.start(0, slot.incarnation).await {
                Ok(started) => break started,
                Err(error) => match slot.on_failure(Failure::init(&error)).await {
                    Restart::Yes => {}
                    Restart::No(why) => return Err(SupervisorError::Escalated(why)),
                },
            }
        };
        let (incarnation, intensity) = (slot.incarnation, slot.intensity);
        *lock(&inner.info) = Some(info);
        {
            // Visible in `status` from the moment `start` returns.
            let mut slots = lock(&inner.slots);
            slots[0].incarnation = incarnation;
            slots[0].pid = first.pid();
            slots[0].up_since = Some(Instant::now());
        }
        start_generation(&inner, Some((first, incarnation, intensity)), stop);
        abandon.disarm();
        Ok(Supervisor {
            inner,
            _stop_on_drop: Arc::new(shutdown.drop_guard()),
        })
    }

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

    /// What the model reported at the first start.
    pub fn model_info(&self) -> ModelInfo {
        lock(&self.inner.info)
            .clone()
            .expect("set before `start` returns")
    }

    /// Waits until every instance is up, for at most `within`: a caller that
    /// reports or serves the whole pool does not see it half started.
    pub async fn wait_all_up(&self, within: Duration) {
        let until = Instant::now() + within;
        while !self.status().iter().all(|i| i.up) && Instant::now() < until {
            tokio::time::sleep(limits::POOL_UP_POLL).await;
        }
    }

    /// Why the pool is down, while it cools down after an escalation.
    pub fn escalated(&self) -> Option<String> {
        lock(&self.inner.cooldown)
            .as_ref()
            .map(|c| c.reason.clone())
    }

    /// [`SupervisorError::Unavailable`] while the pool cools down.
    fn unavailable(&self) -> Option<SupervisorError> {
        if self.inner.shutdown.is_cancelled() {
            return Some(SupervisorError::Escalated("the pool was shut down".into()));
        }
        let cooldown = lock(&self.inner.cooldown).clone()?;
        if !cooldown.recovering {
            return Some(SupervisorError::Escalated(cooldown.reason));
        }
        Some(SupervisorError::Unavailable {
            reason: cooldown.reason,
            retry_after: cooldown.until.saturating_duration_since(Instant::now()),
        })
    }

    /// Per-instance status.
    pub fn status(&self) -> Vec<InstanceStatus> {
        let now = Instant::now();
        lock(&self.inner.slots)
            .iter()
            .enumerate()
            .map(|(slot, s)| InstanceStatus {
                slot,
                incarnation: s.incarnation,
                pid: s.pid,
                up: s.up_since.is_some(),
                uptime_ms: s
                    .up_since
                    .map_or(0, |t| now.duration_since(t).as_millis() as u64),
                served: s.served,
                memory_bytes: s.memory_bytes,
                restarts: s.restarts.clone(),
            })
            .collect()
    }

    /// Restarts of the whole pool, by reason label (`trap`, `deadline`,
    /// `recycle`, ...), summed over the slots; reasons never seen are absent.
    pub fn restarts(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for slot in lock(&self.inner.slots).iter() {
            for (reason, n) in &slot.restarts {
                *total.entry(reason.clone()).or_default() += n;
            }
        }
        total.retain(|_, n| *n > 0);
        total
    }

    /// Instances neither running a call nor claimed by a queued job (one
    /// still starting counts as free: it takes a job once up).
    pub fn free_instances(&self) -> usize {
        let queued = self.inner.jobs.max_capacity() - self.inner.jobs.capacity();
        self.inner
            .config
            .pool_size
            .max(1)
            .saturating_sub(self.inner.busy.load(Ordering::Relaxed) + queued)
    }

    /// Health of one idle instance (for `embedder.health`).
    ///
    /// # Errors
    /// [`SupervisorError::Escalated`] once the backend failed.
    pub fn health(&self) -> Result<Health, SupervisorError> {
        if let Some(down) = self.unavailable() {
            return Err(down);
        }
        let slots = lock(&self.inner.slots);
        Ok(Health {
            memory_bytes: slots.iter().map(|s| s.memory_bytes).sum(),
            processed: slots.iter().map(|s| s.texts).sum(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// A supervisor whose spawner is a closure (handy for tests).
    pub async fn from_fn<F>(f: F, config: SupervisorConfig) -> Result<Self, SupervisorError>
    where
        F: Fn(usize, u64) -> BoxFuture<Started> + Send + Sync + 'static,
    {
        struct FnSpawner<F>(F);
        impl<F> Spawner for FnSpawner<F>
        where
            F: Fn(usize, u64) -> BoxFuture<Started> + Send + Sync + 'static,
        {
            fn start(&self, slot: usize, incarnation: u64) -> BoxFuture<Started> {
                (self.0)(slot, incarnation)
            }
        }
        Self::start(FnSpawner(f), config).await
    }
}
