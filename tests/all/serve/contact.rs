//! First contact (issue 27): the README's examples run as written, every
//! error is JSON in its API's shape, the key check speaks RFC 9110, and
//! what TEI's and OpenAI's clients send is honoured or refused by name.

use crate::OutputWithin;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Service, stub_config};

/// The README's section on the service.
fn readme_service_section() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("## The service").unwrap();
    let end = start + readme[start..].find("\n## ").unwrap();
    readme[start..end].to_string()
}

/// The fenced blocks of `lang` in `text`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    text.split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn the_readme_examples_work_as_written() {
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    let section = readme_service_section();
    let host = s.url.trim_start_matches("http://").to_string();
    // Every curl command of the examples, its continuation lines joined,
    // with the service's port for 8080.
    let shell = blocks(&section, "sh").join("\n").replace("\\\n", " ");
    let curls: Vec<&str> = shell
        .lines()
        .filter(|l| l.trim_start().starts_with("curl"))
        .collect();
    assert!(curls.len() >= 3, "{shell}");
    for curl in curls {
        let command = curl
            .replace("localhost:8080", &host)
            .replace("127.0.0.1:8080", &host);
        let out = Command::new("sh")
            .args(["-c", &command])
            .output_within(crate::PROCESS_LIMIT)
            .unwrap();
        assert!(out.status.success(), "{command}: {out:?}");
        let answer: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{command}: {e}: {out:?}"));
        assert!(answer.get("error").is_none(), "{command}: {answer}");
    }
    let python = embedhost::deps::python().expect("run ./x setup: the venv's python is missing");
    for script in blocks(&section, "python") {
        let script = script.replace("http://127.0.0.1:8080", &s.url)
            + "\nassert len(vectors) == 1 and len(vectors[0].embedding) == 384\n";
        let out = Command::new(&python)
            .args(["-c", &script])
            .output_within(crate::PROCESS_LIMIT)
            .unwrap();
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

#[test]
fn every_error_is_json_in_its_apis_shape_with_a_code() {
    let key = "a-long-enough-test-key";
    let s = Service::start(&stub_config("wasm", "", ""), &["--api-key", key]);
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    // 404 and 405, in the shape of the path's API.
    let (status, e) = s.call("GET", "/no/such/route", None, &auth);
    assert_eq!(status, 404);
    assert!(
        e["error"].as_str().unwrap().contains("/no/such/route"),
        "{e}"
    );
    assert_eq!(e["error_type"], "Validation");
    let (status, e) = s.call("GET", "/v1/nothing", None, &auth);
    assert_eq!(
        (status, &e["error"]["code"]),
        (404, &json!("not_found")),
        "{e}"
    );
    let (status, e) = s.call("GET", "/v1/embeddings", None, &auth);
    assert_eq!(
        (status, &e["error"]["code"]),
        (405, &json!("method_not_allowed")),
        "{e}"
    );
    let (status, e) = s.call("POST", "/v1/embeddings", Some("{".into()), &auth);
    assert_eq!(
        (status, &e["error"]["code"]),
        (400, &json!("invalid_request"))
    );
    // 401 says how to authenticate; the scheme is case-insensitive.
    let response = agent()
        .post(format!("{}/v1/embeddings", s.url))
        .header("content-type", "application/json")
        .send(r#"{"input":"hello"}"#)
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let lower = format!("bearer {key}");
    let (status, e) = s.call(
        "POST",
        "/v1/embeddings",
        Some(r#"{"input":"hello"}"#.into()),
        &[("authorization", &lower)],
    );
    assert_eq!(status, 200, "{e}");
    let (status, e) = s.call("GET", "/v1/models", None, &[]);
    assert_eq!(
        (status, &e["error"]["code"]),
        (401, &json!("invalid_api_key"))
    );
}

#[test]
fn models_answer_to_their_full_names_and_tei_fields_are_honoured_or_refused() {
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    // The configured model's Hugging Face name, as the README asks for it.
    let full = "sentence-transformers/all-MiniLM-L6-v2";
    let (status, e) = s.post("/v1/embeddings", &json!({ "input": "hi", "model": full }));
    assert_eq!(status, 200, "{e}");
    let (status, model) = s.get(&format!("/v1/models/{full}"));
    assert_eq!((status, &model["id"]), (200, &json!(full)), "{model}");
    let (status, model) = s.get("/v1/models/embedhost/stub-feature-hash");
    assert_eq!(status, 200, "{model}");
    let (status, e) = s.get("/v1/models/text-embedding-3-small");
    assert_eq!(
        (status, &e["error"]["code"]),
        (404, &json!("model_not_found")),
        "{e}"
    );
    // /info states the precision the stub runs in.
    assert_eq!(s.get("/info").1["model_dtype"], "float32");
    // TEI: what cannot be honoured is refused, naming the field.
    for (body, field) in [
        (json!({ "inputs": "a", "normalize": false }), "normalize"),
        (
            json!({ "inputs": "a", "truncation_direction": "Left" }),
            "truncation_direction",
        ),
        (
            json!({ "inputs": "a", "prompt_name": "query" }),
            "prompt_name",
        ),
    ] {
        let (status, e) = s.post("/embed", &body);
        assert_eq!(status, 400, "{body}: {e}");
        assert!(
            e["error"].as_str().unwrap().contains(&format!("`{field}")),
            "{e}"
        );
    }
    let (status, _) = s.post(
        "/embed",
        &json!({ "inputs": "a", "normalize": true, "truncation_direction": "Right" }),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_deadline_error_says_how_long_the_request_had() {
    let s = Service::start(
        &stub_config("wasm", "\"fault.sleep_ms\" = \"3000\"", ""),
        &[],
    );
    let (status, e) = s.call(
        "POST",
        "/v1/embeddings",
        Some(json!({ "input": "slow" }).to_string()),
        &[("x-embedhost-deadline-ms", "300")],
    );
    assert_eq!(status, 504, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("300 ms"), "{message}");
    assert_eq!(e["error"]["code"], "deadline_exceeded");
}

#[test]
fn tokenize_and_decode_answer_in_teis_shape() {
    // The stub has no vocabulary: 501, said in TEI's shape.
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    let (status, e) = s.post("/tokenize", &json!({ "inputs": "hello" }));
    assert_eq!(status, 501, "{e}");
    assert!(e["error"].as_str().unwrap().contains("tokenizer"), "{e}");
    drop(s);
    // A real tokenizer (the tiny BERT the ONNX tests build).
    let (root, _) = crate::onnx::tiny_model(8);
    let config = "backend = \"native\"\n[native]\nengine = \"onnx\"\n[model]\ndir = \"tiny-bert\"\n[index]\ndir = \"index\"\n[supervisor]\npool_size = 1\n";
    let s = Service::start_in(root.path(), config, &[]);
    let (status, tokens) = s.post("/tokenize", &json!({ "inputs": ["Hello cats", "world"] }));
    assert_eq!(status, 200, "{tokens}");
    let first = tokens[0].as_array().unwrap();
    let ids: Vec<u64> = first.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 4, 6, 2], "{tokens}");
    assert_eq!(first[0]["special"], true);
    assert_eq!(first[0]["start"], Value::Null);
    assert_eq!(
        (&first[2]["text"], &first[2]["start"], &first[2]["stop"]),
        (&json!("cats"), &json!(6), &json!(10))
    );
    assert_eq!(tokens[1].as_array().unwrap().len(), 3);
    let (_, bare) = s.post(
        "/tokenize",
        &json!({ "inputs": "hello", "add_special_tokens": false }),
    );
    assert_eq!(bare[0].as_array().unwrap().len(), 1, "{bare}");
    let (status, texts) = s.post("/decode", &json!({ "ids": [4, 6] }));
    assert_eq!((status, texts), (200, json!(["hello cats"])));
    let (status, texts) = s.post("/decode", &json!({ "ids": [[4], [5, 7]] }));
    assert_eq!((status, texts), (200, json!(["hello", "world dogs"])));
    let (status, e) = s.post("/decode", &json!({ "ids": "hello" }));
    assert!(
        status == 400 && e["error"].as_str().unwrap().contains("`ids`"),
        "{e}"
    );
}
