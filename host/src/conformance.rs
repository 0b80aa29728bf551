//! The plugin conformance suite behind `embedhost plugin test`: what any
//! embedder plugin must do to be run by the host, checked by calling it.
//!
//! Each check runs against a live instance of the plugin, started directly
//! (not under the supervisor, so a trap is seen as a failure of the check
//! that caused it instead of being retried away). An instance that crashes
//! is replaced before the next check, so one bad answer fails one check.
//!
//! # What passes
//! A check passes when the plugin answers within its deadline with output
//! that keeps the contract (`wit/embedder.wit`); for hard inputs (an empty
//! list, an empty string, a very long or non-ASCII text) a typed error value
//! passes too: the contract lets a plugin refuse an input, never trap on it.
//! The throughput and memory figures are reported, not judged. Each rule is
//! judged by one check (the norm only by `normalized as declared`), so the
//! table says what is broken once rather than in every row.

use std::time::{Duration, Instant};

use crate::vectors::{Vectors, cosine};
use crate::wasm::{InstanceLimits, ModelInfo, WasmEmbedder, WasmError, WasmPlugin};

/// How far a declared-normalized vector's L2 norm may stray from 1: f32
/// arithmetic over a few thousand terms stays well within 1e-3.
pub const NORM_TOLERANCE: f32 = 1e-3;

/// Largest difference allowed between two embeddings of the same batch: a
/// deterministic plugin repeats itself to the bit, so anything above f32
/// rounding is a bug (shared state, randomness).
pub const REPEAT_TOLERANCE: f32 = 1e-6;

/// Least cosine between a text embedded alone and inside a batch: padding
/// within a batch may change the last bits of a real model's arithmetic,
/// never its direction.
pub const BATCH_COSINE: f32 = 0.9999;

/// Characters of the "very long input" check: far past any model's token
/// limit (all-MiniLM-L6-v2 reads 256 tokens), so a plugin must truncate or
/// refuse it.
pub const LONG_INPUT_CHARS: usize = 100_000;

/// How long the throughput figure is measured by default: long enough to
/// average a few batches of a real model, short enough for a CI step.
pub const DEFAULT_THROUGHPUT_TIME: Duration = Duration::from_secs(2);

/// Sentences of the batch checks: short, long-ish, punctuation, digits.
const SENTENCES: &[&str] = &[
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "How do I fix a flat bicycle tyre?",
    "Version 2.0 was released on 2024-03-01, with 17 fixes.",
];

/// Texts in scripts other than Latin, emoji, combining marks and
/// right-to-left text.
const NON_ASCII: &[&str] = &[
    "Grüße aus Köln — ça va?",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "👩‍💻 ships 🚀 at 3 a.m. ☕",
    "e\u{301}te\u{301} cafe\u{301}",
];

/// A check's verdict as the report prints it: what it saw when the plugin
/// keeps the rule, or how it breaks it. These texts are this module's
/// edge (the rows of `plugin test`), so they are words, not error types.
type Verdict = Result<String, String>;

/// A check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The plugin keeps the rule.
    Pass,
    /// The plugin breaks the rule (the detail says how).
    Fail,
    /// Not run, because an earlier failure makes it meaningless.
    Skip,
}

/// One row of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// The verdict.
    pub outcome: Outcome,
    /// What was seen.
    pub detail: String,
}

/// What the suite found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// What `init` reported, if it succeeded.
    pub info: Option<ModelInfo>,
    /// Every check, in the order run.
    pub checks: Vec<Check>,
    /// Texts per second over batches of 32 short sentences, one instance.
    pub texts_per_second: Option<f64>,
    /// Linear memory after the throughput run, from `health`.
    pub memory_bytes: Option<u64>,
    /// How long a new instance takes to be ready, cold and warm.
    pub starts: Option<Starts>,
}

/// How long the plugin takes to be ready, as `plugin test` reports it
/// (reported, not judged; a benchmark measures restarts:
/// `cargo bench --bench plugins`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Starts {
    /// Loading the file (compiling it, or mapping it from the artifact
    /// cache) and starting the first instance, in milliseconds.
    pub cold_ms: f64,
    /// A new instance with `init` run in full: the median of
    /// [`START_SAMPLES`], in milliseconds.
    pub plain_ms: f64,
    /// A new instance from the pre-initialized snapshot (`init` already
    /// run), the median, if the plugin has one.
    pub snapshot_ms: Option<f64>,
}

/// Instances started for each median of [`Starts`].
pub const START_SAMPLES: usize = 5;

