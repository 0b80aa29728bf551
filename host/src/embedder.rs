//! The embedder as a bus peer: the `embedder.*` handlers over a backend.
//!
//! Error mapping (backend error → [`RemoteError`] code), which decides what
//! the bus may retry:
//! - a crash of the instance (trap, memory cap, lost instance) →
//!   [`ErrorCode::Unavailable`]: retryable, the next attempt runs on a fresh
//!   instance;
//! - a call past its deadline → [`ErrorCode::DeadlineExceeded`]: not
//!   retried, the same input would take as long again;
//! - an input the plugin refuses → [`ErrorCode::InvalidInput`] with its index;
//! - invalid output, a refused configuration, a model failure →
//!   [`ErrorCode::Failed`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{Empty, ErrorCode, RemoteError, RequestContext, Router};
use crate::messages::{
    EmbedRequest, EmbedResponse, EmbedderEmbed, EmbedderHandshake, EmbedderHealth,
    HandshakeResponse, HealthResponse, PROTOCOL_VERSION, Shutdown,
};
use crate::supervisor::Supervisor;
use crate::vectors::Vectors;
use crate::wasm::{PluginError, WasmError};

impl From<WasmError> for RemoteError {
    fn from(e: WasmError) -> Self {
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
                code: ErrorCode::Failed,
                message,
                index,
            },
            _ => RemoteError::new(ErrorCode::Failed, message),
        }
    }
}

/// A router serving `embedder.embed`, `embedder.health` and `shutdown` from a
/// supervised pool. The request's remaining deadline bounds the whole embed,
/// retries and poison isolation included.
pub fn supervised_router(supervisor: Supervisor) -> Router {
    let mut router = Router::new();
    let for_embed = supervisor.clone();
    router.handle::<EmbedderEmbed, _, _>(move |ctx: RequestContext, request: EmbedRequest| {
        let supervisor = for_embed.clone();
        async move {
            let deadline = ctx
                .deadline
                .unwrap_or(crate::limits::DEFAULT_REQUEST_TIMEOUT);
            let result = supervisor
                .embed(request.texts, request.is_query, deadline)
                .await?;
            Ok(EmbedResponse {
                vectors: result.vectors,
                failed: result.failed,
            })
        }
    });
    router.handle::<EmbedderHealth, _, _>(move |_, _: Empty| {
        let health = supervisor.health();
        async move {
            let health = health?;
            Ok(HealthResponse {
                memory: health.memory_bytes,
                processed_count: health.processed,
            })
        }
    });
    router.handle::<Shutdown, _, _>(|_, request| async move {
        tracing::info!(reason = %request.reason, "shutdown requested");
        Ok(Empty {})
    });
    router
}

/// A router serving the stub engine natively, in this process: the body of
/// the `embedhost child` process. It computes the same vectors as the stub
/// plugin, from the same crate.
///
/// `stop` is cancelled when the host asks the child to shut down.
pub fn native_stub_router(
    config: embedhost_stub_engine::StubConfig,
    stop: tokio_util::sync::CancellationToken,
) -> Router {
    let dimension = config.dimension;
    let engine = Arc::new(Mutex::new(embedhost_stub_engine::StubEngine::new(config)));
    // Outside the engine's lock, so a health check never waits for an embed.
    let processed = Arc::new(AtomicU64::new(0));
    let mut router = Router::new();
    let for_embed = processed.clone();
    router.handle::<EmbedderEmbed, _, _>(move |_, request: EmbedRequest| {
        let engine = engine.clone();
        let processed = for_embed.clone();
        async move {
            // CPU-bound (and, with faults, possibly endless): off the runtime,
            // so frames, cancellations and health checks keep flowing.
            let embedded = tokio::task::spawn_blocking(move || {
                let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
                let data = engine.embed(&request.texts);
                processed.fetch_add(request.texts.len() as u64, Ordering::Relaxed);
                (engine.dimension(), data)
            })
            .await;
            let (dimension, data) = embedded.map_err(|e| {
                RemoteError::new(ErrorCode::Unavailable, format!("the engine crashed: {e}"))
            })?;
            let vectors = Vectors::new(dimension, data)
                .map_err(|e| RemoteError::new(ErrorCode::Failed, e.to_string()))?;
            Ok(EmbedResponse::complete(vectors))
        }
    });
    router.handle::<EmbedderHealth, _, _>(move |_, _: Empty| {
        let processed = processed.load(Ordering::Relaxed);
        async move {
            Ok(HealthResponse {
                memory: 0,
                processed_count: processed,
            })
        }
    });
    let model = crate::wasm::ModelInfo {
        model_id: embedhost_stub_engine::MODEL_ID.to_string(),
        dimension: dimension as u32,
        max_input_tokens: embedhost_stub_engine::MAX_INPUT_TOKENS,
        normalized: true,
    };
    router.handle::<EmbedderHandshake, _, _>(move |_, _: Empty| {
        let model = model.clone();
        async move {
            Ok(HandshakeResponse {
                protocol_version: PROTOCOL_VERSION,
                model,
            })
        }
    });
    router.handle::<Shutdown, _, _>(move |_, request| {
        let stop = stop.clone();
        async move {
            tracing::info!(reason = %request.reason, "shutdown requested");
            stop.cancel();
            Ok(Empty {})
        }
    });
    router
}
