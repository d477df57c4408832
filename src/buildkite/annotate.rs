//! `drvkite annotate`: a summary of the generated pipeline on the Buildkite
//! build page (`buildkite-agent annotate`), from the folder's summary.json.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use anyhow::Result;
use camino::{Utf8Path, Utf8PathBuf};
use clap::Args;
use serde_json::Value;

use super::upload::{MANIFEST, Manifest};
use super::{Agent, group, read_pipeline_json};
use crate::pipeline::{ParentStatus, ParentSummary, Summary};

/// Longer lists of targets are folded into `<details>`.
const COLLAPSE_OVER: usize = 20;
/// Rows shown per table at most.
const MAX_ROWS: usize = 1000;
/// Characters kept of one error message, and of one label in a table.
const MAX_ERROR: usize = 300;
/// Buildkite refuses an annotation body over 1 MiB, and the bootstrap
/// pipeline stops before its upload when `drvkite annotate` fails: rows
/// are left out (and counted) so that the body stays below it, however
/// long or many the labels.
const MAX_BODY: usize = 1 << 20;
/// Kept free of rows for the text after them: headings, the "… and N
/// more" lines and closing tags of the tables that follow.
const ROOM_AFTER_ROWS: usize = 16 * 1024;

#[derive(Debug, Args)]
pub struct AnnotateArgs {
    /// The folder `drvkite pipeline --out` wrote.
    #[arg(long, default_value = "pipeline")]
    pub dir: Utf8PathBuf,
    /// The annotation's context: annotating again replaces it.
    #[arg(long, default_value = "drvkite")]
    pub context: String,
    /// Print the command and the Markdown instead of running buildkite-agent.
    #[arg(long)]
    pub dry_run: bool,
}

impl Summary {
    pub fn load(dir: &Utf8Path) -> Result<Self> {
        // The manifest names the summary; without one, use the usual name.
        let name = if dir.join(MANIFEST).exists() {
            Manifest::load(dir)?.summary
        } else {
            "summary.json".to_owned()
        };
        read_pipeline_json(dir, &name, "summary")
    }

    /// Buildkite's annotation style: red for broken targets, orange when
    /// the parent map was unusable, blue otherwise.
    pub fn style(&self) -> &'static str {
        if !self.broken.is_empty() {
            "error"
        } else if self.parent_map.status == ParentStatus::Invalid {
            "warning"
        } else {
            "info"
        }
    }
}

pub fn run(args: &AnnotateArgs) -> Result<()> {
    let summary = Summary::load(&args.dir)?;
    let body = render(&summary);
    let agent = Agent::new(args.dry_run)?;
    group("annotating the build");
    agent.run(
        &[
            "annotate",
            "--context",
            &args.context,
            "--style",
            summary.style(),
        ],
        Some(body.as_bytes()),
    )
}

