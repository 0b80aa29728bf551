//! The child side of the native backend: `embedhost child`, an [`Engine`]
//! served over CBOR frames on stdin/stdout.
//!
//! # Invariants
//! - Nothing but frames is ever written to stdout (logs go to stderr, which
//!   the host forwards to its tracing) — except by the `child.garbage_marker`
//!   and `child.oversized_marker` faults, whose whole point is to break that.
//! - The engine runs on a blocking thread, one batch at a time: the frame
//!   loop stays free to answer `embedder.health` and `shutdown` while a batch
//!   is computed, so only a truly hung process misses its health check.
//! - A start-up failure (a bad setting, a missing model or library) is still
//!   answered: the handshake fails with the reason, so the host reports what
//!   went wrong instead of a bare exit status.
//!
//! # Process faults
//! The failures a process can have and a WASM instance cannot, for tests.
//! They are `child.*` settings, honoured whatever the engine:
//!
//! | key | effect |
//! |---|---|
//! | `child.exit_at_start = CODE` | exit with `CODE` before the handshake |
//! | `child.abort_marker = M` | abort (SIGABRT) on a text containing `M` |
//! | `child.exit_marker = M` | exit with `child.exit_code` (default 3) on a text containing `M` |
//! | `child.hang_marker = M` | stop answering anything, forever, on a text containing `M` |
//! | `child.ignore_sigterm = true` | ignore SIGTERM (with a hang: a child that ignores everything) |
//! | `child.leak_mb_per_call = N` | keep `N` MiB more resident memory after every embed |
//! | `child.garbage_marker = M` | write bytes that are not a frame to stdout |
//! | `child.oversized_marker = M` | write a frame header announcing more than the frame limit |
//! | `child.protocol_version = N` | claim protocol version `N` in the handshake |
//! | `child.chaos = P` | on each embed, with probability `P`, one of `child.chaos_kinds` |
//! | `child.chaos_seed = S` | seeds `child.chaos`'s dice (replayable faults) |
//! | `child.chaos_kinds = K,...` | what chaos does: `kill` (SIGKILL itself), `abort`, `exit`, `hang`, `leak` (keep 64 MiB); default all |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::backend::ModelInfo;
use crate::bus::{Empty, ErrorCode, RemoteError, Router};
use crate::messages::{
    EmbedRequest, EmbedResponse, EmbedderEmbed, EmbedderHandshake, EmbedderHealth,
    HandshakeResponse, HealthResponse, ModelCheck, ModelCheckResponse, PROTOCOL_VERSION, Shutdown,
};
use crate::vectors::Vectors;

/// Exit code of `child.exit_marker` when `child.exit_code` is not set.
pub const DEFAULT_FAULT_EXIT_CODE: i32 = 3;

/// Why an engine refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// One input cannot be embedded; the rest of the batch can.
    #[error("input {index}: {message}")]
    /// One input cannot be embedded; the rest can.
    InvalidInput { index: u32, message: String },
    /// The batch failed as a whole.
    #[error("{0}")]
    Failed(String),
}

impl From<EngineError> for RemoteError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidInput { index, message } => {
                RemoteError::invalid_input(index, message)
            }
            EngineError::Failed(message) => RemoteError::new(ErrorCode::Failed, message),
        }
    }
}

/// A `child.*` setting (a process fault) the child cannot accept, naming
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum FaultSettingError {
    /// A value that is not a whole number.
    #[error("setting `{key}`: `{value}` is not a whole number: {source}")]
    NotWhole {
        key: String,
        value: String,
        source: std::num::ParseIntError,
    },
    /// A value that is not `true` or `false`.
    #[error("setting `{key}`: `{value}` is not true or false: {source}")]
    NotBool {
        key: String,
        value: String,
        source: std::str::ParseBoolError,
    },
    /// A value that is not a probability.
    #[error("setting `{key}`: {reason}")]
    Chance {
        key: String,
        reason: embedhost_stub_engine::NotAChance,
    },
    /// A chaos kind the child does not know.
    #[error("setting `{key}`: `{kind}` is not one of kill, abort, exit, hang, leak")]
    ChaosKind { key: String, kind: String },
    /// A `child.*` key the child does not know.
    #[error(
        "unknown setting `{0}` (the child's process faults are exit_at_start, abort_marker, exit_marker, exit_code, hang_marker, ignore_sigterm, leak_mb_per_call, garbage_marker, oversized_marker, protocol_version, chaos, chaos_kinds, chaos_seed)"
    )]
    Unknown(String),
}

