//! The `.gitignore` lines for the out-links drvkite's steps create in the
//! checkout (see `pipeline::checkout`, which checks them before every
//! pipeline is written).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use camino::Utf8Path;

use super::Write;
use crate::pipeline::Settings;
use crate::pipeline::checkout::{self, Checked};
use crate::pipeline::extra::{self, SCRIPT_LINK};

const HEADER: &str = "# Nix out-links made by drvkite's build and extra steps.";

/// The lines, anchored at the depot's root: a target's `result` (and
/// `result-<output>`), an extra step's script link (and its outputs').
pub fn lines() -> Vec<String> {
    ["result", SCRIPT_LINK]
        .iter()
        .flat_map(|base| [format!("/{base}"), format!("/{base}-*")])
        .collect()
}

/// The `.gitignore` with the lines it lacks appended, or `None` when it
/// has them all. Lines are compared as text: a line is added even when
/// another pattern covers it, which is harmless and keeps a second run
/// from changing anything.
pub(super) fn plan(depot: &Utf8Path) -> Result<Option<Write>> {
    let path = depot.join(".gitignore");
    let old = match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {path}")),
        Ok(m) if !m.is_file() => {
            bail!("{path} is not a regular file: drvkite init adds lines to it; make it one")
        }
        Ok(_) => std::fs::read(&path).with_context(|| format!("cannot read {path}"))?,
    };
    let text = String::from_utf8_lossy(&old);
    let have: BTreeSet<&str> = text.lines().map(str::trim_end).collect();
    let missing: Vec<String> = lines()
        .into_iter()
        .filter(|l| !have.contains(l.as_str()))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let mut bytes = old.clone();
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    if !have.contains(HEADER) {
        bytes.extend_from_slice(format!("{HEADER}\n").as_bytes());
    }
    for l in &missing {
        bytes.extend_from_slice(format!("{l}\n").as_bytes());
    }
    let how = if old.is_empty() { "wrote" } else { "added to" };
    Ok(Some(Write {
        path: ".gitignore",
        bytes,
        done: format!("{how} .gitignore: {}", missing.join(" ")),
    }))
}

/// Ask git, as `drvkite pipeline` will, whether the out-links are ignored
/// now: a rule elsewhere (a `!` line, a nested `.gitignore`) may undo ours.
pub(super) fn verify(depot: &Utf8Path) -> Result<()> {
    let samples: BTreeSet<String> = ["result", SCRIPT_LINK]
        .iter()
        .flat_map(|base| extra::link_names(base, &["out".into(), "dev".into()]))
        .collect();
    match checkout::ensure_ignored(depot, &samples, &Settings::default()).context(
        "the .gitignore lines are in place, but git still does not ignore every out-link",
    )? {
        Checked::Clean => Ok(()),
        Checked::Skipped(why) => bail!("cannot ask git whether the out-links are ignored: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_are_tvls() {
        assert_eq!(
            lines(),
            [
                "/result",
                "/result-*",
                "/nix-buildkite-extra-step-command-script",
                "/nix-buildkite-extra-step-command-script-*"
            ]
        );
    }
}
