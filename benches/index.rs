//! The worker's figures, each against a baseline in the same run
//! (`cargo bench --bench index`, also run by `./x bench`):
//!
//! 1. search over 100,000 chunks of 384 dimensions, excluding the query's
//!    embedding: the index's search (the int8 scan with exact re-scoring
//!    from `QUANTIZED_FROM` rows) and its exact scan, against a naive scan
//!    (one running sum per dot product, then a full sort), with the int8
//!    scan's recall@10 against the exact one; then both at other sizes, to
//!    show where the int8 scan starts to pay;
//! 2. indexing end to end (walk, read, chunk, embed, store) with the native
//!    all-MiniLM-L6-v2, against the embedder's raw rate on the same chunks
//!    sent in the same batches (target: at least 90%);
//! 3. the whole `embedhost search` command (process start, model load, query
//!    embedding, search), against `embedhost embed` of the same query;
//! 4. indexing `examples/corpus` end to end on each backend (native fp32,
//!    WASM int8, WASM fp32, each a pool of one instance per core), against
//!    native fp32 in the same run;
//! 5. the worker's search in each mode (`semantic`, `keyword`, `hybrid`) at
//!    100,000 chunks of text, against semantic in the same run (target:
//!    hybrid p50 under 15 ms). The store is written directly (random unit
//!    vectors, text drawn from a Zipf-distributed vocabulary, as words in
//!    real text are); the query is embedded by the stub plugin, whose cost
//!    is printed beside.
//!
//! Under `cargo test` each part runs once on a small input (a smoke test).

// Shared by the benches; this one uses the model and the onnx child.
mod common;

use common::{Better, figure};

