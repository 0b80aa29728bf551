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

use crate::bus::{Empty, ErrorCode, RemoteError, RequestContext, Router};
use crate::messages::{
    EmbedRequest, EmbedResponse, EmbedderEmbed, EmbedderHealth, HealthResponse, Shutdown,
};
use crate::supervisor::Supervisor;
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
                index,
                ..RemoteError::new(ErrorCode::Failed, message)
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
    let for_health = supervisor.clone();
    router.handle::<EmbedderHealth, _, _>(move |_, _: Empty| {
        let health = for_health.health();
        async move {
            let health = health?;
            Ok(HealthResponse {
                memory: health.memory_bytes,
                processed_count: health.processed,
            })
        }
    });
    // `shutdown` stops the pool in order (native children get `shutdown`
    // and their grace); later calls are refused.
    router.handle::<Shutdown, _, _>(move |_, request| {
        let supervisor = supervisor.clone();
        async move {
            tracing::info!(reason = %crate::untrusted::sanitize(&request.reason, 200), "shutdown requested");
            supervisor.shutdown().await;
            Ok(Empty {})
        }
    });
    router
}
