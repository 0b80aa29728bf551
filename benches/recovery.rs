//! Recovery after a crash, and failures during a planned recycle, under load
//! (`cargo bench --bench recovery`, also run by `./x bench`).
//!
//! A pool of one stub instance serves a caller in a loop, on each backend (a
//! WASM instance, a native child process). Every few requests the caller
//! sends a text that crashes the instance (a trap; the child's exit); the
//! time from that crash being reported to the next successful answer is the
//! request recovery time (the restart, `init` or the handshake, and one
//! embed). The baseline is the latency of an ordinary request in the same
//! run. The restart policy is relaxed (high intensity, no backoff) so that
//! this measures the mechanism, not the policy. Instance recovery is the
//! time a new instance takes to be ready, against the same baseline.
//!
//! Then the same pool recycles itself every 20 texts (planned,
//! make-before-break) under four concurrent callers; the figure is how many
//! requests failed (target: zero) and the latency around recycles.
//!
//! Last, the real model: how long a new all-MiniLM-L6-v2 instance takes to
//! be ready to embed (thread, instance, `init`), which is what a restart
//! costs. From the pre-initialized snapshot (the WASM backend's normal path)
//! against the plain plugin loading its weights in `init` (the baseline).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use embedhost::native::NativeSpawner;
use embedhost::supervisor::{Spawner, Supervisor, SupervisorConfig};
use embedhost::wasm::{
    InstanceLimits, PluginSource, SnapshotStatus, WasmEmbedder, WasmEngine, WasmPlugin, WasmSpawner,
};

// Shared by the benches; this one uses the model's directory only.
mod common;

use common::{Better, figure};

const COMMAND: &str = "cargo bench --bench recovery";

/// Restarts measured from the snapshot (each takes about a millisecond), and
/// from the plain plugin (each reads 90 MB of weights).
const SNAPSHOT_STARTS: usize = 200;
const PLAIN_STARTS: usize = 10;

const CRASHES: usize = 200;
const DEADLINE: Duration = Duration::from_secs(10);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "{name:<40} n={:<5} p50={:>10.3?} p99={:>10.3?}",
        samples.len(),
        p50,
        p99
    );
    (p50, p99)
}

