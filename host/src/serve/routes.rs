//! The service's routes: OpenAI's `/v1/embeddings` and `/v1/models`, TEI's
//! `/embed` and `/info`, `/health`, `/ready`, `/metrics`, and the worker's
//! `/search`, `/index` and `/stats`; the owner's socket adds `/embedhost/embed`
//! (per-text rows, for the CLI).
//!
//! Every embedding route goes through [`State::pool`] and the batcher, so
//! requests that arrive together share batches, and a request is checked in
//! full (input count, empty and over-long inputs) before any of it is
//! queued.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::State;
use super::api::{self, ApiError, Style};
use super::pool::Pool;
use crate::limits;

/// HTTP requests, by route and status.
pub const METRIC_HTTP_REQUESTS: &str = "http_requests_total";
/// HTTP request latency, by route.
pub const METRIC_HTTP_DURATION: &str = "http_request_duration_seconds";
/// Memory of each instance, by slot, as the host measured it.
pub const METRIC_INSTANCE_MEMORY: &str = "instance_memory_bytes";
/// Texts embedded, by route.
pub const METRIC_TEXTS: &str = "embedded_texts_total";

/// Texts up to this many bytes in all are tokenized on the request's own
/// task: a sentence takes microseconds, less than a hand-off to a blocking
/// thread.
const INLINE_TOKENIZE_BYTES: usize = 4096;

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
                        Matcher::Full(super::batcher::METRIC_BATCH_SIZE.into()),
                        &counts,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(super::batcher::METRIC_BATCH_TOKENS.into()),
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
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/models", get(openai_models))
        .route("/embed", post(tei_embed))
        .route("/info", get(info))
        .route("/search", post(search))
        .route("/index", post(index_start).get(index_progress))
        .route("/stats", get(stats))
        .route("/forget", post(forget))
        .route("/metrics", get(render_metrics));
    if access == Access::Owner {
        api = api.route("/embedhost/embed", post(embedhost_embed));
    }
    let overloaded = |_: tower::BoxError| async {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests at once; retry shortly",
        )
        .retry_after(limits::SERVE_RETRY_AFTER)
    };
    let api = api.layer(
        tower::ServiceBuilder::new()
            .layer(HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(state.settings.max_concurrent_requests),
    );
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(api);
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

type AppState = (Arc<State>, Access);

/// Counts every request by route and status, and times it.
async fn count(Shared((state, _)): Shared<AppState>, request: Request, next: Next) -> Response {
    let _running = state.running();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
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
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.trim().as_bytes().ct_eq(key.as_bytes())) {
        return next.run(request).await;
    }
    let style = if request.uri().path().starts_with("/v1/") {
        Style::OpenAi
    } else {
        Style::Tei
    };
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
    if let Ok(pool) = state.pool() {
        for instance in pool.status() {
            metrics::gauge!(METRIC_INSTANCE_MEMORY, "slot" => instance.slot.to_string())
                .set(instance.memory_bytes as f64);
        }
    }
    state.prometheus.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// Texts checked against the limits and embedded: one row per text.
struct Embedded {
    pool: Arc<Pool>,
    rows: Vec<Vec<f32>>,
    tokens: usize,
}

/// Checks `texts` (count, emptiness, tokens; over the model's window only
/// if `truncate` is false) and embeds them; a text that fails fails the
/// request with 422 naming it.
async fn embed_checked(
    state: &State,
    headers: &HeaderMap,
    field: &str,
    texts: Vec<String>,
    truncate: bool,
    route: &'static str,
) -> Result<Embedded, ApiError> {
    let deadline = state.deadline(headers)?;
    let until = tokio::time::Instant::now() + deadline;
    if texts.is_empty() {
        return Err(ApiError::bad(field, format!("`{field}` has no texts")));
    }
    if texts.len() > state.settings.max_inputs {
        return Err(ApiError::bad(
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
    let pool = state.pool()?;
    // A few short texts are counted here; more go to a blocking thread, so
    // a large request does not hold up the runtime's other requests.
    let bytes: usize = texts.iter().map(String::len).sum();
    let (texts, counted) = if bytes <= INLINE_TOKENIZE_BYTES {
        let counted = pool.count_tokens(&texts);
        (texts, counted)
    } else {
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || {
            let counted = pool.count_tokens(&texts);
            (texts, counted)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let counts = counted.map_err(|(i, e)| {
        ApiError::bad(field, format!("`{field}[{i}]` cannot be tokenized: {e}"))
    })?;
    let window = pool.info.max_input_tokens as usize;
    for (i, &n) in counts.iter().enumerate() {
        if n > limits::SERVE_MAX_INPUT_TOKENS {
            return Err(ApiError::bad(
                field,
                format!(
                    "`{field}[{i}]` has {n} tokens; at most {} are accepted per input",
                    limits::SERVE_MAX_INPUT_TOKENS
                ),
            ));
        }
        if !truncate && n > window {
            return Err(ApiError::bad(
                field,
                format!(
                    "`{field}[{i}]` has {n} tokens; the model reads at most {window} (send `truncate: true` to cut it)"
                ),
            ));
        }
    }
    let total: usize = counts.iter().map(|&n| n.min(window)).sum();
    let n = texts.len();
    let rows = pool.embed(texts, &counts, false, until).await?;
    let mut vectors = Vec::with_capacity(n);
    for (i, row) in rows.into_iter().enumerate() {
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
        pool,
        rows: vectors,
        tokens: total,
    })
}

/// Whether `name` names the served model (its id, or the configured
/// manifest id), ignoring case.
fn serves(pool: &Pool, name: &str) -> bool {
    let name = name.trim();
    name.eq_ignore_ascii_case(&pool.info.model_id)
        || name.eq_ignore_ascii_case(pool.config.model_id())
}

async fn openai_embeddings(
    Shared((state, _)): Shared<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let style = |e: ApiError| e.style(Style::OpenAi);
    let map = api::object(body).map_err(style)?;
    let texts = api::texts(&map, "input").map_err(style)?;
    let model = api::string(&map, "model")
        .map_err(style)?
        .map(str::to_string);
    let format = api::string(&map, "encoding_format")
        .map_err(style)?
        .unwrap_or("float");
    let base64 = match format {
        "float" => false,
        "base64" => true,
        other => {
            return Err(style(ApiError::bad(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
            )));
        }
    };
    let dimensions = api::integer(&map, "dimensions").map_err(style)?;
    let pool = state.pool().map_err(style)?;
    if let Some(model) = &model
        && !serves(&pool, model)
    {
        return Err(style(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{model}` is not served here; this service serves `{}`",
                    pool.info.model_id
                ),
            )
        }));
    }
    if let Some(d) = dimensions
        && d != u64::from(pool.info.dimension)
    {
        return Err(style(ApiError::bad(
            "dimensions",
            format!(
                "`dimensions` is {d}, but `{}` gives {} dimensions and cannot shorten its vectors",
                pool.info.model_id, pool.info.dimension
            ),
        )));
    }
    drop(pool);
    // OpenAI's endpoint truncates nothing silently below its own limit; the
    // model's window is shorter, so inputs are cut to it, as every
    // OpenAI-compatible server of small models does.
    let done = embed_checked(&state, &headers, "input", texts, true, "/v1/embeddings")
        .await
        .map_err(style)?;
    let data: Vec<Value> = done
        .rows
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.unwrap_or_else(|| done.pool.info.model_id.to_string()),
        "usage": { "prompt_tokens": done.tokens, "total_tokens": done.tokens },
    }))
    .into_response())
}

async fn openai_models(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool().map_err(|e| e.style(Style::OpenAi))?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": pool.info.model_id, "object": "model", "created": 0, "owned_by": "embedhost" }],
    })))
}

async fn tei_embed(
    Shared((state, _)): Shared<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "inputs")?;
    let normalize = api::boolean(&map, "normalize", true)?;
    let truncate = api::boolean(&map, "truncate", false)?;
    let mut done = embed_checked(&state, &headers, "inputs", texts, truncate, "/embed").await?;
    if normalize && !done.pool.info.normalized {
        for v in &mut done.rows {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }
    Ok(Json(done.rows))
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
    let until = tokio::time::Instant::now() + state.deadline(&headers)?;
    let pool = state.pool()?;
    let counts = pool.batch_tokens(&texts);
    let rows = pool.embed(texts, &counts, is_query, until).await?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|row| match row {
            Ok(v) => json!({ "vector": v }),
            Err(e) => json!({ "error": e }),
        })
        .collect();
    Ok(Json(
        json!({ "model": pool.info.model_id, "backend": pool.backend, "rows": rows }),
    ))
}

async fn info(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool()?;
    Ok(Json(json!({
        "model_id": pool.info.model_id,
        "model_dtype": "float32",
        "model_type": { "embedding": { "pooling": "mean" } },
        "dimension": pool.info.dimension,
        "max_input_length": pool.info.max_input_tokens,
        "normalized": pool.info.normalized,
        "max_concurrent_requests": state.settings.max_concurrent_requests,
        "max_batch_tokens": state.settings.max_batch_tokens,
        "max_client_batch_size": state.settings.max_inputs,
        "backend": pool.backend,
        "engine": pool.engine_name,
        "generation": pool.generation,
        "pool_size": pool.status().len(),
        "served_calls": pool.status().iter().map(|i| i.served).sum::<u64>(),
        "version": env!("CARGO_PKG_VERSION"),
    })))
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
        Some(m) => m
            .parse()
            .map_err(|e: String| ApiError::bad("mode", format!("`mode`: {e}")))?,
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
        let real = std::fs::canonicalize(path).map_err(|e| {
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
    let real = crate::worker::forget_path(std::path::Path::new(path))
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
