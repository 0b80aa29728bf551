//! The plugin kits (`kits/`): `embedhost plugin new` in each language, the
//! project built from scratch with its pinned toolchain (`./x kits`
//! installs them into `$EMBEDHOST_DEPS/kits`), then `embedhost plugin test`
//! on the component, over the host's encoder and the default model. Also
//! the Python kit's vectors against the built-in engine's, its settings,
//! and a hostile Python plugin contained by the memory cap.
//!
//! A missing toolchain fails its test, naming the command that installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use embedhost::supervisor::{Supervisor, SupervisorConfig, SupervisorError};
use embedhost::wasm::{
    ArtifactCache, InstanceLimits, PluginSource, WasmEngine, WasmPlugin, WasmSpawner,
};

use crate::OutputWithin;
use crate::onnx::{deps, real_model, workspace};
use crate::real_model::{embedhost_offline, succeeded};

/// How long a kit's build may take on a busy 2-core machine (the Rust
/// kit's from scratch is the slowest, about 40 s alone).
const BUILD_LIMIT: Duration = Duration::from_secs(600);

/// A kit's toolchain file under `$EMBEDHOST_DEPS/kits`, or the test fails
/// saying how to install it.
fn toolchain(path: &str) -> PathBuf {
    let file = deps().join("kits").join(path);
    assert!(
        file.exists(),
        "{} is missing: the kits' toolchains are not installed; run `./x kits` \
         (or `scripts/kits.sh all`; `./x test` installs them itself)",
        file.display()
    );
    file
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `embedhost plugin new NAME --lang LANG --dir PARENT`.
fn plugin_new(parent: &Path, name: &str, lang: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["plugin", "new", "--lang", lang, "--dir"])
        .arg(parent)
        .args(["--", name])
        .output_within(crate::PROCESS_LIMIT)
        .unwrap()
}

/// A new project of `lang` under `parent`, written by `plugin new`.
fn new_project(parent: &Path, name: &str, lang: &str) -> PathBuf {
    let out = plugin_new(parent, name, lang);
    assert!(out.status.success(), "{}", show(&out));
    let dir = parent.join(name);
    let wit = dir.join("wit/embedder.wit");
    assert!(
        !wit.symlink_metadata().unwrap().is_symlink(),
        "a copy, not a link"
    );
    assert_eq!(
        std::fs::read_to_string(&wit).unwrap(),
        std::fs::read_to_string(workspace().join("wit/embedder.wit")).unwrap()
    );
    dir
}

/// Runs a build command in `dir`, failing the test with its output; prints
/// how long it took.
fn build(mut command: Command, dir: &Path, what: &str) {
    command.current_dir(dir);
    let (out, took) = crate::run_bounded(command, BUILD_LIMIT);
    assert!(out.status.success(), "{what} failed: {}", show(&out));
    eprintln!("kits: {what} built in {:.1} s", took.as_secs_f64());
}

/// Builds a Python project with the pinned componentize-py, for `world`.
fn build_python(dir: &Path, name: &str, world: &str) -> PathBuf {
    let mut command = Command::new(toolchain("python/bin/componentize-py"));
    command.args([
        "-d",
        "wit/embedder.wit",
        "-w",
        world,
        "componentize",
        "app",
        "-o",
    ]);
    command.arg(format!("{name}.wasm"));
    build(command, dir, &format!("the Python project {name}"));
    dir.join(format!("{name}.wasm"))
}

/// The Python kit's component, built once for every test that needs it.
fn python_kit() -> PathBuf {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let parent = tempfile::tempdir().unwrap();
            let dir = new_project(parent.path(), "py-kit", "python");
            let wasm = build_python(&dir, "py-kit", "model-plugin");
            (parent, wasm)
        })
        .1
        .clone()
}

/// `embedhost ARGS` offline, over the default model in the test store.
fn embedhost(args: &[&str]) -> Output {
    let models = real_model().parent().unwrap().to_path_buf();
    embedhost_offline(args, &models)
}

