//! The native backend: embedder engines in child processes, speaking the bus
//! over CBOR frames on their stdin/stdout, supervised like WASM instances.
//!
//! The child is `embedhost child --engine NAME` (this very binary), so a
//! host and its children always come from one build. [`child`] is its side
//! of the pipe; [`onnx`] its ONNX Runtime engine.
//!
//! # Invariants
//! - The first request is `embedder.handshake`; a child of another protocol
//!   version is refused (and killed) before it serves anything.
//! - A child never outlives the host: it is started with the parent-death
//!   signal set to SIGKILL, and killed when its worker is dropped.
//! - A child that exits, closes its pipe or writes anything but frames fails
//!   its requests at once (the transport closes), and is replaced.
//! - Stopping is graceful first: `shutdown`, then SIGTERM after the grace
//!   period, then SIGKILL, then the child is reaped.
//! - A child's memory has a ceiling the kernel enforces ([`ceiling`]),
//!   between health checks too; a child stopped there is a `memory_cap`
//!   restart.

pub mod ceiling;
pub mod child;
pub mod onnx;
mod onnx_errors;

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{CallError, FailureReason, Health, SpawnError, Spawner, Started, Worker};
use crate::bus::transport::child::{ChildProcess, MarkerWatch};
use crate::bus::{BoxFuture, Bus, BusError, Empty, ErrorCode, SendOptions};
use crate::messages::{
    EmbedRequest, EmbedderEmbed, EmbedderHandshake, EmbedderHealth, PROTOCOL_VERSION, Shutdown,
    ShutdownRequest,
};
use crate::vectors::Vectors;

/// Starts native children for the supervisor.
///
/// # Example
/// A pool of two `embedhost child` processes serving the stub engine (the
/// executable must be the `embedhost` binary; a config's `[native]`
/// section builds the same with [`crate::config::Config::native_spawner`]).
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use embedhost::native::NativeSpawner;
/// use embedhost::supervisor::{Supervisor, SupervisorConfig};
///
/// let spawner = NativeSpawner {
///     executable: "/usr/local/bin/embedhost".into(),
///     engine: "stub".into(),
///     settings: vec![("dimension".into(), "384".into())],
///     init_deadline: Duration::from_secs(60),
///     call_deadline: Duration::from_secs(30),
///     call_deadline_per_kib: Duration::from_secs(6),
///     grace: Duration::from_secs(5),
///     memory_ceiling: Some(2 << 30),
/// };
/// let config = SupervisorConfig { pool_size: 2, ..SupervisorConfig::default() };
/// let supervisor = Supervisor::start(spawner, config).await.unwrap();
/// let batch = supervisor.embed(vec!["hello".into()], false, Duration::from_secs(30)).await.unwrap();
/// assert_eq!(batch.vectors.dimension(), 384);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct NativeSpawner {
    /// The `embedhost` executable to run as the child.
    pub executable: PathBuf,
    /// The engine the child serves (`stub`).
    pub engine: String,
    /// The engine's settings (`key=value`), the same table a WASM plugin's
    /// `init` gets.
    pub settings: Vec<(String, String)>,
    /// Deadline of the handshake (start-up, model loading).
    pub init_deadline: Duration,
    /// Longest a single `embed` call with no work may take, whatever the
    /// request's deadline (as a WASM instance's call deadline).
    pub call_deadline: Duration,
    /// What each KiB of text adds to an `embed` call's deadline.
    pub call_deadline_per_kib: Duration,
    /// Grace period of each stop step.
    pub grace: Duration,
    /// The child's memory ceiling in bytes (`RLIMIT_DATA`, see [`ceiling`]);
    /// `None` for none.
    pub memory_ceiling: Option<u64>,
}

impl NativeSpawner {
    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.executable);
        command.arg("child").arg("--engine").arg(&self.engine);
        for (key, value) in &self.settings {
            command.arg("--set").arg(format!("{key}={value}"));
        }
        let ceiling = self.memory_ceiling;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Die with the host, even if the host is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(bytes) = ceiling {
                    ceiling::apply(bytes)?;
                }
                Ok(())
            });
        }
        command
    }
}

