//! A model of what `buildkite-agent pipeline upload` does to a pipeline
//! file before any step runs, written from Buildkite's documented rules and
//! the behaviour of its open-source `interpolate` and `go-pipeline`
//! libraries (facts only):
//!
//! 1. the file is parsed as YAML 1.2 (JSON is YAML): raw DEL and C1
//!    controls are refused, NEL, U+2028 and U+2029 are line breaks,
//!    `\uXXXX` escapes are read as the character. We parse with libyaml
//!    (through serde_norway), which follows the same rules;
//! 2. environment variables are interpolated into every string of every
//!    step, mapping keys included (`signature` aside): `$$` and `\$` are a
//!    literal `$`, `\\` stays two backslashes, `$(` stays, `$NAME` and
//!    `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:offset[:length]}`,
//!    `${NAME?message}` (fails the upload when NAME is unset),
//!    `${NAME%pat}`/`%%`/`#`/`##` expand, a `${` that does not parse fails
//!    the upload, and a `$` before anything that cannot start a name is
//!    kept (newer agents; older ones refused it).
//!
//! [`upload`] is strict on top of that: any expansion and any bare `$` is
//! an error, since a generated pipeline must mean the same on every agent
//! in every environment.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

/// The upload's environment.
pub type Env = BTreeMap<String, String>;

/// What an interpolation did besides producing text.
#[derive(Debug, Default)]
pub struct Interpolated {
    pub text: String,
    /// Names that were expanded.
    pub expanded: Vec<String>,
    /// `$` kept because nothing that can start a name followed it.
    pub bare_dollars: usize,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a Env,
    done: Interpolated,
}

impl Parser<'_> {
    fn at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn starts(&self, s: &str) -> bool {
        s.chars().enumerate().all(|(i, c)| self.at(i) == Some(c))
    }

    /// Text and expansions up to the end, or up to `}` inside braces.
    fn expression(&mut self, in_braces: bool) -> Result<String, String> {
        let mut out = String::new();
        while let Some(c) = self.at(0) {
            if in_braces && c == '}' {
                break;
            }
            if self.starts("\\\\") {
                out.push_str("\\\\");
                self.pos += 2;
            } else if self.starts("\\$") || self.starts("$$") {
                out.push('$');
                self.pos += 2;
            } else if self.starts("$(") {
                out.push_str("$(");
                self.pos += 2;
            } else if c == '$' {
                match self.at(1) {
                    Some(n) if n == '{' || n.is_alphabetic() => {
                        out.push_str(&self.expansion()?);
                    }
                    _ => {
                        self.done.bare_dollars += 1;
                        out.push('$');
                        self.pos += 1;
                    }
                }
            } else {
                out.push(c);
                self.pos += 1;
                while let Some(c) = self.at(0) {
                    if c == '$' || c == '\\' || (in_braces && c == '}') {
                        break;
                    }
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        Ok(out)
    }

    fn identifier(&mut self) -> Result<String, String> {
        match self.at(0) {
            Some(c) if c.is_alphabetic() => {}
            other => {
                return Err(format!(
                    "Expected identifier to start with a letter, got {other:?}"
                ));
            }
        }
        let mut name = String::new();
        while let Some(c) = self.at(0).filter(|c| c.is_alphanumeric() || *c == '_') {
            name.push(c);
            self.pos += 1;
        }
        Ok(name)
    }

    fn until(&mut self, stop: &[char]) -> String {
        let mut out = String::new();
        while let Some(c) = self.at(0).filter(|c| !stop.contains(c)) {
            out.push(c);
            self.pos += 1;
        }
        out
    }

    fn number(text: &str) -> Result<i64, String> {
        text.trim()
            .parse()
            .map_err(|e| format!("Unable to parse offset: {e}"))
    }

    fn expansion(&mut self) -> Result<String, String> {
        self.pos += 1; // `$`
        if self.at(0) != Some('{') {
            let name = self.identifier()?;
            return Ok(self.value(&name).unwrap_or_default());
        }
        self.pos += 1;
        let name = self.identifier()?;
        let value = self.value(&name);
        let op = self.at(0).ok_or("Expected an operator, got end of text")?;
        self.pos += 1;
        let result = match op {
            '}' => return Ok(value.unwrap_or_default()),
            ':' if self.at(0) == Some('-') && !self.at(1).is_some_and(char::is_numeric) => {
                self.pos += 1;
                let word = self.expression(true)?;
                match value {
                    Some(v) if !v.is_empty() => v,
                    _ => word,
                }
            }
            ':' => {
                let offset = Self::number(&self.until(&[':', '}']))?;
                let length = if self.at(0) == Some(':') {
                    self.pos += 1;
                    Some(Self::number(&self.until(&['}']))?)
                } else {
                    None
                };
                let v: Vec<char> = value.unwrap_or_default().chars().collect();
                let len = v.len() as i64;
                let start = if offset < 0 {
                    (len + offset).max(0)
                } else {
                    offset.min(len)
                };
                let end = match length {
                    None => len,
                    Some(l) if l < 0 => (len + l).max(start),
                    Some(l) => (start + l).min(len),
                };
                v[start as usize..end.max(start) as usize].iter().collect()
            }
            '-' => {
                let word = self.expression(true)?;
                value.unwrap_or(word)
            }
            '?' => {
                let message = self.expression(true)?;
                match value {
                    Some(v) => v,
                    None if message.is_empty() => return Err(format!("${name}: not set")),
                    None => return Err(format!("${name}: {message}")),
                }
            }
            '%' | '#' => {
                if self.at(0) == Some(op) {
                    self.pos += 1;
                }
                // Patterns as plain text: enough to see that it expanded.
                let pattern = self.until(&['}']);
                let v = value.unwrap_or_default();
                let cut = if op == '%' {
                    v.strip_suffix(pattern.as_str())
                } else {
                    v.strip_prefix(pattern.as_str())
                };
                cut.unwrap_or(&v).to_owned()
            }
            other => return Err(format!("Expected an operator, got {other:?}")),
        };
        if self.at(0) != Some('}') {
            return Err(format!(
                "Expected brace expansion to end with }}, got {:?}",
                self.at(0)
            ));
        }
        self.pos += 1;
        Ok(result)
    }

    fn value(&mut self, name: &str) -> Option<String> {
        self.done.expanded.push(name.to_owned());
        self.env.get(name).cloned()
    }
}

/// Interpolate `text` as the agent does; an error fails the upload.
pub fn interpolate(text: &str, env: &Env) -> Result<Interpolated, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        env,
        done: Interpolated::default(),
    };
    p.done.text = p.expression(false)?;
    Ok(p.done)
}

