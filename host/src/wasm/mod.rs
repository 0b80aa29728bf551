//! The WebAssembly backend: plugins are components of `wit/embedder.wit`,
//! run by wasmtime in a sandbox.
//!
//! # Invariants
//! - One [`WasmEngine`] per process: one compiler configuration, one epoch
//!   ticker thread (which stops when the engine is dropped).
//! - A [`WasmPlugin`] is compiled once (or loaded from the artifact cache) and
//!   linked once (`InstancePre`); each instance is a fresh `Store` from it.
//! - Every call into a plugin has a deadline (epoch interruption) and every
//!   instance a memory cap. A trap, a deadline or the cap yields a typed
//!   [`WasmError`]; it never crashes or hangs the host. A `Store` that trapped
//!   is never entered again: the instance is discarded.
//! - Plugin output is validated at the boundary: a vector of the wrong
//!   dimension, or with a NaN or infinite value, is an error, never passed on.

mod boundary;
mod cache;
pub mod compile;
pub mod contract;
pub mod encoder;
mod error;
mod host;
mod instance;
pub mod log_budget;
mod preinit;
pub mod snapshot;
mod source;
pub mod structure;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, OptLevel};

pub use bindings::exports::embedhost::embedder::embedder::InputKind;
pub(crate) use cache::sha256_hex;
pub use cache::{ArtifactCache, CacheError, CacheOutcome, KEY_FILE};
pub use encoder::Encoder;
pub use error::{
    InstantiateError, LinkError, PluginError, SandboxError, SnapshotError, SnapshotUnavailable,
    StateError, WasmError,
};
pub use host::MemoryCapHit;
pub use instance::{Instance, WasmEmbedder, WasmSpawner};
pub use source::{BUILTIN_PLUGINS, PluginSource};

pub use crate::backend::ModelInfo;
use crate::limits;

/// Host bindings of the `plugin` world, generated from `wit/`.
pub mod bindings {
    // Exports are async so that every call into a plugin is a future the
    // host can cancel (see `instance`); `host-log` is a plain function.
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        exports: { default: async },
    });
}

/// The contract's interface a plugin must export.
pub const EXPORTED_INTERFACE: &str = "embedhost:embedder/embedder@0.1.1";

/// The wasmtime engine shared by every plugin of the process, with its epoch
/// ticker and artifact cache.
#[derive(Clone)]
pub struct WasmEngine {
    engine: Engine,
    cache: Option<ArtifactCache>,
    /// The executable that compiles plugin code in a bounded child
    /// ([`compile`]); `None` compiles in this process.
    compiler: Option<Arc<std::path::Path>>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// An engine with epoch interruption, caching compiled components in
    /// `cache` (or not at all).
    ///
    /// # Errors
    /// wasmtime's error if the configuration is refused on this machine.
    pub fn new(cache: Option<ArtifactCache>) -> wasmtime::Result<Self> {
        /// Turns on wasmtime's perf map, for profiling plugins.
        const PERF_MAP_ENV: &str = "EMBEDHOST_PERF_MAP";
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // `perf record` can name the plugins' compiled functions when this is
        // set (wasmtime writes /tmp/perf-<pid>.map); see plugins/bert/README.md.
        if std::env::var_os(PERF_MAP_ENV).is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        config.cranelift_opt_level(OptLevel::Speed);
        // The model plugin's int8 kernels use the relaxed dot product. The
        // fast (non-deterministic-by-spec) lowering is exact for the codes
        // they feed it (activations below 128, see plugins/kernels/src/lib.rs)
        // and 3x faster than the deterministic one.
        config.wasm_relaxed_simd(true);
        config.relaxed_simd_deterministic(false);
        let engine = Engine::new(&config)?;
        spawn_epoch_ticker(&engine);
        Ok(WasmEngine {
            engine,
            cache,
            compiler: None,
        })
    }

    /// The same engine, compiling plugin code in `exe compile-plugin`
    /// under the limits of [`compile`] (the CLI passes its own binary).
    #[must_use]
    pub fn with_compiler(mut self, exe: impl Into<std::path::PathBuf>) -> Self {
        self.compiler = Some(Arc::from(exe.into().into_boxed_path()));
        self
    }

