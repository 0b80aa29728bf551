//! TEI's routes: `POST /embed`, `POST /tokenize`, `POST /decode`,
//! `GET /info`, and the 404 and 405 of every path, in the shape of the API
//! the path belongs to.
//!
//! What TEI's clients send is honoured or refused with 400 naming the
//! field, never ignored: `normalize: false` for a model that normalizes its
//! vectors itself, `truncation_direction: Left`, and a `prompt_name` the
//! model has no prompt for are refused. Validation errors (sizes, counts) are 413, as TEI answers them.
//! A service of several models (`[[models]]`) takes `?model=NAME` on
//! `/embed`, `/info`, `/tokenize` and `/decode`; without it, the default
//! model answers, as TEI's one model does.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::api::{self, ApiError};
use super::routes::{AppState, Asked, embed_checked};
use crate::embedder::Generation;
use crate::limits;

/// `?model=NAME`: which of the served models a TEI route is for (TEI
/// serves one model, so its bodies have no field for it); the default
/// model without it.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ModelParam {
    model: Option<String>,
}

/// The generation `param` names (see [`super::State::pool_for`]).
pub(super) fn pool_named(
    state: &super::State,
    param: Result<Query<ModelParam>, QueryRejection>,
) -> Result<std::sync::Arc<Generation>, ApiError> {
    let Query(param) = param.map_err(|e| ApiError::bad("model", format!("bad query: {e}")))?;
    state.pool_for(param.model.as_deref())
}

pub(super) async fn tei_embed(
    Shared((state, _)): Shared<AppState>,
    param: Result<Query<ModelParam>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "inputs")?;
    let normalize = api::boolean(&map, "normalize", true)?;
    let truncate = api::boolean(&map, "truncate", false)?;
    tei_unsupported(&map)?;
    let pool = pool_named(&state, param)?;
    let is_query = prompt_kind(&map, &pool)?;
    if !normalize && pool.info.normalized {
        return Err(ApiError::bad(
            "normalize",
            format!(
                "`normalize: false` cannot be honoured: `{}` normalizes its vectors itself",
                pool.info.model_id
            ),
        ));
    }
    let asked = Asked {
        field: "inputs",
        truncate,
        is_query,
        route: "/embed",
    };
    let mut done = embed_checked(&state, pool, &headers, texts, asked).await?;
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
    Ok(())
}

/// TEI's `prompt_name`: `query` embeds queries; `document`, `passage` or
/// `corpus` (or none) documents, each with the model's prompt for its kind.
/// A name the model has no prompt for is refused, naming it.
fn prompt_kind(map: &serde_json::Map<String, Value>, pool: &Generation) -> Result<bool, ApiError> {
    let Some(name) = api::string(map, "prompt_name")? else {
        return Ok(false);
    };
    let is_query = match name {
        "query" => true,
        "document" | "passage" | "corpus" => false,
        other => {
            return Err(ApiError::bad(
                "prompt_name",
                format!(
                    "`prompt_name` `{}` is not one of query, document, passage, corpus",
                    crate::untrusted::sanitize(other, 64)
                ),
            ));
        }
    };
    if pool.form.prompt(is_query).is_none() {
        return Err(ApiError::bad(
            "prompt_name",
            format!(
                "`prompt_name` `{name}` is not supported: `{}` has no prompt for it",
                pool.info.model_id
            ),
        ));
    }
    Ok(is_query)
}

