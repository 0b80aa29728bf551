//! What every backend shares, and what the supervisor needs of one: the
//! model a backend serves ([`ModelInfo`]), how a call fails ([`CallError`],
//! [`FailureReason`]), and the two traits a backend implements
//! ([`Spawner`] starts a [`Worker`], or says why not: [`SpawnError`]).
//!
//! # Invariant
//! This module depends on nothing of the host but the bus's `BoxFuture`
//! and the leaf modules `limits` and `untrusted`:
//! `supervisor`, `wasm` and `native` all depend on it, and none of them on
//! another, so no import circle runs between them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bus::{BoxFuture, RemoteError};
use crate::vectors::Vectors;

/// The deadline of one `embed` call over `texts`: the configured call
/// deadline for a call with no work, plus `per_kib` (by default
/// [`crate::limits::CALL_DEADLINE_PER_KIB`]) per KiB of text. A model's time grows
/// with its input, so a fixed deadline that fits a large batch on a fast
/// machine kills a healthy instance on a slow one (the rule and its
/// numbers are in `limits.rs`).
pub fn work_deadline(
    base: std::time::Duration,
    per_kib: std::time::Duration,
    texts: &[String],
) -> std::time::Duration {
    // Integer arithmetic that saturates, capped: no setting and no batch
    // can overflow it (`mul_f64` panicked on a huge `per_kib`).
    let bytes: u128 = texts.iter().map(|t| t.len() as u128).sum();
    let extra = per_kib.as_nanos().saturating_mul(bytes) / 1024;
    let extra = std::time::Duration::from_nanos(u64::try_from(extra).unwrap_or(u64::MAX));
    base.saturating_add(extra)
        .min(crate::limits::MAX_WORK_DEADLINE.max(base))
}

/// The model information a plugin reports from `init`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// Stable id of the model and weights; an index records it.
    pub model_id: ModelId,
    /// Length of every vector.
    pub dimension: u32,
    /// Longer inputs are truncated by the plugin.
    pub max_input_tokens: u32,
    /// Whether every vector has unit L2 norm.
    pub normalized: bool,
}

// --- sandbox, second round (issue 26) ---

/// A model id as a backend declares it: at most
/// [`crate::limits::MAX_MODEL_ID_BYTES`], and free of every character that
/// could act on a terminal or a log rather than be printed (controls such
/// as ESC and BEL, line and paragraph breaks, bidi overrides and marks: the
/// characters [`crate::untrusted::sanitize`] escapes). The only way to get
/// one is [`ModelId::new`] (or deserializing, which calls it), so a model
/// id is safe to print wherever it goes: `plugin check`, `status`, `stats`,
/// the index, HTTP answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelId(String);

/// Why a model id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelIdError {
    /// Longer than [`crate::limits::MAX_MODEL_ID_BYTES`].
    #[error("the model id is {len} bytes; the limit is {limit} (limits::MAX_MODEL_ID_BYTES)")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        limit: usize,
    },
    /// It holds a control, line-breaking or bidi character.
    #[error(
        "the model id holds {escaped} at byte {at}: control, line-breaking and bidi characters are refused (`{shown}`)"
    )]
    Unprintable {
        /// The character, escaped.
        escaped: String,
        /// Its byte offset.
        at: usize,
        /// The id, escaped and cut.
        shown: String,
    },
}