/// `embedhost plugin test WASM` passes every check, within the time it
/// prints, and reports its cold, plain and snapshot starts (every kit is a
/// `model-plugin`, snapshotted with its encoder linked).
fn passes_plugin_test(wasm: &Path) {
    let started = Instant::now();
    let out = embedhost(&["plugin", "test", wasm.to_str().unwrap(), "--seconds", "0.5"]);
    let text = show(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    let start = text.lines().find(|l| l.starts_with("start ")).unwrap_or("");
    assert!(
        start.contains("cold") && start.contains("ms from the snapshot"),
        "{text}"
    );
    eprintln!(
        "kits: plugin test of {} passed in {:.1} s",
        wasm.display(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_python_kit_builds_from_scratch_and_passes_plugin_test() {
    passes_plugin_test(&python_kit());
}

/// The JavaScript kit's component, built once for every test that needs it.
fn js_kit() -> PathBuf {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let modules = toolchain("js/node_modules");
            let parent = tempfile::tempdir().unwrap();
            let dir = new_project(parent.path(), "js-kit", "js");
            std::os::unix::fs::symlink(modules, dir.join("node_modules")).unwrap();
            let mut command = Command::new("node");
            command.arg("build.mjs");
            build(command, &dir, "the JavaScript project js-kit");
            (parent, dir.join("js-kit.wasm"))
        })
        .1
        .clone()
}

/// The Rust kit's component, built once for every test that needs it.
fn rust_kit() -> PathBuf {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let parent = tempfile::tempdir().unwrap();
            let dir = new_project(parent.path(), "rust-kit", "rust");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut command = Command::new(cargo);
            command.args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ]);
            // Its own target directory, as a newcomer's project has: nothing
            // of the host's build may leak in.
            for var in [
                "CARGO_TARGET_DIR",
                "RUSTFLAGS",
                "CARGO_ENCODED_RUSTFLAGS",
                "CARGO_BUILD_TARGET",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
            ] {
                command.env_remove(var);
            }
            build(command, &dir, "the Rust project rust-kit");
            (
                parent,
                dir.join("target/wasm32-wasip2/release/rust_kit.wasm"),
            )
        })
        .1
        .clone()
}

#[test]
fn the_js_kit_builds_from_scratch_and_passes_plugin_test() {
    passes_plugin_test(&js_kit());
}

#[test]
fn the_rust_kit_builds_from_scratch_and_passes_plugin_test() {
    passes_plugin_test(&rust_kit());
}

/// The three kits' examples behave the same: the same vectors for the same
/// settings on markup, and the same refusals.
#[test]
fn the_three_kits_give_the_same_vectors_and_refusals() {
    let texts = [
        "# Release notes\n<p>The <b>new</b> parser is **much** faster.</p>",
        "_Emphasis_ and snake_case and 2*3 <br/> END",
        "Grüße aus <i>KÖLN</i>",
    ];
    let table = "dimensions = \"64\"\nstrip_markup = \"true\"\nlowercase = \"true\"";
    let kits = [python_kit(), js_kit(), rust_kit()];
    let rows: Vec<_> = kits
        .iter()
        .map(|wasm| embed_with(wasm.to_str().unwrap(), table, &texts))
        .collect();
    for (kit, got) in kits.iter().zip(&rows).skip(1) {
        for ((text, a), (_, b)) in rows[0].iter().zip(got) {
            assert_eq!((a.len(), b.len()), (64, 64));
            let apart = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                apart < 1e-5,
                "{}: {text:?}: {apart} from Python's",
                kit.display()
            );
        }
    }
    // Stripped and lowercased, the first text is the plain one's vector.
    let plain = embed_with(
        kits[0].to_str().unwrap(),
        "dimensions = \"64\"",
        &["release notes\nthe new parser is much faster."],
    );
    let c = cosine(&rows[0][0].1, &plain[0].1);
    assert!(c >= 0.9999, "stripping left something: cosine {c}");
    for (table, refusal) in [
        ("colour = \"red\"", "unknown key `colour`"),
        ("dimensions = \"385\"", "`dimensions = 385`"),
        ("dimensions = \"0\"", "`dimensions = 0`"),
        ("lowercase = \"yes\"", "`lowercase = yes`"),
    ] {
        for wasm in &kits {
            let err = embed_refused(wasm.to_str().unwrap(), table);
            assert!(err.contains(refusal), "{}: {table}: {err}", wasm.display());
        }
    }
}