/// An embedding engine inside a child process. Calls are serialized and run
/// on a blocking thread.
pub trait Engine: Send + 'static {
    /// What the engine serves.
    fn model_info(&self) -> ModelInfo;
    /// Embeds a batch: one row per text, in order.
    ///
    /// # Errors
    /// [`EngineError`] for a refused input or a failed batch.
    fn embed(&mut self, texts: &[String], is_query: bool) -> Result<Vectors, EngineError>;
}

/// The stub engine, from the crate the stub WASM plugin wraps: the same
/// vectors and the same in-engine faults on both backends.
pub struct StubEngine(embedhost_stub_engine::StubEngine);

impl StubEngine {
    /// A stub engine from its settings table.
    ///
    /// # Errors
    /// The stub's [`embedhost_stub_engine::ConfigError`]: an unknown key or
    /// a bad value, naming the key.
    pub fn new(settings: &[(String, String)]) -> Result<Self, embedhost_stub_engine::ConfigError> {
        let config = embedhost_stub_engine::StubConfig::from_pairs(
            settings.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )?;
        Ok(StubEngine(embedhost_stub_engine::StubEngine::new(config)))
    }
}

impl Engine for StubEngine {
    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            model_id: crate::backend::ModelId::new(embedhost_stub_engine::MODEL_ID)
                .expect("the stub engine's model id is printable"),
            dimension: self.0.dimension() as u32,
            max_input_tokens: embedhost_stub_engine::MAX_INPUT_TOKENS,
            normalized: true,
        }
    }

    fn embed(&mut self, texts: &[String], _is_query: bool) -> Result<Vectors, EngineError> {
        let data = self.0.embed(texts);
        Vectors::new(self.0.dimension(), data).map_err(|e| EngineError::Failed(e.to_string()))
    }
}

/// The process faults of the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFaults {
    /// `child.exit_at_start`.
    pub exit_at_start: Option<i32>,
    /// `child.abort_marker`.
    pub abort_marker: Option<String>,
    /// `child.exit_marker`.
    pub exit_marker: Option<String>,
    /// `child.exit_code`.
    pub exit_code: i32,
    /// `child.hang_marker`.
    pub hang_marker: Option<String>,
    /// `child.ignore_sigterm`.
    pub ignore_sigterm: bool,
    /// `child.leak_mb_per_call`.
    pub leak_mb_per_call: usize,
    /// `child.garbage_marker`.
    pub garbage_marker: Option<String>,
    /// `child.oversized_marker`.
    pub oversized_marker: Option<String>,
    /// `child.protocol_version`.
    pub protocol_version: Option<u32>,
    /// Embeds per million that suffer a random process fault.
    pub chaos_ppm: u32,
    /// `child.chaos_kinds`.
    pub chaos_kinds: Vec<ProcessChaos>,
    /// `child.chaos_seed`: the same seed gives the same faults at the same
    /// embeds of the process; none draws from the platform's randomness.
    pub chaos_seed: Option<u64>,
}

/// Embeds this process has rolled the chaos dice for (one engine a
/// process), the index of a seeded roll.
static CHAOS_ROLLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A process fault `child.chaos` can pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessChaos {
    /// SIGKILL to itself: what the OOM killer or an operator does.
    Kill,
    /// SIGABRT.
    Abort,
    /// Exit with `child.exit_code`.
    Exit,
    /// Stop answering anything.
    Hang,
    /// Keep [`CHAOS_LEAK_MB`] MiB more resident memory.
    Leak,
}

impl ProcessChaos {
    const ALL: [ProcessChaos; 5] = [
        ProcessChaos::Kill,
        ProcessChaos::Abort,
        ProcessChaos::Exit,
        ProcessChaos::Hang,
        ProcessChaos::Leak,
    ];
}

/// What one `leak` of `child.chaos` keeps: large enough that a few cross a
/// recycle threshold set for a stub child (tens of MiB resident).
pub const CHAOS_LEAK_MB: usize = 64;

/// The chaos kinds `value` (of `key`) lists, comma-separated.
fn chaos_kinds(key: &str, value: &str) -> Result<Vec<ProcessChaos>, FaultSettingError> {
    value
        .split(',')
        .map(|k| match k.trim() {
            "kill" => Ok(ProcessChaos::Kill),
            "abort" => Ok(ProcessChaos::Abort),
            "exit" => Ok(ProcessChaos::Exit),
            "hang" => Ok(ProcessChaos::Hang),
            "leak" => Ok(ProcessChaos::Leak),
            other => Err(FaultSettingError::ChaosKind {
                key: key.to_string(),
                kind: other.to_string(),
            }),
        })
        .collect()
}

