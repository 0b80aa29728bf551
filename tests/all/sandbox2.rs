//! The sandbox, second round (issue 26): what a hostile plugin, file,
//! cache writer or config could still move. Each test failed against the
//! host before its bound (the report of issue 26 says how each was seen
//! to fail).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::limits;
use embedhost::wasm::{
    ArtifactCache, CacheOutcome, InstanceLimits, PluginSource, SnapshotStatus, WasmEmbedder,
    WasmEngine, WasmError, WasmPlugin,
};

const TRIGGER: &str = "attack";

/// How long any process a test runs may take before it is killed and the
/// test fails with its output: a guard against a hang, not a measure.
/// Past the compile child's own wall limit (`MAX_COMPILE_TIME`, 120 s), so
/// the host's kill is what a bomb meets, never this guard.
const PROCESS_GUARD: Duration = crate::PROCESS_LIMIT;

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
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn quick() -> InstanceLimits {
    InstanceLimits {
        memory_bytes: 256 << 20,
        init_deadline: Duration::from_secs(30),
        call_deadline: Duration::from_secs(30),
        call_deadline_per_kib: limits::CALL_DEADLINE_PER_KIB,
    }
}

/// Runs `command` to its end, killed past [`PROCESS_GUARD`].
fn bounded(command: Command) -> (Output, Duration) {
    crate::run_bounded(command, PROCESS_GUARD)
}

fn embedhost(args: &[&str], cache: &Path) -> (Output, Duration) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command
        .args(args)
        .env("EMBEDHOST_CACHE_DIR", cache)
        .env_remove("RUST_LOG");
    bounded(command)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config running the hostile plugin with `plugin_config` (TOML inline
/// table entries) and `extra` sections.
fn hostile_config(dir: &Path, plugin_config: &str, extra: &str) -> PathBuf {
    let path = dir.join("embedhost.toml");
    std::fs::write(
        &path,
        format!(
            "[plugin]\npath = {:?}\nconfig = {{ {plugin_config} }}\n[supervisor]\npool_size = 1\n{extra}",
            embedhost::plugins::HOSTILE
        ),
    )
    .unwrap();
    path
}

// --- finding 2: the model id --------------------------------------------------

#[tokio::test]
async fn a_model_id_with_terminal_escapes_is_refused_at_init_with_a_typed_error() {
    let err = WasmEmbedder::start(hostile(), quick(), pairs(&[("mode", "escape_model_id")]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WasmError::ModelInfo(embedhost::backend::ModelInfoError::ModelId(
                embedhost::backend::ModelIdError::Unprintable { .. }
            ))
        ),
        "{err:?}"
    );
    // The type refuses each kind of character on its own.
    for bad in [
        "a\x1bb",
        "a\x07",
        "a\nb",
        "a\rb",
        "a\u{202e}b",
        "a\u{2028}b",
        "a\u{85}b",
    ] {
        assert!(embedhost::backend::ModelId::new(bad).is_err(), "{bad:?}");
    }
    assert!(embedhost::backend::ModelId::new("org/model-v2 (int8)").is_ok());
}

#[test]
fn plugin_check_never_prints_a_plugin_escape_raw() {
    let dir = tempfile::tempdir().unwrap();
    let config = hostile_config(dir.path(), "mode = \"escape_model_id\"", "");
    let (out, _) = embedhost(
        &[
            "--config",
            config.to_str().unwrap(),
            "plugin",
            "check",
            embedhost::plugins::HOSTILE,
        ],
        &crate::test_cache_dir(),
    );
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(all.lines().count(), 1, "{all}");
    assert!(
        !all.contains('\x1b') && !all.contains('\x07') && !all.contains('\u{202e}'),
        "{all:?}"
    );
    assert!(!all.contains("\n2026-01-01"), "{all:?}");
    assert!(all.contains("model id"), "{all}");
}

// --- finding 6: hostcalls, the dimension -----------------------------------

#[tokio::test]
async fn a_huge_declared_dimension_is_refused_and_a_large_log_call_never_rides_on_the_vectors() {
    let past = (limits::MAX_DIMENSION + 1).to_string();
    let err = WasmEmbedder::start(hostile(), quick(), pairs(&[("dimension", &past)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MAX_DIMENSION"), "{err}");
    // At the largest dimension, a batch of 64 texts may copy out 4 MiB of
    // vectors; a 3 MiB log call made during it is still a host call.
    let at = limits::MAX_DIMENSION.to_string();
    let embedder = WasmEmbedder::start(
        hostile(),
        quick(),
        pairs(&[("mode", "big_log"), ("dimension", &at)]),
    )
    .await
    .unwrap();
    let mut texts = vec!["ordinary".to_string(); 63];
    texts.push(TRIGGER.into());
    let err = embedder.embed(texts, false, None).await.unwrap_err();
    assert!(err.is_crash(), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "more than {} bytes in one host call",
            limits::MAX_HOSTCALL_BYTES
        )),
        "{err}"
    );
    // The batch's own vectors still come out whole.
    let embedder = WasmEmbedder::start(hostile(), quick(), pairs(&[("dimension", &at)]))
        .await
        .unwrap();
    let vectors = embedder
        .embed(vec!["x".to_string(); 64], false, None)
        .await
        .unwrap();
    assert_eq!(vectors.len(), 64);
}

#[test]
fn a_large_log_call_in_a_snapshots_init_is_bounded_like_any_other() {
    let cache = tempfile::tempdir().unwrap();
    let model = tempfile::tempdir().unwrap();
    std::fs::write(model.path().join("weights.bin"), b"weights").unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(cache.path()))).unwrap();
    let source = PluginSource::File(embedhost::plugins::HOSTILE.into());
    let config = pairs(&[("mode", "big_log_init")]);
    let plugin =
        WasmPlugin::load_snapshot(&engine, &source, model.path(), quick(), &config).unwrap();
    match plugin.snapshot() {
        SnapshotStatus::Unavailable(reason) => {
            let reason = reason.to_string();
            assert!(reason.contains("hostcalls"), "{reason}")
        }
        other => panic!("the 3 MiB log call went through: {other:?}"),
    }
}

