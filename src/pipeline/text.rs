//! Text in generated steps as `buildkite-agent pipeline upload` reads it.
//!
//! The agent parses each chunk file with a YAML 1.2 parser (JSON is read
//! as YAML), then interpolates environment variables into nearly every
//! string of every step, keys included, before anything runs. Every string
//! drvkite puts into a step goes through this module, so that after both
//! it is exactly the text drvkite meant:
//!
//! - [`exact`]: data (commands, env values, branches, agents, keys) comes
//!   out unchanged, or is refused;
//! - [`display`]: labels and other display text come out unchanged, or in
//!   the documented display form;
//! - [`push_shell_word`]: shell words built so that [`exact`] never refuses
//!   a command;
//! - [`to_vec`]: JSON whose strings a YAML parser reads back unchanged.
//!
//! The interpolation grammar (Buildkite's `interpolate` library, as the
//! agent uses it): `$$` and `\$` are a literal `$`, `\\` stays two
//! backslashes, `$NAME` and `${NAME…}` expand, `$(` stays as it is. So a
//! `$` is written `$$`, and text is exact unless an odd number of
//! backslashes directly precedes a `$`: the agent pairs backslashes up and
//! reads the last one with the `$` as an escaped `$`, so no escaping can
//! produce a lone backslash before a `$`.

use std::fmt;
use std::io;

use serde::Serialize;
use serde_json::{Map, Value};

/// Text that cannot reach a step unchanged: an odd number of backslashes
/// directly before a `$`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrepresentable {
    pub text: String,
}

impl fmt::Display for Unrepresentable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} has a backslash directly before `$`, which `buildkite-agent pipeline upload` reads as an escaped `$`: no escaping can carry `\\$` through it unchanged",
            shorten(&self.text)
        )
    }
}

impl std::error::Error for Unrepresentable {}

/// Text as an error message shows it: long texts cut in the middle.
fn shorten(text: &str) -> String {
    const MAX: usize = 120;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let head: String = text.chars().take(MAX / 2).collect();
    let tail: String = text.chars().skip(text.chars().count() - MAX / 2).collect();
    format!("{head}…{tail}")
}

/// Whether `text` holds a backslash directly before a `$`.
pub fn has_backslash_dollar(text: &str) -> bool {
    text.contains("\\$")
}

/// Whether the upload would take one of `text`'s backslashes together
/// with the `$` after it: backslashes pair up (`\\` stays two), so that
/// happens when an odd number of them directly precedes a `$`.
fn lone_backslash_before_dollar(text: &str) -> bool {
    let mut run = 0;
    for b in text.bytes() {
        match b {
            b'\\' => run += 1,
            b'$' if run % 2 == 1 => return true,
            _ => run = 0,
        }
    }
    false
}

/// `text` written so that the upload gives back exactly `text`.
pub fn exact(text: &str) -> Result<String, Unrepresentable> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    if lone_backslash_before_dollar(text) {
        return Err(Unrepresentable {
            text: text.to_owned(),
        });
    }
    Ok(text.replace('$', "$$"))
}

/// [`exact`] of an owned string, without a copy when there is no `$`.
pub fn exact_owned(text: String) -> Result<String, Unrepresentable> {
    if text.contains('$') {
        exact(&text)
    } else {
        Ok(text)
    }
}

/// The form a display text (a label, a prompt, a skip reason) takes in a
/// step: the text itself, or, when it has a backslash directly before a
/// `$`, the text with every backslash doubled. The two kinds cannot be
/// confused: only a doubled text shows a backslash before a `$`.
pub fn display_form(text: &str) -> std::borrow::Cow<'_, str> {
    if has_backslash_dollar(text) {
        text.replace('\\', "\\\\").into()
    } else {
        text.into()
    }
}

/// A display text written for the upload: it shows as [`display_form`].
pub fn display(text: &str) -> String {
    exact(&display_form(text)).expect("the display form has no lone backslash before `$`")
}

/// Append `word` quoted as one bash word: single quotes, `'` as `'\''`,
/// and a backslash before a `$` kept apart from it by `''` (bash reads
/// `'a\''$b'` as `a\$b`), so the command stays [`exact`].
pub fn push_shell_word(out: &mut String, word: &str) {
    out.reserve(word.len() + 2);
    out.push('\'');
    let mut after_backslash = false;
    for c in word.chars() {
        match c {
            '\'' => out.push_str(r"'\''"),
            '$' if after_backslash => out.push_str("''$"),
            c => out.push(c),
        }
        after_backslash = c == '\\';
    }
    out.push('\'');
}

