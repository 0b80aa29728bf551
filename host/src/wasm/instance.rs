//! Plugin instances: a synchronous [`Instance`] (one `Store`), and
//! [`WasmEmbedder`], which runs one on a dedicated thread for async callers.
//!
//! Why a dedicated thread: a call into a plugin is CPU-bound for as long as
//! the model takes. Running it on a tokio worker would stall every other task
//! on that worker; a thread per instance gives each instance a core and keeps
//! the runtime responsive.
//!
//! # Every call ends by its deadline
//! Each call into the plugin (`init`, `embed`, `health`, and instantiation)
//! is an async wasmtime call, driven by the instance's own current-thread
//! runtime under a timer of deadline + [`limits::HOST_CALL_GRACE`]:
//! - guest code is stopped at the deadline by epoch interruption (a trap);
//! - a call parked in a host function (WASI `poll` on a clock, a file
//!   read) is stopped by the timer: its future is dropped, which cancels
//!   the host call, and the instance is discarded like any crash.
//!
//! Why async calls and not a watchdog that abandons the thread: an
//! abandoned thread keeps its `Store` (and its memory) until the host call
//! returns, which for `sleep(forever)` is never; a plugin that sleeps in
//! `health` leaked one thread and one `Store` per check. Dropping the
//! future frees both at once. The cost, measured by `cargo bench --bench
//! bus -- wasm-call` (README), is a fiber switch and a timer per call:
//! about 2 µs (9.0 µs against 7.0 µs for a synchronous call of the same
//! export, median of three runs), against batches of milliseconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wasmtime::Store;

use super::bindings::Plugin;
use super::bindings::exports::embedhost::embedder::embedder::InputKind;
use super::boundary::{classify, validate};
use super::host::HostState;
use super::{InstanceLimits, InstantiateError, ModelInfo, WasmError, WasmPlugin, deadline_ticks};
use crate::backend::{CallError, Health as SupervisedHealth, SpawnError, Spawner, Started, Worker};
use crate::bus::BoxFuture;
use crate::limits;
use crate::vectors::Vectors;

/// Jobs queued for an instance's thread before callers wait. One instance
/// runs one call at a time; a short queue keeps it busy between calls.
const JOB_QUEUE: usize = 16;

/// A plugin's health report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// The instance's linear memories and tables, as the host counts them
    /// (the plugin's own figure is not trusted).
    pub memory_bytes: u64,
    /// Texts the plugin says it has embedded.
    pub processed: u64,
    /// Log lines of the instance dropped by the rate limit so far.
    pub dropped_log_lines: u64,
}

/// One live instance of a plugin: a `Store`, initialised.
///
/// Field order matters: the `Store` (whose WASI state may hold timers and
/// tasks of the runtime) is dropped before the runtime.
pub struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
    info: ModelInfo,
    limits: InstanceLimits,
    runtime: CallRuntime,
}

/// The runtime that drives an instance's async calls. Dropped without
/// waiting: a blocking file read of a cancelled call may still be running
/// on its blocking thread, and must not hold the instance's thread.
pub(crate) struct CallRuntime(Option<tokio::runtime::Runtime>);

impl CallRuntime {
    pub(crate) fn new() -> std::io::Result<Self> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("embedhost-wasm-io")
            .build()
            .map(|rt| CallRuntime(Some(rt)))
    }

    /// Runs `future` to its end or until `limit` passes, whichever is
    /// first; `Err` if the limit passed (the future is then dropped).
    pub(crate) fn run_for<F: Future>(
        &self,
        limit: Duration,
        future: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        match &self.0 {
            // The timer is made inside the runtime, which owns the clock.
            Some(rt) => rt.block_on(async move { tokio::time::timeout(limit, future).await }),
            None => unreachable!("the runtime is only taken on drop"),
        }
    }
}

