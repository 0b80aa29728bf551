//! The WASM backend's errors, and a plugin's error values in host types.

use std::path::PathBuf;
use std::time::Duration;

use super::{MemoryCapHit, bindings, cache, contract, structure};
use crate::limits;

/// Errors of the WASM backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WasmError {
    /// The plugin file cannot be read.
    #[error("cannot read plugin `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The file is not a WebAssembly component.
    #[error("`{name}` is not a WebAssembly component: {reason}")]
    NotAComponent { name: String, reason: String },

    /// The file exceeds what the host lets a plugin cost to load (its size,
    /// nesting, parts or sections); checked before compiling.
    #[error("`{name}` is refused before compiling: {reason}")]
    TooCostly {
        name: String,
        reason: structure::StructureError,
    },

    /// The component does not implement the embedder world.
    #[error("`{name}` is a component but not an embedhost plugin: {reason}")]
    WrongWorld { name: String, reason: String },

    /// The component failed to compile.
    #[error("cannot compile `{name}`: {reason}")]
    Compile { name: String, reason: String },

    /// Instantiation failed (for example, the start function trapped).
    #[error("cannot instantiate `{name}`: {reason}")]
    Instantiate { name: String, reason: String },

    /// The plugin trapped. The instance is discarded.
    #[error("plugin trapped in `{call}`: {reason}")]
    Trap { call: &'static str, reason: String },

    /// A call ran past its deadline and was interrupted. The instance is
    /// discarded.
    #[error("`{call}` ran past its {deadline:?} deadline and was interrupted")]
    DeadlineExceeded {
        call: &'static str,
        deadline: Duration,
    },

    /// The plugin tried to grow its memory past the cap. The instance is
    /// discarded.
    #[error("plugin exceeded its memory limit in `{call}`: {source}")]
    MemoryCap {
        call: &'static str,
        source: MemoryCapHit,
    },

    /// The plugin returned an error value.
    #[error("plugin refused `{call}`: {error}")]
    Plugin {
        call: &'static str,
        error: PluginError,
    },

    /// The plugin's output breaks the contract.
    #[error("plugin returned invalid output: {reason}")]
    InvalidOutput { index: Option<u32>, reason: String },

    /// The instance's worker thread is gone (it panicked or was shut down).
    #[error("plugin instance `{name}` is gone")]
    InstanceGone { name: String },

    /// The component was built for another contract, or one of its
    /// functions has another signature: both sides are named.
    #[error("`{name}` does not fit this host's contract: {reason}")]
    Contract {
        name: String,
        reason: contract::ContractError,
    },

    /// The artifact cache cannot be trusted or used.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),

    /// `init` declared a model the host refuses: a model id that is too
    /// long or not printable as is, or a dimension of 0 or past its bound.
    #[error("plugin declared an unusable model in `init`: {0}")]
    ModelInfo(#[from] crate::backend::ModelInfoError),
}

impl WasmError {
    /// Whether the instance that produced this error must be discarded.
    pub fn is_crash(&self) -> bool {
        self.failure_reason().is_some()
    }

    /// For a crash, the reason the supervisor records; `None` otherwise.
    pub fn failure_reason(&self) -> Option<crate::backend::FailureReason> {
        use crate::backend::FailureReason;
        match self {
            WasmError::Trap { reason, .. } => Some(FailureReason::Trap(reason.clone())),
            WasmError::DeadlineExceeded { .. } => Some(FailureReason::Deadline),
            WasmError::MemoryCap { .. } => Some(FailureReason::MemoryCap),
            WasmError::InstanceGone { .. } => {
                Some(FailureReason::Exited("instance thread ended".into()))
            }
            _ => None,
        }
    }
}

/// An `embed-error` value returned by a plugin, in host types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("invalid config: {0}")]
    /// `init` cannot use its configuration.
    InvalidConfig(String),
    #[error("invalid input {index}: {reason}")]
    /// One input of the batch was refused.
    InvalidInput { index: u32, reason: String },
    #[error("not initialized")]
    /// `embed` came before a successful `init`.
    NotInitialized,
    #[error("model failure: {0}")]
    /// The model failed.
    ModelFailure(String),
}

