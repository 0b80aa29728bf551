//! Every entrance of the service goes through the front door
//! (`embedder::Embedder`), which counts its jobs and the texts it
//! tokenized in `/metrics`; the tokenizer counts its own calls. A reload
//! to another model never changes the model a request is answered by.

use super::{Service, metric, stub_config};
use serde_json::json;
use std::time::{Duration, Instant};

/// The front door's jobs, the texts it tokenized, and the tokenizer's
/// calls, as `/metrics` shows them now.
fn counts(s: &Service) -> [f64; 3] {
    let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
    [
        metric(&metrics, "front_door_jobs_total"),
        metric(&metrics, "front_door_texts_tokenized_total"),
        metric(&metrics, "tokenizer_calls_total"),
    ]
}

/// What changed in `counts` while `f` ran.
fn during(s: &Service, f: impl FnOnce()) -> [f64; 3] {
    let before = counts(s);
    f();
    let after = counts(s);
    [0, 1, 2].map(|i| after[i] - before[i])
}

#[test]
fn every_entrance_goes_through_the_front_door_and_a_text_is_tokenized_once() {
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    let ok = |(status, body): (u16, serde_json::Value)| assert_eq!(status, 200, "{body}");
    // OpenAI's route: one job, each of its texts tokenized once, by the
    // front door and by nothing else.
    let d = during(&s, || {
        ok(s.post(
            "/v1/embeddings",
            &json!({ "input": ["two words", "three more words"] }),
        ))
    });
    assert_eq!(d, [1.0, 2.0, 2.0], "/v1/embeddings");
    // TEI's.
    let d = during(&s, || ok(s.post("/embed", &json!({ "inputs": "hello" }))));
    assert_eq!(d, [1.0, 1.0, 1.0], "/embed");
    // The CLI, through the owner's socket.
    let d = during(&s, || {
        let out = s.cli(&["embed", "one", "two"]);
        assert!(out.status.success(), "{out:?}");
    });
    assert_eq!(d, [1.0, 2.0, 2.0], "embedhost embed");
    // The worker inside the service: its chunks come counted, so indexing
    // tokenizes each file once (to cut it) and no chunk again.
    let docs = s.dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..3 {
        let lines: Vec<String> = (0..70)
            .map(|j| format!("note {i} line {j} says the tyre is flat again today."))
            .collect();
        std::fs::write(docs.join(format!("{i}.txt")), lines.join("\n")).unwrap();
    }
    let d = during(&s, || {
        let out = s.cli(&["index", "docs"]);
        assert!(out.status.success(), "{out:?}");
        let until = Instant::now() + Duration::from_secs(120);
        while s.get("/stats").1["indexed"] != 3 {
            assert!(
                Instant::now() < until,
                "never indexed: {}",
                s.get("/stats").1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(d[0] >= 1.0, "the worker went around the front door: {d:?}");
    assert_eq!(d[1], 0.0, "chunks were tokenized again: {d:?}");
    assert_eq!(d[2], 3.0, "each file is tokenized once, to cut it: {d:?}");
    // A search: the query is one text, tokenized once.
    let d = during(&s, || {
        ok(s.post("/search", &json!({ "query": "flat tyre", "limit": 3 })))
    });
    assert_eq!(d, [1.0, 1.0, 1.0], "/search");
}

#[test]
fn a_request_in_flight_across_a_reload_to_another_model_is_answered_by_the_model_it_started_on() {
    // Calls of 1.5 s, so the request is being embedded when the reload
    // to a model of 16 dimensions comes.
    let slow = "\"fault.sleep_ms\" = \"1500\"";
    let dir = tempfile::tempdir().unwrap().keep();
    let s = Service::start_in(&dir, &stub_config("wasm", slow, ""), &[]);
    let before = s.post("/v1/embeddings", &json!({ "input": "warm" }));
    assert_eq!(
        before.1["data"][0]["embedding"].as_array().unwrap().len(),
        384
    );
    std::thread::scope(|scope| {
        let request = scope.spawn(|| s.post("/v1/embeddings", &json!({ "input": "in flight" })));
        // Until the request holds its admission slot (it is past its
        // checks, in the batcher or the pool).
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
            if metric(&metrics, "http_requests_admitted") >= 1.0 {
                break;
            }
            assert!(Instant::now() < until, "the request never came in");
            std::thread::sleep(Duration::from_millis(5));
        }
        let other = stub_config("wasm", &format!("{slow}\ndimension = \"16\""), "");
        std::fs::write(dir.join("embedhost.toml"), other).unwrap();
        s.signal(libc::SIGHUP);
        let (status, answer) = request.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        let dimension = answer["data"][0]["embedding"].as_array().unwrap().len();
        assert_eq!(dimension, 384, "answered by the new model");
    });
    // Once the new generation is in, requests are answered by it.
    let until = Instant::now() + Duration::from_secs(120);
    while s.get("/info").1["generation"] != 2 {
        assert!(Instant::now() < until, "no reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = s.post("/v1/embeddings", &json!({ "input": "after" }));
    assert_eq!(
        after.1["data"][0]["embedding"].as_array().unwrap().len(),
        16
    );
}
