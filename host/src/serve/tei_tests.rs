//! Unit tests of `tei.rs`.

use std::sync::{Arc, Mutex};

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
        embedder: Arc::new(crate::embedder::Embedder::new()),
        others: Mutex::default(),
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
    };
    (Arc::new(state), Access::Owner)
}

/// No `?model=`: the default model.
fn no_model() -> Result<axum::extract::Query<ModelParam>, axum::extract::rejection::QueryRejection>
{
    Ok(axum::extract::Query(ModelParam::default()))
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
/// `embedder::generation::tests::remote_pool`).
fn serving(state: &AppState, config: crate::config::Config, normalized: bool) {
    let (pool, _members) = crate::embedder::generation::tests::remote_pool(config, normalized);
    state.0.embedder.install(Arc::new(pool));
}

#[tokio::test]
async fn embed_normalizes_the_vectors_of_a_model_that_does_not_unless_asked_not_to() {
    let state = starting(4);
    serving(&state, crate::config::Config::default(), false);
    let embed = |json: Value| {
        let state = state.clone();
        async move {
            let Ok(Json(rows)) =
                tei_embed(Shared(state), no_model(), HeaderMap::new(), body(json)).await
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
        let mut config = Config {
            backend: Backend::Native,
            ..Default::default()
        };
        config.native.engine = engine.into();
        config.native.precision = precision;
        config
    };
    let wasm = |precision: Option<&str>, path: Option<&str>| {
        let mut config = Config {
            backend: Backend::Wasm,
            ..Default::default()
        };
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
        let Ok(Json(info)) = info(Shared(state), no_model()).await else {
            panic!("no info");
        };
        assert_eq!(
            info["model_dtype"], dtype,
            "{:?} {} {:?} {:?}",
            config.backend, config.native.engine, config.native.precision, config.plugin
        );
        assert_eq!(info["backend"], "remote");
    }
}

#[tokio::test]
async fn tokenize_shows_tokens_within_the_per_input_and_per_request_bounds() {
    let state = starting(16);
    let (mut pool, _members) =
        crate::embedder::generation::tests::remote_pool(Default::default(), true);
    let encoder = embedhost_text::TextEncoder::from_bytes(
        crate::test_support::word_level_tokenizer(&["hello", "world"]).as_bytes(),
        "tiny",
        8,
    )
    .unwrap();
    pool.tokens = crate::worker::chunk::Tokens::Model(Arc::new(encoder));
    state.0.embedder.install(Arc::new(pool));
    let tokenize = |json: Value| tokenize(Shared(state.clone()), no_model(), body(json));
    let Ok(Json(shown)) = tokenize(json!({ "inputs": "Hello world" })).await else {
        panic!("refused");
    };
    let ids: Vec<u32> = shown[0].iter().map(|t| t.id).collect();
    assert_eq!(ids, [1, 4, 5, 2]);
    // One word to the stub's count, a token for each letter and mark:
    // past the tokens one input may show.
    let one = "a!".repeat(limits::SERVE_MAX_INPUT_TOKENS / 2 + 1);
    let (err, status) = refused(tokenize(json!({ "inputs": [one] })).await);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err.param.as_deref(), Some("inputs"));
    assert!(
        err.message.starts_with(&format!(
            "`inputs[0]` brings the request to {} tokens",
            limits::SERVE_MAX_INPUT_TOKENS + 4
        )),
        "{}",
        err.message
    );
    // Each input within its bound, together past the request's.
    let each = limits::SERVE_MAX_INPUT_TOKENS - 2;
    let inputs = vec!["a!".repeat(each / 2); limits::SERVE_MAX_TOKENIZE_TOKENS / each + 1];
    let last = inputs.len() - 1;
    let (err, status) = refused(tokenize(json!({ "inputs": inputs })).await);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        err.message
            .starts_with(&format!("`inputs[{last}]` brings the request to "))
            && err.message.contains("SERVE_MAX_TOKENIZE_TOKENS"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn tokenize_refuses_a_prompt_name_and_too_many_inputs_before_asking_for_the_pool() {
    let state = starting(2);
    let (err, status) = refused(
        tokenize(
            Shared(state.clone()),
            no_model(),
            body(json!({ "inputs": "a", "prompt_name": "query" })),
        )
        .await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err.param.as_deref(), Some("prompt_name"));
    let (err, status) = refused(
        tokenize(
            Shared(state.clone()),
            no_model(),
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
    let (err, status) = refused(
        tokenize(
            Shared(state),
            no_model(),
            body(json!({ "inputs": ["a", "b"] })),
        )
        .await,
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.message);
}

#[tokio::test]
async fn decode_refuses_too_many_lists_and_too_many_ids_before_asking_for_the_pool() {
    let state = starting(2);
    let (err, status) = refused(
        decode(
            Shared(state.clone()),
            no_model(),
            body(json!({ "ids": [[1], [2], [3]] })),
        )
        .await,
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err.param.as_deref(), Some("ids"));
    assert!(
        err.message.contains("has 3 lists") && err.message.contains("at most 2"),
        "{}",
        err.message
    );
    let many = vec![0u32; limits::SERVE_MAX_TOKENIZE_TOKENS + 1];
    let (err, status) = refused(
        decode(
            Shared(state.clone()),
            no_model(),
            body(json!({ "ids": many })),
        )
        .await,
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err.param.as_deref(), Some("ids"));
    assert!(
        err.message.contains(&format!(
            "holds {} ids",
            limits::SERVE_MAX_TOKENIZE_TOKENS + 1
        )),
        "{}",
        err.message
    );
    let (err, status) = refused(
        decode(
            Shared(state),
            no_model(),
            body(json!({ "ids": [[1], [2]] })),
        )
        .await,
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.message);
}
