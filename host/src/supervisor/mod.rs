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

mod intensity;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use intensity::{Decision, Intensity, IntensityConfig};

pub use crate::backend::{CallError, FailureReason, Health, ModelInfo, Spawner, Started, Worker};

use crate::bus::{BoxFuture, ErrorCode, RemoteError};
use crate::limits;
pub use crate::messages::FailedInput;
use crate::vectors::Vectors;

/// Metric: restarts, by `reason`.
pub const METRIC_RESTARTS: &str = "restarts_total";

/// Metric: escalations of the pool (each followed by a cooldown and a
/// restart of the whole pool).
pub const METRIC_ESCALATIONS: &str = "escalations_total";

/// The text a poison verdict is checked against: a suspect that crashed
/// an instance alone `poison_after` times is poison only if the pool then
/// answers this one. Short and plain, so that any working embedder
/// answers it.
pub const CONTROL_TEXT: &str = "control";

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
                let mut remote = RemoteError::new(ErrorCode::Unavailable, e.to_string());
                remote.retry_after_ms =
                    Some(retry_after.as_millis().try_into().unwrap_or(u64::MAX));
                remote
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

/// Texts known to crash instances, by a keyed hash of their content, so
/// that the same text never crashes an instance twice, in any batch.
/// Bounded by [`limits::MAX_REMEMBERED_POISON`] (oldest forgotten first).
struct PoisonMemory {
    keys: std::hash::RandomState,
    reasons: std::collections::HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl PoisonMemory {
    fn new() -> Self {
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
        let mut intensity = slot_intensity(&inner.config, 0);
        let mut incarnation = 0;
        let (first, info) = loop {
            incarnation += 1;
            match inner.spawner.start(0, incarnation).await {
                Ok(started) => break started,
                Err(message) => {
                    let failure = FailureReason::InitFailed;
                    match on_failure(
                        &inner,
                        0,
                        &stop,
                        &mut intensity,
                        failure,
                        &message,
                        Duration::ZERO,
                        false,
                    )
                    .await
                    {
                        Restart::Yes => {}
                        Restart::No(why) => return Err(SupervisorError::Escalated(why)),
                    }
                }
            }
        };
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

    /// [`Supervisor::embed`] of one part, on one instance at a time.
    async fn embed_part(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> Result<BatchResult, SupervisorError> {
        let until = Instant::now() + deadline;
        let dimension = self.model_info().dimension as usize;
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let mut crashes = vec![0u32; texts.len()];
        // Suspects after whose crashes the pool answered the control text.
        let mut controlled = vec![false; texts.len()];
        let mut failed: Vec<FailedInput> = Vec::new();
        let mut work: VecDeque<Vec<usize>> = VecDeque::new();
        // For each text, the batch crash it was in (a number) and the slot
        // that crashed: when the text turns out to be poison, that crash was
        // the input's doing, and the slot's restart intensity is refunded
        // (once per batch).
        let mut batch_crash: Vec<Option<(usize, usize)>> = vec![None; texts.len()];
        let mut batch_crashes = 0usize;
        let mut refunded = std::collections::HashSet::new();
        // Texts known to crash instances are answered at once.
        let mut fresh = Vec::with_capacity(texts.len());
        {
            let poison = lock(&self.inner.poison);
            for (i, text) in texts.iter().enumerate() {
                match poison.get(text) {
                    Some(reason) => failed.push(FailedInput {
                        index: i as u32,
                        reason: format!("a known poison input: {reason}"),
                    }),
                    None => fresh.push(i),
                }
            }
        }
        if !fresh.is_empty() {
            work.push_back(fresh);
        }
        while let Some(batch) = work.pop_front() {
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(SupervisorError::DeadlineExceeded(deadline));
            }
            let batch_texts = batch.iter().map(|&i| texts[i].clone()).collect();
            let suspect = batch.len() == 1 && crashes[batch[0]] > 0;
            let (ran_on, result) = self
                .dispatch(batch_texts, is_query, remaining, suspect)
                .await?;
            match result {
                Ok(vectors) => {
                    // One place checks every backend's answer: a missing
                    // row would shift every later text's vector by one.
                    if let Err(reason) = check_rows(&vectors, batch.len(), dimension) {
                        return Err(SupervisorError::Refused(RemoteError::new(
                            ErrorCode::Failed,
                            reason,
                        )));
                    }
                    for (k, &i) in batch.iter().enumerate() {
                        let row = vectors.get(k).map(<[f32]>::to_vec);
                        match row.as_deref().and_then(non_finite) {
                            // A NaN or an infinity is that text's failure.
                            Some(bad) => failed.push(FailedInput {
                                index: i as u32,
                                reason: format!("the embedder returned {bad} in its vector"),
                            }),
                            None => rows[i] = row,
                        }
                    }
                }
                Err(CallError::Crash { reason, message }) => {
                    for &i in &batch {
                        crashes[i] += 1;
                    }
                    if batch.len() > 1 {
                        batch_crashes += 1;
                        if let Some(slot) = ran_on {
                            for &i in &batch {
                                batch_crash[i] = Some((batch_crashes, slot));
                            }
                        }
                        // Which text crashed is unknown: retry each alone, so a
                        // poison text costs one more crash, not one per
                        // bisection level (which would exceed the restart
                        // intensity for any large batch).
                        for &i in batch.iter().rev() {
                            work.push_front(vec![i]);
                        }
                        continue;
                    }
                    let i = batch[0];
                    if crashes[i] >= self.inner.config.poison_after && !controlled[i] {
                        if self.control_answers(is_query, until, deadline).await? {
                            // The pool answers a harmless text: one more
                            // crash of the suspect alone convicts it.
                            controlled[i] = true;
                        } else {
                            // A storm, not a poison text: the pool fails a
                            // harmless text too. The suspect starts over;
                            // the pool's intensity deals with the storm (a
                            // restart, or an escalation whose cooldown the
                            // caller is told of).
                            tracing::warn!(index = i, %reason, "a suspect crashed, and so did the control text: not poison");
                            crashes[i] = 0;
                        }
                        work.push_front(batch);
                        continue;
                    }
                    if controlled[i] {
                        tracing::warn!(index = i, crashes = crashes[i], %reason, "poison input isolated");
                        let why = format!(
                            "crashed {} instances, the last alone after the pool answered a control text ({reason}): {message}",
                            crashes[i]
                        );
                        lock(&self.inner.poison).remember(&texts[i], why.clone());
                        if let Some((crash, slot)) = batch_crash[i]
                            && refunded.insert(crash)
                        {
                            lock(&self.inner.slots)[slot].refunds += 1;
                        }
                        failed.push(FailedInput {
                            index: i as u32,
                            reason: why,
                        });
                    } else {
                        work.push_front(batch);
                    }
                }
                Err(CallError::Refused(RemoteError {
                    code: ErrorCode::InvalidInput,
                    index: Some(k),
                    message,
                    ..
                })) => {
                    let Some(&i) = batch.get(k as usize) else {
                        return Err(SupervisorError::Refused(RemoteError::new(
                            ErrorCode::Failed,
                            format!("the plugin named input {k} of a batch of {}", batch.len()),
                        )));
                    };
                    failed.push(FailedInput {
                        index: i as u32,
                        reason: message,
                    });
                    let rest: Vec<usize> = batch.into_iter().filter(|&j| j != i).collect();
                    if !rest.is_empty() {
                        work.push_front(rest);
                    }
                }
                Err(CallError::Refused(remote)) if remote.code == ErrorCode::FrameTooLarge => {
                    // Too large to send or to answer in one frame: halves
                    // go separately, and a text too large alone fails alone.
                    if batch.len() > 1 {
                        let mut first = batch;
                        let second = first.split_off(first.len() / 2);
                        work.push_front(second);
                        work.push_front(first);
                    } else {
                        failed.push(FailedInput {
                            index: batch[0] as u32,
                            reason: remote.message,
                        });
                    }
                }
                Err(CallError::Refused(remote)) => return Err(SupervisorError::Refused(remote)),
            }
        }
        failed.sort_by_key(|f| f.index);
        let data: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        batch_result(dimension, data, failed)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Err` with the reason unless `vectors` has one row of `dimension` per
/// text.
fn check_rows(vectors: &Vectors, texts: usize, dimension: usize) -> Result<(), String> {
    if vectors.len() != texts {
        return Err(format!(
            "the embedder returned {} vectors for {texts} texts",
            vectors.len()
        ));
    }
    if texts > 0 && vectors.dimension() != dimension {
        return Err(format!(
            "the embedder returned vectors of dimension {}, but its model declared {dimension}",
            vectors.dimension()
        ));
    }
    Ok(())
}

/// The first value of `row` that is not finite.
fn non_finite(row: &[f32]) -> Option<f32> {
    row.iter().copied().find(|x| !x.is_finite())
}

/// Starts a generation of slots: slot 0 with `first` if given, the others
/// fresh, each under a child token of `stop`.
fn start_generation(inner: &Arc<Inner>, first: Option<FirstInstance>, stop: CancellationToken) {
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

/// Whether a failed slot restarts, or why not.
enum Restart {
    Yes,
    No(String),
}

/// How a slot's serving loop ended.
enum Ended {
    /// The instance crashed.
    Crashed(Crash),
    /// The instance ended normally (a child that exited 0 on its own).
    /// `true` if the call it ended on was a suspected poison text alone.
    Normal(String, bool),
    Shutdown,
}

/// How an instance crashed.
struct Crash {
    reason: FailureReason,
    message: String,
    /// Whether the call was a suspected poison text alone (see
    /// [`Job::suspect`]).
    suspect: bool,
    /// Whether the instance had served (a call or a health check) before.
    proven: bool,
    /// Whether it crashed during a call (judged by the slot's crash rate,
    /// see [`Intensity::on_call_crash`]) rather than at a health check.
    call: bool,
    /// Calls the slot answered since its last failure, for the crash rate.
    answered: u64,
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

async fn run_slot(
    inner: Arc<Inner>,
    slot: usize,
    first: Option<FirstInstance>,
    stop: CancellationToken,
) {
    let (mut first, mut incarnation, mut intensity) = match first {
        Some((worker, incarnation, intensity)) => (Some(worker), incarnation, intensity),
        None => (
            None,
            lock(&inner.slots)[slot].incarnation,
            slot_intensity(&inner.config, slot),
        ),
    };
    // Crashes of suspected poison texts have a budget of their own: a bad
    // input is not a bad instance, but a plugin that crashes on every text
    // must still escalate.
    let mut poison_budget = Intensity::new(IntensityConfig {
        max_restarts: limits::DEFAULT_MAX_POISON_RESTARTS,
        max_unproven: limits::DEFAULT_MAX_POISON_RESTARTS,
        ..inner.config.intensity
    });
    loop {
        if stop.is_cancelled() {
            if let Some(worker) = first.take() {
                worker.stop().await;
            }
            return;
        }
        let worker = match first.take() {
            Some(worker) => worker,
            None => {
                incarnation += 1;
                // Recorded even if the start fails, so that a pool restarted
                // after an escalation goes on counting from here.
                lock(&inner.slots)[slot].incarnation = incarnation;
                // A start in progress is finished, not abandoned: dropping
                // it would kill a native child half-way through its
                // handshake. It is bounded by the init deadline.
                let started = inner.spawner.start(slot, incarnation).await;
                if stop.is_cancelled() {
                    if let Ok((worker, _)) = started {
                        worker.stop().await;
                    }
                    return;
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
                    Ok(worker) => worker,
                    Err(message) => {
                        let failure = FailureReason::InitFailed;
                        let budget = &mut intensity;
                        match on_failure(
                            &inner,
                            slot,
                            &stop,
                            budget,
                            failure,
                            &message,
                            Duration::ZERO,
                            false,
                        )
                        .await
                        {
                            Restart::Yes => continue,
                            Restart::No(_) => return,
                        }
                    }
                }
            }
        };
        let started = Instant::now();
        {
            let mut slots = lock(&inner.slots);
            slots[slot].incarnation = incarnation;
            slots[slot].pid = worker.pid();
            slots[slot].up_since = Some(started);
        }
        tracing::info!(slot, incarnation, "instance started");
        let ended = serve(&inner, slot, &stop, &mut incarnation, worker).await;
        lock(&inner.slots)[slot].up_since = None;
        match ended {
            Ended::Shutdown => return,
            Ended::Normal(message, suspect) => {
                // OTP: a permanent child is restarted after any exit; a
                // transient or temporary one only after an abnormal exit.
                if inner.config.restart != RestartType::Permanent {
                    tracing::info!(slot, incarnation, %message, "instance ended normally; not restarted");
                    leave_pool(&inner, slot).await;
                    return;
                }
                // An exit on a suspect's call is charged as its crash would be.
                let budget = if suspect {
                    &mut poison_budget
                } else {
                    &mut intensity
                };
                match on_failure(
                    &inner,
                    slot,
                    &stop,
                    budget,
                    FailureReason::Exited(message.clone()),
                    &message,
                    started.elapsed(),
                    false,
                )
                .await
                {
                    Restart::Yes => {}
                    Restart::No(_) => return,
                }
            }
            Ended::Crashed(Crash {
                reason,
                message,
                suspect,
                proven,
                call,
                answered,
            }) => {
                if proven {
                    intensity.on_success();
                    poison_budget.on_success();
                }
                // The calls it answered count in the crash rate (at most a
                // window's worth matter).
                for _ in 0..answered.min(u64::from(inner.config.intensity.rate_window)) {
                    intensity.on_answer();
                }
                let restart = match inner.config.restart {
                    RestartType::Temporary => false,
                    // A crash is an abnormal exit: transient slots restart
                    // after it as permanent ones do.
                    RestartType::Permanent | RestartType::Transient => true,
                };
                if !restart {
                    tracing::warn!(slot, incarnation, %reason, "temporary instance crashed; not restarted");
                    leave_pool(&inner, slot).await;
                    return;
                }
                let refunds = std::mem::take(&mut lock(&inner.slots)[slot].refunds);
                for _ in 0..refunds {
                    intensity.forgive();
                }
                let budget = if suspect {
                    &mut poison_budget
                } else {
                    &mut intensity
                };
                match on_failure(
                    &inner,
                    slot,
                    &stop,
                    budget,
                    reason,
                    &message,
                    started.elapsed(),
                    call && !suspect,
                )
                .await
                {
                    Restart::Yes => {}
                    Restart::No(_) => return,
                }
            }
        }
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

/// Records a failure, and waits out the backoff. Returns whether the slot
/// restarts; when it does not, the pool has escalated (or is stopping).
// The arguments are one failure's facts and the slot's own state, each from
// a different owner; a struct for one call site would only rename them.
#[allow(clippy::too_many_arguments)]
async fn on_failure(
    inner: &Arc<Inner>,
    slot: usize,
    stop: &CancellationToken,
    intensity: &mut Intensity,
    reason: FailureReason,
    message: &str,
    uptime: Duration,
    call: bool,
) -> Restart {
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
                () = stop.cancelled() => Restart::No("the pool is stopping".into()),
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

/// The pool goes down: every slot of this generation stops, queued jobs get
/// [`SupervisorError::Unavailable`], and (when `recover`) the whole pool is
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

async fn serve(
    inner: &Arc<Inner>,
    slot: usize,
    stop: &CancellationToken,
    incarnation: &mut u64,
    mut worker: Box<dyn Worker>,
) -> Ended {
    let config = &inner.config;
    let mut health = tokio::time::interval_at(
        Instant::now() + config.health_interval,
        config.health_interval,
    );
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut replacement: Option<BoxFuture<Started>> = None;
    // The incarnation serving calls; `*incarnation` runs ahead while a
    // replacement starts.
    let mut serving = *incarnation;
    // Whether this instance has served: a call or a health check.
    let mut proven = false;
    // Calls answered (by any incarnation of this loop), for the crash rate.
    let mut answered = 0u64;
    let crashed = |reason, message, suspect, proven, call, answered| {
        Ended::Crashed(Crash {
            reason,
            message,
            suspect,
            proven,
            call,
            answered,
        })
    };
    let mut slow_health = SlowHealth::default();
    loop {
        let pending_replacement = async {
            match replacement.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                worker.stop().await;
                tracing::info!(slot, incarnation = serving, "instance stopped");
                return Ended::Shutdown;
            }
            started = pending_replacement => {
                replacement = None;
                match started {
                    Ok((fresh, _)) => {
                        // Make-before-break: the old instance has no call in
                        // flight (a slot runs one at a time); stop it and swap.
                        let old = std::mem::replace(&mut worker, fresh);
                        old.stop().await;
                        lock(&inner.slots)[slot].pid = worker.pid();
                        metrics::counter!(METRIC_RESTARTS, "reason" => "recycle").increment(1);
                        let mut slots = lock(&inner.slots);
                        *slots[slot].restarts.entry("recycle".into()).or_default() += 1;
                        slots[slot].incarnation = *incarnation;
                        slots[slot].up_since = Some(Instant::now());
                        tracing::info!(slot, old = serving, incarnation = *incarnation, "instance recycled");
                        serving = *incarnation;
                    }
                    Err(message) => tracing::warn!(slot, %message, "replacement failed to start; keeping the current instance"),
                }
            }
            _ = health.tick() => {
                let asked = Instant::now();
                match tokio::time::timeout(config.health_timeout, worker.health(config.health_timeout)).await {
                    Err(_) => return crashed(FailureReason::HealthTimeout, format!("no health report within {:?}", config.health_timeout), false, proven, false, answered),
                    Ok(Err(CallError::Crash { reason: FailureReason::Deadline, message })) => return crashed(FailureReason::HealthTimeout, message, false, proven, false, answered),
                    Ok(Err(CallError::Crash { message, .. })) => return crashed(FailureReason::HealthFailed, message, false, proven, false, answered),
                    Ok(Err(CallError::Refused(e))) => return crashed(FailureReason::HealthFailed, e.to_string(), false, proven, false, answered),
                    Ok(Ok(report)) => {
                        // --- sandbox, second round (issue 26): a slow answer counts.
                        if let Some(message) = slow_health.answered(asked.elapsed(), config.health_timeout) {
                            return crashed(FailureReason::HealthFailed, message, false, proven, false, answered);
                        }
                        proven = true;
                        lock(&inner.slots)[slot].memory_bytes = report.memory_bytes;
                        let over = if report.memory_bytes > config.max_memory_bytes {
                            Some(format!("memory {} > {} bytes", report.memory_bytes, config.max_memory_bytes))
                        } else if report.processed > config.max_processed {
                            Some(format!("processed {} > {}", report.processed, config.max_processed))
                        } else {
                            None
                        };
                        if let (Some(why), None) = (over, replacement.as_ref()) {
                            tracing::info!(slot, %why, "planned recycle: starting a replacement");
                            *incarnation += 1;
                            replacement = Some(inner.spawner.start(slot, *incarnation));
                        }
                    }
                }
            }
            job = next_job(inner) => {
                let Some(job) = job else {
                    worker.stop().await;
                    tracing::info!(slot, incarnation = serving, "instance stopped");
                    return Ended::Shutdown;
                };
                // The caller's time is measured when the job starts, not
                // when it was queued: a job whose caller gave up is dropped.
                if job.reply.is_closed() || Instant::now() >= job.until {
                    continue;
                }
                // The call runs under the backend's own call deadline, not
                // the caller's: a caller that gives up early is not a hung
                // instance, so its impatience never kills one (or counts
                // towards restart intensity). The result is then dropped.
                let busy = Busy::enter(&inner.busy);
                let texts = job.texts.len() as u64;
                let call = worker.embed(job.texts, job.is_query, limits::UNBOUNDED_BY_CALLER);
                let mut result = if worker.health_during_calls() {
                    watch_call(inner, slot, &mut worker, &mut health, call).await
                } else {
                    call.await
                };
                drop(busy);
                lock(&inner.slots)[slot].served += 1;
                if result.is_ok() {
                    lock(&inner.slots)[slot].texts += texts;
                    proven = true;
                    answered += 1;
                    // The pool serves again: the next escalation's cooldown
                    // starts from the shortest.
                    inner.escalations.store(0, Ordering::Relaxed);
                }
                let suspect = job.suspect;
                let crash = match &mut result {
                    Err(CallError::Crash { reason, message }) => {
                        // Name the incarnation that died, for the caller and the log.
                        *message = format!("instance {slot} incarnation {serving}: {message}");
                        Some((reason.clone(), message.clone()))
                    }
                    _ => None,
                };
                let _ = job.reply.send((Some(slot), result));
                if let Some((reason, message)) = crash {
                    if matches!(reason, FailureReason::Exited(_)) && worker.exited_normally().await {
                        return Ended::Normal(message, suspect);
                    }
                    return crashed(reason, message, suspect, proven, true, answered);
                }
            }
        }
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
