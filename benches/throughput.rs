//! Embedding throughput of all-MiniLM-L6-v2 on each backend, against the
//! baseline a user would otherwise pick, measured in one run on the same
//! machine: `cargo bench --bench throughput` (or `./x bench --bench
//! throughput`).
//!
//! - native: the onnx engine in one supervised child with every core as an
//!   intra-op thread, on the fp32 graph and on the int8 one
//!   (`[native] precision = "int8"`);
//! - WASM: a pool of one BERT plugin instance per core, batches dispatched
//!   concurrently (parallelism comes from the pool, one thread each), at
//!   int8 (the default) and at fp32;
//! - baseline: Python onnxruntime with the Hugging Face tokenizer on the same
//!   model.onnx and the same thread count (`scripts/bench_python_ort.py`).
//!
//! Two workloads: batches of 32 short sentences, and batches of 8 passages
//! of 256 tokens (truncated).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{
    ArtifactCache, InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner,
};

/// Measuring time per backend and workload under `cargo bench`; a smoke
/// run under `cargo test` does one pass.
const SECONDS: f64 = 8.0;
const DEADLINE: Duration = Duration::from_secs(300);

fn passage_batch() -> Vec<String> {
    let text = "Semantic search finds documents by what they mean rather than by the words they share, \
                so a question about resetting a password finds the page about lost login credentials. ";
    (0..8)
        .map(|i| format!("Passage {i}. {}", text.repeat(12)))
        .collect()
}

/// Sentences per second through `supervisor`, `concurrency` batches in
/// flight at a time.
fn through(
    rt: &tokio::runtime::Runtime,
    supervisor: &Supervisor,
    batch: &[String],
    concurrency: usize,
    seconds: f64,
) -> f64 {
    rt.block_on(async {
        // Warm-up: every instance once.
        let warm: Vec<_> = (0..concurrency)
            .map(|_| {
                let (s, b) = (supervisor.clone(), batch.to_vec());
                tokio::spawn(async move { s.embed(b, false, DEADLINE).await.unwrap() })
            })
            .collect();
        for w in warm {
            w.await.unwrap();
        }
        let start = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (s, b) = (supervisor.clone(), batch.to_vec());
                tokio::spawn(async move {
                    let mut sentences = 0;
                    loop {
                        let r = s.embed(b.clone(), false, DEADLINE).await.unwrap();
                        assert!(r.failed.is_empty());
                        sentences += b.len();
                        if start.elapsed().as_secs_f64() >= seconds {
                            return sentences;
                        }
                    }
                })
            })
            .collect();
        let mut sentences = 0;
        for w in workers {
            sentences += w.await.unwrap();
        }
        sentences as f64 / start.elapsed().as_secs_f64()
    })
}

/// Sentences per second of the Python baseline on the same batch.
fn python(dir: &Path, batch: &[String], threads: usize, seconds: f64) -> Option<f64> {
    let deps = embedhost::deps::deps_dir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_python_ort.py");
    let mut child = std::process::Command::new(deps.join("venv/bin/python"))
        .arg(script)
        .arg(dir)
        .arg(threads.to_string())
        .arg(seconds.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let input = serde_json::to_vec(&[batch]).ok()?;
    std::io::Write::write_all(child.stdin.as_mut()?, &input).ok()?;
    drop(child.stdin.take());
    let out = child.wait_with_output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["sentences"].as_f64()? / v["seconds"].as_f64()?)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"throughput".contains(a.as_str()))
    {
        return;
    }
    let seconds = if args.iter().any(|a| a == "--bench") {
        SECONDS
    } else {
        0.0
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = common::model_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let native = common::onnx_spawner(&common::onnx_settings(dir.clone(), cores), DEADLINE);
    let one = SupervisorConfig {
        pool_size: 1,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let native = rt.block_on(Supervisor::start(native, one.clone())).unwrap();
    let mut int8 = common::onnx_settings(dir.clone(), cores);
    int8.model_file = Some(embedhost::native::onnx::INT8_MODEL_FILE.into());
    let int8 = common::onnx_spawner(&int8, DEADLINE);
    let int8 = rt.block_on(Supervisor::start(int8, one.clone())).unwrap();

    let cache = std::env::temp_dir().join("embedhost-bench-cache");
    let engine = WasmEngine::new(Some(ArtifactCache::new(cache))).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap())
        .unwrap()
        .with_model_dir(&dir);
    let pool = SupervisorConfig {
        pool_size: cores,
        ..one
    };
    let wasm_pool = |precision: &str| {
        let spawner = WasmSpawner {
            plugin: plugin.clone(),
            limits: InstanceLimits::default(),
            config: vec![("precision".into(), precision.into())],
        };
        rt.block_on(Supervisor::start(spawner, pool.clone()))
            .unwrap()
    };
    let wasm = wasm_pool("int8");
    let wasm32 = wasm_pool("fp32");

    println!(
        "throughput (cargo bench --bench throughput): all-MiniLM-L6-v2, {cores} cores, sentences/s"
    );
    println!(
        "{:<26} {:>10} {:>10} {:>11} {:>10} {:>10} {:>14} {:>12} {:>12} {:>12}",
        "workload",
        "python ort",
        "native",
        "native int8",
        "wasm int8",
        "wasm fp32",
        "native/python",
        "int8/native",
        "wasm8/native",
        "wasm32/native"
    );
    for (name, batch) in [
        ("32 short sentences", common::short_sentences(32)),
        ("8 passages of 256 tokens", passage_batch()),
    ] {
        let base = python(&dir, &batch, cores, seconds.max(0.1));
        let n = through(&rt, &native, &batch, 1, seconds);
        let q = through(&rt, &int8, &batch, 1, seconds);
        let w = through(&rt, &wasm, &batch, cores, seconds);
        let w32 = through(&rt, &wasm32, &batch, cores, seconds);
        let base_text = base.map_or("-".to_string(), |b| format!("{b:.1}"));
        let ratio = base.map_or("-".to_string(), |b| format!("{:.2}x", n / b));
        println!(
            "{name:<26} {base_text:>10} {n:>10.1} {q:>11.1} {w:>10.1} {w32:>10.1} {ratio:>14} {:>11.2}x {:>11.2}x {:>11.2}x",
            q / n,
            w / n,
            w32 / n
        );
        let section = format!("Embedding throughput (all-MiniLM-L6-v2, {cores} cores)");
        let record = |what: &str, value: f64, baseline: (&str, f64)| {
            common::figure(
                &section,
                &format!("{what}, batches of {name}"),
                value,
                "sentences/s",
                baseline,
                common::Better::Higher,
                "cargo bench --bench throughput",
            )
        };
        if let Some(b) = base {
            record(
                "native fp32",
                n,
                ("Python onnxruntime, same files and threads", b),
            );
        }
        record("native int8", q, ("native fp32", n));
        record(&format!("WASM int8 pool of {cores}"), w, ("native fp32", n));
        record(
            &format!("WASM int8 pool of {cores}, against native int8"),
            w,
            ("native int8", q),
        );
        record(
            &format!("WASM fp32 pool of {cores}"),
            w32,
            ("native fp32", n),
        );
    }
    for (name, supervisor) in [
        ("native", &native),
        ("native int8", &int8),
        ("wasm int8", &wasm),
        ("wasm fp32", &wasm32),
    ] {
        for i in supervisor.status() {
            println!(
                "{name} instance {}: {} MB at its last health check, restarts {:?}",
                i.slot,
                i.memory_bytes / 1_000_000,
                i.restarts
            );
        }
    }
}