/// The median time to a ready instance of `plugin` over [`START_SAMPLES`]
/// starts, in milliseconds, or `None` if one failed to start (the suite's
/// own checks then say why).
pub async fn median_start(plugin: &WasmPlugin, options: &Options) -> Option<f64> {
    let mut times = Vec::with_capacity(START_SAMPLES);
    for _ in 0..START_SAMPLES {
        let at = std::time::Instant::now();
        let instance =
            WasmEmbedder::start(plugin.clone(), options.limits, options.config.clone()).await;
        times.push(at.elapsed().as_secs_f64() * 1e3);
        drop(instance.ok()?);
    }
    times.sort_by(f64::total_cmp);
    Some(times[START_SAMPLES / 2])
}

impl Report {
    /// Whether every check that ran passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
            && self.checks.iter().any(|c| c.outcome == Outcome::Pass)
    }

    /// The number of checks with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    fn record(&mut self, name: &'static str, result: Verdict) -> bool {
        let (outcome, detail) = match result {
            Ok(detail) => (Outcome::Pass, detail),
            Err(detail) => (Outcome::Fail, detail),
        };
        self.checks.push(Check {
            name,
            outcome,
            detail,
        });
        outcome == Outcome::Pass
    }

    /// The report as a table a person reads.
    pub fn table(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(5);
        let mut out = format!("{:width$}  result  detail\n", "check");
        for c in &self.checks {
            let outcome = match c.outcome {
                Outcome::Pass => "pass",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            out.push_str(&format!("{:width$}  {outcome:6}  {}\n", c.name, c.detail));
        }
        if let Some(rate) = self.texts_per_second {
            out.push_str(&format!(
                "{:width$}  {:6}  {rate:.1} texts/s (batches of 32 short sentences, one instance)\n",
                "throughput", "info"
            ));
        }
        if let Some(s) = &self.starts {
            let snapshot = s.snapshot_ms.map_or("no snapshot".into(), |ms| {
                format!("{ms:.1} ms from the snapshot")
            });
            out.push_str(&format!(
                "{:width$}  {:6}  cold {:.0} ms (load and first instance); then {:.1} ms with `init` in full, {snapshot} (medians)\n",
                "start", "info", s.cold_ms, s.plain_ms
            ));
        }
        if let Some(bytes) = self.memory_bytes {
            out.push_str(&format!(
                "{:width$}  {:6}  {:.1} MiB of linear memory after the throughput run\n",
                "memory",
                "info",
                bytes as f64 / (1024.0 * 1024.0)
            ));
        }
        out.push_str(&format!(
            "{} passed, {} failed, {} skipped\n",
            self.count(Outcome::Pass),
            self.count(Outcome::Fail),
            self.count(Outcome::Skip)
        ));
        out
    }
}

/// How to run the suite.
#[derive(Clone, Debug)]
pub struct Options {
    /// The table passed to `init`.
    pub config: Vec<(String, String)>,
    /// Each instance's memory cap and deadlines.
    pub limits: InstanceLimits,
    /// How long to measure throughput; zero skips the figure.
    pub throughput_time: Duration,
}

/// A live instance, replaced after a crash.
struct Subject {
    plugin: WasmPlugin,
    options: Options,
    live: Option<WasmEmbedder>,
}

impl Subject {
    async fn instance(&mut self) -> Result<&WasmEmbedder, WasmError> {
        if self.live.is_none() {
            let started = WasmEmbedder::start(
                self.plugin.clone(),
                self.options.limits,
                self.options.config.clone(),
            )
            .await?;
            self.live = Some(started);
        }
        Ok(self.live.as_ref().expect("started above"))
    }

    /// Embeds on the live instance, dropping it if the call crashed it.
    async fn embed(&mut self, texts: Vec<String>, is_query: bool) -> Result<Vectors, WasmError> {
        let result = self.instance().await?.embed(texts, is_query, None).await;
        if let Err(e) = &result
            && e.is_crash()
        {
            self.live = None;
        }
        result
    }
}

