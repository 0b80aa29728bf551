//! The WASM backend against the stub plugin and its faults: every fault
//! yields a typed error within its deadline, the host stays up, and the next
//! call runs on a fresh instance.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::bus::transport::InProcess;
use embedhost::bus::{Bus, BusError, ErrorCode, RemoteError};
use embedhost::messages::{EmbedRequest, EmbedderEmbed};
use embedhost::supervisor::{Supervisor, SupervisorConfig, SupervisorError};
use embedhost::vectors::cosine;
use embedhost::wasm::{
    ArtifactCache, CacheOutcome, InstanceLimits, PluginError, PluginSource, WasmEmbedder,
    WasmEngine, WasmError, WasmPlugin, WasmSpawner,
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
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        init_deadline: Duration::from_secs(10),
    }
}

fn texts(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

fn supervised_config(pool: usize) -> SupervisorConfig {
    SupervisorConfig {
        pool_size: pool,
        ..SupervisorConfig::default()
    }
}

async fn supervise(
    config: &[(&str, &str)],
    deadline_ms: u64,
    supervision: SupervisorConfig,
) -> Supervisor {
    let spawner = WasmSpawner {
        plugin: stub(),
        limits: limits(deadline_ms),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    Supervisor::start(spawner, supervision).await.unwrap()
}

const DEADLINE: Duration = Duration::from_secs(20);

/// The pool still serves, with correct output, after a fault.
async fn assert_serves(supervisor: &Supervisor) {
    let r = supervisor
        .embed(texts(&["still serving"]), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(r.vectors.len(), 1);
    assert!(r.failed.is_empty());
    assert_eq!(
        r.vectors.get(0).unwrap(),
        stub_vector("still serving").as_slice()
    );
}

fn stub_vector(text: &str) -> Vec<f32> {
    embedhost_stub_engine::StubEngine::new(Default::default()).embed(&[text])
}

fn restarts(supervisor: &Supervisor, reason: &str) -> u64 {
    supervisor.restarts().get(reason).copied().unwrap_or(0)
}

#[tokio::test]
async fn stub_vectors_are_unit_deterministic_and_meaningful_through_the_bus() {
    let supervisor = supervise(&[], 5000, supervised_config(2)).await;
    assert_eq!(supervisor.model_info().dimension, 384);
    assert!(supervisor.model_info().normalized);
    let bus = Bus::new(InProcess::new(embedhost::embedder::supervised_router(
        supervisor,
    )));
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
    assert_eq!(a.get(0).unwrap(), stub_vector("hello world").as_slice());
}

#[tokio::test]
async fn one_incarnation_reports_each_fault_as_a_typed_error_and_then_is_gone() {
    let start = |config: Vec<(String, String)>, ms| WasmEmbedder::start(stub(), limits(ms), config);
    let kv = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let e = start(kv("fault.trap_marker", "X"), 5000).await.unwrap();
    let err = e.embed(texts(&["X"]), false, None).await.unwrap_err();
    assert!(
        matches!(&err, WasmError::Trap { call: "embed", reason } if reason.contains("unreachable")),
        "{err}"
    );
    // The trapped store is never entered again.
    assert!(matches!(
        e.embed(texts(&["ok"]), false, None).await.unwrap_err(),
        WasmError::InstanceGone { .. }
    ));

    let e = start(kv("fault.loop_marker", "L"), 200).await.unwrap();
    let started = Instant::now();
    let err = e.embed(texts(&["L"]), false, None).await.unwrap_err();
    // The call deadline, plus what the text's size adds.
    let expected = embedhost::backend::work_deadline(
        Duration::from_millis(200),
        embedhost::limits::CALL_DEADLINE_PER_KIB,
        &texts(&["L"]),
    );
    assert!(
        matches!(err, WasmError::DeadlineExceeded { deadline, .. } if deadline == expected),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let e = start(kv("fault.grow_marker", "G"), 10_000).await.unwrap();
    match e.embed(texts(&["G"]), false, None).await.unwrap_err() {
        WasmError::MemoryCap { source, .. } => {
            assert!(source.limit == 64 << 20 && source.desired > source.limit)
        }
        other => panic!("expected MemoryCap, got {other}"),
    }

    let e = start(kv("fault.sleep_ms", "5000"), 10_000).await.unwrap();
    let started = Instant::now();
    let err = e
        .embed(texts(&["slow"]), false, Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::DeadlineExceeded { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn trap_after_n_calls_is_retried_on_a_fresh_instance() {
    let supervisor = supervise(&[("fault.trap_after", "2")], 5000, supervised_config(1)).await;
    for i in 0..5 {
        let r = supervisor
            .embed(texts(&[&format!("text {i}")]), false, DEADLINE)
            .await
            .unwrap();
        assert_eq!(
            r.vectors.get(0).unwrap(),
            stub_vector(&format!("text {i}")).as_slice()
        );
    }
    // Calls 3 and 5... trap: incarnations serve 2 calls each.
    assert_eq!(restarts(&supervisor, "trap"), 2);
    assert_eq!(supervisor.status()[0].incarnation, 3);
    assert_serves(&supervisor).await;
}

#[tokio::test]
async fn a_poison_text_in_a_batch_of_1000_gives_999_vectors_and_one_error() {
    let supervisor = supervise(
        &[("fault.trap_marker", "POISON")],
        5000,
        supervised_config(2),
    )
    .await;
    let mut batch: Vec<String> = (0..1000).map(|i| format!("document {i}")).collect();
    batch[617] = "this one is POISON".into();
    let r = supervisor
        .embed(batch.clone(), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(r.vectors.len(), 999);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].index, 617);
    assert!(
        r.failed[0].reason.contains(&format!(
            "crashed {} instances",
            embedhost::limits::POISON_VERDICT_CRASHES
        )),
        "{}",
        r.failed[0].reason
    );
    // Rows are the other texts, in order.
    assert_eq!(
        r.vectors.get(617).unwrap(),
        stub_vector("document 618").as_slice()
    );
    // The batch's crash, then the text alone until it is poison. The
    // backend stays up.
    assert_eq!(
        restarts(&supervisor, "trap"),
        u64::from(embedhost::limits::POISON_VERDICT_CRASHES)
    );
    assert!(supervisor.escalated().is_none());
    assert_serves(&supervisor).await;
}

#[tokio::test]
async fn an_infinite_loop_is_interrupted_isolated_and_the_pool_keeps_serving() {
    let supervisor = supervise(&[("fault.loop_marker", "LOOP")], 200, supervised_config(1)).await;
    let started = Instant::now();
    let r = supervisor
        .embed(texts(&["fine", "LOOP"]), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        (r.vectors.len(), r.failed.len(), r.failed[0].index),
        (1, 1, 1)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        restarts(&supervisor, "deadline"),
        u64::from(embedhost::limits::POISON_VERDICT_CRASHES)
    );
    assert_serves(&supervisor).await;
}

#[tokio::test]
async fn a_plugin_too_slow_for_every_text_is_restarted_with_its_reason_and_no_text_is_poison() {
    let supervisor = supervise(&[("fault.sleep_ms", "1000")], 100, supervised_config(1)).await;
    let r = supervisor.embed(texts(&["slow"]), false, DEADLINE).await;
    // Every call is too slow, the control text's too: the plugin is at
    // fault, not the text, so the pool escalates instead of blaming it.
    let err = r.expect_err("no text is poison when every text fails");
    assert!(
        matches!(
            err,
            embedhost::supervisor::SupervisorError::Unavailable { .. }
        ),
        "{err}"
    );
    assert!(restarts(&supervisor, "deadline") >= 1);
    assert!(supervisor.escalated().is_some());
}

#[tokio::test]
async fn unbounded_memory_growth_hits_the_cap_and_is_restarted() {
    let supervisor = supervise(
        &[("fault.grow_marker", "GROW")],
        10_000,
        supervised_config(1),
    )
    .await;
    let r = supervisor
        .embed(texts(&["GROW", "fine"]), false, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        r.failed.iter().map(|f| f.index).collect::<Vec<_>>(),
        vec![0]
    );
    assert!(
        r.failed[0].reason.contains("memory limit"),
        "{}",
        r.failed[0].reason
    );
    assert_eq!(
        restarts(&supervisor, "memory_cap"),
        u64::from(embedhost::limits::POISON_VERDICT_CRASHES)
    );
    assert_serves(&supervisor).await;
}

#[tokio::test]
async fn a_wrong_dimension_or_a_nan_is_refused_at_the_boundary_without_a_restart() {
    let supervisor = supervise(
        &[
            ("fault.wrong_dimension_marker", "SHORT"),
            ("fault.nan_marker", "NAN"),
        ],
        5000,
        supervised_config(1),
    )
    .await;
    let err = supervisor
        .embed(texts(&["a", "SHORT"]), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Refused(RemoteError { message, .. }) if message.contains("767 floats for 2 texts")),
        "{err}"
    );
    let err = supervisor
        .embed(texts(&["a", "b", "NAN"]), false, DEADLINE)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Refused(RemoteError { index: Some(2), message, .. }) if message.contains("NaN")),
        "{err}"
    );
    assert!(
        supervisor.status()[0].restarts.is_empty(),
        "a bad output is not a crash"
    );
    assert_serves(&supervisor).await;
}

#[tokio::test]
async fn a_thousand_requests_against_instances_that_trap_every_twentieth_call_are_all_answered() {
    // Each incarnation serves 19 calls and traps on the 20th: 5% of calls.
    let mut supervision = supervised_config(2);
    supervision.intensity.max_restarts = 1000; // the faults are the test, not a loop
    supervision.poison_after = 5; // 5% faults must not pass for poison (see SupervisorConfig)
    // Restarts are not a loop here: keep the backoff from dominating the run.
    supervision.intensity.backoff_min = Duration::from_millis(1);
    supervision.intensity.backoff_max = Duration::from_millis(5);
    let supervisor = supervise(&[("fault.trap_after", "19")], 5000, supervision).await;
    let calls = (0..1000).map(|i| {
        let supervisor = supervisor.clone();
        async move {
            let text = format!("request {i}");
            let r = supervisor
                .embed(vec![text.clone()], false, DEADLINE)
                .await
                .unwrap();
            (text, r)
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (text, r) in &answers {
        assert!(r.failed.is_empty(), "{text}: {:?}", r.failed);
        assert_eq!(r.vectors.len(), 1, "exactly one answer");
        assert_eq!(
            r.vectors.get(0).unwrap(),
            stub_vector(text).as_slice(),
            "{text} answered correctly"
        );
    }
    let traps = restarts(&supervisor, "trap");
    assert!(traps >= 45, "{traps} restarts");
}

#[tokio::test]
async fn faults_reach_bus_callers_as_typed_errors() {
    let supervisor = supervise(&[("fault.trap_marker", "BOOM")], 5000, supervised_config(1)).await;
    let bus = Bus::new(InProcess::new(embedhost::embedder::supervised_router(
        supervisor.clone(),
    )));
    // A poison text is that text's error; the rest is embedded.
    let r = bus
        .request::<EmbedderEmbed>(EmbedRequest {
            texts: texts(&["ok", "BOOM"]),
            is_query: false,
        })
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 1);
    assert_eq!(
        r.per_text(2).unwrap().iter().filter(|x| x.is_ok()).count(),
        1
    );
    // An escalated pool (here MaxR = 0: the first crash) answers every
    // call at once with `Unavailable` and when to come back.
    let mut supervision = supervised_config(1);
    supervision.intensity.max_restarts = 0;
    let supervisor = supervise(&[("fault.trap_marker", "BOOM")], 5000, supervision).await;
    let bus = Bus::new(InProcess::new(embedhost::embedder::supervised_router(
        supervisor.clone(),
    )));
    for batch in [&["ok", "BOOM"][..], &["ok"][..]] {
        let err = bus
            .request::<EmbedderEmbed>(EmbedRequest {
                texts: texts(batch),
                is_query: false,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BusError::Remote(RemoteError { code: ErrorCode::Unavailable, message, retry_after_ms: Some(ms), .. }) if message.contains("failed 1 times") && *ms <= 1000),
            "{err}"
        );
    }
    assert!(supervisor.escalated().is_some());
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
        matches!(&other_world, WasmError::WrongWorld { reason, .. } if reason.to_string().contains(embedhost::wasm::EXPORTED_INTERFACE)),
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

#[test]
fn wasm_errors_map_to_the_bus_codes_that_decide_retries() {
    let code = |e: WasmError| RemoteError::from(e);
    let deadline = code(WasmError::DeadlineExceeded {
        call: "embed",
        deadline: Duration::from_secs(1),
    });
    assert_eq!(deadline.code, ErrorCode::DeadlineExceeded);
    let trap = code(WasmError::Trap {
        call: "embed",
        reason: "unreachable".into(),
    });
    assert_eq!(
        trap.code,
        ErrorCode::Unavailable,
        "a crash is retried on a fresh instance"
    );
    let input = code(WasmError::Plugin {
        call: "embed",
        error: PluginError::InvalidInput {
            index: 3,
            reason: "too long".into(),
        },
    });
    assert_eq!(
        (input.code, input.index),
        (ErrorCode::InvalidInput, Some(3))
    );
    let output = code(WasmError::InvalidOutput {
        index: Some(2),
        reason: "NaN".into(),
    });
    assert_eq!((output.code, output.index), (ErrorCode::Failed, Some(2)));
    let config = code(WasmError::Plugin {
        call: "init",
        error: PluginError::InvalidConfig("bad".into()),
    });
    assert_eq!(config.code, ErrorCode::Failed);
}

#[tokio::test]
async fn the_embedder_peer_answers_health_and_shutdown() {
    let supervisor = supervise(&[], 5000, supervised_config(1)).await;
    let bus = Bus::new(InProcess::new(embedhost::embedder::supervised_router(
        supervisor.clone(),
    )));
    supervisor
        .embed(texts(&["one", "two"]), false, DEADLINE)
        .await
        .unwrap();
    let health = bus
        .request::<embedhost::messages::EmbedderHealth>(embedhost::bus::Empty {})
        .await
        .unwrap();
    // Texts, as the message documents, not calls.
    assert_eq!(health.processed_count, 2, "{health:?}");
    bus.request::<embedhost::messages::Shutdown>(embedhost::messages::ShutdownRequest {
        reason: "test".into(),
    })
    .await
    .unwrap();
    // Shut down means down: the pool serves no more.
    let after = supervisor.embed(texts(&["three"]), false, DEADLINE).await;
    assert!(after.is_err(), "{after:?}");
    assert!(
        supervisor.status().iter().all(|s| !s.up),
        "{:?}",
        supervisor.status()
    );
}