const COMMAND: &str = "cargo bench --bench index";

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{
    ArtifactCache, InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner,
};
use embedhost::worker::chunk::{self, Tokens};
use embedhost::worker::vectors::VectorIndex;
use embedhost::worker::{Worker, WorkerSettings};
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(300);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn p50_p99(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Random unit vectors (a fixed seed).
fn unit_vectors(n: usize, d: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut data = Vec::with_capacity(n * d);
    for _ in 0..n {
        let row: Vec<f32> = (0..d).map(|_| rng.f32() - 0.5).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        data.extend(row.iter().map(|x| x / norm));
    }
    data
}

fn naive_search(data: &[f32], d: usize, query: &[f32], limit: usize) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = data
        .chunks_exact(d)
        .enumerate()
        .map(|(i, row)| (i, row.iter().zip(query).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(limit);
    scored
}

fn search(chunks: usize, queries: usize, sizes: &[usize]) {
    let d = 384;
    let data = unit_vectors(chunks, d);
    let index = VectorIndex::new(d, (0..chunks as i64).collect(), data.clone());
    let queries_data = unit_vectors(queries, d);
    let (mut used, mut exact, mut naive) = (Vec::new(), Vec::new(), Vec::new());
    let mut found = 0;
    for q in queries_data.chunks_exact(d) {
        let at = Instant::now();
        let hits = index.search(q, 10);
        used.push(at.elapsed());
        let at = Instant::now();
        let truth = index.search_exact(q, 10);
        exact.push(at.elapsed());
        let at = Instant::now();
        let want = naive_search(&data, d, q, 10);
        naive.push(at.elapsed());
        let truth_ids: Vec<i64> = truth.iter().map(|h| h.0).collect();
        let want: Vec<i64> = want.iter().map(|h| h.0 as i64).collect();
        assert_eq!(truth_ids, want, "the exact scan is exact");
        found += hits.iter().filter(|h| truth_ids.contains(&h.0)).count();
    }
    let recall = found as f64 / (10 * queries) as f64;
    let (u50, u99) = p50_p99(used);
    let (e50, e99) = p50_p99(exact);
    let (n50, n99) = p50_p99(naive);
    println!(
        "search, {chunks} chunks x {d}, top 10, {queries} random queries (target: p50 under 10 ms at 100,000):\n  index (int8 scan from {} rows, exact re-score) p50 {u50:.2?} p99 {u99:.2?}, recall@10 {recall:.3} against exact\n  exact f32 scan p50 {e50:.2?} p99 {e99:.2?}\n  naive scan (baseline) p50 {n50:.2?} p99 {n99:.2?}: index {:.1}x, exact scan {:.1}x faster",
        embedhost::worker::vectors::QUANTIZED_FROM,
        n50.as_secs_f64() / u50.as_secs_f64(),
        n50.as_secs_f64() / e50.as_secs_f64()
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let section = "Search (the query's embedding excluded)";
    let size = format!("{chunks} chunks x {d}, top 10");
    figure(
        section,
        &format!("index search p50, {size}"),
        ms(u50),
        "ms",
        ("naive scan p50", ms(n50)),
        Better::Lower,
        COMMAND,
    );
    figure(
        section,
        &format!("index search p99, {size}"),
        ms(u99),
        "ms",
        ("naive scan p99", ms(n99)),
        Better::Lower,
        COMMAND,
    );
    figure(
        section,
        &format!("exact f32 scan p50, {size}"),
        ms(e50),
        "ms",
        ("naive scan p50", ms(n50)),
        Better::Lower,
        COMMAND,
    );
    figure(
        section,
        &format!("index recall@10, {size}"),
        recall,
        "",
        ("the exact scan", 1.0),
        Better::Higher,
        COMMAND,
    );
    for &n in sizes {
        let index = VectorIndex::new(d, (0..n as i64).collect(), data[..n * d].to_vec());
        let (mut e, mut q) = (Vec::new(), Vec::new());
        for query in queries_data.chunks_exact(d).take(50) {
            let at = Instant::now();
            index.search_exact(query, 10);
            e.push(at.elapsed());
            let at = Instant::now();
            index.search_quantized(query, 10);
            q.push(at.elapsed());
        }
        let (e, q) = (p50_p99(e).0, p50_p99(q).0);
        println!("  {n:>7} chunks: exact p50 {e:.2?}, int8 scan p50 {q:.2?}");
        figure(
            section,
            &format!("int8 scan p50, {n} chunks"),
            ms(q),
            "ms",
            ("exact f32 scan p50", ms(e)),
            Better::Lower,
            COMMAND,
        );
    }
}

/// `n` files of two to four sentences each, as short notes.
fn write_notes(dir: &Path, n: usize) {
    const SENTENCES: &[&str] = &[
        "The meeting moved to Thursday afternoon because the projector was broken.",
        "Remember to water the tomatoes before the heatwave arrives this weekend.",
        "Invoices from the supplier are due at the end of each month.",
        "The new release fixes a crash when the configuration file is missing.",
        "Our hiking route follows the river for six kilometres before climbing.",
        "Ask the landlord about the leaking tap in the upstairs bathroom.",
        "The recipe needs two eggs, a cup of flour and a pinch of salt.",
        "Backups run every night at two and are kept for thirty days.",
    ];
    for i in 0..n {
        let text: Vec<&str> = (0..2 + i % 3)
            .map(|j| SENTENCES[(i * 5 + j * 3) % SENTENCES.len()])
            .collect();
        let path = dir.join(format!("notes/{}/note-{i}.txt", i % 20));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("Note {i}. {}", text.join(" "))).unwrap();
    }
}

fn indexing(rt: &tokio::runtime::Runtime, model: &Path, files: usize) -> std::path::PathBuf {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let docs = tempfile::tempdir().unwrap().keep();
    write_notes(&docs, files);
    let encoder =
        embedhost_text::TextEncoder::from_file(&model.join("tokenizer.json"), 256).unwrap();
    let tokens = Tokens::Model(Arc::new(encoder));
    let settings = WorkerSettings {
        in_flight: cores + 1,
        ..WorkerSettings::default()
    };
    let chunking = settings.chunk.fitted(256);
    // The chunks the worker will embed, in the order it walks them.
    let mut texts = Vec::new();
    for entry in ignore::WalkBuilder::new(&docs).build().flatten() {
        if entry.file_type().is_some_and(|t| t.is_file()) {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            texts.extend(
                chunk::chunk(&text, &tokens, chunking)
                    .unwrap()
                    .into_iter()
                    .map(|c| c.text),
            );
        }
    }
    let pool = SupervisorConfig {
        pool_size: cores,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let spawner = common::onnx_spawner(&common::onnx_settings(model.to_path_buf(), 1), DEADLINE);
    let supervisor = rt.block_on(Supervisor::start(spawner, pool)).unwrap();
    let raw = |texts: &[String]| {
        rt.block_on(async {
            let start = Instant::now();
            let batches: Vec<Vec<String>> = texts
                .chunks(settings.batch_chunks)
                .map(<[String]>::to_vec)
                .collect();
            let mut done = futures::stream::iter(batches)
                .map(|b| {
                    let s = supervisor.clone();
                    async move { s.embed(b, false, DEADLINE).await.unwrap().vectors.len() }
                })
                .buffer_unordered(settings.in_flight);
            let mut n = 0;
            while let Some(k) = done.next().await {
                n += k;
            }
            assert_eq!(n, texts.len());
            n as f64 / start.elapsed().as_secs_f64()
        })
    };
    raw(&texts[..texts.len().min(64)]);
    let before = raw(&texts);
    let db = tempfile::tempdir().unwrap().keep();
    let (chunks, rate) = index_into(rt, &supervisor, &tokens, settings, &docs, &db);
    assert_eq!(chunks as usize, texts.len());
    let after = raw(&texts);
    let baseline = (before + after) / 2.0;
    println!(
        "indexing {files} notes ({} chunks), native, pool of {cores}: end to end {rate:.1} chunks/s; the embedder alone on the same chunks {baseline:.1} chunks/s ({before:.1} before, {after:.1} after); {:.0}% (target: 90%)",
        texts.len(),
        100.0 * rate / baseline
    );
    figure(
        "Indexing",
        &format!("indexing {files} notes end to end, native, pool of {cores}"),
        rate,
        "chunks/s",
        ("the embedder alone on the same chunks", baseline),
        Better::Higher,
        COMMAND,
    );
    db
}

/// A worker embedding through `supervisor` over the in-process bus, as an
/// embedding application builds one.
fn worker_over(
    supervisor: &Supervisor,
    model: embedhost::backend::ModelInfo,
    tokens: Tokens,
    settings: WorkerSettings,
) -> Worker {
    let embedder = embedhost::embedder::Embedder::local(supervisor.clone(), tokens.clone());
    Worker::new(embedder, model, tokens, settings)
}

/// Indexes `docs` into the index `db` with a worker over `supervisor`, as
/// the command line does; the chunks stored and their rate per second.
fn index_into(
    rt: &tokio::runtime::Runtime,
    supervisor: &Supervisor,
    tokens: &Tokens,
    settings: WorkerSettings,
    docs: &Path,
    db: &Path,
) -> (u64, f64) {
    let mut model_info = supervisor.model_info();
    model_info.model_id =
        embedhost::backend::ModelId::new(embedhost::model::DEFAULT_MODEL).unwrap();
    let worker = worker_over(supervisor, model_info, tokens.clone(), settings);
    rt.block_on(async {
        worker.init(db).await.unwrap();
        let start = Instant::now();
        worker.index(vec![docs.to_path_buf()]).await.unwrap();
        let stats = loop {
            let s = worker.stats().await.unwrap();
            if s.queued == 0 && s.processing == 0 {
                break s;
            }
            // As the command line polls: the counts take the store's lock.
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (
            stats.chunks,
            stats.chunks as f64 / start.elapsed().as_secs_f64(),
        )
    })
}

/// Indexes `examples/corpus` into a fresh index through `supervisor`,
/// `runs` times; the median rate in chunks per second.
fn corpus_rate(
    rt: &tokio::runtime::Runtime,
    supervisor: &Supervisor,
    tokens: &Tokens,
    runs: usize,
) -> (f64, u64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/corpus");
    let mut rates = Vec::new();
    let mut chunks = 0;
    for _ in 0..runs {
        let db = tempfile::tempdir().unwrap();
        let settings = WorkerSettings {
            in_flight: cores + 1,
            ..WorkerSettings::default()
        };
        let (n, rate) = index_into(rt, supervisor, tokens, settings, &corpus, db.path());
        chunks = n;
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], chunks)
}

/// `examples/corpus` indexed end to end on each backend, against native
/// fp32 in the same run.
fn corpus(rt: &tokio::runtime::Runtime, model: &Path, runs: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let encoder =
        embedhost_text::TextEncoder::from_file(&model.join("tokenizer.json"), 256).unwrap();
    let tokens = Tokens::Model(Arc::new(encoder));
    let pool = SupervisorConfig {
        pool_size: cores,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let native = common::onnx_spawner(&common::onnx_settings(model.to_path_buf(), 1), DEADLINE);
    let native = rt
        .block_on(Supervisor::start(native, pool.clone()))
        .unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(
        std::env::temp_dir().join("embedhost-bench-cache"),
    )))
    .unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap())
        .unwrap()
        .with_model_dir(model);
    let wasm = |precision: &str| common::bert_pool(rt, &plugin, precision, pool.clone());
    let (base, chunks) = corpus_rate(rt, &native, &tokens, runs);
    println!(
        "indexing examples/corpus ({chunks} chunks) end to end, pool of {cores}, median of {runs}: native fp32 {base:.1} chunks/s"
    );
    rt.block_on(native.shutdown());
    for precision in ["int8", "fp32"] {
        let supervisor = wasm(precision);
        let (rate, _) = corpus_rate(rt, &supervisor, &tokens, runs);
        println!(
            "  WASM {precision} {rate:.1} chunks/s ({:.2}x native fp32)",
            rate / base
        );
        figure(
            "Indexing",
            &format!("indexing examples/corpus end to end, WASM {precision}, pool of {cores}"),
            rate,
            "chunks/s",
            ("native fp32, same pool size", base),
            Better::Higher,
            COMMAND,
        );
        rt.block_on(supervisor.shutdown());
    }
}

fn command(model: &Path, db: &Path, runs: usize) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "backend = \"native\"\n[model]\ndir = {:?}\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let time = |args: &[&str]| {
        let samples: Vec<Duration> = (0..runs)
            .map(|_| {
                let at = Instant::now();
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
                    .arg("--config")
                    .arg(config.path())
                    .args(args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                at.elapsed()
            })
            .collect();
        p50_p99(samples).0
    };
    let query = "when are the supplier invoices due";
    let search = time(&["search", "--db", db.to_str().unwrap(), query]);
    let embed = time(&["embed", "--query", query]);
    println!(
        "`embedhost search` (native, whole command) p50 {search:.0?}; `embedhost embed` of the same query p50 {embed:.0?}; {:.2}x (target: well under a second)",
        search.as_secs_f64() / embed.as_secs_f64()
    );
    figure(
        "The search command",
        "`embedhost search`, whole command (start, model load, query, search), native, p50",
        search.as_secs_f64() * 1e3,
        "ms",
        (
            "`embedhost embed` of the same query",
            embed.as_secs_f64() * 1e3,
        ),
        Better::Lower,
        COMMAND,
    );
}

