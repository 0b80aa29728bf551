//! A fixture of the `model-plugin` world: every way of asking the host's
//! encoder for vectors, and every way of abusing it, chosen by the `mode`
//! setting of `init`:
//! - `encode` (the default): `encoder.encode` of the texts, as they come;
//! - `ids`: `tokenize`, then `encode-ids` of the ids;
//! - `states`: `token-states`, mean-pooled and L2-normalized here;
//! - `loop`: `encode` again and again, past any deadline;
//! - `million`: one `encode` of 1,000,000 texts;
//! - `over-batch`: one `encode` of one text more than `info().max-batch`;
//! - `oov`: `encode-ids` of an id past the vocabulary;
//! - `long-ids`: `encode-ids` of a list longer than the model's window.
//!
//! In every mode, a batch holding the text [`CRASH`] traps after asking the
//! encoder (a crash with the engine mid-use, for the supervisor).

use std::sync::Mutex;

wit_bindgen::generate!({
    path: "../../wit",
    world: "model-plugin",
});

use embedhost::embedder::encoder;
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use embedhost_plugin_support::linear_memory_bytes;
use exports::embedhost::embedder::embedder::Guest;

/// The text that makes `embed` trap.
const CRASH: &str = "embedhost:crash";

struct State {
    mode: String,
    processed: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

struct Probe;

fn mean_pooled(states: encoder::HiddenStates) -> Vec<f32> {
    let d = states.dimension as usize;
    let mut out = Vec::with_capacity(states.lengths.len() * d);
    let mut first = 0;
    for &n in &states.lengths {
        let n = n as usize;
        let mut v = vec![0f32; d];
        for row in states.data[first * d..(first + n) * d].chunks_exact(d) {
            for (a, b) in v.iter_mut().zip(row) {
                *a += b;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| x / norm));
        first += n;
    }
    out
}

impl Guest for Probe {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let mut mode = "encode".to_string();
        for (key, value) in config {
            match key.as_str() {
                "mode" => mode = value,
                "model_id" | "pooling" | "normalize" => {}
                other => return Err(EmbedError::InvalidConfig(format!("unknown key `{other}`"))),
            }
        }
        let info = encoder::info();
        *embedhost_plugin_support::lock(&STATE) = Some(State { mode, processed: 0 });
        Ok(ModelInfo {
            model_id: info.model_id,
            dimension: info.dimension,
            max_input_tokens: info.max_input_tokens,
            normalized: info.normalized,
        })
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let mut guard = embedhost_plugin_support::lock(&STATE);
        let state = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let info = encoder::info();
        let data = match state.mode.as_str() {
            "ids" => encoder::encode_ids(&encoder::tokenize(&texts)?)?.data,
            "states" => mean_pooled(encoder::token_states(&texts)?),
            "loop" => loop {
                encoder::encode(&texts)?;
            },
            "million" => encoder::encode(&vec![String::new(); 1_000_000])?.data,
            "over-batch" => encoder::encode(&vec!["x".into(); info.max_batch as usize + 1])?.data,
            "oov" => encoder::encode_ids(&[vec![101, info.vocabulary_size + 5, 102]])?.data,
            "long-ids" => {
                encoder::encode_ids(&[vec![101; info.max_input_tokens as usize + 1]])?.data
            }
            _ => encoder::encode(&texts)?.data,
        };
        if texts.iter().any(|t| t == CRASH) {
            panic!("the probe was asked to crash");
        }
        state.processed += texts.len() as u64;
        Ok(Embeddings {
            dimension: info.dimension,
            data,
        })
    }

    fn health() -> HealthReport {
        let processed = embedhost_plugin_support::lock(&STATE)
            .as_ref()
            .map_or(0, |s| s.processed);
        HealthReport {
            memory_bytes: linear_memory_bytes(),
            processed,
        }
    }
}

export!(Probe);
