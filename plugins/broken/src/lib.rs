//! A deliberately broken plugin, as a test fixture for `embedhost plugin
//! test`: it initialises and embeds, but
//! - declares normalized vectors and returns vectors of norm 2,
//! - gives a different answer each time (a call counter leaks into it),
//! - traps on an empty string instead of returning a vector or an error,
//! - reports `processed` as 0 forever.

use std::sync::atomic::{AtomicU64, Ordering};

wit_bindgen::generate!({
    path: "../../wit",
    world: "plugin",
});

use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use exports::embedhost::embedder::embedder::Guest;

const DIMENSION: u32 = 8;

static CALLS: AtomicU64 = AtomicU64::new(0);

struct Broken;

impl Guest for Broken {
    fn init(_config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        Ok(ModelInfo {
            model_id: "embedhost/broken".into(),
            dimension: DIMENSION,
            max_input_tokens: 512,
            normalized: true,
        })
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let call = CALLS.fetch_add(1, Ordering::Relaxed) as f32;
        let mut data = Vec::new();
        for text in &texts {
            assert!(!text.is_empty(), "broken plugin: an empty string");
            let mut row = [0f32; DIMENSION as usize];
            row[text.len() % DIMENSION as usize] = 2.0;
            row[(text.len() + 1) % DIMENSION as usize] = call * 0.01;
            data.extend_from_slice(&row);
        }
        Ok(Embeddings {
            dimension: DIMENSION,
            data,
        })
    }

    fn health() -> HealthReport {
        HealthReport {
            memory_bytes: 65_536,
            processed: 0,
        }
    }
}

export!(Broken);
