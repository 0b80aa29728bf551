//! The encoder import: a `model-plugin` asks the host's BERT engine, run in
//! its own sandbox, for vectors; it gets `builtin:bert`'s vectors in every
//! way it can ask, and every way of abusing it is contained.

use std::time::Duration;

use embedhost::wasm::{
    ArtifactCache, Encoder, InstanceLimits, PluginSource, WasmEmbedder, WasmEngine, WasmError,
    WasmPlugin,
};

use crate::onnx::{golden, real_model};

fn engine() -> WasmEngine {
    WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap()
}

fn table(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The built-in engine over the real model, at `precision`, as a snapshot
/// (as `embedhost` loads it) or plain.
fn bert(
    engine: &WasmEngine,
    precision: &str,
    snapshot: bool,
) -> (WasmPlugin, Vec<(String, String)>) {
    let dir = real_model();
    let settings = table(&[("model_id", "all-MiniLM-L6-v2"), ("precision", precision)]);
    let source = PluginSource::builtin("bert").unwrap();
    let plugin = if snapshot {
        WasmPlugin::load_snapshot(engine, &source, &dir, InstanceLimits::default(), &settings)
            .unwrap()
    } else {
        WasmPlugin::load(engine, &source)
            .unwrap()
            .with_model_dir(dir)
    };
    (plugin, settings)
}

/// The encoder probe (`plugins/encoder-probe`) linked to the engine at
/// `precision`, started with `mode` under `limits`.
async fn probe(
    mode: &str,
    precision: &str,
    limits: InstanceLimits,
) -> Result<WasmEmbedder, WasmError> {
    probe_over(mode, precision, limits, true).await
}

/// [`probe`], the engine from its snapshot or plain (reading its model in
/// `init`).
async fn probe_over(
    mode: &str,
    precision: &str,
    limits: InstanceLimits,
    snapshot: bool,
) -> Result<WasmEmbedder, WasmError> {
    let engine = engine();
    let (bert, settings) = tokio::task::spawn_blocking({
        let engine = engine.clone();
        let precision = precision.to_string();
        move || bert(&engine, &precision, snapshot)
    })
    .await
    .unwrap();
    let encoder = Encoder::new(bert, settings).unwrap();
    let plugin = WasmPlugin::load(
        &engine,
        &PluginSource::File(embedhost::plugins::ENCODER_PROBE.into()),
    )
    .unwrap()
    .with_encoder(encoder);
    assert!(plugin.imports_encoder());
    WasmEmbedder::start(plugin, limits, table(&[("mode", mode)])).await
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    embedhost::vectors::cosine(a, b)
}

/// Texts, vectors, by `embedder`.
async fn vectors(embedder: &WasmEmbedder, texts: &[String]) -> Vec<Vec<f32>> {
    let v = embedder.embed(texts.to_vec(), false, None).await.unwrap();
    assert_eq!(v.len(), texts.len());
    v.iter().map(<[f32]>::to_vec).collect()
}

/// An engine without a snapshot (`[plugin] snapshot = false`, or a model
/// too large for one) reads its model in `init`: the store opens the
/// engine's model directory for it, and the plugin gets the same vectors.
#[tokio::test]
async fn a_model_plugin_runs_over_an_engine_without_a_snapshot() {
    let texts: Vec<String> = vec!["a cat".into(), "a dog".into()];
    let plain = probe_over("encode", "int8", InstanceLimits::default(), false)
        .await
        .unwrap();
    let snapshot = probe("encode", "int8", InstanceLimits::default())
        .await
        .unwrap();
    let (a, b) = (
        vectors(&plain, &texts).await,
        vectors(&snapshot, &texts).await,
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(cosine(x, y) >= 0.9999);
    }
}

/// A text the host lets through, larger than the bound on one host call,
/// reaches the encoder: what a host import may lift grows with what the
/// host gave the plugin's `embed`, so the plugin can hand its texts on (the
/// engine truncates it, as `builtin:bert` would).
#[tokio::test]
async fn a_text_larger_than_one_host_call_reaches_the_encoder() {
    let big = "grüße ".repeat(2 * 1024 * 1024 / 7);
    assert!(big.len() > 2 * embedhost::limits::MAX_HOSTCALL_BYTES);
    let embedder = probe("encode", "int8", InstanceLimits::default())
        .await
        .unwrap();
    let got = vectors(&embedder, std::slice::from_ref(&big)).await;
    let engine = engine();
    let (plain, settings) = tokio::task::spawn_blocking(move || bert(&engine, "int8", true))
        .await
        .unwrap();
    let reference = WasmEmbedder::start(plain, InstanceLimits::default(), settings)
        .await
        .unwrap();
    let want = vectors(&reference, &[big]).await;
    assert!(cosine(&got[0], &want[0]) >= 0.9999);
}

#[tokio::test]
async fn a_model_plugin_gets_builtin_berts_vectors_by_texts_ids_and_token_states() {
    let texts: Vec<String> = golden().into_iter().map(|(t, _)| t).take(8).collect();
    for precision in ["int8", "fp32"] {
        let engine = engine();
        let (plain, settings) = bert(&engine, precision, false);
        let reference = WasmEmbedder::start(plain, InstanceLimits::default(), settings)
            .await
            .unwrap();
        let expected = vectors(&reference, &texts).await;
        for mode in ["encode", "ids", "states"] {
            let embedder = probe(mode, precision, InstanceLimits::default())
                .await
                .unwrap();
            assert_eq!(embedder.model_info().dimension, 384);
            let got = vectors(&embedder, &texts).await;
            for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                let c = cosine(a, b);
                assert!(c >= 0.9999, "{precision} {mode}: text {i}: cosine {c}");
            }
        }
    }
}