impl Drop for CallRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Instance {
    /// Instantiates `plugin` in a fresh store and calls `init(config)`.
    ///
    /// # Errors
    /// [`WasmError::Instantiate`], a crash of `init` ([`WasmError::Trap`],
    /// [`WasmError::DeadlineExceeded`], [`WasmError::MemoryCap`]), or
    /// [`WasmError::Plugin`] when `init` refuses the configuration.
    pub fn start(
        plugin: &WasmPlugin,
        limits: InstanceLimits,
        config: &[(String, String)],
    ) -> Result<Self, WasmError> {
        let engine = plugin.engine().engine();
        let instantiate_error = |reason| WasmError::Instantiate {
            name: plugin.name().to_string(),
            reason,
        };
        let runtime =
            CallRuntime::new().map_err(|e| instantiate_error(InstantiateError::Runtime(e)))?;
        let state = HostState::new(
            plugin.shared_name(),
            limits.memory_bytes,
            plugin.model_dir().or(super::encoder::engine_reads(plugin)),
        )
        .map_err(|e| instantiate_error(e.into()))?;
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_trap();
        super::host::bound_hostcalls(&mut store);
        let deadline = limits.init_deadline;
        store.set_epoch_deadline(deadline_ticks(deadline));
        super::encoder::start_in(plugin, &mut store, &runtime, deadline)?;
        let pre = plugin.pre();
        let started = runtime.run_for(
            deadline.saturating_add(limits::HOST_CALL_GRACE),
            pre.instantiate_async(&mut store),
        );
        let bindings = match started {
            Ok(Ok(bindings)) => bindings,
            Ok(Err(e)) => {
                return Err(classify(&store, "instantiate", deadline, e, |reason| {
                    instantiate_error(InstantiateError::Refused(reason))
                }));
            }
            Err(_) => {
                return Err(WasmError::DeadlineExceeded {
                    call: "instantiate",
                    deadline,
                });
            }
        };
        let mut instance = Instance {
            store,
            plugin: bindings,
            info: ModelInfo {
                model_id: crate::backend::ModelId::default(),
                dimension: 0,
                max_input_tokens: 0,
                normalized: false,
            },
            limits,
            runtime,
        };
        let info = instance.call("init", limits.init_deadline, async |plugin, store| {
            plugin
                .embedhost_embedder_embedder()
                .call_init(store, config)
                .await
        })?;
        let info = info.map_err(|e| WasmError::Plugin {
            call: "init",
            error: e.into(),
        })?;
        instance.info = ModelInfo::try_from(info)?;
        Ok(instance)
    }

    /// What `init` reported.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// Embeds `texts`, validating the output.
    ///
    /// # Errors
    /// A crash ([`WasmError::is_crash`]: the instance must then be dropped),
    /// the plugin's error value, or [`WasmError::InvalidOutput`].
    pub fn embed(
        &mut self,
        texts: &[String],
        kind: InputKind,
        deadline: Option<Duration>,
    ) -> Result<Vectors, WasmError> {
        let deadline = deadline.map_or(self.limits.call_deadline, |d| {
            d.min(self.limits.call_deadline)
        });
        let deadline =
            crate::backend::work_deadline(deadline, self.limits.call_deadline_per_kib, texts);
        // What the result and the host calls may copy (`host::allow`).
        super::host::allow(self.store.data_mut(), texts, self.info.dimension);
        let result = self.call("embed", deadline, async |plugin, store| {
            plugin
                .embedhost_embedder_embedder()
                .call_embed(store, texts, kind)
                .await
        })?;
        let embeddings = result.map_err(|e| WasmError::Plugin {
            call: "embed",
            error: e.into(),
        })?;
        validate(
            &self.info,
            texts.len(),
            embeddings.dimension,
            embeddings.data,
        )
    }

    /// Calls `health`.
    ///
    /// # Errors
    /// A crash, as for [`Instance::embed`].
    pub fn health(&mut self, deadline: Option<Duration>) -> Result<Health, WasmError> {
        let deadline = self.deadline(deadline);
        super::host::allow(self.store.data_mut(), &[], 0);
        let report = self.call("health", deadline, async |plugin, store| {
            plugin
                .embedhost_embedder_embedder()
                .call_health(store)
                .await
        })?;
        let state = self.store.data();
        Ok(Health {
            memory_bytes: state.memory_bytes(),
            processed: report.processed,
            dropped_log_lines: state.dropped_log_lines(),
        })
    }

    /// A call's deadline: the caller's, but never past the configured one.
    fn deadline(&self, requested: Option<Duration>) -> Duration {
        requested.map_or(self.limits.call_deadline, |d| {
            d.min(self.limits.call_deadline)
        })
    }

    /// Runs one call into the plugin: guest code is interrupted at
    /// `deadline`, and a call still waiting in a host function at deadline +
    /// [`limits::HOST_CALL_GRACE`] is cancelled (see the module's docs).
    /// Either way the error is a crash, and the instance must be dropped.
    fn call<T>(
        &mut self,
        name: &'static str,
        deadline: Duration,
        f: impl AsyncFnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, WasmError> {
        self.store.set_epoch_deadline(deadline_ticks(deadline));
        let result = self.runtime.run_for(
            deadline.saturating_add(limits::HOST_CALL_GRACE),
            f(&self.plugin, &mut self.store),
        );
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(&self.store, name, deadline, e, |reason| {
                WasmError::Trap { call: name, reason }
            })),
            Err(_) => {
                tracing::debug!(
                    call = name,
                    ?deadline,
                    "call cancelled while waiting in a host function"
                );
                Err(WasmError::DeadlineExceeded {
                    call: name,
                    deadline,
                })
            }
        }
    }
}

