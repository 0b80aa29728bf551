//! all-MiniLM-L6-v2 on both backends: the BERT WASM plugin against the
//! reference vectors, against the native ONNX engine, and the one-line
//! backend swap of the example configs.

use crate::OutputWithin;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use embedhost::supervisor::{Supervisor, SupervisorConfig};
use embedhost::wasm::{
    ArtifactCache, CacheOutcome, InputKind, Instance, InstanceLimits, PluginSource, SnapshotStatus,
    WasmEngine, WasmPlugin, WasmSpawner,
};

use crate::onnx::{golden, real_model};

const DEADLINE: Duration = Duration::from_secs(120);

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

async fn wasm_pool(size: usize, precision: &str) -> Supervisor {
    wasm_pool_with(size, &[("precision", precision)]).await
}

/// A pool of the BERT plugin on the real model, `init` given `config`.
async fn wasm_pool_with(size: usize, config: &[(&str, &str)]) -> Supervisor {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    wasm_pool_in(dir, size, config).await
}

/// A pool of `size` BERT plugin instances on the model in `dir`, `init`
/// given `config`.
pub async fn wasm_pool_in(
    dir: std::path::PathBuf,
    size: usize,
    config: Vec<(String, String)>,
) -> Supervisor {
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap())
        .unwrap()
        .with_model_dir(dir);
    let spawner = WasmSpawner {
        plugin,
        limits: InstanceLimits::default(),
        config,
    };
    let config = SupervisorConfig {
        pool_size: size,
        ..SupervisorConfig::default()
    };
    Supervisor::start(spawner, config).await.unwrap()
}

/// The cosine of each golden sentence's vector from a pool at `precision` to
/// the reference: the short texts in one packed call, the long ones alone.
async fn golden_cosines(precision: &str) -> Vec<(String, f32)> {
    let supervisor = wasm_pool(1, precision).await;
    let info = supervisor.model_info();
    assert_eq!((info.dimension, info.max_input_tokens), (384, 256));
    let golden = golden();
    let (short, long): (Vec<_>, Vec<_>) = golden.iter().partition(|(t, _)| t.len() < 200);
    let texts: Vec<String> = short.iter().map(|(t, _)| t.clone()).collect();
    let r = supervisor.embed(texts, false, DEADLINE).await.unwrap();
    let mut cosines = Vec::new();
    for (i, (text, reference)) in short.iter().enumerate() {
        cosines.push((text.clone(), cosine(r.vectors.get(i).unwrap(), reference)));
    }
    for (text, reference) in long {
        let r = supervisor
            .embed(vec![text.clone()], false, DEADLINE)
            .await
            .unwrap();
        cosines.push((text.clone(), cosine(r.vectors.get(0).unwrap(), reference)));
    }
    supervisor.shutdown().await;
    cosines
}

#[tokio::test]
async fn every_pooling_mode_unnormalized_gives_the_native_engines_vectors_on_the_wasm_plugin_at_fp32()
 {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let texts: Vec<String> = golden()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.len() < 200)
        .take(6)
        .collect();
    for pooling in ["cls", "max", "lasttoken", "weightedmean"] {
        let set = [("pooling", pooling), ("normalize", "false")];
        let wasm = wasm_pool_with(1, &[set[0], set[1], ("precision", "fp32")]).await;
        let native = Supervisor::start(
            crate::onnx::spawner(&dir, &set),
            SupervisorConfig::default(),
        )
        .await
        .unwrap();
        assert!(!wasm.model_info().normalized && !native.model_info().normalized);
        let w = wasm.embed(texts.clone(), false, DEADLINE).await.unwrap();
        let n = native.embed(texts.clone(), false, DEADLINE).await.unwrap();
        for (i, text) in texts.iter().enumerate() {
            let (w, n) = (w.vectors.get(i).unwrap(), n.vectors.get(i).unwrap());
            let norm = |v: &[f32]| cosine(v, v).sqrt();
            let c = cosine(w, n) / (norm(w) * norm(n));
            assert!(c >= 0.9999, "{pooling} {text:?}: cosine {c}");
            // Not normalized, and the same length on both.
            assert!(
                (norm(n) - 1.0).abs() > 1e-2,
                "{pooling} {text:?}: unit length"
            );
            assert!((norm(w) / norm(n) - 1.0).abs() < 1e-3, "{pooling} {text:?}");
        }
        wasm.shutdown().await;
        native.shutdown().await;
    }
}

#[tokio::test]
async fn the_wasm_plugin_matches_the_reference_vectors_in_fp32() {
    for (text, c) in golden_cosines("fp32").await {
        assert!(c >= 0.9999, "{text:?}: cosine {c}");
    }
}

