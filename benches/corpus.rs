//! Embedding a real corpus of mixed lengths in one job, as `embedhost
//! embed` of a file's texts would, against the Python a user would write
//! instead: `cargo bench --bench corpus` (or `./x bench --bench corpus`).
//!
//! The corpus is The Rust Programming Language as the toolchain ships it
//! (`$(rustc --print sysroot)/share/doc/rust/html/book/`, on every machine
//! with Rust): each page's text (the host's HTML extractor on its `<main>`),
//! cut by the host's own chunker with the model's tokenizer, each block of
//! lines on its own so pieces vary in length; the pieces of 20 to 250
//! tokens make two thirds of the texts, and short questions about Rust the
//! other third, shuffled with a fixed seed ([`CORPUS_TEXTS`] in all).
//!
//! Four pipelines, model loads and process starts left out, measured in
//! turns ([`ROUNDS`], the order rotating every round, as `throughput` does):
//!
//! 1. embedhost native fp32 (`backend = "native"`, `[native] engine =
//!    "onnx"`) through [`Embedder`], its default pool, the corpus as one
//!    [`Job`];
//! 2. embedhost's default WASM backend (`builtin:bert`, int8) through
//!    [`Embedder`], the same way;
//! 3. Python onnxruntime with the same threads, batches of 32 in the input
//!    order (`scripts/bench_python_ort.py`);
//! 4. the same Python, the texts sorted by length first (`--sort`), as
//!    sentence-transformers' `encode` does.
//!
//! A fifth row, for the diagnosis only: the native pool of (1) given the
//! same texts straight, sorted by length in batches of 32, all at once,
//! without the front door; against (1) it shows what the front door's
//! batching costs or gains.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use embedhost::config::{Backend, Config};
use embedhost::embedder::{Embedder, Job};
use embedhost::tokens::Tokens;
use embedhost::worker::chunk::{ChunkSettings, chunk};

/// Measuring time per pipeline under `cargo bench`; a smoke run under
/// `cargo test` does one pass of [`SMOKE_TEXTS`].
const SECONDS: f64 = 16.0;
/// Rounds the measuring time is split into (each at least one pass).
const ROUNDS: usize = 6;
const DEADLINE: Duration = Duration::from_secs(300);
/// Texts in the corpus, and in a smoke run's.
const CORPUS_TEXTS: usize = 512;
const SMOKE_TEXTS: usize = 48;
/// The seed of the corpus's choice and order.
const SEED: u64 = 0x5eed_b00c;
/// The Python baseline's batch size (sentence-transformers' default).
const PY_BATCH: usize = 32;
const SECTION: &str =
    "A mixed corpus in one job (the Rust book: passages of 20-250 tokens, a third short questions)";
const COMMAND: &str = "cargo bench --bench corpus";

/// Short questions about Rust, as a user's queries (3 to 12 words).
const QUESTIONS: &[&str] = &[
    "What is ownership in Rust?",
    "How do I borrow a value mutably?",
    "Why does the borrow checker reject this code?",
    "What is the difference between String and str?",
    "How do lifetimes work?",
    "When should I use Box?",
    "How do I read a file into a string?",
    "What does the question mark operator do?",
    "How do I handle errors without panicking?",
    "What is a trait object?",
    "How do generics differ from trait objects?",
    "How do I write a unit test?",
    "Where do integration tests go in a Cargo project?",
    "What is Cargo.lock for?",
    "How do I add a dependency to Cargo.toml?",
    "What is a slice?",
    "How do I iterate over a vector with indices?",
    "What is the difference between iter and into_iter?",
    "How do closures capture their environment?",
    "What are Fn, FnMut and FnOnce?",
    "How do I share data between threads?",
    "What is Arc and when is it needed?",
    "How does Mutex work in Rust?",
    "What is a data race?",
    "How do channels send values between threads?",
    "What does move do before a closure?",
    "How do I define an enum with data?",
    "What is pattern matching?",
    "How does match handle every case?",
    "What is Option and why not null?",
    "How do I unwrap a Result safely?",
    "What is the difference between panic and Result?",
    "How do I create a struct?",
    "What are associated functions?",
    "How do I implement a method on a struct?",
    "What is the Drop trait for?",
    "How does Deref coercion work?",
    "What is Rc and RefCell?",
    "How can reference cycles leak memory?",
    "What is Weak used for?",
    "What is interior mutability?",
    "How do modules and paths work?",
    "What does pub use do?",
    "How do I split a crate into files?",
    "What is a workspace?",
    "How do I publish a crate to crates.io?",
    "What is unsafe Rust allowed to do?",
    "How do I dereference a raw pointer?",
    "What are declarative macros?",
    "How do procedural macros work?",
    "What is the derive attribute?",
    "How do I print a struct with Debug?",
    "What is the Display trait?",
    "How do I convert a string to a number?",
    "What is shadowing?",
    "Are variables immutable by default?",
    "What is the difference between const and static?",
    "How do I return a value from a loop?",
    "What are loop labels?",
    "How do I use if let?",
    "What does let else do?",
    "How do I store keys and values?",
    "How do I count words with a HashMap?",
    "What is the entry API?",
    "How are strings encoded in Rust?",
    "Why can't I index into a String?",
    "How do I concatenate strings?",
    "What is a HashSet?",
    "How do I sort a vector?",
    "What are iterator adaptors?",
    "How does collect know what to build?",
    "What is a zero-cost abstraction?",
    "How do I read command line arguments?",
    "How do I print to standard error?",
    "How do I read an environment variable?",
    "What is the newtype pattern?",
    "What are associated types?",
    "What are default generic type parameters?",
    "What is a supertrait?",
    "How do I call a method with the same name?",
    "What is the never type?",
    "What are dynamically sized types?",
    "What is a function pointer?",
    "How do I return a closure?",
    "What is async and await?",
    "What is a future?",
    "How do I run futures concurrently?",
    "What is Pin?",
    "How do streams differ from iterators?",
    "How do I build a web server in Rust?",
    "What is a thread pool?",
    "How do I shut down threads gracefully?",
    "What is object-oriented programming in Rust?",
    "How does the state pattern look in Rust?",
    "What are refutable and irrefutable patterns?",
    "How do match guards work?",
    "What does the at operator bind?",
    "What are the editions of Rust?",
    "How do I install Rust with rustup?",
    "How do I update the Rust toolchain?",
];

