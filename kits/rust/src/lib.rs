//! An embedhost plugin in Rust: a component of the `model-plugin` world.
//!
//! The host runs its BERT engine (the model its config names; by default
//! all-MiniLM-L6-v2, 384 dimensions) beside this plugin, in the same
//! sandbox, and this plugin asks it for vectors through the `encoder`
//! import. What the plugin adds, set by `[plugin.config]` (every value a
//! string):
//!
//! - `dimensions = "N"`: keep the first N numbers of each vector and scale
//!   it back to unit length (Matryoshka truncation; a model trained for it
//!   keeps most of its quality, another loses some).
//! - `strip_markup = "true"`: remove HTML tags, Markdown heading marks and
//!   emphasis marks before encoding.
//! - `lowercase = "true"`: lowercase every text before encoding.
//!
//! Another key is refused naming it, except those the host passes a plugin
//! given a model (`model_id`, `pooling`, `normalize`): the encoder already
//! follows them, and they are accepted so that one table serves both.
//! The Python and JavaScript kits do exactly the same.
//!
//! Errors are values: return an `EmbedError`. A panic is a trap, and the
//! host replaces the instance.

use std::sync::Mutex;

wit_bindgen::generate!({
    path: "wit",
    world: "model-plugin",
});

use embedhost::embedder::encoder::{self, EncoderInfo};
use embedhost::embedder::host_log::{self, Level};
use embedhost::embedder::types::{
    EmbedError, Embeddings, HealthReport, InputKind, InvalidInput, ModelInfo,
};
use exports::embedhost::embedder::embedder::Guest;

/// Keys the host passes a plugin given a model: the encoder follows them.
const HOST_KEYS: [&str; 3] = ["model_id", "pooling", "normalize"];
const KEYS: [&str; 3] = ["dimensions", "strip_markup", "lowercase"];

struct Settings {
    dimensions: u32,
    strip_markup: bool,
    lowercase: bool,
}

struct State {
    settings: Settings,
    encoder: EncoderInfo,
    processed: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

struct Plugin;

impl Guest for Plugin {
    fn init(config: Vec<(String, String)>) -> Result<ModelInfo, EmbedError> {
        let encoder = encoder::info();
        let settings = parse_config(&config, encoder.dimension)?;
        host_log::log(
            Level::Debug,
            &format!("rust kit: {} dimensions", settings.dimensions),
        );
        let info = ModelInfo {
            model_id: model_id(&encoder.model_id, &settings, encoder.dimension),
            dimension: settings.dimensions,
            max_input_tokens: encoder.max_input_tokens,
            normalized: true,
        };
        let processed = lock().as_ref().map_or(0, |s| s.processed);
        *lock() = Some(State {
            settings,
            encoder,
            processed,
        });
        Ok(info)
    }