/// A vocabulary of `n` made-up words (syllables from a fixed seed).
fn vocabulary(n: usize) -> Vec<String> {
    const SYLLABLES: &[&str] = &[
        "ka", "lo", "mi", "ren", "sto", "va", "ther", "gu", "pel", "dri", "an", "so", "tem", "bra",
        "qui", "nor", "fe", "lu", "cha", "dex",
    ];
    let mut rng = fastrand::Rng::with_seed(11);
    let mut words = std::collections::BTreeSet::new();
    while words.len() < n {
        let k = rng.usize(1..=4);
        let w: String = (0..k)
            .map(|_| SYLLABLES[rng.usize(..SYLLABLES.len())])
            .collect();
        words.insert(w);
    }
    let mut words: Vec<String> = words.into_iter().collect();
    rng.shuffle(&mut words);
    words
}

/// Word ranks drawn with Zipf's law (exponent 1), as in real text.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        Zipf(
            (1..=n)
                .map(|r| {
                    acc += 1.0 / r as f64;
                    acc
                })
                .collect(),
        )
    }

    fn rank(&self, rng: &mut fastrand::Rng) -> usize {
        let x = rng.f64() * self.0[self.0.len() - 1];
        self.0.partition_point(|&c| c < x).min(self.0.len() - 1)
    }
}

