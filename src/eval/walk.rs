//! The node walk: when a depot's target list itself fails to evaluate,
//! find the readTree nodes (files) that break it, so that they can be
//! hidden and every healthy target still listed.
//!
//! A walk run visits the nodes as `gather` does and traces each before
//! forcing it (nix/eval.nix, `walked`); when Nix dies, the last trace
//! names the broken node and the error is its message. The node's file is
//! then hidden (readDir leaves it out, as if it were deleted) and the next
//! run resumes after it: k broken nodes take k + 1 runs, and every node
//! is probed about once. A node can fail only because another one is
//! broken (it reads the target list, say): each found node is probed once
//! more with the others hidden, and kept only if it still fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use camino::Utf8Path;
use serde::Serialize;

use super::run::{Outcome, Request, Runner};
use super::{BrokenKind, BrokenTarget};
use crate::types::{AttrPath, Label};

/// How an evaluation sees the depot: without the files of its broken
/// readTree nodes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    /// Folder -> names its readDir must not show.
    pub(super) hidden: BTreeMap<String, Vec<String>>,
}

impl Scope {
    pub(super) fn hide(&mut self, file: &NodeFile) {
        let names = self.hidden.entry(file.dir.clone()).or_default();
        if !names.contains(&file.name) {
            names.push(file.name.clone());
        }
    }
}

/// What a walk run is asked for (nix/eval.nix's `walkJSON`).
#[derive(Debug, Clone, Serialize)]
pub(super) struct WalkSpec {
    /// Probe the nodes after this one (in gather's order); none: all.
    resume: Option<Vec<String>>,
    /// Probe only this node.
    only: Option<Vec<String>>,
}

/// A walk's mark on stderr, after `trace: drvkite:<tag>:`.
#[derive(Debug, PartialEq)]
pub(super) enum Mark {
    /// Everything outside the nodes evaluated: the depot, its settings.
    Begin,
    /// About to force and probe the node at this path.
    Node(Vec<String>),
    /// About to force the node at this path on the way to others.
    Pass(Vec<String>),
    /// A full run has the length of the target list: listing worked.
    Listed,
}

impl Mark {
    pub(super) fn parse(line: &[u8]) -> Option<Mark> {
        match line {
            b"begin" => return Some(Mark::Begin),
            b"listed" => return Some(Mark::Listed),
            _ => {}
        }
        if let Some(json) = line.strip_prefix(b"node ") {
            return serde_json::from_slice(json).ok().map(Mark::Node);
        }
        let json = line.strip_prefix(b"pass ")?;
        serde_json::from_slice(json).ok().map(Mark::Pass)
    }
}

/// Where a walk run got to.
#[derive(Debug, Default)]
pub(super) struct Trail {
    began: bool,
    /// The node forced last.
    last: Option<Vec<String>>,
    /// The nodes probed, in order.
    probed: Vec<Vec<String>>,
    listed: bool,
}

impl Trail {
    pub(super) fn add(&mut self, mark: Mark) {
        match mark {
            Mark::Begin => self.began = true,
            Mark::Node(path) => {
                self.probed.push(path.clone());
                self.last = Some(path);
            }
            Mark::Pass(path) => self.last = Some(path),
            Mark::Listed => self.listed = true,
        }
    }

    pub(super) fn listed(&self) -> bool {
        self.listed
    }
}

/// The entry readTree reads a node from: `name` in `dir`, as Nix prints
/// the folder's path.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NodeFile {
    pub(super) dir: String,
    pub(super) name: String,
}

#[derive(Debug)]
pub(super) struct BrokenNode {
    path: Vec<String>,
    pub(super) file: NodeFile,
    error: String,
}

impl BrokenNode {
    /// Reported like a broken target: its label is the node's.
    pub(super) fn into_broken(self) -> BrokenTarget {
        BrokenTarget {
            label: Label::new(self.path.join("/")),
            attr_path: AttrPath::new(self.path),
            error: self.error,
            kind: BrokenKind::Node,
        }
    }
}

/// After this many broken nodes in a row with one and the same message
/// (location included) and no healthy file between them, the error is
/// taken to be outside them (a readTree `filter` that throws, say): the
/// run fails rather than walking into every file of the depot one process
/// at a time.
const SAME_ERROR_LIMIT: usize = 4;

/// The file of the node at `path`: `<name>.nix` (which wins over a folder
/// of that name, as in readTree), else the folder's `default.nix`. None
/// for the root, and for a path no file can be hidden for.
pub(super) fn node_file(depot: &Utf8Path, path: &[String]) -> Option<NodeFile> {
    let (last, parent) = path.split_last()?;
    if path
        .iter()
        .any(|p| p.is_empty() || p == "." || p == ".." || p.contains('/'))
    {
        return None;
    }
    let dir = parent.iter().fold(depot.to_owned(), |d, p| d.join(p));
    let file = format!("{last}.nix");
    if dir.join(&file).symlink_metadata().is_ok() {
        return Some(NodeFile {
            dir: dir.to_string(),
            name: file,
        });
    }
    let folder = dir.join(last);
    if folder.join("default.nix").symlink_metadata().is_ok() {
        return Some(NodeFile {
            dir: folder.to_string(),
            name: "default.nix".to_owned(),
        });
    }
    None
}

