//! Making untrusted text safe to show to a person.
//!
//! Plugins (and policy files) are hostile input, and their strings end up on
//! an operator's terminal: diagnostic messages, codes and paths, route
//! reasons, log lines, panic messages. A raw ESC lets a plugin erase its own
//! error line, print a fake "verdict: pass", set the window title or write
//! the clipboard (OSC 52); a bare CR overwrites the start of a line; a
//! newline in a one-line field forges a whole new line of output. So every
//! such string goes through [`escape`] before it is printed or logged, and
//! control characters come out as visible Rust-style escapes (`\u{1b}`).
//!
//! JSON output never goes through here: `serde_json` escapes control
//! characters itself, and machine readers must get the exact bytes.

use std::borrow::Cow;

/// True for characters a terminal may act on rather than print: C0 (which
/// includes ESC, CR, LF, TAB, BEL and BS), DEL, C1 (U+0080..U+009F, e.g. the
/// 8-bit CSI U+009B) and the bidirectional overrides and isolates that can
/// make text read differently from what it is ("Trojan Source").
pub fn is_unsafe(c: char) -> bool {
    matches!(c, '\0'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every [`is_unsafe`] character escaped visibly: `\n`, `\r`,
/// `\t`, and `\u{hex}` for the rest. The result is always one line.
/// Borrowed when there is nothing to escape, which is the usual case.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A `Display` wrapper that prints its text through [`escape`], for format
/// strings and `thiserror` messages.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&escape(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "rule `min_age` must be ≥ 18 — café";
        assert!(matches!(escape(s), Cow::Borrowed(t) if t == s));
    }

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(
            escape("a\x1b[2K\rb\nc\td\u{7f}e\u{9b}f\u{202e}g\x07"),
            "a\\u{1b}[2K\\rb\\nc\\td\\u{7f}e\\u{9b}f\\u{202e}g\\u{7}"
        );
        for c in (0u32..0x20).chain(0x7f..0xa0) {
            let s = char::from_u32(c).unwrap().to_string();
            assert!(!escape(&s).chars().any(is_unsafe), "{c:#x}");
        }
        assert_eq!(Escaped("x\x1by").to_string(), "x\\u{1b}y");
    }
}
