//! The service's routes: OpenAI's `/v1/embeddings` and `/v1/models`, TEI's
//! `/embed` and `/info`, `/health`, `/ready`, `/metrics`, and the worker's
//! `/search`, `/index` and `/stats`; the owner's socket adds `/embedhost/embed`
//! (per-text rows, for the CLI).
//!
//! Every embedding route takes one generation ([`State::pool`]) and goes
//! through the front door ([`crate::embedder`]) on it, so
//! requests that arrive together share batches, and a request is checked in
//! full (input count, empty and over-long inputs) before any of it is
//! queued.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::State;
use super::api::{self, ApiError};
use super::{openai, tei};
use crate::embedder::{EmbedError, Generation, Job};
use crate::limits;

/// HTTP requests, by route and status.
pub const METRIC_HTTP_REQUESTS: &str = "http_requests_total";
/// HTTP request latency, by route.
pub const METRIC_HTTP_DURATION: &str = "http_request_duration_seconds";
/// Memory of each instance, by slot, as the host measured it.
pub const METRIC_INSTANCE_MEMORY: &str = "instance_memory_bytes";
/// Texts embedded, by route.
pub const METRIC_TEXTS: &str = "embedded_texts_total";
/// HTTP requests being handled now (their body being read included).
pub const METRIC_IN_FLIGHT: &str = "http_requests_in_flight";
/// Requests holding an admission slot now (`[serve] max_concurrent_requests`).
pub const METRIC_ADMITTED: &str = "http_requests_admitted";
/// Connections open now, both listeners.
pub const METRIC_CONNECTIONS: &str = "http_connections_open";
/// Connections closed at the cap to make room for new ones, in all.
pub const METRIC_EVICTED: &str = "http_connections_evicted_total";

/// Who reaches the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The TCP listener: the API key (if set) on every route but `/health`,
    /// the concurrency limit, and `/index` only under `[serve] index_roots`.
    Network,
    /// The owner-only Unix socket: the user who runs the service, so any
    /// path they can read may be indexed.
    Owner,
}

/// The process's Prometheus recorder (installed once), and its handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let counts = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let tokens = [16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::embedder::batcher::METRIC_BATCH_SIZE.into()),
                        &counts,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::embedder::batcher::METRIC_BATCH_TOKENS.into()),
                        &tokens,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            handle
        })
        .clone()
}

/// The routes for `access`.
pub fn router(state: Arc<State>, access: Access) -> Router {
    let limit = state.settings.max_body_kb * 1024;
    let mut api = Router::new()
        .route("/v1/embeddings", post(openai::openai_embeddings))
        .route("/v1/models", get(openai::openai_models))
        .route("/v1/models/{*id}", get(openai::openai_model))
        .route("/embed", post(tei::tei_embed))
        .route("/info", get(tei::info))
        .route("/tokenize", post(tei::tokenize))
        .route("/decode", post(tei::decode))
        .route("/search", post(search))
        .route("/index", post(index_start).get(index_progress))
        .route("/stats", get(stats))
        .route("/forget", post(forget));
    if access == Access::Owner {
        api = api
            .route("/embedhost/embed", post(embedhost_embed))
            .route("/embedhost/embedder", get(embedhost_embedder));
    }
    // One admission limit for every route that costs work, taken once the
    // body is read (`admit.rs`); `route_layer`, so an unknown path is a 404,
    // not a slot.
    let api = api.route_layer(axum::middleware::from_fn_with_state(
        (state.clone(), access),
        super::admit::admit,
    ));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .merge(api)
        .fallback(tei::not_found)
        .method_not_allowed_fallback(tei::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), access),
            super::admit::read_body,
        ));
    if access == Access::Network && state.api_key.is_some() {
        app = app.layer(axum::middleware::from_fn_with_state(
            (state.clone(), access),
            authorize,
        ));
    }
    app.layer(axum::middleware::from_fn_with_state(
        (state.clone(), access),
        count,
    ))
    .layer(DefaultBodyLimit::max(limit))
    .with_state((state, access))
}

pub(super) type AppState = (Arc<State>, Access);