fn request<'a>(
    scope: &Scope,
    hidden: impl IntoIterator<Item = &'a BrokenNode>,
    spec: WalkSpec,
) -> Request {
    let mut scope = scope.clone();
    for node in hidden {
        scope.hide(&node.file);
    }
    Request {
        shard: (0, 1),
        only: None,
        labels_only: false,
        catch_errors: false,
        scope: Arc::new(scope),
        walk: Some(spec),
    }
}

/// The broken nodes of the depot as `scope` shows it, in gather's order;
/// none when every node evaluates (the list fails for another reason).
/// Errors outside every node fail with their message.
pub(super) async fn find_broken_nodes(runner: &Runner, scope: &Scope) -> Result<Vec<BrokenNode>> {
    let depot = &runner.depot;
    let depot_error = |message: &str| anyhow!("evaluating depot {depot} failed: {message}");
    let mut found: Vec<BrokenNode> = Vec::new();
    let mut resume = None;
    // Broken nodes in a row with the same message, no healthy file between.
    let mut streak = 0;
    loop {
        let spec = WalkSpec {
            resume: resume.take(),
            only: None,
        };
        let (outcome, trail) = runner
            .run_traced(&request(scope, &found, spec), None)
            .await?;
        let message = match outcome {
            Outcome::Done(_) => break,
            Outcome::Failed(message) => message,
            Outcome::OutOfMemory => runner.memory_message(),
        };
        let path = match trail.last {
            Some(path) if trail.began && !path.is_empty() => path,
            // Before the first node, or at the root: the depot's own error.
            _ => return Err(depot_error(&message)),
        };
        let label = path.join("/");
        if found.iter().any(|f| f.path == path) {
            bail!(
                "evaluating depot {depot} failed: {message} (in {label}, which still fails with its file hidden: the depot's readTree may not read the depot root)"
            );
        }
        let Some(file) = node_file(depot, &path) else {
            return Err(depot_error(&format!(
                "{message} (in {label}, which has no file drvkite can hide)"
            )));
        };
        let healthy_file_between = trail
            .probed
            .iter()
            .any(|p| *p != path && node_file(depot, p).is_some());
        streak = match found.last() {
            Some(f) if f.error == message && !healthy_file_between => streak + 1,
            _ => 1,
        };
        if streak == SAME_ERROR_LIMIT {
            let labels: Vec<String> = found[found.len() + 1 - SAME_ERROR_LIMIT..]
                .iter()
                .map(|f| f.path.join("/"))
                .collect();
            return Err(depot_error(&format!(
                "{message} (the same error in {SAME_ERROR_LIMIT} files in a row, {} and {label}, and in none between: it is likely outside them, e.g. in the root default.nix or readTree's args)",
                labels.join(", ")
            )));
        }
        found.push(BrokenNode {
            path: path.clone(),
            file,
            error: message,
        });
        resume = Some(path);
    }
    // A node that evaluates once the others are hidden only failed
    // because of them: it is not broken.
    let mut i = 0;
    while i < found.len() {
        let spec = WalkSpec {
            resume: None,
            only: Some(found[i].path.clone()),
        };
        let others = found
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, f)| f);
        let (outcome, _) = runner
            .run_traced(&request(scope, others, spec), None)
            .await?;
        if matches!(outcome, Outcome::Done(_)) {
            found.remove(i);
        } else {
            i += 1;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_walk_marks_only() {
        assert_eq!(Mark::parse(b"begin"), Some(Mark::Begin));
        assert_eq!(Mark::parse(b"listed"), Some(Mark::Listed));
        assert_eq!(
            Mark::parse(br#"node ["tools","a b"]"#),
            Some(Mark::Node(vec!["tools".into(), "a b".into()]))
        );
        assert_eq!(Mark::parse(b"node []"), Some(Mark::Node(vec![])));
        assert_eq!(
            Mark::parse(br#"pass ["tools"]"#),
            Some(Mark::Pass(vec!["tools".into()]))
        );
        for other in [&b"ok 1 {}"[..], b"failed 0 {}", b"node {", b"beginning"] {
            assert_eq!(Mark::parse(other), None);
        }
    }

    #[test]
    fn a_nix_file_wins_over_a_folder_and_the_root_has_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Utf8Path::from_path(tmp.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/default.nix"), "").unwrap();
        std::fs::create_dir_all(root.join("a/plain")).unwrap();
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            node_file(root, &path(&["a", "b"])),
            Some(NodeFile {
                dir: root.join("a/b").to_string(),
                name: "default.nix".into()
            })
        );
        std::fs::write(root.join("a/b.nix"), "").unwrap();
        assert_eq!(
            node_file(root, &path(&["a", "b"])),
            Some(NodeFile {
                dir: root.join("a").to_string(),
                name: "b.nix".into()
            })
        );
        for none in [&[][..], &["a", "plain"], &["a", ".."], &["a/b"]] {
            assert_eq!(node_file(root, &path(none)), None, "{none:?}");
        }
    }
}
