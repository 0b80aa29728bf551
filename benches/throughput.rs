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
//! of 256 tokens (truncated). The four backends are measured in turns
//! ([`ROUNDS`]), so each ratio compares the same stretch of the run.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{ArtifactCache, PluginSource, WasmEngine, WasmPlugin};

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

/// The linear layers of all-MiniLM-L6-v2 on a 256-token passage: rows,
/// outputs, inputs (query/key/value, attention output, intermediate,
/// output), and the share of the layer's outputs whose int8 products the
/// model adds in pairs (all but the values': see `Sums` in plugins/kernels).
const LAYER_SHAPES: &[(usize, usize, usize, f64)] = &[
    (256, 1152, 384, 2.0 / 3.0),
    (256, 384, 384, 1.0),
    (256, 1536, 384, 1.0),
    (256, 384, 1536, 1.0),
];

/// The best of `tries` timings of `f`, in seconds.
fn best(tries: usize, mut f: impl FnMut()) -> f64 {
    (0..tries)
        .map(|_| {
            let at = Instant::now();
            f();
            at.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The plugin's linear-layer kernels alone, in the sandbox (the host's own
/// engine settings: epoch interruption, relaxed SIMD), against a native
/// single-threaded f32 product (`matrixmultiply`, which uses AVX2 and FMA
/// where the CPU has them) on the same shapes: GFLOP/s and GOP/s (two
/// operations per multiply-add), best of several runs each.
fn kernels(engine: &WasmEngine, tries: usize) {
    use common::kernel_probe::Precision;
    let (mut store, probe) = common::kernel_probe::instantiate(engine);
    println!(
        "kernels alone (cargo bench --bench throughput): all-MiniLM-L6-v2's linear layers on 256 tokens, one thread, best of {tries}"
    );
    // Seconds for all four shapes: native f32, guest f32, guest int8 with
    // exact sums, with paired sums, and as the model runs each layer.
    let (mut ops, mut native_s, mut f32_s) = (0.0, 0.0, 0.0);
    let (mut exact_s, mut pairs_s, mut model_s) = (0.0, 0.0, 0.0);
    for &(rows, outputs, inputs, paired) in LAYER_SHAPES {
        let flops = 2.0 * (rows * outputs * inputs) as f64;
        let a: Vec<f32> = (0..rows * inputs).map(|i| (i % 13) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..outputs * inputs)
            .map(|i| (i % 7) as f32 * 0.01)
            .collect();
        let mut c = vec![0f32; rows * outputs];
        let native = best(tries, || unsafe {
            // c (rows x outputs) = a (rows x inputs) * b^T (inputs x outputs).
            matrixmultiply::sgemm(
                rows,
                inputs,
                outputs,
                1.0,
                a.as_ptr(),
                inputs as isize,
                1,
                b.as_ptr(),
                1,
                inputs as isize,
                0.0,
                c.as_mut_ptr(),
                outputs as isize,
                1,
            );
            std::hint::black_box(&c);
        });
        let mut guest = |precision| {
            let (r, o, i) = (rows as u32, outputs as u32, inputs as u32);
            // The first call packs the weights; only the products are timed.
            probe
                .call_linear(&mut store, precision, r, o, i, 1)
                .unwrap();
            best(tries, || {
                std::hint::black_box(
                    probe
                        .call_linear(&mut store, precision, r, o, i, 1)
                        .unwrap(),
                );
            })
        };
        let (f, exact, pairs) = (
            guest(Precision::Fp32),
            guest(Precision::Int8),
            guest(Precision::Int8Pairs),
        );
        let rate = |s: f64| flops / s / 1e9;
        println!(
            "  {rows}x{inputs} -> {outputs}: native f32 {:.1} GFLOP/s; guest f32 {:.1} GFLOP/s ({:.2}x); guest int8 {:.1} GOP/s exact ({:.2}x), {:.1} GOP/s paired ({:.2}x){}",
            rate(native),
            rate(f),
            native / f,
            rate(exact),
            native / exact,
            rate(pairs),
            native / pairs,
            if paired == 1.0 {
                ", the model pairs all"
            } else {
                ", the model pairs 2/3"
            }
        );
        ops += flops;
        native_s += native;
        f32_s += f;
        exact_s += exact;
        pairs_s += pairs;
        model_s += paired * pairs + (1.0 - paired) * exact;
    }
    let section = "The kernels alone (one thread, the four linear layers of a 256-token passage)";
    let rate = |s: f64| ops / s / 1e9;
    println!(
        "  all four: native f32 {:.1} GFLOP/s; guest f32 {:.1} GFLOP/s ({:.2}x); guest int8 as the model runs them {:.1} GOP/s ({:.2}x)",
        rate(native_s),
        rate(f32_s),
        native_s / f32_s,
        rate(model_s),
        native_s / model_s
    );
    for (what, secs) in [
        ("guest f32", f32_s),
        (
            "guest int8, exact sums (with per-row quantization)",
            exact_s,
        ),
        ("guest int8, paired sums", pairs_s),
        (
            "guest int8 as the model runs it (paired sums but for the attention's values)",
            model_s,
        ),
    ] {
        common::figure(
            section,
            what,
            rate(secs),
            "G(FL)OP/s",
            ("native f32 (matrixmultiply)", rate(native_s)),
            common::Better::Higher,
            "cargo bench --bench throughput",
        );
    }
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
    let wasm_pool = |precision: &str| common::bert_pool(&rt, &plugin, precision, pool.clone());
    kernels(&engine, if seconds > 0.0 { 15 } else { 1 });
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
        let rates = common::through(
            &rt,
            &[(&native, 1), (&int8, 1), (&wasm, cores), (&wasm32, cores)],
            &batch,
            seconds,
        );
        let (n, q, w, w32) = (rates[0], rates[1], rates[2], rates[3]);
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
