//! The WASM backend against the stub plugin and its faults: every fault
//! yields a typed error within its deadline, the host stays up, and the next
//! call runs on a fresh instance.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::bus::transport::InProcess;
use embedhost::bus::{Bus, BusError, ErrorCode, RemoteError, SendOptions};
use embedhost::messages::{EmbedRequest, EmbedderEmbed};
use embedhost::vectors::cosine;
use embedhost::wasm::{
    ArtifactCache, CacheOutcome, InstanceLimits, PluginError, PluginSource, WasmEmbedder,
    WasmEngine, WasmError, WasmPlugin,
};

fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap())
}

fn stub() -> WasmPlugin {
    WasmPlugin::load(
        engine(),
        &PluginSource::File(embedhost::plugins::STUB.into()),
    )
    .unwrap()
}

fn limits(deadline_ms: u64) -> InstanceLimits {
    InstanceLimits {
        memory_bytes: 64 * 1024 * 1024,
        call_deadline: Duration::from_millis(deadline_ms),
        init_deadline: Duration::from_secs(10),
    }
}

async fn start(config: &[(&str, &str)], deadline_ms: u64) -> WasmEmbedder {
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    WasmEmbedder::start(stub(), limits(deadline_ms), config)
        .await
        .unwrap()
}

fn texts(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

/// The instance still serves, with correct output, after a fault.
async fn assert_serves(embedder: &WasmEmbedder) {
    let v = embedder
        .embed(texts(&["still serving"]), false, None)
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v.dimension(), embedder.model_info().dimension as usize);
}

#[tokio::test]
async fn stub_vectors_are_unit_deterministic_and_meaningful_through_the_bus() {
    let embedder = start(&[], 5000).await;
    assert_eq!(embedder.model_info().dimension, 384);
    assert!(embedder.model_info().normalized);
    let bus = Bus::new(InProcess::new(embedhost::embedder::wasm_router(embedder)));
    let request = EmbedRequest {
        texts: texts(&["hello world", "hello there world", "quantum chromodynamics"]),
        is_query: false,
    };
    let a = bus
        .request::<EmbedderEmbed>(request.clone())
        .await
        .unwrap()
        .vectors;
    let b = bus.request::<EmbedderEmbed>(request).await.unwrap().vectors;
    assert_eq!(a, b, "same text, same vector");
    for v in a.iter() {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    let related = cosine(a.get(0).unwrap(), a.get(1).unwrap());
    let unrelated = cosine(a.get(0).unwrap(), a.get(2).unwrap());
    assert!(related > unrelated + 0.3, "{related} vs {unrelated}");
    // The WASM plugin and the native engine compute the same thing.
    let native = embedhost_stub_engine::StubEngine::new(Default::default()).embed(&["hello world"]);
    assert_eq!(a.get(0).unwrap(), native.as_slice());
}

#[tokio::test]
async fn trap_after_n_calls_is_a_typed_crash_and_the_next_call_gets_a_fresh_instance() {
    let embedder = start(&[("fault.trap_after", "2")], 5000).await;
    for _ in 0..2 {
        embedder.embed(texts(&["ok"]), false, None).await.unwrap();
    }
    let err = embedder
        .embed(texts(&["third"]), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WasmError::Trap { call: "embed", reason } if reason.contains("wasm trap")),
        "{err}"
    );
    assert!(err.is_crash());
    // A fresh instance counts calls from zero again.
    assert_serves(&embedder).await;
}

#[tokio::test]
async fn trap_on_a_marker() {
    let embedder = start(&[("fault.trap_marker", "POISON")], 5000).await;
    let err = embedder
        .embed(texts(&["fine", "this is POISON"]), false, None)
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::Trap { .. }), "{err}");
    assert_serves(&embedder).await;
}

#[tokio::test]
async fn an_infinite_loop_is_interrupted_at_the_deadline() {
    let embedder = start(&[("fault.loop_marker", "LOOP")], 200).await;
    let started = Instant::now();
    let err = embedder
        .embed(texts(&["LOOP"]), false, None)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, WasmError::DeadlineExceeded { call: "embed", deadline } if deadline == Duration::from_millis(200)),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_serves(&embedder).await;
}

