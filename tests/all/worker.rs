//! The worker end to end on the stub plugin: indexing a folder, searching
//! it, re-indexing incrementally, skips with reasons, a refused model, the
//! command line, and a host killed mid-index.

use crate::OutputWithin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use embedhost::messages::{SearchResult, StatsResponse};
use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{
    ArtifactCache, InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner,
};
use embedhost::worker::chunk::Tokens;
use embedhost::worker::{Worker, WorkerSettings};

async fn stub_worker(settings: WorkerSettings) -> Worker {
    let limits = InstanceLimits::default();
    stub_worker_with(&[], limits, settings, "stub").await.0
}

/// Waits (real time: the indexer runs on blocking threads) until nothing
/// is queued or processing, for at most 20 s.
async fn settled(worker: &Worker) -> StatsResponse {
    settled_within(worker, Duration::from_secs(20)).await
}

/// As [`settled`], for at most `limit`; the indexer must never stall.
pub(crate) async fn settled_within(worker: &Worker, limit: Duration) -> StatsResponse {
    let started = std::time::Instant::now();
    loop {
        let stats = worker.stats().await.unwrap();
        assert!(stats.stalled.is_none(), "{stats:?}");
        if stats.queued == 0 && stats.processing == 0 {
            return stats;
        }
        assert!(
            started.elapsed() < limit,
            "indexing did not finish: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn paths(results: &[SearchResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_is_indexed_searched_and_kept_up_to_date() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    let db = root.path().join("db");
    write(
        &docs.join("garden.txt"),
        "tomatoes basil garden watering soil compost",
    );
    write(
        &docs.join("notes/rust.md"),
        "rust borrow checker lifetimes ownership traits",
    );
    write(
        &docs.join("page.html"),
        "<html><body><p>sailing <b>boats</b> harbour wind</p></body></html>",
    );
    write(&docs.join("empty.txt"), "");
    std::fs::write(docs.join("image.bin"), b"\x89PNG\0\0\0binary").unwrap();
    write(&docs.join("huge.log"), &"log line ".repeat(2000));
    write(&docs.join(".hidden.txt"), "tomatoes basil garden secret");
    write(
        &docs.join("ignored/skip.txt"),
        "tomatoes basil garden ignored",
    );
    write(&docs.join(".gitignore"), "ignored/\n");
    let settings = WorkerSettings {
        max_file_bytes: 4096,
        ..WorkerSettings::default()
    };
    let worker = stub_worker(settings).await;
    worker.init(&db).await.unwrap();
    let queued = worker.index(vec![docs.clone()]).await.unwrap();
    assert_eq!(queued, 6, "hidden and ignored files are not walked");
    let stats = settled(&worker).await;
    assert_eq!(stats.indexed, 4, "{stats:?}");
    assert_eq!(stats.failures.get("binary"), Some(&1), "{stats:?}");
    assert_eq!(stats.failures.get("too_large"), Some(&1), "{stats:?}");

    let hits = worker
        .search("garden basil tomatoes".into(), 3)
        .await
        .unwrap();
    assert_eq!(paths(&hits)[0], "garden.txt");
    assert_eq!((hits[0].start_line, hits[0].end_line), (1, 1));
    assert!(hits[0].score > hits[1].score);
    let hits = worker.search("boats harbour".into(), 1).await.unwrap();
    assert_eq!(paths(&hits), ["page.html"]);
    let words: Vec<&str> = hits[0].text.split_whitespace().collect();
    assert_eq!(
        words,
        ["sailing", "boats", "harbour", "wind"],
        "markup dropped"
    );

    // Nothing changed: nothing is queued.
    assert_eq!(worker.index(vec![docs.clone()]).await.unwrap(), 0);
    // A changed file replaces its chunks; a deleted one loses them.
    write(&docs.join("notes/rust.md"), "espresso grinder coffee beans");
    std::fs::remove_file(docs.join("garden.txt")).unwrap();
    assert_eq!(worker.index(vec![docs.clone()]).await.unwrap(), 1);
    let stats = settled(&worker).await;
    assert_eq!(stats.indexed, 3, "{stats:?}");
    let hits = worker
        .search("garden basil tomatoes".into(), 10)
        .await
        .unwrap();
    assert!(
        !paths(&hits).contains(&"garden.txt".to_string()),
        "{hits:?}"
    );
    let hits = worker.search("coffee espresso".into(), 1).await.unwrap();
    assert_eq!(paths(&hits), ["rust.md"]);
    let hits = worker
        .search("borrow checker lifetimes".into(), 10)
        .await
        .unwrap();
    assert!(
        hits.iter().all(|h| !h.text.contains("borrow")),
        "old chunks gone"
    );
    // Touched but the same contents: queued by its time, then kept.
    let same = std::fs::read(docs.join("page.html")).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    std::fs::write(docs.join("page.html"), same).unwrap();
    assert_eq!(worker.index(vec![docs.clone()]).await.unwrap(), 1);
    let after = settled(&worker).await;
    assert_eq!((after.indexed, after.chunks), (stats.indexed, stats.chunks));
}

#[tokio::test(flavor = "multi_thread")]
async fn long_files_are_chunked_with_their_lines() {
    let root = tempfile::tempdir().unwrap();
    let text: String = (1..=400)
        .map(|i| format!("line{i} filler words here\n"))
        .collect();
    write(&root.path().join("docs/long.txt"), &text);
    let settings = WorkerSettings {
        chunk: embedhost::worker::chunk::ChunkSettings {
            tokens: 100,
            overlap: 20,
        },
        ..WorkerSettings::default()
    };
    let worker = stub_worker(settings).await;
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![root.path().join("docs")]).await.unwrap();
    let stats = settled(&worker).await;
    // 1600 words, 100 per chunk, 80 new per chunk: 20 chunks.
    assert_eq!(stats.chunks, 20, "{stats:?}");
    let hits = worker.search("line250".into(), 2).await.unwrap();
    assert!(hits[0].text.contains("line250"), "{hits:?}");
    assert!(
        hits[0].start_line <= 250 && 250 <= hits[0].end_line,
        "{hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_of_another_model_is_refused_with_the_fix() {
    let root = tempfile::tempdir().unwrap();
    embedhost::worker::store::Store::open(root.path(), "some-other-model", 768).unwrap();
    let worker = stub_worker(WorkerSettings::default()).await;
    let err = worker.init(root.path()).await.unwrap_err().to_string();
    assert!(
        err.contains("some-other-model") && err.contains("re-index"),
        "{err}"
    );
    // And a worker that was never initialized says so.
    let err = worker.stats().await.unwrap_err().to_string();
    assert!(err.contains("worker.init"), "{err}");
}

fn embedhost(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .output_within(crate::PROCESS_LIMIT)
        .unwrap()
}

/// `embedhost ARGS`, which must succeed.
fn succeeded(args: &[&str]) -> std::process::Output {
    let out = embedhost(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stub_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("examples/config/wasm.toml")
}

#[test]
fn the_command_line_indexes_searches_and_reports() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    write(&docs.join("a.txt"), "violin cello orchestra symphony");
    write(&docs.join("b.txt"), "bicycle tyre puncture repair");
    let (config, db) = (stub_config(), root.path().join("db"));
    let (config, db, docs) = (
        config.to_str().unwrap(),
        db.to_str().unwrap(),
        docs.to_str().unwrap(),
    );
    // `embedhost --config C search --db D ARGS...`
    let search =
        |args: &[&str]| succeeded(&[&["--config", config, "search", "--db", db], args].concat());
    let out = succeeded(&["--config", config, "index", "--db", db, docs]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 files indexed"));
    let out = search(&["--json", "bicycle", "repair"]);
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &results[0];
    assert!(
        first["path"].as_str().unwrap().ends_with("b.txt"),
        "{results}"
    );
    for key in ["start_line", "end_line", "score", "text"] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    let out = search(&["violin"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().ends_with("a.txt:1"), "{text}");
    // `--context`: the best line, numbered; piped, so no escape codes.
    write(
        &Path::new(docs).join("c.txt"),
        "intro line\nthe quartet tunes up\nthen the harpsichord_solo starts\nclosing line\nlast",
    );
    succeeded(&["--config", config, "index", "--db", db, docs]);
    let out = search(&["-n", "1", "--context", "1", "harpsichord_solo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with("c.txt:1-5"), "{text}");
    assert_eq!(
        &lines[1..],
        &[
            "      2: the quartet tunes up",
            "      3: then the harpsichord_solo starts",
            "      4: closing line"
        ],
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text:?}");
    let out = search(&["-n", "1", "--jsonl", "-C", "0", "harpsichord_solo"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["context"],
        serde_json::json!([{ "line": 3, "text": "then the harpsichord_solo starts" }])
    );
    std::fs::remove_file(Path::new(docs).join("c.txt")).unwrap();
    succeeded(&["--config", config, "index", "--db", db, docs]);
    // Output for programs and pipes: a line per file, a JSON object per
    // line, and only results above a score.
    let out = search(&["--files", "bicycle", "violin"]);
    let files: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.ends_with(".txt") && !f.contains(' ')),
        "{files:?}"
    );
    let out = search(&["--jsonl", "--mode", "semantic", "bicycle"]);
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["path"].as_str().unwrap().ends_with("b.txt"));
    let top = lines[0]["score"].as_f64().unwrap();
    let out = search(&[
        "--jsonl",
        "--mode",
        "semantic",
        "--threshold",
        &format!("{}", top - 1e-4),
        "bicycle",
    ]);
    assert_eq!(std::str::from_utf8(&out.stdout).unwrap().lines().count(), 1);
    let out = embedhost(&[
        "--config", config, "search", "--db", db, "--mode", "fuzzy", "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a search mode"));
    let out = succeeded(&["--config", config, "stats", "--db", db, "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["indexed"], 2, "{stats}");
    let real = std::fs::canonicalize(docs).unwrap();
    assert_eq!(stats["roots"][0]["path"], real.to_str().unwrap(), "{stats}");
    assert_eq!(stats["roots"][0]["files"], 2, "{stats}");
    assert_eq!(stats["max_file_chunks"], 2000, "{stats}");
    let out = succeeded(&["--config", config, "stats", "--db", db]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("root:     {}: 2 files, 2 chunks", real.display())),
        "{text}"
    );
    // `forget` takes a folder out of the index (the files stay on disk).
    let out = succeeded(&["--config", config, "forget", "--db", db, docs]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 chunks removed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(Path::new(docs).join("a.txt").is_file());
    let out = succeeded(&["--config", config, "stats", "--db", db, "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (stats["indexed"].as_u64(), stats["chunks"].as_u64()),
        (Some(0), Some(0))
    );
    let out = embedhost(&["--config", config, "forget", "--db", db, docs]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing is indexed under"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No index yet: a clear message, not an empty one.
    let empty = root.path().join("none");
    let out = embedhost(&[
        "--config",
        config,
        "search",
        "--db",
        empty.to_str().unwrap(),
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("embedhost index"));
}

/// Everything an index holds, comparable between two runs: each file's
/// chunks (text, lines, vector bits) and each skip.
pub(crate) fn contents(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db.join("index.sqlite")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT files.path, COALESCE(files.skip_reason, ''), chunks.seq, chunks.start_line,
                    chunks.end_line, chunks.text, hex(chunks.vector)
             FROM files LEFT JOIN chunks ON chunks.file_id = files.id
             ORDER BY files.path, chunks.seq",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(format!(
            "{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}",
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[test]
fn a_host_killed_mid_index_resumes_to_the_same_index() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    for i in 0..3000 {
        let words: Vec<String> = (0..40)
            .map(|j| format!("w{}", (i * 31 + j * 7) % 997))
            .collect();
        write(
            &docs.join(format!("d{}/f{i}.txt", i % 10)),
            &words.join(" "),
        );
    }
    let config = stub_config();
    let config = config.to_str().unwrap();
    let docs = docs.to_str().unwrap();
    let (killed, whole) = (root.path().join("killed"), root.path().join("whole"));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args([
            "--config",
            config,
            "index",
            "--db",
            killed.to_str().unwrap(),
            docs,
        ])
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some files are indexed and most are not.
    let indexed = |db: &Path| -> i64 {
        rusqlite::Connection::open(db.join("index.sqlite"))
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get(0)))
            .unwrap_or(0)
    };
    let mut waited = 0;
    while indexed(&killed) < 300 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
        waited += 1;
        assert!(waited < 12_000, "no progress");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = indexed(&killed);
    assert!(at_kill < 3000, "killed mid-index ({at_kill} chunks)");

    // Restarted, it resumes the queue (and re-walks: nothing new).
    for db in [&killed, &whole] {
        succeeded(&[
            "--config",
            config,
            "index",
            "--db",
            db.to_str().unwrap(),
            docs,
        ]);
    }
    let (a, b) = (contents(&killed), contents(&whole));
    assert_eq!(a.len(), 3000, "one chunk per file, none twice");
    assert!(
        a == b,
        "the resumed index differs from an uninterrupted one"
    );
}

/// Real-world HTML and Markdown that ship on this machine, never written for
/// a test: the Rust Book of the toolchain's docs (its single-page
/// `print.html` aside) and the README files (then other Markdown) of the
/// crates cargo fetched to build this project. Up to `n`, the book first.
fn real_world_files(n: usize) -> Vec<PathBuf> {
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output_within(crate::PROCESS_LIMIT)
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(sysroot.join("share/doc/rust/html/book"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "html"))
        .filter(|p| p.file_name().is_some_and(|f| f != "print.html"))
        .collect();
    files.sort();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    let crates: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|krate| krate.path())
        .collect();
    // Each crate's README first, then its other Markdown (changelogs,
    // guides), in case the toolchain shipped without its docs.
    let mut readmes: Vec<PathBuf> = crates
        .iter()
        .map(|krate| krate.join("README.md"))
        .filter(|p| p.is_file())
        .collect();
    readmes.sort();
    let mut other: Vec<PathBuf> = crates
        .iter()
        .flat_map(|krate| std::fs::read_dir(krate).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| p.file_name().is_some_and(|f| f != "README.md"))
        .collect();
    other.sort();
    files.extend(readmes);
    files.extend(other);
    // Only text people wrote: machine-made files (the book's generated
    // table of contents) are skipped by design and tested elsewhere.
    files.retain(|path| {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        embedhost::worker::extract::extract(path, &bytes)
            .is_ok_and(|text| embedhost::worker::extract::generated(&text).is_none())
    });
    files.truncate(n);
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_real_files_index_on_a_slow_plugin_with_no_deadline_kill() {
    let sources = real_world_files(500);
    assert_eq!(sources.len(), 500, "real-world files on this machine");
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (i, source) in sources.iter().enumerate() {
        let name = source.file_name().unwrap().to_string_lossy();
        std::fs::copy(source, docs.join(format!("{i:03}-{name}"))).unwrap();
    }
    // A plugin whose time grows with its input (5 ms per KiB) under a short
    // deadline for a call with no work (200 ms): a batch of 32 passages
    // takes longer than that. With a fixed deadline every batch was killed
    // as a hang; the deadline grows with the work instead.
    let limits = InstanceLimits {
        call_deadline: Duration::from_millis(200),
        ..InstanceLimits::default()
    };
    let (worker, supervisor) = stub_worker_with(
        &[("fault.sleep_ms_per_kib", "5")],
        limits,
        WorkerSettings::default(),
        "slow stub",
    )
    .await;
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs.clone()]).await.unwrap();
    let started = std::time::Instant::now();
    let stats = settled_within(&worker, Duration::from_secs(600)).await;
    eprintln!(
        "500 real files: {} chunks in {:?}",
        stats.chunks,
        started.elapsed()
    );
    assert!(stats.failures.is_empty(), "{stats:?}");
    assert_eq!(stats.indexed, 500, "{stats:?}");
    assert!(stats.chunks > 1000, "{stats:?}");
    assert!(
        supervisor.restarts().is_empty(),
        "no instance was killed: {:?}",
        supervisor.restarts()
    );
}

/// A worker with `settings` on a pool of two stub instances with `config`
/// and `limits`, its embedder known as `embedder_id`; and the pool.
async fn stub_worker_with(
    config: &[(&str, &str)],
    limits: InstanceLimits,
    settings: WorkerSettings,
    embedder_id: &str,
) -> (Worker, Supervisor) {
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let spawner = WasmSpawner {
        plugin: WasmPlugin::load(&engine, &PluginSource::builtin_stub()).unwrap(),
        limits,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let supervisor = Supervisor::start(
        spawner,
        SupervisorConfig {
            pool_size: 2,
            ..SupervisorConfig::default()
        },
    )
    .await
    .unwrap();
    let embedder = embedhost::embedder::Embedder::local(supervisor.clone(), Tokens::Words);
    let worker = Worker::new(embedder, supervisor.model_info(), Tokens::Words, settings)
        .with_embedder_id(embedder_id);
    (worker, supervisor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_embedder_failed_on_are_tried_again_when_the_embedder_changes() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    write(&docs.join("a.txt"), "an ordinary file");
    write(&docs.join("b.txt"), "this one says BOOM");
    let db = root.path().join("db");
    let limits = InstanceLimits::default();
    let (broken, _) = stub_worker_with(
        &[("fault.trap_marker", "BOOM")],
        limits,
        WorkerSettings::default(),
        "stub v1",
    )
    .await;
    broken.init(&db).await.unwrap();
    broken.index(vec![docs.clone()]).await.unwrap();
    let stats = settled(&broken).await;
    assert_eq!(stats.failures.get("embed_failed"), Some(&1), "{stats:?}");
    // The same embedder again: the file is retried by the next runs, up
    // to `MAX_EMBED_ATTEMPTS` in a row, then left until something changes.
    for _ in 1..embedhost::limits::MAX_EMBED_ATTEMPTS {
        assert_eq!(broken.index(vec![docs.clone()]).await.unwrap(), 1);
        settled(&broken).await;
    }
    assert_eq!(broken.index(vec![docs.clone()]).await.unwrap(), 0);
    drop(broken);
    // A fixed plugin: the file gets its chance.
    let (fixed, _) = stub_worker_with(&[], limits, WorkerSettings::default(), "stub v2").await;
    fixed.init(&db).await.unwrap();
    let stats = settled(&fixed).await;
    assert!(stats.failures.is_empty(), "{stats:?}");
    assert_eq!(stats.indexed, 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn identifier_queries_the_vector_search_misses_are_found_by_hybrid_search() {
    use embedhost::messages::SearchMode;
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    // Decoys close in meaning: the identifier's words, without it.
    for i in 0..10 {
        write(
            &docs.join(format!("decoy{i}.txt")),
            "load settings v2 fs read",
        );
    }
    // The identifiers, written as code, in longer text.
    let filler = "the program starts here and then it does many other things with files and folders in the tree of the project every day";
    write(
        &docs.join("settings.rs"),
        &format!("{filler} fn load_settings_v2 returns the config {filler}"),
    );
    write(
        &docs.join("reader.rs"),
        &format!("{filler} let text = std::fs::read_to_string(path) {filler}"),
    );
    let worker = stub_worker(WorkerSettings::default()).await;
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs]).await.unwrap();
    settled(&worker).await;
    for (query, file) in [
        ("load_settings_v2", "settings.rs"),
        ("fs::read_to_string", "reader.rs"),
    ] {
        let semantic = worker
            .search_mode(query.into(), 3, SearchMode::Semantic)
            .await
            .unwrap();
        assert!(
            !paths(&semantic).contains(&file.to_string()),
            "{query}: semantic found it: {:?}",
            paths(&semantic)
        );
        let keyword = worker
            .search_mode(query.into(), 3, SearchMode::Keyword)
            .await
            .unwrap();
        assert_eq!(paths(&keyword), vec![file.to_string()], "{query}");
        let hybrid = worker
            .search_mode(query.into(), 3, SearchMode::Hybrid)
            .await
            .unwrap();
        assert_eq!(paths(&hybrid)[0], file, "{query}: {:?}", paths(&hybrid));
        // The default is hybrid.
        assert_eq!(worker.search(query.into(), 3).await.unwrap(), hybrid);
    }
    // A quoted phrase matches as written, and FTS syntax in a query is text.
    let phrase = worker
        .search_mode("\"returns the config\"".into(), 5, SearchMode::Keyword)
        .await
        .unwrap();
    assert_eq!(paths(&phrase), vec!["settings.rs".to_string()]);
    for odd in ["NEAR(a b)", "a* OR", "\"unclosed", "-:^()", "AND"] {
        worker
            .search_mode(odd.into(), 5, SearchMode::Hybrid)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_of_schema_1_is_upgraded_in_place_without_re_embedding() {
    use embedhost::messages::SearchMode;
    use embedhost::worker::store::{DB_FILE, Store};
    let root = tempfile::tempdir().unwrap();
    let (docs, db) = (root.path().join("docs"), root.path().join("db"));
    write(&docs.join("a.txt"), "the unique_marker_word lives here");
    write(&docs.join("b.txt"), "nothing to see");
    {
        let worker = stub_worker(WorkerSettings::default()).await;
        worker.init(&db).await.unwrap();
        worker.index(vec![docs.clone()]).await.unwrap();
        settled(&worker).await;
    }
    // Turn it into what version 1 wrote: no keyword index, no roots, no
    // chunk-cap column, schema 1.
    let conn = rusqlite::Connection::open(db.join(DB_FILE)).unwrap();
    conn.execute_batch(
        "DROP TRIGGER chunks_fts_insert; DROP TRIGGER chunks_fts_delete;
         DROP TRIGGER chunks_fts_update; DROP TABLE chunks_fts;
         DROP TABLE roots; ALTER TABLE files DROP COLUMN cut_from;
         ALTER TABLE files DROP COLUMN attempts;
         UPDATE meta SET value = '1' WHERE key = 'schema';",
    )
    .unwrap();
    drop(conn);
    // `stats` opens an index without a model: it is upgraded then too.
    let existing = Store::open_existing(&db).unwrap();
    assert_eq!(existing.roots().unwrap().len(), 1);
    assert!(existing.cut().unwrap().is_empty());
    drop(existing);
    let before = Store::open_existing(&db).unwrap().vectors().unwrap();
    let info = embedhost::wasm::ModelInfo {
        model_id: embedhost::backend::ModelId::new("embedhost/stub-feature-hash").unwrap(),
        dimension: 384,
        max_input_tokens: 256,
        normalized: true,
    };
    let store = Store::open(&db, &info.model_id, info.dimension).unwrap();
    assert_eq!(store.meta("schema").unwrap().as_deref(), Some("4"));
    assert_eq!(store.vectors().unwrap(), before, "vectors are untouched");
    assert_eq!(
        store.keyword("unique_marker_word", 5, false).unwrap().len(),
        1
    );
    // Its roots were never recorded: its files show under none.
    let roots = store.roots().unwrap();
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert_eq!(
        (roots[0].path.as_os_str(), roots[0].files),
        ("".as_ref(), 2)
    );
    assert!(store.cut().unwrap().is_empty());
    drop(store);
    // And the worker searches it by keyword at once, with nothing re-embedded.
    let worker = stub_worker(WorkerSettings::default()).await;
    worker.init(&db).await.unwrap();
    let stats = settled(&worker).await;
    assert_eq!(stats.indexed, 2);
    let hits = worker
        .search_mode("unique_marker_word".into(), 5, SearchMode::Keyword)
        .await
        .unwrap();
    assert_eq!(paths(&hits), vec!["a.txt".to_string()]);
    // A file changed after the upgrade is kept in step by the triggers.
    write(&docs.join("b.txt"), "now the second_marker is here");
    worker.index(vec![docs.clone()]).await.unwrap();
    settled(&worker).await;
    // Indexed again, the folder is a root and nothing is left under none.
    let roots = worker.roots().await.unwrap();
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert_eq!(roots[0].path, docs.canonicalize().unwrap());
    assert_eq!(roots[0].files, 2);
    let hits = worker
        .search_mode("second_marker".into(), 5, SearchMode::Keyword)
        .await
        .unwrap();
    assert_eq!(paths(&hits), vec!["b.txt".to_string()]);
    assert!(
        worker
            .search_mode("nothing".into(), 5, SearchMode::Keyword)
            .await
            .unwrap()
            .is_empty()
    );
    // A database of a newer schema is refused, not touched.
    let conn = rusqlite::Connection::open(db.join(DB_FILE)).unwrap();
    conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema'", [])
        .unwrap();
    drop(conn);
    let err = Store::open(&db, &info.model_id, info.dimension).unwrap_err();
    assert!(err.to_string().contains("schema version 9"), "{err}");
}

#[test]
fn fusion_ranks_by_reciprocal_rank_and_breaks_ties_by_the_texts_scores() {
    use embedhost::worker::fuse;
    let k = embedhost::limits::RRF_K;
    // 3 is first by meaning only, 4 first by keyword only, 5 second in both:
    // 5 wins, then 3 and 4 tie and the meaning's own score decides.
    let semantic = vec![(3, 0.9), (5, 0.8), (6, 0.1)];
    let keyword = vec![(4, 7.0), (5, 6.0)];
    let fused = fuse(&[semantic.clone(), keyword.clone()], 10);
    let ids: Vec<i64> = fused.iter().map(|f| f.0).collect();
    assert_eq!(ids, vec![5, 3, 4, 6]);
    assert!((fused[0].1 - 2.0 / (k + 2.0)).abs() < 1e-7);
    // The same scores under other ids give the same order of scores: the
    // order comes from the texts, not from when they were stored.
    let swap = |v: &[(i64, f32)]| v.iter().map(|(id, s)| (100 - id, *s)).collect::<Vec<_>>();
    let again = fuse(&[swap(&semantic), swap(&keyword)], 10);
    let ids: Vec<i64> = again.iter().map(|f| 100 - f.0).collect();
    assert_eq!(ids, vec![5, 3, 4, 6]);
    assert_eq!(fuse(&[semantic, keyword], 2).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_follows_edits_renames_deletes_moves_and_new_folders() {
    use embedhost::messages::SearchMode;
    use embedhost::worker::watch::{Batch, watch};
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    write(&docs.join("a.txt"), "alpha apple");
    write(&docs.join("b.txt"), "beta banana");
    write(&docs.join("sub/c.txt"), "gamma grape");
    // The index inside the watched tree: its own writes are not changes.
    let db = docs.join(".index");
    let worker = stub_worker(WorkerSettings::default()).await;
    worker.init(&db).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut batches) = tokio::sync::mpsc::unbounded_channel::<Batch>();
    let watching = {
        let (worker, docs, stop) = (worker.clone(), docs.clone(), stop.clone());
        tokio::spawn(async move {
            watch(&worker, &[docs], stop, |b| {
                let _ = tx.send(b.clone());
            })
            .await
        })
    };
    // The first walk.
    let first = tokio::time::timeout(Duration::from_secs(20), batches.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.events, first.stats.indexed), (0, 3));
    // Which files a word finds now (keyword search: exact, no model).
    let base = docs.canonicalize().unwrap();
    let finds = |word: &'static str| {
        let (worker, base) = (worker.clone(), base.clone());
        async move {
            let hits = worker
                .search_mode(word.into(), 10, SearchMode::Keyword)
                .await
                .unwrap();
            let mut hits: Vec<String> = hits
                .iter()
                .map(|r| {
                    r.path
                        .strip_prefix(&base)
                        .unwrap_or(&r.path)
                        .display()
                        .to_string()
                })
                .collect();
            hits.sort();
            hits
        }
    };
    // Waits, batch by batch (real filesystem events, no sleeps), until
    // `word` finds exactly `expected`, for at most 10 s.
    macro_rules! until {
        ($word:expr, $expected:expr) => {{
            let expected: Vec<String> = $expected.iter().map(|s: &&str| s.to_string()).collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while finds($word).await != expected {
                let next = tokio::time::timeout_at(deadline, batches.recv()).await;
                assert!(
                    next.is_ok(),
                    "`{}` never found {:?}: {:?}",
                    $word,
                    expected,
                    finds($word).await
                );
            }
        }};
    }
    // Edited in place.
    std::fs::write(docs.join("a.txt"), "alpha apricot").unwrap();
    until!("apricot", ["a.txt"]);
    until!("apple", [] as [&str; 0]);
    // Replaced by rename, as editors save.
    std::fs::write(docs.join("a.txt.tmp"), "alpha avocado").unwrap();
    std::fs::rename(docs.join("a.txt.tmp"), docs.join("a.txt")).unwrap();
    until!("avocado", ["a.txt"]);
    until!("apricot", [] as [&str; 0]);
    // Deleted.
    std::fs::remove_file(docs.join("b.txt")).unwrap();
    until!("banana", [] as [&str; 0]);
    // Moved into a new folder.
    std::fs::create_dir(docs.join("moved")).unwrap();
    std::fs::rename(docs.join("sub/c.txt"), docs.join("moved/c.txt")).unwrap();
    until!("grape", ["moved/c.txt"]);
    // A new folder with files; a folder removed with its files.
    write(&docs.join("new/d.txt"), "delta durian");
    write(&docs.join("new/deeper/e.txt"), "epsilon elderberry");
    until!("durian", ["new/d.txt"]);
    until!("elderberry", ["new/deeper/e.txt"]);
    std::fs::remove_dir_all(docs.join("new")).unwrap();
    until!("durian", [] as [&str; 0]);
    until!("elderberry", [] as [&str; 0]);
    let stats = worker.stats().await.unwrap();
    assert_eq!(stats.indexed, 2, "a.txt and moved/c.txt: {stats:?}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), watching)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_made_files_are_skipped_with_their_reason_unless_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .unwrap();
    write(&docs.join("deps.lock"), &lock);
    write(
        &docs.join("notes.txt"),
        "written by a person, with spaces and words",
    );
    let worker = stub_worker(WorkerSettings::default()).await;
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs.clone()]).await.unwrap();
    let stats = settled(&worker).await;
    assert_eq!(stats.indexed, 1, "{stats:?}");
    assert_eq!(stats.failures.get("generated"), Some(&1), "{stats:?}");
    assert_eq!(stats.chunks, 1, "{stats:?}");
    // `index.include_generated = true` indexes it (a fresh index).
    let settings = WorkerSettings {
        include_generated: true,
        ..WorkerSettings::default()
    };
    let worker = stub_worker(settings).await;
    worker.init(&root.path().join("db2")).await.unwrap();
    worker.index(vec![docs]).await.unwrap();
    let stats = settled(&worker).await;
    assert!(stats.failures.is_empty(), "{stats:?}");
    assert!(stats.chunks > 10, "{stats:?}");
}

#[test]
fn index_prints_progress_lines_at_a_steady_interval_when_not_on_a_terminal() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    for i in 0..40 {
        write(
            &docs.join(format!("n{i}.txt")),
            &format!("note number {i} about things"),
        );
    }
    // A slow model (100 ms a call, batches of 2 chunks): about a second or
    // two of work, logged every 200 ms.
    let config = root.path().join("embedhost.toml");
    std::fs::write(
        &config,
        "plugin.path = \"builtin:stub\"\n[plugin.config]\n\"fault.sleep_ms\" = \"100\"\n[index]\nbatch_chunks = 2\nlog_interval_ms = 200\n[supervisor]\npool_size = 1\n",
    )
    .unwrap();
    let db = root.path().join("db");
    // Output captured: stderr is a pipe, not a terminal.
    let out = succeeded(&[
        "--config",
        config.to_str().unwrap(),
        "index",
        "--db",
        db.to_str().unwrap(),
        docs.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("indexing: "))
        .collect();
    assert!(lines.len() >= 3, "{err}");
    assert!(lines[0].contains("/40 files"), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_lists_roots_and_cut_files_and_forget_removes_a_root_everywhere() {
    use embedhost::messages::SearchMode;
    use embedhost::worker::store::Store;
    let root = tempfile::tempdir().unwrap();
    let (a, b, db) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("db"),
    );
    write(&a.join("one.txt"), "the alpha_marker note");
    write(&a.join("sub/two.txt"), "another note in a");
    write(&b.join("three.txt"), "the beta_marker note");
    // 2,400 words: about ten chunks of the default size, over a cap of 3.
    let long: Vec<String> = (0..200)
        .map(|i| format!("Sentence {i} of the long file talks about the spring weather."))
        .collect();
    write(&b.join("long.txt"), &long.join("\n"));
    let settings = WorkerSettings {
        max_file_chunks: 3,
        ..WorkerSettings::default()
    };
    let worker = stub_worker(settings).await;
    worker.init(&db).await.unwrap();
    worker.index(vec![a.clone(), b.clone()]).await.unwrap();
    let stats = settled(&worker).await;
    assert_eq!((stats.indexed, stats.chunks), (4, 6), "{stats:?}");
    let roots = worker.roots().await.unwrap();
    let (a_real, b_real) = (a.canonicalize().unwrap(), b.canonicalize().unwrap());
    assert_eq!(
        roots
            .iter()
            .map(|r| (r.path.clone(), r.files, r.chunks))
            .collect::<Vec<_>>(),
        vec![(a_real.clone(), 2, 2), (b_real.clone(), 2, 4)]
    );
    let store = Store::open_existing(&db).unwrap();
    let cut = store.cut().unwrap();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(cut[0].0, b_real.join("long.txt"));
    assert_eq!(cut[0].1, 3);
    assert!(cut[0].2 > 3, "{cut:?}");
    assert_eq!(store.stats().unwrap().cut, 1);
    drop(store);

    // Forgetting `a` removes its files from the store, the keyword index
    // and the vectors: no mode finds them.
    assert_eq!(worker.forget(&a).await.unwrap(), 2);
    for mode in [
        SearchMode::Keyword,
        SearchMode::Semantic,
        SearchMode::Hybrid,
    ] {
        let hits = worker
            .search_mode("alpha_marker note".into(), 10, mode)
            .await
            .unwrap();
        assert!(
            hits.iter().all(|h| !h.path.starts_with(&a_real)),
            "{mode:?}: {hits:?}"
        );
        assert!(!hits.is_empty(), "{mode:?}: b's notes are still found");
    }
    let stats = settled(&worker).await;
    assert_eq!((stats.indexed, stats.chunks), (2, 4), "{stats:?}");
    assert_eq!(worker.roots().await.unwrap().len(), 1);
    // Twice is an error that says where to look.
    let err = worker.forget(&a).await.unwrap_err().to_string();
    assert!(
        err.contains("nothing is indexed") && err.contains("stats"),
        "{err}"
    );
    // A folder deleted from disk can still be forgotten.
    std::fs::remove_dir_all(&b).unwrap();
    assert_eq!(worker.forget(&b).await.unwrap(), 4);
    assert!(worker.roots().await.unwrap().is_empty());
    let stats = settled(&worker).await;
    assert_eq!((stats.indexed, stats.chunks), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_forgotten_while_its_files_are_at_the_embedder_does_not_come_back() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    for i in 0..40 {
        write(
            &docs.join(format!("f{i}.txt")),
            &format!("file number {i} {}", "x".repeat(500)),
        );
    }
    // Slow enough that files are still at the embedder when `forget` runs.
    let (worker, _pool) = stub_worker_with(
        &[("fault.sleep_ms_per_kib", "100")],
        InstanceLimits::default(),
        WorkerSettings {
            batch_chunks: 4,
            ..WorkerSettings::default()
        },
        "stub",
    )
    .await;
    worker.init(&root.path().join("db")).await.unwrap();
    worker.index(vec![docs.clone()]).await.unwrap();
    // Polled until the indexer has files in hand (no sleep as a signal).
    let started = std::time::Instant::now();
    while worker.stats().await.unwrap().processing == 0 {
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::task::yield_now().await;
    }
    worker.forget(&docs).await.unwrap();
    let stats = settled(&worker).await;
    assert_eq!((stats.indexed, stats.chunks), (0, 0), "{stats:?}");
    assert!(worker.roots().await.unwrap().is_empty());
}

#[test]
fn keyword_search_leaves_out_words_too_common_to_rank_by() {
    use embedhost::worker::store::{FileMeta, NewChunk, Store};
    let db = tempfile::tempdir().unwrap();
    let mut store = Store::open(db.path(), "m", 2).unwrap();
    // "everywhere" is in all ten chunks, "often" in four, "rare" in one.
    let texts: Vec<String> = (0..10)
        .map(|i| {
            let often = if i < 4 { " often" } else { "" };
            let rare = if i == 3 { " rare" } else { "" };
            format!("chunk {i} everywhere{often}{rare}")
        })
        .collect();
    let vector = [1.0f32, 0.0];
    for (i, text) in texts.iter().enumerate() {
        let path = PathBuf::from(format!("/f{i}"));
        store.enqueue(std::slice::from_ref(&path)).unwrap();
        let chunk = NewChunk {
            text,
            start_line: 1,
            end_line: 1,
            vector: &vector,
        };
        let meta = FileMeta {
            size: 1,
            mtime_ns: 1,
        };
        store
            .commit_file(&path, &meta, "h", &[chunk], None)
            .unwrap();
    }
    let ids = |query: &str, fused: bool| store.keyword(query, 20, fused).unwrap().len();
    // A rarer word that occurs: the common ones are left out of the match.
    assert_eq!(ids("rare often everywhere", false), 1);
    // Only common words: keyword mode still matches them all...
    assert_eq!(ids("everywhere", false), 10);
    assert_eq!(ids("often everywhere", false), 10);
    // ...a word in no chunk does not count as rarer...
    assert_eq!(ids("absent often", false), 4);
    // ...and in a hybrid search a word in over half the chunks (weightless
    // in BM25) is left out even alone, while one in 40% still matches.
    assert_eq!(ids("everywhere", true), 0);
    assert_eq!(ids("often everywhere", true), 4);
}

/// `index --watch` on a 500-file tree while another thread edits, saves by
/// rename, deletes, creates, moves files and folders for `secs`; then the
/// watched index must equal a fresh index of the final tree (no missed and
/// no stale file, same chunks and vectors) within a bounded time, and
/// Ctrl-C must stop the watcher cleanly.
fn watch_against_churn(secs: u64) {
    // After the last change: the watch's batch window (2 s at most), then
    // the re-walk and the embedding of what changed, on a slow machine.
    const CONVERGES_WITHIN: Duration = Duration::from_secs(60);
    let root = tempfile::tempdir().unwrap();
    let tree = root.path().join("tree");
    let mut rng = fastrand::Rng::with_seed(42);
    const WORDS: &[&str] = &[
        "river", "lantern", "copper", "orchard", "violet", "engine", "harbour", "meadow", "signal",
        "thunder", "marble", "quiet", "window", "garden", "falcon", "ember",
    ];
    let text = |rng: &mut fastrand::Rng| -> String {
        (0..rng.usize(1..6))
            .map(|_| {
                (0..rng.usize(3..12))
                    .map(|_| WORDS[rng.usize(..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for i in 0..500 {
        let path = tree.join(format!("d{}/e{}/f{i}.txt", i % 10, i % 7));
        write(&path, &text(&mut rng));
        files.push(path);
    }
    let (config, db) = (stub_config(), root.path().join("db"));
    let mut watcher = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "index",
            "--watch",
            "--db",
        ])
        .arg(&db)
        .arg(&tree)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first line is the first index's summary: the watch is set up.
    let mut out = std::io::BufReader::new(watcher.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("500 files indexed"), "{line}");
    let lines =
        std::thread::spawn(move || std::io::BufRead::lines(out).map_while(Result::ok).count());

    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let mut ops = 0;
    let mut next = 500;
    while std::time::Instant::now() < until {
        ops += 1;
        let pick = rng.usize(..files.len().max(1));
        // Creations outnumber deletions, so past 550 files a creation
        // becomes a deletion: the tree stays near 500 files.
        let op = match rng.u8(..10) {
            6 | 8 | 9 if files.len() > 550 => 4,
            op => op,
        };
        match op {
            // Edit in place.
            0..=2 if !files.is_empty() => write(&files[pick], &text(&mut rng)),
            // An editor's save: a temporary file renamed over the original.
            3 if !files.is_empty() => {
                let tmp = files[pick].with_extension("txt.tmp~");
                write(&tmp, &text(&mut rng));
                std::fs::rename(&tmp, &files[pick]).unwrap();
            }
            // Delete (the tree stays near 500 files).
            4 if files.len() > 450 => {
                std::fs::remove_file(files.swap_remove(pick)).unwrap();
            }
            // Move to another folder, maybe a new one.
            5 if !files.is_empty() => {
                let to = tree.join(format!(
                    "d{}/m{}/f{next}.txt",
                    rng.usize(..12),
                    rng.usize(..3)
                ));
                next += 1;
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::rename(&files[pick], &to).unwrap();
                files[pick] = to;
            }
            // A new folder with a few files.
            6 => {
                let folder = tree.join(format!("new{next}"));
                next += 1;
                for k in 0..rng.usize(1..5) {
                    let path = folder.join(format!("n{k}.txt"));
                    write(&path, &text(&mut rng));
                    files.push(path);
                }
            }
            // A folder renamed or deleted whole.
            7 if !files.is_empty() => {
                let folder = files[pick].parent().unwrap().to_path_buf();
                if files.len() < 500 || rng.bool() {
                    let to = tree.join(format!("moved{next}"));
                    next += 1;
                    std::fs::rename(&folder, &to).unwrap();
                    for f in files.iter_mut().filter(|f| f.starts_with(&folder)) {
                        *f = to.join(f.strip_prefix(&folder).unwrap());
                    }
                } else {
                    std::fs::remove_dir_all(&folder).unwrap();
                    files.retain(|f| !f.starts_with(&folder));
                }
            }
            // A new file.
            _ => {
                let path = tree.join(format!("d{}/f{next}.txt", rng.usize(..10)));
                next += 1;
                write(&path, &text(&mut rng));
                files.push(path);
            }
        }
        // Bursts and pauses, as people and tools make them.
        if rng.u8(..8) == 0 {
            std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        }
    }
    // The final tree, indexed afresh by the same embedder.
    let fresh = root.path().join("fresh");
    succeeded(&[
        "--config",
        config.to_str().unwrap(),
        "index",
        "--db",
        fresh.to_str().unwrap(),
        tree.to_str().unwrap(),
    ]);
    let want = contents(&fresh);
    assert_eq!(
        want.iter()
            .map(|l| l.split('|').next().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        files.len(),
        "the fresh index holds the final tree"
    );
    let settled = std::time::Instant::now();
    loop {
        let got = contents(&db);
        if got == want {
            break;
        }
        if settled.elapsed() > CONVERGES_WITHIN {
            let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).take(5).collect();
            let stale: Vec<_> = got.iter().filter(|l| !want.contains(l)).take(5).collect();
            panic!(
                "after {ops} changes the watched index differs from a fresh one {CONVERGES_WITHIN:?} later:\nmissing {missing:#?}\nstale {stale:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ctrl-C stops it cleanly.
    unsafe { libc::kill(watcher.id() as i32, libc::SIGINT) };
    let status = watcher.wait().unwrap();
    assert!(status.success(), "{status}");
    let batches = lines.join().unwrap();
    eprintln!(
        "watch against churn: {ops} changes in {secs} s, {batches} batch lines, {} files at the end; equal to a fresh index {:.1?} after that index was built",
        files.len(),
        settled.elapsed()
    );
    assert!(batches > 0);
}

#[test]
fn watch_keeps_an_index_equal_to_a_fresh_one_under_churn() {
    watch_against_churn(15);
}

#[test]
#[ignore = "soak: churns for EMBEDHOST_WATCH_SOAK_SECS (default 600); run with --ignored --nocapture"]
fn watch_soak() {
    let secs = std::env::var("EMBEDHOST_WATCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    watch_against_churn(secs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_file_swapped_for_a_link_or_a_fifo_is_skipped_with_its_reason_and_never_read() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    let outside = root.path().join("outside");
    write(&docs.join("a.txt"), "violin cello orchestra");
    write(&outside.join("secret.txt"), "the password is swordfish");
    let db = root.path().join("db");
    let worker = stub_worker(WorkerSettings::default()).await;
    worker.init(&db).await.unwrap();
    worker.index(vec![docs.clone()]).await.unwrap();
    settled(&worker).await;
    // After the walk (as a queue resumed after a restart, or a file swapped
    // between the walk and the read): a link to a file outside the roots,
    // a folder swapped for a link to outside, and a FIFO no one writes.
    let link = docs.join("link.txt");
    std::os::unix::fs::symlink(outside.join("secret.txt"), &link).unwrap();
    std::os::unix::fs::symlink(&outside, docs.join("sub")).unwrap();
    let via_folder = docs.join("sub/secret.txt");
    let fifo = docs.join("fifo.txt");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    {
        let mut store = embedhost::worker::store::Store::open_existing(&db).unwrap();
        store
            .enqueue(&[link.clone(), via_folder.clone(), fifo.clone()])
            .unwrap();
    }
    worker.refresh(Vec::new()).await.unwrap();
    // Settles: the FIFO is never waited on.
    let stats = settled(&worker).await;
    assert_eq!(stats.failures.get("not_regular"), Some(&2), "{stats:?}");
    assert_eq!(stats.failures.get("outside_roots"), Some(&1), "{stats:?}");
    assert_eq!(stats.indexed, 1, "{stats:?}");
    let hits = worker
        .search("swordfish password".into(), 10)
        .await
        .unwrap();
    assert!(
        hits.iter().all(|h| !h.text.contains("swordfish")),
        "a file outside the roots was indexed: {hits:?}"
    );
}

#[test]
fn the_index_is_private_to_its_owner_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    write(&docs.join("a.txt"), "violin cello orchestra symphony");
    let db = root.path().join("db");
    // An index folder left open by an older embedhost.
    std::fs::create_dir_all(&db).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command
        .args(["--config", stub_config().to_str().unwrap(), "index", "--db"])
        .arg(&db)
        .arg(&docs)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir());
    // SAFETY: umask(2) only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = command.output_within(crate::PROCESS_LIMIT).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o700, "the index folder");
    let mut files = 0;
    for entry in std::fs::read_dir(&db).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files += 1;
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    assert!(files >= 1);
}

#[test]
fn dot_dot_is_resolved_before_any_check_of_a_path() {
    use embedhost::worker::{forget_path, lexical_absolute};
    assert_eq!(
        lexical_absolute(Path::new("/a/b/../c/./d")).unwrap(),
        Path::new("/a/c/d")
    );
    assert_eq!(
        lexical_absolute(Path::new("/../../etc")).unwrap(),
        Path::new("/etc")
    );
    // A path that does not exist (so it cannot be made canonical) keeps no
    // `..`, which a prefix check against a root would misread.
    let gone = forget_path(Path::new("/no/such/root/../../../etc/passwd")).unwrap();
    assert_eq!(gone, Path::new("/etc/passwd"));
}

#[tokio::test]
async fn watch_refuses_a_root_that_does_not_exist_and_changes_outside_the_roots_walk_nothing() {
    use embedhost::worker::WorkerError;
    use embedhost::worker::watch::{folders_to_walk, watch};
    let worker = stub_worker(WorkerSettings::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let err = watch(
        &worker,
        std::slice::from_ref(&missing),
        tokio_util::sync::CancellationToken::new(),
        |b| panic!("no batch without a root: {b:?}"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, WorkerError::Path { path, .. } if *path == missing),
        "{err}"
    );
    let base = tmp.path().canonicalize().unwrap();
    std::fs::create_dir(base.join("docs")).unwrap();
    assert_eq!(
        folders_to_walk(
            &[base.join("docs")],
            &[base.join("elsewhere/x.txt"), base.join("docs/gone/y.txt")],
            None
        ),
        [base.join("docs")],
        "the outside change is dropped; the inside one walks its nearest folder"
    );
}
