//! The supervisor: a pool of embedder instances, each restarted on failure
//! with OTP's semantics (restart types, restart intensity) plus backoff,
//! health checks, planned make-before-break recycling and poison-input
//! isolation.
//!
//! It is generic over what it supervises ([`Spawner`] starts a [`Worker`]):
//! a WASM instance (a `Store` on its own thread) or, later, a native child
//! process. Tests supervise scripted workers on tokio's paused clock.
//!
//! # Invariants
//! - A slot runs one call at a time, pulled from one shared queue: a request
//!   goes to an idle instance, and a crash fails only the call running on the
//!   crashed instance.
//! - A crashed worker is dropped, never called again; its slot starts a new
//!   incarnation after the delay [`Intensity`] decides.
//! - More than `max_restarts` failures of one slot within `window` escalate:
//!   the supervisor is marked failed, every queued and later request gets
//!   [`SupervisorError::Escalated`] with the reason. No silent restart loop.
//! - A planned recycle (a health threshold) starts the replacement first and
//!   swaps it in between two calls, so it fails no request. It is not a
//!   failure and does not count toward intensity.
//! - [`Supervisor::embed`] never loses a text: the texts of a crashed batch
//!   are retried one by one; a text present in `poison_after` crashes (the
//!   last one alone) is answered with an error naming its index, and the rest
//!   of the batch is embedded without it. A poison text in a batch of any
//!   size costs two crashes.

mod intensity;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use intensity::{Decision, Intensity, IntensityConfig};

pub use crate::backend::{CallError, FailureReason, Health, ModelInfo, Spawner, Started, Worker};

use crate::bus::{BoxFuture, ErrorCode, RemoteError};
use crate::limits;
pub use crate::messages::FailedInput;
use crate::vectors::Vectors;

/// Metric: restarts, by `reason`.
pub const METRIC_RESTARTS: &str = "restarts_total";

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
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            pool_size: std::thread::available_parallelism().map_or(1, |n| n.get()),
            restart: RestartType::Permanent,
            intensity: IntensityConfig {
                max_restarts: limits::DEFAULT_MAX_RESTARTS,
                window: limits::DEFAULT_RESTART_WINDOW,
                backoff_min: limits::DEFAULT_RESTART_BACKOFF_MIN,
                backoff_max: limits::DEFAULT_RESTART_BACKOFF_MAX,
                stable_uptime: limits::DEFAULT_STABLE_UPTIME,
            },
            health_interval: limits::DEFAULT_HEALTH_INTERVAL,
            health_timeout: limits::DEFAULT_HEALTH_TIMEOUT,
            max_memory_bytes: limits::DEFAULT_RECYCLE_MEMORY_BYTES,
            max_processed: limits::DEFAULT_RECYCLE_PROCESSED,
            poison_after: limits::DEFAULT_POISON_AFTER,
        }
    }
}

/// Errors of the supervisor.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Restart intensity was exceeded; the backend is failed for good.
    #[error("the embedder backend failed: {0}")]
    Escalated(String),
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
    reply: oneshot::Sender<Result<Vectors, CallError>>,
}

#[derive(Default)]
struct SlotState {
    incarnation: u64,
    pid: Option<u32>,
    up_since: Option<Instant>,
    served: u64,
    memory_bytes: u64,
    restarts: BTreeMap<String, u64>,
}

