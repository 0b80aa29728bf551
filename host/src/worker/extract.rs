//! From a file's bytes to the text that is indexed, or the reason it is not.
//!
//! # Invariants
//! - Only text is indexed: a file with a NUL byte in its first
//!   [`BINARY_SNIFF_BYTES`] is binary (ripgrep's and git's heuristic), and a
//!   file that is not UTF-8 is undecodable. Either is skipped with its reason,
//!   never an error that stops indexing.
//! - Line numbers survive extraction: HTML loses its markup, `<script>` and
//!   `<style>` contents and comments, but every newline stays where it was, so
//!   a result's `path:line` points into the file as it is on disk.

use std::path::Path;

/// Bytes looked at for a NUL when deciding whether a file is binary.
pub const BINARY_SNIFF_BYTES: usize = 8 * 1024;

/// Why a file is not indexed. The string form (`reason`) is what stats and
/// the index record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("binary (a NUL byte in its first {BINARY_SNIFF_BYTES} bytes)")]
    /// A NUL byte in the first 8 KiB.
    Binary,
    #[error("too large ({size} bytes, the limit is {limit})")]
    /// Larger than `index.max_file_bytes`.
    TooLarge { size: u64, limit: u64 },
    #[error("not UTF-8 text (invalid byte at offset {offset})")]
    /// Not UTF-8 (the first bad byte).
    NotUtf8 { offset: usize },
    #[error("unreadable: {0}")]
    /// Could not be read.
    Unreadable(String),
    #[error("embedding failed: {0}")]
    /// The embedder refused a chunk of it.
    EmbedFailed(String),
    #[error("machine-made text ({0}); set `index.include_generated = true` to index it")]
    /// Generated, minified or lock-file text, by its shape ([`generated`]).
    Generated(String),
    #[error("not a regular file ({0}) when it was read")]
    /// Replaced, after the walk, by a link, a FIFO, a device or a folder.
    NotRegular(&'static str),
    #[error("outside the index's roots when it was read (a folder on its path was replaced)")]
    /// Its real path, read through the open file, is under no root.
    OutsideRoots,
}

impl Skip {
    /// A short, stable name for counting skips by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::Binary => "binary",
            Skip::TooLarge { .. } => "too_large",
            Skip::NotUtf8 { .. } => "not_utf8",
            Skip::Unreadable(_) => "unreadable",
            Skip::EmbedFailed(_) => "embed_failed",
            Skip::Generated(_) => "generated",
            Skip::NotRegular(_) => "not_regular",
            Skip::OutsideRoots => "outside_roots",
        }
    }
}

/// Texts shorter than this are never judged machine-made: too little to
/// tell a shape, and a short file costs little to index anyway.
pub const GENERATED_MIN_BYTES: usize = 2048;

/// A line longer than this is not written by a person: prose wraps or
/// breaks paragraphs well before, code style guides stop at 100 to 120.
pub const GENERATED_LONG_LINE: usize = 500;

/// Share of a text's bytes in long lines past which it is minified or
/// generated (a `searchindex.js` is one line of megabytes; minified CSS and
/// JS are a few very long lines).
pub const GENERATED_LONG_LINE_SHARE: f64 = 0.5;

/// Share of whitespace below which a long text is minified: prose and code
/// run at 15 to 25% (spaces, indentation, newlines), minified text near 0.
pub const GENERATED_MIN_WHITESPACE: f64 = 0.04;

/// Share of characters that are neither letters, digits nor whitespace
/// past which a text is data rather than words (JSON, SVG paths, escaped
/// blobs); code runs at 10 to 25%.
pub const GENERATED_MAX_NON_WORD: f64 = 0.4;

/// Share of a text's bytes in checksums ([`checksum_bytes`]) past which it
/// is a lock file or a manifest of checksums (`Cargo.lock`: 25%); code and
/// prose stay under 15%.
pub const GENERATED_HASH_SHARE: f64 = 0.2;

/// Why `text` looks machine-made, by its shape alone (line length, the
/// share of whitespace, of non-words and of hashes), or `None`. Names are
/// never looked at: a `notes.min.js` written by hand is indexed, a
/// generated `README` is not.
pub fn generated(text: &str) -> Option<String> {
    if text.len() < GENERATED_MIN_BYTES {
        return None;
    }
    let total = text.len() as f64;
    let long: usize = text
        .lines()
        .map(str::len)
        .filter(|&n| n > GENERATED_LONG_LINE)
        .sum();
    if long as f64 / total >= GENERATED_LONG_LINE_SHARE {
        return Some(format!(
            "{:.0}% of it is in lines over {GENERATED_LONG_LINE} characters",
            100.0 * long as f64 / total
        ));
    }
    let (mut chars, mut space, mut other) = (0usize, 0usize, 0usize);
    for c in text.chars() {
        chars += 1;
        if c.is_whitespace() {
            space += 1;
        } else if !c.is_alphanumeric() {
            other += 1;
        }
    }
    let chars = chars.max(1) as f64;
    if (space as f64) / chars < GENERATED_MIN_WHITESPACE {
        return Some(format!(
            "{:.1}% whitespace: minified",
            100.0 * space as f64 / chars
        ));
    }
    if (other as f64) / chars > GENERATED_MAX_NON_WORD {
        return Some(format!(
            "{:.0}% of its characters are not words",
            100.0 * other as f64 / chars
        ));
    }
    let hashes = checksum_bytes(text);
    if hashes as f64 / total >= GENERATED_HASH_SHARE {
        return Some(format!(
            "{:.0}% of it is checksums: a lock file",
            100.0 * hashes as f64 / total
        ));
    }
    None
}

