//! The stub embedder plugin: `embedhost-stub-engine` behind the WIT contract.
//!
//! Everything it computes, and every fault it injects, comes from the shared
//! engine crate, so this component and the native stub engine give the same
//! vectors bit for bit. The plugin's own job is only the contract: parse the
//! config table in `init`, refuse calls before it, report health.

use std::sync::Mutex;

use embedhost_stub_engine::{MAX_INPUT_TOKENS, MODEL_ID, StubConfig, StubEngine};

wit_bindgen::generate!({
    path: "../../wit",
    world: "plugin",
});

use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use embedhost_plugin_support::linear_memory_bytes;
use exports::embedhost::embedder::embedder::Guest;

static ENGINE: Mutex<Option<StubEngine>> = Mutex::new(None);

struct Stub;

impl Guest for Stub {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let parsed = StubConfig::from_pairs(config.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| EmbedError::InvalidConfig(e.to_string()))?;
        let dimension = parsed.dimension as u32;
        host_log::log(
            Level::Debug,
            &format!(
                "stub initialised: dimension {dimension}, faults {:?}",
                parsed.faults
            ),
        );
        *lock() = Some(StubEngine::new(parsed));
        Ok(ModelInfo {
            model_id: MODEL_ID.to_string(),
            dimension,
            max_input_tokens: MAX_INPUT_TOKENS,
            normalized: true,
        })
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let mut guard = lock();
        let engine = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let data = engine.embed(&texts);
        Ok(Embeddings {
            dimension: engine.dimension() as u32,
            data,
        })
    }

    fn health() -> HealthReport {
        let processed = lock().as_ref().map_or(0, StubEngine::processed);
        HealthReport {
            memory_bytes: linear_memory_bytes(),
            processed,
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<StubEngine>> {
    embedhost_plugin_support::lock(&ENGINE)
}

export!(Stub);
