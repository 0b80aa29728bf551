//! The size rule of the project standard, checked on the source: modules
//! stay under about 600 lines and functions under about 80, unless the doc
//! says why.
//!
//! - A file of `host/src` over [`MAX_FILE_LINES`] lines fails unless its
//!   `//!` doc has a line starting with `Size:` that says why.
//! - A function (a `fn` item with a body) over [`MAX_FN_LINES`] lines, from
//!   the line of its `fn` to the line of its closing brace, fails unless its
//!   `///` doc has a line starting with `Size:`.
//! - Tests may be long: files named `tests.rs` or `*_tests.rs` are skipped,
//!   and so are the functions inside an item marked `#[cfg(test)]`.
//!
//! Functions are found in the source with its comments, strings and
//! character literals blanked out, by matching braces; a function's doc is
//! the run of `///`, `//` and `#[` lines right above its `fn` line.

use std::path::{Path, PathBuf};

/// Lines a file may have without a `Size:` line in its `//!` doc.
const MAX_FILE_LINES: usize = 600;

/// Lines a function may have without a `Size:` line in its `///` doc.
const MAX_FN_LINES: usize = 80;

#[test]
fn files_and_functions_stay_small_unless_their_doc_says_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no Rust files under {}", src.display());
    let mut offenders = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let shown = path.strip_prefix(&src).unwrap_or(path).display();
        offenders.extend(
            oversized(&text)
                .into_iter()
                .map(|offender| format!("host/src/{shown}{offender}")),
        );
    }
    assert!(
        offenders.is_empty(),
        "{} over the size limits (files {MAX_FILE_LINES} lines, functions {MAX_FN_LINES}; \
         split them, or say why in a `Size:` line of the `//!` or `///` doc):\n{}",
        offenders.len(),
        offenders.join("\n")
    );
}