impl Spawner for NativeSpawner {
    fn start(&self, slot: usize, incarnation: u64) -> BoxFuture<Started> {
        let this = self.clone();
        Box::pin(async move {
            let name = format!("{}-child-{slot}.{incarnation}", this.engine);
            let mut process =
                ChildProcess::spawn_watching(this.command(), &name, Some(ceiling::CEILING_MARKER))
                    .map_err(|source| {
                        SpawnError::backend(ChildStartError::Spawn {
                            executable: this.executable.clone(),
                            source,
                        })
                    })?;
            let bus = Bus::new(process.connection());
            let options = SendOptions::default().timeout(this.init_deadline);
            let hello = match bus.send::<EmbedderHandshake>(Empty {}, options).await {
                Ok(hello) => hello,
                Err(source) => {
                    let status = process.wait_for_exit(Duration::from_millis(100)).await;
                    let error = ChildStartError::Handshake {
                        name,
                        status,
                        source,
                    };
                    return Err(SpawnError::backend(error));
                }
            };
            if hello.protocol_version != PROTOCOL_VERSION {
                return Err(SpawnError::backend(ChildStartError::Protocol {
                    name,
                    version: hello.protocol_version,
                }));
            }
            tracing::debug!(pid = process.pid(), %name, "native child ready");
            let worker = NativeWorker {
                ceiling: process.marker(),
                process,
                bus,
                grace: this.grace,
                call_deadline: this.call_deadline,
                call_deadline_per_kib: this.call_deadline_per_kib,
            };
            Ok((Box::new(worker) as Box<dyn Worker>, hello.model))
        })
    }
}

/// Why the host could not start a native child: the child's own reason,
/// if it gave one, is in its handshake's error.
#[derive(Debug, thiserror::Error)]
pub enum ChildStartError {
    /// The child process could not be spawned.
    #[error("cannot start `{}`: {source}", executable.display())]
    Spawn {
        /// The executable.
        executable: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The child did not answer its handshake (it may have exited).
    #[error("{name} failed its handshake{}: {source}", exited(*status))]
    Handshake {
        /// The child (engine, slot, incarnation).
        name: String,
        /// How it exited, if it did.
        status: Option<std::process::ExitStatus>,
        /// The bus's error.
        source: BusError,
    },
    /// The child speaks another protocol version than this host.
    #[error("{name} speaks protocol version {version}, this host speaks {PROTOCOL_VERSION}")]
    Protocol {
        /// The child.
        name: String,
        /// Its version.
        version: u32,
    },
}

/// How a child exited, if it did: ` (exit status: 3)`, or nothing.
fn exited(status: Option<std::process::ExitStatus>) -> String {
    status.map(|s| format!(" ({s})")).unwrap_or_default()
}

/// One native child.
pub struct NativeWorker {
    process: ChildProcess,
    ceiling: MarkerWatch,
    bus: Bus,
    grace: Duration,
    call_deadline: Duration,
    call_deadline_per_kib: Duration,
}

fn call_error(error: BusError) -> CallError {
    if error.never_sent() {
        // A request that could not be sent (over the frame limit, not
        // encodable, the pipe's queue full) says nothing about the child:
        // it is refused, and the child keeps serving.
        let code = if matches!(error, BusError::FrameTooLarge { .. }) {
            ErrorCode::FrameTooLarge
        } else {
            ErrorCode::Failed
        };
        return CallError::Refused(crate::bus::RemoteError::new(code, error.to_string()));
    }
    match error {
        BusError::Timeout { .. } | BusError::DeadlineExceeded { .. } => CallError::Crash {
            reason: FailureReason::Deadline,
            message: error.to_string(),
        },
        BusError::PeerGone { ref reason, .. } => CallError::Crash {
            reason: FailureReason::Exited(reason.clone()),
            message: error.to_string(),
        },
        BusError::Remote(remote) if remote.code == ErrorCode::Unavailable => CallError::Crash {
            reason: FailureReason::Trap(remote.message.clone()),
            message: remote.to_string(),
        },
        // The child gave up on the call, but its engine may still be running
        // (a native engine cannot be interrupted): only a restart stops it.
        BusError::Remote(remote) if remote.code == ErrorCode::DeadlineExceeded => {
            CallError::Crash {
                reason: FailureReason::Deadline,
                message: remote.to_string(),
            }
        }
        BusError::Remote(remote) => CallError::Refused(remote),
        other => CallError::Crash {
            reason: FailureReason::Exited(other.to_string()),
            message: other.to_string(),
        },
    }
}

/// `error` as the supervisor sees it; a child that died at its memory
/// ceiling (its marker on stderr) is a `memory_cap` crash.
async fn classify(error: BusError, mut ceiling: MarkerWatch) -> CallError {
    match call_error(error) {
        CallError::Crash {
            reason: FailureReason::Exited(_),
            message,
        } if ceiling.seen(crate::limits::CHILD_EXIT_REPORT_WAIT).await => CallError::Crash {
            reason: FailureReason::MemoryCap,
            message: format!("the child reached its memory ceiling ({message})"),
        },
        other => other,
    }
}

/// Resident set size of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = procfs::process::Process::new(pid as i32)
        .ok()?
        .statm()
        .ok()?;
    Some(statm.resident * procfs::page_size())
}