pub(super) async fn info(
    Shared((state, _)): Shared<AppState>,
    param: Result<Query<ModelParam>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let pool = pool_named(&state, param)?;
    Ok(Json(json!({
        "model_id": pool.info.model_id,
        "model_dtype": dtype(&pool),
        "model_type": { "embedding": { "pooling": pooling(&pool) } },
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

/// How the model pools, as its configuration asks (a plugin of its own may
/// pool otherwise, unknown to the host).
fn pooling(pool: &Generation) -> &'static str {
    pool.config.pooling().name()
}

/// The numbers the model runs in, as TEI names them.
fn dtype(pool: &Generation) -> &'static str {
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

/// The model's tokenizer, or 501 if the host has none for it (the stub
/// counts words and has no vocabulary).
fn encoder(pool: &Generation) -> Result<std::sync::Arc<embedhost_text::TextEncoder>, ApiError> {
    match &pool.tokens {
        crate::worker::chunk::Tokens::Model(encoder) => Ok(encoder.clone()),
        crate::worker::chunk::Tokens::Words => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "`{}` has no tokenizer the host can read (it counts words), so there are no token ids to show",
                pool.info.model_id
            ),
        )),
    }
}

/// TEI's `POST /tokenize`: `inputs` (a string or an array),
/// `add_special_tokens` (default true); an array of tokens per input.
pub(super) async fn tokenize(
    Shared((state, _)): Shared<AppState>,
    param: Result<Query<ModelParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<Shown>>>, ApiError> {
    let map = api::object(body)?;
    let texts = api::texts(&map, "inputs")?;
    let special = api::boolean(&map, "add_special_tokens", true)?;
    if api::string(&map, "prompt_name")?.is_some() {
        return Err(ApiError::bad(
            "prompt_name",
            "`prompt_name` is not supported: the served model has no prompts",
        ));
    }
    if texts.len() > state.settings.max_inputs {
        return Err(ApiError::over_limit(
            "inputs",
            format!(
                "`inputs` has {} texts; at most {} are accepted per request ([serve] max_inputs)",
                texts.len(),
                state.settings.max_inputs
            ),
        ));
    }
    super::admit::check_words("inputs", &texts)?;
    let encoder = encoder(&*pool_named(&state, param)?)?;
    let bytes = texts.iter().map(String::len).sum();
    let tokens = super::admit::tokenizing(state.embedder.tokenizing_budget(), bytes, move || {
        let mut total = 0usize;
        let mut out = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let list = encoder
                .tokens(text, special)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
            total += list.len();
            if list.len() > limits::SERVE_MAX_INPUT_TOKENS || total > limits::SERVE_MAX_TOKENIZE_TOKENS
            {
                return Err(ApiError::over_limit(
                    "inputs",
                    format!(
                        "`inputs[{i}]` brings the request to {total} tokens ({} in it); at most {} an input and {} a request are shown (limits::SERVE_MAX_INPUT_TOKENS, SERVE_MAX_TOKENIZE_TOKENS)",
                        list.len(),
                        limits::SERVE_MAX_INPUT_TOKENS,
                        limits::SERVE_MAX_TOKENIZE_TOKENS
                    ),
                ));
            }
            out.push(list.into_iter().map(Shown::from).collect::<Vec<_>>());
        }
        Ok(out)
    })
    .await??;
    Ok(Json(tokens))
}

/// One token as TEI shows it (serialized directly, no `Value` per field).
#[derive(serde::Serialize)]
pub(super) struct Shown {
    id: u32,
    text: String,
    special: bool,
    start: Option<usize>,
    stop: Option<usize>,
}

impl From<embedhost_text::Token> for Shown {
    fn from(t: embedhost_text::Token) -> Self {
        Shown {
            id: t.id,
            text: t.text,
            special: t.special,
            start: t.start,
            stop: t.stop,
        }
    }
}

/// TEI's `POST /decode`: `ids` (an array of ids, or of arrays),
/// `skip_special_tokens` (default true); one text per array.
pub(super) async fn decode(
    Shared((state, _)): Shared<AppState>,
    param: Result<Query<ModelParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<String>>, ApiError> {
    let map = api::object(body)?;
    let skip = api::boolean(&map, "skip_special_tokens", true)?;
    let lists = ids(&map)?;
    if lists.len() > state.settings.max_inputs {
        return Err(ApiError::over_limit(
            "ids",
            format!(
                "`ids` has {} lists; at most {} are accepted per request ([serve] max_inputs)",
                lists.len(),
                state.settings.max_inputs
            ),
        ));
    }
    let total: usize = lists.iter().map(Vec::len).sum();
    if total > limits::SERVE_MAX_TOKENIZE_TOKENS {
        return Err(ApiError::over_limit(
            "ids",
            format!(
                "`ids` holds {total} ids; at most {} are decoded per request (limits::SERVE_MAX_TOKENIZE_TOKENS)",
                limits::SERVE_MAX_TOKENIZE_TOKENS
            ),
        ));
    }
    let encoder = encoder(&*pool_named(&state, param)?)?;
    // Off the async workers, and within the tokenizers' share.
    super::admit::tokenizing(state.embedder.tokenizing_budget(), total * 4, move || {
        lists
            .iter()
            .map(|ids| encoder.decode(ids, skip))
            .collect::<Result<Vec<_>, _>>()
            .map(Json)
            .map_err(|e| ApiError::bad("ids", format!("`ids` cannot be decoded: {e}")))
    })
    .await?
}

/// `ids`: an array of token ids, or an array of such arrays.
fn ids(map: &serde_json::Map<String, Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = || {
        ApiError::bad(
            "ids",
            "`ids` must be an array of token ids (whole numbers), or an array of such arrays",
        )
    };
    let list = |v: &Value| -> Result<Vec<u32>, ApiError> {
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|id| {
                id.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    let all = map.get("ids").and_then(Value::as_array).ok_or_else(bad)?;
    if all.iter().all(Value::is_array) && !all.is_empty() {
        all.iter().map(list).collect()
    } else {
        Ok(vec![list(&map["ids"])?])
    }
}

#[cfg(test)]
#[path = "tei_tests.rs"]
mod tests;
