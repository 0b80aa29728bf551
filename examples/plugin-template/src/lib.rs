//! A template embedhost plugin: an embedder with no model files.
//!
//! It embeds a text by hashing its character trigrams into a fixed number of
//! buckets (feature hashing) and normalizing the result, so texts that share
//! spellings land near each other. That is a lexical embedder, not a
//! semantic one; it is here to show the contract, so replace [`embed_one`]
//! with your model.
//!
//! What the host expects (see `wit/embedder.wit` and PLUGINS.md):
//! - `init` is called first, with the `[plugin] config` table; refuse what
//!   you cannot use with `invalid-config`, naming the key.
//! - `embed` returns one vector per text, in order, each of the declared
//!   dimension, finite, and unit-length if `normalized` is declared.
//! - Errors are values. A panic is a trap: the host discards the instance
//!   and starts a new one, so keep panics for bugs.
//! - `health` is cheap: it is called every few seconds.

use std::sync::Mutex;

wit_bindgen::generate!({
    path: "wit",
    world: "plugin",
});

use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{EmbedError, Embeddings, HealthReport, InputKind, ModelInfo};
use exports::embedhost::embedder::embedder::Guest;

/// The identifier an index records; change it whenever your vectors change.
const MODEL_ID: &str = "example/char-trigrams-v1";

/// Buckets when the config sets no `dimension`.
const DEFAULT_DIMENSION: u32 = 256;

/// Characters read per text: the rest is ignored (declared to the host as
/// `max-input-tokens`; a character is this embedder's token).
const MAX_CHARS: u32 = 8192;

/// What `init` set up, and what `health` reports.
struct State {
    dimension: u32,
    processed: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

struct Template;

impl Guest for Template {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let mut dimension = DEFAULT_DIMENSION;
        for (key, value) in &config {
            match key.as_str() {
                "dimension" => {
                    dimension = value
                        .parse()
                        .ok()
                        .filter(|d| (8..=4096).contains(d))
                        .ok_or_else(|| {
                            EmbedError::InvalidConfig(format!(
                                "`dimension = {value}`: expected a whole number from 8 to 4096"
                            ))
                        })?;
                }
                other => {
                    return Err(EmbedError::InvalidConfig(format!(
                        "unknown key `{other}` (known: dimension)"
                    )));
                }
            }
        }
        host_log::log(Level::Debug, &format!("template: {dimension} buckets"));
        *lock() = Some(State {
            dimension,
            processed: 0,
        });
        Ok(ModelInfo {
            model_id: MODEL_ID.to_string(),
            dimension,
            max_input_tokens: MAX_CHARS,
            normalized: true,
        })
    }

    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let mut guard = lock();
        let state = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let dimension = state.dimension as usize;
        // One flat buffer, row after row: the contract's shape.
        let mut data = vec![0f32; texts.len() * dimension];
        for (text, row) in texts.iter().zip(data.chunks_exact_mut(dimension)) {
            embed_one(text, row);
        }
        state.processed += texts.len() as u64;
        Ok(Embeddings {
            dimension: state.dimension,
            data,
        })
    }

    fn health() -> HealthReport {
        HealthReport {
            memory_bytes: linear_memory_bytes(),
            processed: lock().as_ref().map_or(0, |s| s.processed),
        }
    }
}

/// Hashes `text`'s lowercase character trigrams into `row`, then scales it
/// to unit length. An empty text gets a fixed unit vector, so every vector
/// is normalized as declared.
fn embed_one(text: &str, row: &mut [f32]) {
    let chars: Vec<char> = std::iter::once(' ')
        .chain(text.chars().take(MAX_CHARS as usize).flat_map(char::to_lowercase))
        .chain(std::iter::once(' '))
        .collect();
    for gram in chars.windows(3) {
        let h = fnv1a(gram);
        let bucket = (h % row.len() as u64) as usize;
        // A second hash bit picks the sign, so collisions cancel out on
        // average instead of piling up.
        row[bucket] += if h & (1 << 63) == 0 { 1.0 } else { -1.0 };
    }
    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        row.iter_mut().for_each(|x| *x /= norm);
    } else {
        row[0] = 1.0;
    }
}

/// FNV-1a over the characters: stable across builds and platforms, so the
/// same text always gets the same vector.
fn fnv1a(chars: &[char]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in chars {
        for b in (*c as u32).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The instance's linear memory in bytes, for `health`: the host recycles
/// an instance whose memory keeps growing.
fn linear_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65_536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Locks the state. A poisoned lock means an earlier call trapped midway;
/// the host discards such an instance, so recovering the guard is safe.
fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

export!(Template);