/// The supervision policy applies unchanged to a composed plugin: under the
/// shipped defaults a text that crashes it is isolated as poison (each
/// restart a new store with a new engine in it), and every other text of
/// the batch gets `builtin:bert`'s vector.
#[tokio::test]
async fn a_crashing_model_plugin_is_supervised_like_any_plugin() {
    let engine = engine();
    let (bert, settings) = tokio::task::spawn_blocking({
        let engine = engine.clone();
        move || bert(&engine, "int8", true)
    })
    .await
    .unwrap();
    let reference = WasmEmbedder::start(bert.clone(), InstanceLimits::default(), settings.clone())
        .await
        .unwrap();
    let plugin = WasmPlugin::load(
        &engine,
        &PluginSource::File(embedhost::plugins::ENCODER_PROBE.into()),
    )
    .unwrap()
    .with_encoder(Encoder::new(bert, settings).unwrap());
    let spawner = embedhost::wasm::WasmSpawner {
        plugin,
        limits: InstanceLimits::default(),
        config: Vec::new(),
    };
    let supervisor = embedhost::supervisor::Supervisor::start(
        spawner,
        embedhost::supervisor::SupervisorConfig {
            pool_size: 1,
            ..embedhost::supervisor::SupervisorConfig::default()
        },
    )
    .await
    .unwrap();
    let texts: Vec<String> = ["a cat", "embedhost:crash", "a dog"]
        .map(String::from)
        .to_vec();
    let r = supervisor
        .embed(texts, false, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
    assert_eq!(r.failed[0].index, 1);
    let expected = vectors(&reference, &["a cat".into(), "a dog".into()]).await;
    assert_eq!(r.vectors.len(), expected.len());
    for (got, want) in r.vectors.iter().zip(&expected) {
        assert!(cosine(got, want) >= 0.9999);
    }
    let status = supervisor.status();
    assert!(status.iter().any(|s| s.incarnation > 1), "{status:?}");
}

#[tokio::test]
async fn a_plugin_that_calls_the_encoder_past_its_deadline_is_interrupted_and_replaced() {
    let limits = InstanceLimits {
        call_deadline: Duration::from_millis(500),
        call_deadline_per_kib: Duration::ZERO,
        ..InstanceLimits::default()
    };
    let looping = probe("loop", "int8", limits).await.unwrap();
    let err = looping
        .embed(vec!["again and again".into()], false, None)
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::DeadlineExceeded { .. }), "{err}");
    assert!(err.is_crash(), "{err}");
    // The next instance of the same plugin serves.
    let fresh = probe("encode", "int8", limits).await.unwrap();
    assert_eq!(vectors(&fresh, &["after".into()]).await.len(), 1);
}