impl ProcessFaults {
    /// Takes the `child.*` keys out of `settings`, leaving the engine's.
    ///
    /// # Errors
    /// [`FaultSettingError`]: an unknown `child.*` key or a value that does
    /// not parse, naming it.
    pub fn take_from(settings: &mut Vec<(String, String)>) -> Result<Self, FaultSettingError> {
        let mut faults = ProcessFaults {
            exit_code: DEFAULT_FAULT_EXIT_CODE,
            ..ProcessFaults::default()
        };
        let mut rest = Vec::new();
        for (key, value) in settings.drain(..) {
            let Some(name) = key.strip_prefix("child.") else {
                rest.push((key, value));
                continue;
            };
            let number = |v: &str| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|source| FaultSettingError::NotWhole {
                        key: key.clone(),
                        value: v.to_string(),
                        source,
                    })
            };
            let marker = Some(value.clone());
            match name {
                "exit_at_start" => faults.exit_at_start = Some(number(&value)? as i32),
                "abort_marker" => faults.abort_marker = marker,
                "exit_marker" => faults.exit_marker = marker,
                "exit_code" => faults.exit_code = number(&value)? as i32,
                "hang_marker" => faults.hang_marker = marker,
                "ignore_sigterm" => {
                    faults.ignore_sigterm = value.trim().parse::<bool>().map_err(|source| {
                        FaultSettingError::NotBool {
                            key: key.clone(),
                            value: value.clone(),
                            source,
                        }
                    })?;
                }
                "leak_mb_per_call" => faults.leak_mb_per_call = number(&value)?.max(0) as usize,
                "garbage_marker" => faults.garbage_marker = marker,
                "oversized_marker" => faults.oversized_marker = marker,
                "protocol_version" => faults.protocol_version = Some(number(&value)? as u32),
                "chaos_seed" => {
                    faults.chaos_seed = Some(value.trim().parse::<u64>().map_err(|source| {
                        FaultSettingError::NotWhole {
                            key: key.clone(),
                            value: value.clone(),
                            source,
                        }
                    })?);
                }
                "chaos" => {
                    faults.chaos_ppm =
                        embedhost_stub_engine::parse_chance(&value).map_err(|reason| {
                            FaultSettingError::Chance {
                                key: key.clone(),
                                reason,
                            }
                        })?;
                }
                "chaos_kinds" => faults.chaos_kinds = chaos_kinds(&key, &value)?,
                _ => return Err(FaultSettingError::Unknown(key)),
            }
        }
        *settings = rest;
        if faults.chaos_kinds.is_empty() {
            faults.chaos_kinds = ProcessChaos::ALL.to_vec();
        }
        Ok(faults)
    }

    /// The random fault this embed suffers, if any.
    fn chaos(&self) -> Option<ProcessChaos> {
        if self.chaos_ppm == 0 || self.chaos_kinds.is_empty() {
            return None;
        }
        let roll = match self.chaos_seed {
            Some(seed) => {
                let n = CHAOS_ROLLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                embedhost_stub_engine::seeded_roll(seed, n)
            }
            None => fastrand::u64(..),
        };
        ((roll % 1_000_000) < u64::from(self.chaos_ppm))
            .then(|| self.chaos_kinds[((roll >> 32) % self.chaos_kinds.len() as u64) as usize])
    }

    fn hit(marker: &Option<String>, texts: &[String]) -> bool {
        marker
            .as_deref()
            .is_some_and(|m| texts.iter().any(|t| t.contains(m)))
    }

    /// Carries out the faults a batch triggers, before the engine sees it.
    fn before_embed(&self, texts: &[String], leaked: &Mutex<Vec<Vec<u8>>>) {
        let chaos = self.chaos();
        if chaos == Some(ProcessChaos::Kill) {
            tracing::warn!("fault: chaos, SIGKILL");
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        if chaos == Some(ProcessChaos::Leak) {
            leak(leaked, CHAOS_LEAK_MB);
        }
        if Self::hit(&self.abort_marker, texts) || chaos == Some(ProcessChaos::Abort) {
            tracing::warn!("fault: aborting");
            std::process::abort();
        }
        if Self::hit(&self.exit_marker, texts) || chaos == Some(ProcessChaos::Exit) {
            tracing::warn!(code = self.exit_code, "fault: exiting");
            std::process::exit(self.exit_code);
        }
        if Self::hit(&self.garbage_marker, texts) {
            tracing::warn!("fault: writing garbage to stdout");
            write_stdout(b"this is not a frame\n\0\xff\xfe garbage garbage garbage");
        }
        if Self::hit(&self.oversized_marker, texts) {
            tracing::warn!("fault: announcing an oversized frame");
            // A length prefix past any frame limit (the host's codec reads a
            // big-endian u32 length first).
            write_stdout(&u32::MAX.to_be_bytes());
        }
        if Self::hit(&self.hang_marker, texts) || chaos == Some(ProcessChaos::Hang) {
            tracing::warn!("fault: hanging");
            // Blocks the child's only runtime thread: no frame, no health
            // answer, nothing, until the host kills the process.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if self.leak_mb_per_call > 0 {
            leak(leaked, self.leak_mb_per_call);
        }
    }
}