/// Counts every request by route and status, and times it.
async fn count(Shared((state, _)): Shared<AppState>, request: Request, next: Next) -> Response {
    let mut running = state.running();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    running.answered();
    let status = response.status().as_u16().to_string();
    metrics::counter!(METRIC_HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(METRIC_HTTP_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The API key check: `Authorization: Bearer KEY`, compared in constant
/// time; `/health` is open.
async fn authorize(Shared((state, _)): Shared<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    // RFC 9110: the scheme is case-insensitive.
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, key)| key);
    if bool::from(given.trim().as_bytes().ct_eq(key.as_bytes())) {
        return next.run(request).await;
    }
    let style = super::admit::style_of(request.uri().path());
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key: send `Authorization: Bearer KEY`",
    )
    .style(style)
    .into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(Shared((state, _)): Shared<AppState>) -> Response {
    match state.not_ready() {
        None => {
            let pool = state.pool().ok();
            Json(json!({
                "ready": true,
                "backend": pool.as_ref().map(|p| p.backend),
                "generation": pool.as_ref().map(|p| p.generation),
                "reloading": state.reloading(),
            }))
            .into_response()
        }
        Some(reason) => {
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "ready": false, "reason": reason })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

async fn render_metrics(Shared((state, _)): Shared<AppState>) -> Response {
    for pool in state.pools() {
        let model = super::openai::served_id(&pool);
        for instance in pool.status() {
            let labels = [
                ("slot", instance.slot.to_string()),
                ("model", model.clone()),
            ];
            metrics::gauge!(METRIC_INSTANCE_MEMORY, &labels).set(instance.memory_bytes as f64);
        }
    }
    metrics::gauge!(METRIC_IN_FLIGHT).set(state.in_flight() as f64);
    let free = state.admission.available_permits();
    metrics::gauge!(METRIC_ADMITTED)
        .set(state.settings.max_concurrent_requests.saturating_sub(free) as f64);
    metrics::gauge!(METRIC_CONNECTIONS).set(state.connections.open() as f64);
    metrics::counter!(METRIC_EVICTED).absolute(state.connections.evicted());
    state.prometheus.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// How a route asks for its texts to be embedded.
pub(super) struct Asked {
    /// The body's field holding the texts (named by errors).
    pub(super) field: &'static str,
    /// Cut texts past the model's window (else refuse them).
    pub(super) truncate: bool,
    /// Queries (else documents): which prompt the model's form puts first.
    pub(super) is_query: bool,
    /// The route, for the metrics.
    pub(super) route: &'static str,
}

/// Texts checked against the limits and embedded: one row per text.
pub(super) struct Embedded {
    pub(super) pool: Arc<Generation>,
    pub(super) rows: Vec<Vec<f32>>,
    pub(super) tokens: usize,
}

/// Checks the request's shape (count, emptiness), then embeds `texts`
/// through the front door on `pool`, the generation the route took once
/// (over the model's window only if `truncate`); a text that fails fails
/// the request with 422 naming it.
pub(super) async fn embed_checked(
    state: &State,
    pool: Arc<Generation>,
    headers: &HeaderMap,
    texts: Vec<String>,
    asked: Asked,
) -> Result<Embedded, ApiError> {
    let Asked {
        field,
        truncate,
        is_query,
        route,
    } = asked;
    let deadline = state.deadline(headers)?;
    if texts.is_empty() {
        return Err(ApiError::bad(field, format!("`{field}` has no texts")));
    }
    if texts.len() > state.settings.max_inputs {
        return Err(ApiError::over_limit(
            field,
            format!(
                "`{field}` has {} texts; at most {} are accepted per request ([serve] max_inputs)",
                texts.len(),
                state.settings.max_inputs
            ),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::bad(field, format!("`{field}[{i}]` is empty")));
    }
    let n = texts.len();
    let mut job = Job::new(texts).query(is_query).deadline(deadline).guarded();
    if !truncate {
        job = job.strict();
    }
    let embedding = |e| out_of_time(e, field, deadline);
    let prepared = state
        .embedder
        .prepare(&pool, job)
        .await
        .map_err(embedding)?;
    let done = prepared.run().await.map_err(embedding)?;
    let mut vectors = Vec::with_capacity(n);
    for (i, row) in done.rows.into_iter().enumerate() {
        match row {
            Ok(v) => vectors.push(v),
            Err(reason) => {
                return Err(ApiError {
                    param: Some(field.to_string()),
                    ..ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("`{field}[{i}]` could not be embedded: {reason}"),
                    )
                });
            }
        }
    }
    metrics::counter!(METRIC_TEXTS, "route" => route).increment(n as u64);
    Ok(Embedded {
        pool: done.generation,
        rows: vectors,
        tokens: done.tokens,
    })
}

/// The front door's error as the client's answer; running out of time
/// says how long the request had.
fn out_of_time(e: EmbedError, field: &str, deadline: std::time::Duration) -> ApiError {
    use crate::supervisor::SupervisorError;
    match e {
        EmbedError::Supervisor(SupervisorError::DeadlineExceeded(_)) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request ran out of its {} ms deadline (the {} header, else [serve] request_deadline_ms)",
                deadline.as_millis(),
                super::DEADLINE_HEADER
            ),
        ),
        other => ApiError::embedding(other, field),
    }
}

/// The CLI's `embed` through the owner's socket: one row per text, a
/// vector or the reason it failed, so one bad text does not hide the rest.
async fn embedhost_embed(
    Shared((state, _)): Shared<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "texts")?;
    let is_query = api::boolean(&map, "query", false)?;
    let job = Job::new(texts)
        .query(is_query)
        .deadline(state.deadline(&headers)?);
    let done = state
        .embedder
        .embed(job)
        .await
        .map_err(|e| ApiError::embedding(e, "texts"))?;
    let rows: Vec<Value> = done
        .rows
        .into_iter()
        .map(|row| match row {
            Ok(v) => json!({ "vector": v }),
            Err(e) => json!({ "error": e.0 }),
        })
        .collect();
    let pool = done.generation;
    Ok(Json(
        json!({ "model": pool.info.model_id, "backend": pool.backend, "rows": rows }),
    ))
}