// --- finding 5: log bytes per plugin --------------------------------------------

#[test]
fn a_log_then_trap_loop_writes_no_more_than_the_plugins_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    // A pool of 2: each instance logs 400 lines of 4 KB, then traps; the
    // batch is retried text by text until the text is poison, each retry
    // on a fresh instance.
    let config = hostile_config(
        dir.path(),
        "mode = \"log_trap\"",
        "[limits]\ncall_deadline_ms = 60000\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("pool_size = 1", "pool_size = 2");
    std::fs::write(&config, text).unwrap();
    let (out, took) = embedhost(
        &[
            "--config",
            config.to_str().unwrap(),
            "embed",
            TRIGGER,
            TRIGGER,
        ],
        &crate::test_cache_dir(),
    );
    let err = stderr(&out);
    let plugin_bytes: usize = err
        .lines()
        .filter(|l| l.contains("embedhost::plugin"))
        .map(str::len)
        .sum();
    // What the budget allows in the time the command took, and a line's
    // worth of slack for the last line let through.
    let allowed = limits::PLUGIN_LOG_BYTES_BURST as f64
        + limits::PLUGIN_LOG_BYTES_PER_SECOND as f64 * took.as_secs_f64()
        + 8192.0;
    assert!(
        (plugin_bytes as f64) < allowed,
        "{plugin_bytes} bytes of plugin log in {took:?} (allowed {allowed})"
    );
    assert!(
        err.contains("plugin log lines dropped"),
        "{}",
        &err[err.len().saturating_sub(2000)..]
    );
}

// --- finding 3: the artifact cache ---------------------------------------------

fn entries(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    found.sort();
    found
}

