//! A BERT sentence encoder as a plugin: the real-model counterpart of the
//! native `onnx` engine, computing the same thing inside the sandbox.
//!
//! - Model files come from the host's read-only model directory (`/model`,
//!   or the `model_dir` setting): `config.json`, `tokenizer.json`,
//!   `model.safetensors` (fp32) and, optionally, `sentence_bert_config.json`
//!   for the truncation length.
//! - Tokenization, truncation and normalization come from `embedhost-text`,
//!   the crate the native engine uses, so both backends feed their arithmetic
//!   the same ids; the engine packs texts instead of padding them and pools
//!   each text over its own tokens (the `pooling` setting, mean unless it
//!   says otherwise; L2-normalized unless `normalize = false`), as the
//!   native engine does over the attention mask.
//! - Inference is this crate's own engine ([`engine`], over the kernels of
//!   `plugins/kernels`): it
//!   reads the safetensors directly, so the plugin needs no converted graph,
//!   and runs with the linear layers in int8 through WebAssembly's relaxed
//!   dot product and attention in 16-bit fixed point (the default,
//!   `precision = "int8"`) or all in f32 (`precision = "fp32"`). One
//!   thread: parallelism comes from the host's pool of instances.
//!
//! # Invariants
//! - `embed` before a successful `init` is `not-initialized`, never a trap.
//! - `init` with the configuration the model was loaded with returns at once
//!   without touching a file: the host pre-initializes an instance, snapshots
//!   it with the model in memory, and calls `init` again on every instance
//!   restored from that snapshot, whose file handles (taken in another
//!   store) are gone. Another configuration loads afresh.
//! - Every failure the plugin can name (a missing file, a bad config) is an
//!   error value; only a bug or exhaustion traps.

mod engine;

use std::sync::Mutex;

use embedhost_text::{Pooling, TextEncoder};
use engine::{Bert, Precision, Scratch, Shape, Tensors, Text};
use safetensors::{Dtype, SafeTensors};

wit_bindgen::generate!({
    path: "../../wit",
    world: "engine",
});

mod encoder;

use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use embedhost_plugin_support::linear_memory_bytes;
use exports::embedhost::embedder::embedder::Guest;

/// Where the host mounts the model directory.
const DEFAULT_MODEL_DIR: &str = "/model";

/// Truncation length when the model does not name one: BERT's position
/// table has 512 rows.
const DEFAULT_MAX_TOKENS: usize = 512;

/// Tokens in one packed forward pass. The pass's buffers grow with it (about
/// 10 KiB a token for a 384-wide model with a 1536-wide feed-forward), and
/// past a few hundred tokens a bigger pass is no faster: the weights of one
/// layer are reused across all its rows either way.
const DEFAULT_PASS_TOKENS: usize = 1024;

/// The precision when `init` names none: int8, which reaches half of native
/// fp32's speed or more on short sentences and on long passages (issue #14:
/// 0.52x to 0.80x in three runs), at cosine >= 0.996 to the reference. Its
/// vectors differ from the native backend's in the third decimal; `fp32`
/// gives the native backend's vectors (cosine >= 0.9999) at under half the
/// speed.
const DEFAULT_PRECISION: Precision = Precision::Int8;

struct Model {
    bert: Bert,
    encoder: TextEncoder,
    /// Its pooling; `info.normalized` says whether it normalizes.
    pooling: Pooling,
    info: ModelInfo,
    processed: u64,
    /// The `init` configuration this model was loaded with.
    config: Vec<(String, String)>,
    /// Tokens per forward pass (the `pass_tokens` setting).
    pass_tokens: usize,
    scratch: Scratch,
}

static MODEL: Mutex<Option<Model>> = Mutex::new(None);

fn failed(what: &str, e: impl std::fmt::Display) -> EmbedError {
    EmbedError::ModelFailure(format!("{what}: {e}"))
}

fn config_error(what: &str, e: impl std::fmt::Display) -> EmbedError {
    EmbedError::InvalidConfig(format!("{what}: {e}"))
}

impl Tensors for SafeTensors<'_> {
    fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
        let view = self
            .tensor(name)
            .map_err(|_| format!("tensor `{name}` is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor `{name}` is {:?}, expected F32",
                view.dtype()
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((data, view.shape().to_vec()))
    }
}

fn shape_of(config: &serde_json::Value) -> Result<Shape, String> {
    let get = |key: &str| {
        config[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("config.json has no `{key}`"))
    };
    Ok(Shape {
        hidden: get("hidden_size")?,
        heads: get("num_attention_heads")?,
        layers: get("num_hidden_layers")?,
        inner: get("intermediate_size")?,
        vocab: get("vocab_size")?,
        positions: get("max_position_embeddings")?,
        type_vocab: get("type_vocab_size")?,
        eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
    })
}

