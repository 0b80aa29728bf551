//! Keyword search: BM25 over the chunks' text (the `chunks_fts` table),
//! and how a typed query becomes an FTS5 expression.
//!
//! # Invariants
//! - A query never reaches FTS5 as typed: every word and phrase is quoted,
//!   so no input is read as FTS5 syntax.
//! - Stopwords are left out unless quoted or all there is; very common
//!   words are left out only when a rarer word is there to rank by (or, in
//!   a fused search, when BM25 weighs them at zero).

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::limits;

impl Store {
    /// The chunks whose text best matches `query`'s words (BM25), best
    /// first, with their scores (higher is better), at most `limit`.
    ///
    /// Words in a large share of the chunks carry almost no weight in BM25,
    /// yet scoring every chunk they occur in is nearly all of a query's
    /// time. So a word in more than [`limits::KEYWORD_COMMON_SHARE`] of the
    /// chunks is left out when a rarer word is there to rank by; and when
    /// `fused` (the keyword half of a hybrid search, where meaning ranks
    /// too), a word in more than [`limits::KEYWORD_WEIGHTLESS_SHARE`],
    /// which BM25 weighs at zero, is left out even if nothing is left.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn keyword(
        &self,
        query: &str,
        limit: usize,
        fused: bool,
    ) -> Result<Vec<(i64, f32)>, StoreError> {
        let parts = query_parts(query);
        let mut parts = content(&parts);
        if parts.len() > 1 || fused {
            let total = self.total()? as f64;
            // Each part's share of the chunks; `None` for a phrase, which
            // is rarer than its words and always kept.
            let mut shares = Vec::with_capacity(parts.len());
            for part in &parts {
                shares.push(match &part.token {
                    Some(token) => Some(self.documents_with(token)? as f64 / total.max(1.0)),
                    None => None,
                });
            }
            // Common words go only for a rarer word that occurs: one that
            // is in no chunk ranks nothing.
            let rarer_occurs = shares
                .iter()
                .any(|s| s.is_none_or(|s| s > 0.0 && s <= limits::KEYWORD_COMMON_SHARE));
            let under = |share: f64| -> Vec<&Part> {
                parts
                    .iter()
                    .zip(&shares)
                    .filter(|(_, s)| s.is_none_or(|s| s <= share))
                    .map(|(p, _)| *p)
                    .collect()
            };
            if rarer_occurs {
                parts = under(limits::KEYWORD_COMMON_SHARE);
            } else if fused {
                parts = under(limits::KEYWORD_WEIGHTLESS_SHARE);
            }
        }
        let Some(expression) = expression(&parts) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?1
                 ORDER BY bm25(chunks_fts) LIMIT ?2",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![expression, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, -(r.get::<_, f64>(1)? as f32)))
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Chunks stored (counted once, until the next write).
    fn total(&self) -> Result<u64, StoreError> {
        if let Some(n) = self.total.get() {
            return Ok(n);
        }
        let n = self
            .conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get::<_, i64>(0))
            .map_err(self.sql())? as u64;
        self.total.set(Some(n));
        Ok(n)
    }

    /// Chunks whose text holds `token` (as the keyword index folds it), by
    /// FTS5's own vocabulary: one lookup, no scan.
    fn documents_with(&self, token: &str) -> Result<u64, StoreError> {
        if !self.vocab.get() {
            // A temp table: nothing is written to the index file, and it
            // works on an index of any version that has `chunks_fts`.
            self.conn
                .execute_batch(
                    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab
                     USING fts5vocab(main, chunks_fts, row);",
                )
                .map_err(self.sql())?;
            self.vocab.set(true);
        }
        self.conn
            .prepare_cached("SELECT doc FROM temp.chunks_vocab WHERE term = ?1")
            .and_then(|mut s| s.query_row([token], |r| r.get::<_, i64>(0)).optional())
            .map(|n| n.unwrap_or(0) as u64)
            .map_err(self.sql())
    }
}

