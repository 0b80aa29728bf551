//! The `encoder` import: a model from the store, run by the host's BERT
//! engine (the `builtin:bert` component of the `engine` world) inside the
//! plugin's own sandbox, linked to a plugin of the `model-plugin` world.
//!
//! The host instantiates the engine (its pre-initialized snapshot, the
//! model already in memory) in the plugin's `Store`, calls its `init`, then
//! instantiates the plugin, whose `encoder` import is a host function that
//! forwards each call to the engine's `encoder` export in the same store.
//!
//! # Invariants
//! - One store: the engine's memories count against the instance's memory
//!   cap, its time against the plugin's call deadline (one epoch deadline),
//!   and a trap in either ends the instance. No native code runs on what a
//!   plugin passes: the engine is WebAssembly too.
//! - Every call is bounded before the engine sees it: at most
//!   [`limits::ENCODER_MAX_BATCH`] inputs (refused as `invalid-input`, not a
//!   trap), the inputs lifted within [`limits::MAX_HOSTCALL_BYTES`] like
//!   any host call, the engine's answer within
//!   [`limits::ENCODER_MAX_RESULT_BYTES`].
//! - A plugin that imports the encoder is never started without one
//!   ([`super::WasmError::NoEncoder`]).

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, StoreContextMut};

use super::bindings::embedhost::embedder::types::{EmbedError, InvalidInput};
use super::boundary::classify;
use super::host::HostState;
use super::{InstantiateError, WasmError, WasmPlugin};
use crate::limits;

/// Host bindings of the `engine` world: the built-in engine's `encoder`
/// export, with the `plugin` world's types.
pub mod engine_bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "engine",
        exports: { default: async },
        with: {
            "embedhost:embedder/types": super::super::bindings::embedhost::embedder::types,
            "embedhost:embedder/host-log": super::super::bindings::embedhost::embedder::host_log,
        },
    });
}

use engine_bindings::exports::embedhost::embedder::encoder::EncoderInfo;

/// The interface a `model-plugin` imports.
pub const ENCODER_INTERFACE: &str = "embedhost:embedder/encoder@0.1.1";

/// The interface's name at any version of the contract's line.
const ENCODER_NAME: &str = "embedhost:embedder/encoder@";

/// The engine a plugin's encoder import is linked to: the built-in engine
/// loaded over a model (as a snapshot where it can be), and the `init`
/// table it gets in each instance.
#[derive(Clone)]
pub struct Encoder {
    engine: super::WasmPlugin,
    pre: engine_bindings::EnginePre<HostState>,
    config: Arc<[(String, String)]>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("engine", &self.engine.name())
            .field("snapshot", self.engine.snapshot())
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// The encoder of `engine` (a loaded `builtin:bert`, or any plugin of
    /// the `engine` world), initialized in each instance with `config`.
    ///
    /// # Errors
    /// [`super::LinkError::Exports`]: `engine` does not export the encoder.
    pub fn new(
        engine: super::WasmPlugin,
        config: Vec<(String, String)>,
    ) -> Result<Self, super::LinkError> {
        let pre = engine_bindings::EnginePre::new(engine.pre().instance_pre().clone())
            .map_err(super::LinkError::Exports)?;
        Ok(Encoder {
            engine,
            pre,
            config: config.into(),
        })
    }

    /// The table the engine's `init` gets.
    pub(crate) fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// The loaded engine (its name, model directory and snapshot status).
    pub fn engine(&self) -> &super::WasmPlugin {
        &self.engine
    }
}

impl WasmPlugin {
    /// Loads `source`, a `model-plugin`, pre-initialized as
    /// [`WasmPlugin::load_snapshot`] does a model plugin: `init(config)`
    /// already run with `encoder` linked, then every instance linked to it.
    /// The snapshot's id covers the plugin, `config`, the engine's model
    /// directory and the encoder's settings. Where it cannot be made, the
    /// plain plugin is loaded, linked to `encoder`, and
    /// [`WasmPlugin::snapshot`] says why.
    ///
    /// # Errors
    /// As [`WasmPlugin::load`]: a snapshot's failure is never an error.
    pub fn load_encoded_snapshot(
        engine: &super::WasmEngine,
        source: &super::PluginSource,
        encoder: Encoder,
        limits: super::InstanceLimits,
        config: &[(String, String)],
    ) -> Result<Self, WasmError> {
        let Some(dir) = encoder.engine.model_dir().map(std::path::Path::to_path_buf) else {
            return Ok(WasmPlugin::load(engine, source)?.with_encoder(encoder));
        };
        Self::snapshot_of(engine, source, &dir, limits, config, Some(&encoder))
    }