/// Keeps `mb` MiB more resident: every page is touched, so the memory is
/// resident, not just reserved.
fn leak(leaked: &Mutex<Vec<Vec<u8>>>, mb: usize) {
    let block = vec![1u8; mb * 1024 * 1024];
    leaked.lock().unwrap_or_else(|p| p.into_inner()).push(block);
}

/// Writes straight to file descriptor 1, past the frame writer.
fn write_stdout(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to a file descriptor we own.
    let _ = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
}

/// The router of a child serving `engine`; `stop` is cancelled when the host
/// asks the child to shut down.
pub fn engine_router(
    engine: Box<dyn Engine>,
    faults: ProcessFaults,
    stop: CancellationToken,
) -> Router {
    let model = engine.model_info();
    let protocol_version = faults.protocol_version.unwrap_or(PROTOCOL_VERSION);
    let engine = Arc::new(Mutex::new(engine));
    // Outside the engine's lock, so a health check never waits for an embed.
    let processed = Arc::new(AtomicU64::new(0));
    let leaked = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(faults);
    let mut router = Router::new();
    let for_embed = processed.clone();
    router.handle::<EmbedderEmbed, _, _>(move |_, request: EmbedRequest| {
        let engine = engine.clone();
        let processed = for_embed.clone();
        let faults = faults.clone();
        let leaked = leaked.clone();
        async move {
            // Faults run on the frame loop's thread: a hang must stop it.
            faults.before_embed(&request.texts, &leaked);
            // CPU-bound (and, with faults, possibly endless): off the runtime,
            // so frames, cancellations and health checks keep flowing.
            let embedded = tokio::task::spawn_blocking(move || {
                let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
                let result = engine.embed(&request.texts, request.is_query);
                processed.fetch_add(request.texts.len() as u64, Ordering::Relaxed);
                result
            })
            .await;
            let vectors = embedded.map_err(|e| {
                RemoteError::new(ErrorCode::Unavailable, format!("the engine crashed: {e}"))
            })??;
            Ok(EmbedResponse::complete(vectors))
        }
    });
    router.handle::<EmbedderHealth, _, _>(move |_, _: Empty| {
        let processed = processed.load(Ordering::Relaxed);
        async move {
            Ok(HealthResponse {
                // The host reads the resident set itself, from /proc.
                memory: 0,
                processed_count: processed,
            })
        }
    });
    router.handle::<EmbedderHandshake, _, _>(move |_, _: Empty| {
        let model = model.clone();
        async move {
            Ok(HandshakeResponse {
                protocol_version,
                model,
            })
        }
    });
    // The engine loaded its model: its files are there.
    router.handle::<ModelCheck, _, _>(move |_, _: Empty| async move {
        Ok(ModelCheckResponse {
            exists: true,
            path: None,
        })
    });
    add_shutdown(&mut router, stop);
    router
}

/// The router of a child whose engine could not start: every request,
/// the handshake first, fails with `reason`.
pub fn failed_router(reason: String, stop: CancellationToken) -> Router {
    let mut router = Router::new();
    router.handle::<EmbedderHandshake, _, _>(move |_, _: Empty| {
        let reason = reason.clone();
        async move { Err::<HandshakeResponse, _>(RemoteError::new(ErrorCode::Failed, reason)) }
    });
    add_shutdown(&mut router, stop);
    router
}

fn add_shutdown(router: &mut Router, stop: CancellationToken) {
    router.handle::<Shutdown, _, _>(move |_, request| {
        let stop = stop.clone();
        async move {
            tracing::info!(reason = %request.reason, "shutdown requested");
            stop.cancel();
            Ok(Empty {})
        }
    });
}

#[cfg(test)]
#[path = "child_tests.rs"]
mod tests;