/// The book's pages: every top-level `.html` page but the whole-book and
/// contents pages, in name order.
fn book_pages() -> Vec<PathBuf> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .expect("run rustc --print sysroot");
    let sysroot = String::from_utf8(sysroot.stdout).unwrap();
    let book = Path::new(sysroot.trim()).join("share/doc/rust/html/book");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&book)
        .unwrap_or_else(|e| panic!("the Rust book at {}: {e}", book.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "html"))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !["print.html", "toc.html", "404.html"].contains(&name.as_ref())
        })
        .collect();
    pages.sort();
    pages
}

/// Every piece of 20 to 250 tokens the chunker cuts from the book, each
/// block of lines of each page's `<main>` on its own, in book order.
fn passages(tokens: &Tokens) -> Vec<String> {
    let mut out = Vec::new();
    for page in book_pages() {
        let html = std::fs::read_to_string(&page).unwrap();
        let main = match (html.find("<main>"), html.find("</main>")) {
            (Some(start), Some(end)) if start < end => &html[start..end],
            _ => &html,
        };
        let text = embedhost::worker::extract::extract(&page, main.as_bytes()).unwrap();
        for block in text.split("\n\n") {
            let block = block.split_whitespace().collect::<Vec<_>>().join(" ");
            for piece in chunk(&block, tokens, ChunkSettings::default()).unwrap() {
                if (20..=250).contains(&piece.tokens) {
                    out.push(piece.text);
                }
            }
        }
    }
    out
}

/// `n` texts: a third questions, the rest passages of the book, chosen
/// and shuffled with [`SEED`].
fn corpus(tokens: &Tokens, n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut passages = passages(tokens);
    assert!(
        passages.len() >= n,
        "the book gave {} passages",
        passages.len()
    );
    rng.shuffle(&mut passages);
    let questions = n / 3;
    let mut texts: Vec<String> = passages.into_iter().take(n - questions).collect();
    texts.extend((0..questions).map(|i| QUESTIONS[i % QUESTIONS.len()].to_string()));
    rng.shuffle(&mut texts);
    texts
}

/// A front door over `backend`, in its default pool, as `embedhost embed`
/// starts one with a config of `backend = ...` and the model's files.
fn front_door(rt: &tokio::runtime::Runtime, backend: Backend, model: &Path) -> Embedder {
    let mut config = Config {
        backend,
        ..Config::default()
    };
    config.model.dir = Some(model.to_path_buf());
    config.native.engine = "onnx".into();
    config.native.executable = Some(env!("CARGO_BIN_EXE_embedhost").into());
    config.native.onnxruntime = Some(embedhost::native::onnx::resolve_library(None).unwrap());
    config.cache.dir = Some(std::env::temp_dir().join("embedhost-bench-cache"));
    rt.block_on(Embedder::start(config, None)).unwrap()
}

