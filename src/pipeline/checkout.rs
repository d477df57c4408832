//! The checkout must stay clean while steps run: many extra steps fail on a
//! dirty tree, and the out-links (GC roots) generated commands create are
//! new files. Before a pipeline is written, git is asked whether every
//! out-link the steps will create is ignored, or lies outside the work
//! tree (e.g. in a GC root folder inside `.git`).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use camino::{Utf8Component, Utf8Path, Utf8PathBuf};

use super::Settings;
use super::extra::{self, SCRIPT_LINK};
use crate::eval::Evaluation;

/// The out-links the pipeline's commands create, as the steps see them:
/// relative to the depot root (their working directory) or absolute.
pub fn out_links(eval: &Evaluation, settings: &Settings) -> BTreeSet<String> {
    let enabled = settings.enabled_phases();
    let mut names = BTreeSet::new();
    for t in &eval.targets {
        if settings.build_enabled() {
            names.extend(extra::link_names("result", &t.outputs));
        }
        for raw in t.extra_steps.values() {
            // An invalid step has already failed generation.
            if let Ok(step) = extra::validate(raw, t, settings)
                && enabled.contains(&step.phase.as_str())
            {
                names.extend(extra::out_links(&step, t));
            }
        }
    }
    names.iter().map(|n| settings.out_link(n)).collect()
}

/// The result of the check.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Every out-link is ignored or outside the work tree.
    Clean,
    /// The check could not run; the reason is for the user.
    Skipped(String),
}

/// Fail, with the `.gitignore` lines to add, when an out-link would show
/// up in `git status`.
pub fn ensure_ignored(
    depot: &Utf8Path,
    links: &BTreeSet<String>,
    settings: &Settings,
) -> Result<Checked> {
    if links.is_empty() {
        return Ok(Checked::Clean);
    }
    let Ok(git) = which::which("git") else {
        return Ok(Checked::Skipped("git is not installed".into()));
    };
    let depot = depot
        .canonicalize_utf8()
        .with_context(|| format!("depot {depot} does not exist"))?;
    let out = Command::new(&git)
        .arg("-C")
        .arg(&depot)
        .args([
            "rev-parse",
            "--is-inside-work-tree",
            "--show-toplevel",
            "--absolute-git-dir",
        ])
        .output()
        .context("cannot run git")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let (top, git_dir) = match (out.status.success(), lines.as_slice()) {
        (true, ["true", top, git_dir]) => {
            (resolve(Utf8Path::new(top)), resolve(Utf8Path::new(git_dir)))
        }
        _ => {
            return Ok(Checked::Skipped(format!(
                "{depot} is not in a git work tree"
            )));
        }
    };
    // Files outside the work tree, in the git directory or below any
    // folder named .git (git never lists those) never show up in
    // `git status`.
    let inside: Vec<Utf8PathBuf> = links
        .iter()
        .map(|l| resolve(&depot.join(l)))
        .filter(|p| {
            p.strip_prefix(&top)
                .is_ok_and(|rel| !rel.components().any(|c| c.as_str() == ".git"))
                && !p.starts_with(&git_dir)
        })
        .collect();
    if inside.is_empty() {
        return Ok(Checked::Clean);
    }
    // NUL-separated on stdin: any byte may appear in a GC root folder.
    let mut child = Command::new(&git)
        .arg("-C")
        .arg(&top)
        .args(["check-ignore", "--stdin", "-z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run git check-ignore")?;
    let input: String = inside.iter().map(|p| format!("{p}\0")).collect();
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .context("cannot write to git check-ignore")?;
    let out = child
        .wait_with_output()
        .context("cannot run git check-ignore")?;
    // Status 1 means "none ignored"; anything else but 0 is a failure.
    if !matches!(out.status.code(), Some(0 | 1)) {
        bail!(
            "cannot ask git whether drvkite's out-links are ignored in {top}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ignored: BTreeSet<&str> = std::str::from_utf8(&out.stdout)
        .context("git check-ignore printed a non-UTF-8 path")?
        .split('\0')
        .filter(|s| !s.is_empty())
        .collect();
    let missing: Vec<&Utf8PathBuf> = inside
        .iter()
        .filter(|p| !ignored.contains(p.as_str()))
        .collect();
    if missing.is_empty() {
        return Ok(Checked::Clean);
    }
    let mut lines: Vec<String> = Vec::new();
    for p in &missing {
        let line = gitignore_line(
            p.strip_prefix(&top).expect("inside the work tree"),
            settings,
        );
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    let names: Vec<&str> = missing
        .iter()
        .map(|p| p.strip_prefix(&top).map_or(p.as_str(), Utf8Path::as_str))
        .collect();
    bail!(
        "the steps' out-links would dirty the git checkout {top} (not ignored: {}), and steps that check for a clean tree would fail: add to {top}/.gitignore the lines {}, or keep the links out of the work tree with a --out-link-dir (outLinkDir) such as .git/drvkite-roots",
        names.join(", "),
        lines
            .iter()
            .map(|l| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// The anchored `.gitignore` line covering an out-link (relative to the
/// work tree root): the whole GC root folder when one is configured, else
/// the link, with `-*` covering a derivation's other outputs.
fn gitignore_line(rel: &Utf8Path, settings: &Settings) -> String {
    let name = rel.file_name().unwrap_or_default();
    let dir = rel.parent().map_or(String::new(), |d| {
        if d.as_str().is_empty() {
            String::new()
        } else {
            format!("{d}/")
        }
    });
    if settings.out_link_dir.is_some() && !dir.is_empty() {
        return format!("/{dir}");
    }
    let pattern = ["result", SCRIPT_LINK]
        .iter()
        .find(|base| name.starts_with(&format!("{base}-")))
        .map_or(name.to_owned(), |base| format!("{base}-*"));
    format!("/{dir}{pattern}")
}

/// An absolute path with `.` and `..` removed and symlinks resolved as far
/// as it exists, so it compares with git's (canonical) paths.
fn resolve(path: &Utf8Path) -> Utf8PathBuf {
    let mut clean = Utf8PathBuf::new();
    for c in path.components() {
        match c {
            Utf8Component::CurDir => {}
            Utf8Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let mut rest = Vec::new();
    let mut base = clean.clone();
    loop {
        if let Ok(real) = base.canonicalize_utf8() {
            let mut p = real;
            for r in rest.iter().rev() {
                p.push(r);
            }
            return p;
        }
        match (base.file_name().map(str::to_owned), base.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                base = parent.to_owned();
            }
            _ => return clean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignore_lines_cover_output_variants_and_root_folders() {
        let tvl = Settings::default();
        let line = |p: &str, s: &Settings| gitignore_line(Utf8Path::new(p), s);
        assert_eq!(line("result", &tvl), "/result");
        assert_eq!(line("result-dev", &tvl), "/result-*");
        assert_eq!(line(SCRIPT_LINK, &tvl), format!("/{SCRIPT_LINK}"));
        assert_eq!(line("sub/result-bin", &tvl), "/sub/result-*");
        let rooted = Settings {
            out_link_dir: Some("roots".into()),
            ..Default::default()
        };
        assert_eq!(line("roots/result", &rooted), "/roots/");
    }

    #[test]
    fn resolve_removes_dots_beyond_existing_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let base = Utf8Path::from_path(tmp.path())
            .unwrap()
            .canonicalize_utf8()
            .unwrap();
        let p = base.join("a/../b/./c");
        assert_eq!(resolve(&p), base.join("b/c"));
    }
}