struct Inner {
    config: SupervisorConfig,
    /// Cancelled on escalation or when the last `Supervisor` handle is
    /// dropped: every slot stops its instance and ends.
    stop: tokio_util::sync::CancellationToken,
    jobs: mpsc::Sender<Job>,
    queue: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    escalated: Mutex<Option<String>>,
    slots: Mutex<Vec<SlotState>>,
    spawner: Arc<dyn Spawner>,
    info: Mutex<Option<ModelInfo>>,
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
        let stop = tokio_util::sync::CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            stop: stop.clone(),
            jobs,
            queue: tokio::sync::Mutex::new(queue),
            escalated: Mutex::new(None),
            slots: Mutex::new((0..pool).map(|_| SlotState::default()).collect()),
            spawner: Arc::new(spawner),
            info: Mutex::new(None),
        });
        // The first instance is started here, so a plugin that cannot start at
        // all is reported to the caller rather than retried in the background.
        let mut intensity = Intensity::new(inner.config.intensity);
        let mut incarnation = 0;
        let (first, info) = loop {
            incarnation += 1;
            match inner.spawner.start(0, incarnation).await {
                Ok(started) => break started,
                Err(message) => {
                    let failure = FailureReason::InitFailed;
                    if !on_failure(&inner, 0, &mut intensity, failure, &message, Duration::ZERO)
                        .await
                    {
                        let why = lock(&inner.escalated).clone().unwrap_or(message);
                        return Err(SupervisorError::Escalated(why));
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
        tokio::spawn(run_slot(
            inner.clone(),
            0,
            Some((first, incarnation, intensity)),
        ));
        for slot in 1..pool {
            tokio::spawn(run_slot(inner.clone(), slot, None));
        }
        Ok(Supervisor {
            inner,
            _stop_on_drop: Arc::new(stop.drop_guard()),
        })
    }

    /// What the model reported at the first start.
    pub fn model_info(&self) -> ModelInfo {
        lock(&self.inner.info)
            .clone()
            .expect("set before `start` returns")
    }

    /// Why the backend failed, once it has.
    pub fn escalated(&self) -> Option<String> {
        lock(&self.inner.escalated).clone()
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
        let until = Instant::now() + deadline;
        let dimension = self.model_info().dimension as usize;
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let mut crashes = vec![0u32; texts.len()];
        let mut failed: Vec<FailedInput> = Vec::new();
        let mut work: VecDeque<Vec<usize>> = VecDeque::new();
        if !texts.is_empty() {
            work.push_back((0..texts.len()).collect());
        }
        while let Some(batch) = work.pop_front() {
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(SupervisorError::DeadlineExceeded(deadline));
            }
            let batch_texts = batch.iter().map(|&i| texts[i].clone()).collect();
            match self.dispatch(batch_texts, is_query, remaining).await? {
                Ok(vectors) => {
                    for (k, &i) in batch.iter().enumerate() {
                        rows[i] = vectors.get(k).map(<[f32]>::to_vec);
                    }
                }
                Err(CallError::Crash { reason, message }) => {
                    for &i in &batch {
                        crashes[i] += 1;
                    }
                    if batch.len() > 1 {
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
                    if crashes[i] >= self.inner.config.poison_after {
                        tracing::warn!(index = i, crashes = crashes[i], %reason, "poison input isolated");
                        failed.push(FailedInput {
                            index: i as u32,
                            reason: format!(
                                "crashed {} instances ({reason}): {message}",
                                crashes[i]
                            ),
                        });
                    } else {
                        work.push_front(batch);
                    }
                }
                Err(CallError::Refused(RemoteError {
                    code: ErrorCode::InvalidInput,
                    index: Some(k),
                    message,
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
                Err(CallError::Refused(remote)) => return Err(SupervisorError::Refused(remote)),
            }
        }
        failed.sort_by_key(|f| f.index);
        let data: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        let vectors = if data.is_empty() {
            Vectors::default()
        } else {
            Vectors::new(dimension, data).map_err(|e| {
                SupervisorError::Refused(RemoteError::new(ErrorCode::Failed, e.to_string()))
            })?
        };
        Ok(BatchResult { vectors, failed })
    }

    /// One attempt on some idle instance. The outer `Result` is the
    /// supervisor's own failure; the inner one the call's.
    async fn dispatch(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> Result<Result<Vectors, CallError>, SupervisorError> {
        if let Some(reason) = self.escalated() {
            return Err(SupervisorError::Escalated(reason));
        }
        let (reply, answer) = oneshot::channel();
        let until = Instant::now() + deadline;
        let job = Job {
            texts,
            is_query,
            until,
            reply,
        };
        let exhausted = || SupervisorError::DeadlineExceeded(deadline);
        match tokio::time::timeout_at(until, self.inner.jobs.send(job)).await {
            Err(_) => return Err(exhausted()),
            Ok(Err(_)) => {
                return Err(SupervisorError::Escalated(
                    self.escalated().unwrap_or_default(),
                ));
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(until, answer).await {
            Err(_) => Err(exhausted()),
            Ok(Err(_)) => Err(SupervisorError::Escalated(
                self.escalated()
                    .unwrap_or_else(|| "the pool stopped".into()),
            )),
            // A job failed by escalation: report the escalation itself.
            Ok(Ok(Err(CallError::Refused(_)))) if self.escalated().is_some() => Err(
                SupervisorError::Escalated(self.escalated().unwrap_or_default()),
            ),
            Ok(Ok(result)) => Ok(result),
        }
    }

    /// Health of one idle instance (for `embedder.health`).
    ///
    /// # Errors
    /// [`SupervisorError::Escalated`] once the backend failed.
    pub fn health(&self) -> Result<Health, SupervisorError> {
        if let Some(reason) = self.escalated() {
            return Err(SupervisorError::Escalated(reason));
        }
        let slots = lock(&self.inner.slots);
        Ok(Health {
            memory_bytes: slots.iter().map(|s| s.memory_bytes).sum(),
            processed: slots.iter().map(|s| s.served).sum(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a slot's serving loop ended.
enum Ended {
    Crashed(FailureReason, String),
    Shutdown,
}

/// The instance `start` brought up, with its incarnation and the intensity
/// its start-up failures already used.
type FirstInstance = (Box<dyn Worker>, u64, Intensity);

async fn run_slot(inner: Arc<Inner>, slot: usize, first: Option<FirstInstance>) {
    let (mut first, mut incarnation, mut intensity) = match first {
        Some((worker, incarnation, intensity)) => (Some(worker), incarnation, intensity),
        None => (None, 0, Intensity::new(inner.config.intensity)),
    };
    loop {
        if inner.stop.is_cancelled() {
            if let Some(worker) = first.take() {
                worker.stop().await;
            }
            return;
        }
        let worker = match first.take() {
            Some(worker) => worker,
            None => {
                incarnation += 1;
                match inner.spawner.start(slot, incarnation).await {
                    Ok((worker, _)) => worker,
                    Err(message) => {
                        if !on_failure(
                            &inner,
                            slot,
                            &mut intensity,
                            FailureReason::InitFailed,
                            &message,
                            Duration::ZERO,
                        )
                        .await
                        {
                            return;
                        }
                        continue;
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
        let ended = serve(&inner, slot, &mut incarnation, worker).await;
        lock(&inner.slots)[slot].up_since = None;
        match ended {
            Ended::Shutdown => return,
            Ended::Crashed(reason, message) => {
                let restart = match inner.config.restart {
                    RestartType::Temporary => false,
                    RestartType::Permanent | RestartType::Transient => true,
                };
                if !restart {
                    tracing::warn!(slot, incarnation, %reason, "temporary instance crashed; not restarted");
                    return;
                }
                if !on_failure(
                    &inner,
                    slot,
                    &mut intensity,
                    reason,
                    &message,
                    started.elapsed(),
                )
                .await
                {
                    return;
                }
            }
        }
    }
}

/// Records a failure, and waits out the backoff. Returns `false` when the
/// supervisor escalated.
async fn on_failure(
    inner: &Arc<Inner>,
    slot: usize,
    intensity: &mut Intensity,
    reason: FailureReason,
    message: &str,
    uptime: Duration,
) -> bool {
    metrics::counter!(METRIC_RESTARTS, "reason" => reason.label()).increment(1);
    *lock(&inner.slots)[slot]
        .restarts
        .entry(reason.label().to_string())
        .or_default() += 1;
    match intensity.on_failure(Instant::now(), uptime) {
        Decision::Restart { delay } => {
            tracing::warn!(slot, %reason, %message, ?delay, "instance failed; restarting");
            tokio::select! {
                () = tokio::time::sleep(delay) => true,
                () = inner.stop.cancelled() => false,
            }
        }
        Decision::Escalate { restarts, window } => {
            let why = format!(
                "instance {slot} failed {restarts} times within {window:?} (last: {reason}: {message})"
            );
            tracing::error!(slot, %why, "restart intensity exceeded; escalating");
            escalate(inner, why).await;
            false
        }
    }
}

async fn escalate(inner: &Arc<Inner>, why: String) {
    {
        let mut escalated = lock(&inner.escalated);
        if escalated.is_none() {
            *escalated = Some(why);
        }
    }
    // Stop every slot (which releases the queue), then close the queue and
    // fail every job in it; later submissions fail at once.
    inner.stop.cancel();
    let mut queue = inner.queue.lock().await;
    queue.close();
    while let Ok(job) = queue.try_recv() {
        let _ = job.reply.send(Err(CallError::Refused(RemoteError::new(
            ErrorCode::Failed,
            lock(&inner.escalated).clone().unwrap_or_default(),
        ))));
    }
}

async fn next_job(inner: &Inner) -> Option<Job> {
    inner.queue.lock().await.recv().await
}

async fn serve(
    inner: &Arc<Inner>,
    slot: usize,
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
    loop {
        let pending_replacement = async {
            match replacement.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = inner.stop.cancelled() => {
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
                match tokio::time::timeout(config.health_timeout, worker.health(config.health_timeout)).await {
                    Err(_) => return Ended::Crashed(FailureReason::HealthTimeout, format!("no health report within {:?}", config.health_timeout)),
                    Ok(Err(CallError::Crash { reason: FailureReason::Deadline, message })) => return Ended::Crashed(FailureReason::HealthTimeout, message),
                    Ok(Err(CallError::Crash { message, .. })) => return Ended::Crashed(FailureReason::HealthFailed, message),
                    Ok(Err(CallError::Refused(e))) => return Ended::Crashed(FailureReason::HealthFailed, e.to_string()),
                    Ok(Ok(report)) => {
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
                let call = worker.embed(job.texts, job.is_query, limits::UNBOUNDED_BY_CALLER);
                let mut result = if worker.health_during_calls() {
                    watch_call(inner, slot, &mut worker, &mut health, call).await
                } else {
                    call.await
                };
                lock(&inner.slots)[slot].served += 1;
                let crash = match &mut result {
                    Err(CallError::Crash { reason, message }) => {
                        // Name the incarnation that died, for the caller and the log.
                        *message = format!("instance {slot} incarnation {serving}: {message}");
                        Some((reason.clone(), message.clone()))
                    }
                    _ => None,
                };
                let _ = job.reply.send(result);
                if let Some((reason, message)) = crash {
                    return Ended::Crashed(reason, message);
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
