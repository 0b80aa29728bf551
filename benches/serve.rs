//! `embedhost serve` against the ways a user would otherwise embed, in one
//! run on the same machine: `cargo bench --bench serve`.
//!
//! - `/v1/embeddings` with one sentence per request at 1, 8 and 64
//!   concurrent clients, against large batch requests to the same service
//!   (the batch rate of the same backend): what dynamic batching buys;
//!   p50 and p99 latency per level;
//! - p50 and p99 of a client sending one sentence at a time while another
//!   sends the largest request the default limits allow (2,048 sentences)
//!   back to back, against the same client alone: what the batcher's
//!   round-robin by request buys;
//! - the official `openai` Python client (asyncio, 64 concurrent requests),
//!   a client that is not ours, against our own 64-client figure;
//! - `embedhost search` with a running service, against without one (whole
//!   processes, as a user runs them);
//! - `embedhost embed` of 512 short sentences, native, against a Python
//!   onnxruntime script on the same model file and cores, both as whole runs.
//!
//! The backend is native (the onnx engine, all-MiniLM-L6-v2), two children
//! of one thread each. Under `cargo test` (no `--bench`) each figure is one
//! short pass, so the benchmark cannot rot.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Better, figure};

const SECTION: &str = "The service";
const COMMAND: &str = "cargo bench --bench serve";

struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM lets it stop its pool.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, model: &Path) -> PathBuf {
    let text = format!(
        r#"
backend = "native"
[native]
engine = "onnx"
executable = "{exe}"
[model]
dir = "{model}"
[index]
dir = "index"
[supervisor]
pool_size = 2
"#,
        exe = env!("CARGO_BIN_EXE_embedhost"),
        model = model.display()
    );
    let path = dir.join("embedhost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn embedhost(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_embedhost"));
    c.current_dir(dir).env_remove("RUST_LOG");
    c
}