#[test]
fn a_swapped_or_patched_cache_entry_is_refused_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(dir.path()))).unwrap();
    let load = |p: &str| WasmPlugin::load(&engine, &PluginSource::File(p.into())).unwrap();
    let stub = embedhost::plugins::STUB;
    let broken = embedhost::plugins::BROKEN;
    assert_eq!(load(stub).cache_outcome(), CacheOutcome::Compiled);
    let stub_entry = entries(dir.path(), "cwasm");
    assert_eq!(load(broken).cache_outcome(), CacheOutcome::Compiled);
    let both = entries(dir.path(), "cwasm");
    let broken_entry: Vec<_> = both.iter().filter(|p| !stub_entry.contains(p)).collect();
    let (stub_entry, broken_entry) = (&stub_entry[0], broken_entry[0]);
    // Swapped: the broken plugin's entry, with its MAC, under the stub's key.
    std::fs::copy(broken_entry, stub_entry).unwrap();
    std::fs::copy(
        broken_entry.with_extension("mac"),
        stub_entry.with_extension("mac"),
    )
    .unwrap();
    let plugin = load(stub);
    assert_eq!(
        plugin.cache_outcome(),
        CacheOutcome::Compiled,
        "a swapped entry was mapped"
    );
    // Patched: one byte of machine code changed.
    let mut bytes = std::fs::read(broken_entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(broken_entry, &bytes).unwrap();
    assert_eq!(
        load(broken).cache_outcome(),
        CacheOutcome::Compiled,
        "a patched entry was mapped"
    );
    // Rebuilt, both load from the cache again.
    assert_eq!(load(stub).cache_outcome(), CacheOutcome::Hit);
    assert_eq!(load(broken).cache_outcome(), CacheOutcome::Hit);
}

#[test]
fn the_cache_is_owner_only_whatever_the_umask_and_refused_if_others_can_write_it() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedhost"));
    command
        .args(["plugin", "check", embedhost::plugins::STUB])
        .env("EMBEDHOST_CACHE_DIR", &cache)
        .env_remove("RUST_LOG");
    // SAFETY: umask only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let (out, _) = bounded(command);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700);
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // Writable by others: refused, with one line.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (out, _) = embedhost(&["plugin", "check", embedhost::plugins::STUB], &cache);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("other users can write it"), "{err}");
}

// --- finding 4: snapshots follow content ----------------------------------------

#[test]
fn a_same_size_same_mtime_change_or_a_change_in_a_subdirectory_makes_a_new_snapshot_id() {
    use embedhost::wasm::snapshot::snapshot_id;
    let model = tempfile::tempdir().unwrap();
    let weights = model.path().join("weights.bin");
    std::fs::write(&weights, b"weights one").unwrap();
    std::fs::create_dir(model.path().join("sub")).unwrap();
    std::fs::write(model.path().join("sub/vocab.txt"), b"a b c").unwrap();
    let plugin = b"plugin bytes";
    let id = |config: &[(String, String)]| snapshot_id(plugin, model.path(), config).unwrap();
    let first = id(&[]);
    assert_eq!(first, id(&[]));
    // Same size, same modification time, other content.
    let mtime = std::fs::metadata(&weights).unwrap().modified().unwrap();
    std::fs::write(&weights, b"weights two").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        mtime
    );
    let second = id(&[]);
    assert_ne!(first, second, "a same-size same-mtime rewrite kept the id");
    // A change below the top level.
    std::fs::write(model.path().join("sub/vocab.txt"), b"a b d").unwrap();
    assert_ne!(second, id(&[]), "a change in a subdirectory kept the id");
}

#[test]
fn a_fifo_under_the_model_directory_cannot_block_the_snapshot_id() {
    use embedhost::wasm::snapshot::snapshot_id;
    let model = tempfile::tempdir().unwrap();
    std::fs::write(model.path().join("weights.bin"), b"w").unwrap();
    let fifo = std::ffi::CString::new(model.path().join("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = model.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(snapshot_id(b"p", &path, &[]).map_err(|e| e.to_string()));
    });
    let id = rx
        .recv_timeout(PROCESS_GUARD)
        .expect("hashing the model directory blocked on a FIFO");
    assert!(id.is_ok(), "{id:?}");
}

// --- finding 6: config ceilings and the machine ----------------------------------

