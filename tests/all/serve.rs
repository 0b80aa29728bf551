//! `embedhost serve`, started as a user starts it, called over HTTP on a
//! free loopback port: every route, bad input, the API key, load with
//! crashes, a backend swap by SIGHUP under load, and SIGTERM's drain.

use crate::OutputWithin;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod contact;
mod front;
mod limits;
mod models;

/// How long a service may take to become ready (compiling the stub is
/// cached; a native pool starts two children).
const READY_WITHIN: Duration = Duration::from_secs(120);

/// A running `embedhost serve`, killed if a test fails before stopping it.
pub struct Service {
    child: Option<Child>,
    stdout: Option<BufReader<std::process::ChildStdout>>,
    pub url: String,
    pub dir: PathBuf,
    agent: ureq::Agent,
}

/// A service a test is done with stops as people stop it, by SIGTERM (so
/// an instrumented build writes its coverage profile, which SIGKILL would
/// lose); one that has not exited after [`STOP_WITHIN`] is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + STOP_WITHIN;
            while Instant::now() < until {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The config of the tests' services: the stub in WASM or native, the
/// shipped supervision policy, `extra` appended.
pub fn stub_config(backend: &str, plugin_config: &str, extra: &str) -> String {
    format!(
        r#"
backend = "{backend}"
[plugin]
path = "builtin:stub"
[plugin.config]
{plugin_config}
[native]
engine = "stub"
executable = "{exe}"
[index]
dir = "index"
[supervisor]
pool_size = 2
{extra}
"#,
        exe = env!("CARGO_BIN_EXE_embedhost"),
    )
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

impl Service {
    /// Writes `config` into a new directory and starts `serve` there on a
    /// free port, with `args` added; waits until `/ready` says 200.
    pub fn start(config: &str, args: &[&str]) -> Service {
        let dir = tempfile::tempdir().unwrap().keep();
        Self::start_in(&dir, config, args)
    }

    pub fn start_in(dir: &Path, config: &str, args: &[&str]) -> Service {
        Self::start_with(dir, config, args, &[])
    }

    /// [`Service::start_in`] with `envs` set for the service.
    pub fn start_with(
        dir: &Path,
        config: &str,
        args: &[&str],
        envs: &[(&str, &std::ffi::OsStr)],
    ) -> Service {
        std::fs::write(dir.join("embedhost.toml"), config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .current_dir(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
            .env_remove("RUST_LOG")
            .env_remove("EMBEDHOST_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start embedhost serve");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The address line is waited for within READY_WITHIN: a service that
        // hangs before printing it is killed, and the read ends.
        let (printed, watchdog) = std::sync::mpsc::channel::<()>();
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            if watchdog.recv_timeout(READY_WITHIN).is_err() {
                // SAFETY: kill(2) of the test's own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        stdout.read_line(&mut line).unwrap();
        let _ = printed.send(());
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in `{line}`"))
            .to_string();
        let service = Service {
            child: Some(child),
            stdout: Some(stdout),
            url,
            dir: dir.to_path_buf(),
            agent: agent(),
        };
        // With a key, the readiness probe must carry it (only /health is open).
        let key = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| format!("Bearer {}", args[i + 1]));
        let auth: Vec<(&str, &str)> = key.iter().map(|k| ("authorization", k.as_str())).collect();
        let until = Instant::now() + READY_WITHIN;
        while service.call("GET", "/ready", None, &auth).0 != 200 {
            assert!(Instant::now() < until, "the service never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(body.to_string()), &[])
    }

    /// A request with raw body and headers; the status and the body as
    /// JSON (or as a string if it is not JSON).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let (status, text, _) = self.raw(method, path, body, headers);
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// The status, the body and the `Retry-After` header.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, String, Option<String>) {
        let url = format!("{}{path}", self.url);
        let mut response = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.send(body.unwrap_or_default())
            }
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response
            .body_mut()
            .with_config()
            .limit(512 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_default();
        (status, text, retry)
    }

    /// Sends `signal` to the service.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits for the process to exit within `within`; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let until = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < until,
                "the service did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the service printed on stdout after its first line (read to
    /// the end: call after it exited).
    pub fn rest_of_stdout(&mut self) -> String {
        let mut rest = String::new();
        if let Some(mut out) = self.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        }
        rest
    }

    /// `embedhost ARGS` run in the service's directory (same config, same
    /// index), as a user would beside a running service.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_embedhost"))
            .current_dir(&self.dir)
            .args(args)
            .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
            .env_remove("RUST_LOG")
            .output_within(crate::PROCESS_LIMIT)
            .unwrap()
    }
}

/// The vectors of an OpenAI-shaped answer, by index.
fn openai_vectors(body: &Value) -> Vec<Vec<f32>> {
    let data = body["data"].as_array().unwrap_or_else(|| panic!("{body}"));
    let mut rows: Vec<(u64, Vec<f32>)> = data
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().unwrap(),
                serde_json::from_value(d["embedding"].clone()).unwrap(),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

/// What `embedhost embed` prints for `texts`, with the service's config
/// but no service running (its own pool).
fn embed_alone(dir: &Path, texts: &[&str]) -> Vec<Vec<f32>> {
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .current_dir(dir)
        .arg("embed")
        .args(texts)
        .env("EMBEDHOST_CACHE_DIR", crate::test_cache_dir())
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::cli::vectors(&out).into_iter().map(|r| r.1).collect()
}

#[test]
fn every_route_answers_and_refuses_bad_input_with_the_right_status() {
    let dir = tempfile::tempdir().unwrap().keep();
    let docs = dir.join("docs");
    std::fs::create_dir_all(docs.join("notes")).unwrap();
    std::fs::write(
        docs.join("notes/rust.txt"),
        "ownership and borrowing in rust",
    )
    .unwrap();
    std::fs::write(
        docs.join("fox.txt"),
        "the quick brown fox jumps over the lazy dog",
    )
    .unwrap();
    let config = stub_config(
        "wasm",
        "",
        "[serve]\nindex_roots = [\"docs\"]\nmax_inputs = 8\nmax_body_kb = 16\n",
    );
    std::fs::write(dir.join("embedhost.toml"), &config).unwrap();
    let texts = ["hello world", "a second text"];
    let expected = embed_alone(&dir, &texts);
    let s = Service::start_in(&dir, &config, &[]);

    assert_eq!(s.get("/health"), (200, json!({ "status": "ok" })));
    let (status, ready) = s.get("/ready");
    assert_eq!((status, &ready["backend"]), (200, &json!("wasm")));
    let (status, info) = s.get("/info");
    assert_eq!(status, 200);
    assert_eq!(info["model_id"], "embedhost/stub-feature-hash");
    assert_eq!(info["dimension"], 384);
    assert_eq!(info["backend"], "wasm");
    assert_eq!(info["max_client_batch_size"], 8);
    assert!(info["version"].is_string() && info["max_input_length"].is_u64());
    let (status, models) = s.get("/v1/models");
    assert_eq!((status, &models["data"][0]["id"]), (200, &info["model_id"]));

    // OpenAI: the same vectors as `embedhost embed`, as floats and base64.
    let (status, body) = s.post(
        "/v1/embeddings",
        &json!({ "input": texts, "model": "embedhost/stub-feature-hash" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(openai_vectors(&body), expected);
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "embedhost/stub-feature-hash");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 5);
    let (_, one) = s.post("/v1/embeddings", &json!({ "input": "hello world" }));
    assert_eq!(openai_vectors(&one), expected[..1]);
    let (status, b64) = s.post(
        "/v1/embeddings",
        &json!({ "input": texts, "encoding_format": "base64" }),
    );
    assert_eq!(status, 200);
    use base64::Engine as _;
    let decoded: Vec<Vec<f32>> = b64["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["embedding"].as_str().unwrap())
                .unwrap()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
        .collect();
    assert_eq!(decoded, expected);

    // TEI.
    let (status, tei) = s.post("/embed", &json!({ "inputs": texts }));
    assert_eq!(status, 200);
    let tei: Vec<Vec<f32>> = serde_json::from_value(tei).unwrap();
    assert_eq!(tei, expected);
    let (status, single) = s.post(
        "/embed",
        &json!({ "inputs": "hello world", "normalize": true, "truncate": true }),
    );
    assert_eq!(status, 200);
    assert_eq!(single[0].as_array().unwrap().len(), 384);

    // Refusals: status, shape, and the field named.
    let refused = |path: &str, body: Option<String>, headers: &[(&str, &str)]| {
        s.call("POST", path, body, headers)
    };
    let (status, e) = refused("/v1/embeddings", Some("{not json".into()), &[]);
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (status, e) = s.post("/v1/embeddings", &json!({ "input": 42 }));
    assert_eq!((status, &e["error"]["param"]), (400, &json!("input")));
    assert!(
        e["error"]["message"].as_str().unwrap().contains("`input`"),
        "{e}"
    );
    let (status, e) = s.post("/v1/embeddings", &json!({ "input": [1, 2, 3] }));
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token arrays"),
        "{e}"
    );
    let (status, e) = s.post("/v1/embeddings", &json!({ "model": "x" }));
    assert_eq!((status, &e["error"]["param"]), (400, &json!("input")));
    let (status, e) = s.post(
        "/v1/embeddings",
        &json!({ "input": "a", "model": "text-embedding-3-small" }),
    );
    assert_eq!((status, &e["error"]["param"]), (404, &json!("model")));
    let (status, e) = s.post(
        "/v1/embeddings",
        &json!({ "input": "a", "dimensions": 256 }),
    );
    assert_eq!((status, &e["error"]["param"]), (400, &json!("dimensions")));
    assert!(
        e["error"]["message"].as_str().unwrap().contains("384"),
        "{e}"
    );
    let (status, _) = s.post(
        "/v1/embeddings",
        &json!({ "input": "a", "dimensions": 384 }),
    );
    assert_eq!(status, 200);
    let (status, e) = s.post(
        "/v1/embeddings",
        &json!({ "input": "a", "encoding_format": "int8" }),
    );
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("encoding_format"))
    );
    let (status, e) = s.post("/v1/embeddings", &json!({ "input": ["a", ""] }));
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("input[1]"),
        "{e}"
    );
    let nine: Vec<String> = (0..9).map(|i| format!("text {i}")).collect();
    // TEI answers its validation errors (sizes and counts) with 413.
    let (status, e) = s.post("/embed", &json!({ "inputs": nine }));
    assert_eq!(status, 413);
    assert!(e["error"].as_str().unwrap().contains("max_inputs"), "{e}");
    assert_eq!(e["error_type"], "Validation");
    let (status, e) = s.post("/embed", &json!({ "inputs": "x".repeat(20_000) }));
    assert_eq!(status, 413, "{e}");
    // The stub reads at most 256 tokens (words, here): TEI's
    // `truncate: false` refuses longer inputs, naming the limit.
    let long = vec!["word"; 300].join(" ");
    let (status, e) = s.post("/embed", &json!({ "inputs": long, "truncate": false }));
    assert_eq!(status, 413);
    assert!(e["error"].as_str().unwrap().contains("at most 256"), "{e}");
    let (status, _) = s.post("/embed", &json!({ "inputs": long, "truncate": true }));
    assert_eq!(status, 200);
    let (status, e) = s.post("/embed", &json!({ "inputs": "a", "normalize": "yes" }));
    assert!(
        status == 400 && e["error"].as_str().unwrap().contains("`normalize`"),
        "{e}"
    );
    let (status, e) = refused(
        "/embed",
        Some(r#"{"inputs":"a"}"#.into()),
        &[("x-embedhost-deadline-ms", "soon")],
    );
    assert!(
        status == 400
            && e["error"]
                .as_str()
                .unwrap()
                .contains("x-embedhost-deadline-ms"),
        "{e}"
    );
    let (status, _) = refused(
        "/embed",
        Some(r#"{"inputs":"a"}"#.into()),
        &[("x-embedhost-deadline-ms", "5000")],
    );
    assert_eq!(status, 200);
    let (status, _) = s.get("/no/such/route");
    assert_eq!(status, 404);

    // The worker: index under the allowed root, not elsewhere.
    let (status, e) = s.post("/index", &json!({ "paths": ["/etc"] }));
    assert_eq!(status, 403);
    assert!(e["error"].as_str().unwrap().contains("index_roots"), "{e}");
    // A symlink inside the root pointing out of it is refused too.
    std::os::unix::fs::symlink("/etc", docs.join("escape")).unwrap();
    let (status, _) = s.post("/index", &json!({ "paths": [docs.join("escape")] }));
    assert_eq!(status, 403);
    std::fs::remove_file(docs.join("escape")).unwrap();
    // Outside the roots, a missing path gets the same 403 as an existing
    // one (tests/all/privacy.rs); inside them, it is named as missing.
    let (status, e) = s.post("/index", &json!({ "paths": [dir.join("missing")] }));
    assert_eq!(status, 403, "{e}");
    let (status, e) = s.post("/index", &json!({ "paths": [docs.join("missing")] }));
    assert!(
        status == 400 && e["error"].as_str().unwrap().contains("missing"),
        "{e}"
    );
    let (status, job) = s.post("/index", &json!({ "paths": [docs.to_str().unwrap()] }));
    assert_eq!(status, 202, "{job}");
    let until = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let (status, p) = s.get("/index");
        assert_eq!(status, 200);
        if p["jobs"][0]["state"] == "queued" && p["queued"] == 0 && p["processing"] == 0 {
            break p;
        }
        assert!(Instant::now() < until, "{p}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(progress["indexed"], 2, "{progress}");
    let (status, results) = s.post(
        "/search",
        &json!({ "query": "borrowing in rust", "limit": 1 }),
    );
    assert_eq!(status, 200);
    assert_eq!(results.as_array().unwrap().len(), 1);
    assert!(
        results[0]["path"].as_str().unwrap().ends_with("rust.txt"),
        "{results}"
    );
    assert!(results[0]["start_line"].is_u64() && results[0]["score"].is_f64());
    let (status, e) = s.post("/search", &json!({ "limit": 1 }));
    assert!(
        status == 400 && e["error"].as_str().unwrap().contains("`query`"),
        "{e}"
    );
    let (status, e) = s.post("/search", &json!({ "query": "x", "limit": 100000 }));
    assert!(
        status == 400 && e["error"].as_str().unwrap().contains("`limit`"),
        "{e}"
    );
    let (status, stats) = s.get("/stats");
    assert_eq!(
        (status, &stats["indexed"], &stats["chunks"]),
        (200, &json!(2), &json!(2))
    );

    // The CLI beside the service sends its work there (and says so with -v).
    let out = s.cli(&["-v", "search", "--json", "borrowing in rust"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("using the running service"));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli[0]["path"], results[0]["path"]);
    let out = s.cli(&["-v", "embed", "hello world", "a second text"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("using the running service"));
    let via: Vec<Vec<f32>> = crate::cli::vectors(&out).into_iter().map(|r| r.1).collect();
    assert_eq!(via, expected);
    std::fs::write(docs.join("new.txt"), "a file added later").unwrap();
    let out = s.cli(&["-v", "index", "docs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("by the running service"));
    let stats = s.get("/stats").1;
    assert_eq!(stats["indexed"], 3);
    let real = docs.canonicalize().unwrap();
    assert_eq!(stats["roots"][0]["path"], real.to_str().unwrap(), "{stats}");
    // `forget` beside the service goes through it, so its in-memory index
    // drops the chunks too: the search no longer finds them.
    let (status, e) = s.post("/forget", &json!({ "path": "/etc" }));
    assert_eq!(status, 403, "{e}");
    let (status, e) = s.post("/forget", &json!({ "path": docs.join("nothing-here") }));
    assert!(
        status == 404 && e["error"].as_str().unwrap().contains("nothing is indexed"),
        "{e}"
    );
    let out = s.cli(&["-v", "forget", "docs/notes/rust.txt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("using the running service"));
    let (_, results) = s.post(
        "/search",
        &json!({ "query": "borrowing in rust", "limit": 10 }),
    );
    assert!(
        results
            .as_array()
            .unwrap()
            .iter()
            .all(|r| !r["path"].as_str().unwrap().ends_with("rust.txt")),
        "{results}"
    );
    assert_eq!(s.get("/stats").1["indexed"], 2);

    // Metrics: requests by route and status, batches, latency.
    let (status, text, _) = s.raw("GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    for needle in [
        "http_requests_total{route=\"/v1/embeddings\",status=\"200\"}",
        "http_requests_total{route=\"/embed\",status=\"400\"}",
        "http_request_duration_seconds_bucket{route=\"/embed\"",
        "embed_batch_size_bucket",
        "embed_batch_tokens_bucket",
        "embed_queue_depth",
        "instance_memory_bytes{slot=\"0\",model=",
    ] {
        assert!(text.contains(needle), "no {needle} in\n{text}");
    }
}

#[test]
fn the_openai_python_client_gets_the_same_vectors_as_embed() {
    let python = embedhost::deps::python().expect("run ./x setup: the venv's python is missing");
    let dir = tempfile::tempdir().unwrap().keep();
    let config = stub_config("wasm", "", "");
    std::fs::write(dir.join("embedhost.toml"), &config).unwrap();
    let texts = ["The official client, unchanged.", "A second sentence."];
    let expected = embed_alone(&dir, &texts);
    let s = Service::start_in(&dir, &config, &[]);
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
texts = json.loads(sys.argv[2])
floats = client.embeddings.create(model="embedhost/stub-feature-hash", input=texts, encoding_format="float")
default = client.embeddings.create(model="embedhost/stub-feature-hash", input=texts)
print(json.dumps({
    "float": [d.embedding for d in floats.data],
    "default": [list(map(float, d.embedding)) for d in default.data],
    "model": floats.model,
    "tokens": floats.usage.prompt_tokens,
}))
"#;
    let out = Command::new(&python)
        .args([
            "-c",
            script,
            &s.url,
            &serde_json::to_string(&texts).unwrap(),
        ])
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["float", "default"] {
        let got: Vec<Vec<f32>> = serde_json::from_value(answer[key].clone()).unwrap();
        assert_eq!(got, expected, "{key}");
    }
    assert_eq!(answer["model"], "embedhost/stub-feature-hash");
    assert!(answer["tokens"].as_u64().unwrap() > 0);
}

#[test]
fn off_loopback_needs_a_key_and_requests_without_it_get_401() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("embedhost.toml"),
        stub_config("wasm", "", ""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .current_dir(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("EMBEDHOST_API_KEY")
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("API key"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_embedhost"))
        .current_dir(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0", "--api-key", "short"])
        .output_within(crate::PROCESS_LIMIT)
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));

    let key = "a-long-enough-test-key";
    let s = Service::start(&stub_config("wasm", "", ""), &["--api-key", key]);
    assert_eq!(s.get("/health").0, 200);
    let body = Some(r#"{"input":"hello"}"#.to_string());
    let (status, e) = s.call("POST", "/v1/embeddings", body.clone(), &[]);
    assert_eq!(status, 401);
    assert_eq!(e["error"]["type"], "authentication_error");
    let wrong = format!("Bearer {key}x");
    assert_eq!(
        s.call(
            "POST",
            "/v1/embeddings",
            body.clone(),
            &[("authorization", &wrong)]
        )
        .0,
        401
    );
    assert_eq!(s.call("GET", "/info", None, &[]).0, 401);
    assert_eq!(s.call("GET", "/metrics", None, &[]).0, 401);
    let right = format!("Bearer {key}");
    assert_eq!(
        s.call("POST", "/v1/embeddings", body, &[("authorization", &right)])
            .0,
        200
    );
    assert_eq!(
        s.call("GET", "/ready", None, &[("authorization", &right)])
            .0,
        200
    );
}

/// `clients` threads each sending `requests` one-sentence requests to
/// `/v1/embeddings` until done (or until `stop` is set); every answer's
/// vector, by text, and the failures.
fn load(
    s: &Service,
    clients: usize,
    requests: usize,
    stop: Option<Arc<AtomicBool>>,
) -> (Vec<(String, Vec<f32>)>, Vec<String>) {
    let answers = std::sync::Mutex::new(Vec::new());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for c in 0..clients {
            let (answers, failures, stop) = (&answers, &failures, stop.clone());
            let agent = agent();
            let url = format!("{}/v1/embeddings", s.url);
            scope.spawn(move || {
                for r in 0.. {
                    let done = match &stop {
                        Some(stop) => stop.load(Ordering::SeqCst),
                        None => r >= requests,
                    };
                    if done {
                        break;
                    }
                    let text = format!(
                        "client {c} asks question number {r} about topic {}",
                        (c * 31 + r) % 97
                    );
                    let body = json!({ "input": text }).to_string();
                    match agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body)
                    {
                        Ok(mut response) if response.status() == 200 => {
                            let v: Value = serde_json::from_str(
                                &response.body_mut().read_to_string().unwrap(),
                            )
                            .unwrap();
                            answers
                                .lock()
                                .unwrap()
                                .push((text, openai_vectors(&v).remove(0)));
                        }
                        Ok(mut response) => failures.lock().unwrap().push(format!(
                            "{}: {}",
                            response.status(),
                            response.body_mut().read_to_string().unwrap_or_default()
                        )),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        }
    });
    (
        answers.into_inner().unwrap(),
        failures.into_inner().unwrap(),
    )
}

/// The clean vectors of `texts`, from a service without faults, in
/// requests of the largest size allowed.
fn clean_vectors(texts: &[String]) -> std::collections::HashMap<String, Vec<f32>> {
    let s = Service::start(&stub_config("wasm", "", ""), &[]);
    let mut out = std::collections::HashMap::new();
    for part in texts.chunks(1000) {
        let (status, body) = s.post("/v1/embeddings", &json!({ "input": part }));
        assert_eq!(status, 200);
        for (t, v) in part.iter().zip(openai_vectors(&body)) {
            out.insert(t.clone(), v);
        }
    }
    out
}

pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn load_with_random_plugin_crashes_fails_no_request_and_changes_no_vector() {
    // 2% of calls trap, under the shipped supervision policy.
    let config = stub_config(
        "wasm",
        "\"fault.chaos\" = \"0.02\"\n\"fault.chaos_kinds\" = \"trap\"",
        "",
    );
    let s = Service::start(&config, &[]);
    let (answers, failures) = load(&s, 64, 50, None);
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(answers.len(), 64 * 50);
    let texts: Vec<String> = answers.iter().map(|a| a.0.clone()).collect();
    let clean = clean_vectors(&texts);
    for (text, vector) in &answers {
        assert_eq!(&clean[text], vector, "{text}");
    }
    let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
    let restarts = metric(&metrics, "restarts_total{");
    assert!(restarts > 0.0, "no restarts in\n{metrics}");
    // Batching did its work: far fewer batches than requests.
    let batches = metric(&metrics, "embed_batch_size_count");
    assert!(
        batches > 0.0 && batches < (64 * 50) as f64 / 2.0,
        "{batches} batches"
    );
}

#[test]
fn sighup_swaps_native_wasm_native_under_load_failing_nothing() {
    // The load test's load: 64 clients, 2% of calls crashing, on each backend.
    const CHAOS: &str = "\"fault.chaos\" = \"0.02\"\n\"fault.chaos_kinds\" = \"trap\"";
    let dir = tempfile::tempdir().unwrap().keep();
    let s = Service::start_in(&dir, &stub_config("native", CHAOS, ""), &[]);
    assert_eq!(s.get("/info").1["backend"], "native");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = AtomicUsize::new(0);
    let (answers, failures) = std::thread::scope(|scope| {
        let stop2 = stop.clone();
        let worker = scope.spawn(|| load(&s, 64, 0, Some(stop2)));
        for (backend, generation) in [("wasm", 2), ("native", 3)] {
            std::thread::sleep(Duration::from_millis(500));
            std::fs::write(dir.join("embedhost.toml"), stub_config(backend, CHAOS, "")).unwrap();
            s.signal(libc::SIGHUP);
            let until = Instant::now() + READY_WITHIN;
            loop {
                let (_, info) = s.get("/info");
                if info["generation"] == generation {
                    assert_eq!(info["backend"], backend, "{info}");
                    seen.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                assert!(Instant::now() < until, "no swap to {backend}: {info}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        worker.join().unwrap()
    });
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(answers.len() > 100, "only {} answers", answers.len());
    // Native and WASM stubs give the same vectors: no answer differs by
    // which pool served it.
    let texts: Vec<String> = answers.iter().map(|a| a.0.clone()).collect();
    let clean = clean_vectors(&texts);
    for (text, vector) in &answers {
        assert_eq!(&clean[text], vector, "{text}");
    }
}

/// The pids of `pid`'s child processes.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn sigterm_under_load_answers_every_accepted_request_and_leaves_no_child() {
    // Slow calls (50 ms each), so requests are in flight when SIGTERM comes.
    let config = stub_config(
        "native",
        "\"fault.sleep_ms\" = \"50\"",
        "[serve]\nshutdown_grace_ms = 10000\n",
    );
    let mut s = Service::start(&config, &[]);
    let kids = children(s.pid());
    assert_eq!(kids.len(), 2, "{kids:?}");
    let answered = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let refused = AtomicUsize::new(0);
    let status = std::thread::scope(|scope| {
        for c in 0..16 {
            let (answered, failed, refused, url) = (
                &answered,
                &failed,
                &refused,
                format!("{}/v1/embeddings", s.url),
            );
            scope.spawn(move || {
                let agent = agent();
                for r in 0..1000 {
                    let body = json!({ "input": format!("client {c} request {r}") }).to_string();
                    match agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body)
                    {
                        Ok(response) if response.status() == 200 => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(mut response) => failed.lock().unwrap().push(format!(
                            "{}: {}",
                            response.status(),
                            response.body_mut().read_to_string().unwrap_or_default()
                        )),
                        // Not accepted: the listener is closed.
                        Err(ureq::Error::Io(e))
                            if e.kind() == std::io::ErrorKind::ConnectionRefused =>
                        {
                            refused.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        // A kept-alive connection the server closed as it
                        // stopped, before reading this request (HTTP/1.1's
                        // race, which clients answer by sending again on a
                        // new connection). Whether the server dropped a
                        // request it had read is its own last line's to say.
                        Err(ureq::Error::Io(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::ConnectionAborted
                                    | std::io::ErrorKind::UnexpectedEof
                                    | std::io::ErrorKind::BrokenPipe
                            ) =>
                        {
                            refused.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => {
                            failed.lock().unwrap().push(e.to_string());
                            break;
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        s.signal(libc::SIGTERM);
        let started = Instant::now();
        let status = s.wait_exit(Duration::from_secs(10));
        (status, started.elapsed())
    });
    let (status, took) = status;
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let failed = failed.into_inner().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        answered.load(Ordering::SeqCst) > 16,
        "{}",
        answered.load(Ordering::SeqCst)
    );
    assert!(refused.load(Ordering::SeqCst) > 0);
    for kid in kids {
        assert!(!alive(kid), "child {kid} outlived the service");
    }
    // The service's own account: requests were running at the stop, all
    // were answered, none cut off.
    let last = s.rest_of_stdout();
    assert!(last.contains(" 0 cut off"), "{last}");
    let running: usize = last
        .split("; ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(running > 0, "no request was in flight at SIGTERM: {last}");
}

#[test]
fn a_poison_text_fails_only_itself_in_a_batch_shared_by_many_requests() {
    // A batch waits for more pieces only while every instance is busy, so
    // two long texts first occupy both instances (the stub's time grows with
    // its input); the seven requests below then queue behind them and share
    // batches however slowly the machine delivers them.
    let config = stub_config(
        "wasm",
        "\"fault.trap_marker\" = \"POISON\"\n\"fault.sleep_ms_per_kib\" = \"500\"",
        "[serve]\nbatch_wait_us = 300000\n",
    );
    let s = Service::start(&config, &[]);
    let (status, clean) = s.post("/embed", &json!({ "inputs": ["fine one", "fine two"] }));
    assert_eq!(status, 200);
    let texts_batched = || {
        let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
        metric(&metrics, "embed_batch_size_sum")
    };
    let batches = || {
        let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
        metric(&metrics, "embed_batch_size_count")
    };
    // One word (the stub counts words as tokens) of 4 KiB: 2 s of work.
    let long = "slow".repeat(1000);
    let results = std::thread::scope(|scope| {
        let mut blockers = Vec::new();
        for batched in [3.0, 4.0] {
            let (s, long) = (&s, &long);
            blockers.push(scope.spawn(move || s.post("/embed", &json!({ "inputs": [long] }))));
            // Polled, not slept: the blocker's batch went to the supervisor.
            let start = std::time::Instant::now();
            while texts_batched() < batched {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "the blocker never ran"
                );
                std::thread::yield_now();
            }
        }
        let before = batches();
        let poisoned = scope.spawn(|| {
            s.post(
                "/v1/embeddings",
                &json!({ "input": ["fine one", "a POISON text", "fine two"] }),
            )
        });
        let others: Vec<_> = (0..6)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.post(
                        "/embed",
                        &json!({ "inputs": ["fine one", format!("other {i}"), "fine two"] }),
                    )
                })
            })
            .collect();
        let poisoned = poisoned.join().unwrap();
        let others: Vec<_> = others.into_iter().map(|h| h.join().unwrap()).collect();
        for blocker in blockers {
            assert_eq!(blocker.join().unwrap().0, 200);
        }
        (poisoned, others, before)
    });
    let ((status, e), others, before) = results;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`input[1]`"),
        "{e}"
    );
    for (status, body) in others {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body[0], clean[0]);
        assert_eq!(body[2], clean[1]);
    }
    let (_, metrics, _) = s.raw("GET", "/metrics", None, &[]);
    // Seven requests, fewer batches: they were merged.
    let merged = batches() - before;
    assert!(merged < 7.0, "{merged} batches for 7 requests\n{metrics}");
    assert!(metric(&metrics, "restarts_total{") >= 1.0);
}

#[test]
fn past_the_concurrency_limit_requests_get_429_with_retry_after() {
    let config = stub_config(
        "wasm",
        "\"fault.sleep_ms\" = \"400\"",
        "[serve]\nmax_concurrent_requests = 2\n",
    );
    let s = Service::start(&config, &[]);
    let answers: Vec<(u16, String, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.raw(
                        "POST",
                        "/embed",
                        Some(json!({ "inputs": format!("text {i}") }).to_string()),
                        &[],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let limited: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert!(ok >= 2, "{answers:?}");
    assert!(!limited.is_empty(), "{answers:?}");
    for (_, body, retry) in limited {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body.contains("Overloaded"), "{body}");
    }
    // /health is outside the limit.
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn ready_says_503_with_the_reason_while_the_pool_cools_down() {
    // Every call traps: the pool escalates and cools down.
    let config = stub_config("wasm", "\"fault.trap_after\" = \"0\"", "");
    let s = Service::start(&config, &[]);
    let until = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    let reason = loop {
        let (status, body) = s.get("/ready");
        if status == 503 {
            break body["reason"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < until, "never cooled down");
        let _ = s.post("/embed", &json!({ "inputs": format!("text {i}") }));
        i += 1;
    };
    assert!(reason.contains("cooling down"), "{reason}");
    let (status, body, retry) = s.raw(
        "POST",
        "/embed",
        Some(json!({ "inputs": "more" }).to_string()),
        &[],
    );
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some());
    // Alive all the same.
    assert_eq!(s.get("/health").0, 200);
}

/// The files `/search` finds for `query` by keyword.
fn keyword_hits(s: &Service, query: &str) -> Vec<String> {
    let (status, results) = s.post(
        "/search",
        &json!({ "query": query, "limit": 10, "mode": "keyword" }),
    );
    assert_eq!(status, 200, "{results}");
    results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect()
}

/// Polls (not sleeps) until `done` holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_keeps_its_roots_fresh_and_catches_up_on_changes_made_while_it_was_down() {
    // The watch's batch window is 200 ms quiet, 2 s at most; 20 s bounds
    // a slow machine's walk and embedding too.
    const FRESH_WITHIN: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir().unwrap().keep();
    let docs = dir.join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::write(docs.join("a.txt"), "the first note").unwrap();
    let config = stub_config("wasm", "", "[serve]\nindex_roots = [\"docs\"]\n");
    let s = Service::start_in(&dir, &config, &[]);
    let (status, job) = s.post("/index", &json!({ "paths": [docs.to_str().unwrap()] }));
    assert_eq!(status, 202, "{job}");
    eventually(FRESH_WITHIN, "the first index", || {
        s.get("/stats").1["indexed"] == 1
    });
    // Created, edited in place, replaced by rename, deleted: each is
    // followed without another `POST /index`.
    std::fs::write(docs.join("sub/new.txt"), "a zebra_crossing note").unwrap();
    eventually(FRESH_WITHIN, "a new file is found", || {
        keyword_hits(&s, "zebra_crossing").len() == 1
    });
    std::fs::write(
        docs.join("a.txt"),
        "the first note, now about a pelican_brief",
    )
    .unwrap();
    eventually(FRESH_WITHIN, "an edit is found", || {
        keyword_hits(&s, "pelican_brief").len() == 1
    });
    std::fs::write(
        docs.join(".a.txt.swp"),
        "the first note, about a walrus_tusk",
    )
    .unwrap();
    std::fs::rename(docs.join(".a.txt.swp"), docs.join("a.txt")).unwrap();
    eventually(FRESH_WITHIN, "a rename over a file is found", || {
        keyword_hits(&s, "walrus_tusk").len() == 1 && keyword_hits(&s, "pelican_brief").is_empty()
    });
    std::fs::remove_file(docs.join("sub/new.txt")).unwrap();
    eventually(FRESH_WITHIN, "a deletion is followed", || {
        keyword_hits(&s, "zebra_crossing").is_empty()
    });
    let stats = s.get("/stats").1;
    assert_eq!(stats["indexed"], 1);
    assert_eq!(
        stats["watching"],
        json!([docs.canonicalize().unwrap()]),
        "{stats}"
    );
    drop(s);

    // Changed while no service ran: found when it starts again.
    std::fs::write(
        docs.join("later.txt"),
        "written while down: an okapi_stripe",
    )
    .unwrap();
    let s = Service::start_in(&dir, &config, &[]);
    eventually(FRESH_WITHIN, "a change made while down is found", || {
        keyword_hits(&s, "okapi_stripe").len() == 1
    });
    // `[serve] watch = false` turns it off.
    drop(s);
    let off = stub_config(
        "wasm",
        "",
        "[serve]\nindex_roots = [\"docs\"]\nwatch = false\n",
    );
    std::fs::write(docs.join("unseen.txt"), "an ibex_horn").unwrap();
    let s = Service::start_in(&dir, &off, &[]);
    let stats = s.get("/stats").1;
    assert_eq!(stats["watching"], json!([]), "{stats}");
    assert_eq!(stats["indexed"], 2, "{stats}");
    assert!(keyword_hits(&s, "ibex_horn").is_empty());
}