enum Job {
    Embed {
        texts: Vec<String>,
        kind: InputKind,
        deadline: Option<Duration>,
        reply: oneshot::Sender<Result<Vectors, WasmError>>,
    },
    Health {
        deadline: Option<Duration>,
        reply: oneshot::Sender<Result<Health, WasmError>>,
    },
}

/// One incarnation of a plugin instance, on its own thread, for async
/// callers.
///
/// It lives until it crashes: after a trap, a deadline or the memory cap, the
/// thread drops the `Store` and ends, and every later call gets
/// [`WasmError::InstanceGone`]. Restarting is the supervisor's job
/// ([`WasmSpawner`]).
///
/// # Example
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use embedhost::wasm::{InstanceLimits, PluginSource, WasmEmbedder, WasmEngine, WasmPlugin};
///
/// let engine = WasmEngine::new(None).unwrap();
/// let plugin = WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap();
/// let config = vec![("dimension".to_string(), "8".to_string())];
/// let instance = WasmEmbedder::start(plugin, InstanceLimits::default(), config).await.unwrap();
/// assert_eq!(instance.model_info().dimension, 8);
/// let vectors = instance.embed(vec!["hello world".into()], false, None).await.unwrap();
/// assert_eq!(vectors.get(0).unwrap().len(), 8);
/// # }
/// ```
#[derive(Clone)]
pub struct WasmEmbedder {
    jobs: mpsc::Sender<Job>,
    info: Arc<ModelInfo>,
    name: Arc<str>,
    /// Cancelled when the instance's thread ends, however it ends: what
    /// wakes every caller still waiting on it (see [`WasmEmbedder::wait`]).
    ended: CancellationToken,
}

impl std::fmt::Debug for WasmEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEmbedder")
            .field("name", &self.name)
            .field("info", &self.info)
            .finish()
    }
}

impl WasmEmbedder {
    /// Starts an instance of `plugin` on a new thread and initialises it.
    ///
    /// # Errors
    /// The instance's start error (see [`Instance::start`]).
    pub async fn start(
        plugin: WasmPlugin,
        limits: InstanceLimits,
        config: Vec<(String, String)>,
    ) -> Result<Self, WasmError> {
        let name = plugin.shared_name();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let thread_name = name.clone();
        let ended = CancellationToken::new();
        let guard = ended.clone().drop_guard();
        std::thread::Builder::new()
            .name("embedhost-wasm".into())
            .spawn(move || {
                // Dropped last, after the store and the job queue, even if
                // `run` panics.
                let _ended = guard;
                run(plugin, limits, config, rx, ready_tx)
            })
            .map_err(|e| WasmError::Instantiate {
                name: thread_name.to_string(),
                reason: InstantiateError::Thread(e),
            })?;
        let gone = || WasmError::InstanceGone {
            name: name.to_string(),
        };
        let info = ready_rx.await.map_err(|_| gone())??;
        Ok(WasmEmbedder {
            jobs,
            info: Arc::new(info),
            name,
            ended,
        })
    }

    /// What the plugin's `init` reported.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// Embeds `texts` within `deadline` (never past the configured one).
    ///
    /// # Errors
    /// As [`Instance::embed`], or [`WasmError::InstanceGone`] after a crash.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Option<Duration>,
    ) -> Result<Vectors, WasmError> {
        let kind = if is_query {
            InputKind::Query
        } else {
            InputKind::Document
        };
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Embed {
            texts,
            kind,
            deadline,
            reply,
        })
        .await?;
        self.wait(answer).await
    }

    /// Calls the plugin's `health`.
    ///
    /// # Errors
    /// As [`Instance::health`], or [`WasmError::InstanceGone`].
    pub async fn health(&self, deadline: Option<Duration>) -> Result<Health, WasmError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Health { deadline, reply }).await?;
        self.wait(answer).await
    }

    async fn submit(&self, job: Job) -> Result<(), WasmError> {
        tokio::select! {
            sent = self.jobs.send(job) => sent.map_err(|_| self.gone()),
            () = self.ended.cancelled() => Err(self.gone()),
        }
    }

    /// The answer to a submitted job, or [`WasmError::InstanceGone`] once
    /// the thread has ended without giving one.
    ///
    /// Waiting on the answer alone lost a wakeup (finding 10 of issue 26): a
    /// job sent while the thread, after a crash, was dropping its queue can
    /// land in the queue after the queue was drained, and stays there, its
    /// reply never sent nor dropped, for as long as a sender lives (the
    /// caller's own handle). The thread's end is a signal of its own,
    /// raised after everything else it drops, so a caller is woken whatever
    /// became of its job. An answer already given wins (`biased`).
    async fn wait<T>(
        &self,
        answer: oneshot::Receiver<Result<T, WasmError>>,
    ) -> Result<T, WasmError> {
        tokio::select! {
            biased;
            answer = answer => answer.map_err(|_| self.gone())?,
            () = self.ended.cancelled() => Err(self.gone()),
        }
    }

    fn gone(&self) -> WasmError {
        WasmError::InstanceGone {
            name: self.name.to_string(),
        }
    }
}

