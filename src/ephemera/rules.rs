//! Which files of a set are persisted: a path, as given (everything in
//! it), or a rule in the style of buildomat's `output_rules`:
//!
//! - `*` matches within one path part, `**` any number of parts, `?` one
//!   character, `[ab]` and `{a,b}` as usual; `\` escapes;
//! - a leading `!` excludes what it matches, whatever includes it;
//! - a leading `=` makes the persist fail when the rule matches nothing;
//! - a leading `%` tolerates files that change or vanish while archived
//!   (they are left out, with a note); `=` and `%` combine, `!` with
//!   neither.
//!
//! Rules are anchored like paths: at the checkout, or `~/` for the home
//! folder. The parts before the first pattern are the rule's fixed folder
//! (`cache` for `cache/**/*.o`): that is what a restore replaces, as it
//! replaces a path.

use anyhow::{Result, bail};
use globset::{GlobSet, GlobSetBuilder};

use super::anchor::{Anchor, SavedPath};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// As given, for messages.
    pub text: String,
    pub exclude: bool,
    pub must_match: bool,
    pub tolerant: bool,
    /// The fixed folder, as a persist path (`cache`, `~/.cargo`).
    pub fixed: String,
    /// The pattern below it; `None` for a plain path.
    pub glob: Option<String>,
}

const META: &[char] = &['*', '?', '[', ']', '{', '}'];

/// Does `part` hold a pattern character not escaped with `\`?
fn has_pattern(part: &str) -> bool {
    let mut escaped = false;
    for c in part.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if META.contains(&c) {
            return true;
        }
    }
    false
}