#[tokio::test]
async fn the_wasm_plugin_in_int8_stays_near_the_reference() {
    let cosines = golden_cosines("int8").await;
    // Every sentence with a word in it (the golden set also holds an empty
    // text and punctuation, whose vectors carry no meaning to keep).
    let worded: Vec<_> = cosines
        .iter()
        .filter(|(t, _)| t.chars().any(char::is_alphabetic))
        .collect();
    assert!(worded.len() >= 18);
    let (worst, min) = worded
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, c)| (t.clone(), *c))
        .unwrap();
    eprintln!("int8 vs reference: minimum cosine {min:.5} ({worst:?})");
    // README's claim: 0.995 or more (0.9961 measured, on "hello").
    assert!(min >= 0.995, "{worst:?}: cosine {min}");
    // Quantization changes the vectors: this is not the fp32 path by mistake.
    assert!(worded.iter().any(|(_, c)| *c < 0.9999));
}

#[tokio::test]
async fn int8_vectors_are_the_same_bits_alone_in_any_batch_and_across_instances() {
    let texts: Vec<String> = golden().into_iter().map(|(t, _)| t).take(12).collect();
    let alone = wasm_pool(1, "int8").await;
    let mut reference = Vec::new();
    for text in &texts {
        let r = alone
            .embed(vec![text.clone()], false, DEADLINE)
            .await
            .unwrap();
        reference.push(r.vectors.get(0).unwrap().to_vec());
    }
    alone.shutdown().await;
    // Another pool (fresh instances, other runs of the same code): the same
    // texts in batches of other sizes, orders and neighbours.
    let batched = wasm_pool(2, "int8").await;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    for round in 0..3 {
        order.rotate_left(5);
        if round == 1 {
            order.reverse();
        }
        for group in order.chunks(3 + round * 2) {
            let batch: Vec<String> = group.iter().map(|&i| texts[i].clone()).collect();
            let r = batched.embed(batch, false, DEADLINE).await.unwrap();
            for (k, &i) in group.iter().enumerate() {
                let got = r.vectors.get(k).unwrap();
                assert!(
                    got.iter()
                        .zip(&reference[i])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{:?} differs in a batch of {} (round {round})",
                    texts[i],
                    group.len()
                );
            }
        }
    }
    batched.shutdown().await;
}

/// The model directory's files, hard-linked into a new directory: the same
/// files (same snapshot id) in a directory the test may empty.
fn linked_model_dir() -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(real_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::hard_link(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    copy
}

#[test]
fn a_snapshot_starts_instances_with_the_model_loaded_and_reads_no_file() {
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let bert = PluginSource::builtin("bert").unwrap();
    let limits = InstanceLimits::default();
    let dir = linked_model_dir();
    let snapshot = WasmPlugin::load_snapshot(&engine, &bert, dir.path(), limits, &[]).unwrap();
    assert!(
        matches!(snapshot.snapshot(), SnapshotStatus::Used(_)),
        "{:?}",
        snapshot.snapshot()
    );
    let plain = WasmPlugin::load(&engine, &bert)
        .unwrap()
        .with_model_dir(real_model());
    assert_eq!(plain.snapshot(), &SnapshotStatus::NotUsed);
    let texts: Vec<String> = golden()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.len() < 200)
        .collect();
    let mut reference = Instance::start(&plain, limits, &[]).unwrap();
    let want = reference.embed(&texts, InputKind::Document, None).unwrap();
    // Every model file gone: an instance restored from the snapshot (what a
    // restart makes) has the model already and embeds the same bits.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for _ in 0..3 {
        let mut restored = Instance::start(&snapshot, limits, &[]).unwrap();
        assert_eq!(restored.model_info(), reference.model_info());
        let got = restored.embed(&texts, InputKind::Document, None).unwrap();
        assert_eq!(got, want, "a restored instance embeds as a loaded one");
    }
    // The plain plugin, by contrast, needs its files.
    let emptied = WasmPlugin::load(&engine, &bert)
        .unwrap()
        .with_model_dir(dir.path());
    assert!(Instance::start(&emptied, limits, &[]).is_err());
    // Made once: the next load finds it in the cache.
    let again = WasmPlugin::load_snapshot(&engine, &bert, &real_model(), limits, &[]).unwrap();
    assert_eq!(again.snapshot(), &SnapshotStatus::Used(CacheOutcome::Hit));
}