/// The annotation's Markdown.
pub fn render(s: &Summary) -> String {
    let mut md = String::new();
    let broken = if s.broken.is_empty() {
        String::new()
    } else {
        format!(", {} failed to evaluate", s.broken.len())
    };
    let _ = writeln!(
        md,
        "#### drvkite: {} of {} targets to build{broken}\n",
        s.changed.len(),
        s.targets
    );
    if !s.broken.is_empty() {
        let _ = writeln!(
            md,
            "Each target that failed to evaluate has a failing :x: step instead of its build step; its extra steps were not generated.\n"
        );
    }
    // Without a usable parent map nothing was compared: every target is
    // to build, none "changed", "added" or "removed". The cached column
    // only when the check was on.
    let compared = s.parent_map.status == ParentStatus::Used;
    let mut head: Vec<&str> = vec!["targets"];
    let mut cells: Vec<String> = vec![s.targets.to_string()];
    if compared {
        head.extend(["changed", "unchanged"]);
        cells.extend([s.changed.len().to_string(), s.unchanged.to_string()]);
    } else {
        head.push("to build");
        cells.push(s.changed.len().to_string());
    }
    if s.cache_check.is_some() {
        head.push("cached");
        cells.push(s.cached.len().to_string());
    }
    if compared {
        head.extend(["added", "removed"]);
        cells.extend([s.added.len().to_string(), s.removed.len().to_string()]);
    }
    head.extend(["extra steps", "evaluation"]);
    cells.extend([
        s.extra_steps.to_string(),
        format!("{:.1} s", s.evaluation_seconds),
    ]);
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}", " ---: |".repeat(head.len()));
    let _ = writeln!(md, "| {} |\n", cells.join(" | "));
    if !s.steps.is_empty() {
        let phases: Vec<String> = s
            .steps
            .iter()
            .map(|(phase, n)| format!("{} {n}", escape(phase)))
            .collect();
        let _ = writeln!(md, "Steps: {}.\n", phases.join(", "));
    }
    let _ = writeln!(md, "Parent map: {}\n", parent_map_line(&s.parent_map));
    if let Some(c) = &s.cache_check {
        let _ = writeln!(md, "{}\n", cache_line(c));
    }

    let added: BTreeSet<&str> = s.added.iter().map(|l| l.as_str()).collect();
    let rows: Vec<Vec<String>> = s
        .changed
        .iter()
        .map(|l| {
            let kind = if added.contains(l.as_str()) {
                "added"
            } else {
                "changed"
            };
            let mut row = vec![label_cell(l.as_str())];
            if compared {
                row.push(kind.to_owned());
            }
            row
        })
        .collect();
    if compared {
        table(&mut md, "Changed targets", &["target", "change"], &rows);
    } else {
        table(&mut md, "Targets to build", &["target"], &rows);
    }
    let rows: Vec<Vec<String>> = s
        .cached
        .iter()
        .map(|c| vec![label_cell(c.label.as_str()), escape(&c.cache)])
        .collect();
    table(
        &mut md,
        "Skipped as cached",
        &["target", "binary cache"],
        &rows,
    );
    let rows: Vec<Vec<String>> = s
        .removed
        .iter()
        .map(|l| vec![label_cell(l.as_str())])
        .collect();
    table(&mut md, "Removed targets", &["target"], &rows);
    let rows: Vec<Vec<String>> = s
        .broken
        .iter()
        .map(|b| vec![label_cell(b.label.as_str()), escape(&shorten(&b.error))])
        .collect();
    table(&mut md, "Broken targets", &["target", "error"], &rows);
    md
}

/// A titled table, folded away when long; nothing when empty.
fn table(md: &mut String, title: &str, head: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        return;
    }
    let collapse = rows.len() > COLLAPSE_OVER;
    if collapse {
        let _ = writeln!(
            md,
            "<details>\n<summary>{title} ({})</summary>\n",
            rows.len()
        );
    } else {
        let _ = writeln!(md, "**{title} ({})**\n", rows.len());
    }
    let row = |cells: &[&str]| format!("| {} |", cells.join(" | "));
    let _ = writeln!(md, "{}", row(head));
    let _ = writeln!(md, "{}", row(&vec!["---"; head.len()]));
    let mut shown = 0;
    for r in rows.iter().take(MAX_ROWS) {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let line = row(&cells);
        if md.len() + line.len() + 1 + ROOM_AFTER_ROWS > MAX_BODY {
            break;
        }
        md.push_str(&line);
        md.push('\n');
        shown += 1;
    }
    if rows.len() > shown {
        let mut last = vec![""; head.len()];
        let more = format!(
            "… and {} more (see summary.json in the artifacts)",
            rows.len() - shown
        );
        last[0] = &more;
        let _ = writeln!(md, "{}", row(&last));
    }
    md.push('\n');
    if collapse {
        md.push_str("</details>\n\n");
    }
}