#[test]
fn config_values_past_their_ceiling_and_a_pool_past_the_machine_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[supervisor]\npool_size = 1000\n", "pool_size"),
        (
            "[limits]\ncall_deadline_per_kib_ms = 9223372036854775807\n",
            "call_deadline_per_kib_ms",
        ),
        ("[limits]\nmemory_mb = 1000000000\n", "memory_mb"),
        (
            "[limits]\ncall_deadline_ms = 9223372036854775807\n",
            "call_deadline_ms",
        ),
    ];
    for (text, key) in cases {
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!("[plugin]\npath = \"builtin:stub\"\n{text}"),
        )
        .unwrap();
        let (out, _) = embedhost(
            &["--config", config.to_str().unwrap(), "embed", "hello"],
            &crate::test_cache_dir(),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{key}: {err}");
        assert_eq!(err.lines().count(), 1, "{key}: {err}");
        assert!(err.contains(key) && err.contains("ceiling"), "{err}");
    }
    // Within every ceiling, but 64 instances of 4 GiB exceed this machine.
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[plugin]\npath = \"builtin:stub\"\n[supervisor]\npool_size = 64\n[limits]\nmemory_mb = 4096\n",
    )
    .unwrap();
    let machine = embedhost::ceilings::machine_memory_bytes().unwrap();
    assert!(machine / 100 * limits::POOL_MEMORY_SHARE_PERCENT < 64 * (4u64 << 30));
    let (out, _) = embedhost(
        &["--config", config.to_str().unwrap(), "embed", "hello"],
        &crate::test_cache_dir(),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("POOL_MEMORY_SHARE_PERCENT"), "{err}");
}

// --- finding 9: version errors name both sides -----------------------------------

/// The stub's bytes with its contract's version (every interface name of
/// `embedhost:embedder`, imports and exports) rewritten to `version`, in a
/// file (same length, so the component stays valid).
fn stub_for_contract(version: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = std::fs::read(embedhost::plugins::STUB).unwrap();
    let host = embedhost::wasm::contract::host_version();
    assert_eq!(version.len(), host.len());
    let mut replaced = 0;
    for interface in ["embedder", "types", "host-log"] {
        let from = format!("embedhost:embedder/{interface}@{host}");
        let to = format!("embedhost:embedder/{interface}@{version}");
        let mut at = 0;
        while let Some(found) = bytes[at..]
            .windows(from.len())
            .position(|w| w == from.as_bytes())
        {
            let start = at + found;
            bytes[start..start + to.len()].copy_from_slice(to.as_bytes());
            at = start + to.len();
            replaced += 1;
        }
    }
    assert!(replaced > 0);
    let file = dir.join(format!("stub-{version}.wasm"));
    std::fs::write(&file, &bytes).unwrap();
    file
}

#[test]
fn a_plugin_for_another_contract_line_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    for version in ["0.2.0", "1.1.1"] {
        let file = stub_for_contract(version, dir.path());
        let err = WasmPlugin::load(engine(), &PluginSource::File(file)).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, WasmError::Contract { .. })
                && text.contains(&format!("embedhost:embedder@{version}"))
                && text.contains(embedhost::wasm::contract::HOST_CONTRACT),
            "{version}: {text}"
        );
    }
}

/// The contract grows in a versioned way: a plugin built for 0.1.0 (before
/// the encoder) loads, embeds, and `plugin check` names both versions; so
/// does one of a later version of the line that needs nothing this host
/// lacks (what it imports links, or it is refused naming both versions).
#[tokio::test]
async fn a_plugin_built_for_another_contract_of_the_line_runs_unchanged() {
    for version in ["0.1.0", "0.1.9"] {
        runs_for_contract(version).await;
    }
}

async fn runs_for_contract(version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = stub_for_contract(version, dir.path());
    let plugin = WasmPlugin::load(engine(), &PluginSource::File(file.clone())).unwrap();
    let embedder = embedhost::wasm::WasmEmbedder::start(
        plugin,
        embedhost::wasm::InstanceLimits::default(),
        Vec::new(),
    )
    .await
    .unwrap();
    let rows = embedder
        .embed(vec!["old contract".into()], false, None)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let (out, _) = embedhost(
        &["plugin", "check", file.to_str().unwrap()],
        &crate::test_cache_dir(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("embedhost:embedder@{version}"))
            && text.contains(embedhost::wasm::contract::HOST_CONTRACT),
        "{text}"
    );
}