impl Worker for NativeWorker {
    fn embed(
        &mut self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> BoxFuture<Result<Vectors, CallError>> {
        let bus = self.bus.clone();
        let deadline = crate::backend::work_deadline(
            deadline.min(self.call_deadline),
            self.call_deadline_per_kib,
            &texts,
        );
        let ceiling = self.ceiling.clone();
        Box::pin(async move {
            let options = SendOptions::default().timeout(deadline);
            match bus
                .send::<EmbedderEmbed>(EmbedRequest { texts, is_query }, options)
                .await
            {
                Ok(response) => Ok(response.vectors),
                Err(e) => Err(classify(e, ceiling).await),
            }
        })
    }

    fn health(&mut self, deadline: Duration) -> BoxFuture<Result<Health, CallError>> {
        let bus = self.bus.clone();
        let pid = self.process.pid();
        let ceiling = self.ceiling.clone();
        Box::pin(async move {
            let report = match bus
                .send::<EmbedderHealth>(Empty {}, SendOptions::default().timeout(deadline))
                .await
            {
                Ok(report) => report,
                Err(e) => return Err(classify(e, ceiling).await),
            };
            let memory_bytes = resident_bytes(pid).unwrap_or(report.memory);
            Ok(Health {
                memory_bytes,
                processed: report.processed_count,
            })
        })
    }

    fn pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn health_during_calls(&self) -> bool {
        true
    }

    fn exited_normally(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            self.process
                .wait_for_exit(crate::limits::CHILD_EXIT_REPORT_WAIT)
                .await
                .is_some_and(|status| status.success())
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let NativeWorker {
                mut process,
                bus,
                grace,
                ..
            } = *self;
            // One grace period for the whole polite part: the request and
            // the exit it leads to.
            let until = tokio::time::Instant::now() + grace;
            let request = ShutdownRequest {
                reason: "the host asked".into(),
            };
            let _ = bus
                .send::<Shutdown>(request, SendOptions::default().timeout(grace))
                .await;
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if let Some(status) = process.wait_for_exit(left).await {
                tracing::debug!(pid = process.pid(), %status, "child stopped");
                return;
            }
            process.signal(libc::SIGTERM);
            if process
                .wait_for_exit(crate::limits::CHILD_SIGTERM_GRACE)
                .await
                .is_some()
            {
                return;
            }
            tracing::warn!(
                pid = process.pid(),
                "child ignored shutdown and SIGTERM; killing it"
            );
            if let Err(e) = process.kill().await {
                tracing::error!(pid = process.pid(), "{e}");
            }
        })
    }
}

/// The engines a child can serve.
pub const ENGINES: &[&str] = &["stub", "onnx"];

