//! One service, several models (`[[models]]`): each served under its name
//! on every route, each reloaded on its own, and together within the
//! machine's memory.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Service, stub_config};
use crate::OutputWithin;
use crate::real_model::{embedhost_offline, succeeded};

/// The stub at 8 dimensions by default, and `wide` beside it at
/// `dimension`; `more` appended (TOML).
fn two_models(dimension: usize, more: &str) -> String {
    stub_config(
        "wasm",
        "dimension = \"8\"",
        &format!(
            "[[models]]\nname = \"wide\"\n[models.plugin]\npath = \"builtin:stub\"\n[models.plugin.config]\ndimension = \"{dimension}\"\n[models.supervisor]\npool_size = 1\n{more}"
        ),
    )
}

fn width(answer: &serde_json::Value) -> usize {
    answer["data"][0]["embedding"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Polls `done` every 20 ms until it holds, for at most two minutes.
fn until(what: &str, mut done: impl FnMut() -> bool) {
    let limit = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < limit, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_route_serves_each_model_by_its_name_and_a_reload_touches_only_the_one_it_changes() {
    let dir = tempfile::tempdir().unwrap().keep();
    let s = Service::start_in(&dir, &two_models(16, ""), &[]);
    let (status, plain) = s.post("/v1/embeddings", &json!({ "input": "a" }));
    assert_eq!((status, width(&plain)), (200, 8), "{plain}");
    let (status, wide) = s.post("/v1/embeddings", &json!({ "input": "a", "model": "wide" }));
    assert_eq!((status, width(&wide)), (200, 16), "{wide}");
    assert_eq!(wide["model"], "wide");
    let (status, unknown) = s.post("/v1/embeddings", &json!({ "input": "a", "model": "nope" }));
    assert_eq!(status, 404);
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`nope`") && message.contains("`wide`"),
        "{message}"
    );
    assert_eq!(unknown["error"]["code"], "model_not_found");
    let (_, listed) = s.get("/v1/models");
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    assert!(ids.contains(&"wide"), "{listed}");
    assert_eq!(s.get("/v1/models/wide").0, 200);
    // TEI's routes take the model as a query parameter.
    let (status, rows) = s.post("/embed?model=wide", &json!({ "inputs": ["a", "b"] }));
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[1].as_array().unwrap().len(), 16);
    assert_eq!(s.get("/info?model=wide").1["dimension"], 16);
    assert_eq!(s.get("/info").1["dimension"], 8);
    assert_eq!(s.get("/info?model=nope").0, 404);
    let default_generation = s.get("/info").1["generation"].clone();
    // A reload that changes `wide` only: swapped, the default untouched.
    std::fs::write(dir.join("embedhost.toml"), two_models(24, "")).unwrap();
    s.signal(libc::SIGHUP);
    until("wide at 24 dimensions", || {
        s.get("/info?model=wide").1["dimension"] == 24
    });
    assert_eq!(s.get("/info").1["generation"], default_generation);
    let (_, wide) = s.post("/v1/embeddings", &json!({ "input": "a", "model": "wide" }));
    assert_eq!(width(&wide), 24);
    // A reload without it: no longer served; the default still is.
    std::fs::write(
        dir.join("embedhost.toml"),
        stub_config("wasm", "dimension = \"8\"", ""),
    )
    .unwrap();
    s.signal(libc::SIGHUP);
    until("wide gone", || s.get("/info?model=wide").0 == 404);
    assert_eq!(s.get("/info").1["generation"], default_generation);
    assert_eq!(
        width(&s.post("/v1/embeddings", &json!({ "input": "a" })).1),
        8
    );
}

#[test]
fn models_whose_pools_do_not_fit_the_machine_together_are_refused_naming_each() {
    // Each pool alone fits 75% of this machine; the two together do not.
    let machine = embedhost::ceilings::machine_memory_bytes().unwrap();
    let budget = machine / 100 * embedhost::limits::POOL_MEMORY_SHARE_PERCENT;
    let fit = (budget / (4u64 << 30)).max(1);
    let each = fit / 2 + 1;
    let pools = format!("[supervisor]\npool_size = {each}\n[limits]\nmemory_mb = 4096\n");
    let config = format!(
        "[plugin]\npath = \"builtin:stub\"\n{pools}[[models]]\nname = \"second\"\n[models.plugin]\npath = \"builtin:stub\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedhost.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .env("EMBEDHOST_INDEX_DIR", dir.path())
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("POOL_MEMORY_SHARE_PERCENT")
            && err.contains("`second`")
            && err.contains(&format!("{each} x {}", 4u64 << 30)),
        "{err}"
    );
}

/// The native backend's config for the model `id` (or, with `id` None,
/// all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 beside it, `l3` added to
/// its entry).
fn real_config(id: Option<&str>, l3: &str) -> String {
    let head = format!(
        "backend = \"native\"\n[native]\nexecutable = \"{}\"\nthreads = 1\n[index]\ndir = \"index\"\n",
        env!("CARGO_BIN_EXE_embedhost")
    );
    match id {
        Some(id) => format!("{head}[model]\nid = \"{id}\"\n"),
        None => format!("{head}[[models]]\n[models.model]\nid = \"paraphrase-minilm-l3-v2\"\n{l3}"),
    }
}

/// The setup's model store, with both real models fetched into it.
fn real_store() -> std::path::PathBuf {
    crate::onnx::real_model();
    crate::onnx::store_model("paraphrase-minilm-l3-v2");
    crate::onnx::deps().join("models")
}

/// A service of both real models (see [`real_config`]), offline on the
/// setup's store; the store.
fn two_real_models(l3: &str) -> (Service, std::path::PathBuf) {
    let store = real_store();
    let dir = tempfile::tempdir().unwrap().keep();
    let envs = [
        ("EMBEDHOST_MODELS_DIR", store.as_os_str()),
        ("EMBEDHOST_OFFLINE", std::ffi::OsStr::new("1")),
    ];
    (
        Service::start_with(&dir, &real_config(None, l3), &[], &envs),
        store,
    )
}

#[test]
fn the_openai_client_gets_from_each_real_model_the_vectors_embed_gives() {
    let python = embedhost::deps::python().expect("run ./x setup: the venv's python is missing");
    let (s, store) = two_real_models("");
    let texts = [
        "The official client, unchanged.",
        "Two models behind one door.",
    ];
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
texts = json.loads(sys.argv[2])
print(json.dumps({m: [d.embedding for d in client.embeddings.create(model=m, input=texts, encoding_format="float").data] for m in sys.argv[3:]}))
"#;
    let models = ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2"];
    let out = Command::new(&python)
        .args([
            "-c",
            script,
            &s.url,
            &serde_json::to_string(&texts).unwrap(),
        ])
        .args(models)
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for model in models {
        let config = dir.path().join(format!("{model}.toml"));
        std::fs::write(&config, real_config(Some(model), "")).unwrap();
        let args = [&["--config", config.to_str().unwrap(), "embed"][..], &texts].concat();
        let expected = succeeded(&embedhost_offline(&args, &store));
        let got: Vec<Vec<f32>> = serde_json::from_value(answer[model].clone()).unwrap();
        assert_eq!(got.len(), texts.len());
        for ((text, want), got) in expected.iter().zip(&got) {
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            let cosine = dot(want, got) / (dot(want, want) * dot(got, got)).sqrt();
            assert!(cosine >= 0.99999, "{model} {text:?}: cosine {cosine}");
            let ratio = (dot(got, got) / dot(want, want)).sqrt();
            assert!(
                (ratio - 1.0).abs() < 1e-4,
                "{model} {text:?}: length ratio {ratio}"
            );
        }
    }
    // The two models give different vectors: each request reached its own.
    let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
        serde_json::from_value(answer[models[0]].clone()).unwrap(),
        serde_json::from_value(answer[models[1]].clone()).unwrap(),
    );
    assert_ne!(a, b);
}

