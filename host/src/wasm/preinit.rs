//! Loading a plugin pre-initialized: its snapshot (see [`super::snapshot`])
//! made once, or found in the artifact cache, and linked; for a
//! `model-plugin`, made with its encoder linked (see [`super::encoder`]).
//!
//! # Invariants
//! - The plugin's bytes are read (and a pinned file verified) before the
//!   cache is asked, and the snapshot's id covers them, the model's files,
//!   the `init` table and, for a `model-plugin`, its encoder's engine and
//!   settings and the encoder's bounds: a changed one makes another.
//! - A snapshot's failure is never an error: the plain plugin is loaded,
//!   and [`WasmPlugin::snapshot`] says why.

use std::sync::Arc;

use super::snapshot::{make, snapshot_id};
use super::{
    CacheOutcome, Encoder, InstanceLimits, PluginSource, SnapshotStatus, SnapshotUnavailable,
    WasmEngine, WasmError, WasmPlugin, check_header, contract, encoder, link, read,
};

impl WasmPlugin {
    /// Loads `source` pre-initialized: `init(config)` already run over the
    /// model in `model_dir`, so every instance, restarts included, starts
    /// with the model in memory. The snapshot is made once and kept in the
    /// engine's artifact cache. Where it cannot be made, the plain plugin
    /// is loaded with `model_dir` and [`WasmPlugin::snapshot`] says why.
    ///
    /// # Errors
    /// As [`WasmPlugin::load`]: a snapshot's failure is never an error.
    pub fn load_snapshot(
        engine: &WasmEngine,
        source: &PluginSource,
        model_dir: &std::path::Path,
        limits: InstanceLimits,
        config: &[(String, String)],
    ) -> Result<Self, WasmError> {
        Self::snapshot_of(engine, source, model_dir, limits, config, None)
    }

    /// [`WasmPlugin::load_snapshot`], or with `encoder` linked while `init`
    /// runs (a `model-plugin`: see [`encoder`]), the model directory then
    /// the engine's, hashed into the snapshot's id but not given to the
    /// plugin.
    pub(super) fn snapshot_of(
        engine: &WasmEngine,
        source: &PluginSource,
        model_dir: &std::path::Path,
        limits: InstanceLimits,
        config: &[(String, String)],
        encoder: Option<&Encoder>,
    ) -> Result<Self, WasmError> {
        let name = source.name();
        let bytes = read(source)?;
        check_header(&name, &bytes)?;
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // A model-plugin's state may hold what its encoder told it.
            let mut keyed = config.to_vec();
            if let Some(encoder) = encoder {
                let bound = crate::limits::ENCODER_MAX_BATCH.to_string();
                keyed.push(("\0encoder".into(), encoder.engine().sha256().into()));
                keyed.push(("\0encoder max batch".into(), bound));
                keyed.extend(encoder.config().iter().cloned());
            }
            let id = snapshot_id(&bytes, model_dir, &keyed).map_err(|source| {
                SnapshotUnavailable::Id {
                    dir: model_dir.to_path_buf(),
                    source,
                }
            })?;
            let make = || {
                tracing::info!(plugin = %name, "making a pre-initialized snapshot (once per plugin, model and settings)");
                let model = match encoder {
                    None => Some(model_dir),
                    Some(e) => match e.engine().snapshot() {
                        SnapshotStatus::Used(_) => None,
                        _ => e.engine().model_dir(),
                    },
                };
                make(engine, &name, &bytes, model, limits, config, encoder)
                    .map_err(wasmtime::Error::new)
            };
            match engine.cache() {
                Some(cache) => cache.load_or_make(engine, &id, make),
                None => make()
                    .and_then(|wasm| engine.compile(&wasm))
                    .map(|c| (c, CacheOutcome::Compiled)),
            }
            .map_err(SnapshotUnavailable::loading)
        }))
        .unwrap_or(Err(SnapshotUnavailable::Panicked));
        let reason = match made {
            Ok((component, outcome)) => match link(engine, &component) {
                Ok(pre) => {
                    return Ok(WasmPlugin {
                        name: name.into(),
                        engine: engine.clone(),
                        pre,
                        cache_outcome: outcome,
                        model_dir: encoder.is_none().then(|| Arc::from(model_dir)),
                        snapshot: SnapshotStatus::Used(outcome),
                        contract_version: contract::plugin_version(engine.engine(), &component)
                            .map(Arc::from),
                        imports_encoder: encoder::imports_encoder(engine.engine(), &component),
                        sha256: crate::files::sha256_hex(&bytes).into(),
                        encoder: encoder.map(|e| Arc::new(e.clone())),
                    });
                }
                Err(reason) => reason.into(),
            },
            Err(reason) => reason,
        };
        tracing::warn!(plugin = %name, %reason, "no snapshot; each instance runs `init` in full");
        let mut plugin = Self::from_bytes(engine, name, &bytes)?;
        plugin = match encoder {
            Some(encoder) => plugin.with_encoder(encoder.clone()),
            None => plugin.with_model_dir(model_dir),
        };
        plugin.snapshot = SnapshotStatus::Unavailable(Arc::new(reason));
        Ok(plugin)
    }

    /// Whether instances start from a pre-initialized snapshot.
    pub fn snapshot(&self) -> &SnapshotStatus {
        &self.snapshot
    }
}