#[test]
fn plugin_new_refuses_a_bad_name_and_a_directory_in_use() {
    let parent = tempfile::tempdir().unwrap();
    for bad in ["../escape", "two words", "-dash", "dot.ted"] {
        let out = plugin_new(parent.path(), bad, "python");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("`{bad}` is not a plugin name")),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    std::fs::create_dir(parent.path().join("taken")).unwrap();
    std::fs::write(parent.path().join("taken/keep.txt"), "mine").unwrap();
    let out = plugin_new(parent.path(), "taken", "rust");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_dir(parent.path().join("taken"))
            .unwrap()
            .count(),
        1
    );
    // An empty directory is used, and the next steps are printed.
    std::fs::create_dir(parent.path().join("empty")).unwrap();
    let out = plugin_new(parent.path(), "empty", "js");
    let text = show(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("npm run build") && text.contains("plugin test empty.wasm"),
        "{text}"
    );
    let package = std::fs::read_to_string(parent.path().join("empty/package.json")).unwrap();
    assert!(package.contains("\"name\": \"empty\""), "{package}");
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `embed TEXTS` with the plugin at `wasm` and `[plugin.config]` `table`.
fn embed_with(wasm: &str, table: &str, texts: &[&str]) -> Vec<(String, Vec<f32>)> {
    embed_configured(
        &format!("[plugin]\npath = {wasm:?}\n[plugin.config]\n{table}\n"),
        texts,
    )
}

/// `embed TEXTS` with the config file `text`.
fn embed_configured(text: &str, texts: &[&str]) -> Vec<(String, Vec<f32>)> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    std::fs::write(&config, text).unwrap();
    let mut args = vec!["--config", config.to_str().unwrap(), "embed"];
    args.extend_from_slice(texts);
    succeeded(&embedhost(&args))
}

