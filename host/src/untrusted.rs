//! Text that comes from outside the host (a plugin's logs and error values,
//! a child's stderr) made safe to print.
//!
//! # Invariant
//! What [`sanitize`] returns fits on one line and is bounded: a plugin can
//! neither start a log line of its own (and pass it off as the host's) nor
//! make a log line, an error or a stored reason grow without bound.

/// `text` made safe to print on one line of the host's log, at most about
/// `max` bytes of it: control characters (newlines, carriage returns,
/// terminal escape sequences) and the Unicode characters that break or
/// reorder a line are escaped, so a plugin can never start a line of its
/// own or make its text pass for the host's.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 16);
    for c in text.chars() {
        if out.len() >= max {
            out.push_str(" [truncated]");
            return out;
        }
        if hides(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` made safe to print as lines on a terminal: each line as
/// [`sanitize`] makes it (escaped, at most about `max_line` bytes), the line
/// breaks kept. For the CLI's one error edge: a message the host wrote may
/// span lines, but any part of it may quote what came from outside (a
/// stored manifest, a server's answer, a plugin's error value).
pub fn sanitize_lines(text: &str, max_line: usize) -> String {
    text.split('\n')
        .map(|line| sanitize(line, max_line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `c` acts on a terminal or a log instead of being printed:
/// control characters (newlines, carriage returns, ESC, BEL), the Unicode
/// line and paragraph separators, and the bidi overrides, isolates and
/// marks that reorder a line.
pub fn hides(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{061c}'
        )
}

#[cfg(test)]
mod tests {

    /// An error's own line breaks survive; a terminal escape or a line
    /// break inside a quoted part cannot act (it is one escaped character
    /// of its line).
    #[test]
    fn lines_keep_their_breaks_and_lose_their_escapes() {
        let text = "first line\nsecond \u{1b}[2J\r with a \u{202e} bidi";
        let shown = sanitize_lines(text, 1024);
        assert_eq!(shown.lines().count(), 2);
        assert!(!shown.chars().any(|c| c != '\n' && hides(c)), "{shown}");
        assert!(shown.starts_with("first line\nsecond "), "{shown}");
        assert!(sanitize_lines(&"x".repeat(100), 10).ends_with("[truncated]"));
    }
    use super::{hides, sanitize, sanitize_lines};

    #[test]
    fn a_newline_cannot_forge_a_host_line() {
        let forged = "ok\n2026-01-01T00:00:00Z ERROR embedhost::supervisor: escalated\r\x1b[2K";
        let safe = sanitize(forged, 4096);
        assert!(
            !safe.contains('\n') && !safe.contains('\r') && !safe.contains('\x1b'),
            "{safe}"
        );
        assert!(safe.starts_with("ok\\n2026"), "{safe}");
        assert_eq!(sanitize("a\u{202e}b", 100), "a\\u{202e}b");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let safe = sanitize(&"é".repeat(10_000), 100);
        assert!(
            safe.len() <= 100 + " [truncated]".len() + 4,
            "{}",
            safe.len()
        );
        assert!(safe.ends_with(" [truncated]"));
    }
}
