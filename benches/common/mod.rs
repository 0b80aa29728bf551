//! What the real-model benchmarks share: the model, the texts, and the onnx
//! child, so every benchmark measures the same thing.

// Each bench uses part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

use embedhost::supervisor::Supervisor;
use std::time::{Duration, Instant};

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

/// A batch's deadline in [`through`].
const THROUGH_DEADLINE: Duration = Duration::from_secs(300);

/// Rounds each backend's measuring time is split into. The backends take
/// turns, a round each, in an order that rotates every round, so a change
/// in the machine's speed during the run (this machine class varies by
/// 1.5x from minute to minute) falls on all of them alike rather than on
/// whichever was measured then.
pub const ROUNDS: usize = 8;

/// Sentences per second through each of `backends` (a supervisor and the
/// batches it gets in flight at a time), measured in turns for `seconds`
/// each in all.
pub fn through(
    rt: &tokio::runtime::Runtime,
    backends: &[(&Supervisor, usize)],
    batch: &[String],
    seconds: f64,
) -> Vec<f64> {
    rt.block_on(async {
        // Warm-up: every instance once.
        for (supervisor, concurrency) in backends {
            let warm: Vec<_> = (0..*concurrency)
                .map(|_| {
                    let (s, b) = ((*supervisor).clone(), batch.to_vec());
                    tokio::spawn(async move { s.embed(b, false, THROUGH_DEADLINE).await.unwrap() })
                })
                .collect();
            for w in warm {
                w.await.unwrap();
            }
        }
        let mut done = vec![(0usize, 0f64); backends.len()];
        let rounds = if seconds > 0.0 { ROUNDS } else { 1 };
        for round in 0..rounds {
            for turn in 0..backends.len() {
                let which = (round + turn) % backends.len();
                let (supervisor, concurrency) = backends[which];
                let start = Instant::now();
                let workers: Vec<_> = (0..concurrency)
                    .map(|_| {
                        let (s, b) = (supervisor.clone(), batch.to_vec());
                        let slice = seconds / rounds as f64;
                        tokio::spawn(async move {
                            let mut sentences = 0;
                            loop {
                                let r = s.embed(b.clone(), false, THROUGH_DEADLINE).await.unwrap();
                                assert!(r.failed.is_empty());
                                sentences += b.len();
                                if start.elapsed().as_secs_f64() >= slice {
                                    return sentences;
                                }
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    done[which].0 += w.await.unwrap();
                }
                done[which].1 += start.elapsed().as_secs_f64();
            }
        }
        done.into_iter()
            .map(|(sentences, secs)| sentences as f64 / secs)
            .collect()
    })
}

/// The plugin of the `lang` kit (`python`, `js`): the repository's
/// `kits/LANG` as `embedhost plugin new --lang LANG` writes it, built with
/// the kit's pinned toolchain from `scripts/kits.sh` into the bench's
/// temporary directory: the file, or why not.
pub fn kit_plugin(lang: &str) -> Result<PathBuf, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let toolchain = embedhost::deps::deps_dir()
        .ok_or("no setup directory (run `./x setup`)")?
        .join("kits")
        .join(lang);
    let dir = std::env::temp_dir().join("embedhost-bench-kits").join(lang);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("wit")).map_err(|e| e.to_string())?;
    let source = root.join("kits").join(lang);
    for entry in std::fs::read_dir(&source).map_err(|e| format!("{}: {e}", source.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_type().map_err(|e| e.to_string())?.is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).map_err(|e| e.to_string())?;
        }
    }
    std::fs::copy(root.join("wit/embedder.wit"), dir.join("wit/embedder.wit"))
        .map_err(|e| e.to_string())?;
    let out = dir.join("plugin.wasm");
    let mut command = match lang {
        "python" => {
            let mut c = std::process::Command::new(toolchain.join("bin/componentize-py"));
            c.args([
                "-d",
                "wit/embedder.wit",
                "-w",
                "model-plugin",
                "componentize",
                "app",
                "-o",
            ]);
            c.arg(&out);
            c
        }
        _ => {
            std::os::unix::fs::symlink(toolchain.join("node_modules"), dir.join("node_modules"))
                .map_err(|e| e.to_string())?;
            let mut c = std::process::Command::new("node");
            c.arg("build.mjs").arg(&out);
            c
        }
    };
    let built = command
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("the {lang} kit's toolchain (run `scripts/kits.sh {lang}`): {e}"))?;
    if !built.status.success() {
        return Err(String::from_utf8_lossy(&built.stderr).into_owned());
    }
    Ok(out)
}
