//! Generated tiny models for what no packaged model covers: CLS, max,
//! last-token and weighted-mean pooling, no Normalize module, E5-style
//! prompts, a cased tokenizer, `do_lower_case`, a 512-row position table
//! and another vocabulary size. `scripts/tiny_models.py` writes each as a
//! sentence-transformers directory (random weights from a fixed seed) with
//! reference vectors from a float64 numpy forward pass of the same
//! weights; here each is served through the front door as `[model] dir`,
//! so its own description configures both backends, and every vector is
//! held to its reference.

use std::path::{Path, PathBuf};
use std::time::Duration;

use embedhost::config::Config;
use embedhost::embedder::{Embedder, Job};
use embedhost::wasm::{ArtifactCache, PluginSource, WasmEngine, WasmPlugin};

use crate::onnx::{python, workspace};

const DEADLINE: Duration = Duration::from_secs(120);

/// The cosine every fp32 vector reaches against its reference.
const FP32_COSINE: f32 = 0.9999;

/// The cosine every int8 vector (the WASM plugin's default precision)
/// reaches against its reference.
const INT8_COSINE: f32 = 0.99;

/// How far a vector's length may be from its reference's, relative.
const LENGTH: f32 = 1e-3;

/// The generated models' directory: written once per version of the
/// scripts (their text is hashed into its name) under the tests' target
/// directory, so a run reuses the last run's models and nothing binary is
/// kept in the repository.
fn models() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(generate).clone()
}

fn generate() -> PathBuf {
    use std::hash::{Hash, Hasher};
    let scripts = ["scripts/tiny_models.py", "scripts/bert_to_onnx.py"];
    let mut hasher = std::hash::DefaultHasher::new();
    for script in scripts {
        std::fs::read(workspace().join(script))
            .unwrap()
            .hash(&mut hasher);
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiny-models");
    let dir = root.join(format!("{:016x}", hasher.finish()));
    if dir.is_dir() {
        return dir;
    }
    std::fs::create_dir_all(&root).unwrap();
    let partial = tempfile::tempdir_in(&root).unwrap();
    python(&[
        workspace().join(scripts[0]).as_os_str(),
        partial.path().as_os_str(),
    ]);
    // Another test binary may have finished first: its copy is the same.
    let partial = partial.keep();
    if std::fs::rename(&partial, &dir).is_err() {
        assert!(dir.is_dir());
        std::fs::remove_dir_all(partial).unwrap();
    }
    dir
}

/// One reference vector: the text as given (before any prompt), the kind
/// of job it was given as, its token count after the model's form and
/// truncation, and the vector.
#[derive(serde::Deserialize)]
struct Row {
    text: String,
    kind: String,
    tokens: usize,
    vector: Vec<f32>,
}

/// A variant's `golden.json`, as far as the tests read it.
#[derive(serde::Deserialize)]
struct Golden {
    normalized: bool,
    max_seq_length: u32,
    rows: Vec<Row>,
}

/// The variant `name`'s directory and its reference.
async fn variant(name: &str) -> (PathBuf, Golden) {
    let dir = tokio::task::spawn_blocking(models)
        .await
        .unwrap()
        .join(name);
    let golden = serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    (dir, golden)
}

/// Compiles the BERT plugin into the tests' artifact cache, in this
/// process, once. The front door compiles plugin code in a child of its
/// own executable (`embedhost compile-plugin`), which in a test is the
/// test binary: it finds the cached artifact instead.
fn compiled_plugin() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let engine = WasmEngine::new(Some(ArtifactCache::new(crate::test_cache_dir()))).unwrap();
        WasmPlugin::load(&engine, &PluginSource::builtin("bert").unwrap()).unwrap();
    });
}

/// A front door of one instance on `backend` (`native`, or `wasm` at
/// `precision`) serving the model in `dir` as its description says.
async fn front(dir: &Path, backend: &str, precision: &str) -> Embedder {
    let plugin = if backend == "wasm" {
        format!("[plugin.config]\nprecision = \"{precision}\"\n")
    } else {
        assert_eq!(precision, "fp32", "the native engine runs the fp32 graph");
        String::new()
    };
    let text = format!(
        "backend = \"{backend}\"\n[supervisor]\npool_size = 1\n[model]\ndir = \"{}\"\n{plugin}[native]\nexecutable = \"{}\"\nthreads = 1\n[cache]\ndir = \"{}\"\n",
        dir.display(),
        env!("CARGO_BIN_EXE_embedhost"),
        crate::test_cache_dir().display(),
    );
    let config = Config::parse(&text, Path::new("/tiny/embedhost.toml")).unwrap();
    if backend == "wasm" {
        tokio::task::spawn_blocking(compiled_plugin).await.unwrap();
    }
    Embedder::start(config, Some(1)).await.unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn length(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b) / (length(a) * length(b))
}