/// `GET /embedhost/embedder` (owner only): the identity of the embedder
/// serving (`Config::embedder_id`: backend, plugin or engine, model,
/// settings), so the CLI uses this service only when it would run the same.
async fn embedhost_embedder(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool()?;
    Ok(Json(json!({ "embedder_id": pool.config.embedder_id() })))
}

async fn search(
    Shared((state, _)): Shared<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let map = api::object(body)?;
    let query = api::string(&map, "query")?
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| ApiError::bad("query", "`query` is required and must not be empty"))?
        .to_string();
    let limit = api::integer(&map, "limit")?.unwrap_or(10);
    if limit == 0 || limit > limits::SERVE_MAX_SEARCH_LIMIT as u64 {
        return Err(ApiError::bad(
            "limit",
            format!(
                "`limit` must be between 1 and {}",
                limits::SERVE_MAX_SEARCH_LIMIT
            ),
        ));
    }
    let mode = match api::string(&map, "mode")? {
        None => crate::messages::SearchMode::default(),
        Some(m) => m.parse().map_err(|e: crate::messages::UnknownSearchMode| {
            ApiError::bad("mode", format!("`mode`: {e}"))
        })?,
    };
    let worker = state.worker()?;
    let results = worker
        .search_mode(query, limit as usize, mode)
        .await
        .map_err(worker_error)?;
    Ok(Json(serde_json::to_value(results).unwrap_or_default()))
}

