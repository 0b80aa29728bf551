//! What the real-model benchmarks share: the model, the texts, and the onnx
//! child, so every benchmark measures the same thing.

// Each bench uses part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use embedhost::model::{FetchOptions, ModelStore};
use embedhost::native::NativeSpawner;
use embedhost::native::onnx::{OnnxSettings, resolve_library};

/// The default model with every file (both backends), fetched into the
/// setup's directory on first use.
pub fn model_dir() -> PathBuf {
    let deps = embedhost::deps::deps_dir().expect("run `./x setup` first");
    let manifest = embedhost::model::builtin(embedhost::model::DEFAULT_MODEL).unwrap();
    ModelStore::new(deps.join("models"))
        .ensure(&manifest, None, &FetchOptions::default())
        .expect("the default model (run `./x setup` first)")
}

/// `n` short sentences of 6 to 15 words, as a user's queries and snippets.
pub fn short_sentences(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "search",
        "engines", "index", "files", "by", "meaning", "and", "people", "find", "notes",
    ];
    (0..n)
        .map(|i| {
            (0..6 + i % 10)
                .map(|j| WORDS[(i * 7 + j * 3) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The onnx engine's settings for `dir` with `threads` intra-op threads.
pub fn onnx_settings(dir: PathBuf, threads: usize) -> OnnxSettings {
    OnnxSettings {
        model_dir: dir,
        library: resolve_library(None).unwrap(),
        threads,
        max_tokens: None,
        model_id: None,
        model_file: None,
        pooling: Default::default(),
        normalize: true,
    }
}

/// A spawner of onnx children with `settings`.
pub fn onnx_spawner(settings: &OnnxSettings, deadline: Duration) -> NativeSpawner {
    NativeSpawner {
        executable: env!("CARGO_BIN_EXE_embedhost").into(),
        engine: "onnx".into(),
        settings: settings.to_pairs(),
        init_deadline: deadline,
        call_deadline: deadline,
        call_deadline_per_kib: embedhost::limits::CALL_DEADLINE_PER_KIB,
        grace: Duration::from_secs(1),
        memory_ceiling: Some(embedhost::limits::DEFAULT_CHILD_MEMORY_CEILING),
    }
}

/// Where [`figure`] appends its records: set by `./x bench-report`, which
/// turns them into BENCHMARKS.md.
pub const REPORT_ENV: &str = "EMBEDHOST_BENCH_REPORT";

/// Set by `./x bench-report --heavy`: the benchmarks add their largest sizes.
pub const HEAVY_ENV: &str = "EMBEDHOST_BENCH_HEAVY";

/// Whether the heavier sizes were asked for.
pub fn heavy() -> bool {
    std::env::var_os(HEAVY_ENV).is_some_and(|v| v == "1")
}

/// Which way a figure is better.
#[derive(Clone, Copy)]
pub enum Better {
    Higher,
    Lower,
}

/// Records one figure with the baseline it was measured against in the same
/// run, for the report; prints nothing (each benchmark prints its own table).
pub fn figure(
    section: &str,
    name: &str,
    value: f64,
    unit: &str,
    baseline: (&str, f64),
    better: Better,
    command: &str,
) {
    let Some(path) = std::env::var_os(REPORT_ENV) else {
        return;
    };
    let (baseline_name, baseline_value) = baseline;
    let ratio = match better {
        Better::Higher => value / baseline_value,
        Better::Lower => baseline_value / value,
    };
    // A zero (no failed request) has no ratio.
    let ratio = ratio.is_finite().then_some(ratio);
    let record = serde_json::json!({
        "section": section,
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline_name,
        "baseline_value": baseline_value,
        "ratio": ratio,
        "better": match better { Better::Higher => "higher", Better::Lower => "lower" },
        "command": command,
    });
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the benchmark report file");
    writeln!(file, "{record}").expect("write the benchmark report file");
}

pub mod kernel_probe;
// For the benches that call other probe components (`bus`); not every
// bench including this module does.
#[allow(unused_imports)]
pub use kernel_probe::ProbeState;

/// A supervised pool of `plugin` (the BERT plugin with its model) at
/// `precision` (`"fp32"` or `"int8"`).
pub fn bert_pool(
    rt: &tokio::runtime::Runtime,
    plugin: &embedhost::wasm::WasmPlugin,
    precision: &str,
    pool: embedhost::supervisor::SupervisorConfig,
) -> embedhost::supervisor::Supervisor {
    let spawner = embedhost::wasm::WasmSpawner {
        plugin: plugin.clone(),
        limits: embedhost::wasm::InstanceLimits::default(),
        config: vec![("precision".into(), precision.into())],
    };
    rt.block_on(embedhost::supervisor::Supervisor::start(spawner, pool))
        .unwrap()
}