/// The checker on itself: what counts as a function, a doc, a test.
#[test]
fn the_size_check_finds_functions_and_reads_their_docs() {
    let long_body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let text = format!(
        "//! A module.\n\
         /// Short.\n\
         fn short() {{ let s = \"}}\"; let c = '}}'; }}\n\
         /// Long.\n\
         #[inline]\n\
         pub(crate) async fn long<'a>(x: [u8; 4], s: &'a str) -> [u8; 4] {{\n{long_body}    x\n}}\n\
         /// Long, and says why.\n\
         ///\n\
         /// Size: one table, read top to bottom.\n\
         fn explained() {{\n{long_body}}}\n\
         fn commented() {{\n    // }}\n    /* {{ */\n    let r = r#\"}}\"#;\n}}\n\
         trait T {{ fn declared(&self) -> [u8; 2]; }}\n\
         type P = fn(usize) -> usize;\n\
         #[cfg(test)]\n\
         mod tests {{\n    fn long_test() {{\n{long_body}    }}\n}}\n"
    );
    let found = oversized(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("fn long ("), "{found:?}");
    assert!(
        found[0].contains(&format!("{} lines", MAX_FN_LINES + 3)),
        "{found:?}"
    );

    let big = format!(
        "//! A module.\n{}",
        "const A: u8 = 0;\n".repeat(MAX_FILE_LINES)
    );
    assert_eq!(oversized(&big).len(), 1);
    let explained = format!(
        "//! A module.\n//!\n//! Size: a list of constants.\n{}",
        "const A: u8 = 0;\n".repeat(MAX_FILE_LINES)
    );
    assert!(oversized(&explained).is_empty());
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The offenders of one file's `text`: the file itself (`: N lines`) and
/// each function (`:LINE fn NAME (N lines)`), each without a `Size:` line.
fn oversized(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let file_says_why = lines
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .any(|doc| doc.trim_start().starts_with("Size:"));
    if lines.len() > MAX_FILE_LINES && !file_says_why {
        found.push(format!(": {} lines", lines.len()));
    }
    let code = blank_comments_and_literals(text);
    let tests = test_ranges(&code);
    for (start, open, close) in functions(&code) {
        if tests.iter().any(|&(a, b)| a <= start && start < b) {
            continue;
        }
        let first = line_of(&code, start);
        let last = line_of(&code, close);
        let length = last - first + 1;
        if length > MAX_FN_LINES && !doc_says_why(&lines, first) {
            let name = fn_name(&code[start..open]);
            found.push(format!(":{} fn {name} ({length} lines)", first + 1));
        }
    }
    found
}

/// Whether the `///` doc above line `line` (0-based) has a `Size:` line.
fn doc_says_why(lines: &[&str], line: usize) -> bool {
    lines[..line]
        .iter()
        .rev()
        .map(|l| l.trim_start())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["))
        .filter_map(|l| l.strip_prefix("///"))
        .any(|doc| doc.trim_start().starts_with("Size:"))
}

/// The name after `fn` in `signature`.
fn fn_name(signature: &str) -> &str {
    let rest = signature[2..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The 0-based line of byte `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].bytes().filter(|&b| b == b'\n').count()
}

/// `text` with every comment, string and character literal replaced by
/// spaces (newlines kept), so braces and `fn` in them do not count.
fn blank_comments_and_literals(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for byte in &mut out[from..to] {
            if *byte != b'\n' {
                *byte = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let end = match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => text[i..].find('\n').map_or(b.len(), |n| i + n),
            b'/' if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            b'"' => string_end(b, i + 1),
            b'r' | b'b' if i == 0 || !ident(b[i - 1]) => match raw_string_end(b, i) {
                Some(end) => end,
                None if b[i] == b'b' && matches!(b.get(i + 1), Some(b'"')) => string_end(b, i + 2),
                None if b[i] == b'b' && matches!(b.get(i + 1), Some(b'\'')) => {
                    char_end(b, i + 1).unwrap_or(i + 1)
                }
                None => i + 1,
            },
            b'\'' => char_end(b, i).unwrap_or(i + 1),
            _ => i + 1,
        };
        if end > i + 1 {
            blank(&mut out, i, end);
        }
        i = end.max(i + 1);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The end of the (nested) block comment opening at `i`.
fn block_comment_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The end of a string whose contents start at `i` (after its `"`).
fn string_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The end of a raw string (`r"…"`, `r#"…"#`, `br…`) starting at `i`, if
/// one does.
fn raw_string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if b[j] == b'b' {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    j += 1;
    while j < b.len() {
        if b[j] == b'"'
            && b[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == b'#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(b.len())
}

/// The end of the character literal opening at `i` (a `'`), or `None` for
/// a lifetime or a label.
fn char_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i + 1) == Some(&b'\\') {
        let close = b[i + 2..].iter().skip(1).position(|&c| c == b'\'')?;
        return Some(i + 3 + close + 1);
    }
    // One character, of 1 to 4 bytes in UTF-8, then the closing quote.
    let width = match b.get(i + 1)? {
        c if *c < 0x80 => 1,
        c if *c >= 0xF0 => 4,
        c if *c >= 0xE0 => 3,
        _ => 2,
    };
    (b.get(i + 1 + width) == Some(&b'\'')).then_some(i + 2 + width)
}

/// Each function with a body in `code`: the byte of its `fn`, of its
/// opening brace and of its closing brace.
fn functions(code: &str) -> Vec<(usize, usize, usize)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    for (at, _) in code.match_indices("fn") {
        let before = at.checked_sub(1).map(|i| b[i]);
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
            continue;
        }
        // `fn` then whitespace then a name: not `fn(` (a pointer type).
        let rest = &code[at + 2..];
        let name = rest.trim_start();
        if name.len() == rest.len() || !name.starts_with(|c: char| c.is_alphabetic() || c == '_') {
            continue;
        }
        if let Some(open) = body_start(b, at + 2)
            && let Some(close) = matching_brace(b, open)
        {
            found.push((at, open, close));
        }
    }
    found
}

/// The opening brace of the body that follows byte `i`, or `None` when a
/// `;` ends the item first (a declaration without a body).
fn body_start(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0i32;
    while i < b.len() {
        match b[i] {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'{' if depth == 0 => return Some(i),
            b';' if depth == 0 => return None,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The brace closing the one at `open`.
fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The byte ranges of the items marked `#[cfg(test)]` that have a body.
fn test_ranges(code: &str) -> Vec<(usize, usize)> {
    let b = code.as_bytes();
    code.match_indices("#[cfg(test)]")
        .filter_map(|(at, attr)| {
            let open = body_start(b, at + attr.len())?;
            Some((at, matching_brace(b, open)?))
        })
        .collect()
}
