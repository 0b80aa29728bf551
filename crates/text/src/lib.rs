//! The text side of a sentence-embedding model, shared by every engine:
//! tokenization with the model's own `tokenizer.json`, truncation, padding
//! into a rectangular batch, and pooling over the attention mask (every mode
//! of sentence-transformers' `Pooling`, in [`pool`]) with optional L2
//! normalization.
//!
//! The native ONNX child and the WASM model plugin both call this crate, so
//! the two backends feed their inference engines the same token ids and turn
//! the same hidden states into the same vectors; only the matrix arithmetic
//! in between differs.
//!
//! # Invariants
//! - A text longer than the model's limit is truncated to
//!   [`TextEncoder::max_tokens`] tokens (special tokens included), never
//!   refused: callers that must not lose text (the indexer) chunk first with
//!   [`TextEncoder::count_tokens`].
//! - A batch is padded to its longest member; padding has attention mask 0
//!   and never contributes to a pooled vector.
//! - Pooling sees only real tokens (at least one: every encoding carries the
//!   model's special tokens; see [`pool`]), and normalization leaves a zero
//!   vector zero rather than dividing by zero, as sentence-transformers does
//!   (`max(norm, 1e-12)`).
//! - Pure Rust (the tokenizer's regexes are fancy-regex, not oniguruma), so it
//!   builds unchanged for `wasm32-wasip2`.

use std::path::Path;

use tokenizers::{Encoding, Tokenizer, TruncationParams};

mod pool;
pub use pool::{Pooling, pool};

/// Smallest norm divided by when normalizing; sentence-transformers' value.
pub const NORM_EPSILON: f32 = 1e-12;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer file could not be read.
    #[error("cannot read tokenizer `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The tokenizer definition is not one the `tokenizers` crate accepts.
    #[error("invalid tokenizer `{origin}`: {message}")]
    Invalid { origin: String, message: String },
    /// Tokenizing a batch failed.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// The hidden states do not have the shape the batch implies.
    #[error(
        "hidden states have {got} values, expected {expected} (batch {batch} x tokens {tokens} x dimension {dimension})"
    )]
    Shape {
        got: usize,
        expected: usize,
        batch: usize,
        tokens: usize,
        dimension: usize,
    },
}

/// A tokenized batch, row-major `[batch, tokens]`, ready for a BERT-style
/// graph's `input_ids`, `attention_mask` and `token_type_ids`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Number of texts.
    pub batch: usize,
    /// Tokens per text after padding.
    pub tokens: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

/// One token of a text (see [`TextEncoder::tokens`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Its id in the vocabulary.
    pub id: u32,
    /// Its part of the text, or the token itself if it is special.
    pub text: String,
    /// Whether the tokenizer added it (`[CLS]`, `[SEP]`).
    pub special: bool,
    /// Its byte range in the text (none for a special token).
    pub start: Option<usize>,
    /// See `start`.
    pub stop: Option<usize>,
}

/// A model's tokenizer, configured to truncate and pad.
#[derive(Clone)]
pub struct TextEncoder {
    /// Truncates, does not pad: for batches (padded here, per group).
    tokenizer: Tokenizer,
    /// Neither truncates nor pads: for counting.
    counter: Tokenizer,
    max_tokens: usize,
    /// The model's padding token and its type id.
    pad_id: i64,
    pad_type_id: i64,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl TextEncoder {
    /// Loads `tokenizer.json` from `path`.
    ///
    /// # Errors
    /// [`TextError::Read`] or [`TextError::Invalid`], naming the file.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self, TextError> {
        let bytes = std::fs::read(path).map_err(|source| TextError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, &path.display().to_string(), max_tokens)
    }

