//! The BERT plugin's speed by text length, one instance on one thread:
//! texts of about 15 tokens and of about 150, in batches, measured in
//! interleaved rounds so that a change in the machine's speed falls on every
//! plugin alike. `cargo bench --bench lengths`.
//!
//! - `EMBEDHOST_BENCH_PLUGINS=a.wasm,b.wasm` compares plugin files (an
//!   engine change A/B: build each with `cargo build --release --target
//!   wasm32-wasip2 -p embedhost-plugin-bert` in `plugins/` and copy the
//!   `.wasm` aside); the default is the built-in plugin alone.
//! - `EMBEDHOST_BENCH_PRECISION` is `int8` (the default) or `fp32`.
//! - `EMBEDHOST_BENCH_NATIVE=1` adds the native onnx engine (fp32) with one
//!   intra-op thread, as the single-threaded baseline.
//! - A plugin built with `--features stage-timing` logs each call's time per
//!   stage; `RUST_LOG=info` prints those lines.
//!
//! - Besides texts/s, texts per CPU second of this process (the instances
//!   run in it): steadier than wall time on a machine shared with other
//!   work, which takes cores away but not CPU time.
//! - `EMBEDHOST_BENCH_ROUNDS` (6) rounds of `EMBEDHOST_BENCH_SLICE` (2)
//!   seconds per workload and plugin.
//!
//! Under `cargo test` (no `--bench`) it does one short round.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{ArtifactCache, PluginSource, WasmEngine, WasmPlugin};

const DEADLINE: Duration = Duration::from_secs(300);

/// `n` texts of `words` words each on average (within ±20%), varied so that
/// no two tokenize alike. A word here is about 1.2 tokens.
fn texts(n: usize, words: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "semantic",
        "search",
        "finds",
        "documents",
        "by",
        "what",
        "they",
        "mean",
        "rather",
        "than",
        "the",
        "words",
        "share",
        "so",
        "a",
        "question",
        "about",
        "resetting",
        "password",
        "page",
        "lost",
        "login",
        "credentials",
        "index",
        "notes",
        "people",
        "quickly",
        "when",
        "model",
        "embeds",
        "every",
        "paragraph",
        "of",
        "long",
        "report",
    ];
    (0..n)
        .map(|i| {
            let count = words * (80 + (i * 37) % 41) / 100;
            (0..count.max(1))
                .map(|j| WORDS[(i * 7 + j * 3 + j / 5) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"lengths".contains(a.as_str()))
    {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let env = |key: &str, default: f64| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, slice) = if bench {
        (
            env("EMBEDHOST_BENCH_ROUNDS", 6.0) as usize,
            env("EMBEDHOST_BENCH_SLICE", 2.0),
        )
    } else {
        (1, 0.0)
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let precision = std::env::var("EMBEDHOST_BENCH_PRECISION").unwrap_or("int8".into());
    let sources: Vec<(String, PluginSource)> = match std::env::var("EMBEDHOST_BENCH_PLUGINS") {
        Ok(list) => list
            .split(',')
            .map(|p| (p.to_string(), PluginSource::File(PathBuf::from(p))))
            .collect(),
        Err(_) => vec![("builtin".into(), PluginSource::builtin("bert").unwrap())],
    };
    let dir = common::model_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = std::env::temp_dir().join("embedhost-bench-cache");
    let engine = WasmEngine::new(Some(ArtifactCache::new(cache))).unwrap();
    let one = SupervisorConfig {
        pool_size: 1,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let mut pools: Vec<(String, Supervisor)> = sources
        .iter()
        .map(|(name, source)| {
            let plugin = WasmPlugin::load(&engine, source)
                .unwrap()
                .with_model_dir(&dir);
            let pool = common::bert_pool(&rt, &plugin, &precision, one.clone());
            (name.clone(), pool)
        })
        .collect();
    if std::env::var_os("EMBEDHOST_BENCH_NATIVE").is_some_and(|v| v == "1") {
        let native = common::onnx_spawner(&common::onnx_settings(dir.clone(), 1), DEADLINE);
        let native = rt.block_on(Supervisor::start(native, one.clone())).unwrap();
        pools.push(("native fp32, 1 thread".into(), native));
    }
    println!(
        "lengths (cargo bench --bench lengths): all-MiniLM-L6-v2 {precision}, one instance, texts/s"
    );
    let workloads = [
        ("32 texts of ~15 tokens", texts(32, 12)),
        ("8 texts of ~150 tokens", texts(8, 140)),
    ];
    for (workload, batch) in &workloads {
        rt.block_on(compare(&pools, workload, batch));
    }
    let done = rt.block_on(measure(&pools, &workloads, rounds, slice));
    for ((workload, _), done) in workloads.iter().zip(done) {
        let rates: Vec<f64> = done.iter().map(|(n, s, _)| *n as f64 / s).collect();
        let per_cpu: Vec<f64> = done.iter().map(|(n, _, c)| *n as f64 / c).collect();
        for (((name, _), rate), cpu) in pools.iter().zip(&rates).zip(&per_cpu) {
            println!(
                "  {workload:<24} {name:<40} {rate:>8.1} texts/s ({:.3}x the first), {cpu:>8.1} texts per CPU second ({:.3}x)",
                rate / rates[0],
                cpu / per_cpu[0]
            );
        }
    }
}

/// Warms every pool up on `batch` and prints the largest difference of each
/// one's vectors to the first's (0 for an engine change that keeps the
/// arithmetic).
async fn compare(pools: &[(String, Supervisor)], workload: &str, batch: &[String]) {
    let mut first: Option<Vec<f32>> = None;
    for (name, pool) in pools {
        let r = pool.embed(batch.to_vec(), false, DEADLINE).await.unwrap();
        let vectors: Vec<f32> = (0..batch.len())
            .flat_map(|i| r.vectors.get(i).unwrap().to_vec())
            .collect();
        match &first {
            None => first = Some(vectors),
            Some(base) => {
                let diff = base
                    .iter()
                    .zip(&vectors)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!("  {workload:<24} {name:<40} largest |difference| to the first: {diff:e}");
            }
        }
    }
}

/// This process's CPU time (all threads, the instances' included), in
/// seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Texts done, seconds taken and CPU seconds used per workload and pool: `rounds` rounds,
/// each giving every workload and pool `slice` seconds in turn (the pools'
/// order rotating), so that a change in the machine's speed falls on all
/// of them alike, and texts of each length are measured in the same stretch.
async fn measure(
    pools: &[(String, Supervisor)],
    workloads: &[(&str, Vec<String>)],
    rounds: usize,
    slice: f64,
) -> Vec<Vec<(usize, f64, f64)>> {
    let mut done = vec![vec![(0usize, 0f64, 0f64); pools.len()]; workloads.len()];
    for round in 0..rounds {
        for (w, (_, batch)) in workloads.iter().enumerate() {
            for turn in 0..pools.len() {
                let which = (round + turn) % pools.len();
                let (start, cpu) = (Instant::now(), cpu_seconds());
                loop {
                    let r = pools[which]
                        .1
                        .embed(batch.clone(), false, DEADLINE)
                        .await
                        .unwrap();
                    assert!(r.failed.is_empty());
                    done[w][which].0 += batch.len();
                    if start.elapsed().as_secs_f64() >= slice {
                        break;
                    }
                }
                done[w][which].1 += start.elapsed().as_secs_f64();
                done[w][which].2 += cpu_seconds() - cpu;
            }
        }
    }
    done
}
