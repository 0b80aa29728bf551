//! Where a model's tokens are: the model's own tokenizer
//! (`tokenizer.json` in its directory), or words for an embedder without
//! one. Shared by the front door (counting a job's tokens), the worker's
//! chunker and the HTTP routes that show tokens, so all count alike.
//!
//! Invariant: every count the host makes goes through [`Tokens::spans`],
//! which counts its calls in [`METRIC_TOKENIZER_CALLS`], so a test can
//! see that a text is tokenized once.

use std::path::Path;
use std::sync::Arc;

use embedhost_text::{TextEncoder, TextError};

/// The tokenizer's file in a model's directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Texts the host has tokenized (each call of [`Tokens::spans`]).
pub const METRIC_TOKENIZER_CALLS: &str = "tokenizer_calls_total";

/// What tells the host where the tokens of a text are.
#[derive(Clone, Debug)]
pub enum Tokens {
    /// The model's own tokenizer (`tokenizer.json`): chunks fit exactly.
    Model(Arc<TextEncoder>),
    /// Whitespace-separated words, for an embedder without a tokenizer the
    /// host can read (the stub): a word is at least one token of any model.
    Words,
}

/// The tokenizer's refusal of a text: its [`TextError`], shared so that the
/// errors holding it stay `Clone` (two are equal when their messages are).
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct TokenizeError(Arc<TextError>);

impl From<TextError> for TokenizeError {
    fn from(e: TextError) -> Self {
        TokenizeError(Arc::new(e))
    }
}

impl PartialEq for TokenizeError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for TokenizeError {}

impl Tokens {
    /// The tokenizer in the model directory `dir`, reading at most
    /// `max_tokens` per text.
    ///
    /// # Errors
    /// The tokenizer file cannot be read or parsed.
    pub fn from_model_dir(dir: &Path, max_tokens: usize) -> Result<Tokens, TextError> {
        TextEncoder::from_file(&dir.join(TOKENIZER_FILE), max_tokens)
            .map(|encoder| Tokens::Model(Arc::new(encoder)))
    }

    /// Byte ranges of the tokens of `text`.
    ///
    /// # Errors
    /// [`TokenizeError`]: the tokenizer's error.
    pub fn spans(&self, text: &str) -> Result<Vec<(usize, usize)>, TokenizeError> {
        metrics::counter!(METRIC_TOKENIZER_CALLS).increment(1);
        match self {
            Tokens::Model(encoder) => Ok(encoder.token_spans(text)?),
            Tokens::Words => Ok(word_spans(text)),
        }
    }
}

fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, text.len()));
    }
    spans
}