    /// What `Engine::precompile_component` gives for `bytes`, compiled in
    /// the bounded child if there is a compiler executable.
    ///
    /// # Errors
    /// The compiler's refusal, or [`compile::CompileError`] naming the
    /// limit a compile went past.
    pub(crate) fn precompile(&self, bytes: &[u8]) -> wasmtime::Result<Vec<u8>> {
        match &self.compiler {
            Some(exe) => Ok(compile::precompile_in_child(exe, bytes)?),
            None => self.engine.precompile_component(bytes),
        }
    }

    /// `bytes` compiled (see [`WasmEngine::precompile`]) and loaded.
    ///
    /// # Errors
    /// As [`WasmEngine::precompile`], or wasmtime's refusal to load it.
    pub(crate) fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        let serialized = self.precompile(bytes)?;
        // SAFETY: `serialized` was made just now by this engine, or by this
        // host's own binary with the same settings (wasmtime checks their
        // compatibility on load).
        unsafe { Component::deserialize(&self.engine, &serialized) }
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The artifact cache, if any.
    pub fn cache(&self) -> Option<&ArtifactCache> {
        self.cache.as_ref()
    }
}

/// Increments the engine's epoch every [`limits::EPOCH_TICK`] until the
/// engine is dropped. Deadlines are counted in ticks.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("embedhost-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(limits::EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
    if let Err(e) = spawned {
        // Without the ticker no deadline fires; refuse to run blind.
        panic!("cannot start the epoch ticker thread: {e}");
    }
}

/// Epoch ticks for a deadline, rounded up, at least one.
pub(crate) fn deadline_ticks(deadline: Duration) -> u64 {
    let tick = limits::EPOCH_TICK.as_nanos();
    u64::try_from(deadline.as_nanos().div_ceil(tick).max(1)).unwrap_or(u64::MAX)
}

/// Limits of each instance of a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Cap on linear memory, in bytes.
    pub memory_bytes: u64,
    /// Deadline of `init`.
    pub init_deadline: Duration,
    /// Deadline of `embed` (with no work) and `health`; a request's own
    /// deadline can only shorten it.
    pub call_deadline: Duration,
    /// What each KiB of text adds to an `embed` call's deadline.
    pub call_deadline_per_kib: Duration,
}

impl Default for InstanceLimits {
    fn default() -> Self {
        InstanceLimits {
            memory_bytes: limits::DEFAULT_MEMORY_LIMIT_BYTES,
            init_deadline: limits::DEFAULT_INIT_DEADLINE,
            call_deadline: limits::DEFAULT_CALL_DEADLINE,
            call_deadline_per_kib: limits::CALL_DEADLINE_PER_KIB,
        }
    }
}

/// A compiled and linked plugin, ready to instantiate any number of times.
#[derive(Clone)]
pub struct WasmPlugin {
    name: Arc<str>,
    engine: WasmEngine,
    pre: bindings::PluginPre<host::HostState>,
    cache_outcome: CacheOutcome,
    model_dir: Option<Arc<std::path::Path>>,
    snapshot: SnapshotStatus,
    /// The contract it was built for, if an earlier one of the host's line.
    contract_version: Option<Arc<str>>,
    /// Whether it imports the encoder (a `model-plugin`).
    imports_encoder: bool,
    /// The sha256 of its file (before any snapshot), hex.
    sha256: Arc<str>,
    /// The engine its encoder import is linked to, in each instance.
    encoder: Option<Arc<Encoder>>,
}

/// Whether a plugin's instances start from a pre-initialized snapshot
/// (see [`snapshot`]).
#[derive(Clone, Debug)]
pub enum SnapshotStatus {
    /// Not asked for: instances load their model in `init`.
    NotUsed,
    /// Instances start from a snapshot, made now or found in the cache.
    Used(CacheOutcome),
    /// Asked for, but it could not be made (the reason, shared by the
    /// plugin's clones); instances load their model in `init`.
    Unavailable(Arc<SnapshotUnavailable>),
}

/// Two statuses are equal if they are of one kind and, for
/// [`SnapshotStatus::Unavailable`], read the same.
impl PartialEq for SnapshotStatus {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SnapshotStatus::NotUsed, SnapshotStatus::NotUsed) => true,
            (SnapshotStatus::Used(a), SnapshotStatus::Used(b)) => a == b,
            (SnapshotStatus::Unavailable(a), SnapshotStatus::Unavailable(b)) => {
                a.to_string() == b.to_string()
            }
            _ => false,
        }
    }
}