/// The body of `embedhost child`: serves `engine`, configured by
/// `settings`, on stdin/stdout until the host sends `shutdown` or closes the
/// pipe.
///
/// A setting or model the engine refuses does not end the process: the
/// handshake is answered with the reason, so the host can report it.
///
/// # Errors
/// [`ChildRunError`]: a failure of the transport itself.
pub async fn run_child(
    engine: &str,
    mut settings: Vec<(String, String)>,
) -> Result<(), ChildRunError> {
    ceiling::arm();
    let stop = CancellationToken::new();
    let router = match child::ProcessFaults::take_from(&mut settings) {
        Err(reason) => child::failed_router(StartError::from(reason).to_string(), stop.clone()),
        Ok(faults) => {
            if let Some(code) = faults.exit_at_start {
                tracing::warn!(code, "fault: exiting at start-up");
                std::process::exit(code);
            }
            if faults.ignore_sigterm {
                // SAFETY: installs the "ignore" disposition; no handler runs.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            }
            match load_engine(engine, &settings) {
                Ok(engine) => child::engine_router(engine, faults, stop.clone()),
                Err(reason) => {
                    tracing::error!(%reason, "the engine cannot start");
                    child::failed_router(reason.to_string(), stop.clone())
                }
            }
        }
    };
    tokio::select! {
        served = crate::bus::transport::child::serve_stdio(router, crate::limits::MAX_FRAME_BYTES) => {
            served.map_err(ChildRunError::Transport)
        }
        () = stop.cancelled() => {
            // Let the reply to `shutdown` reach the pipe before exiting.
            tokio::time::sleep(crate::limits::CHILD_SHUTDOWN_FLUSH).await;
            Ok(())
        }
    }
}

/// Why a native child ended in error (its engine's own failures are
/// answered on the bus instead).
#[derive(Debug, thiserror::Error)]
pub enum ChildRunError {
    /// Its frame transport over stdin and stdout failed.
    #[error("child transport: {0}")]
    Transport(#[source] crate::bus::transport::child::FrameError),
}

/// Why a child's engine could not start: the reason its handshake answers
/// with, naming the setting, file or engine at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A `child.*` setting the child cannot accept.
    #[error(transparent)]
    Faults(#[from] child::FaultSettingError),
    /// A setting the stub engine cannot accept.
    #[error(transparent)]
    Stub(#[from] embedhost_stub_engine::ConfigError),
    /// A setting the onnx engine cannot accept.
    #[error(transparent)]
    OnnxSettings(#[from] onnx::OnnxSettingError),
    /// The onnx engine could not load ONNX Runtime or the model.
    #[error(transparent)]
    OnnxLoad(#[from] onnx::OnnxLoadError),
    /// An engine this child does not have.
    #[error("unknown engine `{0}` (known: {known})", known = ENGINES.join(", "))]
    UnknownEngine(String),
}

fn load_engine(
    engine: &str,
    settings: &[(String, String)],
) -> Result<Box<dyn child::Engine>, StartError> {
    match engine {
        "stub" => Ok(Box::new(child::StubEngine::new(settings)?)),
        "onnx" => {
            let settings = onnx::OnnxSettings::from_pairs(settings)?;
            tracing::info!(library = %settings.library.display(), model = %settings.model_dir.display(), threads = settings.threads, "loading the onnx engine");
            Ok(Box::new(onnx::OnnxEngine::load(&settings)?))
        }
        other => Err(StartError::UnknownEngine(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::RemoteError;

    #[test]
    fn a_request_never_sent_is_refused_and_a_broken_answer_is_a_crash() {
        let overloaded = BusError::Overloaded {
            peer: "onnx-child-0.1".into(),
            limit: 4,
        };
        assert!(
            matches!(call_error(overloaded), CallError::Refused(r) if r.code == ErrorCode::Failed && r.message.contains("overloaded")),
        );
        let refused = RemoteError::invalid_input(2, "empty text");
        assert!(
            matches!(call_error(BusError::Remote(refused.clone())), CallError::Refused(r) if r == refused),
        );
        let garbled = BusError::Decode {
            what: "embedder.embed".into(),
            reason: crate::bus::CodecProblem::WrongType("not CBOR"),
        };
        assert!(matches!(
            call_error(garbled),
            CallError::Crash { reason: FailureReason::Exited(why), .. } if why.contains("not CBOR")
        ));
    }

    #[test]
    fn an_unknown_engine_is_named_with_the_known_ones() {
        let err = load_engine("tensorflow", &[]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "unknown engine `tensorflow` (known: stub, onnx)"
        );
    }
}
