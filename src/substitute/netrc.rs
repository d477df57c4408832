//! Credentials from Nix's `netrc-file`, which Nix hands to curl for every
//! download from an http(s) binary cache.

/// One `machine` (or `default`) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `None` for `default`.
    machine: Option<String>,
    login: String,
    password: String,
}

/// A parsed netrc file.
#[derive(Debug, Clone, Default)]
pub struct Netrc(Vec<Entry>);

/// The file's tokens: words split at white space, or double-quoted strings
/// with backslash escapes (as curl reads them).
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut token = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => token.extend(chars.next()),
                    c => token.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                token.push(c);
                chars.next();
            }
        }
        out.push(token);
    }
    out
}

impl Netrc {
    pub fn parse(text: &str) -> Self {
        // `macdef` bodies run to the next empty line: cut them out first.
        let mut kept = String::new();
        let mut in_macro = false;
        for line in text.lines() {
            if in_macro {
                in_macro = !line.trim().is_empty();
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "macdef") {
                kept.push_str(&words[..i].join(" "));
                kept.push('\n');
                in_macro = true;
                continue;
            }
            kept.push_str(line);
            kept.push('\n');
        }
        let mut entries = Vec::new();
        let mut current: Option<Entry> = None;
        let mut it = tokens(&kept).into_iter();
        while let Some(token) = it.next() {
            match token.as_str() {
                "machine" | "default" => {
                    entries.extend(current.take());
                    let machine = if token == "machine" {
                        it.next().map(|m| m.to_ascii_lowercase())
                    } else {
                        None
                    };
                    current = Some(Entry {
                        machine,
                        login: String::new(),
                        password: String::new(),
                    });
                }
                "login" => {
                    if let (Some(e), Some(v)) = (current.as_mut(), it.next()) {
                        e.login = v;
                    }
                }
                "password" => {
                    if let (Some(e), Some(v)) = (current.as_mut(), it.next()) {
                        e.password = v;
                    }
                }
                "account" => {
                    it.next();
                }
                _ => {}
            }
        }
        entries.extend(current);
        Netrc(entries)
    }

    /// Login and password for `host`: its `machine` entry, else `default`.
    pub fn credentials(&self, host: &str) -> Option<(&str, &str)> {
        let host = host.to_ascii_lowercase();
        self.0
            .iter()
            .find(|e| e.machine.as_deref() == Some(host.as_str()))
            .or_else(|| self.0.iter().find(|e| e.machine.is_none()))
            .map(|e| (e.login.as_str(), e.password.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_entries_then_default() {
        let n = Netrc::parse(
            "machine cache.example.org login ci password s3cret\n\
             machine other.example.org\n  login \"a b\"\n  password \"q\\\"x\"\n\
             macdef init\nmachine evil.example.org login no password no\n\n\
             default login anon password guest\n",
        );
        assert_eq!(n.credentials("Cache.Example.org"), Some(("ci", "s3cret")));
        assert_eq!(n.credentials("other.example.org"), Some(("a b", "q\"x")));
        assert_eq!(n.credentials("evil.example.org"), Some(("anon", "guest")));
        assert_eq!(
            Netrc::parse("machine a login b password c").credentials("x"),
            None
        );
    }
}
