//! How `search` shows a result to a person: the lines of a chunk that best
//! match the query (`--context N`), and the query's words highlighted on a
//! terminal.
//!
//! Invariants:
//! - Matching is ASCII-case-insensitive on bytes and only ever starts at a
//!   byte that begins a character (the query is UTF-8), so highlighting
//!   never splits a character and never panics on any text.
//! - Highlighting adds escape codes only when asked (stdout is a terminal
//!   and `NO_COLOR` is unset): piped output is the plain text.
//! - The lines shown are the chunk's own, numbered from its `start_line`:
//!   the file may have changed since it was indexed, the chunk has not.

use crate::worker::store::STOPWORDS;

/// The start and end of a highlighted match on a terminal (bold red, as
/// grep and ripgrep mark matches).
const MARK: (&str, &str) = ("\x1b[1;31m", "\x1b[0m");

/// The query's terms as a person means them: each "quoted phrase" whole,
/// each other word with the punctuation around it trimmed (inner `_`, `::`,
/// `.` and `-` kept, so identifiers stay whole), lower-cased; stopwords and
/// one-character words left out unless nothing else is left.
pub fn terms(query: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    for (i, part) in query.split('"').enumerate() {
        if i % 2 == 1 {
            let phrase = part.trim().to_ascii_lowercase();
            if !phrase.is_empty() {
                out.push(phrase);
            }
            continue;
        }
        for word in part.split_whitespace() {
            let word = word
                .trim_matches(|c: char| !(c.is_alphanumeric() || c == '_'))
                .to_ascii_lowercase();
            if !word.is_empty() {
                words.push(word);
            }
        }
    }
    let kept: Vec<String> = words
        .iter()
        .filter(|w| w.chars().count() > 1 && !STOPWORDS.contains(&w.as_str()))
        .cloned()
        .collect();
    out.extend(if kept.is_empty() { words } else { kept });
    out.sort();
    out.dedup();
    out
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The byte ranges of `line` where a term matches as a whole word (or
/// phrase), ASCII-case-insensitively; overlapping matches are merged.
pub fn matches(line: &str, terms: &[String]) -> Vec<(usize, usize)> {
    let bytes = line.as_bytes();
    let mut found = Vec::new();
    for term in terms {
        let t = term.as_bytes();
        if t.is_empty() || t.len() > bytes.len() {
            continue;
        }
        for start in 0..=bytes.len() - t.len() {
            let end = start + t.len();
            if !bytes[start..end].eq_ignore_ascii_case(t) {
                continue;
            }
            let before = start == 0 || !is_word_byte(bytes[start - 1]) || !is_word_byte(t[0]);
            let after =
                end == bytes.len() || !is_word_byte(bytes[end]) || !is_word_byte(t[t.len() - 1]);
            if before && after {
                found.push((start, end));
            }
        }
    }
    found.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(found.len());
    for (s, e) in found {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// `line` with each match of `terms` marked when `color`, else as it is.
pub fn highlight(line: &str, terms: &[String], color: bool) -> String {
    if !color {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len() + 16);
    let mut at = 0;
    for (s, e) in matches(line, terms) {
        out.push_str(&line[at..s]);
        out.push_str(MARK.0);
        out.push_str(&line[s..e]);
        out.push_str(MARK.1);
        at = e;
    }
    out.push_str(&line[at..]);
    out
}

/// The lines of a chunk to show with `--context n`: the line matching the
/// most distinct terms (the first such; the chunk's first non-blank line if
/// none matches, as for a hit by meaning alone) and `n` lines either side,
/// within the chunk. Each is `(line number, text)`, numbered from
/// `start_line`.
pub fn context<'a>(
    text: &'a str,
    start_line: u32,
    terms: &[String],
    n: usize,
) -> Vec<(u32, &'a str)> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return Vec::new();
    }
    let score = |line: &str| {
        terms
            .iter()
            .filter(|t| !matches(line, std::slice::from_ref(t)).is_empty())
            .count()
    };
    let mut best = (
        0,
        lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(0),
    );
    for (i, line) in lines.iter().enumerate() {
        let s = score(line);
        if s > best.0 {
            best = (s, i);
        }
    }
    let first = best.1.saturating_sub(n);
    let last = (best.1 + n).min(lines.len() - 1);
    (first..=last)
        .map(|i| (start_line.saturating_add(i as u32), lines[i]))
        .collect()
}

/// Whether to mark matches: stdout is a terminal and `NO_COLOR` is unset
/// (<https://no-color.org>).
pub fn color_wanted() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Longest piece of indexed text or path shown on one line: a path is at
/// most 4096 bytes (`PATH_MAX`), and a chunk's line is cut here too.
pub const SHOWN_TEXT_MAX: usize = 4096;

/// `text` from the index (a file's words, a skip reason) made safe for a
/// terminal: control, line-breaking and bidi characters escaped
/// ([`crate::untrusted::sanitize`]), so a file cannot drive the terminal
/// that shows it.
pub fn safe(text: &str) -> String {
    crate::untrusted::sanitize(text, SHOWN_TEXT_MAX)
}

/// A file's path, made safe as [`safe`] makes text.
pub fn safe_path(path: &std::path::Path) -> String {
    safe(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_keep_identifiers_and_phrases_and_drop_stopwords() {
        assert_eq!(
            terms(r#"how do I use std::fs::read_to_string with "exact words"?"#),
            vec!["exact words", "std::fs::read_to_string", "use"]
        );
        assert_eq!(terms("the"), vec!["the"]);
        assert!(terms("  \"\" ").is_empty());
    }

    #[test]
    fn matches_are_whole_words_case_insensitive_and_merged() {
        let t = terms("Tyre puncture");
        assert_eq!(
            matches("A tyre, a TYRES, a puncture-kit", &t),
            vec![(2, 6), (19, 27)]
        );
        assert_eq!(
            highlight("fix the Tyre", &t, true),
            "fix the \x1b[1;31mTyre\x1b[0m"
        );
        assert_eq!(highlight("fix the Tyre", &t, false), "fix the Tyre");
        // Non-ASCII text around and inside never splits a character.
        let t = terms("café");
        assert_eq!(
            highlight("un café noir", &t, true),
            "un \x1b[1;31mcafé\x1b[0m noir"
        );
        assert_eq!(highlight("ééé", &terms("é"), true), "ééé");
    }

    #[test]
    fn context_centres_on_the_best_line_within_the_chunk() {
        let text = "one\ntwo tyre\nthree\nfour tyre puncture\nfive\nsix";
        let t = terms("tyre puncture");
        assert_eq!(
            context(text, 10, &t, 1),
            vec![(12, "three"), (13, "four tyre puncture"), (14, "five")]
        );
        assert_eq!(context(text, 10, &t, 0), vec![(13, "four tyre puncture")]);
        // No line matches: the first non-blank line, clipped to the chunk.
        assert_eq!(
            context("\nalpha\nbeta", 1, &terms("zeta"), 1),
            vec![(1, ""), (2, "alpha"), (3, "beta")]
        );
        assert!(context("", 1, &t, 3).is_empty());
    }
}