fn positive(key: &str, value: &str) -> Result<usize, EmbedError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| config_error(key, format!("`{value}` is not a positive whole number")))
}

fn read(dir: &str, name: &str) -> Result<Vec<u8>, EmbedError> {
    let path = format!("{dir}/{name}");
    std::fs::read(&path).map_err(|e| EmbedError::ModelFailure(format!("cannot read `{path}`: {e}")))
}

/// What `init`'s configuration asks for.
struct Settings {
    dir: String,
    max_tokens: Option<usize>,
    model_id: Option<String>,
    pass_tokens: usize,
    precision: Precision,
    pooling: Pooling,
    normalize: bool,
}

/// The settings of `config`, or the first key it gets wrong.
fn settings(config: &[(String, String)]) -> Result<Settings, EmbedError> {
    let mut s = Settings {
        dir: DEFAULT_MODEL_DIR.to_string(),
        max_tokens: None,
        model_id: None,
        pass_tokens: DEFAULT_PASS_TOKENS,
        precision: DEFAULT_PRECISION,
        pooling: Pooling::default(),
        normalize: true,
    };
    for (key, value) in config {
        match key.as_str() {
            "model_dir" => s.dir = value.clone(),
            "pass_tokens" => s.pass_tokens = positive(key, value)?,
            "max_tokens" => s.max_tokens = Some(positive(key, value)?),
            "model_id" => s.model_id = Some(value.clone()),
            "precision" => {
                s.precision = match value.as_str() {
                    "int8" => Precision::Int8,
                    "fp32" => Precision::Fp32,
                    other => {
                        return Err(config_error(
                            "precision",
                            format!("`{other}` is not one of int8, fp32"),
                        ));
                    }
                }
            }
            "pooling" => {
                s.pooling = Pooling::from_name(value).ok_or_else(|| {
                    let modes = Pooling::names();
                    config_error("pooling", format!("`{value}` is not one of {modes}"))
                })?;
            }
            "normalize" => {
                s.normalize = value.parse().map_err(|_| {
                    config_error("normalize", format!("`{value}` is not true or false"))
                })?;
            }
            other => {
                return Err(EmbedError::InvalidConfig(format!(
                    "unknown key `{other}` (known: model_dir, max_tokens, model_id, precision, pass_tokens, pooling, normalize)"
                )));
            }
        }
    }
    Ok(s)
}

fn load(config: &[(String, String)]) -> Result<Model, EmbedError> {
    let Settings {
        dir,
        max_tokens,
        model_id,
        pass_tokens,
        precision,
        pooling,
        normalize,
    } = settings(config)?;
    let config: serde_json::Value = serde_json::from_slice(&read(&dir, "config.json")?)
        .map_err(|e| failed("config.json", e))?;
    let max_tokens = match max_tokens {
        Some(n) => n,
        None => match read(&dir, "sentence_bert_config.json") {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| failed("sentence_bert_config.json", e))?["max_seq_length"]
                .as_u64()
                .map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
            Err(_) => DEFAULT_MAX_TOKENS,
        },
    };
    let encoder =
        TextEncoder::from_bytes(&read(&dir, "tokenizer.json")?, "tokenizer.json", max_tokens)
            .map_err(|e| failed("tokenizer.json", e))?;
    let weights = read(&dir, "model.safetensors")?;
    let tensors = SafeTensors::deserialize(&weights).map_err(|e| failed("model.safetensors", e))?;
    let shape = shape_of(&config).map_err(|e| failed("config.json", e))?;
    let bert =
        Bert::load(&tensors, shape, precision).map_err(|e| failed("model.safetensors", e))?;
    let info = ModelInfo {
        model_id: model_id.unwrap_or_else(|| {
            config["_name_or_path"].as_str().map_or("bert".into(), |s| {
                s.rsplit('/').next().unwrap_or(s).to_string()
            })
        }),
        dimension: bert.shape.hidden as u32,
        max_input_tokens: max_tokens as u32,
        normalized: normalize,
    };
    Ok(Model {
        bert,
        encoder,
        info,
        pooling,
        processed: 0,
        config: Vec::new(),
        pass_tokens,
        scratch: Scratch::default(),
    })
}

impl Model {
    /// How the engine turns a text's states into its vector.
    fn head(&self) -> (Pooling, bool) {
        (self.pooling, self.info.normalized)
    }

