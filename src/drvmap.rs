//! The derivation map (`drvmap.json`): label → `{attrPath, drvPath}`, in the
//! format TVL's `mkDrvmap` writes, and the comparison of two maps.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use camino::Utf8Path;
use serde::{Deserialize, Serialize};

use crate::types::{AttrPath, DrvPath, Label};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    #[serde(rename = "attrPath")]
    pub attr_path: AttrPath,
    #[serde(rename = "drvPath")]
    pub drv_path: DrvPath,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrvMap {
    entries: BTreeMap<Label, Entry>,
}

impl DrvMap {
    /// Build a map from (label, entry) pairs. As with Nix's `listToAttrs`,
    /// the first entry of a label wins.
    pub fn from_entries(items: impl IntoIterator<Item = (Label, Entry)>) -> Self {
        let mut entries = BTreeMap::new();
        for (label, entry) in items {
            entries.entry(label).or_insert(entry);
        }
        DrvMap { entries }
    }

    pub fn get(&self, label: &Label) -> Option<&Entry> {
        self.entries.get(label)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Label, &Entry)> {
        self.entries.iter()
    }

    /// The bytes Nix's `builtins.toJSON` writes for this map: minified, keys
    /// sorted bytewise, no trailing newline, Nix's string escapes.
    pub fn to_tvl_json(&self) -> String {
        let mut out = String::with_capacity(self.entries.len() * 128);
        out.push('{');
        for (i, (label, entry)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            nix_json_string(&mut out, label.as_str());
            out.push_str(":{\"attrPath\":[");
            for (j, part) in entry.attr_path.parts().iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                nix_json_string(&mut out, part);
            }
            out.push_str("],\"drvPath\":");
            nix_json_string(&mut out, entry.drv_path.as_str());
            out.push('}');
        }
        out.push('}');
        out
    }

    pub fn write(&self, path: &Utf8Path) -> Result<()> {
        crate::atomic::write_file(path, self.to_tvl_json().as_bytes())
    }

    /// Parse a map, refusing anything that is not exactly the expected shape.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes).context("not valid JSON")?;
        let serde_json::Value::Object(obj) = value else {
            bail!("expected a JSON object of label → {{attrPath, drvPath}}");
        };
        let mut entries = BTreeMap::new();
        for (label, v) in obj {
            let entry: Entry = serde_json::from_value(v)
                .with_context(|| format!("entry {label:?} is not {{attrPath, drvPath}}"))?;
            entries.insert(Label::new(label), entry);
        }
        Ok(DrvMap { entries })
    }

    pub fn load(path: &Utf8Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(&bytes).with_context(|| format!("{path} is not a derivation map"))
    }
}

