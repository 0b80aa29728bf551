//! The NATS transport against the child transport, and three members
//! against one, on a real nats-server (`./x setup` installs it):
//! `cargo bench --bench nats`.
//!
//! - latency of one `embedder.embed` of one short text: over NATS to an
//!   `embedhost serve --nats` member (stub WASM, its supervisor and batcher
//!   included) against the child transport to a stub child;
//! - throughput of three members against one, each a pool of one
//!   all-MiniLM-L6-v2 instance (native, one thread: CPU-bound, as
//!   embedding is), as many requests of 32 texts in flight as the members
//!   take (two each). This machine has two cores: three members cannot run
//!   faster than two cores allow, so the figure shows the transport's
//!   overhead, not scaling. The report adds a paper estimate from the
//!   measured overhead.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Better, figure};
use embedhost::bus::transport::child::ChildProcess;
use embedhost::bus::transport::nats::{Nats, NatsOptions, connect};
use embedhost::bus::{Bus, SendOptions};
use embedhost::messages::{EmbedRequest, EmbedderEmbed};

const SECTION: &str = "Several machines: the NATS transport";
const COMMAND: &str = "cargo bench --bench nats";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A member serving the stub (`model: None`) or the real model from
/// `model` on the native onnx engine, one instance of one thread.
fn member(dir: &Path, url: &str, model: Option<&Path>) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let backend = match model {
        None => "plugin.path = \"builtin:stub\"\n".to_string(),
        Some(m) => format!(
            "backend = \"native\"\n[native]\nengine = \"onnx\"\nthreads = 1\nexecutable = \"{}\"\n[model]\ndir = \"{}\"\n",
            env!("CARGO_BIN_EXE_embedhost"),
            m.display()
        ),
    };
    std::fs::write(
        dir.join("embedhost.toml"),
        format!("{backend}[index]\ndir = \"index\"\n[supervisor]\npool_size = 1\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--nats", url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Proc(child)
}

fn request(texts: &[String]) -> EmbedRequest {
    EmbedRequest {
        texts: texts.to_vec(),
        is_query: false,
    }
}

/// Median latency of `n` sequential one-text calls.
async fn latency(bus: &Bus, n: usize) -> f64 {
    let text = vec!["the quick brown fox".to_string()];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n + 5 {
        let t = Instant::now();
        bus.send::<EmbedderEmbed>(request(&text), SendOptions::default())
            .await
            .unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    let mut times = times.split_off(5);
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Texts per second with `concurrency` requests of 32 texts in flight.
async fn throughput(bus: &Bus, concurrency: usize, seconds: f64) -> f64 {
    let batch = common::short_sentences(32);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (bus, batch) = (bus.clone(), batch.clone());
            tokio::spawn(async move {
                let mut done = 0usize;
                loop {
                    // A full member says so at once; the retry (after
                    // a short backoff) reaches another, as a worker's does.
                    let options = SendOptions::default()
                        .retries(100)
                        .backoff(Duration::from_millis(1), Duration::from_millis(20));
                    bus.send::<EmbedderEmbed>(request(&batch), options)
                        .await
                        .unwrap();
                    done += batch.len();
                    if started.elapsed().as_secs_f64() >= seconds {
                        return done;
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"nats".contains(a.as_str()))
    {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let (n, seconds) = if bench { (500, 8.0) } else { (5, 0.0) };
    let Some(deps) = embedhost::deps::deps_dir() else {
        eprintln!("nats: run ./x setup first");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Proc(
        Command::new(deps.join("venv/bin/nats-server"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (run ./x setup)"),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let connect_bus = || {
        rt.block_on(async {
            let client = connect(&url, &NatsOptions::default(), "bench")
                .await
                .unwrap();
            Bus::new(Nats::new(client, "all-minilm-l6-v2").await.unwrap())
        })
    };
    // Waits until some member answers.
    let ready = |bus: &Bus| {
        rt.block_on(async {
            let options = SendOptions::default().retries(50);
            bus.send::<EmbedderEmbed>(request(&["warm".to_string()]), options)
                .await
                .unwrap();
        })
    };

    // Latency: one member without a model's cost, against a stub child.
    let fast = member(&dir.path().join("fast"), &url, None);
    let bus = connect_bus();
    ready(&bus);
    let over_nats = rt.block_on(latency(&bus, n));
    drop(fast);
    let child = rt.block_on(async {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_embedhost"));
        cmd.args(["child", "--engine", "stub"]);
        ChildProcess::spawn(cmd, "bench-child").unwrap()
    });
    let child_bus = Bus::new(child.connection());
    let over_child = rt.block_on(latency(&child_bus, n));
    drop(child);

    // Throughput: one member, then three, each one real-model instance of
    // one thread (CPU-bound, as embedding is).
    let model = common::model_dir();
    let one = member(&dir.path().join("m1"), &url, Some(&model));
    // A new connection: the first one's pool served the stub's model, and
    // a member of another model is refused on it.
    let bus = connect_bus();
    ready(&bus);
    // Requests in flight: what the members have room for (two each).
    let with_one = rt.block_on(throughput(&bus, 2, seconds));
    let two = member(&dir.path().join("m2"), &url, Some(&model));
    let three = member(&dir.path().join("m3"), &url, Some(&model));
    // Both new members up: each answers its first request.
    std::thread::sleep(Duration::from_millis(2000));
    let with_three = rt.block_on(throughput(&bus, 6, seconds));
    drop((one, two, three));

    let overhead = (over_nats - over_child).max(0.0);
    // One instance's time per request of 32 texts, from the one-member run.
    let per_request = 32.0 / with_one.max(1e-9);
    println!("nats (cargo bench --bench nats)");
    println!(
        "one embedder.embed: {:.0} µs over NATS (member's pool included), {:.0} µs over the child transport",
        over_nats * 1e6,
        over_child * 1e6
    );
    println!(
        "throughput, members of one all-MiniLM-L6-v2 instance: 1 member {with_one:.0} texts/s, 3 members {with_three:.0} texts/s ({:.2}x; 2 cores)",
        with_three / with_one
    );
    let rate = 32.0 / (per_request + overhead);
    println!(
        "paper estimate: a request of 32 texts takes {:.0} ms on one instance plus {:.2} ms over NATS, so a machine with one free core adds about {rate:.0} texts/s, and N machines give about N x {rate:.0} ({:.1}% lost to the transport) until the server or the caller saturates",
        per_request * 1e3,
        overhead * 1e3,
        100.0 * overhead / (per_request + overhead)
    );
    figure(
        SECTION,
        "one `embedder.embed` of one text over NATS (to a `serve` member, its pool included), median",
        over_nats * 1e3,
        "ms",
        ("over the child transport to a stub child", over_child * 1e3),
        Better::Lower,
        COMMAND,
    );
    figure(
        SECTION,
        "three members of one all-MiniLM-L6-v2 instance each, 6 requests of 32 texts in flight (texts/s; 2 cores: three cannot scale)",
        with_three,
        "texts/s",
        ("one member, 2 in flight", with_one),
        Better::Higher,
        COMMAND,
    );
}
