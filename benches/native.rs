//! The native backend's process boundary: the same ONNX engine and model
//! (all-MiniLM-L6-v2), embedding the same batch of 32 short sentences,
//! called in this process and through a supervised child process (frames on
//! pipes, the supervisor's queue). The difference is what the boundary
//! costs. `cargo bench --bench native` (or `./x bench --bench native`).
//!
//! A 3% difference is below the noise of two separate timing runs on a
//! shared machine, so the two paths are measured in alternating pairs (the
//! order flipped every round) and the figure is the median of the paired
//! differences against the median in-process time.
//!
//! The model is fetched into `target/embedhost-deps/models` on first use.

mod common;

use std::time::{Duration, Instant};

use embedhost::native::child::Engine;
use embedhost::native::onnx::OnnxEngine;
use embedhost::supervisor::{Supervisor, SupervisorConfig};

/// Rounds of (in-process, child) pairs under `cargo bench`; a smoke run
/// under `cargo test` does a few.
const ROUNDS: usize = 60;
const SMOKE_ROUNDS: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"native onnx-boundary".contains(a.as_str()))
    {
        return;
    }
    let rounds = if args.iter().any(|a| a == "--bench") {
        ROUNDS
    } else {
        SMOKE_ROUNDS
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let texts = common::short_sentences(32);
    let settings = common::onnx_settings(common::model_dir(), threads);
    let mut engine = OnnxEngine::load(&settings).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spawner = common::onnx_spawner(&settings, Duration::from_secs(60));
    let supervision = SupervisorConfig {
        pool_size: 1,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let supervisor = rt
        .block_on(Supervisor::start(spawner, supervision))
        .unwrap();
    let deadline = Duration::from_secs(60);
    // Both paths compute the same vectors (and this warms both up).
    let direct = engine.embed(&texts, false).unwrap();
    let through = rt
        .block_on(supervisor.embed(texts.clone(), false, deadline))
        .unwrap();
    assert_eq!(
        direct, through.vectors,
        "the same engine gives the same vectors"
    );

    let mut local = Vec::new();
    let mut child = Vec::new();
    let in_process = |engine: &mut OnnxEngine| {
        let at = Instant::now();
        std::hint::black_box(engine.embed(&texts, false).unwrap());
        at.elapsed().as_secs_f64()
    };
    let through_child = || {
        rt.block_on(async {
            let at = Instant::now();
            std::hint::black_box(
                supervisor
                    .embed(texts.clone(), false, deadline)
                    .await
                    .unwrap(),
            );
            at.elapsed().as_secs_f64()
        })
    };
    for round in 0..rounds {
        if round % 2 == 0 {
            local.push(in_process(&mut engine));
            child.push(through_child());
        } else {
            child.push(through_child());
            local.push(in_process(&mut engine));
        }
    }
    let differences: Vec<f64> = child.iter().zip(&local).map(|(c, l)| c - l).collect();
    let child_copy = child.clone();
    let (base, over) = (median(local.clone()), median(differences));
    println!(
        "onnx boundary (cargo bench --bench native): all-MiniLM-L6-v2, batch of 32 short sentences, {threads} intra-op threads, {rounds} alternating pairs"
    );
    println!(
        "{:<44} median {:>8.2} ms",
        "in-process engine (baseline)",
        base * 1e3
    );
    println!(
        "{:<44} median {:>8.2} ms",
        "supervised child process",
        median(child) * 1e3
    );
    println!(
        "{:<44} median {:>+8.3} ms = {:+.2}% of the in-process time",
        "boundary cost (paired difference)",
        over * 1e3,
        over / base * 100.0
    );
    common::figure(
        "The onnx engine's process boundary",
        &format!("batch of 32 short sentences in a supervised child, {threads} threads, median"),
        median(child_copy) * 1e3,
        "ms",
        ("the same engine in-process", base * 1e3),
        common::Better::Lower,
        "cargo bench --bench native",
    );
}
