//! TEI's routes: `POST /embed`, `GET /info`, and the 404 and 405 of every
//! path, in the shape of the API the path belongs to.
//!
//! What TEI's clients send is honoured or refused with 400 naming the
//! field, never ignored: `normalize: false` for a model that normalizes its
//! vectors itself, `truncation_direction: Left` and `prompt_name` are
//! refused. Validation errors (sizes, counts) are 413, as TEI answers them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as Shared;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::api::{self, ApiError};
use super::pool::Pool;
use super::routes::{AppState, embed_checked};

pub(super) async fn tei_embed(
    Shared((state, _)): Shared<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "inputs")?;
    let normalize = api::boolean(&map, "normalize", true)?;
    let truncate = api::boolean(&map, "truncate", false)?;
    tei_unsupported(&map)?;
    let pool = state.pool()?;
    if !normalize && pool.info.normalized {
        return Err(ApiError::bad(
            "normalize",
            format!(
                "`normalize: false` cannot be honoured: `{}` normalizes its vectors itself",
                pool.info.model_id
            ),
        ));
    }
    drop(pool);
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

/// Refuses, naming the field, what TEI's `/embed` accepts and this service
/// cannot honour: a left `truncation_direction`, a `prompt_name` (the
/// served models have no prompts).
fn tei_unsupported(map: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match api::string(map, "truncation_direction")? {
        None => {}
        Some(d) if d.eq_ignore_ascii_case("right") => {}
        Some(d) => {
            return Err(ApiError::bad(
                "truncation_direction",
                format!(
                    "`truncation_direction` `{}` is not supported: inputs are cut on the right",
                    crate::untrusted::sanitize(d, 64)
                ),
            ));
        }
    }
    if api::string(map, "prompt_name")?.is_some() {
        return Err(ApiError::bad(
            "prompt_name",
            "`prompt_name` is not supported: the served model has no prompts",
        ));
    }
    Ok(())
}

pub(super) async fn info(Shared((state, _)): Shared<AppState>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool()?;
    Ok(Json(json!({
        "model_id": pool.info.model_id,
        "model_dtype": dtype(&pool),
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

/// The numbers the model runs in, as TEI names them.
fn dtype(pool: &Pool) -> &'static str {
    use crate::config::{Backend, Precision};
    let config = &pool.config;
    match config.backend {
        Backend::Native if config.native.engine == "stub" => "float32",
        Backend::Native => match config.native.precision {
            Precision::Fp32 => "float32",
            Precision::Int8 => "int8",
        },
        Backend::Wasm => match config
            .plugin
            .config
            .get("precision")
            .map(ToString::to_string)
        {
            Some(p) if p.contains("fp32") => "float32",
            Some(p) if p.contains("int8") => "int8",
            // The built-in BERT plugin runs int8 unless told otherwise.
            _ if config.plugin.path.is_none() => "int8",
            _ => "float32",
        },
    }
}

/// 404 in the shape of the API the path belongs to.
pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    let path = crate::untrusted::sanitize(uri.path(), 256);
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("there is no route `{path}` (see GET /info and the README's route table)"),
    )
    .style(super::admit::style_of(uri.path()))
}

/// 405 in the shape of the API the path belongs to.
pub(super) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    let path = crate::untrusted::sanitize(uri.path(), 256);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("`{path}` does not answer {method}"),
    )
    .style(super::admit::style_of(uri.path()))
}