/// The error of `embed` with the plugin at `wasm` given `table`.
fn embed_refused(wasm: &str, table: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedhost.toml");
    let text = format!("[plugin]\npath = {wasm:?}\n[plugin.config]\n{table}\n");
    std::fs::write(&config, text).unwrap();
    let out = embedhost(&["--config", config.to_str().unwrap(), "embed", "x"]);
    assert!(!out.status.success(), "{wasm}: {table} accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_python_kit_gives_the_engines_vectors_and_unit_prefixes_when_cut() {
    let wasm = python_kit();
    let texts = [
        "A man is eating food.",
        "Grüße aus Köln!",
        "The quick brown fox jumps over the lazy dog.",
    ];
    let engine = embed_with("builtin:bert", "", &texts);
    let kit = embed_with(wasm.to_str().unwrap(), "", &texts);
    let cut = embed_with(wasm.to_str().unwrap(), "dimensions = \"128\"", &texts);
    for ((e, k), c) in engine.iter().zip(&kit).zip(&cut) {
        assert_eq!((e.1.len(), k.1.len(), c.1.len()), (384, 384, 128));
        let same = cosine(&e.1, &k.1);
        assert!(same >= 0.9999, "{:?}: cosine {same}", e.0);
        let norm = c.1.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{:?}: norm {norm}", e.0);
        let prefix = &e.1[..128];
        let scale = prefix.iter().map(|x| x * x).sum::<f32>().sqrt();
        for (got, want) in c.1.iter().zip(prefix) {
            assert!((got - want / scale).abs() < 1e-4, "{:?}", e.0);
        }
    }
}

/// The Python and JavaScript kits, with no settings, give `builtin:bert`'s
/// vectors at the same precision: int8 (the default) and fp32 (for the
/// kits, `[plugin.encoder] precision`).
#[test]
fn the_python_and_js_kits_give_builtin_berts_vectors_at_each_precision() {
    let texts = ["A man is eating food.", "Grüße aus Köln!", "a b c"];
    for precision in ["int8", "fp32"] {
        let engine = embed_with(
            "builtin:bert",
            &format!("precision = {precision:?}"),
            &texts,
        );
        for wasm in [python_kit(), js_kit()] {
            let kit = embed_configured(
                &format!(
                    "[plugin]\npath = {:?}\n[plugin.encoder]\nprecision = {precision:?}\n",
                    wasm.to_str().unwrap()
                ),
                &texts,
            );
            for (e, k) in engine.iter().zip(&kit) {
                let same = cosine(&e.1, &k.1);
                assert!(
                    same >= 0.9999,
                    "{} at {precision}: {:?}: cosine {same}",
                    wasm.display(),
                    e.0
                );
            }
        }
    }
}

/// A Python plugin of the plain `plugin` world whose `embed` allocates
/// without bound on the text `attack`.
const HOSTILE_APP: &str = include_str!("../data/hostile-python/app.py");

#[tokio::test(flavor = "multi_thread")]
async fn a_python_plugin_allocating_without_bound_hits_the_memory_cap_and_the_host_serves_on() {
    let built = tokio::task::spawn_blocking(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("wit")).unwrap();
        std::fs::copy(
            workspace().join("wit/embedder.wit"),
            dir.path().join("wit/embedder.wit"),
        )
        .unwrap();
        std::fs::write(dir.path().join("app.py"), HOSTILE_APP).unwrap();
        let wasm = build_python(dir.path(), "hostile", "plugin");
        (dir, wasm)
    })
    .await
    .unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::File(built.1.clone())).unwrap();
    let spawner = WasmSpawner {
        plugin,
        limits: InstanceLimits {
            memory_bytes: 256 << 20,
            ..InstanceLimits::default()
        },
        config: vec![],
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
    let deadline = Duration::from_secs(60);
    let reason = match supervisor
        .embed(vec!["attack".into()], false, deadline)
        .await
    {
        Ok(r) => {
            assert_eq!((r.vectors.len(), r.failed.len()), (0, 1), "{r:?}");
            r.failed[0].reason.clone()
        }
        Err(SupervisorError::Refused(e)) => e.message,
        Err(e) => panic!("not a typed refusal: {e}"),
    };
    assert!(reason.contains("memory limit"), "{reason}");
    let capped = supervisor
        .restarts()
        .get("memory_cap")
        .copied()
        .unwrap_or(0);
    assert!(capped >= 1, "{:?}", supervisor.restarts());
    // The host serves on, from a fresh instance.
    let r = supervisor
        .embed(vec!["ordinary text".into()], false, deadline)
        .await
        .unwrap();
    assert_eq!((r.vectors.len(), r.failed.len()), (1, 0), "{r:?}");
    supervisor.shutdown().await;
}

/// The Python kit restarts from a pre-initialized snapshot made with its
/// encoder linked (as `embedhost` loads a model-plugin), and every instance
/// started from it gives the engine's vectors. (Its restart times are in
/// BENCHMARKS.md, from `cargo bench --bench plugins`.)
#[tokio::test]
async fn the_python_kit_restarts_from_a_snapshot_made_with_its_encoder() {
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let settings = vec![("model_id".to_string(), "all-MiniLM-L6-v2".to_string())];
    let plugin = tokio::task::spawn_blocking({
        let engine = engine.clone();
        let settings = settings.clone();
        move || {
            let bert = WasmPlugin::load_snapshot(
                &engine,
                &PluginSource::builtin("bert").unwrap(),
                &real_model(),
                InstanceLimits::default(),
                &settings,
            )
            .unwrap();
            let encoder = embedhost::wasm::Encoder::new(bert, settings).unwrap();
            WasmPlugin::load_encoded_snapshot(
                &engine,
                &PluginSource::File(python_kit()),
                encoder,
                InstanceLimits::default(),
                &[],
            )
            .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(plugin.snapshot(), embedhost::wasm::SnapshotStatus::Used(_)),
        "{:?}",
        plugin.snapshot()
    );
    let expected = embed_with("builtin:bert", "", &["a snapshot restart"]);
    for _ in 0..5 {
        let instance = embedhost::wasm::WasmEmbedder::start(
            plugin.clone(),
            InstanceLimits::default(),
            Vec::new(),
        )
        .await
        .unwrap();
        let got = instance
            .embed(vec!["a snapshot restart".into()], false, None)
            .await
            .unwrap();
        assert!(cosine(got.get(0).unwrap(), &expected[0].1) >= 0.9999);
    }
}
