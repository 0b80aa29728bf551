//! Chaos: a few thousand files indexed while the embedder fails at random
//! (traps, hangs, memory growth in WASM; SIGKILL, abort, exit, hangs and
//! leaks of native children), compared with a clean run of the same files.
//! Nothing may be lost, duplicated or changed, and every search answers.
//!
//! The soak mode (`chaos_soak`, ignored by default) repeats the chaos run on
//! one long-lived host for `EMBEDHOST_SOAK_SECS` seconds (default 120) and
//! reports restarts by reason, failures seen by callers, and the host's
//! memory after each round (`EMBEDHOST_SOAK_CLEAN=1` runs the same rounds
//! with no fault, to tell the faults' memory from the rounds'):
//!
//! ```sh
//! EMBEDHOST_SOAK_SECS=600 cargo test --test all chaos_soak -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use embedhost::config::Config;
use embedhost::supervisor::Supervisor;
use embedhost::wasm::{ArtifactCache, WasmEngine, WasmPlugin, WasmSpawner};
use embedhost::worker::Worker;
use embedhost::worker::chunk::Tokens;

use crate::worker::{contents, write};

/// Files in the corpus: "a few thousand", as the issue asks, small enough
/// that a run takes seconds on the stub.
const FILES: usize = 2000;

/// Probability that one embedder call fails: 3%, at least the issue's 2%.
/// With batches of 8 chunks (about 700 calls a run) that is about 20
/// faults a run, so each kind shows up in every run.
const CHAOS: &str = "0.03";

/// Bound on the host's memory growth over a soak (after its first round,
/// which fills caches), as a fraction of its size then: flat within 10%.
/// The worker and supervisor keep nothing per round but the in-memory
/// vectors of the current index.
const SOAK_GROWTH_DIVISOR: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Wasm,
    Native,
}

/// The config of a run: the shipped supervision policy (restart intensity,
/// backoff, poison verdict, cooldowns), with nothing relaxed; tighter
/// limits than the defaults (a short call deadline and per-KiB allowance,
/// quick hang detection, a small memory cap) so that faults are found
/// quickly; batches of 8 chunks so that a run makes many calls.
fn config(backend: Backend, chaos: bool) -> Config {
    let (name, fault) = match backend {
        Backend::Wasm => ("wasm", "fault.chaos"),
        Backend::Native => ("native", "child.chaos"),
    };
    let faults = if chaos {
        format!("\"{fault}\" = \"{CHAOS}\"")
    } else {
        String::new()
    };
    let text = format!(
        r#"
backend = "{name}"
[plugin]
path = "builtin:stub"
[plugin.config]
{faults}
[native]
engine = "stub"
executable = "{exe}"
grace_ms = 200
[limits]
memory_mb = 64
call_deadline_ms = 500
call_deadline_per_kib_ms = 100
init_deadline_ms = 10000
[index]
batch_chunks = 8
[supervisor]
pool_size = 2
health_interval_ms = 250
health_timeout_ms = 500
recycle_memory_bytes = 100000000
"#,
        exe = env!("CARGO_BIN_EXE_embedhost"),
    );
    Config::parse(&text, Path::new("/chaos/embedhost.toml")).unwrap()
}