/// A hostile environment: every name a generated string could plausibly
/// reach holds text that would show (and would run, in a command).
pub fn hostile_env() -> Env {
    let mut env = Env::new();
    let names = [
        "HOME",
        "PATH",
        "USER",
        "SHELL",
        "PWD",
        "TMPDIR",
        "NIX_PATH",
        "DRVKITE",
        "BUILDKITE_MESSAGE",
        "BUILDKITE_BRANCH",
        "BUILDKITE_COMMIT",
        "BUILDKITE_TAG",
        "BUILDKITE_LABEL",
        "BUILDKITE_COMMAND",
        "BUILDKITE_PIPELINE_DEFAULT_BRANCH",
        "READTREE_TARGET",
        "DRVKITE_PARENT_OUTPUT",
        "command_script",
        "NOPE",
        "drvkite_ephemera_status",
    ];
    let letters = ('a'..='z').chain('A'..='Z').map(String::from);
    let digits = (0..10).map(|d| d.to_string());
    for name in names
        .iter()
        .map(|n| n.to_string())
        .chain(letters)
        .chain(digits)
    {
        env.insert(name, "x'; touch PWNED; echo '$(touch PWNED)".to_owned());
    }
    env
}

/// The text the agent hands on for `text`, insisting it is what the file
/// says: no expansion, no bare `$`, the same in any environment.
pub fn uploaded_text(text: &str) -> Result<String, String> {
    let hostile = interpolate(text, &hostile_env())?;
    if !hostile.expanded.is_empty() {
        return Err(format!("{text:?} expands {:?}", hostile.expanded));
    }
    if hostile.bare_dollars > 0 {
        return Err(format!(
            "{text:?} has a bare `$` (kept by newer agents, refused by older ones)"
        ));
    }
    Ok(hostile.text)
}

/// Every string of a step (keys too) as the agent hands it on.
pub fn uploaded_value(value: &Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(uploaded_text(s)?),
        Value::Array(items) => {
            Value::Array(items.iter().map(uploaded_value).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = if k == "signature" {
                    v.clone()
                } else {
                    uploaded_value(v)?
                };
                out.insert(uploaded_text(k)?, v);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// A chunk file as the agent reads and interpolates it; panics, naming the
/// file and the reason, where the upload would fail or change a string.
pub fn upload_file(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // It must stay JSON (drvkite and its users read it as such) ...
    let json: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    // ... and read as YAML to the very same value.
    let yaml: Value = serde_norway::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("the agent's YAML parser refuses {}: {e}", path.display()));
    assert_eq!(
        yaml,
        json,
        "{} reads differently as YAML than as JSON",
        path.display()
    );
    uploaded_value(&yaml)
        .unwrap_or_else(|e| panic!("uploading {} fails or changes it: {e}", path.display()))
}