/// `word` quoted as one bash word (see [`push_shell_word`]).
pub fn shell_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    push_shell_word(&mut out, word);
    out
}

/// `text` for a log line: control characters (ESC, BEL, line breaks, C1)
/// written as Rust escapes (`\u{1b}`, `\n`). Buildkite's log renders
/// escape sequences (`ESC ]1339;url=…` is a link, `ESC ]1338` an image)
/// and reads a line starting `+++ ` or `--- ` as a group header, so a
/// name printed raw could put a link or a fake header into a job's log.
/// The escapes never put a backslash before a `$`.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// A value whose every string (object keys too) is [`exact`].
pub fn exact_value(value: &Value) -> Result<Value, Unrepresentable> {
    Ok(match value {
        Value::String(s) => Value::String(exact(s)?),
        Value::Array(items) => {
            Value::Array(items.iter().map(exact_value).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(exact(k)?, exact_value(v)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// JSON for a chunk file. serde_json leaves DEL, the C1 controls, and the
/// characters YAML reads as line breaks or refuses raw (NEL, U+2028,
/// U+2029, U+FEFF, U+FFFE, U+FFFF) unescaped: a YAML parser would refuse
/// the file or fold them into spaces. They are written `\uXXXX`, which
/// both read back as the character. The other non-characters (U+FDD0 to
/// U+FDEF) are escaped too; those above U+FFFF stay raw, as YAML's
/// parsers refuse the surrogate pairs JSON would need and accept them raw.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4096);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, YamlSafe);
    value.serialize(&mut ser)?;
    Ok(out)
}

/// Whether YAML needs `c` escaped inside a double-quoted string.
fn needs_escape(c: char) -> bool {
    matches!(c,
        '\u{7f}'..='\u{9f}'
        | '\u{2028}' | '\u{2029}'
        | '\u{feff}'
        | '\u{fdd0}'..='\u{fdef}'
        | '\u{fffe}' | '\u{ffff}')
}

struct YamlSafe;

impl serde_json::ser::Formatter for YamlSafe {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // Almost every fragment is plain ASCII: written whole.
        if fragment.bytes().all(|b| b < 0x7f) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if needs_escape(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_doubles_dollars_and_refuses_backslash_dollar() {
        assert_eq!(exact("a$b$$c").unwrap(), "a$$b$$$$c");
        assert_eq!(exact("plain \\ text").unwrap(), "plain \\ text");
        assert!(exact("a\\$b").is_err());
        assert!(exact("a\\\\\\$b").is_err());
        // An even run pairs up: `\\$$` gives `\\$`.
        assert_eq!(exact("a\\\\$b").unwrap(), "a\\\\$$b");
        let e = exact("x\\$HOME").unwrap_err().to_string();
        assert!(e.contains("x\\\\$HOME") && e.contains("escaped"), "{e}");
    }

    #[test]
    fn display_doubles_backslashes_only_when_needed() {
        assert_eq!(display("a\\b $x"), "a\\b $$x");
        assert_eq!(display("a\\$x"), "a\\\\$$x");
        assert_eq!(display_form("a\\\\$x"), "a\\\\\\\\$x");
    }

    #[test]
    fn shell_words_separate_backslash_and_dollar() {
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("a\\$b"), r"'a\''$b'");
        assert_eq!(shell_word("a\\'$"), r"'a\'\''$'");
        assert!(!has_backslash_dollar(&shell_word("\\$\\\\$\\'$")));
    }

    #[test]
    fn log_lines_show_control_characters_escaped() {
        assert_eq!(printable("tools/a b"), "tools/a b");
        assert_eq!(
            printable("a\u{1b}]1339;url='x'\u{7}\n+++ b\u{9b}$"),
            "a\\u{1b}]1339;url='x'\\u{7}\\n+++ b\\u{9b}$"
        );
        assert!(!has_backslash_dollar(&printable("\n$")));
    }

    #[test]
    fn yaml_hostile_characters_are_escaped() {
        let text = "a\u{7f}b\u{85}c\u{2028}\u{feff}\u{fffe}é🦀\u{1fffe}";
        let json = String::from_utf8(to_vec(&text).unwrap()).unwrap();
        assert_eq!(
            json,
            "\"a\\u007fb\\u0085c\\u2028\\ufeff\\ufffeé🦀\u{1fffe}\""
        );
        let back: String = serde_json::from_str(&json).unwrap();
        assert_eq!(back, text);
    }
}