fn worker_error(e: crate::worker::WorkerError) -> ApiError {
    let remote = crate::bus::RemoteError::from(e);
    let status = match remote.code {
        crate::bus::ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        crate::bus::ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        crate::bus::ErrorCode::InvalidInput | crate::bus::ErrorCode::InvalidRequest => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut error = ApiError::new(status, remote.message);
    if let Some(ms) = remote.retry_after_ms {
        error = error.retry_after(std::time::Duration::from_millis(ms));
    }
    error
}

async fn index_start(
    Shared((state, access)): Shared<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let map = api::object(body)?;
    let paths = api::texts(&map, "paths")?;
    if paths.is_empty() {
        return Err(ApiError::bad("paths", "`paths` has no paths"));
    }
    let mut resolved = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        // Outside the roots by its text (`..` resolved) is refused before
        // anything is looked up, so the answer is the same whether such a
        // path exists or not.
        let field = format!("paths[{i}]");
        let lexical = crate::worker::lexical_absolute(std::path::Path::new(path))
            .map_err(|e| ApiError::bad("paths", format!("`{field}` (`{path}`): {e}")))?;
        within_roots(&state, access, &field, path, &lexical)?;
        let real = std::fs::canonicalize(&lexical).map_err(|e| {
            ApiError::bad(
                "paths",
                format!("`paths[{i}]` (`{path}`) cannot be read: {e}"),
            )
        })?;
        within_roots(&state, access, &format!("paths[{i}]"), path, &real)?;
        resolved.push(real);
    }
    let worker = state.worker()?;
    let id = state.start_index(worker, resolved.clone());
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": id, "paths": resolved })),
    )
        .into_response())
}

/// Refuses a path outside `[serve] index_roots` to a caller off loopback:
/// the service reads and forgets only what its owner allowed.
fn within_roots(
    state: &super::State,
    access: Access,
    field: &str,
    path: &str,
    real: &std::path::Path,
) -> Result<(), ApiError> {
    if access != Access::Network || state.roots.iter().any(|root| real.starts_with(root)) {
        return Ok(());
    }
    let allowed: Vec<String> = state
        .roots
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    let param = field.split('[').next().unwrap_or(field);
    Err(ApiError {
        param: Some(param.into()),
        ..ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{field}` (`{path}`) is outside the folders this service may index ([serve] index_roots: {})",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            ),
        )
    })
}

/// `POST /forget {"path": ...}`: removes an indexed root (or any folder or
/// file in one) and its chunks. The path need not exist any more.
async fn forget(
    Shared((state, access)): Shared<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let map = api::object(body)?;
    let Some(path) = api::string(&map, "path")? else {
        return Err(ApiError::bad("path", "`path` is missing"));
    };
    let lexical = crate::worker::lexical_absolute(std::path::Path::new(path))
        .map_err(|e| ApiError::bad("path", format!("`path` (`{path}`): {e}")))?;
    within_roots(&state, access, "path", path, &lexical)?;
    let real = crate::worker::forget_path(&lexical)
        .map_err(|e| ApiError::bad("path", format!("`path` (`{path}`): {e}")))?;
    within_roots(&state, access, "path", path, &real)?;
    let worker = state.worker()?;
    match worker.forget(&real).await {
        Ok(chunks) => {
            state.rewatch().await;
            Ok(Json(json!({ "path": real, "chunks": chunks })))
        }
        Err(e @ crate::worker::WorkerError::NotIndexed(_)) => Err(ApiError {
            param: Some("path".into()),
            ..ApiError::new(StatusCode::NOT_FOUND, e.to_string())
        }),
        Err(e) => Err(worker_error(e)),
    }
}

async fn index_progress(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let worker = state.worker()?;
    let stats = worker.stats().await.map_err(worker_error)?;
    let mut body = serde_json::to_value(stats).unwrap_or_default();
    body["jobs"] = serde_json::to_value(state.jobs()).unwrap_or_default();
    Ok(Json(body))
}

async fn stats(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let worker = state.worker()?;
    let stats = worker.stats().await.map_err(worker_error)?;
    let mut body = serde_json::to_value(stats).unwrap_or_default();
    body["roots"] =
        serde_json::to_value(worker.roots().await.map_err(worker_error)?).unwrap_or_default();
    body["watching"] = serde_json::to_value(state.watched().await).unwrap_or_default();
    if let Ok(pool) = state.pool() {
        body["model_id"] = pool.info.model_id.as_str().into();
        body["restarts"] = serde_json::to_value(pool.restarts()).unwrap_or_default();
    }
    body["db"] = state.db.display().to_string().into();
    Ok(Json(body))
}