fn start(dir: &Path) -> Service {
    let mut child = embedhost(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let service = Service { child, url };
    let agent = agent();
    let until = Instant::now() + Duration::from_secs(120);
    while agent
        .get(format!("{}/ready", service.url))
        .call()
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < until, "the service never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    service
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, input: &serde_json::Value) {
    let body = serde_json::json!({ "input": input }).to_string();
    let response = agent
        .post(format!("{url}/v1/embeddings"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Texts per second, p50 and p99 latency of `clients` clients each sending
/// requests of `per_request` sentences for `seconds` (at least one each).
fn load(url: &str, clients: usize, per_request: usize, seconds: f64) -> (f64, f64, f64) {
    let sentences = common::short_sentences(4096);
    let started = Instant::now();
    let latencies = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (sentences, latencies) = (&sentences, &latencies);
            scope.spawn(move || {
                let agent = agent();
                let mut r = 0;
                loop {
                    let start = (c * 131 + r * per_request) % (sentences.len() - per_request);
                    let input = serde_json::json!(&sentences[start..start + per_request]);
                    let t = Instant::now();
                    post(&agent, url, &input);
                    latencies.lock().unwrap().push(t.elapsed().as_secs_f64());
                    r += 1;
                    if started.elapsed().as_secs_f64() >= seconds {
                        break;
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = latencies.into_inner().unwrap();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    (
        (latencies.len() * per_request) as f64 / elapsed,
        at(0.5),
        at(0.99),
    )
}

/// p50 and p99 latency of one client sending one sentence per request for
/// `seconds` (at least 20 requests) while another sends requests of 2,048
/// sentences (`[serve] max_inputs`) back to back; and how many of those
/// large requests were answered meanwhile.
fn beside_largest(url: &str, seconds: f64) -> (f64, f64, usize) {
    let sentences = common::short_sentences(4096);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let large = std::sync::atomic::AtomicUsize::new(0);
    let mut latencies = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let agent = agent();
            let input = serde_json::json!(&sentences[..2048]);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                post(&agent, url, &input);
                large.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let agent = agent();
        let started = Instant::now();
        for r in 0.. {
            let input = serde_json::json!(&sentences[2048 + r % 2048]);
            let t = Instant::now();
            post(&agent, url, &input);
            latencies.push(t.elapsed().as_secs_f64());
            if r >= 20 && started.elapsed().as_secs_f64() >= seconds {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), large.into_inner())
}

/// The `openai` client's texts per second with `concurrency` requests of one
/// sentence in flight, `total` requests.
fn openai_client(url: &str, concurrency: usize, total: usize) -> Option<f64> {
    let python = embedhost::deps::python()?;
    let script = r#"
import asyncio, json, sys, time
from openai import AsyncOpenAI
url, concurrency, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
words = "the quick brown fox jumps over a lazy dog while search engines index files by meaning".split()
async def main():
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    queue = list(range(total))
    async def worker():
        while queue:
            i = queue.pop()
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 10))
            await client.embeddings.create(model="all-minilm-l6-v2", input=text, encoding_format="float")
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(json.dumps({"texts": total, "seconds": time.perf_counter() - start}))
asyncio.run(main())
"#;
    let out = Command::new(python)
        .args([
            "-c",
            script,
            url,
            &concurrency.to_string(),
            &total.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("openai client: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["texts"].as_f64()? / v["seconds"].as_f64()?)
}

/// Median wall time of `runs` runs of `command`.
fn whole_runs(runs: usize, mut command: impl FnMut() -> Command) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let out = command().stdout(Stdio::null()).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"serve".contains(a.as_str()))
    {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let (seconds, runs) = if bench { (6.0, 5) } else { (0.0, 1) };
    let model = common::model_dir();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &model);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // `embed` of 512 sentences as whole runs, before any service runs.
    let sentences = common::short_sentences(512);
    let ours = whole_runs(runs, || {
        let mut c = embedhost(dir.path());
        c.arg("embed").args(&sentences);
        c
    });
    let python = embedhost::deps::python().map(|python| {
        let texts = serde_json::to_vec(&sentences.chunks(32).collect::<Vec<_>>()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_python_ort.py");
        whole_runs(runs, || {
            // The texts go through a file: `Command` has no stdin bytes.
            let input = dir.path().join("texts.json");
            std::fs::write(&input, &texts).unwrap();
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "\"{}\" \"{}\" \"{}\" {cores} once < \"{}\"",
                python.display(),
                script.display(),
                model.display(),
                input.display()
            ));
            c
        })
    });

    // `search` without a service (each run starts its own embedder).
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/corpus");
    let out = embedhost(dir.path())
        .arg("index")
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let search = || {
        let mut c = embedhost(dir.path());
        c.args(["search", "how do I reset my password"]);
        c
    };
    let search_alone = whole_runs(runs, search);

    let service = start(dir.path());
    let search_served = whole_runs(runs.max(3) * 2, search);
    let warm = agent();
    post(
        &warm,
        &service.url,
        &serde_json::json!(common::short_sentences(64)),
    );
    let (batch_rate, _, _) = load(&service.url, 1, 512, seconds);
    let levels: Vec<(usize, (f64, f64, f64))> = [1, 8, 64]
        .into_iter()
        .map(|clients| (clients, load(&service.url, clients, 1, seconds)))
        .collect();
    let (fair_p50, fair_p99, large) = beside_largest(&service.url, seconds);
    let total = if bench { 3000 } else { 64 };
    let openai = openai_client(&service.url, 64, total);
    drop(service);

    println!("serve (cargo bench --bench serve): all-MiniLM-L6-v2, native, 2 children");
    println!("batch requests of 512 sentences, 1 client: {batch_rate:.0} texts/s");
    for (clients, (rate, p50, p99)) in &levels {
        println!(
            "{clients:>2} clients, 1 sentence per request: {rate:.0} texts/s ({:.2}x of the batch rate), p50 {:.1} ms, p99 {:.1} ms",
            rate / batch_rate,
            p50 * 1e3,
            p99 * 1e3
        );
    }
    println!(
        " 1 client beside requests of 2048 sentences ({large} answered meanwhile): p50 {:.1} ms, p99 {:.1} ms",
        fair_p50 * 1e3,
        fair_p99 * 1e3
    );
    if let Some(openai) = openai {
        println!("openai Python client, 64 concurrent, 1 sentence each: {openai:.0} texts/s");
    }
    println!(
        "embedhost search: {:.0} ms with a running service, {:.0} ms without",
        search_served * 1e3,
        search_alone * 1e3
    );
    let ours_rate = 512.0 / ours;
    match python {
        Some(p) => println!(
            "embed 512 sentences, whole runs: embedhost {:.2} s ({ours_rate:.0}/s), python ort {:.2} s ({:.0}/s): {:.2}x",
            ours,
            p,
            512.0 / p,
            p / ours
        ),
        None => println!(
            "embed 512 sentences, whole run: {ours:.2} s (no Python baseline: run ./x setup)"
        ),
    }

    let batch = ("batch requests of 512 sentences, same service", batch_rate);
    for (clients, (rate, _, _)) in &levels {
        figure(
            SECTION,
            &format!("`/v1/embeddings`, {clients} client(s), 1 sentence per request (texts/s)"),
            *rate,
            "texts/s",
            batch,
            Better::Higher,
            COMMAND,
        );
    }
    let one = levels[0].1;
    for (clients, (_, p50, p99)) in &levels[1..] {
        figure(
            SECTION,
            &format!("p50 latency at {clients} clients"),
            p50 * 1e3,
            "ms",
            ("p50 at 1 client", one.1 * 1e3),
            Better::Lower,
            COMMAND,
        );
        figure(
            SECTION,
            &format!("p99 latency at {clients} clients"),
            p99 * 1e3,
            "ms",
            ("p99 at 1 client", one.2 * 1e3),
            Better::Lower,
            COMMAND,
        );
    }
    figure(
        SECTION,
        "p99 latency of 1 client (1 sentence per request) while another sends the largest legal request (2,048 sentences) back to back",
        fair_p99 * 1e3,
        "ms",
        ("p99 of the same client alone", one.2 * 1e3),
        Better::Lower,
        COMMAND,
    );
    if let Some(openai) = openai {
        figure(
            SECTION,
            "the `openai` Python client (asyncio), 64 concurrent, 1 sentence per request",
            openai,
            "texts/s",
            ("our own client at 64", levels[2].1.0),
            Better::Higher,
            COMMAND,
        );
    }
    figure(
        SECTION,
        "`embedhost search` p50, whole process, with a running service",
        search_served * 1e3,
        "ms",
        ("without a service", search_alone * 1e3),
        Better::Lower,
        COMMAND,
    );
    if let Some(p) = python {
        figure(
            SECTION,
            "`embedhost embed` of 512 short sentences, native, whole run (texts/s)",
            ours_rate,
            "texts/s",
            ("Python onnxruntime script, whole run", 512.0 / p),
            Better::Higher,
            COMMAND,
        );
    }
}