/// Append `s` as a JSON string the way Nix 2.x's `toJSON` escapes it: `"`
/// and `\` backslashed, `\n` `\r` `\t` short, other control bytes `\u00xx`,
/// everything else (non-ASCII included) verbatim.
fn nix_json_string(out: &mut String, s: &str) {
    out.push('"');
    // Labels and store paths rarely need escapes: copy those whole.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// What changed between two maps.
#[derive(Debug, Default, Serialize)]
pub struct MapDiff {
    pub added: Vec<Label>,
    pub removed: Vec<Label>,
    pub changed: Vec<Change>,
    pub unchanged: usize,
}

#[derive(Debug, Serialize)]
pub struct Change {
    pub label: Label,
    pub old: DrvPath,
    pub new: DrvPath,
}

pub fn diff(old: &DrvMap, new: &DrvMap) -> MapDiff {
    let mut d = MapDiff::default();
    for (label, entry) in &new.entries {
        match old.entries.get(label) {
            None => d.added.push(label.clone()),
            Some(o) if o.drv_path == entry.drv_path => d.unchanged += 1,
            Some(o) => d.changed.push(Change {
                label: label.clone(),
                old: o.drv_path.clone(),
                new: entry.drv_path.clone(),
            }),
        }
    }
    d.removed = old
        .entries
        .keys()
        .filter(|l| !new.entries.contains_key(*l))
        .cloned()
        .collect();
    d
}

impl MapDiff {
    /// One line per label. Labels come from the depot's names: a line
    /// break in one would fake a line of its own ("- tools/x" as if
    /// removed) and an escape sequence would reach the terminal or a
    /// Buildkite log, so control characters are shown escaped.
    pub fn render_text(&self) -> String {
        use crate::pipeline::text::printable;
        let mut s = String::new();
        for l in &self.added {
            let _ = writeln!(s, "+ {}", printable(l.as_str()));
        }
        for l in &self.removed {
            let _ = writeln!(s, "- {}", printable(l.as_str()));
        }
        for c in &self.changed {
            let _ = writeln!(
                s,
                "~ {}  {} -> {}",
                printable(c.label.as_str()),
                c.old.hash(),
                c.new.hash()
            );
        }
        let _ = writeln!(
            s,
            "{} added, {} removed, {} changed, {} unchanged",
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.unchanged
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(parts: &[&str], drv: &str) -> Entry {
        Entry {
            attr_path: AttrPath::new(parts.iter().map(|s| s.to_string()).collect()),
            drv_path: drv.parse().unwrap(),
        }
    }

    const A: &str = "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a.drv";
    const B: &str = "/nix/store/f5cdmbazqz4xbqxb5hfxs0dywy1ikfls-b.drv";

    #[test]
    fn json_is_sorted_and_minified() {
        let m = DrvMap::from_entries([
            (Label::new("z"), entry(&["z"], A)),
            (Label::new("a/b:c"), entry(&["a", "b", "c"], B)),
        ]);
        assert_eq!(
            m.to_tvl_json(),
            format!(
                r#"{{"a/b:c":{{"attrPath":["a","b","c"],"drvPath":"{B}"}},"z":{{"attrPath":["z"],"drvPath":"{A}"}}}}"#
            )
        );
        assert_eq!(DrvMap::parse(m.to_tvl_json().as_bytes()).unwrap(), m);
    }

    #[test]
    fn escapes_like_nix() {
        let mut s = String::new();
        nix_json_string(&mut s, "q\"b\\n\nt\tc\u{1}\u{8}é$");
        assert_eq!(s, r#""q\"b\\n\nt\tc\u0001\u0008é$""#);
    }

    #[test]
    fn diff_lines_show_control_characters_escaped() {
        // A label with a line break once printed a fake "- tools/important"
        // line, and an escape sequence (a Buildkite log link) raw.
        let old = DrvMap::from_entries([(Label::new("tools/important"), entry(&["t"], A))]);
        let hostile = "x\n- tools/important\n\u{1b}]1339;url='https://evil.example'\u{7}";
        let new = DrvMap::from_entries([
            (Label::new("tools/important"), entry(&["t"], A)),
            (Label::new(hostile), entry(&["x"], B)),
        ]);
        let text = diff(&old, &new).render_text();
        assert_eq!(
            text,
            "+ x\\n- tools/important\\n\\u{1b}]1339;url='https://evil.example'\\u{7}\n1 added, 0 removed, 0 changed, 1 unchanged\n"
        );
    }

    #[test]
    fn first_label_wins() {
        let m = DrvMap::from_entries([
            (Label::new("x"), entry(&["x"], A)),
            (Label::new("x"), entry(&["y"], B)),
        ]);
        assert_eq!(m.get(&Label::new("x")).unwrap().drv_path.as_str(), A);
    }

    #[test]
    fn rejects_wrong_shapes() {
        for bad in [
            "",
            "[]",
            "{\"a\":1}",
            "{\"a\":{\"drvPath\":\"/nix/store/x.drv\",\"attrPath\":[]}}",
            "{\"a\":{\"attrPath\":[\"a\"]}}",
            "{\"a\":{\"attrPath\":[\"a\"],\"drvPath\":\"/tmp/x\"}",
        ] {
            assert!(DrvMap::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn diff_classifies() {
        let old = DrvMap::from_entries([
            (Label::new("same"), entry(&["same"], A)),
            (Label::new("gone"), entry(&["gone"], A)),
            (Label::new("moved"), entry(&["moved"], A)),
        ]);
        let new = DrvMap::from_entries([
            (Label::new("same"), entry(&["same"], A)),
            (Label::new("moved"), entry(&["moved"], B)),
            (Label::new("fresh"), entry(&["fresh"], B)),
        ]);
        let d = diff(&old, &new);
        assert_eq!(d.added, vec![Label::new("fresh")]);
        assert_eq!(d.removed, vec![Label::new("gone")]);
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].label, Label::new("moved"));
        assert_eq!(d.unchanged, 1);
    }
}