    /// Links every instance's encoder import to `encoder` (see
    /// [`super::encoder`]); a plugin that does not import it ignores it.
    #[must_use]
    pub fn with_encoder(mut self, encoder: Encoder) -> Self {
        self.encoder = Some(Arc::new(encoder));
        self
    }

    /// Whether the plugin imports the encoder: it needs
    /// [`WasmPlugin::with_encoder`] to start.
    pub fn imports_encoder(&self) -> bool {
        self.imports_encoder
    }

    /// The engine its encoder import is linked to, if any.
    pub fn encoder(&self) -> Option<&Encoder> {
        self.encoder.as_deref()
    }
}

/// The model directory the store of `plugin` must open for its encoder's
/// engine: the engine's, when the engine runs without a snapshot and so
/// reads its model in `init` (read-only, as a model plugin's own).
pub(crate) fn engine_reads(plugin: &WasmPlugin) -> Option<&std::path::Path> {
    let engine = plugin.encoder()?.engine();
    match engine.snapshot() {
        super::SnapshotStatus::Used(_) => None,
        _ => engine.model_dir(),
    }
}

/// What a store holds of its encoder: the engine's instance.
pub(crate) type Linked = Arc<engine_bindings::Engine>;

/// Whether the plugin of `source` imports the encoder (a `model-plugin`,
/// which then needs [`WasmPlugin::with_encoder`]), read from its file
/// before anything is compiled.
///
/// # Errors
/// As reading it for [`WasmPlugin::load`] (a pinned file that differs, a
/// file too large, one that cannot be read).
pub fn wants_encoder(source: &super::PluginSource) -> Result<bool, super::WasmError> {
    let bytes = super::read(source)?;
    Ok(super::structure::imports_name(&bytes, ENCODER_NAME))
}

/// Whether `component` imports the encoder (at any version of the line).
pub fn imports_encoder(engine: &Engine, component: &Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with(ENCODER_NAME))
}

/// Instantiates `encoder`'s engine in `store` and runs its `init`; the
/// store's encoder import then forwards to it.
///
/// # Errors
/// The outer error is a trap (or the memory cap, or the deadline); the
/// inner one is the engine's refusal of its configuration.
pub(crate) async fn start(
    store: &mut Store<HostState>,
    encoder: &Encoder,
) -> wasmtime::Result<Result<(), EmbedError>> {
    let engine = encoder.pre.instantiate_async(&mut *store).await?;
    let info = engine
        .embedhost_embedder_embedder()
        .call_init(&mut *store, &encoder.config)
        .await?;
    if let Err(e) = info {
        return Ok(Err(e));
    }
    store.data_mut().encoder = Some(Arc::new(engine));
    Ok(Ok(()))
}

/// Defines the encoder import in `linker`: each function forwards to the
/// engine of the calling store.
///
/// # Errors
/// The linker refuses a definition (a bug).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut instance = linker.instance(ENCODER_INTERFACE)?;
    instance.func_wrap_async("info", |mut store, (): ()| {
        Box::new(async move {
            let engine = linked(&store)?;
            let mut info: EncoderInfo = engine
                .embedhost_embedder_encoder()
                .call_info(&mut store)
                .await?;
            info.max_batch = info.max_batch.min(limits::ENCODER_MAX_BATCH);
            Ok((info,))
        })
    })?;
    instance.func_wrap_async("encode", |mut store, (texts,): (Vec<String>,)| {
        Box::new(async move {
            let answer = forward(&mut store, texts.len(), async |engine, store| {
                engine.call_encode(store, &texts).await
            });
            Ok((answer.await?,))
        })
    })?;
    instance.func_wrap_async("tokenize", |mut store, (texts,): (Vec<String>,)| {
        Box::new(async move {
            let answer = forward(&mut store, texts.len(), async |engine, store| {
                engine.call_tokenize(store, &texts).await
            });
            Ok((answer.await?,))
        })
    })?;
    instance.func_wrap_async("encode-ids", |mut store, (ids,): (Vec<Vec<u32>>,)| {
        Box::new(async move {
            let answer = forward(&mut store, ids.len(), async |engine, store| {
                engine.call_encode_ids(store, &ids).await
            });
            Ok((answer.await?,))
        })
    })?;
    instance.func_wrap_async("token-states", |mut store, (texts,): (Vec<String>,)| {
        Box::new(async move {
            let answer = forward(&mut store, texts.len(), async |engine, store| {
                engine.call_token_states(store, &texts).await
            });
            Ok((answer.await?,))
        })
    })?;
    Ok(())
}