impl Eq for SnapshotStatus {}

/// The bytes of a plugin.
fn read(source: &PluginSource) -> Result<std::borrow::Cow<'static, [u8]>, WasmError> {
    match source {
        PluginSource::Pinned { path, sha256 } => {
            let bytes = read(&PluginSource::File(path.clone()))?;
            let actual = crate::files::sha256_hex(&bytes);
            if !actual.eq_ignore_ascii_case(sha256) {
                return Err(WasmError::Pinned {
                    path: path.clone(),
                    expected: sha256.to_ascii_lowercase(),
                    actual,
                });
            }
            Ok(bytes)
        }
        PluginSource::File(path) => {
            let read_error = |source| WasmError::Read {
                path: path.clone(),
                source,
            };
            let size = std::fs::metadata(path).map_err(read_error)?.len();
            structure::check_size(size).map_err(|reason| WasmError::TooCostly {
                name: path.display().to_string(),
                reason,
            })?;
            std::fs::read(path)
                .map(std::borrow::Cow::Owned)
                .map_err(read_error)
        }
        PluginSource::Bytes { bytes, .. } => Ok(std::borrow::Cow::Borrowed(bytes)),
    }
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Where a plugin finds its model directory (read-only), if the host gives
/// it one.
pub const MODEL_DIR_IN_GUEST: &str = "/model";

/// The first bytes of every WebAssembly binary.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Version and layer field of a core module (version 1, layer 0).
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

impl WasmPlugin {
    /// Loads, compiles (or fetches from the cache) and links a plugin, and
    /// checks it against the `plugin` world.
    ///
    /// # Errors
    /// [`WasmError::Read`], [`WasmError::NotAComponent`],
    /// [`WasmError::Compile`] or [`WasmError::WrongWorld`], each naming the
    /// plugin and the problem.
    pub fn load(engine: &WasmEngine, source: &PluginSource) -> Result<Self, WasmError> {
        let bytes = read(source)?;
        Self::from_bytes(engine, source.name(), &bytes)
    }

    /// Checks and loads `bytes` as [`WasmPlugin::load`] does a file's
    /// (header and bounds, compile or cache, link, contract), naming the
    /// plugin `name`: for bytes the caller has read and verified itself
    /// (`embedhost plugin add` stores the very bytes it checked).
    ///
    /// # Errors
    /// As [`WasmPlugin::load`], but for reading.
    pub fn load_bytes(engine: &WasmEngine, name: &str, bytes: &[u8]) -> Result<Self, WasmError> {
        Self::from_bytes(engine, name.to_string(), bytes)
    }

    fn from_bytes(engine: &WasmEngine, name: String, bytes: &[u8]) -> Result<Self, WasmError> {
        check_header(&name, bytes)?;
        // A cache another user could write is refused (that is a danger);
        // one that cannot be made or read (a read-only home, EACCES) only
        // costs the compile: the plugin is compiled without it.
        let cache = match engine.cache() {
            Some(cache) => match cache.prepare() {
                Ok(_) => Some(cache),
                Err(e @ CacheError::Io { .. }) => {
                    tracing::warn!(error = %e, "compiling without the artifact cache");
                    None
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let (component, cache_outcome) = match cache {
            Some(cache) => cache.load_or_compile(engine, bytes),
            None => engine.compile(bytes).map(|c| (c, CacheOutcome::Compiled)),
        }
        .map_err(|e| WasmError::Compile {
            name: name.clone(),
            reason: format!("{e:#}"),
        })?;
        let pre = link(engine, &component).map_err(|reason| {
            match contract::other_version(engine.engine(), &component) {
                Some(reason) => WasmError::Contract {
                    name: name.clone(),
                    reason,
                },
                None => WasmError::WrongWorld {
                    name: name.clone(),
                    reason,
                },
            }
        })?;
        if let Some(reason) = contract::differing_signature(engine.engine(), &component) {
            return Err(WasmError::Contract { name, reason });
        }
        tracing::debug!(plugin = %name, cache = ?cache_outcome, "plugin loaded");
        Ok(WasmPlugin {
            name: name.into(),
            engine: engine.clone(),
            pre,
            cache_outcome,
            model_dir: None,
            snapshot: SnapshotStatus::NotUsed,
            contract_version: contract::plugin_version(engine.engine(), &component).map(Arc::from),
            imports_encoder: encoder::imports_encoder(engine.engine(), &component),
            sha256: sha256_hex(bytes).into(),
            encoder: None,
        })
    }

    /// Gives every instance of this plugin `dir`, read-only, as
    /// [`MODEL_DIR_IN_GUEST`]: the only file access a plugin ever has.
    #[must_use]
    pub fn with_model_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.model_dir = Some(Arc::from(dir.into().into_boxed_path()));
        self
    }

    /// The host directory instances see as [`MODEL_DIR_IN_GUEST`], if any.
    pub fn model_dir(&self) -> Option<&std::path::Path> {
        self.model_dir.as_deref()
    }

    /// The plugin's name (its path, or `builtin:stub`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether loading hit the artifact cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.cache_outcome
    }

    pub(crate) fn engine(&self) -> &WasmEngine {
        &self.engine
    }

    /// The sha256 of the plugin's file (of the plugin, not of a snapshot).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The contract version the plugin was built for, if not the host's
    /// (an earlier one of the host's line: others are refused at load).
    pub fn contract_version(&self) -> Option<String> {
        self.contract_version.as_deref().map(str::to_string)
    }

    pub(crate) fn pre(&self) -> &bindings::PluginPre<host::HostState> {
        &self.pre
    }

    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }
}