impl From<bindings::embedhost::embedder::types::EmbedError> for PluginError {
    fn from(e: bindings::embedhost::embedder::types::EmbedError) -> Self {
        use bindings::embedhost::embedder::types::EmbedError as E;
        // A plugin's text is cut to a named bound and escaped: it ends up
        // in logs, errors, the index's skip reasons and HTTP answers.
        let text = |s: String| crate::untrusted::sanitize(&s, limits::MAX_PLUGIN_ERROR_BYTES);
        match e {
            E::InvalidConfig(s) => PluginError::InvalidConfig(text(s)),
            E::InvalidInput(i) => PluginError::InvalidInput {
                index: i.index,
                reason: text(i.reason),
            },
            E::NotInitialized => PluginError::NotInitialized,
            E::ModelFailure(s) => PluginError::ModelFailure(text(s)),
        }
    }
}

/// Error mapping (WASM error → bus code), which decides what the bus may
/// retry:
/// - a crash of the instance (trap, memory cap, lost instance) →
///   [`crate::bus::ErrorCode::Unavailable`]: retryable, the next attempt runs on a fresh
///   instance;
/// - a call past its deadline → [`crate::bus::ErrorCode::DeadlineExceeded`]: not
///   retried, the same input would take as long again;
/// - an input the plugin refuses → [`crate::bus::ErrorCode::InvalidInput`] with its index;
/// - invalid output, a refused configuration, a model failure →
///   [`crate::bus::ErrorCode::Failed`].
impl From<WasmError> for crate::bus::RemoteError {
    fn from(e: WasmError) -> Self {
        use crate::bus::{ErrorCode, RemoteError};
        let message = e.to_string();
        match e {
            WasmError::DeadlineExceeded { .. } => {
                RemoteError::new(ErrorCode::DeadlineExceeded, message)
            }
            e if e.is_crash() => RemoteError::new(ErrorCode::Unavailable, message),
            WasmError::Plugin {
                error: PluginError::InvalidInput { index, .. },
                ..
            } => RemoteError::invalid_input(index, message),
            WasmError::InvalidOutput { index, .. } => RemoteError {
                index,
                ..RemoteError::new(ErrorCode::Failed, message)
            },
            _ => RemoteError::new(ErrorCode::Failed, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bindings::embedhost::embedder::types::{EmbedError, InvalidInput};

    #[test]
    fn an_ended_instance_is_a_crash_the_supervisor_records() {
        let gone = WasmError::InstanceGone {
            name: "stub".into(),
        };
        assert!(gone.is_crash());
        assert_eq!(
            gone.failure_reason(),
            Some(crate::backend::FailureReason::Exited(
                "instance thread ended".into()
            ))
        );
    }

    #[test]
    fn a_plugins_error_text_is_escaped_and_cut_to_its_bound() {
        let long = "\u{1b}[2J".to_string() + &"x".repeat(limits::MAX_PLUGIN_ERROR_BYTES * 2);
        for error in [
            PluginError::from(EmbedError::ModelFailure(long.clone())),
            PluginError::from(EmbedError::InvalidConfig(long.clone())),
            PluginError::from(EmbedError::InvalidInput(InvalidInput {
                index: 3,
                reason: long.clone(),
            })),
        ] {
            let text = error.to_string();
            assert!(!text.contains('\u{1b}'), "{error:?}");
            assert!(
                text.len() < limits::MAX_PLUGIN_ERROR_BYTES + 64,
                "{}",
                text.len()
            );
            assert!(text.contains("[truncated]"), "{text}");
        }
        assert_eq!(
            PluginError::from(EmbedError::InvalidInput(InvalidInput {
                index: 3,
                reason: "empty".into(),
            })),
            PluginError::InvalidInput {
                index: 3,
                reason: "empty".into()
            }
        );
        assert_eq!(
            PluginError::from(EmbedError::NotInitialized),
            PluginError::NotInitialized
        );
    }
}