fn modes(rt: &tokio::runtime::Runtime, chunks: usize, queries: usize) {
    use embedhost::messages::SearchMode;
    use embedhost::worker::store::{FileMeta, NewChunk, Store};
    const WORDS: usize = 20_000;
    const PER_FILE: usize = 100;
    let vocabulary = vocabulary(WORDS);
    let zipf = Zipf::new(WORDS);
    let mut rng = fastrand::Rng::with_seed(5);
    let d = 384;
    let db = tempfile::tempdir().unwrap();
    let built = Instant::now();
    {
        let mut store = Store::open(db.path(), embedhost_stub_engine::MODEL_ID, d as u32).unwrap();
        let vectors = unit_vectors(chunks, d);
        for (f, rows) in vectors.chunks(PER_FILE * d).enumerate() {
            let path = std::path::PathBuf::from(format!("/corpus/{}/file-{f}.txt", f % 50));
            let texts: Vec<String> = (0..rows.len() / d)
                .map(|c| {
                    let mut words: Vec<&str> = (0..150)
                        .map(|_| vocabulary[zipf.rank(&mut rng)].as_str())
                        .collect();
                    let id = format!("config_value_{}", f * PER_FILE + c);
                    if c % 100 == 0 {
                        words.push(&id);
                        words.join(" ")
                    } else {
                        words.join(" ")
                    }
                })
                .collect();
            let new: Vec<NewChunk<'_>> = texts
                .iter()
                .zip(rows.chunks_exact(d))
                .enumerate()
                .map(|(c, (text, vector))| NewChunk {
                    text,
                    start_line: c as u32 + 1,
                    end_line: c as u32 + 1,
                    vector,
                })
                .collect();
            store.enqueue(std::slice::from_ref(&path)).unwrap();
            let meta = FileMeta {
                size: 1,
                mtime_ns: 1,
            };
            store.commit_file(&path, &meta, "h", &new, None).unwrap();
        }
    }
    let built = built.elapsed();
    let engine = WasmEngine::new(Some(ArtifactCache::new(
        std::env::temp_dir().join("embedhost-bench-cache"),
    )))
    .unwrap();
    let spawner = WasmSpawner {
        plugin: WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap(),
        limits: InstanceLimits::default(),
        config: Vec::new(),
    };
    let pool = SupervisorConfig {
        pool_size: 1,
        max_processed: u64::MAX,
        ..SupervisorConfig::default()
    };
    let supervisor = rt.block_on(Supervisor::start(spawner, pool)).unwrap();
    let worker = worker_over(
        &supervisor,
        supervisor.model_info(),
        Tokens::Words,
        WorkerSettings::default(),
    );
    rt.block_on(worker.init(db.path())).unwrap();
    // Queries of two to four words, drawn as the text is (so common words
    // with long posting lists come up), every tenth an identifier alone.
    let texts: Vec<String> = (0..queries)
        .map(|i| {
            if i % 10 == 0 {
                format!("config_value_{}", rng.usize(..chunks / 100) * 100)
            } else {
                (0..rng.usize(2..=4))
                    .map(|_| vocabulary[zipf.rank(&mut rng)].as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        })
        .collect();
    let time = |mode: SearchMode| {
        let samples: Vec<Duration> = texts
            .iter()
            .map(|q| {
                let at = Instant::now();
                let hits = rt
                    .block_on(worker.search_mode(q.clone(), 10, mode))
                    .unwrap();
                assert!(!hits.is_empty() || mode == SearchMode::Keyword);
                at.elapsed()
            })
            .collect();
        p50_p99(samples)
    };
    let embed: Vec<Duration> = texts
        .iter()
        .map(|q| {
            let at = Instant::now();
            rt.block_on(supervisor.embed(vec![q.clone()], true, DEADLINE))
                .unwrap();
            at.elapsed()
        })
        .collect();
    let (em50, _) = p50_p99(embed);
    let (s50, s99) = time(SearchMode::Semantic);
    let (k50, k99) = time(SearchMode::Keyword);
    let (h50, h99) = time(SearchMode::Hybrid);
    println!(
        "search by mode, {chunks} chunks of 150 words x {d} (built in {built:.1?}), top 10, {queries} queries, the stub embedding each (p50 {em50:.2?}); target: hybrid p50 under 15 ms\n  semantic p50 {s50:.2?} p99 {s99:.2?}\n  keyword  p50 {k50:.2?} p99 {k99:.2?}\n  hybrid   p50 {h50:.2?} p99 {h99:.2?} ({:.2}x semantic's p50)",
        h50.as_secs_f64() / s50.as_secs_f64()
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let section = "Search by mode (the worker's whole search, stub embedder)";
    let size = format!("{chunks} chunks");
    for (what, p50, p99) in [("keyword", k50, k99), ("hybrid", h50, h99)] {
        figure(
            section,
            &format!("{what} search p50, {size}"),
            ms(p50),
            "ms",
            ("semantic search p50", ms(s50)),
            Better::Lower,
            COMMAND,
        );
        figure(
            section,
            &format!("{what} search p99, {size}"),
            ms(p99),
            "ms",
            ("semantic search p99", ms(s99)),
            Better::Lower,
            COMMAND,
        );
    }
    rt.block_on(supervisor.shutdown());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"index".contains(a.as_str()))
    {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    println!("index (cargo bench --bench index)");
    if bench {
        search(100_000, 200, &[5_000, 10_000, 20_000, 50_000]);
        if common::heavy() {
            search(1_000_000, 50, &[]);
        }
    } else {
        search(2_000, 3, &[1_000]);
    }
    let model = common::model_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    modes(
        &rt,
        if bench { 100_000 } else { 2_000 },
        if bench { 200 } else { 10 },
    );
    corpus(&rt, &model, if bench { 5 } else { 1 });
    let db = indexing(&rt, &model, if bench { 1000 } else { 40 });
    command(&model, &db, if bench { 10 } else { 1 });
}