/// What a front door gave each reference row, in the reference's order:
/// each kind's texts in one job.
async fn vectors(front: &Embedder, golden: &Golden) -> Vec<Vec<f32>> {
    let mut got = vec![Vec::new(); golden.rows.len()];
    for kind in ["query", "passage"] {
        let at: Vec<usize> = (0..golden.rows.len())
            .filter(|&i| golden.rows[i].kind == kind)
            .collect();
        if at.is_empty() {
            continue;
        }
        let texts = at.iter().map(|&i| golden.rows[i].text.clone()).collect();
        let job = Job::new(texts).query(kind == "query").deadline(DEADLINE);
        let done = front.embed(job).await.unwrap();
        for (&i, row) in at.iter().zip(done.rows) {
            got[i] = row.unwrap();
        }
    }
    got
}

/// Serves variant `name` on `backend` at `precision`, checks the model's
/// info and every vector against its reference (cosine at least `bound`;
/// length within [`LENGTH`], of 1 when normalized), prints the worst
/// cosine, and returns the vectors.
async fn served(name: &str, backend: &str, precision: &str, bound: f32) -> Vec<Vec<f32>> {
    let (dir, golden) = variant(name).await;
    let front = front(&dir, backend, precision).await;
    let info = front.generation().unwrap().info.clone();
    assert_eq!(
        (info.dimension, info.max_input_tokens, info.normalized),
        (32, golden.max_seq_length, golden.normalized),
        "{name} on {backend}"
    );
    let got = vectors(&front, &golden).await;
    let mut worst = (f32::INFINITY, 0f32);
    for (row, v) in golden.rows.iter().zip(&got) {
        let c = cosine(v, &row.vector);
        let l = length(v) / length(&row.vector) - 1.0;
        let text: String = row.text.chars().take(40).collect();
        assert!(
            c >= bound,
            "{name} on {backend} {precision}: {text:?} ({}, {} tokens): cosine {c} to the reference",
            row.kind,
            row.tokens
        );
        if precision == "fp32" {
            assert!(
                l.abs() < LENGTH,
                "{name} on {backend}: {text:?} ({}): length {} against {}",
                row.kind,
                length(v),
                length(&row.vector)
            );
        }
        worst = (worst.0.min(c), worst.1.max(l.abs()));
    }
    eprintln!(
        "tiny {name} {backend} {precision}: {} vectors, min cosine {:.7}, max length error {:.2e}",
        got.len(),
        worst.0,
        worst.1
    );
    got
}

/// [`served`] on the native engine and the WASM plugin at fp32, then the
/// plugin at int8 within [`INT8_COSINE`]; the native vectors.
async fn on_both_backends(name: &str) -> Vec<Vec<f32>> {
    let native = served(name, "native", "fp32", FP32_COSINE).await;
    served(name, "wasm", "fp32", FP32_COSINE).await;
    served(name, "wasm", "int8", INT8_COSINE).await;
    native
}

/// The native vector of `text` given as `kind`.
fn of<'a>(golden: &Golden, got: &'a [Vec<f32>], text: &str, kind: &str) -> &'a [f32] {
    let i = golden
        .rows
        .iter()
        .position(|r| r.text == text && r.kind == kind)
        .unwrap_or_else(|| panic!("no reference for {text:?} as {kind}"));
    &got[i]
}

#[tokio::test]
async fn cls_pooling_with_normalize() {
    on_both_backends("cls").await;
}

#[tokio::test]
async fn max_pooling_without_normalize() {
    on_both_backends("max").await;
}

#[tokio::test]
async fn last_token_pooling() {
    on_both_backends("lasttoken").await;
}

#[tokio::test]
async fn weighted_mean_pooling() {
    on_both_backends("weightedmean").await;
}

#[tokio::test]
async fn e5_prompts_give_queries_and_passages_their_own_vectors() {
    let got = on_both_backends("e5").await;
    let (_, golden) = variant("e5").await;
    // The long text's prompt is two tokens of 128: its mean moves little.
    for row in golden
        .rows
        .iter()
        .filter(|r| r.kind == "query" && r.tokens < 64)
    {
        let query = of(&golden, &got, &row.text, "query");
        let passage = of(&golden, &got, &row.text, "passage");
        assert!(
            cosine(query, passage) < 0.999,
            "{:?}: the prompts made no difference",
            row.text
        );
    }
}

/// [`on_both_backends`] on variant `name`; the cosine of the native
/// vectors of a capitalized text and of its lowercase.
async fn capitals(name: &str) -> f32 {
    let got = on_both_backends(name).await;
    let (_, golden) = variant(name).await;
    let upper = of(&golden, &got, "Hello World", "passage");
    let lower = of(&golden, &got, "hello world", "passage");
    cosine(upper, lower)
}

#[tokio::test]
async fn a_cased_tokenizer_tells_capitals_apart() {
    assert!(
        capitals("cased").await < 0.999,
        "capitals made no difference"
    );
}

#[tokio::test]
async fn do_lower_case_lowercases_before_a_cased_tokenizer() {
    let c = capitals("lowercased").await;
    assert!(c > 0.999_999, "the text was not lowercased: cosine {c}");
}

#[tokio::test]
async fn a_512_position_model_reads_past_128_tokens() {
    let (_, golden) = variant("pos512").await;
    let longest = golden.rows.iter().map(|r| r.tokens).max().unwrap();
    assert!(longest > 128, "the longest reference has {longest} tokens");
    on_both_backends("pos512").await;
}

#[tokio::test]
async fn another_vocabulary_size() {
    on_both_backends("vocab").await;
}