#[tokio::test]
async fn asking_the_encoder_for_a_million_texts_fails_the_call_and_nothing_else() {
    let embedder = probe("million", "int8", InstanceLimits::default())
        .await
        .unwrap();
    let err = embedder
        .embed(vec!["x".into()], false, None)
        .await
        .unwrap_err();
    let text = err.to_string();
    // Either the host's bound on what a host call may lift, or the
    // encoder's bound on a batch: named, never a hang or a host crash.
    assert!(
        text.contains("MAX_HOSTCALL_BYTES") || text.contains("ENCODER_MAX_BATCH"),
        "{text}"
    );
}

#[tokio::test]
async fn one_text_past_the_encoders_batch_bound_is_refused_as_a_value() {
    let embedder = probe("over-batch", "int8", InstanceLimits::default())
        .await
        .unwrap();
    let err = embedder
        .embed(vec!["x".into()], false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WasmError::Plugin { .. })
            && err.to_string().contains("ENCODER_MAX_BATCH")
            && !err.is_crash(),
        "{err}"
    );
    assert!(embedder.health(None).await.is_ok());
}

#[tokio::test]
async fn token_ids_outside_the_vocabulary_or_the_window_are_refused_naming_the_list() {
    for (mode, expected) in [("oov", "outside the vocabulary"), ("long-ids", "token ids")] {
        let embedder = probe(mode, "int8", InstanceLimits::default())
            .await
            .unwrap();
        let err = embedder
            .embed(vec!["x".into()], false, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WasmError::Plugin { .. }) && err.to_string().contains(expected),
            "{mode}: {err}"
        );
        assert!(!err.is_crash(), "{mode}: a refusal, not a crash: {err}");
        // The instance is intact: the refusal was a value.
        assert!(embedder.health(None).await.is_ok(), "{mode}");
    }
}

#[tokio::test]
async fn the_engine_counts_against_the_plugins_memory_cap() {
    let small = InstanceLimits {
        memory_bytes: 32 * 1024 * 1024,
        ..InstanceLimits::default()
    };
    let err = probe("encode", "int8", small).await.unwrap_err();
    assert!(matches!(err, WasmError::MemoryCap { .. }), "{err}");
    let embedder = probe("encode", "int8", InstanceLimits::default())
        .await
        .unwrap();
    let health = embedder.health(None).await.unwrap();
    // The model's weights (int8, about 20 MB) live in the same store.
    assert!(health.memory_bytes > 20_000_000, "{}", health.memory_bytes);
}

#[tokio::test]
async fn a_model_plugin_without_an_encoder_is_refused_naming_the_import() {
    let plugin = WasmPlugin::load(
        &engine(),
        &PluginSource::File(embedhost::plugins::ENCODER_PROBE.into()),
    )
    .unwrap();
    let err = WasmEmbedder::start(plugin, InstanceLimits::default(), Vec::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, WasmError::NoEncoder { .. })
            && err
                .to_string()
                .contains(embedhost::wasm::encoder::ENCODER_INTERFACE),
        "{err}"
    );
}

/// Through the CLI, as a user runs it: `[plugin] path` to a model-plugin
/// is linked to the default model, serves `builtin:bert`'s vectors, and
/// passes the conformance suite unchanged.
#[test]
fn a_model_plugin_runs_from_a_config_and_passes_plugin_test() {
    let models = real_model().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(
        &config,
        format!("[plugin]\npath = {:?}\n", embedhost::plugins::ENCODER_PROBE),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| crate::real_model::embedhost_offline(args, &models);
    let composed =
        crate::real_model::succeeded(&run(&["--config", config, "embed", "a cat", "a dog"]));
    let builtin = crate::real_model::succeeded(&run(&["embed", "a cat", "a dog"]));
    for ((_, a), (_, b)) in composed.iter().zip(&builtin) {
        assert!(cosine(a, b) >= 0.9999);
    }
    let out = run(&[
        "--config",
        config,
        "plugin",
        "test",
        embedhost::plugins::ENCODER_PROBE,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
