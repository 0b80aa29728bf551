//! The front door as a bus peer: every `embedder.*` verb, answered the same
//! whoever asks (a NATS member of `serve`, or an in-process bus), over an
//! [`Embedder`].
//!
//! Verbs: `embedder.handshake` (protocol and model), `embedder.embed` (a
//! [`Job`] through the front door, the caller's remaining deadline its
//! deadline), `embedder.health` (the pool's memory and texts processed),
//! `model.check` (the serving model's files present and verified by
//! size) and `shutdown`, which only the owner's peer honours: a NATS
//! member refuses it, since anyone on the server could send it.
//!
//! `model.download` is not in the catalogue: fetching is `embedhost model
//! fetch`, never a side effect a peer may trigger.

use std::sync::Arc;

use super::{EmbedError, Embedder, Job, Row};
use crate::bus::{Empty, ErrorCode, RemoteError, RequestContext, Router};
use crate::config::Config;
use crate::messages::{
    EmbedRequest, EmbedResponse, EmbedderEmbed, EmbedderHandshake, EmbedderHealth, FailedInput,
    HandshakeResponse, HealthResponse, ModelCheck, ModelCheckResponse, PROTOCOL_VERSION, Shutdown,
};
use crate::vectors::Vectors;

/// Who the peer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The process that owns the pool: `shutdown` stops it.
    Owner,
    /// A member of a shared pool (NATS): `shutdown` is refused.
    Member,
}

/// A router serving every `embedder.*` verb through `embedder`.
pub fn router(embedder: Arc<Embedder>, role: Role) -> Router {
    let mut router = Router::new();
    let front = embedder.clone();
    router.handle::<EmbedderHandshake, _, _>(move |_, _: Empty| {
        let generation = front.generation();
        async move {
            Ok(HandshakeResponse {
                protocol_version: PROTOCOL_VERSION,
                model: generation.map_err(RemoteError::from)?.info.clone(),
            })
        }
    });
    let front = embedder.clone();
    router.handle::<EmbedderEmbed, _, _>(move |ctx: RequestContext, request: EmbedRequest| {
        let front = front.clone();
        async move {
            let deadline = ctx
                .deadline
                .unwrap_or(crate::limits::DEFAULT_REQUEST_TIMEOUT);
            let job = Job::new(request.texts)
                .query(request.is_query)
                .deadline(deadline);
            let done = front.embed(job).await?;
            Ok(response(done.rows, done.generation.info.dimension as usize))
        }
    });
    let front = embedder.clone();
    router.handle::<EmbedderHealth, _, _>(move |_, _: Empty| {
        let front = front.clone();
        async move {
            let generation = front.generation()?;
            let health = generation
                .health()
                .await
                .map_err(|e| RemoteError::from(EmbedError::from(e)))?;
            Ok(HealthResponse {
                memory: health.memory_bytes,
                processed_count: health.processed,
            })
        }
    });
    let front = embedder.clone();
    router.handle::<ModelCheck, _, _>(move |_, _: Empty| {
        let generation = front.generation();
        async move {
            let generation = generation?;
            let config = generation.config.clone();
            let mut checked = tokio::task::spawn_blocking(move || check_model(&config))
                .await
                .map_err(|e| RemoteError::new(ErrorCode::Failed, e.to_string()))?;
            // Where the files are is the owner's business, not the server's.
            if role == Role::Member {
                checked.path = None;
            }
            Ok(checked)
        }
    });
    router.handle::<Shutdown, _, _>(move |_, request| {
        let embedder = embedder.clone();
        async move {
            if role == Role::Member {
                return Err(RemoteError::new(
                    ErrorCode::InvalidRequest,
                    "a pool member is stopped by its own host, not over the bus",
                ));
            }
            tracing::info!(reason = %crate::untrusted::sanitize(&request.reason, 200), "shutdown requested");
            if let Some(generation) = embedder.take() {
                generation.shutdown().await;
            }
            Ok(Empty {})
        }
    });
    router
}

/// Whether `config`'s model files are there, checked by size (a full
/// check re-hashes every file: `embedhost model check`).
pub fn check_model(config: &Config) -> ModelCheckResponse {
    if !config.uses_model_files() {
        return ModelCheckResponse {
            exists: true,
            path: None,
        };
    }
    if let Some(dir) = &config.model.dir {
        return ModelCheckResponse {
            exists: dir.is_dir(),
            path: Some(dir.clone()),
        };
    }
    let (Ok(manifest), Ok(store)) = (
        crate::model::manifest(config.model_id()),
        crate::model::ModelStore::from_env(),
    ) else {
        return ModelCheckResponse {
            exists: false,
            path: None,
        };
    };
    let needed: Vec<String> = manifest
        .files_for(Some(config.model_use()))
        .into_iter()
        .map(|f| f.name.clone())
        .collect();
    let exists = store
        .check(&manifest, false)
        .iter()
        .filter(|(name, _)| needed.contains(name))
        .all(|(_, state)| matches!(state, crate::model::FileState::Present));
    ModelCheckResponse {
        exists,
        path: Some(store.dir(&manifest)),
    }
}

/// Rows as the bus's `EmbedResponse`.
pub fn response(rows: Vec<Row>, dimension: usize) -> EmbedResponse {
    let mut data = Vec::new();
    let mut failed = Vec::new();
    for (i, row) in rows.into_iter().enumerate() {
        match row {
            Ok(v) => data.extend(v),
            Err(reason) => failed.push(FailedInput {
                index: i as u32,
                reason: reason.0,
            }),
        }
    }
    EmbedResponse {
        vectors: Vectors::new(dimension, data).unwrap_or_default(),
        failed,
    }
}