fn parent_map_line(p: &ParentSummary) -> String {
    let detail = if p.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", escape(&shorten(&p.detail)))
    };
    match p.status {
        ParentStatus::Used => {
            let from = p.source.as_ref().map(source_text).unwrap_or_default();
            if from.is_empty() {
                format!("used{detail}.")
            } else {
                format!("{from}{detail}.")
            }
        }
        ParentStatus::None => format!("none{detail}: every target is built."),
        ParentStatus::Invalid => format!("**unusable**{detail}: every target is built."),
    }
}

fn cache_line(c: &crate::substitute::CheckSummary) -> String {
    let caches = if c.caches.is_empty() {
        "none to ask".to_owned()
    } else {
        c.caches
            .iter()
            .map(|n| escape(n))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = format!(
        "Binary caches ({caches}): {} of {} derivations checked are cached, their steps skipped.",
        c.cached, c.checked
    );
    if let Some(w) = &c.warning {
        let _ = write!(line, " **Warning**: {}", escape(&shorten(w)));
    }
    line
}

/// Where the map came from, from the `.source.json` that `parent-map
/// fetch` wrote (fields missing from another tool's sidecar are left out).
fn source_text(v: &Value) -> String {
    let str_of = |k: &str| v.get(k).and_then(Value::as_str);
    let mut s = String::new();
    match (
        v.get("buildNumber").and_then(Value::as_u64),
        str_of("buildUrl"),
    ) {
        (Some(n), Some(url)) if url.starts_with("https://") || url.starts_with("http://") => {
            let _ = write!(s, "build [#{n}]({})", escape_url(url));
        }
        (Some(n), _) => {
            let _ = write!(s, "build #{n}");
        }
        _ => s.push_str("an earlier build"),
    }
    if let Some(branch) = str_of("branch") {
        let _ = write!(s, " of {}", escape(branch));
    }
    if let Some(commit) = str_of("commit") {
        let short: String = commit.chars().take(12).collect();
        let _ = write!(s, " at {}", escape(&short));
    }
    let distance = v.get("distance").and_then(Value::as_u64);
    match (str_of("how"), distance) {
        (Some("merge-base"), _) => s.push_str(", the merge-base of this commit"),
        (Some("ancestor"), Some(1)) => s.push_str(", 1 commit before the merge-base"),
        (Some("ancestor"), Some(d)) => {
            let _ = write!(s, ", {d} commits before the merge-base");
        }
        (Some("newest"), _) => s.push_str(", the newest passed build of the default branch"),
        _ => {}
    }
    s
}

fn shorten(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > MAX_ERROR {
        let mut cut: String = one_line.chars().take(MAX_ERROR).collect();
        cut.push('…');
        cut
    } else {
        one_line
    }
}

/// A label in a table: escaped, and cut like an error message when
/// longer (summary.json has it whole).
fn label_cell(label: &str) -> String {
    if label.chars().count() > MAX_ERROR {
        let mut cut: String = label.chars().take(MAX_ERROR).collect();
        cut.push('…');
        escape(&cut)
    } else {
        escape(label)
    }
}

/// Text that reads as itself in Buildkite's Markdown and HTML: every
/// character with a meaning there (`:` starts emoji codes) becomes a
/// character reference, which
/// Markdown renders literally (a backslash would not work inside tables
/// and HTML blocks alike).
///
/// GitHub-flavoured Markdown also links bare `www.host`, `host:` URLs
/// and `name@host.tld` addresses. The first two are found in the raw
/// text, so `.` and `:` as references keep them text; an address is
/// found after references are decoded, so an invisible word joiner
/// (U+2060) goes before each `@`: `admin@evil.example` shows as itself,
/// not as a link.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' | '<' | '>' | '"' | '\'' | '|' | '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')'
            | '#' | '!' | '~' | '{' | '}' | '+' | '$' | ':' | '.' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            '@' => out.push_str("&#8288;&#64;"),
            // Bidirectional controls reorder what follows them on screen
            // ("a\u{202e}gnp.exe" shows as "aexe.png"): named instead.
            '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => {
                let _ = write!(out, "&#60;U+{:04X}&#62;", c as u32);
            }
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A link target: only parentheses and spaces would end it early.
fn escape_url(url: &str) -> String {
    url.replace('(', "%28")
        .replace(')', "%29")
        .replace(' ', "%20")
        .replace('"', "%22")
        .replace('<', "%3C")
        .replace('>', "%3E")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("lib/a"), "lib/a");
        assert_eq!(escape("<b>|*x*_"), "&#60;b&#62;&#124;&#42;x&#42;&#95;");
        assert_eq!(escape("a\nb"), "a b");
    }

    #[test]
    fn bidirectional_controls_are_named_not_applied() {
        assert_eq!(
            escape("tools/a\u{202e}gnp\u{2066}"),
            "tools/a&#60;U+202E&#62;gnp&#60;U+2066&#62;"
        );
    }

    #[test]
    fn bare_addresses_and_hosts_are_not_linked() {
        // cmark-gfm (GitHub's Markdown, with its autolink extension)
        // rendered these labels as links to www.evil.example and
        // mailto:admin@evil.example.
        assert_eq!(
            escape("www.evil.example/login"),
            "www&#46;evil&#46;example/login"
        );
        assert_eq!(
            escape("admin@evil.example"),
            "admin&#8288;&#64;evil&#46;example"
        );
    }

    #[test]
    fn huge_tables_are_cut() {
        let rows: Vec<Vec<String>> = (0..MAX_ROWS + 3).map(|i| vec![i.to_string()]).collect();
        let mut md = String::new();
        table(&mut md, "T", &["n"], &rows);
        assert!(
            md.starts_with("<details>\n<summary>T (1003)</summary>\n\n| n |\n| --- |\n| 0 |\n")
        );
        assert!(md.contains("| 999 |\n| … and 3 more (see summary.json in the artifacts) |\n"));
        assert!(!md.contains("| 1000 |"));
    }

    #[test]
    fn long_and_many_labels_keep_the_body_under_buildkites_limit() {
        // One label of 300,000 characters, each escaped to five bytes,
        // and 4,000 more of 300: the body once reached 1.5 MB, which
        // Buildkite refuses, and the bootstrap pipeline then uploads
        // nothing.
        let huge = "_:".repeat(150_000);
        let many = |tag: &str| -> Vec<String> {
            (0..1000)
                .map(|i| format!("{tag}{i}/{}", "_:".repeat(150)))
                .collect()
        };
        let mut changed = vec![huge.clone()];
        changed.extend(many("c"));
        let summary: Summary = serde_json::from_value(serde_json::json!({
            "version": 1, "targets": 2001, "changed": changed, "unchanged": 0,
            "added": [], "removed": many("r"), "extraSteps": 0, "steps": {},
            "broken": many("b").iter().map(|l| serde_json::json!({"label": l, "error": l})).collect::<Vec<_>>(),
            "evaluationSeconds": 1.0,
            "parentMap": {"status": "used", "detail": ""},
            "cached": many("k").iter().map(|l| serde_json::json!({"label": l, "cache": "https://c"})).collect::<Vec<_>>(),
            "cacheCheck": null,
        }))
        .unwrap();
        let md = render(&summary);
        assert!(md.len() < 1 << 20, "{} bytes", md.len());
        assert!(
            md.contains(&escape(&huge[..300])),
            "the long label is shown, cut"
        );
        assert!(md.contains("more (see summary.json in the artifacts)"));
        assert!(md.ends_with("</details>\n\n"), "every table is closed");
    }

    #[test]
    fn source_of_a_fetched_map() {
        let v = serde_json::json!({
            "how": "ancestor", "distance": 2, "commit": "0123456789abcdef0123",
            "branch": "main", "buildNumber": 7, "buildUrl": "https://bk.example/o/p/builds/7"
        });
        assert_eq!(
            source_text(&v),
            "build [#7](https://bk.example/o/p/builds/7) of main at 0123456789ab, 2 commits before the merge-base"
        );
        assert_eq!(source_text(&serde_json::json!({})), "an earlier build");
    }
}