/// Runs the suite against `plugin`.
///
/// A failure to start the plugin is a failed `init` check, not an error:
/// the report says what went wrong.
pub async fn run(plugin: WasmPlugin, options: Options) -> Report {
    let mut report = Report::default();
    let mut subject = Subject {
        plugin,
        options,
        live: None,
    };
    let Some(info) = init(&mut report, &mut subject).await else {
        return report;
    };

    let texts: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let first = match subject.embed(texts.clone(), false).await {
        Ok(v) => v,
        Err(e) => {
            report.record("embeds a batch", Err(e.to_string()));
            skip_rest(&mut report, "no batch was embedded");
            return report;
        }
    };
    report.record(
        "embeds a batch",
        Ok(format!(
            "{} vectors of dimension {}, finite",
            first.len(),
            first.dimension()
        )),
    );
    report.record("normalized as declared", normalized(&info, &first));
    let repeated = deterministic(&mut subject, &texts, &first).await;
    report.record("deterministic", repeated);
    let alone = batch_independent(&mut subject, &texts, &first).await;
    report.record("batch-independent", alone);

    hard_inputs(&mut report, &mut subject).await;
    report.record("bad config is a value", bad_config(&subject).await);
    report.record("health", health(&mut subject).await);
    measure(&mut report, &mut subject).await;
    report
}

/// Starts the first instance and records `init` and `declares a model`;
/// the model's info, or `None` (the rest skipped) if it did not start.
async fn init(report: &mut Report, subject: &mut Subject) -> Option<ModelInfo> {
    let info = match subject.instance().await {
        Ok(instance) => instance.model_info().clone(),
        Err(e) => {
            report.record("init", Err(e.to_string()));
            skip_rest(report, "init failed");
            return None;
        }
    };
    report.record(
        "init",
        Ok(format!(
            "model `{}`, {} dimensions, {} tokens, {}",
            info.model_id,
            info.dimension,
            info.max_input_tokens,
            if info.normalized {
                "normalized"
            } else {
                "not normalized"
            }
        )),
    );
    report.info = Some(info.clone());
    report.record(
        "declares a model",
        if info.dimension == 0 {
            Err("dimension 0".into())
        } else if info.model_id.trim().is_empty() {
            Err("an empty model id (an index records it)".into())
        } else {
            Ok(format!("dimension {}", info.dimension))
        },
    );
    Some(info)
}

/// `deterministic`: `texts` embedded again give `first` to
/// [`REPEAT_TOLERANCE`].
async fn deterministic(subject: &mut Subject, texts: &[String], first: &Vectors) -> Verdict {
    let again = subject.embed(texts.to_vec(), false).await;
    again.map_err(|e| e.to_string()).and_then(|again| {
        let diff = first
            .as_flat()
            .iter()
            .zip(again.as_flat())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if diff <= REPEAT_TOLERANCE {
            Ok(format!("the same batch twice differs by {diff:e}"))
        } else {
            Err(format!(
                "the same batch twice differs by {diff:e} (allowed {REPEAT_TOLERANCE:e})"
            ))
        }
    })
}

/// `batch-independent`: each of `texts` embedded alone points where its
/// row of `first` does, to [`BATCH_COSINE`].
async fn batch_independent(subject: &mut Subject, texts: &[String], first: &Vectors) -> Verdict {
    let mut alone = Ok(f32::INFINITY);
    for (i, text) in texts.iter().enumerate() {
        alone = match (alone, subject.embed(vec![text.clone()], false).await) {
            (Ok(worst), Ok(v)) => {
                let c = cosine(v.get(0).unwrap_or(&[]), first.get(i).unwrap_or(&[]));
                Ok(worst.min(c))
            }
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(format!("text {i} alone: {e}")),
        };
    }
    alone.and_then(|worst| {
        if worst >= BATCH_COSINE {
            Ok(format!("alone vs in a batch: cosine >= {worst:.6}"))
        } else {
            Err(format!(
                "a text alone and in a batch: cosine {worst:.6} (needs {BATCH_COSINE})"
            ))
        }
    })
}

