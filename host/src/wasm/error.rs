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

    /// A pinned plugin file (`[plugin] sha256`, or a stored plugin's
    /// manifest for `[plugin] name`) is not the one pinned.
    #[error(
        "plugin `{path}` has sha256 {actual}, but it is pinned to {expected} ([plugin] sha256, or the store's manifest of [plugin] name): refused"
    )]
    Pinned {
        path: PathBuf,
        expected: String,
        actual: String,
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
    WrongWorld { name: String, reason: LinkError },

    /// The component failed to compile.
    #[error("cannot compile `{name}`: {reason}")]
    Compile { name: String, reason: String },

    /// Instantiation failed (for example, the start function trapped).
    #[error("cannot instantiate `{name}`: {reason}")]
    Instantiate {
        name: String,
        reason: InstantiateError,
    },

    /// The plugin imports the encoder (it is a `model-plugin`) but was
    /// started without one.
    #[error(
        "`{name}` imports the encoder ({iface}); it runs only with a model for it (`[model]`, or the default model)",
        iface = super::encoder::ENCODER_INTERFACE
    )]
    NoEncoder { name: String },

    /// The engine behind the plugin's encoder refused its configuration.
    #[error("the encoder of `{name}` refused its configuration: {error}")]
    EncoderRefused { name: String, error: PluginError },

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

/// Why the host's imports could not be linked to a component.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The host's own imports (WASI, the contract's `host-log`) could not
    /// be added to the linker.
    #[error("{0:#}")]
    Host(#[source] wasmtime::Error),
    /// The component imports something the host does not provide.
    #[error("it imports something the host does not provide: {0:#}")]
    Imports(#[source] wasmtime::Error),
    /// The component does not export the contract's interface.
    #[error("it does not export `{iface}` as the contract defines it: {0:#}", iface = super::EXPORTED_INTERFACE)]
    Exports(#[source] wasmtime::Error),
}

/// Why an instance's sandbox could not be made over its model directory.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A directory under it cannot be listed.
    #[error("cannot list `{}`: {source}", dir.display())]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// It holds more than [`limits::MAX_SNAPSHOT_MODEL_FILES`] entries.
    #[error(
        "the model directory `{}` holds more than {limit} entries (limits::MAX_SNAPSHOT_MODEL_FILES)",
        dir.display()
    )]
    TooManyEntries { dir: PathBuf, limit: usize },
    /// An entry's kind cannot be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Kind {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An entry is a FIFO, a socket or a device.
    #[error(
        "`{}` under the model directory is not a file, a directory or a link (a FIFO, socket or device blocks the host when opened)",
        path.display()
    )]
    Special { path: PathBuf },
    /// WASI could not open it.
    #[error("cannot open the model directory `{}`: {source}", dir.display())]
    Open {
        dir: PathBuf,
        source: wasmtime::Error,
    },
}

/// Why an instance could not be instantiated.
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    /// Its sandbox could not be made.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// No runtime for its host calls.
    #[error("no runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No thread to run it on.
    #[error("no thread: {0}")]
    Thread(#[source] std::io::Error),
    /// wasmtime refused it, or its start function trapped: the trap's kind
    /// or wasmtime's message, as [`super::boundary`] words a crash.
    #[error("{0}")]
    Refused(String),
}

/// Why a pre-initialized snapshot could not be made, by the step that
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// wizer could not instrument the component.
    #[error("cannot instrument the component: {0:#}")]
    Instrument(#[source] wasmtime::Error),
    /// The instrumented component did not compile.
    #[error("cannot compile the instrumented component: {0:#}")]
    Compile(#[source] wasmtime::Error),
    /// The host's imports could not be linked.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The sandbox over the model directory could not be made.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// No runtime for the instance's host calls.
    #[error("no runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A step ran past the `init` deadline.
    #[error("`init` ran past its {0:?} deadline")]
    Deadline(Duration),
    /// The instrumented component could not be instantiated.
    #[error("cannot instantiate the instrumented component: {0:#}")]
    Instantiate(#[source] wasmtime::Error),
    /// The instrumented component no longer exports the contract.
    #[error("the instrumented component lost its exports: {0:#}")]
    Exports(#[source] wasmtime::Error),
    /// `init` trapped.
    #[error("`init` trapped: {0:#}")]
    InitTrapped(#[source] wasmtime::Error),
    /// `init` returned the plugin's error.
    #[error("`init` failed: {0}")]
    InitFailed(#[source] PluginError),
    /// More memory than [`limits::MAX_SNAPSHOT_BYTES`] after `init`.
    #[error(
        "the instance holds {held} bytes after `init`, more than a snapshot may keep ({limit} bytes, limits::MAX_SNAPSHOT_BYTES)"
    )]
    TooLarge { held: u64, limit: u64 },
    /// wizer could not write the snapshot.
    #[error("cannot write the snapshot: {0:#}")]
    Write(#[source] wasmtime::Error),
    /// An accessor of the instance's state failed.
    #[error("cannot read the instance's state: {0}")]
    State(#[source] StateError),
}

/// Why an accessor of the instrumented instance (its state, read back for
/// the snapshot) could not be called.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The instrumented instance lacks an accessor's interface.
    #[error("no export `{instance}`")]
    NoInstance { instance: String },
    /// The instrumented instance lacks an accessor.
    #[error("no export `{instance}#{func}`")]
    NoFunc { instance: String, func: String },
    /// The accessor has another type.
    #[error("`{instance}#{func}`: {source:#}")]
    Type {
        instance: String,
        func: String,
        source: wasmtime::Error,
    },
    /// The accessor trapped.
    #[error("`{instance}#{func}` trapped: {source:#}")]
    Trapped {
        instance: String,
        func: String,
        source: wasmtime::Error,
    },
}

/// Why a plugin runs without its pre-initialized snapshot (instances then
/// load their model in `init`).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotUnavailable {
    /// The model directory could not be hashed into the snapshot's id.
    #[error("no snapshot id for `{}`: {source}", dir.display())]
    Id {
        dir: PathBuf,
        source: super::snapshot::SnapshotIdError,
    },
    /// Making it failed.
    #[error(transparent)]
    Make(#[from] SnapshotError),
    /// The artifact cache, or compiling what was made, failed.
    #[error("{0:#}")]
    Load(#[source] wasmtime::Error),
    /// Making it panicked.
    #[error("the snapshot panicked")]
    Panicked,
    /// What was made does not link.
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl SnapshotUnavailable {
    /// What loading or making the snapshot gave: [`SnapshotError`] as
    /// itself, anything else as the cache's or the compiler's.
    pub(super) fn loading(error: wasmtime::Error) -> Self {
        match error.downcast::<SnapshotError>() {
            Ok(made) => SnapshotUnavailable::Make(made),
            Err(other) => SnapshotUnavailable::Load(other),
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