/// The engine's `encoder` export, as each forwarding function calls it.
type EncoderExport = engine_bindings::exports::embedhost::embedder::encoder::Guest;

/// One forwarded call of `count` inputs: refused past
/// [`limits::ENCODER_MAX_BATCH`] before the engine sees it, else `call` on
/// the store's engine under [`with_allowance`].
async fn forward<T>(
    store: &mut StoreContextMut<'_, HostState>,
    count: usize,
    call: impl AsyncFnOnce(
        &EncoderExport,
        &mut StoreContextMut<'_, HostState>,
    ) -> wasmtime::Result<Result<T, EmbedError>>,
) -> wasmtime::Result<Result<T, EmbedError>> {
    if let Err(e) = bounded(count) {
        return Ok(Err(e));
    }
    let engine = linked(store)?;
    with_allowance(store, async |store| {
        call(engine.embedhost_embedder_encoder(), store).await
    })
    .await
}

/// The engine linked in `store`.
fn linked(store: &StoreContextMut<'_, HostState>) -> wasmtime::Result<Linked> {
    store.data().encoder.clone().ok_or_else(|| {
        wasmtime::format_err!("the plugin called the encoder, but its instance has none")
    })
}

/// `count` inputs within [`limits::ENCODER_MAX_BATCH`], or the refusal.
fn bounded(count: usize) -> Result<(), EmbedError> {
    let max = limits::ENCODER_MAX_BATCH;
    if count > max as usize {
        return Err(EmbedError::InvalidInput(InvalidInput {
            index: max,
            reason: format!(
                "{count} inputs in one encoder call; at most {max} (limits::ENCODER_MAX_BATCH)"
            ),
        }));
    }
    Ok(())
}

/// Runs `call` (into the engine) with the engine's answer allowed
/// [`limits::ENCODER_MAX_RESULT_BYTES`] (see [`super::host::bound_hostcalls`]),
/// then puts back the allowance of the plugin's own call.
async fn with_allowance<R>(
    store: &mut StoreContextMut<'_, HostState>,
    call: impl AsyncFnOnce(&mut StoreContextMut<'_, HostState>) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let previous = std::mem::replace(
        &mut store.data_mut().export_allowance,
        limits::ENCODER_MAX_RESULT_BYTES,
    );
    let answer = call(store).await;
    store.data_mut().export_allowance = previous;
    answer
}

/// Starts the engine of `plugin`'s encoder in `store`, before the plugin
/// (whose encoder import forwards to it), within `deadline`: the same
/// epoch deadline the plugin's own start then runs under.
pub(crate) fn start_in(
    plugin: &WasmPlugin,
    store: &mut Store<HostState>,
    runtime: &super::instance::CallRuntime,
    deadline: Duration,
) -> Result<(), WasmError> {
    let Some(encoder) = plugin.encoder() else {
        return match plugin.imports_encoder() {
            true => Err(WasmError::NoEncoder {
                name: plugin.name().to_string(),
            }),
            false => Ok(()),
        };
    };
    let started = runtime.run_for(
        deadline.saturating_add(limits::HOST_CALL_GRACE),
        start(store, encoder),
    );
    match started {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(WasmError::EncoderRefused {
            name: plugin.name().to_string(),
            error: error.into(),
        }),
        Ok(Err(e)) => Err(classify(store, "encoder start", deadline, e, |reason| {
            WasmError::Instantiate {
                name: encoder.engine().name().to_string(),
                reason: InstantiateError::Refused(reason),
            }
        })),
        Err(_) => Err(WasmError::DeadlineExceeded {
            call: "encoder start",
            deadline,
        }),
    }
}
