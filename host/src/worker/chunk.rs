//! Cutting a file's text into chunks the embedder takes whole.
//!
//! # Invariants
//! - A chunk holds at most [`ChunkSettings::tokens`] of the model's tokens
//!   (special tokens excluded), so the embedder never truncates one: every
//!   token of the file is in some chunk.
//! - Consecutive chunks share [`ChunkSettings::overlap`] tokens, so a
//!   sentence cut at a boundary is whole in one of them.
//! - A chunk's text is the file's text from its first token's start to its
//!   last token's end, and its lines are where those bytes are (1-based,
//!   inclusive), so `path:start_line` points at it.

/// How files are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSettings {
    /// Tokens per chunk, special tokens excluded.
    pub tokens: usize,
    /// Tokens each chunk repeats from the one before.
    pub overlap: usize,
}

pub use crate::limits::{DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS};
use crate::tokens::TokenizeError;

impl Default for ChunkSettings {
    fn default() -> Self {
        ChunkSettings {
            tokens: DEFAULT_CHUNK_TOKENS,
            overlap: DEFAULT_CHUNK_OVERLAP,
        }
    }
}

impl ChunkSettings {
    /// These settings fitted to a model that reads at most `max_input_tokens`
    /// (special tokens included).
    pub fn fitted(self, max_input_tokens: usize) -> Self {
        let tokens = self.tokens.min(max_input_tokens.saturating_sub(2)).max(1);
        ChunkSettings {
            tokens,
            overlap: self.overlap.min(tokens / 2),
        }
    }
}

pub use crate::tokens::Tokens;

/// One chunk of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Its text.
    pub text: String,
    /// First and last line it covers, 1-based.
    pub start_line: u32,
    /// Last line (inclusive).
    pub end_line: u32,
    /// Its tokens, as the model's tokenizer cut them (special tokens
    /// excluded): the front door takes this count instead of tokenizing
    /// the chunk again.
    pub tokens: usize,
}

/// Cuts `text` into chunks of `settings.tokens` tokens overlapping by
/// `settings.overlap`. A text without tokens (empty, blank) has no chunk.
///
/// # Errors
/// [`TokenizeError`]: the tokenizer's error.
pub fn chunk(
    text: &str,
    tokens: &Tokens,
    settings: ChunkSettings,
) -> Result<Vec<Chunk>, TokenizeError> {
    let spans = tokens.spans(text)?;
    let size = settings.tokens.max(1);
    let step = size.saturating_sub(settings.overlap).max(1);
    // Line number of a byte offset: count newlines once, search them.
    let newlines: Vec<usize> = text
        .bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let line_of = |offset: usize| (newlines.partition_point(|&n| n < offset) + 1) as u32;
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < spans.len() {
        let last = (first + size).min(spans.len()) - 1;
        let (start, end) = (spans[first].0, spans[last].1);
        chunks.push(Chunk {
            text: text[start..end].to_string(),
            start_line: line_of(start),
            end_line: line_of(end.saturating_sub(1).max(start)),
            tokens: last + 1 - first,
        });
        if last + 1 == spans.len() {
            break;
        }
        first += step;
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_word_overlap_and_name_their_lines() {
        let text: String = (0..25).map(|i| format!("w{i}\n")).collect();
        let settings = ChunkSettings {
            tokens: 10,
            overlap: 3,
        };
        let chunks = chunk(&text, &Tokens::Words, settings).unwrap();
        let words: Vec<Vec<&str>> = chunks
            .iter()
            .map(|c| c.text.split_whitespace().collect())
            .collect();
        assert_eq!(words[0].first(), Some(&"w0"));
        assert_eq!(words[0].len(), 10);
        assert_eq!(words[1].first(), Some(&"w7"), "3 words of overlap");
        assert_eq!(
            words.last().unwrap().last(),
            Some(&"w24"),
            "nothing cut off"
        );
        assert_eq!((chunks[0].start_line, chunks[0].end_line), (1, 10));
        assert_eq!((chunks[1].start_line, chunks[1].end_line), (8, 17));
        assert_eq!(chunks.len(), 4);
    }

    #[test]
    fn short_and_empty_texts() {
        let one = chunk("  hello world  ", &Tokens::Words, ChunkSettings::default()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].text, "hello world");
        assert!(
            chunk(" \n\t", &Tokens::Words, ChunkSettings::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn settings_fit_the_model() {
        let s = ChunkSettings::default().fitted(128);
        assert_eq!((s.tokens, s.overlap), (126, 32));
        let tiny = ChunkSettings::default().fitted(8);
        assert_eq!((tiny.tokens, tiny.overlap), (6, 3));
    }
}