    /// Parses a `tokenizer.json` held in memory; `origin` names it in errors.
    ///
    /// # Errors
    /// [`TextError::Invalid`] if the definition does not parse.
    pub fn from_bytes(bytes: &[u8], origin: &str, max_tokens: usize) -> Result<Self, TextError> {
        let invalid = |message: String| TextError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let mut tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| invalid(e.to_string()))?;
        let mut counter = tokenizer.clone();
        counter
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        counter.with_padding(None);
        let max_tokens = max_tokens.max(2);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| invalid(e.to_string()))?;
        // Keep the model's own pad token if it names one (all-MiniLM-L6-v2's
        // pads to a fixed 128; we pad per batch instead, on the right, as
        // sentence-transformers does).
        let padding = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(None);
        Ok(TextEncoder {
            tokenizer,
            counter,
            max_tokens,
            pad_id: i64::from(padding.pad_id),
            pad_type_id: i64::from(padding.pad_type_id),
        })
    }

    /// The most tokens one text is given, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokens `text` has before truncation, special tokens included: what a
    /// chunker compares with [`Self::max_tokens`].
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer fails.
    pub fn count_tokens(&self, text: &str) -> Result<usize, TextError> {
        let encoding = self
            .counter
            .encode(text, true)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(encoding.len())
    }

    /// The byte range in `text` of each of its tokens, special tokens left
    /// out, with no truncation: what a chunker cuts a long text by, so that
    /// every chunk fits the model and nothing is truncated away.
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer fails.
    pub fn token_spans(&self, text: &str) -> Result<Vec<(usize, usize)>, TextError> {
        let encoding = self
            .counter
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        // Offsets are in bytes (the tokenizer's default offset type); a
        // word piece's offsets are its part of the word.
        Ok(encoding
            .get_offsets()
            .iter()
            .copied()
            .filter(|(start, end)| end > start)
            .collect())
    }

    /// The tokens of `text` with no truncation, as TEI's `/tokenize` lists
    /// them: id, its part of the text (the token itself for a special one),
    /// whether it is special, and its byte range in `text` (none for a
    /// special token).
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer fails.
    pub fn tokens(&self, text: &str, add_special: bool) -> Result<Vec<Token>, TextError> {
        let encoding = self
            .counter
            .encode(text, add_special)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(encoding.get_special_tokens_mask())
            .map(|(((&id, token), &(start, stop)), &special)| {
                let special = special == 1;
                let part = (!special).then(|| text.get(start..stop)).flatten();
                Token {
                    id,
                    text: part.unwrap_or(token).to_string(),
                    special,
                    start: (!special).then_some(start),
                    stop: (!special).then_some(stop),
                }
            })
            .collect())
    }

    /// The text of token `ids`, without special tokens if `skip_special`.
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer cannot decode them (an id
    /// outside its vocabulary).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.counter
            .decode(ids, skip_special)
            .map_err(|e| TextError::Encode(e.to_string()))
    }

    /// Tokenizes, truncates and pads `texts` into one batch.
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer fails.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Batch, TextError> {
        let encodings = self.tokenize(texts)?;
        Ok(self.pad(&encodings.iter().collect::<Vec<_>>()))
    }

    /// Tokenizes `texts` once, sorts them by length and pads them in groups
    /// of at most `group`, each to its own longest text, so that short texts
    /// do not pay for a long one's padding. Each group comes with the
    /// indices (into `texts`) of its rows.
    ///
    /// # Errors
    /// [`TextError::Encode`] if the tokenizer fails.
    pub fn encode_by_length<S: AsRef<str>>(
        &self,
        texts: &[S],
        group: usize,
    ) -> Result<Vec<(Vec<usize>, Batch)>, TextError> {
        let encodings = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        Ok(order
            .chunks(group.max(1))
            .map(|rows| {
                let picked: Vec<&Encoding> = rows.iter().map(|&i| &encodings[i]).collect();
                (rows.to_vec(), self.pad(&picked))
            })
            .collect())
    }

    fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Encoding>, TextError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        self.tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| TextError::Encode(e.to_string()))
    }

    /// One batch of `rows`, padded on the right to the longest.
    fn pad(&self, rows: &[&Encoding]) -> Batch {
        let tokens = rows.iter().map(|e| e.len()).max().unwrap_or(0);
        let cells = rows.len() * tokens;
        let mut batch = Batch {
            batch: rows.len(),
            tokens,
            input_ids: Vec::with_capacity(cells),
            attention_mask: Vec::with_capacity(cells),
            token_type_ids: Vec::with_capacity(cells),
        };
        for encoding in rows {
            let padding = tokens - encoding.len();
            let widen = |v: &u32| i64::from(*v);
            batch.input_ids.extend(encoding.get_ids().iter().map(widen));
            batch
                .input_ids
                .extend(std::iter::repeat_n(self.pad_id, padding));
            batch
                .attention_mask
                .extend(encoding.get_attention_mask().iter().map(widen));
            batch.attention_mask.extend(std::iter::repeat_n(0, padding));
            batch
                .token_type_ids
                .extend(encoding.get_type_ids().iter().map(widen));
            batch
                .token_type_ids
                .extend(std::iter::repeat_n(self.pad_type_id, padding));
        }
        batch
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(NORM_EPSILON);
    for x in v {
        *x /= norm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with BERT's special tokens, small enough to
    /// write by hand.
    pub(crate) const TINY_TOKENIZER: &str = r#"{
      "version": "1.0",
      "truncation": null,
      "padding": null,
      "added_tokens": [],
      "normalizer": {"type": "Lowercase"},
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
          "[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
          "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}
        }
      },
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "hello": 4, "world": 5, "cats": 6}, "unk_token": "[UNK]"}
    }"#;

    fn encoder(max: usize) -> TextEncoder {
        TextEncoder::from_bytes(TINY_TOKENIZER.as_bytes(), "tiny", max).unwrap()
    }

    #[test]
    fn a_batch_is_padded_to_its_longest_text_with_mask_zero() {
        let batch = encoder(16).encode(&["hello world cats", "Hello"]).unwrap();
        assert_eq!((batch.batch, batch.tokens), (2, 5));
        assert_eq!(batch.input_ids, [1, 4, 5, 6, 2, 1, 4, 2, 0, 0]);
        assert_eq!(batch.attention_mask, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.token_type_ids, [0; 10]);
    }

    #[test]
    fn groups_by_length_pad_each_group_to_its_own_longest() {
        let groups = encoder(16)
            .encode_by_length(&["hello world cats", "hello", "cats world", "world"], 2)
            .unwrap();
        let rows: Vec<_> = groups.iter().map(|(rows, _)| rows.clone()).collect();
        assert_eq!(rows, [vec![1, 3], vec![2, 0]]);
        assert_eq!(groups[0].1.tokens, 3, "no padding among the short texts");
        assert_eq!(groups[1].1.input_ids, [1, 6, 5, 2, 0, 1, 4, 5, 6, 2]);
        assert_eq!(groups[1].1.attention_mask, [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn token_spans_are_byte_ranges_of_the_whole_text() {
        // Non-ASCII before the words: byte offsets, not character ones.
        let text = "Grüße, hello\nworld cats";
        let spans = encoder(4).token_spans(text).unwrap();
        let words: Vec<&str> = spans.iter().map(|&(s, e)| &text[s..e]).collect();
        assert_eq!(words, ["Grüße", ",", "hello", "world", "cats"]);
    }

    #[test]
    fn tokens_list_ids_parts_and_specials_and_decode_back() {
        let e = encoder(4);
        let tokens = e.tokens("hello world", true).unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 4, 5, 2]);
        assert!(tokens[0].special && tokens[0].start.is_none());
        assert_eq!(
            (tokens[2].text.as_str(), tokens[2].start, tokens[2].stop),
            ("world", Some(6), Some(11))
        );
        assert_eq!(e.tokens("hello world", false).unwrap().len(), 2);
        assert_eq!(e.decode(&ids[1..3], true).unwrap(), "hello world");
        assert!(e.decode(&ids, false).unwrap().contains("world"));
    }

    #[test]
    fn long_texts_are_truncated_and_counted_in_full() {
        let e = encoder(4);
        let text = "hello world cats hello world";
        assert_eq!(e.count_tokens(text).unwrap(), 7);
        let batch = e.encode(&[text]).unwrap();
        assert_eq!(batch.input_ids, [1, 4, 5, 2], "truncated, [SEP] kept");
    }

    #[test]
    fn unknown_words_map_to_unk_and_empty_text_keeps_special_tokens() {
        let batch = encoder(16).encode(&["zebra", ""]).unwrap();
        assert_eq!(batch.input_ids, [1, 3, 2, 1, 2, 0]);
    }

    #[test]
    fn zero_vectors_stay_zero() {
        let mut v = [0.0f32; 3];
        l2_normalize(&mut v);
        assert_eq!(v, [0.0; 3]);
    }

    #[test]
    fn a_broken_tokenizer_is_refused_with_its_origin() {
        let err = TextEncoder::from_bytes(b"{not json", "models/x/tokenizer.json", 8).unwrap_err();
        assert!(err.to_string().contains("models/x/tokenizer.json"), "{err}");
    }
}
