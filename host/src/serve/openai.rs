//! OpenAI's routes: `POST /v1/embeddings`, `GET /v1/models` and
//! `GET /v1/models/{id}`, with errors in OpenAI's shape.
//!
//! A model is named by its id, the configured manifest's id, or its full
//! Hugging Face name (what OpenAI-style clients and the README send); any
//! other name is 404 with `code: model_not_found`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as Shared;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use super::api::{self, ApiError, Style};
use super::routes::{AppState, Asked, embed_checked};
use crate::embedder::Generation;

/// Whether `name` names the model `pool` serves (its id, the configured
/// manifest id, the name it is served under, or its full name), ignoring
/// case.
pub(super) fn serves(pool: &Generation, name: &str) -> bool {
    let name = name.trim();
    name.eq_ignore_ascii_case(&pool.info.model_id)
        || name.eq_ignore_ascii_case(pool.config.model_id())
        || name.eq_ignore_ascii_case(&pool.config.served_name())
        || pool
            .alias
            .as_deref()
            .is_some_and(|alias| name.eq_ignore_ascii_case(alias))
}

/// The id a client knows `pool`'s model by: the name its `[[models]]`
/// entry gives it, else the id the model reports.
pub(super) fn served_id(pool: &Generation) -> String {
    pool.config
        .name
        .clone()
        .unwrap_or_else(|| pool.info.model_id.to_string())
}

/// The fields of a `POST /v1/embeddings` body, read one by one.
struct EmbeddingsRequest {
    /// `input`.
    texts: Vec<String>,
    /// `model`, as the client named it.
    model: Option<String>,
    /// `encoding_format` is `base64` (else `float`).
    base64: bool,
    /// `dimensions`.
    dimensions: Option<u64>,
}

/// Reads `body`'s fields; each error names its field.
fn embeddings_request(body: Result<Bytes, BytesRejection>) -> Result<EmbeddingsRequest, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "input")?;
    let model = api::string(&map, "model")?.map(str::to_string);
    let format = api::string(&map, "encoding_format")?.unwrap_or("float");
    let base64 = match format {
        "float" => false,
        "base64" => true,
        other => {
            return Err(ApiError::bad(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
            ));
        }
    };
    let dimensions = api::integer(&map, "dimensions")?;
    Ok(EmbeddingsRequest {
        texts,
        model,
        base64,
        dimensions,
    })
}

pub(super) async fn openai_embeddings(
    Shared((state, _)): Shared<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let style = |e: ApiError| e.style(Style::OpenAi);
    let EmbeddingsRequest {
        texts,
        model,
        base64,
        dimensions,
    } = embeddings_request(body).map_err(style)?;
    let pool = state.pool_for(model.as_deref()).map_err(style)?;
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
    // OpenAI's endpoint truncates nothing silently below its own limit; the
    // model's window is shorter, so inputs are cut to it, as every
    // OpenAI-compatible server of small models does.
    // OpenAI's body has no kind: texts are documents (passages).
    let asked = Asked {
        field: "input",
        truncate: true,
        is_query: false,
        route: "/v1/embeddings",
    };
    let done = embed_checked(&state, pool, &headers, texts, asked)
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

pub(super) async fn openai_models(
    Shared((state, _)): Shared<AppState>,
) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = state
        .pools()
        .iter()
        .map(|pool| {
            json!({ "id": served_id(pool), "object": "model", "created": 0, "owned_by": "embedhost" })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// OpenAI's `GET /v1/models/{id}`: a served model under any of its names,
/// else 404.
pub(super) async fn openai_model(
    Shared((state, _)): Shared<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .pool_for(Some(&id))
        .map_err(|e| e.style(Style::OpenAi))?;
    Ok(Json(
        json!({ "id": id, "object": "model", "created": 0, "owned_by": "embedhost" }),
    ))
}