#[tokio::test]
async fn a_slow_call_past_the_requests_deadline_is_interrupted() {
    let embedder = start(&[("fault.sleep_ms", "5000")], 10_000).await;
    let started = Instant::now();
    let err = embedder
        .embed(texts(&["slow"]), false, Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::DeadlineExceeded { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn unbounded_memory_growth_hits_the_cap() {
    let embedder = start(&[("fault.grow_marker", "GROW")], 10_000).await;
    let err = embedder
        .embed(texts(&["GROW"]), false, None)
        .await
        .unwrap_err();
    match &err {
        WasmError::MemoryCap { source, .. } => {
            assert_eq!(source.limit, 64 * 1024 * 1024);
            assert!(source.desired > source.limit);
        }
        other => panic!("expected MemoryCap, got {other}"),
    }
    assert!(err.to_string().contains("memory limit"));
    assert_serves(&embedder).await;
}

#[tokio::test]
async fn a_wrong_dimension_or_a_nan_is_refused_at_the_boundary() {
    let embedder = start(
        &[
            ("fault.wrong_dimension_marker", "SHORT"),
            ("fault.nan_marker", "NAN"),
        ],
        5000,
    )
    .await;
    let err = embedder
        .embed(texts(&["a", "SHORT"]), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WasmError::InvalidOutput { reason, .. } if reason.contains("767 floats for 2 texts")),
        "{err}"
    );
    let err = embedder
        .embed(texts(&["a", "b", "NAN"]), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WasmError::InvalidOutput { index: Some(2), reason } if reason.contains("NaN")),
        "{err}"
    );
    assert!(
        !err.is_crash(),
        "a bad output is not a reason to drop the instance"
    );
    assert_serves(&embedder).await;
}

#[tokio::test]
async fn faults_reach_bus_callers_as_typed_errors_and_crashes_are_retried() {
    let embedder = start(
        &[("fault.trap_after", "1"), ("fault.loop_marker", "LOOP")],
        300,
    )
    .await;
    let bus = Bus::new(InProcess::new(embedhost::embedder::wasm_router(embedder)));
    let request = |t: &str| EmbedRequest {
        texts: texts(&[t]),
        is_query: false,
    };
    bus.request::<EmbedderEmbed>(request("one")).await.unwrap();
    // Call 2 traps; the bus retries on a fresh instance, which answers.
    let options = SendOptions::default()
        .retries(1)
        .backoff(Duration::from_millis(1), Duration::from_millis(1));
    let v = bus
        .send::<EmbedderEmbed>(request("two"), options)
        .await
        .unwrap();
    assert_eq!(v.vectors.len(), 1);
    // Without retries the crash is a typed, retryable error.
    let err = bus
        .request::<EmbedderEmbed>(request("three"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::Unavailable,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    // A deadline is not retried: the same input would take as long again.
    let err = bus
        .send::<EmbedderEmbed>(request("LOOP"), SendOptions::default().retries(3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BusError::Remote(RemoteError {
                code: ErrorCode::DeadlineExceeded,
                ..
            })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_init_config_names_the_key() {
    let config = vec![("dimensoin".to_string(), "8".to_string())];
    let err = WasmEmbedder::start(stub(), limits(1000), config)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WasmError::Plugin { call: "init", error: PluginError::InvalidConfig(msg) } if msg.contains("dimensoin")),
        "{err}"
    );
}

#[test]
fn loading_rejects_what_is_not_an_embedder_plugin_with_clear_errors() {
    let other_world = WasmPlugin::load(
        engine(),
        &PluginSource::File(embedhost::plugins::SHAPE_PROBE.into()),
    )
    .unwrap_err();
    assert!(
        matches!(&other_world, WasmError::WrongWorld { reason, .. } if reason.contains("embedhost:embedder/embedder@0.1.0")),
        "{other_world}"
    );
    let core_module: &'static [u8] = b"\0asm\x01\0\0\0";
    let err = WasmPlugin::load(
        engine(),
        &PluginSource::Bytes {
            name: "core.wasm".into(),
            bytes: core_module,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, WasmError::NotAComponent { reason, .. } if reason.contains("wasm32-wasip2")),
        "{err}"
    );
    let err = WasmPlugin::load(
        engine(),
        &PluginSource::Bytes {
            name: "junk".into(),
            bytes: b"hello, world",
        },
    )
    .unwrap_err();
    assert!(matches!(&err, WasmError::NotAComponent { .. }), "{err}");
    let err =
        WasmPlugin::load(engine(), &PluginSource::File("/nonexistent/p.wasm".into())).unwrap_err();
    assert!(
        matches!(&err, WasmError::Read { .. }) && err.to_string().contains("/nonexistent/p.wasm"),
        "{err}"
    );
    let truncated = &embedhost::plugins::STUB_WASM_BYTES[..1000];
    let err = WasmPlugin::load(
        engine(),
        &PluginSource::Bytes {
            name: "cut.wasm".into(),
            bytes: truncated,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, WasmError::Compile { name, .. } if name == "cut.wasm"),
        "{err}"
    );
}

#[test]
fn the_artifact_cache_is_reused_and_a_corrupt_entry_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(dir.path()))).unwrap();
    let source = PluginSource::builtin_stub();
    assert_eq!(
        WasmPlugin::load(&engine, &source).unwrap().cache_outcome(),
        CacheOutcome::Compiled
    );
    assert_eq!(
        WasmPlugin::load(&engine, &source).unwrap().cache_outcome(),
        CacheOutcome::Hit
    );
    // Corrupt the artifact: it no longer matches its digest, so it is
    // discarded and recompiled rather than mapped.
    let artifact = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    assert_eq!(
        WasmPlugin::load(&engine, &source).unwrap().cache_outcome(),
        CacheOutcome::Compiled
    );
    assert_eq!(
        WasmPlugin::load(&engine, &source).unwrap().cache_outcome(),
        CacheOutcome::Hit
    );
}