    // `kind` is not used: the host puts a model's query or document prompt
    // before each text itself.
    fn embed(texts: Vec<String>, _kind: InputKind) -> Result<Embeddings, EmbedError> {
        let mut guard = lock();
        let state = guard.as_mut().ok_or(EmbedError::NotInitialized)?;
        let keep = state.settings.dimensions as usize;
        let prepared: Vec<String> = texts.iter().map(|t| prepare(t, &state.settings)).collect();
        let mut data = Vec::with_capacity(texts.len() * keep);
        let step = state.encoder.max_batch.max(1) as usize;
        for (chunk, batch) in prepared.chunks(step).enumerate() {
            let start = (chunk * step) as u32;
            let got = encoder::encode(batch).map_err(|e| match e {
                // The encoder's error, unchanged, its index in this batch.
                EmbedError::InvalidInput(bad) => EmbedError::InvalidInput(InvalidInput {
                    index: bad.index + start,
                    reason: bad.reason,
                }),
                other => other,
            })?;
            cut(&got.data, got.dimension as usize, keep, &mut data);
        }
        state.processed += texts.len() as u64;
        Ok(Embeddings {
            dimension: state.settings.dimensions,
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

fn parse_config(
    config: &[(String, String)],
    encoder_dimension: u32,
) -> Result<Settings, EmbedError> {
    let mut settings = Settings {
        dimensions: encoder_dimension,
        strip_markup: false,
        lowercase: false,
    };
    for (key, value) in config {
        match key.as_str() {
            "dimensions" => {
                settings.dimensions = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=encoder_dimension).contains(n))
                    .ok_or_else(|| {
                        EmbedError::InvalidConfig(format!(
                            "`dimensions = {value}`: expected a whole number from 1 to {encoder_dimension} (the encoder's dimension)"
                        ))
                    })?;
            }
            "strip_markup" => settings.strip_markup = parse_bool(key, value)?,
            "lowercase" => settings.lowercase = parse_bool(key, value)?,
            other if HOST_KEYS.contains(&other) => {}
            other => {
                return Err(EmbedError::InvalidConfig(format!(
                    "unknown key `{other}` (known: {})",
                    KEYS.join(", ")
                )));
            }
        }
    }
    Ok(settings)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, EmbedError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(EmbedError::InvalidConfig(format!(
            "`{key} = {value}`: expected true or false"
        ))),
    }
}

/// The encoder's model id, with a mark for each setting that changes the
/// vectors: an index made with one is refused by another.
fn model_id(base: &str, settings: &Settings, encoder_dimension: u32) -> String {
    let mut out = base.to_string();
    if settings.dimensions < encoder_dimension {
        out += &format!("+d{}", settings.dimensions);
    }
    if settings.strip_markup {
        out += "+strip";
    }
    if settings.lowercase {
        out += "+lower";
    }
    out
}

fn prepare(text: &str, settings: &Settings) -> String {
    let mut out = text.to_string();
    if settings.strip_markup {
        out = strip_emphasis(&strip_headings(&strip_tags(&out)));
    }
    if settings.lowercase {
        out = out.to_lowercase();
    }
    out
}

/// `<` then a letter, `/` or `!`, up to the next `>` with no `<` inside.
fn strip_tags(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let opens = chars[i] == '<'
            && chars
                .get(i + 1)
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == '/' || *c == '!');
        if opens {
            let end = (i + 1..chars.len())
                .find(|&e| chars[e] == '<' || chars[e] == '>')
                .unwrap_or(chars.len());
            if end < chars.len() && chars[end] == '>' {
                i = end + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// One to six `#` at the start of a line, and the spaces or tabs after.
fn strip_headings(text: &str) -> String {
    text.split('\n')
        .map(|line| {
            let rest = line.trim_start_matches('#');
            let hashes = line.len() - rest.len();
            if (1..=6).contains(&hashes) && (rest.starts_with(' ') || rest.starts_with('\t')) {
                rest.trim_start_matches([' ', '\t'])
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// ASCII whitespace and punctuation: what ends a word for emphasis marks.
fn boundary(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c' | '\x0b')
}

/// A run of `*` and `_` is dropped unless a word character stands on both
/// sides of it (`snake_case` and `2*3` stay).
fn strip_emphasis(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mark = |c: char| c == '*' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !mark(chars[i]) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let end = (i..chars.len())
            .find(|&e| !mark(chars[e]))
            .unwrap_or(chars.len());
        let before = if i > 0 { chars[i - 1] } else { ' ' };
        let after = chars.get(end).copied().unwrap_or(' ');
        if !boundary(before) && !boundary(after) {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    out
}

/// Each row of `width` floats cut to its first `keep`, at unit length,
/// appended to `out`.
fn cut(data: &[f32], width: usize, keep: usize, out: &mut Vec<f32>) {
    for row in data.chunks_exact(width.max(1)) {
        let row = &row[..keep.min(row.len())];
        let norm = row
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            out.extend(row.iter().map(|x| (f64::from(*x) / norm) as f32));
        } else {
            out.extend_from_slice(row);
        }
    }
}

/// The instance's linear memory in bytes, for `health`.
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

export!(Plugin);

/// `cargo test` runs these natively (no component, no encoder). The same
/// texts give the same results in the Python and JavaScript kits.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_stripped_and_words_are_kept() {
        let settings = Settings {
            dimensions: 4,
            strip_markup: true,
            lowercase: true,
        };
        for (text, want) in [
            (
                "<b>Hello</b> **World** and snake_case 2*3",
                "hello world and snake_case 2*3",
            ),
            (
                "# Title\n## Sub  heading\n#hashtag\n####### seven",
                "title\nsub  heading\n#hashtag\n####### seven",
            ),
            ("a < b > c <!-- x --> <br/>", "a < b > c  "),
            ("_under_ *star* __x__ ***", "under star x "),
            ("Grüße <i>aus</i> KÖLN_", "grüße aus köln"),
            ("ΣΑΣ", "σας"),
        ] {
            assert_eq!(prepare(text, &settings), want, "{text:?}");
        }
    }

    #[test]
    fn settings_are_checked_naming_the_key() {
        let refused = |key: &str, value: &str| match parse_config(&[(key.into(), value.into())], 4)
        {
            Err(EmbedError::InvalidConfig(message)) => message,
            _ => panic!("{key} = {value} accepted"),
        };
        for value in ["0", "5", "x", "", "+1"] {
            assert!(refused("dimensions", value).contains("`dimensions = "));
        }
        assert!(refused("colour", "red").contains("unknown key `colour`"));
        assert!(refused("lowercase", "yes").contains("`lowercase = yes`"));
        let host = [
            ("model_id".into(), "m".into()),
            ("normalize".into(), "false".into()),
        ];
        assert_eq!(parse_config(&host, 4).ok().map(|s| s.dimensions), Some(4));
    }

    #[test]
    fn a_cut_row_has_unit_length() {
        let mut out = Vec::new();
        cut(&[1.0, 2.0, 2.0, 0.0, 3.0, 4.0, 0.0, 9.0], 4, 2, &mut out);
        let want = [0.447_213_6, 0.894_427_2, 0.6, 0.8];
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
    }
}