fn check_header(name: &str, bytes: &[u8]) -> Result<(), WasmError> {
    let not_component = |reason: &str| WasmError::NotAComponent {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        return Err(not_component(
            "the file does not start with the WebAssembly magic bytes",
        ));
    }
    if bytes[4..8] == CORE_MODULE_VERSION {
        return Err(not_component(
            "it is a core WebAssembly module; build the plugin for the wasm32-wasip2 target to get a component",
        ));
    }
    structure::check(bytes).map_err(|reason| match reason {
        // A file that cannot be parsed would not compile either.
        structure::StructureError::Malformed { .. } => WasmError::Compile {
            name: name.to_string(),
            reason: reason.to_string(),
        },
        reason => WasmError::TooCostly {
            name: name.to_string(),
            reason,
        },
    })
}

/// The host's imports: WASI p2 (sandboxed by [`host::HostState`]) and the
/// contract's `host-log`.
fn linker(engine: &WasmEngine) -> Result<Linker<host::HostState>, LinkError> {
    let mut linker: Linker<host::HostState> = Linker::new(engine.engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(LinkError::Host)?;
    bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
        .map_err(LinkError::Host)?;
    encoder::add_to_linker(&mut linker).map_err(LinkError::Host)?;
    Ok(linker)
}

fn link(
    engine: &WasmEngine,
    component: &Component,
) -> Result<bindings::PluginPre<host::HostState>, LinkError> {
    let linker = linker(engine)?;
    let instance_pre = linker
        .instantiate_pre(component)
        .map_err(LinkError::Imports)?;
    bindings::PluginPre::new(instance_pre).map_err(LinkError::Exports)
}

impl TryFrom<bindings::embedhost::embedder::types::ModelInfo> for ModelInfo {
    type Error = crate::backend::ModelInfoError;
    fn try_from(m: bindings::embedhost::embedder::types::ModelInfo) -> Result<Self, Self::Error> {
        let info = ModelInfo {
            model_id: crate::backend::ModelId::new(m.model_id)?,
            dimension: m.dimension,
            max_input_tokens: m.max_input_tokens,
            normalized: m.normalized,
        };
        info.check_dimension()?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache that cannot be made (its directory under a file) costs
    /// only the compile: the plugin loads, compiled, without it.
    #[test]
    fn a_cache_that_cannot_be_made_costs_only_the_compile() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("file"), "").unwrap();
        let dir = root.path().join("file").join("cache");
        let engine = WasmEngine::new(Some(ArtifactCache::new(&dir))).unwrap();
        let shown = format!("{engine:?}");
        assert!(
            shown.starts_with("WasmEngine") && shown.contains(&*dir.to_string_lossy()),
            "{shown}"
        );
        let plugin = WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap();
        assert_eq!(plugin.cache_outcome(), CacheOutcome::Compiled);
        assert_eq!(
            format!("{plugin:?}"),
            "WasmPlugin { name: \"builtin:stub\", .. }"
        );
    }
}
