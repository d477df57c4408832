//! Invoking Nix: locating `nix-instantiate`, unpacking drvkite's Nix files
//! for it, checking the depot path, rooting the `.drv` files a run wrote,
//! and cutting Nix's error reports down to one line.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use camino::{Utf8Path, Utf8PathBuf};

use super::Evaluation;
use crate::types::DrvPath;

const EVAL_NIX: &str = include_str!("../../nix/eval.nix");
pub const READTREE_NIX: &str = include_str!("../../nix/readTree/default.nix");

/// The Nix tools drvkite runs, located on PATH.
#[derive(Debug, Clone)]
pub struct Nix {
    pub instantiate: PathBuf,
}

impl Nix {
    pub fn locate() -> Result<Self> {
        match which::which("nix-instantiate") {
            Ok(instantiate) => Ok(Nix { instantiate }),
            Err(_) => bail!(
                "nix-instantiate not found on PATH: install Nix (on Debian: apt-get install nix-bin) or add its bin folder to PATH"
            ),
        }
    }
}

/// drvkite's Nix files, unpacked into a temporary folder for Nix to read.
pub(super) struct Expression {
    pub(super) dir: tempfile::TempDir,
}

impl Expression {
    pub(super) fn unpack() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("drvkite-nix-")
            .tempdir()
            .context("cannot create a temporary folder for drvkite's Nix files")?;
        std::fs::create_dir(dir.path().join("readTree"))?;
        std::fs::write(dir.path().join("eval.nix"), EVAL_NIX)?;
        std::fs::write(dir.path().join("readTree/default.nix"), READTREE_NIX)?;
        std::fs::write(dir.path().join("gc-roots.nix"), GC_ROOTS_NIX)?;
        Ok(Expression { dir })
    }

    /// Make every instantiated .drv (targets, extra-step commands and
    /// parent overrides) a GC root through one link, `<dir>/drvkite-drvs`,
    /// replaced on each run. The link points at a .drv that lists all of
    /// them as inputs: rooting it keeps them, and the previous run's roots
    /// become collectable. Nix registers the link as an indirect root
    /// itself (as `nix-store --add-root --indirect` does), and writes it
    /// in one rename; nothing is built.
    pub(super) async fn register_gc_roots(
        &self,
        instantiate: &Path,
        eval: &Evaluation,
        dir: &Utf8Path,
    ) -> Result<usize> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create --gc-roots-dir {dir}: check the path and permissions")
        })?;
        let dir = dir
            .canonicalize_utf8()
            .with_context(|| format!("cannot resolve --gc-roots-dir {dir}"))?;
        let drvs: Vec<&str> = eval.drv_paths().into_iter().map(DrvPath::as_str).collect();
        let list = self.dir.path().join("gc-roots.json");
        std::fs::write(&list, serde_json::to_vec(&drvs)?)
            .context("cannot write the list of GC roots to a temporary file")?;
        let link = dir.join("drvkite-drvs");
        let out = tokio::process::Command::new(instantiate)
            .arg(self.dir.path().join("gc-roots.nix"))
            .arg("--argstr")
            .arg("listFile")
            .arg(&list)
            .arg("--add-root")
            .arg(link.as_str())
            .arg("--indirect")
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run nix-instantiate to register GC roots")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "cannot register GC roots in --gc-roots-dir {dir}: {}",
                trim_nix_error(&stderr, self.dir.path())
            );
        }
        Ok(drvs.len())
    }
}

/// Check the depot path before Nix sees it, so mistakes get a plain answer.
pub fn check_depot(depot: &Utf8Path) -> Result<Utf8PathBuf> {
    let abs = depot
        .canonicalize_utf8()
        .with_context(|| format!("depot {depot} does not exist: pass the folder holding the depot's default.nix with --depot"))?;
    if !abs.join("default.nix").is_file() {
        bail!(
            "depot {depot} has no default.nix: pass the root folder of a readTree depot with --depot"
        );
    }
    Ok(abs)
}

/// One derivation with every .drv of a run as input sources: the single
/// thing `register_gc_roots` roots. `storePath` turns each path back into a
/// store reference (the JSON list has none) and fails on a missing one.
const GC_ROOTS_NIX: &str = r#"{ listFile }:
derivation {
  name = "drvkite-gc-roots";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo this derivation only holds GC roots; do not build it; exit 1" ];
  drvs = map builtins.storePath (builtins.fromJSON (builtins.readFile listFile));
}
"#;

/// Reduce Nix's multi-line error report to one line: the `error:` message
/// and the first location in the user's files (drvkite's own are noise).
pub fn trim_nix_error(stderr: &str, internal_dir: &std::path::Path) -> String {
    let internal = internal_dir.to_string_lossy();
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(start) = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("error:"))
    else {
        let last = lines.iter().rev().find(|l| !l.trim().is_empty());
        return last.map_or_else(
            || "nix-instantiate failed without a message".to_owned(),
            |l| l.trim().to_owned(),
        );
    };
    let first = lines[start].trim();
    let mut message = vec![
        first
            .strip_prefix("error:")
            .unwrap_or(first)
            .trim()
            .to_owned(),
    ];
    message.extend(
        lines[start + 1..]
            .iter()
            .map(|l| l.trim())
            .take_while(|t| !t.is_empty() && !t.starts_with("at "))
            .filter(|t| !t.starts_with("(use '--show-trace'"))
            .map(str::to_owned),
    );
    let location = lines[start + 1..]
        .iter()
        .filter_map(|l| l.trim().strip_prefix("at "))
        .map(|at| at.trim_end_matches(':'))
        .find(|at| !at.contains(internal.as_ref()) && !at.starts_with('«'));
    let mut s = message.join(" ");
    if let Some(loc) = location {
        s.push_str(&format!(" (at {loc})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_show_trace_hint() {
        let stderr = "error: thrown on purpose\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "thrown on purpose"
        );
    }

    #[test]
    fn trims_nix_errors_to_one_line() {
        let stderr = "error: attribute 'nope' missing\n\n       at /depot/tools/a.nix:3:5:\n\n            2| { depot, ... }:\n            3|   depot.nope\n             |   ^\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "attribute 'nope' missing (at /depot/tools/a.nix:3:5)"
        );
    }

    #[test]
    fn skips_internal_locations() {
        let stderr = "error: boom\n\n       at /tmp/drvkite-nix-x/eval.nix:10:3:\n\n       at /depot/b.nix:1:1:\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "boom (at /depot/b.nix:1:1)"
        );
    }
}