#[test]
fn a_changed_signature_is_refused_naming_the_function_and_both_signatures() {
    // A component exporting the contract's interface with `init`, `embed`
    // and `health` all `func() -> u32`.
    let wat = r#"(component
        (core module $m (func (export "f") (result i32) i32.const 0))
        (core instance $i (instantiate $m))
        (func $f (result u32) (canon lift (core func $i "f")))
        (instance $e
            (export "init" (func $f))
            (export "embed" (func $f))
            (export "health" (func $f)))
        (export "embedhost:embedder/embedder@0.1.0" (instance $e)))"#;
    let bytes = wat::parse_str(wat).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("changed.wasm");
    std::fs::write(&file, &bytes).unwrap();
    let err = WasmPlugin::load(engine(), &PluginSource::File(file)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WasmError::Contract { .. }), "{text}");
    assert!(
        text.contains("`init`")
            && text.contains("func() -> u32")
            && text.contains("list<tuple<string, string>>")
            && text.contains(embedhost::wasm::contract::HOST_CONTRACT),
        "{text}"
    );
}

// --- finding 1: compile bombs ----------------------------------------------------

fn leb(out: &mut Vec<u8>, mut n: usize) {
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

fn section(out: &mut Vec<u8>, id: u8, body: &[u8]) {
    out.push(id);
    leb(out, body.len());
    out.extend_from_slice(body);
}

/// A core module of the given function types (each `0x60 ...`) and of
/// one function per body, the function's type index given with its body
/// (local declarations, code, `end`).
fn core_module_of(types: &[Vec<u8>], functions: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    let mut section_types = Vec::new();
    leb(&mut section_types, types.len());
    types
        .iter()
        .for_each(|t| section_types.extend_from_slice(t));
    section(&mut module, 1, &section_types);
    let (mut declared, mut code) = (Vec::new(), Vec::new());
    leb(&mut declared, functions.len());
    leb(&mut code, functions.len());
    for (type_index, body) in functions {
        leb(&mut declared, *type_index);
        leb(&mut code, body.len());
        code.extend_from_slice(body);
    }
    section(&mut module, 3, &declared);
    section(&mut module, 10, &code);
    module
}

/// A core module of `bodies.len()` functions of type `() -> ()`.
fn core_module(bodies: &[Vec<u8>]) -> Vec<u8> {
    let functions: Vec<_> = bodies.iter().map(|b| (0, b.clone())).collect();
    core_module_of(&[vec![0x60, 0, 0]], &functions)
}

/// The type `(i32) -> ()`.
fn takes_i32() -> Vec<u8> {
    vec![0x60, 1, 0x7f, 0]
}

/// A component holding `modules`.
fn component_of(modules: &[Vec<u8>]) -> Vec<u8> {
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    for module in modules {
        section(&mut component, 1, module);
    }
    component
}

/// One function of straight-line code: a million dependent additions
/// (`x = x + 1`), 7 MB, under wasmparser's 7,654,321-byte function bound.
/// Measured compiling in one process (2026-12-07): 3.8 GB and 48 s of CPU.
fn straight_line() -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend(std::iter::repeat_n([0x20u8, 0, 0x41, 1, 0x6a, 0x21, 0], 1_000_000).flatten());
    body.push(0x0b);
    component_of(&[core_module_of(&[takes_i32()], &[(0, body)])])
}

/// One function of 49,990 locals, every one read and written inside a
/// loop, so all are live at its head (wasmparser allows 50,000). Measured:
/// past 60 s of CPU (110 MB).
fn live_locals() -> Vec<u8> {
    let n = 49_990;
    let mut body = Vec::new();
    leb(&mut body, 1);
    leb(&mut body, n);
    body.extend_from_slice(&[0x7f, 0x03, 0x40]);
    for i in 1..=n {
        body.push(0x20);
        leb(&mut body, i);
        body.extend_from_slice(&[0x41, 1, 0x6a, 0x21]);
        leb(&mut body, i);
    }
    body.extend_from_slice(&[0x20, 0, 0x0d, 0, 0x0b, 0x0b]);
    component_of(&[core_module_of(&[takes_i32()], &[(0, body)])])
}