fn run(
    plugin: WasmPlugin,
    limits: InstanceLimits,
    config: Vec<(String, String)>,
    mut jobs: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<ModelInfo, WasmError>>,
) {
    let mut instance = match Instance::start(&plugin, limits, &config) {
        Ok(instance) => {
            let _ = ready.send(Ok(instance.model_info().clone()));
            instance
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Some(job) = jobs.blocking_recv() {
        let crashed = match job {
            Job::Embed { reply, .. } if reply.is_closed() => false,
            Job::Health { reply, .. } if reply.is_closed() => false,
            Job::Embed {
                texts,
                kind,
                deadline,
                reply,
            } => {
                let result = instance.embed(&texts, kind, deadline);
                let crashed = result.as_ref().is_err_and(WasmError::is_crash);
                let _ = reply.send(result);
                crashed
            }
            Job::Health { deadline, reply } => {
                let result = instance.health(deadline);
                let crashed = result.as_ref().is_err_and(WasmError::is_crash);
                let _ = reply.send(result);
                crashed
            }
        };
        if crashed {
            // A trapped store must never be entered again: end the thread,
            // which drops it. Queued jobs see the channel close.
            tracing::debug!(
                plugin = plugin.name(),
                "instance crashed; its store is dropped"
            );
            return;
        }
    }
}

impl WasmError {
    /// The supervisor's view of this error.
    pub fn into_call_error(self) -> CallError {
        match self.failure_reason() {
            Some(reason) => CallError::Crash {
                reason,
                message: self.to_string(),
            },
            None => CallError::Refused(self.into()),
        }
    }
}

impl Worker for WasmEmbedder {
    fn embed(
        &mut self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> BoxFuture<Result<Vectors, CallError>> {
        let this = self.clone();
        Box::pin(async move {
            WasmEmbedder::embed(&this, texts, is_query, Some(deadline))
                .await
                .map_err(WasmError::into_call_error)
        })
    }

    fn health(&mut self, deadline: Duration) -> BoxFuture<Result<SupervisedHealth, CallError>> {
        let this = self.clone();
        Box::pin(async move {
            let h = WasmEmbedder::health(&this, Some(deadline))
                .await
                .map_err(WasmError::into_call_error)?;
            Ok(SupervisedHealth {
                memory_bytes: h.memory_bytes,
                processed: h.processed,
            })
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        // Dropping the last sender ends the thread after its current call;
        // then the thread drops its store (which reports the plugin's
        // dropped log lines and frees its memory). Waited for, within a
        // bound, so a stopped pool has let go of its instances and a
        // process that exits next loses none of their last lines.
        Box::pin(async move {
            let ended = self.ended.clone();
            drop(self);
            let _ = tokio::time::timeout(limits::INSTANCE_STOP_WAIT, ended.cancelled()).await;
        })
    }
}

/// Starts WASM instances of one plugin for the supervisor.
#[derive(Clone, Debug)]
pub struct WasmSpawner {
    /// The compiled plugin each incarnation instantiates.
    pub plugin: WasmPlugin,
    /// Each instance's memory cap and deadlines.
    pub limits: InstanceLimits,
    /// The table passed to each instance's `init`.
    pub config: Vec<(String, String)>,
}

impl Spawner for WasmSpawner {
    fn start(&self, slot: usize, incarnation: u64) -> BoxFuture<Started> {
        let this = self.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let embedder = WasmEmbedder::start(this.plugin, this.limits, this.config)
                .await
                .map_err(SpawnError::backend)?;
            tracing::debug!(slot, incarnation, elapsed = ?started.elapsed(), "wasm instance ready");
            let info = embedder.model_info().clone();
            Ok((Box::new(embedder) as Box<dyn Worker>, info))
        })
    }
}

#[cfg(test)]
#[path = "instance_tests.rs"]
mod tests;