#[test]
fn both_real_models_serve_at_once_and_crashes_in_one_fail_no_request_of_the_other() {
    // paraphrase-MiniLM-L3-v2's children abort on 2% of their calls
    // (seeded), under the shipped supervision policy.
    let (s, _store) = two_real_models(
        "[models.plugin.config]\n\"child.chaos\" = \"0.02\"\n\"child.chaos_kinds\" = \"abort\"\n\"child.chaos_seed\" = \"7\"\n",
    );
    let failed = std::sync::Mutex::new(Vec::new());
    let answered = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for c in 0..64 {
            let (failed, answered) = (&failed, &answered);
            let url = format!("{}/v1/embeddings", s.url);
            scope.spawn(move || {
                let agent = super::agent();
                for r in 0..24 {
                    // Each client asks both models in turn.
                    let model = ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2"][(c + r) % 2];
                    let body =
                        json!({ "input": format!("client {c} asks question {r}"), "model": model });
                    match agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.to_string())
                    {
                        Ok(response) if response.status() == 200 => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(response) => failed
                            .lock()
                            .unwrap()
                            .push((model, response.status().as_u16())),
                        Err(e) => failed
                            .lock()
                            .unwrap()
                            .push((model, e.to_string().len() as u16)),
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let other: Vec<_> = failed
        .iter()
        .filter(|(m, _)| *m == "all-minilm-l6-v2")
        .collect();
    assert!(
        other.is_empty(),
        "{} requests of the healthy model failed: {other:?}",
        other.len()
    );
    let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
    assert!(
        super::metric(&metrics, "restarts_total{") > 0.0,
        "no crash in the chaotic model:\n{metrics}"
    );
    eprintln!(
        "answered {}, the chaotic model's failures: {}",
        answered.into_inner(),
        failed.len()
    );
}