/// 30 million types: the most function types a section may hold, each of
/// 300 parameters and each distinct (its first 17 are i32 or i64 by the
/// bits of its index), each used by one empty function. 30 MB; measured:
/// 2.4 GB and past 38 s of CPU.
fn many_types() -> Vec<u8> {
    let n = limits::MAX_SECTION_ENTRIES as usize;
    let types: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut t = vec![0x60];
            leb(&mut t, 300);
            t.extend((0..300).map(|j| {
                if j < 17 && (i >> j) & 1 == 1 {
                    0x7e
                } else {
                    0x7f
                }
            }));
            t.push(0);
            t
        })
        .collect();
    let functions: Vec<_> = (0..n).map(|i| (i, vec![0u8, 0x0b])).collect();
    component_of(&[core_module_of(&types, &functions)])
}

/// The compile bombs of finding 1 that pass every pre-compile bound, one
/// of each shape the issue measured: many empty functions (six modules of
/// the most functions a section may declare: memory), nested loops
/// (100,000 in 300 KB: time), straight-line code, live locals and many
/// types. Each costs more than the host's own 1 GiB (the test's limit on
/// it) when compiled in one process.
fn compile_bombs() -> Vec<(&'static str, Vec<u8>)> {
    let empty = vec![vec![0u8, 0x0b]; limits::MAX_SECTION_ENTRIES as usize];
    let many = component_of(&vec![core_module(&empty); 6]);
    let depth = 100_000;
    let mut body = vec![0u8];
    body.extend(std::iter::repeat_n([0x03u8, 0x40], depth).flatten());
    body.extend(std::iter::repeat_n(0x0bu8, depth + 1));
    let loops = component_of(&[core_module(&[body])]);
    vec![
        ("many empty functions", many),
        ("nested loops", loops),
        ("straight-line code", straight_line()),
        ("50k live locals", live_locals()),
        ("30M types", many_types()),
    ]
}

#[test]
fn compile_bombs_fail_with_one_line_naming_the_limit_and_the_host_stays_small() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    for (shape, bytes) in compile_bombs() {
        assert!(
            embedhost::wasm::structure::check(&bytes).is_ok(),
            "{shape} must pass the pre-compile bounds"
        );
        let file = dir.path().join("bomb.wasm");
        std::fs::write(&file, &bytes).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_embedhost"));
        command
            .args(["plugin", "check", file.to_str().unwrap()])
            .env("EMBEDHOST_CACHE_DIR", cache.path())
            .env_remove("RUST_LOG");
        // The host itself may not use 1 GiB: compiling in it would abort it.
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            command.pre_exec(|| embedhost::native::ceiling::apply(1 << 30));
        }
        let (out, took) = bounded(command);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{shape}: {err}");
        assert_eq!(err.lines().count(), 1, "{shape}: {err}");
        assert!(
            err.contains("MAX_COMPILE_MEMORY_BYTES") || err.contains("MAX_COMPILE_CPU"),
            "{shape} ({took:?}): {err}"
        );
    }
}

/// `embedhost compile-plugin` (the compiler child) run with `input` on its
/// stdin and its stdout sent to `stdout` (a shell redirection).
fn compile_plugin(input: &[u8], stdout: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.wasm");
    std::fs::write(&file, input).unwrap();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!("exec \"$0\" compile-plugin < \"$1\" > {stdout}"))
        .arg(env!("CARGO_BIN_EXE_embedhost"))
        .arg(&file)
        .env_remove("RUST_LOG");
    bounded(command).0
}

#[test]
fn the_compiler_child_refuses_what_is_not_a_component_with_exit_1_and_the_reason() {
    let out = compile_plugin(b"\0asm this is no component", "/dev/null");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.trim().is_empty(), "no reason given");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn the_compiler_child_that_cannot_write_its_artifact_fails_saying_so() {
    let component = wat::parse_str("(component)").unwrap();
    // Compiles: the artifact goes to stdout.
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("artifact");
    let out = compile_plugin(&component, artifact.to_str().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::metadata(&artifact).unwrap().len() > 0);
    // A full disk: one line saying what could not be written.
    let out = compile_plugin(&component, "/dev/full");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("cannot write the artifact"), "{err}");
}

