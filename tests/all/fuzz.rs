//! The fuzz targets of `embedhost::fuzzing` on stable Rust, bounded: the
//! committed corpus (`fuzz/corpus/TARGET/`) replayed, then random mutations
//! of it (bit flips, byte edits, splices, truncations, interesting lengths).
//! Not coverage-guided (that is `./x fuzz`, on nightly), but it runs in
//! every test run, so a regression in a parser's robustness fails CI.
//!
//! `EMBEDHOST_FUZZ_RUNS` sets the mutations per target (default 20,000);
//! `EMBEDHOST_FUZZ_SEED` replays a run (the seed is printed on failure). A
//! failing input is written to `target/fuzz-failures/` for
//! `cargo fuzz run TARGET FILE`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use embedhost::fuzzing::TARGETS;

const DEFAULT_RUNS: usize = 20_000;

/// Longest input a mutation makes: past every seed, short enough to run
/// thousands per second.
const MAX_INPUT: usize = 4096;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(..7) {
            0 if !data.is_empty() => {
                let i = rng.usize(..data.len());
                data[i] ^= 1 << rng.u8(..8);
            }
            1 if !data.is_empty() => {
                let i = rng.usize(..data.len());
                data[i] = rng.u8(..);
            }
            2 => {
                let i = rng.usize(..=data.len());
                data.insert(
                    i,
                    [0, 0xff, 0x7f, 0x80, 0x1b, 0x5b, b'"', b'='][rng.usize(..8)],
                );
            }
            3 if !data.is_empty() => {
                data.remove(rng.usize(..data.len()));
            }
            4 => {
                data.truncate(rng.usize(..=data.len()));
            }
            5 => {
                // Splice in a piece of another seed.
                let other = &seeds[rng.usize(..seeds.len())];
                if !other.is_empty() {
                    let from = rng.usize(..other.len());
                    let to = rng.usize(from..=other.len());
                    let at = rng.usize(..=data.len());
                    data.splice(at..at, other[from..to].iter().copied());
                }
            }
            _ => {
                // An interesting length or count, big-endian, somewhere.
                let value: u32 = [0, 1, 0x7f, 0xff, 0xffff, 0x00ff_ffff, u32::MAX][rng.usize(..7)];
                let at = rng.usize(..=data.len());
                data.splice(at..at, value.to_be_bytes());
            }
        }
    }
    data.truncate(MAX_INPUT);
    data
}

fn save_failure(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{target}-{:016x}", fastrand::u64(..)));
    std::fs::write(&path, input).unwrap();
    path
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_random_mutations() {
    let runs = std::env::var("EMBEDHOST_FUZZ_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_RUNS);
    let seed = std::env::var("EMBEDHOST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "no corpus for `{target}`");
        let mut rng = fastrand::Rng::with_seed(seed);
        let inputs = seeds
            .iter()
            .cloned()
            .chain(std::iter::repeat_with(|| mutate(&mut rng, &seeds)).take(runs));
        for input in inputs {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&input))) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let file = save_failure(target, &input);
                failures.push(format!("{target}: {message} (input: {})", file.display()));
                break;
            }
        }
    }
    std::panic::set_hook(hook);
    assert!(
        failures.is_empty(),
        "EMBEDHOST_FUZZ_SEED={seed}:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_frame_target_reaches_frames_bodies_and_the_size_limit() {
    // The seeds are real traffic: a request, a response, a cancel.
    let seeds = corpus("frames");
    assert!(seeds.len() >= 3, "{} seeds", seeds.len());
    for seed in &seeds {
        let size = u32::from_be_bytes(seed[1..5].try_into().unwrap()) as usize;
        assert_eq!(size + 5, seed.len(), "a whole frame after the step byte");
    }
}

fn cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

/// Writes the seed corpus (`fuzz/corpus/`): real messages, the example
/// configs and the shipped manifests. Run after a wire or format change:
/// `cargo test --test all write_the_seed_corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand after a format change"]
fn write_the_seed_corpus() {
    use embedhost::bus::transport::child::Frame;
    use embedhost::bus::{ErrorCode, RemoteError, TraceContext};
    use embedhost::messages::*;
    use embedhost::vectors::Vectors;

    let embed = EmbedRequest {
        texts: vec!["hello".into(), "wörld 東京".into(), String::new()],
        is_query: false,
    };
    let vectors = Vectors::new(2, vec![0.6, 0.8, -1.0, 0.0]).unwrap();
    let response = EmbedResponse {
        vectors,
        failed: vec![FailedInput {
            index: 2,
            reason: "poison".into(),
        }],
    };
    let handshake = HandshakeResponse {
        protocol_version: PROTOCOL_VERSION,
        model: embedhost::wasm::ModelInfo {
            model_id: embedhost::backend::ModelId::new("all-minilm-l6-v2").unwrap(),
            dimension: 384,
            max_input_tokens: 256,
            normalized: true,
        },
    };
    let stats = StatsResponse {
        indexed: 3,
        queued: 1,
        failures: [("binary".to_string(), 2)].into(),
        stalled: Some("embedder gone".into()),
        ..StatsResponse::default()
    };
    let search = SearchResponse {
        results: vec![SearchResult {
            path: "/docs/a.md".into(),
            start_line: 1,
            end_line: 4,
            score: 0.5,
            text: "a chunk".into(),
        }],
    };
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("embed-request", cbor(&embed)),
        ("embed-response", cbor(&response)),
        ("handshake", cbor(&handshake)),
        (
            "health",
            cbor(&HealthResponse {
                memory: 1 << 20,
                processed_count: 7,
            }),
        ),
        ("stats", cbor(&stats)),
        ("search-response", cbor(&search)),
        (
            "search-request",
            cbor(&SearchRequest {
                query: "flat tyre".into(),
                limit: 10,
                mode: Default::default(),
            }),
        ),
    ];
    let trace = TraceContext {
        trace_id: 42,
        parent_span: 7,
    };
    let frames = [
        (
            "request",
            1u8,
            Frame::Request {
                id: 1,
                message: "embedder.embed".into(),
                deadline_us: Some(30_000_000),
                trace,
                body: cbor(&embed),
            },
        ),
        (
            "response",
            3,
            Frame::Response {
                id: 1,
                result: Ok(serde_bytes::ByteBuf::from(cbor(&response))),
            },
        ),
        (
            "error",
            255,
            Frame::Response {
                id: 2,
                result: Err(RemoteError::new(ErrorCode::InvalidInput, "input 2: empty")),
            },
        ),
        ("cancel", 2, Frame::Cancel { id: 9 }),
    ];
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (name, body) in &bodies {
        write("envelope", name, body);
    }
    for (name, step, frame) in &frames {
        let body = cbor(frame);
        let mut bytes = vec![*step];
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        write("frames", name, &bytes);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (target, dir) in [("config", "examples/config"), ("manifest", "models")] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_name().unwrap().to_str().unwrap();
                write(target, name, &std::fs::read(&path).unwrap());
            }
        }
    }
}
