//! The sandbox against plugins written to break it: calls that block in
//! the host, many memories, hostile files, unbounded outputs, the artifact
//! cache, and native children that leak. Each test was written against the
//! host before its bound existed and failed there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::limits;
use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{
    ArtifactCache, CacheOutcome, InstanceLimits, PluginSource, SnapshotStatus, WasmEmbedder,
    WasmEngine, WasmError, WasmPlugin, WasmSpawner,
};

const TRIGGER: &str = "attack";

fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap())
}

fn hostile() -> WasmPlugin {
    WasmPlugin::load(
        engine(),
        &PluginSource::File(embedhost::plugins::HOSTILE.into()),
    )
    .unwrap()
    .with_model_dir(model_dir())
}

/// A model directory for the hostile plugin (one file, which `handles`
/// opens again and again).
fn model_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("weights.bin"), b"weights").unwrap();
        dir
    })
    .path()
    .to_path_buf()
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Short deadlines, so that a blocked call costs a fraction of a second.
fn quick() -> InstanceLimits {
    InstanceLimits {
        memory_bytes: 256 << 20,
        init_deadline: Duration::from_millis(300),
        call_deadline: Duration::from_millis(300),
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
    }
}

async fn start(mode: &str) -> Result<WasmEmbedder, WasmError> {
    WasmEmbedder::start(hostile(), quick(), pairs(&[("mode", mode)])).await
}

/// The longest a blocked call may take to come back: its deadline, the
/// grace, and scheduling slack for a loaded 2-core machine.
fn bound(deadline: Duration) -> Duration {
    deadline + limits::HOST_CALL_GRACE + Duration::from_millis(1500)
}

// --- calls that block in a host function -----------------------------------