// --- finding 7: a FIFO under /model ------------------------------------------------

#[tokio::test]
async fn a_model_directory_holding_a_fifo_is_refused_before_any_call_can_block_on_it() {
    let model = tempfile::tempdir().unwrap();
    std::fs::write(model.path().join("weights.bin"), b"w").unwrap();
    std::fs::create_dir(model.path().join("deep")).unwrap();
    let fifo = model.path().join("deep/weights.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let plugin = hostile().with_model_dir(model.path());
    let err = WasmEmbedder::start(plugin, quick(), pairs(&[("mode", "files")]))
        .await
        .unwrap_err();
    assert!(matches!(err, WasmError::Instantiate { .. }), "{err:?}");
    // Refused before the plugin runs: nothing can open the FIFO, so no
    // call can leave a thread blocked on it.
    assert!(err.to_string().contains("weights.fifo"), "{err}");
}

// --- finding 8: health is cheap or counted ------------------------------------------

#[tokio::test]
async fn a_health_check_using_most_of_its_timeout_counts_against_the_instance() {
    use embedhost::supervisor::{Supervisor, SupervisorConfig};
    let spawner = embedhost::wasm::WasmSpawner {
        plugin: hostile(),
        limits: quick(),
        config: pairs(&[("mode", "slow_health"), ("health_ms", "300")]),
    };
    let supervisor = Supervisor::start(
        spawner,
        SupervisorConfig {
            pool_size: 1,
            health_interval: Duration::from_millis(20),
            health_timeout: Duration::from_millis(400),
            ..SupervisorConfig::default()
        },
    )
    .await
    .unwrap();
    // Each answer takes 300 of its 400 ms: the third in a row fails the
    // instance's health check, which is counted as a restart.
    let until = Instant::now() + PROCESS_GUARD;
    while !supervisor.restarts().contains_key("health_failed") {
        assert!(
            Instant::now() < until,
            "slow health answers never counted: {:?}",
            supervisor.restarts()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    supervisor.shutdown().await;
}

// --- finding 10: no lost wakeups ---------------------------------------------------

/// CPU load beside a test: `threads` spinning until dropped.
struct Load(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
);

impl Load {
    fn start(threads: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Load(stop, handles)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        for handle in self.1.drain(..) {
            let _ = handle.join();
        }
    }
}

#[test]
fn a_call_racing_the_end_of_its_instance_is_always_answered() {
    // Finding 10: a call made as an instance's thread ends (after a crash)
    // could land in its queue after the queue was drained, and wait
    // forever. Hundreds of crashes, each followed at once by two calls,
    // beside CPU load; every call must come back, with its answer or
    // `InstanceGone`, within a bound no healthy run comes near.
    let _load = Load::start(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bound = Duration::from_secs(30);
    let crash_then_call = |round: usize, mode: &'static str| {
        runtime.block_on(async {
            let config = pairs(&[("mode", mode), ("lines", "0")]);
            let embedder = WasmEmbedder::start(hostile(), quick(), config).await.unwrap();
            let crashed = match mode {
                "sleep_health" => embedder.health(Some(Duration::from_millis(1))).await,
                _ => embedder.embed(vec![TRIGGER.into()], false, None).await.map(|_| unreachable!()),
            };
            assert!(crashed.is_err_and(|e| e.is_crash()), "round {round}");
            let (embed, health) = tokio::join!(
                tokio::time::timeout(bound, embedder.embed(vec!["x".into()], false, None)),
                tokio::time::timeout(bound, embedder.health(None)),
            );
            assert!(
                embed.is_ok() && health.is_ok(),
                "round {round} ({mode}): a call on an ended instance never came back: embed {}, health {}",
                if embed.is_ok() { "answered" } else { "stuck" },
                if health.is_ok() { "answered" } else { "stuck" },
            );
        })
    };
    for round in 0..300 {
        crash_then_call(round, "log_trap");
    }
    // The scenario of finding 10 itself (a health call blocked, cancelled
    // at its deadline and grace), fewer times: each costs the grace.
    for round in 0..20 {
        crash_then_call(round, "sleep_health");
    }
}