/// A native stub child that exits on `CRASH`.
fn native_spawner() -> NativeSpawner {
    NativeSpawner {
        executable: env!("CARGO_BIN_EXE_embedhost").into(),
        engine: "stub".into(),
        settings: vec![("child.exit_marker".into(), "CRASH".into())],
        init_deadline: DEADLINE,
        call_deadline: DEADLINE,
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        grace: Duration::from_secs(1),
        memory_ceiling: Some(embedhost::limits::DEFAULT_CHILD_MEMORY_CEILING),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Request recovery and instance recovery on one backend.
async fn recovery(backend: &str, spawner: impl Spawner + Clone) {
    let mut config = SupervisorConfig {
        pool_size: 1,
        poison_after: 1,
        ..SupervisorConfig::default()
    };
    config.intensity.max_restarts = u32::MAX;
    config.intensity.backoff_min = Duration::ZERO;
    config.intensity.backoff_max = Duration::ZERO;
    let supervisor = Supervisor::start(spawner.clone(), config).await.unwrap();
    let text = |i: usize| vec![format!("an ordinary sentence number {i}")];
    let mut normal = Vec::new();
    let mut recovery = Vec::new();
    for i in 0..CRASHES * 5 {
        if i % 5 == 4 {
            let crashed = supervisor
                .embed(vec!["CRASH".into()], false, DEADLINE)
                .await
                .unwrap();
            assert_eq!(crashed.failed.len(), 1);
            let at = Instant::now();
            let ok = supervisor.embed(text(i), false, DEADLINE).await.unwrap();
            assert_eq!(ok.vectors.len(), 1);
            recovery.push(at.elapsed());
        } else {
            let at = Instant::now();
            supervisor.embed(text(i), false, DEADLINE).await.unwrap();
            normal.push(at.elapsed());
        }
    }
    // Instance recovery: a new incarnation started and ready.
    let mut starts = Vec::new();
    for i in 0..CRASHES / 4 {
        let at = Instant::now();
        let (worker, _) = spawner.start(0, 1_000 + i as u64).await.unwrap();
        starts.push(at.elapsed());
        worker.stop().await;
    }
    println!(
        "recovery (cargo bench --bench recovery): pool of 1 stub {backend} instance, {CRASHES} crashes"
    );
    let (base50, base99) = report("ordinary request (baseline)", normal);
    let (rec50, rec99) = report("crash -> next successful answer", recovery);
    let (new50, new99) = report("a new instance ready", starts);
    println!(
        "{:<40} p50 {:.1}x, p99 {:.1}x the baseline",
        "recovery / baseline",
        rec50.as_secs_f64() / base50.as_secs_f64(),
        rec99.as_secs_f64() / base99.as_secs_f64()
    );
    let section = "Recovery after a crash (stub plugin, pool of 1)";
    for (what, p, value, base) in [
        (
            "request recovery (crash to the next answer)",
            "p50",
            rec50,
            base50,
        ),
        (
            "request recovery (crash to the next answer)",
            "p99",
            rec99,
            base99,
        ),
        (
            "instance recovery (a new instance ready)",
            "p50",
            new50,
            base50,
        ),
        (
            "instance recovery (a new instance ready)",
            "p99",
            new99,
            base99,
        ),
    ] {
        figure(
            section,
            &format!("{backend}: {what}, {p}"),
            ms(value),
            "ms",
            (&format!("an ordinary request {p}"), ms(base)),
            Better::Lower,
            COMMAND,
        );
    }
}

fn spawner(engine: &WasmEngine) -> WasmSpawner {
    let plugin = WasmPlugin::load(engine, &PluginSource::builtin_stub()).unwrap();
    WasmSpawner {
        plugin,
        limits: InstanceLimits::default(),
        config: vec![("fault.trap_marker".into(), "CRASH".into())],
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that names another bench skips this one.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"recovery".contains(a.as_str()))
    {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = std::env::temp_dir().join("embedhost-bench-cache");
    let engine = WasmEngine::new(Some(embedhost::wasm::ArtifactCache::new(cache))).unwrap();
    rt.block_on(async {
        recovery("WASM", spawner(&engine)).await;
        recovery("native", native_spawner()).await;

        // Planned recycles under load.
        let mut config = SupervisorConfig { pool_size: 2, ..SupervisorConfig::default() };
        config.max_processed = 20;
        config.health_interval = Duration::from_millis(5);
        let supervisor = Supervisor::start(spawner(&engine), config).await.unwrap();
        let failed = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..4)
            .map(|c| {
                let (supervisor, failed) = (supervisor.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for i in 0..1000 {
                        let at = Instant::now();
                        match supervisor.embed(vec![format!("caller {c} sentence {i}")], false, DEADLINE).await {
                            Ok(r) if r.failed.is_empty() && r.vectors.len() == 1 => latencies.push(at.elapsed()),
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for caller in callers {
            latencies.extend(caller.await.unwrap());
        }
        let recycles = supervisor.restarts().get("recycle").copied().unwrap_or(0);
        println!("planned recycle: 4 callers x 1000 requests, pool of 2, recycle every 20 texts");
        report("request latency across recycles", latencies);
        let failed = failed.load(Ordering::Relaxed);
        println!("{:<40} {recycles} recycles, {failed} failed requests", "recycles");
        figure(
            "Planned recycles under load (stub WASM, pool of 2, every 20 texts, 4 callers x 1000 requests)",
            &format!("failed requests across {recycles} recycles"),
            failed as f64,
            "requests",
            ("requests sent", 4000.0),
            Better::Lower,
            COMMAND,
        );

        // A real-model instance made ready: what each restart costs.
        let dir = common::model_dir();
        let bert = PluginSource::builtin("bert").unwrap();
        let limits = InstanceLimits::default();
        let snapshot = tokio::task::block_in_place(|| {
            WasmPlugin::load_snapshot(&engine, &bert, &dir, limits, &[]).unwrap()
        });
        assert!(matches!(snapshot.snapshot(), SnapshotStatus::Used(_)), "{:?}", snapshot.snapshot());
        let plain = WasmPlugin::load(&engine, &bert).unwrap().with_model_dir(&dir);
        // At int8 the snapshot holds the packed int8 weights instead.
        let int8 = vec![("precision".to_string(), "int8".to_string())];
        let snapshot8 = tokio::task::block_in_place(|| {
            WasmPlugin::load_snapshot(&engine, &bert, &dir, limits, &int8).unwrap()
        });
        assert!(matches!(snapshot8.snapshot(), SnapshotStatus::Used(_)), "{:?}", snapshot8.snapshot());
        let starts = |plugin: &WasmPlugin, n: usize, config: Vec<(String, String)>| {
            let plugin = plugin.clone();
            async move {
                let mut samples = Vec::new();
                for _ in 0..n {
                    let at = Instant::now();
                    let instance =
                        WasmEmbedder::start(plugin.clone(), limits, config.clone()).await.unwrap();
                    samples.push(at.elapsed());
                    let r = instance.embed(vec!["ready".into()], false, None).await.unwrap();
                    assert_eq!(r.dimension(), 384);
                }
                samples
            }
        };
        let restored = starts(&snapshot, SNAPSHOT_STARTS, vec![]).await;
        let restored8 = starts(&snapshot8, SNAPSHOT_STARTS, int8.clone()).await;
        let loaded = starts(&plain, PLAIN_STARTS, vec![]).await;
        println!("real model (all-MiniLM-L6-v2, WASM): a new instance ready to embed");
        let (plain50, plain99) = report("plain plugin, weights read in init (baseline)", loaded);
        let (snap50, snap99) = report("from the pre-initialized snapshot", restored);
        let (int8_50, int8_99) = report("the same at int8 (packed int8 weights)", restored8);
        println!(
            "{:<40} p50 {:.0}x, p99 {:.0}x faster (target: p99 under 5 ms)",
            "snapshot / baseline",
            plain50.as_secs_f64() / snap50.as_secs_f64(),
            plain99.as_secs_f64() / snap99.as_secs_f64()
        );
        for (p, snap, plain) in [("p50", snap50, plain50), ("p99", snap99, plain99)] {
            figure(
                "Real model restarts (all-MiniLM-L6-v2, WASM)",
                &format!("a new instance ready from the snapshot, {p}"),
                ms(snap),
                "ms",
                (&format!("the plain plugin reading its weights in init, {p}"), ms(plain)),
                Better::Lower,
                COMMAND,
            );
        }
        for (p, snap, plain) in [("p50", int8_50, plain50), ("p99", int8_99, plain99)] {
            figure(
                "Real model restarts (all-MiniLM-L6-v2, WASM)",
                &format!("a new int8 instance ready from its snapshot, {p}"),
                ms(snap),
                "ms",
                (&format!("the plain plugin reading its weights in init, {p}"), ms(plain)),
                Better::Lower,
                COMMAND,
            );
        }
    });
}