/// The hard inputs (an empty list, an empty string, a very long and a
/// non-ASCII input) and the query kind: a value or vectors, never a crash.
async fn hard_inputs(report: &mut Report, subject: &mut Subject) {
    report.record(
        "empty list",
        match subject.embed(Vec::new(), false).await {
            Ok(v) if v.is_empty() => Ok("no vectors".into()),
            Ok(v) => Err(format!("{} vectors for no text", v.len())),
            Err(e) => value_or_crash(e),
        },
    );
    let hard: [(&'static str, Vec<String>); 3] = [
        ("empty string", vec![String::new()]),
        (
            "very long input",
            vec![
                "lorem ipsum dolor sit amet "
                    .repeat(LONG_INPUT_CHARS / 27 + 1)
                    .chars()
                    .take(LONG_INPUT_CHARS)
                    .collect(),
            ],
        ),
        (
            "non-ASCII input",
            NON_ASCII.iter().map(|s| s.to_string()).collect(),
        ),
    ];
    for (name, input) in hard {
        let n = input.len();
        let result = match subject.embed(input, false).await {
            Ok(v) if v.len() == n => Ok(format!("{n} vector(s)")),
            Ok(v) => Err(format!("{} vectors for {n} texts", v.len())),
            Err(e) => value_or_crash(e),
        };
        report.record(name, result);
    }

    report.record(
        "query kind",
        match subject.embed(vec![SENTENCES[2].to_string()], true).await {
            Ok(_) => Ok("a query embeds".into()),
            Err(e) => value_or_crash(e),
        },
    );
}

/// `bad config is a value`: a key no plugin knows. Refusing it is a value,
/// accepting it is fine, a trap is not.
async fn bad_config(subject: &Subject) -> Verdict {
    let mut odd = subject.options.config.clone();
    odd.push(("embedhost.conformance.unknown-key".into(), "1".into()));
    match WasmEmbedder::start(subject.plugin.clone(), subject.options.limits, odd).await {
        Ok(_) => Ok("an unknown key was accepted".into()),
        Err(WasmError::Plugin { error, .. }) => Ok(format!("refused: {error}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The throughput and memory figures, unless `throughput_time` is zero; a
/// failed run is a failed check.
async fn measure(report: &mut Report, subject: &mut Subject) {
    if subject.options.throughput_time.is_zero() {
        return;
    }
    match throughput(subject).await {
        Ok((rate, memory)) => {
            report.texts_per_second = Some(rate);
            report.memory_bytes = memory;
        }
        Err(e) => {
            report.record("throughput run", Err(e));
        }
    }
}

fn skip_rest(report: &mut Report, why: &str) {
    report.checks.push(Check {
        name: "the rest",
        outcome: Outcome::Skip,
        detail: why.into(),
    });
}

/// A refused input passes; a crash or broken output does not.
fn value_or_crash(e: WasmError) -> Verdict {
    match e {
        WasmError::Plugin { error, .. } => Ok(format!("refused with a value: {error}")),
        e => Err(e.to_string()),
    }
}

fn normalized(info: &ModelInfo, v: &Vectors) -> Verdict {
    if !info.normalized {
        return Ok("not declared normalized".into());
    }
    for (i, row) in v.iter().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if (norm - 1.0).abs() > NORM_TOLERANCE {
            return Err(format!(
                "declared normalized, but vector {i} has norm {norm:.4}"
            ));
        }
    }
    Ok("every vector has norm 1".into())
}

async fn health(subject: &mut Subject) -> Verdict {
    subject.live = None; // a fresh instance counts from zero
    let texts: Vec<String> = SENTENCES[..3].iter().map(|s| s.to_string()).collect();
    let before = subject.instance().await.map_err(|e| e.to_string())?;
    let before = before.health(None).await.map_err(|e| e.to_string())?;
    // Through the subject, so a crash here leaves a fresh instance behind.
    subject
        .embed(texts, false)
        .await
        .map_err(|e| e.to_string())?;
    let after = subject.instance().await.map_err(|e| e.to_string())?;
    let after = after.health(None).await.map_err(|e| e.to_string())?;
    if after.processed != before.processed + 3 {
        return Err(format!(
            "`processed` went from {} to {} over 3 texts",
            before.processed, after.processed
        ));
    }
    if after.memory_bytes == 0 {
        return Err("`memory-bytes` is 0".into());
    }
    Ok(format!(
        "processed counts texts; {:.1} MiB",
        after.memory_bytes as f64 / (1024.0 * 1024.0)
    ))
}

async fn throughput(subject: &mut Subject) -> Result<(f64, Option<u64>), String> {
    let batch: Vec<String> = (0..32)
        .map(|i| format!("{} ({i})", SENTENCES[i % SENTENCES.len()]))
        .collect();
    let time = subject.options.throughput_time;
    let instance = subject.instance().await.map_err(|e| e.to_string())?;
    // One warm-up batch: the first call may fault in memory.
    instance
        .embed(batch.clone(), false, None)
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut texts = 0usize;
    while start.elapsed() < time {
        instance
            .embed(batch.clone(), false, None)
            .await
            .map_err(|e| e.to_string())?;
        texts += batch.len();
    }
    let rate = texts as f64 / start.elapsed().as_secs_f64();
    let memory = instance.health(None).await.ok().map(|h| h.memory_bytes);
    Ok((rate, memory))
}