/// `part` without the escapes of pattern characters.
fn unescape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    let mut chars = part.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(next)) if META.contains(next) || *next == '\\' => {
                out.push(*next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// A path written as a pattern that matches exactly it.
fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if META.contains(&c) || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parse one argument of `persist` (or one of a declarative set's `paths`).
pub fn parse(arg: &str) -> Result<Rule> {
    let mut body = arg;
    let (mut exclude, mut must_match, mut tolerant) = (false, false, false);
    if let Some(rest) = body.strip_prefix('!') {
        exclude = true;
        body = rest;
        if body.starts_with(['=', '%', '!']) {
            bail!("rule {arg:?}: `!` cannot be combined with `=`, `%` or another `!`");
        }
    } else {
        loop {
            if let Some(rest) = body.strip_prefix('=').filter(|_| !must_match) {
                must_match = true;
                body = rest;
            } else if let Some(rest) = body.strip_prefix('%').filter(|_| !tolerant) {
                tolerant = true;
                body = rest;
            } else {
                break;
            }
        }
        if body.starts_with(['=', '%', '!']) {
            bail!("rule {arg:?}: give each of `=` and `%` once, and `!` alone");
        }
    }
    if body.is_empty() {
        bail!("rule {arg:?} names nothing: give a path or a pattern such as cache/**");
    }
    let parts: Vec<&str> = body.split('/').collect();
    let Some(first) = parts.iter().position(|p| has_pattern(p)) else {
        return Ok(Rule {
            text: arg.to_string(),
            exclude,
            must_match,
            tolerant,
            fixed: unescape(body),
            glob: None,
        });
    };
    let fixed = parts[..first].join("/");
    if matches!(fixed.as_str(), "" | "~" | ".") {
        bail!(
            "rule {arg:?} has no folder to select from: start it with one, e.g. target/**/*.o \
             or ~/.cache/tool/**"
        );
    }
    let glob = parts[first..].join("/");
    if parts[first..].iter().any(|p| matches!(*p, "." | "..")) {
        bail!("rule {arg:?}: `.` and `..` cannot follow a pattern");
    }
    Ok(Rule {
        text: arg.to_string(),
        exclude,
        must_match,
        tolerant,
        fixed: unescape(&fixed),
        glob: Some(glob),
    })
}

/// Is every rule a plain path to include, so everything in them goes?
pub fn all_plain(rules: &[Rule]) -> bool {
    rules
        .iter()
        .all(|r| r.glob.is_none() && !r.exclude && !r.tolerant)
}

/// The compiled rules of one anchor.
#[derive(Default)]
struct Compiled {
    include: Vec<(String, usize)>,
    exclude: Vec<(String, usize)>,
}

struct Sets {
    include: GlobSet,
    include_rule: Vec<usize>,
    exclude: GlobSet,
    exclude_rule: Vec<usize>,
}

/// What a file, folder or link is to a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// No include rule matches it (a folder may still hold files that do).
    Out,
    /// An exclude rule matches it (a folder: nothing in it goes).
    Excluded,
    /// Persisted; `tolerant` if an including rule has `%`.
    In { tolerant: bool },
}

/// The rules of a set, with their fixed folders placed: matched against
/// paths relative to their anchor.
pub struct Selection {
    pub rules: Vec<Rule>,
    /// Workspace, home.
    sets: [Sets; 2],
    /// How many files, folders and links each rule matched.
    pub matched: Vec<u64>,
    scratch: Vec<usize>,
}

fn slot(anchor: Anchor) -> usize {
    match anchor {
        Anchor::Workspace => 0,
        Anchor::Home => 1,
    }
}

impl Selection {
    /// `placed[i]` is where rule `i`'s fixed folder is, when it exists.
    pub fn new(rules: Vec<Rule>, placed: &[Option<SavedPath>]) -> Result<Selection> {
        let mut compiled = [Compiled::default(), Compiled::default()];
        for (i, (rule, at)) in rules.iter().zip(placed).enumerate() {
            let Some(at) = at else { continue };
            let base = escape(&at.path);
            let mut patterns = match &rule.glob {
                None => vec![base.clone(), format!("{base}/**")],
                Some(g) => vec![format!("{base}/{g}")],
            };
            // Excluding all of a folder's contents excludes the folder too,
            // so it is not walked at all.
            if rule.exclude
                && let Some(g) = &rule.glob
            {
                if g == "**" {
                    patterns.push(base.clone());
                } else if let Some(stem) = g.strip_suffix("/**") {
                    patterns.push(format!("{base}/{stem}"));
                }
            }
            let c = &mut compiled[slot(at.anchor)];
            let list = if rule.exclude {
                &mut c.exclude
            } else {
                &mut c.include
            };
            list.extend(patterns.into_iter().map(|p| (p, i)));
        }
        let build = |list: &[(String, usize)]| -> Result<(GlobSet, Vec<usize>)> {
            let mut b = GlobSetBuilder::new();
            for (pattern, i) in list {
                let glob = globset::GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| {
                        anyhow::anyhow!("rule {:?} is not a valid pattern: {e}", rules[*i].text)
                    })?;
                b.add(glob);
            }
            Ok((b.build()?, list.iter().map(|(_, i)| *i).collect()))
        };
        let mut sets = Vec::new();
        for c in &compiled {
            let (include, include_rule) = build(&c.include)?;
            let (exclude, exclude_rule) = build(&c.exclude)?;
            sets.push(Sets {
                include,
                include_rule,
                exclude,
                exclude_rule,
            });
        }
        let sets: [Sets; 2] = sets.try_into().ok().expect("two anchors");
        let n = rules.len();
        Ok(Selection {
            rules,
            sets,
            matched: vec![0; n],
            scratch: Vec::new(),
        })
    }

    /// What `path` (relative to `anchor`) is to the set; counts the rules
    /// that match it.
    pub fn pick(&mut self, anchor: Anchor, path: &str) -> Pick {
        let sets = &self.sets[slot(anchor)];
        sets.exclude.matches_into(path, &mut self.scratch);
        if !self.scratch.is_empty() {
            for &g in &self.scratch {
                self.matched[sets.exclude_rule[g]] += 1;
            }
            return Pick::Excluded;
        }
        sets.include.matches_into(path, &mut self.scratch);
        if self.scratch.is_empty() {
            return Pick::Out;
        }
        let mut tolerant = false;
        let mut last = usize::MAX;
        for &g in &self.scratch {
            let rule = sets.include_rule[g];
            // A plain path has two patterns that may both match.
            if rule != last {
                self.matched[rule] += 1;
                last = rule;
            }
            tolerant |= self.rules[rule].tolerant;
        }
        Pick::In { tolerant }
    }

    /// Does `path` go, without counting it?
    pub fn keeps(&self, anchor: Anchor, path: &str) -> bool {
        let sets = &self.sets[slot(anchor)];
        !sets.exclude.is_match(path) && sets.include.is_match(path)
    }

    /// Would `path` be tolerated if it vanished or changed?
    pub fn tolerates(&self, anchor: Anchor, path: &str) -> bool {
        let sets = &self.sets[slot(anchor)];
        sets.include
            .matches(path)
            .iter()
            .any(|&g| self.rules[sets.include_rule[g]].tolerant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(p: &str) -> Option<SavedPath> {
        Some(SavedPath {
            anchor: Anchor::Workspace,
            path: p.into(),
        })
    }

    #[test]
    fn rules_parse_into_a_fixed_folder_and_a_pattern() {
        let r = parse("=%cache/**/*.o").unwrap();
        assert!(r.must_match && r.tolerant && !r.exclude);
        assert_eq!(
            (r.fixed.as_str(), r.glob.as_deref()),
            ("cache", Some("**/*.o"))
        );
        let r = parse("!~/.cache/tool/tmp/**").unwrap();
        assert!(r.exclude);
        assert_eq!(r.fixed, "~/.cache/tool/tmp");
        let r = parse("target").unwrap();
        assert_eq!((r.fixed.as_str(), r.glob), ("target", None));
        let r = parse(r"odd\*name/x").unwrap();
        assert_eq!((r.fixed.as_str(), r.glob), ("odd*name/x", None));
        for bad in [
            "", "!", "!=x", "==x", "**/*.o", "~/*", "*.log", "a/*/../b", "=!x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn excludes_win_and_stars_stay_in_one_part() {
        let rules: Vec<Rule> = ["cache/**", "!cache/tmp/**", "=logs/*.log", "%data"]
            .iter()
            .map(|r| parse(r).unwrap())
            .collect();
        let placed = [ws("cache"), ws("cache/tmp"), ws("logs"), ws("data")];
        let mut s = Selection::new(rules, &placed).unwrap();
        let w = Anchor::Workspace;
        assert_eq!(s.pick(w, "cache/a/b"), Pick::In { tolerant: false });
        assert_eq!(s.pick(w, "cache/tmp"), Pick::Excluded);
        assert_eq!(s.pick(w, "cache/tmp/x"), Pick::Excluded);
        assert_eq!(s.pick(w, "logs/a.log"), Pick::In { tolerant: false });
        assert_eq!(s.pick(w, "logs/sub/a.log"), Pick::Out);
        assert_eq!(s.pick(w, "logs"), Pick::Out);
        assert_eq!(s.pick(w, "data"), Pick::In { tolerant: true });
        assert_eq!(s.pick(w, "data/x/y"), Pick::In { tolerant: true });
        assert_eq!(s.pick(Anchor::Home, "cache/a"), Pick::Out);
        assert_eq!(s.matched, [1, 2, 1, 2]);
        assert!(s.keeps(w, "cache/x") && !s.keeps(w, "cache/tmp/y"));
        assert!(s.tolerates(w, "data/z") && !s.tolerates(w, "cache/z"));
    }
}