#[tokio::test]
async fn init_blocked_in_a_host_call_ends_at_its_deadline_with_a_typed_error() {
    let started = Instant::now();
    let err = start("sleep_init").await.unwrap_err();
    assert!(
        matches!(err, WasmError::DeadlineExceeded { call: "init", .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < bound(quick().init_deadline),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn embed_and_health_blocked_in_a_host_call_end_at_their_deadline() {
    let embedder = start("sleep_embed").await.unwrap();
    let started = Instant::now();
    let err = embedder
        .embed(vec![TRIGGER.into()], false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, WasmError::DeadlineExceeded { call: "embed", .. }),
        "{err:?}"
    );
    assert!(err.is_crash());
    assert!(
        started.elapsed() < bound(quick().call_deadline),
        "{:?}",
        started.elapsed()
    );
    // The instance is discarded: its store is never entered again.
    let gone = embedder
        .embed(vec!["x".into()], false, None)
        .await
        .unwrap_err();
    assert!(matches!(gone, WasmError::InstanceGone { .. }), "{gone:?}");

    let embedder = start("sleep_health").await.unwrap();
    let started = Instant::now();
    let err = embedder
        .health(Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WasmError::DeadlineExceeded { call: "health", .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < bound(Duration::from_millis(100)));
}

#[tokio::test]
async fn a_pool_serves_again_after_a_plugin_blocks_in_embed() {
    let spawner = WasmSpawner {
        plugin: hostile(),
        limits: quick(),
        config: pairs(&[("mode", "sleep_embed")]),
    };
    let supervisor = Supervisor::start(
        spawner,
        SupervisorConfig {
            pool_size: 1,
            ..SupervisorConfig::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let r = supervisor
        .embed(
            vec!["fine".into(), TRIGGER.into()],
            false,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (1, 1), "{r:?}");
    assert!(r.failed[0].reason.contains("deadline"), "{:?}", r.failed);
    // The batch's crash, then the text alone until it is poison, each
    // ended by the deadline plus grace, and restarts in between.
    let poison = u64::from(limits::POISON_VERDICT_CRASHES);
    assert!(
        started.elapsed() < Duration::from_secs(3 * poison),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(supervisor.restarts().get("deadline"), Some(&poison));
    let ok = supervisor
        .embed(vec!["ordinary".into()], false, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ok.vectors.len(), 1);
}

/// Run in a process of its own by the test below, so that its thread count
/// is not disturbed by other tests.
#[test]
#[ignore = "a probe run by fifty_blocked_calls_leave_no_thread_or_store_behind in its own process"]
fn blocked_calls_probe() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let round = |n: usize| {
        runtime.block_on(async {
            let calls = (0..n).map(|i| async move {
                if i % 2 == 0 {
                    let e = start("sleep_embed").await.unwrap();
                    let err = e
                        .embed(vec![TRIGGER.into()], false, None)
                        .await
                        .unwrap_err();
                    assert!(matches!(err, WasmError::DeadlineExceeded { .. }), "{err:?}");
                } else {
                    let e = start("sleep_health").await.unwrap();
                    let err = e.health(Some(Duration::from_millis(50))).await.unwrap_err();
                    assert!(matches!(err, WasmError::DeadlineExceeded { .. }), "{err:?}");
                }
            });
            futures::future::join_all(calls).await;
        });
    };
    let settle = |want: usize| {
        let until = Instant::now() + Duration::from_secs(5);
        while threads() > want && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        threads()
    };
    // Warm up: the engine, its ticker and the runtime's threads exist.
    round(2);
    let base_threads = settle(0);
    let base_rss = resident_bytes();
    let rounds: usize = std::env::var("PROBE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    for _ in 0..rounds {
        round(10);
    }
    let after = settle(base_threads);
    let grown = resident_bytes().saturating_sub(base_rss);
    println!("threads {base_threads} -> {after}, resident memory grew {grown} bytes");
    assert!(after <= base_threads, "threads {base_threads} -> {after}");
    assert!(
        grown < 64 << 20,
        "resident memory grew {grown} bytes over 50 blocked calls"
    );
}

#[test]
fn fifty_blocked_calls_leave_no_thread_or_store_behind() {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "--exact",
        "sandbox::blocked_calls_probe",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    let (out, _) = crate::run_bounded(command, PROCESS_GUARD);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    assert!(text.contains("threads"), "{text}");
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

// --- the command line, for a plugin that blocks ------------------------------

/// How long any `embedhost` a test here runs may take before it is killed
/// and its test fails with its output: a guard against a hang (finding 10
/// of issue 26 held the whole suite), far above every bound asserted.
const PROCESS_GUARD: Duration = Duration::from_secs(120);

fn embedhost(args: &[&str]) -> (Output, Duration) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG");
    crate::run_bounded(command, PROCESS_GUARD)
}

/// A config running the hostile plugin in `mode` with short deadlines.
fn hostile_config(dir: &Path, mode: &str, extra: &str) -> PathBuf {
    hostile_config_with(dir, mode, 300, extra)
}

/// As [`hostile_config`], with a call deadline of `call_ms`.
fn hostile_config_with(dir: &Path, mode: &str, call_ms: u64, extra: &str) -> PathBuf {
    let path = dir.join("embedhost.toml");
    std::fs::write(
        &path,
        format!(
            "[plugin]\npath = {:?}\nconfig = {{ mode = {mode:?} }}\n[limits]\ninit_deadline_ms = 300\ncall_deadline_ms = {call_ms}\n[supervisor]\npool_size = 1\n{extra}",
            embedhost::plugins::HOSTILE
        ),
    )
    .unwrap();
    path
}

/// `embedhost plugin test` of the hostile plugin in `mode` under `config`.
fn plugin_test(config: &str, mode: &str) -> (Output, Duration) {
    let set = format!("mode={mode}");
    let hostile = embedhost::plugins::HOSTILE;
    embedhost(&[
        "--config",
        config,
        "plugin",
        "test",
        "--seconds",
        "0.2",
        "--set",
        &set,
        hostile,
    ])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed, and said why on its last line, naming a deadline.
fn failed_on_one_line(out: &Output, elapsed: Duration, within: Duration) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("deadline"),
        "{err}"
    );
    assert!(elapsed < within, "took {elapsed:?}: {err}");
}

#[test]
fn plugin_check_plugin_test_and_embed_end_for_a_plugin_blocking_in_init() {
    let dir = tempfile::tempdir().unwrap();
    let config = hostile_config(dir.path(), "sleep_init", "");
    let config = config.to_str().unwrap();
    let (out, took) = embedhost(&[
        "--config",
        config,
        "plugin",
        "check",
        embedhost::plugins::HOSTILE,
    ]);
    failed_on_one_line(&out, took, Duration::from_secs(10));
    let (out, took) = embedhost(&["--config", config, "embed", "hello"]);
    failed_on_one_line(&out, took, Duration::from_secs(15));
    let (out, took) = plugin_test(config, "sleep_init");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("init") && table.contains("deadline"),
        "{table}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn plugin_test_and_embed_end_for_a_plugin_blocking_in_embed() {
    let dir = tempfile::tempdir().unwrap();
    let config = hostile_config(dir.path(), "sleep_embed", "");
    let config = config.to_str().unwrap();
    let (out, took) = embedhost(&["--config", config, "embed", "fine", TRIGGER]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.lines().last(),
        Some("error: 1 of 2 texts could not be embedded"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("deadline"), "{stdout}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (out, took) = plugin_test(config, "sleep_embed");
    // The hostile plugin only blocks on its trigger, which the suite never
    // sends: every check ends, and the command answers.
    assert!(took < Duration::from_secs(30), "{took:?}: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("init"));
}

#[test]
fn plugin_check_plugin_test_and_embed_end_for_a_plugin_blocking_in_health() {
    let dir = tempfile::tempdir().unwrap();
    let config = hostile_config(
        dir.path(),
        "sleep_health",
        "health_interval_ms = 100\nhealth_timeout_ms = 200\n",
    );
    let config = config.to_str().unwrap();
    let (out, took) = embedhost(&[
        "--config",
        config,
        "plugin",
        "check",
        embedhost::plugins::HOSTILE,
    ]);
    failed_on_one_line(&out, took, Duration::from_secs(10));
    assert!(stderr(&out).contains("health"), "{}", stderr(&out));
    let (out, took) = plugin_test(config, "sleep_health");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("deadline"), "{table}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // `embed` embeds before the first health check: it answers, and ends.
    let (out, took) = embedhost(&["--config", config, "embed", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn index_ends_for_a_plugin_blocking_in_embed() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "an ordinary file").unwrap();
    std::fs::write(docs.join("b.txt"), TRIGGER).unwrap();
    let config = hostile_config(dir.path(), "sleep_embed", "");
    let db = dir.path().join("db");
    let (out, took) = embedhost(&[
        "--config",
        config.to_str().unwrap(),
        "index",
        "--db",
        db.to_str().unwrap(),
        docs.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    // It finishes: the text that blocks is isolated after two deadlines and
    // its file skipped with the reason; the other file is indexed.
    assert!(out.status.success(), "{err}");
    let text = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(text.contains("embed_failed"), "{text}");
}

// --- memory: the cap is per instance ----------------------------------------

/// The hostile component with `plugins/attacks/memories.wat` spliced in:
/// five more memories, filled with 16 MiB each at instantiation.
fn with_extra_memories() -> PathBuf {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    FILE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let module = wat::parse_file(root.join("plugins/attacks/memories.wat")).unwrap();
        let mut component = std::fs::read(embedhost::plugins::HOSTILE).unwrap();
        // The new module's index: the core modules the top level already has.
        let mut depth = 0usize;
        let mut modules = 0u32;
        for payload in wasmparser::Parser::new(0).parse_all(&component) {
            match payload.unwrap() {
                wasmparser::Payload::Version { .. } => depth += 1,
                wasmparser::Payload::End(_) => depth -= 1,
                wasmparser::Payload::ModuleSection { .. } if depth == 1 => modules += 1,
                wasmparser::Payload::ComponentAliasSection(aliases) if depth == 1 => {
                    for alias in aliases {
                        if let wasmparser::ComponentAlias::Outer {
                            kind: wasmparser::ComponentOuterAliasKind::CoreModule,
                            ..
                        } = alias.unwrap()
                        {
                            modules += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        component.push(1); // core module section
        leb(&mut component, module.len() as u32);
        component.extend_from_slice(&module);
        let mut instance = vec![1, 0]; // one instance: instantiate
        leb(&mut instance, modules);
        instance.push(0); // no arguments
        component.push(2); // core instance section
        leb(&mut component, instance.len() as u32);
        component.extend_from_slice(&instance);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many-memories.wasm");
        std::fs::write(&path, component).unwrap();
        (dir, path)
    })
    .1
    .clone()
}

fn leb(out: &mut Vec<u8>, mut n: u32) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[tokio::test]
async fn a_component_with_many_memories_cannot_pass_the_cap_in_total() {
    let plugin = WasmPlugin::load(engine(), &PluginSource::File(with_extra_memories())).unwrap();
    let cap = 32 << 20;
    let limits = InstanceLimits {
        memory_bytes: cap,
        ..quick()
    };
    let config = pairs(&[("mode", "files")]);
    // Each memory alone (16 MiB) is under the cap; together they are not.
    let err = WasmEmbedder::start(plugin.clone(), limits, config.clone())
        .await
        .unwrap_err();
    match err {
        WasmError::MemoryCap { source, .. } => {
            assert_eq!(source.limit, cap);
            assert!(source.desired > cap, "{source}");
        }
        other => panic!("not a memory cap: {other:?}"),
    }
    // With room for all of them it starts, and the host counts them all,
    // whatever the plugin's `health` claims (it says 1 byte).
    let roomy = InstanceLimits {
        memory_bytes: 256 << 20,
        ..quick()
    };
    let embedder = WasmEmbedder::start(plugin, roomy, config).await.unwrap();
    let health = embedder.health(None).await.unwrap();
    assert!(health.memory_bytes >= 5 * (16 << 20), "{health:?}");
}

#[tokio::test]
async fn the_memory_figure_is_measured_by_the_host_not_reported_by_the_plugin() {
    let embedder = start("files").await.unwrap();
    let health = embedder.health(None).await.unwrap();
    // The hostile plugin reports 1 byte; its linear memory is over 1 MiB.
    assert!(health.memory_bytes > 1 << 20, "{health:?}");
}

// --- hostile files ------------------------------------------------------------

/// A component of `levels` empty components nested inside each other,
/// written outside in (each level's size is known from the one inside).
fn nested(levels: usize) -> Vec<u8> {
    const PREAMBLE: &[u8] = b"\0asm\x0d\0\x01\0";
    let leb_len = |n: usize| (usize::BITS - n.max(1).leading_zeros()).div_ceil(7) as usize;
    let mut sizes = vec![PREAMBLE.len()];
    for _ in 1..levels {
        let inner = *sizes.last().unwrap();
        sizes.push(PREAMBLE.len() + 1 + leb_len(inner) + inner);
    }
    let mut out = Vec::with_capacity(*sizes.last().unwrap());
    for level in (0..levels).rev() {
        out.extend_from_slice(PREAMBLE);
        if level > 0 {
            out.push(4); // a nested component section
            leb(&mut out, sizes[level - 1] as u32);
        }
    }
    out
}

/// `embedhost ARGS` with its data (heap) limited to 1 GiB, as the native
/// children are: a load that needs more fails instead of taking the machine.
fn embedhost_within_1_gib(args: &[&str]) -> (Output, Duration) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG");
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        command.pre_exec(|| embedhost::native::ceiling::apply(1 << 30));
    }
    crate::run_bounded(command, PROCESS_GUARD)
}

#[test]
fn a_deeply_nested_component_is_refused_before_compiling_in_bounded_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nested.wasm");
    let bytes = nested(20_000);
    assert!(bytes.len() < 500_000, "{}", bytes.len());
    std::fs::write(&file, &bytes).unwrap();
    let (out, took) = embedhost_within_1_gib(&["plugin", "check", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refused before compiling")
            && err.contains(&format!(
                "nest deeper than {}",
                limits::MAX_COMPONENT_NESTING
            )),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn an_oversized_plugin_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.wasm");
    let f = std::fs::File::create(&file).unwrap();
    // Sparse: the size is there, the bytes are not.
    f.set_len(limits::MAX_PLUGIN_FILE_BYTES + 1).unwrap();
    let (out, took) = embedhost_within_1_gib(&["plugin", "check", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("MAX_PLUGIN_FILE_BYTES"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

// --- what a plugin can make large ---------------------------------------------

#[tokio::test]
async fn error_texts_are_cut_to_their_bound_and_huge_ones_refused_at_the_boundary() {
    // A long error value is cut and marked.
    let config = pairs(&[("mode", "huge_error"), ("bytes", "100000")]);
    let err = WasmEmbedder::start(hostile(), quick(), config)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.len() < limits::MAX_PLUGIN_ERROR_BYTES + 200,
        "{}",
        text.len()
    );
    assert!(text.contains("[truncated]"), "{text}");
    // A 100 MB one never leaves the plugin's memory.
    let config = pairs(&[("mode", "huge_error")]);
    let err = WasmEmbedder::start(hostile(), quick(), config)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.len() < 1000, "{}", text.len());
    assert!(text.contains("more than"), "{text}");
}

#[tokio::test]
async fn a_model_id_past_its_bound_is_refused_not_stored() {
    let config = pairs(&[("mode", "huge_model_id"), ("bytes", "300")]);
    let err = WasmEmbedder::start(hostile(), quick(), config)
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::ModelInfo(..)), "{err:?}");
    assert!(err.to_string().contains("MAX_MODEL_ID_BYTES"), "{err}");
    let config = pairs(&[("mode", "huge_model_id")]);
    let err = WasmEmbedder::start(hostile(), quick(), config)
        .await
        .unwrap_err();
    assert!(err.to_string().len() < 1000, "{err}");
    // At the bound it is accepted.
    let at = limits::MAX_MODEL_ID_BYTES.to_string();
    let config = pairs(&[("mode", "huge_model_id"), ("bytes", &at)]);
    let ok = WasmEmbedder::start(hostile(), quick(), config)
        .await
        .unwrap();
    assert_eq!(ok.model_info().model_id.len(), limits::MAX_MODEL_ID_BYTES);
}

#[test]
fn a_log_flood_is_rate_limited_counted_and_cannot_forge_a_host_line() {
    let dir = tempfile::tempdir().unwrap();
    // A million host calls take the plugin a second or two.
    let config = hostile_config_with(dir.path(), "log_flood", 60_000, "");
    let (out, took) = embedhost(&["--config", config.to_str().unwrap(), "embed", TRIGGER]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    // A million lines asked for; the burst and a few seconds' rate got out.
    let allowed = limits::PLUGIN_LOG_BURST as f64
        + limits::PLUGIN_LOG_LINES_PER_SECOND as f64 * took.as_secs_f64()
        + 10.0;
    assert!(
        (lines.len() as f64) < allowed,
        "{} lines in {took:?}",
        lines.len()
    );
    assert!(err.len() < 200_000, "{} bytes of log", err.len());
    // No line of the plugin's starts where the host's do.
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("forged by the plugin") || l.contains("\\n")),
        "{err}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("2026-01-01")), "{err}");
    assert!(err.contains("plugin log lines dropped"), "{err}");
}

#[tokio::test]
async fn a_giant_log_message_is_refused_at_the_boundary() {
    let embedder = start("giant_log").await.unwrap();
    let err = embedder
        .embed(vec![TRIGGER.into()], false, None)
        .await
        .unwrap_err();
    assert!(err.is_crash(), "{err:?}");
    // A host call gets the bound, whatever the batch's vectors allow.
    assert!(
        err.to_string().contains(&format!(
            "more than {} bytes in one host call",
            limits::MAX_HOSTCALL_BYTES
        )),
        "{err}"
    );
}

#[tokio::test]
async fn resource_handles_are_bounded_per_instance() {
    // Opening thousands of files takes a while on a busy machine.
    let patient = InstanceLimits {
        call_deadline: Duration::from_secs(30),
        ..quick()
    };
    let embedder = WasmEmbedder::start(hostile(), patient, pairs(&[("mode", "handles")]))
        .await
        .unwrap();
    let err = embedder
        .embed(vec![TRIGGER.into()], false, None)
        .await
        .unwrap_err();
    // The handle past the bound is refused with a trap, which ends the
    // instance (its handles and their host memory go with it).
    assert!(err.is_crash(), "{err:?}");
    assert!(
        format!("{err:?}").contains("resource table has no free keys"),
        "{err:?}"
    );
    let gone = embedder
        .embed(vec!["x".into()], false, None)
        .await
        .unwrap_err();
    assert!(matches!(gone, WasmError::InstanceGone { .. }), "{gone:?}");
}

// --- the artifact cache ---------------------------------------------------------

#[test]
fn a_snapshot_past_its_bound_is_not_made_and_the_cache_stays_small() {
    let cache_dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(cache_dir.path()))).unwrap();
    let source = PluginSource::File(embedhost::plugins::HOSTILE.into());
    let limits = InstanceLimits {
        memory_bytes: 1 << 30,
        ..InstanceLimits::default()
    };
    let fill = (limits::MAX_SNAPSHOT_BYTES / (1 << 20) + 64).to_string();
    let config = pairs(&[("mode", "fill_init"), ("fill_mb", &fill)]);
    let plugin =
        WasmPlugin::load_snapshot(&engine, &source, &model_dir(), limits, &config).unwrap();
    match plugin.snapshot() {
        SnapshotStatus::Unavailable(reason) => {
            let reason = reason.to_string();
            assert!(reason.contains("MAX_SNAPSHOT_BYTES"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let cached = ArtifactCache::new(cache_dir.path()).size();
    assert!(cached < 64 << 20, "{cached} bytes cached");
}

#[test]
fn the_artifact_cache_keeps_to_its_budget_evicting_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = [
        embedhost::plugins::STUB,
        embedhost::plugins::TEMPLATE,
        embedhost::plugins::BROKEN,
    ];
    // Measure each artifact's size in a cache without a budget.
    let sizes: Vec<u64> = plugins
        .iter()
        .map(|p| {
            let d = tempfile::tempdir().unwrap();
            let engine = WasmEngine::new(Some(ArtifactCache::new(d.path()))).unwrap();
            WasmPlugin::load(&engine, &PluginSource::File(p.into())).unwrap();
            ArtifactCache::new(d.path()).size()
        })
        .collect();
    // Room for the last two, not for all three.
    let budget = sizes[1] + sizes[2] + sizes[0] / 2;
    let cache = ArtifactCache::new(dir.path()).with_max_bytes(budget);
    let engine = WasmEngine::new(Some(cache.clone())).unwrap();
    let load = |p: &str| {
        WasmPlugin::load(&engine, &PluginSource::File(p.into()))
            .unwrap()
            .cache_outcome()
    };
    for p in plugins {
        assert_eq!(load(p), CacheOutcome::Compiled);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cache.size() <= budget, "{} > {budget}", cache.size());
    // The two most recent are kept; the oldest was evicted.
    assert_eq!(load(plugins[2]), CacheOutcome::Hit);
    assert_eq!(load(plugins[1]), CacheOutcome::Hit);
    assert_eq!(load(plugins[0]), CacheOutcome::Compiled);
    // An entry larger than the whole budget is never written.
    let tiny = ArtifactCache::new(dir.path().join("tiny")).with_max_bytes(1000);
    let engine = WasmEngine::new(Some(tiny.clone())).unwrap();
    WasmPlugin::load(&engine, &PluginSource::File(plugins[0].into())).unwrap();
    assert_eq!(tiny.size(), 0);
}

// --- native children: a ceiling the kernel enforces ---------------------------

#[tokio::test]
async fn a_native_child_leaking_past_its_ceiling_is_stopped_there_and_replaced() {
    let spawner = embedhost::native::NativeSpawner {
        executable: env!("CARGO_BIN_EXE_embedhost").into(),
        engine: "stub".into(),
        settings: pairs(&[("dimension", "8"), ("child.leak_mb_per_call", "64")]),
        init_deadline: Duration::from_secs(30),
        call_deadline: Duration::from_secs(30),
        call_deadline_per_kib: limits::CALL_DEADLINE_PER_KIB,
        grace: Duration::from_millis(500),
        memory_ceiling: Some(256 << 20),
    };
    // The health check (every 10 s by default) never runs during the test:
    // only the ceiling can stop the leak.
    let supervisor = Supervisor::start(
        spawner,
        SupervisorConfig {
            pool_size: 1,
            ..SupervisorConfig::default()
        },
    )
    .await
    .unwrap();
    let host_before = resident_bytes();
    let started = Instant::now();
    for i in 0..12 {
        let r = supervisor
            .embed(vec![format!("text {i}")], false, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!((r.vectors.len(), r.failed.len()), (1, 0), "{r:?}");
    }
    assert!(started.elapsed() < limits::DEFAULT_HEALTH_INTERVAL);
    let capped = supervisor
        .restarts()
        .get("memory_cap")
        .copied()
        .unwrap_or(0);
    // 12 calls of 64 MiB against a 256 MiB ceiling: stopped at least twice.
    assert!(capped >= 2, "{:?}", supervisor.restarts());
    let grown = resident_bytes().saturating_sub(host_before);
    assert!(grown < 64 << 20, "the host grew {grown} bytes");
}