/// Words left out of a keyword query (unless quoted, or all there is): the
/// commonest English function words. They occur in nearly every chunk, so
/// they carry no topic, yet BM25 still rewards a chunk for them: left in,
/// "why is my plant dying" ranks any text full of "why", "is" and "my"
/// above the one about plants, and hybrid search gets worse than meaning
/// alone on questions.
pub const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "because", "been", "before", "being", "but", "by", "can", "could", "did", "do", "does",
    "doing", "for", "from", "get", "got", "had", "has", "have", "having", "he", "her", "here",
    "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "just", "keep", "keeps", "me",
    "more", "most", "my", "no", "not", "of", "on", "one", "or", "our", "out", "over", "she",
    "should", "so", "some", "than", "that", "the", "their", "them", "then", "there", "these",
    "they", "this", "those", "to", "too", "up", "us", "very", "was", "we", "were", "what", "when",
    "where", "which", "while", "who", "why", "will", "with", "would", "you", "your",
];

/// An FTS5 query for what a person typed: each word ([`STOPWORDS`] left
/// out), and each "quoted phrase", becomes a phrase of its own (so FTS5's syntax characters are
/// only ever text, and `a::b`, `a.b`, `a-b` match as written), any of which
/// may match; BM25 ranks chunks with more and rarer matches first. `None`
/// if nothing searchable is left.
pub fn fts_query(query: &str) -> Option<String> {
    expression(&content(&query_parts(query)))
}

/// One searchable part of a keyword query.
#[derive(Clone, Debug, PartialEq)]
struct Part {
    /// As FTS5 reads it: a quoted phrase.
    phrase: String,
    /// An unquoted stopword.
    stop: bool,
    /// The single token it is, lower-cased, when it is one unquoted word
    /// (its document frequency can be looked up).
    token: Option<String>,
}

/// The parts of `query`: each word, and each "quoted phrase", cleaned to
/// the characters the tokenizer keeps.
fn query_parts(query: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = query;
    while !rest.is_empty() {
        let (part, quoted, next) = match rest.find('"') {
            Some(0) => match rest[1..].find('"') {
                Some(end) => (&rest[1..=end], true, &rest[end + 2..]),
                None => (&rest[1..], true, ""),
            },
            Some(q) => (&rest[..q], false, &rest[q..]),
            None => (rest, false, ""),
        };
        let words: Vec<&str> = if quoted {
            vec![part]
        } else {
            part.split_whitespace().collect()
        };
        for word in words {
            // Only letters, digits and the characters of identifiers count;
            // the tokenizer splits on the rest anyway.
            let clean: String = word
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '_' {
                        c
                    } else {
                        ' '
                    }
                })
                .collect();
            let tokens: Vec<&str> = clean.split_whitespace().collect();
            if tokens.is_empty() {
                continue;
            }
            let lower = tokens.join(" ").to_lowercase();
            parts.push(Part {
                phrase: format!("\"{}\"", tokens.join(" ")),
                stop: !quoted && STOPWORDS.contains(&lower.as_str()),
                token: (!quoted && tokens.len() == 1).then_some(lower),
            });
        }
        rest = next;
    }
    parts
}

/// The parts worth searching: all but the stopwords, or the stopwords if
/// they are all there is.
fn content(parts: &[Part]) -> Vec<&Part> {
    let words: Vec<&Part> = parts.iter().filter(|p| !p.stop).collect();
    if words.is_empty() {
        parts.iter().collect()
    } else {
        words
    }
}

/// The FTS5 expression matching any of `parts`, or `None` if empty.
fn expression(parts: &[&Part]) -> Option<String> {
    (!parts.is_empty()).then(|| {
        parts
            .iter()
            .map(|p| p.phrase.as_str())
            .collect::<Vec<_>>()
            .join(" OR ")
    })
}