/// The Python baseline kept loaded between its turns (`turns` mode).
struct Python {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Python {
    /// The script on `texts` in batches of [`PY_BATCH`], sorted by length
    /// first with `sort`; `None` without the setup's Python.
    fn start(dir: &Path, texts: &[String], threads: usize, sort: bool) -> Option<Python> {
        let deps = embedhost::deps::deps_dir()?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_python_ort.py");
        let mut command = Command::new(deps.join("venv/bin/python"));
        command.arg(script);
        if sort {
            command.arg("--sort");
        }
        let mut child = command
            .arg(dir)
            .arg(threads.to_string())
            .arg("turns")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        let stdout = BufReader::new(child.stdout.take()?);
        let batches: Vec<&[String]> = texts.chunks(PY_BATCH).collect();
        let mut line = serde_json::to_vec(&batches).ok()?;
        line.push(b'\n');
        stdin.write_all(&line).ok()?;
        Some(Python {
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// One turn of about `seconds` (at least one pass): texts and seconds.
    fn turn(&mut self, seconds: f64) -> Option<(usize, f64)> {
        let stdin = self.stdin.as_mut()?;
        writeln!(stdin, "{seconds}").ok()?;
        stdin.flush().ok()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        Some((v["sentences"].as_u64()? as usize, v["seconds"].as_f64()?))
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        // The end of its stdin ends the script.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// What is measured.
enum Pipeline {
    /// The corpus as one job through the front door.
    Front(Embedder),
    /// The front door's pool given the texts straight, sorted by length, in
    /// batches of [`PY_BATCH`], all at once.
    Straight(embedhost::supervisor::Supervisor),
    Python(Python),
}

impl Pipeline {
    /// One turn of about `seconds` on `texts` (at least one pass): texts
    /// embedded and the seconds they took; `None` if the Python baseline
    /// failed (its packages missing).
    fn turn(
        &mut self,
        rt: &tokio::runtime::Runtime,
        texts: &[String],
        seconds: f64,
    ) -> Option<(usize, f64)> {
        if let Pipeline::Python(python) = self {
            return python.turn(seconds);
        }
        let start = Instant::now();
        let mut done = 0;
        loop {
            rt.block_on(self.pass(texts));
            done += texts.len();
            if start.elapsed().as_secs_f64() >= seconds {
                return Some((done, start.elapsed().as_secs_f64()));
            }
        }
    }

    /// One pass of `texts`, every row checked.
    async fn pass(&self, texts: &[String]) {
        match self {
            Pipeline::Front(embedder) => {
                let job = Job::new(texts.to_vec()).deadline(DEADLINE);
                let rows = embedder.embed(job).await.unwrap().rows;
                assert!(rows.iter().all(Result::is_ok), "every text embedded");
            }
            Pipeline::Straight(supervisor) => {
                let mut sorted: Vec<String> = texts.to_vec();
                sorted.sort_by_key(|t| std::cmp::Reverse(t.len()));
                let batches = sorted.chunks(PY_BATCH).map(|batch| {
                    let s = supervisor.clone();
                    async move { s.embed(batch.to_vec(), false, DEADLINE).await }
                });
                for r in futures::future::join_all(batches).await {
                    assert!(r.unwrap().failed.is_empty(), "every text embedded");
                }
            }
            Pipeline::Python(_) => unreachable!("Python runs in its own process"),
        }
    }
}

/// Texts per second of each of `pipelines` (`None`: not available, or
/// failed), measured in turns for `seconds` each in all; each pipeline
/// embedded once before.
fn through(
    rt: &tokio::runtime::Runtime,
    pipelines: &mut [Option<Pipeline>],
    texts: &[String],
    seconds: f64,
) -> Vec<Option<f64>> {
    for p in pipelines.iter_mut().flatten() {
        if !matches!(p, Pipeline::Python(_)) {
            rt.block_on(p.pass(texts));
        }
    }
    let mut done = vec![(0usize, 0f64); pipelines.len()];
    let rounds = if seconds > 0.0 { ROUNDS } else { 1 };
    for round in 0..rounds {
        for turn in 0..pipelines.len() {
            let which = (round + turn) % pipelines.len();
            let Some(p) = &mut pipelines[which] else {
                continue;
            };
            match p.turn(rt, texts, seconds / rounds as f64) {
                Some((n, secs)) => {
                    done[which].0 += n;
                    done[which].1 += secs;
                }
                None => pipelines[which] = None,
            }
        }
    }
    pipelines
        .iter()
        .zip(done)
        .map(|(p, (n, secs))| p.as_ref().map(|_| n as f64 / secs))
        .collect()
}

/// How the front door cuts `texts` on `embedder`'s generation: tokens,
/// pieces of the batch budget, and what counting the tokens takes.
fn describe(rt: &tokio::runtime::Runtime, name: &str, embedder: &Embedder, texts: &[String]) {
    let generation = embedder.generation().unwrap();
    let counts: Vec<usize> = texts
        .iter()
        .map(|t| generation.tokens.spans(t).map_or(1, |s| s.len()))
        .collect();
    let order = embedhost::embedder::batcher::longest_first(&counts);
    let sorted: Vec<usize> = order.iter().map(|&i| counts[i]).collect();
    let budget = embedhost::limits::ONE_SHOT_BATCH_TOKENS;
    let pieces = embedhost::embedder::batcher::pieces(&sorted, budget);
    let sizes: Vec<usize> = pieces.iter().map(|r| r.len()).collect();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let at = Instant::now();
    let prepared = rt
        .block_on(embedder.prepare(&generation, Job::new(texts.to_vec()).deadline(DEADLINE)))
        .unwrap();
    let counting = at.elapsed();
    let at = Instant::now();
    rt.block_on(prepared.run()).unwrap();
    println!(
        "{name}: {} texts of {} to {} tokens (median {median}), {} in all; {} pieces of <= {budget} tokens ({} to {} texts, {} instances); checking and counting {:.1} ms of {:.1} ms",
        texts.len(),
        sorted.last().unwrap_or(&0),
        sorted.first().unwrap_or(&0),
        counts.iter().sum::<usize>(),
        pieces.len(),
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        generation.status().len(),
        counting.as_secs_f64() * 1e3,
        (counting + at.elapsed()).as_secs_f64() * 1e3,
    );
}

/// Prints the table and records the four ratios the issue set targets for.
fn report(texts: usize, cores: usize, rates: &[Option<f64>]) {
    let names = [
        "embedhost native fp32 (Embedder, one job)",
        "embedhost WASM int8 (Embedder, one job)",
        "Python onnxruntime, batches of 32, input order",
        "Python onnxruntime, sorted by length (sentence-transformers)",
        "diagnosis: native pool, batches of 32 sorted, no front door",
    ];
    println!(
        "mixed corpus ({COMMAND}): all-MiniLM-L6-v2, {texts} texts of the Rust book, {cores} cores, texts/s"
    );
    for (name, rate) in names.iter().zip(rates) {
        let rate = rate.map_or("-".to_string(), |r| format!("{r:.1}"));
        println!("  {name:<62} {rate:>8}");
    }
    let [native, wasm, py_input, py_sorted, straight] = [0, 1, 2, 3, 4].map(|i| rates[i]);
    let ratios = [
        (native, "native fp32", py_input, "Python, input order", 2.0),
        (native, "native fp32", py_sorted, "Python, sorted", 1.3),
        (wasm, "WASM int8", py_sorted, "Python, sorted", 1.0),
        (wasm, "WASM int8", native, "native fp32", 0.8),
        (
            native,
            "native fp32",
            straight,
            "the same pool without the front door",
            1.0,
        ),
    ];
    for (value, what, baseline, against, target) in ratios {
        let (Some(value), Some(baseline)) = (value, baseline) else {
            continue;
        };
        let ratio = value / baseline;
        let verdict = if ratio >= target { "met" } else { "MISSED" };
        println!("  {what} / {against}: {ratio:.2}x (target >= {target:.1}x: {verdict})");
        common::figure(
            SECTION,
            &format!("{what}, {texts} texts as one job (target >= {target:.1}x)"),
            value,
            "texts/s",
            (against, baseline),
            common::Better::Higher,
            COMMAND,
        );
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The WASM backend compiles plugins in a child of this executable, as
    // `embedhost compile-plugin`.
    if args.first().map(String::as_str) == Some(embedhost::wasm::compile::COMPILE_SUBCOMMAND) {
        return embedhost::wasm::compile::serve_compile();
    }
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"corpus mixed".contains(a.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let (seconds, n) = if bench {
        (SECONDS, CORPUS_TEXTS)
    } else {
        (0.0, SMOKE_TEXTS)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = common::model_dir();
    let tokens = Tokens::from_model_dir(&dir, 256).unwrap();
    let texts = corpus(&tokens, n);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let native = front_door(&rt, Backend::Native, &dir);
    let wasm = front_door(&rt, Backend::Wasm, &dir);
    describe(&rt, "native", &native, &texts);
    describe(&rt, "wasm", &wasm, &texts);
    let supervisor = native.generation().unwrap().supervisor().unwrap().clone();
    let mut pipelines = [
        Some(Pipeline::Front(native)),
        Some(Pipeline::Front(wasm)),
        Python::start(&dir, &texts, cores, false).map(Pipeline::Python),
        Python::start(&dir, &texts, cores, true).map(Pipeline::Python),
        Some(Pipeline::Straight(supervisor)),
    ];
    let rates = through(&rt, &mut pipelines, &texts, seconds);
    report(texts.len(), cores, &rates);
    for p in pipelines.iter().flatten() {
        if let Pipeline::Front(embedder) = p
            && let Some(generation) = embedder.current()
        {
            rt.block_on(generation.shutdown());
        }
    }
    ExitCode::SUCCESS
}
