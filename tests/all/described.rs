//! A model given as a sentence-transformers directory (`[model] dir`): its
//! own description decides the pooling, the normalization and the prompts
//! both backends and the front door apply. The directory is all-MiniLM-L6-v2's
//! files beside description files written here.

use std::path::Path;
use std::time::Duration;

use embedhost::config::Config;
use embedhost::embedder::{Embedder, Job};

use crate::onnx::real_model;

const DEADLINE: Duration = Duration::from_secs(120);

/// A directory with the real model's files and a description asking for
/// `pooling` (a sentence-transformers Pooling config's mode key), with or
/// without a Normalize module, and E5's prompts.
fn described(root: &Path, pooling: &str, normalize: bool) -> std::path::PathBuf {
    let model = real_model();
    let dir = root.join("e5-style");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "model.onnx",
    ] {
        std::os::unix::fs::symlink(model.join(file), dir.join(file)).unwrap();
    }
    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    let write = |name: &str, value: serde_json::Value| {
        std::fs::write(dir.join(name), value.to_string()).unwrap();
    };
    write("modules.json", serde_json::Value::Array(modules));
    write(
        "1_Pooling/config.json",
        serde_json::json!({"word_embedding_dimension": 384, pooling: true, "pooling_mode_mean_tokens": pooling == "pooling_mode_mean_tokens"}),
    );
    write(
        "sentence_bert_config.json",
        serde_json::json!({"max_seq_length": 256, "do_lower_case": false}),
    );
    write(
        "config_sentence_transformers.json",
        serde_json::json!({"prompts": {"query": "query: ", "passage": "passage: "}}),
    );
    dir
}

/// A front door on the native backend (one child), configured by `lines`
/// (TOML sections).
async fn front(lines: &str) -> Embedder {
    let text = format!(
        "backend = \"native\"\n[supervisor]\npool_size = 1\n[native]\nexecutable = \"{}\"\nthreads = 1\n{lines}",
        env!("CARGO_BIN_EXE_embedhost")
    );
    let config = Config::parse(&text, Path::new("/nonexistent/embedhost.toml")).unwrap();
    Embedder::start(config, Some(1)).await.unwrap()
}

async fn vector(front: &Embedder, text: &str, is_query: bool) -> Vec<f32> {
    let job = Job::new(vec![text.to_string()])
        .query(is_query)
        .deadline(DEADLINE);
    let mut done = front.embed(job).await.unwrap();
    done.rows.remove(0).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[tokio::test]
async fn a_described_directory_gets_its_prompts_pooling_and_normalization_on_the_model() {
    let root = tempfile::tempdir().unwrap();
    let dir = tokio::task::spawn_blocking({
        let root = root.path().to_path_buf();
        move || described(&root, "pooling_mode_cls_token", false)
    })
    .await
    .unwrap();
    let e5 = front(&format!("[model]\ndir = \"{}\"\n", dir.display())).await;
    // The plain model, asked for the prompted texts and CLS pooling by hand.
    let model = tokio::task::spawn_blocking(real_model).await.unwrap();
    let plain = front(&format!(
        "[model]\ndir = \"{}\"\n[plugin.config]\npooling = \"cls\"\nnormalize = false\n",
        model.display()
    ))
    .await;
    let text = "how far is the moon";
    let query = vector(&e5, text, true).await;
    let passage = vector(&e5, text, false).await;
    assert!(
        cosine(&query, &passage) < 0.999,
        "the prompts made no difference"
    );
    for (got, prompted) in [(&query, "query: "), (&passage, "passage: ")] {
        let want = vector(&plain, &format!("{prompted}{text}"), true).await;
        assert!(cosine(got, &want) >= 0.99999, "{prompted}");
        // No Normalize module: the length CLS pooling gives.
        let length = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((length(got) - 1.0).abs() > 1e-2, "normalized");
        assert!((length(got) / length(&want) - 1.0).abs() < 1e-4);
    }
    assert!(!e5.generation().unwrap().info.normalized);
    // The index's chunks leave room for the document prompt: the model
    // reads every token of a chunk (256 tokens, 2 of them special).
    let generation = e5.generation().unwrap();
    let prompt = generation.tokens.spans("passage: ").unwrap().len();
    assert!(prompt >= 1);
    let worker = embedhost::worker::Worker::new(
        std::sync::Arc::new(e5),
        generation.info.clone(),
        generation.tokens.clone(),
        embedhost::worker::WorkerSettings::from_config(&generation.config),
    );
    assert_eq!(worker.settings().chunk.tokens, 256 - 2 - prompt);
}

#[tokio::test]
async fn a_directory_whose_description_cannot_be_run_is_refused_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = tokio::task::spawn_blocking({
        let root = root.path().to_path_buf();
        move || described(&root, "pooling_mode_max_tokens", true)
    })
    .await
    .unwrap();
    // Two modes: max, and mean (sentence-transformers' default when a
    // config does not turn it off).
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_max_tokens": true, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    let text = format!(
        "backend = \"native\"\n[model]\ndir = \"{}\"\n",
        dir.display()
    );
    let config = Config::parse(&text, Path::new("/nonexistent/embedhost.toml")).unwrap();
    let err = Embedder::start(config, Some(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("1_Pooling/config.json"), "{err}");
}