impl ModelId {
    /// `id`, if it is printable as is.
    ///
    /// # Errors
    /// [`ModelIdError`] naming the bound or the character.
    pub fn new(id: impl Into<String>) -> Result<Self, ModelIdError> {
        let id = id.into();
        let limit = crate::limits::MAX_MODEL_ID_BYTES;
        if id.len() > limit {
            return Err(ModelIdError::TooLong {
                len: id.len(),
                limit,
            });
        }
        if let Some((at, c)) = id.char_indices().find(|&(_, c)| crate::untrusted::hides(c)) {
            return Err(ModelIdError::Unprintable {
                escaped: c.escape_default().to_string(),
                at,
                shown: crate::untrusted::sanitize(&id, 80),
            });
        }
        Ok(ModelId(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelId {
    type Error = ModelIdError;
    fn try_from(id: String) -> Result<Self, ModelIdError> {
        ModelId::new(id)
    }
}

impl From<ModelId> for String {
    fn from(id: ModelId) -> String {
        id.0
    }
}

impl std::ops::Deref for ModelId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ModelId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ModelId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ModelId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for ModelId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

/// Why a backend's [`ModelInfo`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelInfoError {
    /// The model id.
    #[error(transparent)]
    ModelId(#[from] ModelIdError),
    /// A dimension of 0.
    #[error("`init` declared dimension 0")]
    ZeroDimension,
    /// A dimension past [`crate::limits::MAX_DIMENSION`].
    #[error("`init` declared dimension {dimension}; the limit is {limit} (limits::MAX_DIMENSION)")]
    DimensionTooLarge {
        /// What was declared.
        dimension: u32,
        /// The bound.
        limit: u32,
    },
}

impl ModelInfo {
    /// Checks the dimension against its bounds (the id checks itself).
    ///
    /// # Errors
    /// [`ModelInfoError`].
    pub fn check_dimension(&self) -> Result<(), ModelInfoError> {
        match self.dimension {
            0 => Err(ModelInfoError::ZeroDimension),
            d if d > crate::limits::MAX_DIMENSION => Err(ModelInfoError::DimensionTooLarge {
                dimension: d,
                limit: crate::limits::MAX_DIMENSION,
            }),
            _ => Ok(()),
        }
    }
}

/// Why an instance stopped, as recorded in logs and in `restarts_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FailureReason {
    /// The instance trapped (with the trap's kind).
    Trap(String),
    /// A call ran past its deadline.
    Deadline,
    /// The instance hit its memory cap.
    MemoryCap,
    /// Starting or initialising the instance failed.
    InitFailed,
    /// The health check failed.
    HealthFailed,
    /// The health check got no answer in time.
    HealthTimeout,
    /// The instance is gone (its thread or process ended).
    Exited(String),
    /// A planned recycle after a health threshold (not a failure).
    Recycle(String),
}

impl FailureReason {
    /// The `reason` label: stable, low-cardinality.
    pub fn label(&self) -> &'static str {
        match self {
            FailureReason::Trap(_) => "trap",
            FailureReason::Deadline => "deadline",
            FailureReason::MemoryCap => "memory_cap",
            FailureReason::InitFailed => "init_failed",
            FailureReason::HealthFailed => "health_failed",
            FailureReason::HealthTimeout => "health_timeout",
            FailureReason::Exited(_) => "exited",
            FailureReason::Recycle(_) => "recycle",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Trap(kind) => write!(f, "trap ({kind})"),
            FailureReason::Exited(how) => write!(f, "exited ({how})"),
            FailureReason::Recycle(why) => write!(f, "recycle ({why})"),
            other => f.write_str(other.label()),
        }
    }
}

/// Why a call on a worker failed.
#[derive(Clone, Debug)]
pub enum CallError {
    /// The instance crashed and must be discarded.
    Crash {
        /// Why, as recorded in `restarts_total`.
        reason: FailureReason,
        /// The error, for the log.
        message: String,
    },
    /// The instance refused the call but is fine.
    Refused(RemoteError),
}

/// What a health check reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Memory in use (linear memory, or a process's resident set), bytes.
    pub memory_bytes: u64,
    /// Texts processed since the instance started.
    pub processed: u64,
}

/// One incarnation of a supervised embedder.
pub trait Worker: Send + 'static {
    /// Embeds a batch.
    fn embed(
        &mut self,
        texts: Vec<String>,
        is_query: bool,
        deadline: Duration,
    ) -> BoxFuture<Result<Vectors, CallError>>;
    /// Reports health.
    fn health(&mut self, deadline: Duration) -> BoxFuture<Result<Health, CallError>>;
    /// Stops gracefully (the host asked; not a failure).
    fn stop(self: Box<Self>) -> BoxFuture<()>;
    /// The process id, for a worker that is a process of its own.
    fn pid(&self) -> Option<u32> {
        None
    }
    /// Whether `health` is answered while a call runs. A child process
    /// answers health on its frame loop while its engine computes, so the
    /// supervisor keeps checking it during long calls and a hung process is
    /// found by the health deadline; a WASM instance runs one call at a time
    /// and relies on its epoch deadline instead.
    fn health_during_calls(&self) -> bool {
        false
    }
    /// After a call failed with [`FailureReason::Exited`]: whether the
    /// worker ended normally (a child process that exited with status 0 on
    /// its own), which OTP's `transient` restart type does not restart.
    /// Only a process can; the default is no.
    fn exited_normally(&mut self) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async { false })
    }
}

/// A started worker and what its model reported, or why it failed to start.
pub type Started = Result<(Box<dyn Worker>, ModelInfo), SpawnError>;

/// Why an incarnation could not be started (or was refused once started).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The backend could not start or initialise the instance: its own
    /// typed error (a `WasmError`, a native child's start error), held as
    /// an error only, since this layer does not know the backends.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The instance started but serves another model than the pool: its
    /// vectors would mix two spaces in one index.
    #[error("the new instance reports model {reported:?}, but the pool serves {serving:?}")]
    OtherModel {
        /// What the new instance reported.
        reported: Box<ModelInfo>,
        /// What the pool serves.
        serving: Box<ModelInfo>,
    },
}

impl SpawnError {
    /// A backend's own error.
    pub fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        SpawnError::Backend(Box::new(error))
    }
}

/// Starts incarnations.
pub trait Spawner: Send + Sync + 'static {
    /// Starts and initialises incarnation `incarnation` of slot `slot`.
    fn start(&self, slot: usize, incarnation: u64) -> BoxFuture<Started>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_deadline_saturates_and_is_capped_whatever_its_inputs() {
        let huge = vec!["x".repeat(1 << 20); 8];
        // `mul_f64` panicked here before ("overflow when multiplying").
        let d = work_deadline(Duration::from_secs(30), Duration::MAX, &huge);
        assert_eq!(d, crate::limits::MAX_WORK_DEADLINE);
        let d = work_deadline(Duration::MAX, Duration::MAX, &huge);
        assert_eq!(d, Duration::MAX);
        // An ordinary batch keeps its allowance.
        let d = work_deadline(
            Duration::from_secs(30),
            Duration::from_secs(6),
            &["y".repeat(2048)],
        );
        assert_eq!(d, Duration::from_secs(42));
    }

    #[test]
    fn a_model_id_is_checked_when_deserialized_too() {
        let ok: ModelId = serde_json::from_str("\"org/model\"").unwrap();
        assert_eq!(ok, "org/model");
        assert!(serde_json::from_str::<ModelId>("\"a\\u001b[2Jb\"").is_err());
        assert!(ModelId::new("m".repeat(crate::limits::MAX_MODEL_ID_BYTES + 1)).is_err());
    }
}
