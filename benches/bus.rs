//! Bus, codec and backend overheads, each measured against its baseline in
//! the same run. `cargo bench --bench bus` (or `./x bench`); filter by group:
//! `./x bench -- in-process`, `child-process`, `cbor`, `embed`, `wit-shape`.

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use embedhost::bus::transport::InProcess;
use embedhost::bus::transport::child::ChildProcess;
use embedhost::bus::{Bus, Empty, Router};
use embedhost::messages::{EmbedderHealth, HealthResponse};
use embedhost::vectors::Vectors;
use embedhost::wasm::{InstanceLimits, PluginSource, WasmEmbedder, WasmEngine, WasmPlugin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `iters` sequential round trips on one task of the runtime (as a
/// real caller would run) and times them, so neither `block_on`'s entry cost
/// nor its cross-thread wake-up is part of the figure.
fn timed<F, Fut>(rt: &Runtime, iters: u64, mut f: F) -> Duration
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    rt.block_on(rt.spawn(async move {
        let start = Instant::now();
        for _ in 0..iters {
            f().await;
        }
        start.elapsed()
    }))
    .unwrap()
}

fn health_router() -> Router {
    let mut router = Router::new();
    router.handle::<EmbedderHealth, _, _>(|_, _| async {
        Ok(HealthResponse {
            memory: 1,
            processed_count: 2,
        })
    });
    router
}

/// `embedder.health` round trips through `bus`, the bus's cheapest request.
fn bench_health(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    rt: &Runtime,
    bus: &Bus,
) {
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let bus = bus.clone();
            timed(rt, iters, move || {
                let bus = bus.clone();
                async move {
                    std::hint::black_box(bus.request::<EmbedderHealth>(Empty {}).await.unwrap());
                }
            })
        })
    });
}

fn in_process(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("in-process");
    group.bench_function("raw-oneshot", |b| {
        b.iter_custom(|iters| {
            timed(&rt, iters, || async {
                // The same work as the transport minus the bus: a task per
                // request and a oneshot for its answer.
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let _ = tx.send(HealthResponse {
                        memory: 1,
                        processed_count: 2,
                    });
                });
                std::hint::black_box(rx.await.unwrap());
            })
        })
    });
    let bus = Bus::new(InProcess::new(health_router()));
    bench_health(&mut group, "bus-with-middleware", &rt, &bus);
    group.finish();
}

fn child_process(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("child-process");
    // Baseline: `cat` echoing a message of the size of a health frame.
    const ECHO: usize = 96;
    let (stdin, stdout, _cat) = rt.block_on(async {
        let mut cat = tokio::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        (cat.stdin.take().unwrap(), cat.stdout.take().unwrap(), cat)
    });
    let pipes = std::sync::Arc::new(tokio::sync::Mutex::new((stdin, stdout)));
    group.bench_function("raw-pipe-echo", |b| {
        b.iter_custom(|iters| {
            let pipes = pipes.clone();
            timed(&rt, iters, move || {
                let pipes = pipes.clone();
                async move {
                    let mut pipes = pipes.lock().await;
                    let (stdin, stdout) = &mut *pipes;
                    let mut back = [0u8; ECHO];
                    stdin.write_all(&[7u8; ECHO]).await.unwrap();
                    stdout.read_exact(&mut back).await.unwrap();
                    std::hint::black_box(back);
                }
            })
        })
    });
    let child = rt.block_on(async {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedhost"));
        cmd.args(["child", "--engine", "stub"]);
        ChildProcess::spawn(cmd, "bench-child").unwrap()
    });
    let bus = Bus::new(child.connection());
    bench_health(&mut group, "bus-health", &rt, &bus);
    group.finish();
    drop(child);
}

fn cbor(c: &mut Criterion) {
    let (rows, dim) = (256, 384);
    let flat: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.37).sin()).collect();
    let vectors = Vectors::new(dim, flat.clone()).unwrap();
    let nested: Vec<Vec<f32>> = flat.chunks(dim).map(<[f32]>::to_vec).collect();
    let mut group = c.benchmark_group("cbor");
    group.bench_function("256x384-float-arrays", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            ciborium::into_writer(&nested, &mut out).unwrap();
            let back: Vec<Vec<f32>> = ciborium::from_reader(out.as_slice()).unwrap();
            std::hint::black_box(back)
        })
    });
    group.bench_function("256x384-byte-string", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            ciborium::into_writer(&vectors, &mut out).unwrap();
            let back: Vectors = ciborium::from_reader(out.as_slice()).unwrap();
            std::hint::black_box(back)
        })
    });
    group.finish();
}

fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sentence number {i} about a quick brown fox and a lazy dog"))
        .collect()
}

fn embed(c: &mut Criterion) {
    let rt = runtime();
    let engine = WasmEngine::new(None).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap();
    let embedder = rt
        .block_on(WasmEmbedder::start(
            plugin,
            InstanceLimits::default(),
            vec![],
        ))
        .unwrap();
    let texts = sentences(32);
    let mut group = c.benchmark_group("embed");
    group.bench_function("stub-32-native", |b| {
        let mut engine = embedhost_stub_engine::StubEngine::new(Default::default());
        b.iter(|| std::hint::black_box(engine.embed(&texts)))
    });
    group.bench_function("stub-32-wasm", |b| {
        b.iter_custom(|iters| {
            let (embedder, texts) = (embedder.clone(), texts.clone());
            timed(&rt, iters, move || {
                let (embedder, texts) = (embedder.clone(), texts.clone());
                async move {
                    std::hint::black_box(embedder.embed(texts, false, None).await.unwrap());
                }
            })
        })
    });
    group.finish();
}

mod probe {
    wasmtime::component::bindgen!({ path: "../plugins/shape-probe/wit", world: "probe" });
}

mod probe_async {
    wasmtime::component::bindgen!({
        path: "../plugins/shape-probe/wit",
        world: "probe",
        exports: { default: async },
    });
}

/// Why the contract returns one flat `list<f32>`: lifting it against
/// lifting `list<list<f32>>` of the same floats.
fn wit_shape(c: &mut Criterion) {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let component =
        wasmtime::component::Component::from_file(&engine, embedhost::plugins::SHAPE_PROBE)
            .unwrap();
    let mut linker = wasmtime::component::Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let mut store = wasmtime::Store::new(&engine, common::ProbeState::new());
    let probe = probe::Probe::instantiate(&mut store, &component, &linker).unwrap();
    let mut group = c.benchmark_group("wit-shape");
    for rows in [32u32, 256] {
        group.bench_with_input(BenchmarkId::new("flat", rows), &rows, |b, &rows| {
            b.iter(|| std::hint::black_box(probe.call_flat(&mut store, rows, 384).unwrap()))
        });
        group.bench_with_input(BenchmarkId::new("nested", rows), &rows, |b, &rows| {
            b.iter(|| std::hint::black_box(probe.call_nested(&mut store, rows, 384).unwrap()))
        });
    }
    group.finish();
}

/// What making every plugin call cancellable costs (see `wasm/instance.rs`):
/// the same export called synchronously, as the host did before, and as the
/// host calls it now, an async call under a timer on a current-thread
/// runtime. Both lift 32 rows of 384 floats.
fn wasm_call(c: &mut Criterion) {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let component =
        wasmtime::component::Component::from_file(&engine, embedhost::plugins::SHAPE_PROBE)
            .unwrap();
    let state = common::ProbeState::new;
    let mut group = c.benchmark_group("wasm-call");
    {
        let mut linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
        let mut store = wasmtime::Store::new(&engine, state());
        store.set_epoch_deadline(u64::MAX / 2);
        let probe = probe::Probe::instantiate(&mut store, &component, &linker).unwrap();
        group.bench_function("sync-epoch", |b| {
            b.iter(|| std::hint::black_box(probe.call_flat(&mut store, 32, 384).unwrap()))
        });
    }
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        let mut store = wasmtime::Store::new(&engine, state());
        store.set_epoch_deadline(u64::MAX / 2);
        let probe = rt
            .block_on(probe_async::Probe::instantiate_async(
                &mut store, &component, &linker,
            ))
            .unwrap();
        group.bench_function("async-epoch-and-timer", |b| {
            b.iter(|| {
                let call = probe.call_flat(&mut store, 32, 384);
                let timed = async { tokio::time::timeout(Duration::from_secs(30), call).await };
                std::hint::black_box(rt.block_on(timed).unwrap().unwrap())
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: the whole suite must stay within minutes on 2 cores.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = in_process, child_process, cbor, embed, wit_shape, wasm_call }
criterion_main!(benches);