/// The chaos runs' seed: `EMBEDHOST_CHAOS_SEED`, or a random one. Every
/// run prints it, and every assertion names it.
fn chaos_seed() -> u64 {
    let seed = std::env::var("EMBEDHOST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("chaos seed {seed} (EMBEDHOST_CHAOS_SEED={seed} replays its faults)");
    seed
}

/// A host: the configured embedder behind its bus, and a worker on it.
/// Each instance's chaos dice are seeded with `seed` mixed with its slot
/// and incarnation, so an instance's faults fall on the same calls when a
/// run is replayed with the same seed (which calls an instance gets still
/// depends on timing).
async fn host(config: &Config, seed: u64) -> (Worker, Supervisor) {
    use embedhost::supervisor::Spawner;
    let supervision = config.supervisor_config();
    let instance_seed = move |slot: usize, incarnation: u64| {
        embedhost_stub_engine::seeded_roll(seed, ((slot as u64) << 40) ^ incarnation).to_string()
    };
    let supervisor = match config.backend {
        embedhost::config::Backend::Wasm => {
            let engine =
                WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
            let spawner = WasmSpawner {
                plugin: WasmPlugin::load(&engine, &config.plugin_source()).unwrap(),
                limits: config.instance_limits(),
                config: config.wasm_plugin_config(),
            };
            let seeded = move |slot, incarnation| {
                let mut spawner = spawner.clone();
                spawner
                    .config
                    .push(("fault.chaos_seed".into(), instance_seed(slot, incarnation)));
                spawner.start(slot, incarnation)
            };
            Supervisor::from_fn(seeded, supervision).await.unwrap()
        }
        embedhost::config::Backend::Native => {
            let spawner = config.native_spawner(None).unwrap();
            let seeded = move |slot, incarnation| {
                let mut spawner = spawner.clone();
                spawner
                    .settings
                    .push(("child.chaos_seed".into(), instance_seed(slot, incarnation)));
                spawner.start(slot, incarnation)
            };
            Supervisor::from_fn(seeded, supervision).await.unwrap()
        }
    };
    let embedder = embedhost::embedder::Embedder::local(supervisor.clone(), Tokens::Words);
    let worker = Worker::new(
        embedder,
        supervisor.model_info(),
        Tokens::Words,
        embedhost::worker::WorkerSettings::from_config(config),
    );
    (worker, supervisor)
}

/// Notes of one to three chunks each, in folders.
fn corpus(dir: &Path) {
    for i in 0..FILES {
        let words = 40 + (i % 3) * 250;
        let text: Vec<String> = (0..words)
            .map(|j| format!("w{}", (i * 37 + j * 11) % 1499))
            .collect();
        let lines: Vec<String> = text.chunks(12).map(|l| l.join(" ")).collect();
        write(
            &dir.join(format!("d{}/note{i}.txt", i % 20)),
            &lines.join("\n"),
        );
    }
}

/// What one index run saw.
struct Run {
    contents: Vec<String>,
    /// Files the worker reported as not indexed, by reason, plus stalls.
    caller_failures: BTreeMap<String, u64>,
    searches: Vec<Vec<(String, u32)>>,
}

const QUERIES: &[&str] = &["w1 w12 w23", "w400 w401", "w1000 w77 w5"];

/// Indexes `docs` into a fresh `db` on `worker` and waits for the end.
async fn index(worker: &Worker, docs: &Path, db: &Path) -> Run {
    worker.init(db).await.unwrap();
    worker.index(vec![docs.to_path_buf()]).await.unwrap();
    let mut caller_failures = BTreeMap::new();
    let started = Instant::now();
    loop {
        let stats = worker.stats().await.unwrap();
        if let Some(reason) = &stats.stalled {
            // A stall is a failure the caller sees; resume as a user would.
            *caller_failures
                .entry(format!("stalled: {reason}"))
                .or_default() += 1;
            worker.index(vec![docs.to_path_buf()]).await.unwrap();
        } else if stats.queued == 0 && stats.processing == 0 {
            for (reason, n) in stats.failures {
                *caller_failures.entry(reason).or_default() += n;
            }
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "indexing did not finish: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut searches = Vec::new();
    for q in QUERIES {
        let hits = worker.search(q.to_string(), 5).await.unwrap();
        searches.push(
            hits.iter()
                .map(|h| (h.path.display().to_string(), h.score.to_bits()))
                .collect(),
        );
    }
    Run {
        contents: contents(db),
        caller_failures,
        searches,
    }
}

/// The clean run's result, once per test binary.
async fn clean(docs: &Path, db: &Path) -> Run {
    let (worker, _supervisor) = host(&config(Backend::Wasm, false), 0).await;
    let run = index(&worker, docs, db).await;
    assert!(run.caller_failures.is_empty(), "{:?}", run.caller_failures);
    assert!(run.contents.len() >= FILES, "every file has a chunk");
    run
}

async fn chaos_equals_clean(backend: Backend) {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    corpus(&docs);
    let clean = clean(&docs, &root.path().join("clean")).await;

    let seed = chaos_seed();
    let (worker, supervisor) = host(&config(backend, true), seed).await;
    let run = index(&worker, &docs, &root.path().join("chaos")).await;
    let restarts = supervisor.restarts();
    let total: u64 = restarts.values().sum();
    eprintln!("{backend:?} chaos (seed {seed}): restarts {restarts:?}");
    assert!(total >= 5, "chaos happened: {restarts:?} (seed {seed})");
    let expected: &[&str] = match backend {
        Backend::Wasm => &["trap", "deadline", "memory_cap"],
        Backend::Native => &["exited"],
    };
    for reason in expected {
        assert!(
            restarts.get(*reason).is_some_and(|n| *n > 0),
            "{reason} in {restarts:?} (seed {seed})"
        );
    }
    assert!(
        run.caller_failures.is_empty(),
        "callers saw failures: {:?} (seed {seed})",
        run.caller_failures
    );
    assert_eq!(
        run.contents.len(),
        clean.contents.len(),
        "no chunk lost or duplicated (seed {seed})"
    );
    assert!(
        run.contents == clean.contents,
        "the chaos index differs from the clean one (seed {seed})"
    );
    assert_eq!(
        run.searches, clean.searches,
        "every search answers as on the clean index (seed {seed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_embedder_failing_at_random_loses_and_duplicates_nothing() {
    chaos_equals_clean(Backend::Wasm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_children_killed_hung_and_leaking_at_random_lose_and_duplicate_nothing() {
    chaos_equals_clean(Backend::Native).await;
}

fn resident_bytes() -> u64 {
    let me = procfs::process::Process::myself().unwrap();
    me.statm().unwrap().resident * procfs::page_size()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: runs for EMBEDHOST_SOAK_SECS (default 120); run with --ignored --nocapture"]
async fn chaos_soak() {
    let secs: u64 = std::env::var("EMBEDHOST_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    // This process stands in for a long-running host: the same allocator
    // settings as the binary's.
    embedhost::memory::tune();
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    corpus(&docs);
    let clean = clean(&docs, &root.path().join("clean")).await;
    let mut report = String::new();
    for backend in [Backend::Wasm, Backend::Native] {
        let faults = std::env::var_os("EMBEDHOST_SOAK_CLEAN").is_none();
        let (worker, supervisor) = host(&config(backend, faults), chaos_seed()).await;
        let until = Instant::now() + Duration::from_secs(secs / 2);
        let (mut rounds, mut mismatches) = (0u64, 0u64);
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut start_rss = 0;
        let mut previous: Option<PathBuf> = None;
        while rounds == 0 || Instant::now() < until {
            let db = root.path().join(format!("{backend:?}-{rounds}"));
            let run = index(&worker, &docs, &db).await;
            if let Some(old) = previous.replace(db) {
                let _ = std::fs::remove_dir_all(old);
            }
            rounds += 1;
            if run.contents != clean.contents || run.searches != clean.searches {
                mismatches += 1;
            }
            for (reason, n) in run.caller_failures {
                *failures.entry(reason).or_default() += n;
            }
            if rounds == 1 {
                start_rss = resident_bytes();
            }
            eprintln!(
                "{backend:?} round {rounds}: host memory {:.0} MiB",
                resident_bytes() as f64 / 1048576.0
            );
        }
        let end_rss = resident_bytes();
        let line = format!(
            "{backend:?}: {rounds} rounds of {FILES} files in {secs_half} s; restarts {restarts:?}; \
             failures seen by callers {failures:?}; rounds differing from the clean index {mismatches}; \
             host memory {:.0} MiB after round 1, {:.0} MiB at the end\n",
            start_rss as f64 / 1048576.0,
            end_rss as f64 / 1048576.0,
            secs_half = secs / 2,
            restarts = supervisor.restarts(),
        );
        eprint!("{line}");
        report.push_str(&line);
        assert!(failures.is_empty(), "{report}");
        assert_eq!(mismatches, 0, "{report}");
        assert!(
            end_rss <= start_rss + start_rss / SOAK_GROWTH_DIVISOR,
            "the host grew by more than 1/{SOAK_GROWTH_DIVISOR} of its size after round 1: {report}"
        );
    }
    println!("soak report:\n{report}");
}