#[test]
fn a_plugin_that_cannot_be_snapshotted_falls_back_to_loading_in_init() {
    let engine = WasmEngine::new(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = [("no_such_key".to_string(), "1".to_string())];
    let plugin = WasmPlugin::load_snapshot(
        &engine,
        &PluginSource::builtin_stub(),
        dir.path(),
        InstanceLimits::default(),
        &config,
    )
    .unwrap();
    match plugin.snapshot() {
        SnapshotStatus::Unavailable(reason) => {
            let reason = reason.to_string();
            assert!(
                reason.contains("`init` failed") && reason.contains("no_such_key"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The plain plugin is there, with the model directory, and reports the
    // same error from its own `init`.
    assert_eq!(plugin.model_dir(), Some(dir.path()));
    let Err(err) = Instance::start(&plugin, InstanceLimits::default(), &config) else {
        panic!("the stub accepted an unknown key");
    };
    assert!(err.to_string().contains("no_such_key"), "{err}");
}

#[tokio::test]
async fn the_plugin_reads_only_its_model_directory() {
    // Without a model directory the plugin's `init` fails with a clear
    // error naming the file it looked for, and nothing else is reachable.
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap()).unwrap();
    let err =
        embedhost::wasm::WasmEmbedder::start(plugin.clone(), InstanceLimits::default(), vec![])
            .await
            .unwrap_err();
    assert!(err.to_string().contains("/model/config.json"), "{err}");
    // A model_dir outside the preopened directory does not exist for it.
    let err = embedhost::wasm::WasmEmbedder::start(
        plugin,
        InstanceLimits::default(),
        vec![("model_dir".into(), "/etc".into())],
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot read `/etc/config.json`"),
        "{err}"
    );
}

/// Runs `embedhost ARGS` offline with the model store at `models`, from an
/// empty working directory and with no user config, so only `args` (and the
/// built-in defaults) decide what runs.
pub(crate) fn embedhost_offline(args: &[&str], models: &Path) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(args)
        .current_dir(cwd.path())
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env("EMBEDHOST_MODELS_DIR", models)
        .env("XDG_CONFIG_HOME", cwd.path())
        .env("EMBEDHOST_OFFLINE", "1")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap()
}

pub(crate) fn succeeded(out: &Output) -> Vec<(String, Vec<f32>)> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::cli::vectors(out)
}

#[test]
fn swapping_the_backend_of_the_real_model_is_one_line_and_at_fp32_gives_the_same_vectors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let models = real_model().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &Path| {
        let args = [
            "--config",
            config.to_str().unwrap(),
            "embed",
            "A man is eating food.",
            "Grüße aus Köln!",
            "",
        ];
        succeeded(&embedhost_offline(&args, &models))
    };
    let example = |name: &str| root.join("examples/config").join(name);
    let native = run(&example("minilm-native.toml"));
    // The example pair differs in the backend line only. The sandbox's
    // default is int8: near the native vectors, not equal to them.
    let wasm = run(&example("minilm-wasm.toml"));
    // With `precision = "fp32"` (one more line), the same vectors.
    let fp32 = dir.path().join("fp32.toml");
    let text = std::fs::read_to_string(example("minilm-wasm.toml")).unwrap();
    std::fs::write(
        &fp32,
        text.replace("# [plugin.config]", "[plugin.config]\nprecision = \"fp32\""),
    )
    .unwrap();
    let wasm_fp32 = run(&fp32);
    assert_eq!(wasm.len(), 3);
    for (((text, w), (same, n)), (_, f)) in wasm.iter().zip(&native).zip(&wasm_fp32) {
        assert_eq!(text, same);
        assert_eq!(w.len(), 384);
        let c = cosine(w, n);
        assert!(c >= 0.99, "{text:?}: native vs wasm (int8) cosine {c}");
        if !text.is_empty() {
            assert!(c < 0.9999, "{text:?}: the default is not int8 ({c})");
        }
        let c = cosine(f, n);
        assert!(c >= 0.9999, "{text:?}: native vs wasm fp32 cosine {c}");
    }
}

#[test]
fn int8_precision_is_one_config_line_and_stays_near_fp32() {
    let models = real_model().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let run = |precision: &str| {
        let config = dir.path().join(format!("{precision}.toml"));
        std::fs::write(
            &config,
            format!("backend = \"native\"\n[native]\nprecision = \"{precision}\"\n"),
        )
        .unwrap();
        let args = [
            "--config",
            config.to_str().unwrap(),
            "embed",
            "A man is eating food.",
            "Grüße aus Köln!",
        ];
        succeeded(&embedhost_offline(&args, &models))
    };
    let fp32 = run("fp32");
    let int8 = run("int8");
    for ((text, a), (_, b)) in fp32.iter().zip(&int8) {
        let c = cosine(a, b);
        assert!(
            (0.985..0.9999).contains(&c),
            "{text:?}: int8 vs fp32 cosine {c}"
        );
    }
    // A precision that does not exist is refused, naming the value.
    let bad = dir.path().join("int4.toml");
    std::fs::write(&bad, "[native]\nprecision = \"int4\"\n").unwrap();
    let out = embedhost_offline(&["--config", bad.to_str().unwrap(), "status"], &models);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("int4") && stderr.contains("int4.toml"),
        "{stderr}"
    );
}

