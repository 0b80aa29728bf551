//! A BERT sentence encoder as a plugin: the real-model counterpart of the
//! native `onnx` engine, computing the same thing inside the sandbox.
//!
//! - Model files come from the host's read-only model directory (`/model`,
//!   or the `model_dir` setting): `config.json`, `tokenizer.json`,
//!   `model.safetensors` (fp32) and, optionally, `sentence_bert_config.json`
//!   for the truncation length.
//! - Tokenization, truncation, padding, mean pooling and normalization come
//!   from `embedhost-text`, the crate the native engine uses, so both
//!   backends feed their arithmetic the same ids and pool the same way.
//! - Inference is candle (CPU, one thread): it reads the safetensors
//!   directly, so the plugin needs no converted graph. Parallelism comes from
//!   the host's pool of instances, not from threads inside one.
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

use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use embedhost_text::TextEncoder;

wit_bindgen::generate!({
    path: "../../wit",
    world: "plugin",
});

use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use embedhost_plugin_support::linear_memory_bytes;
use exports::embedhost::embedder::embedder::Guest;

/// Where the host mounts the model directory.
const DEFAULT_MODEL_DIR: &str = "/model";

/// Truncation length when the model does not name one: BERT's position
/// table has 512 rows.
const DEFAULT_MAX_TOKENS: usize = 512;

/// The additive attention mask of padding (BERT's value): far below any
/// score, so padding gets zero weight after the softmax.
const MASKED: f32 = -10_000.0;

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

struct Bert {
    words: Embedding,
    positions: Tensor,
    types: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
}

struct Model {
    bert: Bert,
    encoder: TextEncoder,
    info: ModelInfo,
    processed: u64,
    /// The `init` configuration this model was loaded with.
    config: Vec<(String, String)>,
    /// Texts per forward pass, after sorting a batch by length.
    length_group: usize,
}

/// Texts per forward pass within a batch, after sorting it by length (the
/// `length_group` setting): each group is padded to its own longest text,
/// so short texts do not pay for a long one's padding, as in the native
/// engine. Measured with `cargo bench --bench throughput`.
const DEFAULT_LENGTH_GROUP: usize = 8;

static MODEL: Mutex<Option<Model>> = Mutex::new(None);

fn failed(what: &str, e: impl std::fmt::Display) -> EmbedError {
    EmbedError::ModelFailure(format!("{what}: {e}"))
}

fn config_error(what: &str, e: impl std::fmt::Display) -> EmbedError {
    EmbedError::InvalidConfig(format!("{what}: {e}"))
}

impl Bert {
    fn load(vb: VarBuilder, config: &serde_json::Value) -> Result<Self, String> {
        let get = |key: &str| {
            config[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| format!("config.json has no `{key}`"))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        let layers = get("num_hidden_layers")?;
        let inner = get("intermediate_size")?;
        let vocab = get("vocab_size")?;
        let positions = get("max_position_embeddings")?;
        let type_vocab = get("type_vocab_size")?;
        let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12);
        let e = |e: candle_core::Error| e.to_string();
        // Checkpoints are saved with or without the `bert.` prefix.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let norm = |vb: VarBuilder| candle_nn::layer_norm(hidden, eps, vb);
        let mut stack = Vec::with_capacity(layers);
        for i in 0..layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            stack.push(Layer {
                query: candle_nn::linear(hidden, hidden, a.pp("self.query")).map_err(e)?,
                key: candle_nn::linear(hidden, hidden, a.pp("self.key")).map_err(e)?,
                value: candle_nn::linear(hidden, hidden, a.pp("self.value")).map_err(e)?,
                attention_out: candle_nn::linear(hidden, hidden, a.pp("output.dense"))
                    .map_err(e)?,
                attention_norm: norm(a.pp("output.LayerNorm")).map_err(e)?,
                intermediate: candle_nn::linear(hidden, inner, l.pp("intermediate.dense"))
                    .map_err(e)?,
                output: candle_nn::linear(inner, hidden, l.pp("output.dense")).map_err(e)?,
                output_norm: norm(l.pp("output.LayerNorm")).map_err(e)?,
            });
        }
        Ok(Bert {
            words: candle_nn::embedding(vocab, hidden, emb.pp("word_embeddings")).map_err(e)?,
            positions: emb
                .get((positions, hidden), "position_embeddings.weight")
                .map_err(e)?,
            types: candle_nn::embedding(type_vocab, hidden, emb.pp("token_type_embeddings"))
                .map_err(e)?,
            norm: norm(emb.pp("LayerNorm")).map_err(e)?,
            layers: stack,
            heads,
            hidden,
        })
    }

    /// `[batch, tokens, hidden]` hidden states.
    fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        let head = self.hidden / self.heads;
        let positions = self.positions.narrow(0, 0, tokens)?;
        let mut x = self
            .words
            .forward(ids)?
            .add(&self.types.forward(types)?)?
            .broadcast_add(&positions)?;
        x = self.norm.forward(&x)?;
        // [batch, 1, 1, tokens]: 0 for tokens, MASKED for padding.
        let additive =
            ((mask.ones_like()? - mask)? * f64::from(MASKED))?.reshape((batch, 1, 1, tokens))?;
        let scale = 1.0 / (head as f64).sqrt();
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, tokens, self.heads, head))?
                .transpose(1, 2)?
                .contiguous()
        };
        for layer in &self.layers {
            let q = split(layer.query.forward(&x)?)?;
            let k = split(layer.key.forward(&x)?)?;
            let v = split(layer.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&additive)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((
                batch,
                tokens,
                self.hidden,
            ))?;
            x = layer
                .attention_norm
                .forward(&(layer.attention_out.forward(&context)? + &x)?)?;
            let inner = layer.intermediate.forward(&x)?.gelu_erf()?;
            x = layer
                .output_norm
                .forward(&(layer.output.forward(&inner)? + &x)?)?;
        }
        Ok(x)
    }
}