/// Bytes of `text` in checksums: runs of 32 or more hex digits (letters
/// and digits both), and base64 after a checksum tag (`sha512-`, `h1:`), as
/// lock files write them. On this project's machine, 2026-12-02, by a
/// one-off scan (not kept): 25% of `Cargo.lock`, at most 15% of the 10,965
/// Rust and Markdown files of the crates in the cargo registry. The tests
/// hold the Markdown of the registry and this repository's files to it.
fn checksum_bytes(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut total = 0;
    let (mut run, mut digits, mut letters) = (0usize, false, false);
    for &b in bytes.iter().chain(std::iter::once(&b' ')) {
        if b.is_ascii_hexdigit() {
            run += 1;
            digits |= b.is_ascii_digit();
            letters |= b.is_ascii_alphabetic();
        } else {
            if run >= 32 && digits && letters {
                total += run;
            }
            (run, digits, letters) = (0, false, false);
        }
    }
    for tag in ["sha1-", "sha256-", "sha384-", "sha512-", "h1:"] {
        for (at, _) in text.match_indices(tag) {
            let value = bytes[at + tag.len()..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                .count();
            if value >= 20 {
                total += value;
            }
        }
    }
    total
}

/// The indexable text of the file at `path` with contents `bytes`.
///
/// # Errors
/// [`Skip::Binary`] or [`Skip::NotUtf8`].
pub fn extract(path: &Path, bytes: &[u8]) -> Result<String, Skip> {
    let sniff = &bytes[..bytes.len().min(BINARY_SNIFF_BYTES)];
    if sniff.contains(&0) {
        return Err(Skip::Binary);
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| Skip::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if is_html(path) {
        Ok(html_text(text))
    } else {
        Ok(text.to_string())
    }
}

fn is_html(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "html" | "htm" | "xhtml"))
}

/// The text of an HTML document with its markup dropped and its newlines
/// kept: tags, comments and the contents of `<script>` and `<style>` become
/// nothing but the newlines they spanned; entities are decoded.
fn html_text(html: &str) -> String {
    // ASCII lowercasing keeps every byte offset, so positions found in
    // `lower` (case-insensitive tag names) index `html` too.
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len());
    let mut at = 0;
    while let Some(open) = html[at..].find('<').map(|i| at + i) {
        out.push_str(&decode_entities(&html[at..open]));
        let tail = &lower[open..];
        let end = if tail.starts_with("<!--") {
            tail.find("-->").map(|i| i + 3)
        } else if let Some(name) = ["script", "style"]
            .into_iter()
            .find(|name| tail[1..].starts_with(name))
        {
            tail.find(&format!("</{name}"))
                .and_then(|i| tail[i..].find('>').map(|j| i + j + 1))
        } else {
            tail.find('>').map(|i| i + 1)
        };
        let end = open + end.unwrap_or(tail.len());
        // The dropped span's newlines stay, so lines keep their numbers.
        out.extend(std::iter::repeat_n(
            '\n',
            html[open..end].matches('\n').count(),
        ));
        // A tag separates words: "a<br>b" is two words.
        if !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        at = end;
    }
    out.push_str(&decode_entities(&html[at..]));
    out
}

fn decode_entities(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('&') {
        html_escape::decode_html_entities(text)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_non_utf8_files_are_skipped_with_their_reason() {
        let p = Path::new("a.txt");
        assert_eq!(extract(p, b"abc\0def"), Err(Skip::Binary));
        assert_eq!(
            extract(p, b"caf\xe9 au lait"),
            Err(Skip::NotUtf8 { offset: 3 })
        );
        assert_eq!(extract(p, b"\xEF\xBB\xBFhello").unwrap(), "hello");
        assert_eq!(Skip::Binary.reason(), "binary");
    }

    #[test]
    fn html_loses_markup_but_keeps_its_lines() {
        let html = "<html><head><title>T</title>\n<style>\nbody { x: y }\n</style>\n\
                    <script type=\"x\">let a = 1 < 2;\n</script></head>\n\
                    <body><p>Caf&eacute; &amp; <b>bar</b></p><!-- a\ncomment -->\n<p>last</p></body></html>";
        let text = extract(Path::new("page.HTML"), html.as_bytes()).unwrap();
        assert_eq!(text.lines().count(), html.lines().count());
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words, ["T", "Café", "&", "bar", "last"]);
        let last = text.lines().position(|l| l.contains("last")).unwrap();
        assert_eq!(last, html.lines().position(|l| l.contains("last")).unwrap());
        // Other text files are kept as they are.
        assert_eq!(extract(Path::new("a.md"), b"<b>x</b>").unwrap(), "<b>x</b>");
    }
}