#[test]
fn the_main_job_with_no_config_uses_the_real_model() {
    let models = real_model().parent().unwrap().to_path_buf();
    let args = [
        "embed",
        "A man is eating food.",
        "A man is eating a piece of bread.",
    ];
    let rows = succeeded(&embedhost_offline(&args, &models));
    assert_eq!(rows[0].1.len(), 384);
    let c = cosine(&rows[0].1, &rows[1].1);
    assert!((c - 0.7553).abs() < 2e-3, "{c}");
}

#[test]
fn offline_with_the_model_missing_names_the_file_and_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let out = embedhost_offline(&["embed", "hello"], empty.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("config.json")
            && last.contains("offline")
            && last.contains("embedhost model fetch all-minilm-l6-v2"),
        "{err}"
    );
}

/// The shipped corpus, indexed with the real model: questions in a
/// person's words find the guide that answers them in the top 3. Indexed
/// natively, searched on the default (WASM) backend: one index serves both.
#[test]
fn natural_questions_find_the_right_guide_in_the_shipped_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let models = real_model().parent().unwrap().to_path_buf();
    let db = tempfile::tempdir().unwrap();
    let db = db.path().to_str().unwrap().to_string();
    let corpus = root.join("examples/corpus");
    let native = root.join("examples/config/minilm-native.toml");
    let out = embedhost_offline(
        &[
            "--config",
            native.to_str().unwrap(),
            "index",
            "--db",
            &db,
            corpus.to_str().unwrap(),
        ],
        &models,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = [
        ("my tyre keeps going flat", "bicycle-repair.md"),
        ("how do I get back into my account", "password-reset.md"),
        ("why is my plant dying", "houseplants.md"),
        ("what makes lava explode", "volcanoes.md"),
        (
            "I committed the wrong thing, how do I take it back",
            "git-undo.md",
        ),
        (
            "why does the bank make loans more expensive",
            "interest-rates.md",
        ),
        ("how long should my longest run be", "marathon-training.md"),
        ("my coffee tastes sour", "coffee-brewing.md"),
        ("tips for falling asleep", "sleep.md"),
        ("how to make bread rise with wild yeast", "sourdough.md"),
    ];
    for (query, want) in cases {
        let out = embedhost_offline(
            &["search", "--db", &db, "--json", "-n", "3", query],
            &models,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let top: Vec<&str> = results
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["path"].as_str().unwrap().rsplit('/').next().unwrap())
            .collect();
        assert!(top.contains(&want), "{query:?}: {top:?}");
    }
    // A hybrid result's score is its cosine, the semantic score of the same
    // chunk, not a fusion rank (which is 1/61 + 1/61 = 0.033 for any query's
    // best hit): README's main job shows it.
    let scores = |mode: &str| {
        let out = embedhost_offline(
            &[
                "search",
                "--db",
                &db,
                "--json",
                "--mode",
                mode,
                "my tyre keeps going flat",
            ],
            &models,
        );
        let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        results
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["path"]
                        .as_str()
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .to_string(),
                    r["score"].as_f64().unwrap(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (hybrid, semantic) = (scores("hybrid"), scores("semantic"));
    let best = hybrid["bicycle-repair.md"];
    assert!(
        (best - semantic["bicycle-repair.md"]).abs() < 1e-4,
        "{hybrid:?} {semantic:?}"
    );
    assert!((0.4..0.6).contains(&best), "README shows 0.481: {best}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bert_plugin_passes_the_conformance_suite() {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
    let plugin = WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap())
        .unwrap()
        .with_model_dir(dir);
    let report = embedhost::conformance::run(
        plugin,
        embedhost::conformance::Options {
            config: vec![],
            limits: InstanceLimits::default(),
            throughput_time: Duration::from_millis(500),
        },
    )
    .await;
    assert!(report.passed(), "{}", report.table());
    assert_eq!(
        report.count(embedhost::conformance::Outcome::Pass),
        13,
        "{}",
        report.table()
    );
    assert!(report.texts_per_second.is_some_and(|r| r > 0.0));
    assert!(
        report.memory_bytes.is_some_and(|m| m > 90_000_000),
        "the model is in memory"
    );
}
