//! TEI's routes: `POST /embed`, `POST /tokenize`, `POST /decode`,
//! `GET /info`, and the 404 and 405 of every path, in the shape of the API
//! the path belongs to.
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
use crate::limits;

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

/// The model's tokenizer, or 501 if the host has none for it (the stub
/// counts words and has no vocabulary).
fn encoder(pool: &Pool) -> Result<std::sync::Arc<embedhost_text::TextEncoder>, ApiError> {
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
    let encoder = encoder(&*state.pool()?)?;
    let bytes = texts.iter().map(String::len).sum();
    let tokens = super::admit::tokenizing(&state, bytes, move || {
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
    let encoder = encoder(&*state.pool()?)?;
    // Off the async workers, and within the tokenizers' share.
    super::admit::tokenizing(&state, total * 4, move || {
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
mod tests {
    use std::sync::{Arc, Mutex, RwLock};

    use super::*;
    use crate::serve::routes::Access;
    use crate::serve::{Phase, State};

    /// A service's shared state with no pool yet (starting), accepting
    /// `max_inputs` inputs a request.
    fn starting(max_inputs: usize) -> AppState {
        let settings = crate::config::ServeSection {
            max_inputs,
            ..Default::default()
        };
        let state = State {
            options: Default::default(),
            admission: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_requests,
            )),
            settings,
            db: std::path::PathBuf::from("/nonexistent/index"),
            current: RwLock::new(None),
            phase: Mutex::new(Phase::Starting),
            generations: Default::default(),
            worker: Mutex::new(None),
            watching: tokio::sync::Mutex::new(None),
            jobs: Mutex::default(),
            next_job: Default::default(),
            prometheus: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            api_key: None,
            roots: Vec::new(),
            retiring: Mutex::default(),
            in_flight: Arc::default(),
            drained: Default::default(),
            cut: Default::default(),
            stopping: Default::default(),
            draining: tokio_util::sync::CancellationToken::new(),
            connections: crate::serve::listen::Connections::new(16, 1024),
            bodies: Arc::new(tokio::sync::Semaphore::new(
                limits::SERVE_BODY_BYTES_IN_FLIGHT,
            )),
            tokenizing: Arc::new(tokio::sync::Semaphore::new(
                limits::SERVE_TOKENIZE_BYTES_IN_FLIGHT,
            )),
        };
        (Arc::new(state), Access::Owner)
    }

    fn body(json: Value) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(json.to_string()))
    }

    /// `result`'s error, answered in TEI's shape: its status, its body.
    fn refused<T>(result: Result<T, ApiError>) -> (ApiError, StatusCode) {
        use axum::response::IntoResponse;
        let Err(err) = result else {
            panic!("not refused")
        };
        let status = err.clone().into_response().status();
        (err, status)
    }

    /// `state` served by a remote pool started from `config` (see
    /// `pool::tests::remote_pool`).
    fn serving(state: &AppState, config: crate::config::Config, normalized: bool) {
        let (pool, _members) = super::super::pool::tests::remote_pool(config, normalized);
        *state.0.current.write().unwrap() = Some(Arc::new(pool));
    }

    #[tokio::test]
    async fn embed_normalizes_the_vectors_of_a_model_that_does_not_unless_asked_not_to() {
        let state = starting(4);
        serving(&state, crate::config::Config::default(), false);
        let embed = |json: Value| {
            let state = state.clone();
            async move {
                let Ok(Json(rows)) = tei_embed(Shared(state), HeaderMap::new(), body(json)).await
                else {
                    panic!("refused");
                };
                rows
            }
        };
        let half = std::f32::consts::FRAC_1_SQRT_2;
        let rows = embed(json!({ "inputs": ["ok", "ok"] })).await;
        assert_eq!(rows.len(), 2);
        for row in rows {
            assert!(
                row.iter().all(|x| (x - half).abs() < 1e-6),
                "not unit length: {row:?}"
            );
        }
        let rows = embed(json!({ "inputs": "ok", "normalize": false })).await;
        assert_eq!(rows, vec![vec![0.5, 0.5]]);
    }

    #[tokio::test]
    async fn info_names_the_numbers_the_model_runs_in_as_tei_does() {
        use crate::config::{Backend, Config, Precision};
        let native = |engine: &str, precision| {
            let mut config = Config::default();
            config.backend = Backend::Native;
            config.native.engine = engine.into();
            config.native.precision = precision;
            config
        };
        let wasm = |precision: Option<&str>, path: Option<&str>| {
            let mut config = Config::default();
            config.backend = Backend::Wasm;
            config.plugin.path = path.map(Into::into);
            if let Some(p) = precision {
                config
                    .plugin
                    .config
                    .insert("precision".into(), crate::config::Value::String(p.into()));
            }
            config
        };
        for (config, dtype) in [
            (native("onnx", Precision::Int8), "int8"),
            (native("onnx", Precision::Fp32), "float32"),
            (native("stub", Precision::Int8), "float32"),
            (wasm(Some("fp32"), Some("model.wasm")), "float32"),
            (wasm(Some("int8"), Some("model.wasm")), "int8"),
            (wasm(None, None), "int8"),
            (wasm(None, Some("model.wasm")), "float32"),
        ] {
            let state = starting(4);
            serving(&state, config.clone(), true);
            let Ok(Json(info)) = info(Shared(state)).await else {
                panic!("no info");
            };
            assert_eq!(info["model_dtype"], dtype, "{config:?}");
            assert_eq!(info["backend"], "remote");
        }
    }

    #[tokio::test]
    async fn tokenize_refuses_a_prompt_name_and_too_many_inputs_before_asking_for_the_pool() {
        let state = starting(2);
        let (err, status) = refused(
            tokenize(
                Shared(state.clone()),
                body(json!({ "inputs": "a", "prompt_name": "query" })),
            )
            .await,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("prompt_name"));
        let (err, status) = refused(
            tokenize(
                Shared(state.clone()),
                body(json!({ "inputs": ["a", "b", "c"] })),
            )
            .await,
        );
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err.param.as_deref(), Some("inputs"));
        assert!(
            err.message.contains("has 3 texts") && err.message.contains("at most 2"),
            "{}",
            err.message
        );
        // Within the limits, the request gets as far as the pool.
        let (err, status) =
            refused(tokenize(Shared(state), body(json!({ "inputs": ["a", "b"] }))).await);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.message);
    }

    #[tokio::test]
    async fn decode_refuses_too_many_lists_and_too_many_ids_before_asking_for_the_pool() {
        let state = starting(2);
        let (err, status) = refused(
            decode(Shared(state.clone()), body(json!({ "ids": [[1], [2], [3]] }))).await,
        );
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err.param.as_deref(), Some("ids"));
        assert!(
            err.message.contains("has 3 lists") && err.message.contains("at most 2"),
            "{}",
            err.message
        );
        let many = vec![0u32; limits::SERVE_MAX_TOKENIZE_TOKENS + 1];
        let (err, status) =
            refused(decode(Shared(state.clone()), body(json!({ "ids": many }))).await);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err.param.as_deref(), Some("ids"));
        assert!(
            err.message
                .contains(&format!("holds {} ids", limits::SERVE_MAX_TOKENIZE_TOKENS + 1)),
            "{}",
            err.message
        );
        let (err, status) =
            refused(decode(Shared(state), body(json!({ "ids": [[1], [2]] }))).await);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.message);
    }
}