    /// Tokenizes `texts` (truncating each to the model's limit) and embeds
    /// them in packed passes of about `pass_tokens` tokens, in order.
    fn embed(&mut self, texts: &[String]) -> Result<Vec<f32>, EmbedError> {
        let (ids, types) = self.tokenize(texts)?;
        self.run(&ids, &types, Output::Pooled)
    }

    /// Each text's token ids and type ids, special tokens included,
    /// truncated to the model's limit.
    fn tokenize(&self, texts: &[String]) -> Result<(Rows, Rows), EmbedError> {
        if texts.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let batch = self
            .encoder
            .encode(texts)
            .map_err(|e| failed("tokenization", e))?;
        // Unpad: the real tokens of each row come first.
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(batch.batch);
        let mut types: Vec<Vec<u32>> = Vec::with_capacity(batch.batch);
        for b in 0..batch.batch {
            let row = b * batch.tokens..(b + 1) * batch.tokens;
            let n = batch.attention_mask[row.clone()]
                .iter()
                .filter(|&&m| m != 0)
                .count();
            ids.push(
                batch.input_ids[row.clone()][..n]
                    .iter()
                    .map(|&x| x as u32)
                    .collect(),
            );
            types.push(
                batch.token_type_ids[row][..n]
                    .iter()
                    .map(|&x| x as u32)
                    .collect(),
            );
        }
        Ok((ids, types))
    }

    /// Runs the texts of `ids` (with their `types`) in packed passes of
    /// about `pass_tokens` tokens, in order: a pooled vector a text, or
    /// every token's state.
    fn run(
        &mut self,
        ids: &[Vec<u32>],
        types: &[Vec<u32>],
        output: Output,
    ) -> Result<Vec<f32>, EmbedError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hidden = self.bert.shape.hidden;
        let mut out = Vec::with_capacity(ids.len() * hidden);
        let mut pass: Vec<Text> = Vec::new();
        let mut tokens = 0;
        for (i, t) in ids.iter().zip(types) {
            if !pass.is_empty() && tokens + i.len() > self.pass_tokens {
                self.pass(&pass, output, &mut out)?;
                pass.clear();
                tokens = 0;
            }
            tokens += i.len();
            pass.push(Text { ids: i, types: t });
        }
        self.pass(&pass, output, &mut out)?;
        self.processed += ids.len() as u64;
        report_stages();
        Ok(out)
    }

    fn pass(
        &mut self,
        pass: &[Text],
        output: Output,
        out: &mut Vec<f32>,
    ) -> Result<(), EmbedError> {
        let head = self.head();
        match output {
            Output::Pooled => self.bert.embed(pass, head, &mut self.scratch, out),
            Output::States => self.bert.states(pass, &mut self.scratch, out),
        }
        .map_err(|e| failed("inference", e))
    }
}

/// A list of ids (tokens, or token types) a text.
type Rows = Vec<Vec<u32>>;

/// What a forward pass gives back.
#[derive(Clone, Copy)]
enum Output {
    /// A vector a text: its states pooled (and normalized if the model is).
    Pooled,
    /// Every token's state.
    States,
}

/// With the `stage-timing` feature, logs the time of each stage of this
/// call's passes (`stages: name=µs ...`); without it, nothing.
fn report_stages() {
    let stages = embedhost_kernels::timing::take();
    if stages.is_empty() {
        return;
    }
    let line: Vec<String> = stages
        .iter()
        .map(|(stage, ns)| format!("{stage:?}={}", ns / 1000))
        .collect();
    host_log::log(Level::Info, &format!("stages: {}", line.join(" ")));
}

struct Plugin;

impl Guest for Plugin {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        if let Some(model) = lock().as_ref().filter(|m| m.config == config) {
            return Ok(model.info.clone());
        }
        let mut model = load(&config)?;
        model.config = config;
        host_log::log(
            Level::Info,
            &format!(
                "model {} loaded: {} dimensions, {} layers, {:?}, truncation at {} tokens",
                model.info.model_id,
                model.info.dimension,
                model.bert.layers(),
                model.bert.precision,
                model.info.max_input_tokens
            ),
        );
        let info = model.info.clone();
        *lock() = Some(model);
        Ok(info)
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let mut guard = lock();
        let model = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let data = model.embed(&texts)?;
        Ok(Embeddings {
            dimension: model.info.dimension,
            data,
        })
    }

    fn health() -> HealthReport {
        let processed = lock().as_ref().map_or(0, |m| m.processed);
        HealthReport {
            memory_bytes: linear_memory_bytes(),
            processed,
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Model>> {
    embedhost_plugin_support::lock(&MODEL)
}

export!(Plugin);