fn read(dir: &str, name: &str) -> Result<Vec<u8>, EmbedError> {
    let path = format!("{dir}/{name}");
    std::fs::read(&path).map_err(|e| EmbedError::ModelFailure(format!("cannot read `{path}`: {e}")))
}

fn load(config: &[(String, String)]) -> Result<Model, EmbedError> {
    let mut dir = DEFAULT_MODEL_DIR.to_string();
    let mut max_tokens = None;
    let mut model_id = None;
    let mut length_group = DEFAULT_LENGTH_GROUP;
    for (key, value) in config {
        match key.as_str() {
            "model_dir" => dir = value.clone(),
            "length_group" => {
                length_group = value.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    config_error(
                        "length_group",
                        format!("`{value}` is not a positive whole number"),
                    )
                })?
            }
            "max_tokens" => {
                max_tokens = Some(value.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(
                    || {
                        config_error(
                            "max_tokens",
                            format!("`{value}` is not a positive whole number"),
                        )
                    },
                )?)
            }
            "model_id" => model_id = Some(value.clone()),
            other => {
                return Err(EmbedError::InvalidConfig(format!(
                    "unknown key `{other}` (known: model_dir, max_tokens, model_id, length_group)"
                )));
            }
        }
    }
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
    let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
        .map_err(|e| failed("model.safetensors", e))?;
    let bert = Bert::load(vb, &config).map_err(|e| failed("model.safetensors", e))?;
    let info = ModelInfo {
        model_id: model_id.unwrap_or_else(|| {
            config["_name_or_path"].as_str().map_or("bert".into(), |s| {
                s.rsplit('/').next().unwrap_or(s).to_string()
            })
        }),
        dimension: bert.hidden as u32,
        max_input_tokens: max_tokens as u32,
        normalized: true,
    };
    Ok(Model {
        bert,
        encoder,
        info,
        processed: 0,
        config: Vec::new(),
        length_group,
    })
}

impl Model {
    fn embed(&mut self, texts: &[String]) -> Result<Vec<f32>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self
            .encoder
            .encode_by_length(texts, self.length_group)
            .map_err(|e| failed("tokenization", e))?;
        let hidden = self.bert.hidden;
        let mut out = vec![0f32; texts.len() * hidden];
        for (rows, batch) in groups {
            let pooled = self.forward(&batch)?;
            for (k, &i) in rows.iter().enumerate() {
                out[i * hidden..][..hidden].copy_from_slice(&pooled[k * hidden..][..hidden]);
            }
        }
        self.processed += texts.len() as u64;
        Ok(out)
    }

    /// Mean-pooled, normalized vectors of one padded batch.
    fn forward(&self, batch: &embedhost_text::Batch) -> Result<Vec<f32>, EmbedError> {
        let shape = (batch.batch, batch.tokens);
        let e = |e: candle_core::Error| failed("inference", e);
        let as_u32 = |v: &[i64]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        let ids = Tensor::from_vec(as_u32(&batch.input_ids), shape, &Device::Cpu).map_err(e)?;
        let types =
            Tensor::from_vec(as_u32(&batch.token_type_ids), shape, &Device::Cpu).map_err(e)?;
        let mask_f: Vec<f32> = batch.attention_mask.iter().map(|&m| m as f32).collect();
        let mask = Tensor::from_vec(mask_f, shape, &Device::Cpu).map_err(e)?;
        let hidden = self.bert.forward(&ids, &types, &mask).map_err(e)?;
        let flat: Vec<f32> = hidden.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
        embedhost_text::mean_pool(batch, &flat, self.bert.hidden)
            .map_err(|e| failed("pooling", e))
    }
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
                "model {} loaded: {} dimensions, {} layers, truncation at {} tokens",
                model.info.model_id,
                model.info.dimension,
                model.bert.layers.len(),
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
