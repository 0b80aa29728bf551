//! One service, several models (`[[models]]`): each served under its name
//! on every route, each reloaded on its own, and together within the
//! machine's memory.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Service, stub_config};
use crate::OutputWithin;

/// The stub at 8 dimensions by default, and `wide` beside it at
/// `dimension`; `more` appended (TOML).
fn two_models(dimension: usize, more: &str) -> String {
    stub_config(
        "wasm",
        "dimension = \"8\"",
        &format!(
            "[[models]]\nname = \"wide\"\n[models.plugin.config]\ndimension = \"{dimension}\"\n[models.supervisor]\npool_size = 1\n{more}"
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
        "[plugin]\npath = \"builtin:stub\"\n{pools}[[models]]\nname = \"second\"\n[models.plugin.config]\ndimension = \"16\"\n"
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

#[test]
fn both_real_models_serve_at_once_and_crashes_in_one_fail_no_request_of_the_other() {
    // Both models in the setup's store, fetched before the service reads it.
    let store = crate::onnx::deps().join("models");
    crate::onnx::real_model();
    crate::onnx::store_model("paraphrase-minilm-l3-v2");
    // The default model, all-MiniLM-L6-v2, and paraphrase-MiniLM-L3-v2 whose
    // children abort on 2% of their calls (seeded), under the shipped
    // supervision policy.
    let config = format!(
        "backend = \"native\"\n[native]\nexecutable = \"{exe}\"\nthreads = 1\n[index]\ndir = \"index\"\n\
         [[models]]\n[models.model]\nid = \"paraphrase-minilm-l3-v2\"\n\
         [models.plugin.config]\n\"child.chaos\" = \"0.02\"\n\"child.chaos_kinds\" = \"abort\"\n\"child.chaos_seed\" = \"7\"\n",
        exe = env!("CARGO_BIN_EXE_embedhost"),
    );
    let dir = tempfile::tempdir().unwrap().keep();
    let envs = [
        ("EMBEDHOST_MODELS_DIR", store.as_os_str()),
        ("EMBEDHOST_OFFLINE", std::ffi::OsStr::new("1")),
    ];
    let s = Service::start_with(&dir, &config, &[], &envs);
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
