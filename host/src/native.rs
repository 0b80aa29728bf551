//! The native backend: embedder engines in child processes, speaking the bus
//! over CBOR frames on their stdin/stdout, supervised like WASM instances.
//!
//! The child is `embedhost child --engine NAME` (this very binary), so a
//! host and its children always come from one build.
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

use std::path::PathBuf;
use std::time::Duration;

use crate::bus::transport::child::ChildProcess;
use crate::bus::{BoxFuture, Bus, BusError, Empty, ErrorCode, SendOptions};
use crate::messages::{
    EmbedRequest, EmbedderEmbed, EmbedderHandshake, EmbedderHealth, PROTOCOL_VERSION, Shutdown,
    ShutdownRequest,
};
use crate::supervisor::{CallError, FailureReason, Health, Spawner, Started, Worker};
use crate::vectors::Vectors;

/// Starts native children for the supervisor.
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
    /// Grace period of each stop step.
    pub grace: Duration,
}

impl NativeSpawner {
    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.executable);
        command.arg("child").arg("--engine").arg(&self.engine);
        for (key, value) in &self.settings {
            command.arg("--set").arg(format!("{key}={value}"));
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Die with the host, even if the host is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
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
            let mut process = ChildProcess::spawn(this.command(), &name)
                .map_err(|e| format!("cannot start `{}`: {e}", this.executable.display()))?;
            let bus = Bus::new(process.connection());
            let options = SendOptions::default().timeout(this.init_deadline);
            let hello = match bus.send::<EmbedderHandshake>(Empty {}, options).await {
                Ok(hello) => hello,
                Err(e) => {
                    let status = process.wait_for_exit(Duration::from_millis(100)).await;
                    let how = status.map(|s| format!(" ({s})")).unwrap_or_default();
                    return Err(format!("{name} failed its handshake{how}: {e}"));
                }
            };
            if hello.protocol_version != PROTOCOL_VERSION {
                return Err(format!(
                    "{name} speaks protocol version {}, this host speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ));
            }
            tracing::debug!(pid = process.pid(), %name, "native child ready");
            let worker = NativeWorker {
                process,
                bus,
                grace: this.grace,
            };
            Ok((Box::new(worker) as Box<dyn Worker>, hello.model))
        })
    }
}

/// One native child.
pub struct NativeWorker {
    process: ChildProcess,
    bus: Bus,
    grace: Duration,
}

fn call_error(error: BusError) -> CallError {
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
        Box::pin(async move {
            let options = SendOptions::default().timeout(deadline);
            let response = bus
                .send::<EmbedderEmbed>(EmbedRequest { texts, is_query }, options)
                .await
                .map_err(call_error)?;
            Ok(response.vectors)
        })
    }

    fn health(&mut self, deadline: Duration) -> BoxFuture<Result<Health, CallError>> {
        let bus = self.bus.clone();
        let pid = self.process.pid();
        Box::pin(async move {
            let report = bus
                .send::<EmbedderHealth>(Empty {}, SendOptions::default().timeout(deadline))
                .await
                .map_err(call_error)?;
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

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let NativeWorker {
                mut process,
                bus,
                grace,
            } = *self;
            let request = ShutdownRequest {
                reason: "the host asked".into(),
            };
            let _ = bus
                .send::<Shutdown>(request, SendOptions::default().timeout(grace))
                .await;
            if process.wait_for_exit(grace).await.is_some() {
                return;
            }
            process.signal(libc::SIGTERM);
            if process.wait_for_exit(grace).await.is_some() {
                return;
            }
            tracing::warn!(
                pid = process.pid(),
                "child ignored shutdown and SIGTERM; killing it"
            );
            let _ = process.kill().await;
        })
    }
}
