//! `drvkite init`: make a depot's git checkout ready for drvkite in CI.
//!
//! It writes the bootstrap pipeline (`.buildkite/drvkite.yml`) and the
//! `.gitignore` lines for the out-links the generated steps create, and
//! checks that the depot has a readTree. Every change is planned (and every
//! problem found) before anything is written, so bad input leaves the
//! checkout as it was. A file that is already there is never replaced:
//! init says how it differs and leaves it. A second run changes nothing.

mod gitignore;

use std::fmt::Write as _;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use camino::{Utf8Path, Utf8PathBuf};

/// The bootstrap pipeline, the one docs/buildkite.md shows.
pub const BOOTSTRAP_PIPELINE: &str = include_str!("drvkite.yml");
/// Where it goes, relative to the checkout's root.
pub const BOOTSTRAP_PATH: &str = ".buildkite/drvkite.yml";
/// The steps to keep in the Buildkite pipeline's settings: they upload the
/// bootstrap pipeline, and their key is the one every generated step
/// depends on (the file's header shows the same lines).
pub const SETTINGS_STEPS: &str = "steps:
  - label: \":buildkite:\"
    key: \":init:\"
    command: buildkite-agent pipeline upload .buildkite/drvkite.yml
";
/// The root `default.nix` written with `--vendor-readtree` when the depot
/// has none.
const ROOT_NIX: &str = include_str!("default.nix");
/// Where a vendored readTree goes (TVL's place for it).
const READTREE_PATH: &str = "nix/readTree/default.nix";

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Root folder of the depot: the top of its git checkout.
    #[arg(long, env = "DRVKITE_DEPOT", default_value = ".")]
    pub depot: Utf8PathBuf,
    /// When the depot has no readTree, add drvkite's as
    /// nix/readTree/default.nix, and a root default.nix using it when there
    /// is none.
    #[arg(long)]
    pub vendor_readtree: bool,
}

/// A file init would create or extend.
#[derive(Debug)]
struct Write {
    /// Relative to the depot.
    path: &'static str,
    bytes: Vec<u8>,
    /// What the report says about it, e.g. "wrote …".
    done: String,
}

/// Everything init would do, and what it found, before it does any of it.
#[derive(Debug, Default)]
struct Plan {
    writes: Vec<Write>,
    /// Lines for the report about things left as they are.
    kept: Vec<String>,
    /// Advice printed after the report (readTree missing, …).
    advice: Vec<String>,
}

pub fn run(args: &InitArgs) -> Result<ExitCode> {
    let depot = checkout_root(&args.depot)?;
    let plan = plan(&depot, args.vendor_readtree)?;
    let mut report = format!("drvkite init in {depot}\n");
    for w in &plan.writes {
        apply(&depot, w)?;
        let _ = writeln!(report, "  {}", w.done);
    }
    for k in &plan.kept {
        let _ = writeln!(report, "  {k}");
    }
    if plan.writes.is_empty() {
        report.push_str("  nothing to change\n");
    }
    say(&report);
    // What `drvkite pipeline` will check, asked the same way.
    gitignore::verify(&depot)?;
    say(&next_steps(&depot, &plan));
    Ok(ExitCode::SUCCESS)
}

/// Print to stdout; a closed pipe (`drvkite init | head`) is not an error
/// worth a panic: the work is done either way.
fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// The depot folder, which must be the root of a git work tree: the
/// bootstrap pipeline runs drvkite at the root of the agent's checkout.
fn checkout_root(depot: &Utf8Path) -> Result<Utf8PathBuf> {
    let abs = depot.canonicalize_utf8().with_context(|| {
        format!("depot {depot} does not exist: pass the root folder of the depot's git checkout with --depot")
    })?;
    if !abs.is_dir() {
        bail!(
            "depot {depot} is not a folder: pass the root folder of the depot's git checkout with --depot"
        );
    }
    let git = which::which("git")
        .context("git is not installed: drvkite init works in the depot's git checkout")?;
    let out = Command::new(git)
        .arg("-C")
        .arg(&abs)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .context("cannot run git")?;
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || top.is_empty() {
        bail!(
            "depot {depot} is not in a git work tree: drvkite init works in the depot's checkout (run git init there first)"
        );
    }
    let top = Utf8PathBuf::from(top)
        .canonicalize_utf8()
        .context("cannot resolve the git checkout's root")?;
    if top != abs {
        bail!(
            "depot {depot} is not the root of its git checkout {top}: the bootstrap pipeline runs drvkite at the checkout's root; run drvkite init --depot {top}"
        );
    }
    Ok(abs)
}

fn plan(depot: &Utf8Path, vendor_readtree: bool) -> Result<Plan> {
    let mut plan = Plan::default();
    plan_file(
        &mut plan,
        depot,
        BOOTSTRAP_PATH,
        BOOTSTRAP_PIPELINE,
        "the bootstrap pipeline: parent map, pipeline, annotation, upload; soft-fails on status 3",
    )?;
    match gitignore::plan(depot)? {
        Some(w) => plan.writes.push(w),
        None => plan
            .kept
            .push(".gitignore already ignores the out-links drvkite's steps create".into()),
    }
    plan_readtree(&mut plan, depot, vendor_readtree)?;
    Ok(plan)
}

/// Create `rel` with `text` unless it exists; one that differs is kept.
fn plan_file(
    plan: &mut Plan,
    depot: &Utf8Path,
    rel: &'static str,
    text: &str,
    what: &str,
) -> Result<()> {
    let path = depot.join(rel);
    check_parents(depot, rel)?;
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            plan.writes.push(Write {
                path: rel,
                bytes: text.as_bytes().to_vec(),
                done: format!("wrote {rel}: {what}"),
            });
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {path}")),
        Ok(m) if m.is_dir() => {
            bail!("{path} is a folder: drvkite init would write a file there; move it away")
        }
        Ok(_) => {}
    }
    let theirs = std::fs::read(&path).with_context(|| format!("cannot read {path}"))?;
    if theirs == text.as_bytes() {
        plan.kept.push(format!("unchanged: {rel}"));
    } else {
        plan.kept.push(format!(
            "kept {rel} as it is: {}; to take drvkite's, remove it and run drvkite init again",
            first_difference(&String::from_utf8_lossy(&theirs), text)
        ));
    }
    Ok(())
}

/// Every existing component of `rel` but the last must be a folder.
fn check_parents(depot: &Utf8Path, rel: &str) -> Result<()> {
    let mut at = depot.to_owned();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        if at.exists() && !at.is_dir() {
            bail!("{at} is not a folder: drvkite init needs to write {rel} below it; move it away");
        }
    }
    Ok(())
}

/// Where two texts first differ, in words: the line number and both lines.
fn first_difference(theirs: &str, ours: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (theirs.lines().collect(), ours.lines().collect());
    let n = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let show = |l: &str| {
        let l = l.trim();
        let cut: String = l.chars().take(60).collect();
        if cut.len() < l.len() {
            format!("`{cut}…`")
        } else {
            format!("`{cut}`")
        }
    };
    match (a.get(n), b.get(n)) {
        (Some(x), Some(y)) => format!(
            "it differs from drvkite's from line {} (yours: {}; drvkite's: {})",
            n + 1,
            show(x),
            show(y)
        ),
        (Some(x), None) => format!(
            "it has more lines than drvkite's from line {} ({})",
            n + 1,
            show(x)
        ),
        (None, Some(y)) => format!("it ends at line {n}, where drvkite's goes on ({})", show(y)),
        // Same lines, other line endings or a missing final newline.
        (None, None) => "it differs from drvkite's in line endings".to_owned(),
    }
}

/// How the depot's root finds readTree, if it does.
fn plan_readtree(plan: &mut Plan, depot: &Utf8Path, vendor: bool) -> Result<()> {
    let root = depot.join("default.nix");
    let root_text = match std::fs::read(&root) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {root}")),
    };
    let vendored = depot.join(READTREE_PATH).is_file();
    if root_text.as_deref().is_some_and(|t| t.contains("readTree")) {
        plan.kept.push("readTree: default.nix uses it".into());
        return Ok(());
    }
    if vendor {
        if !vendored {
            plan_file(
                plan,
                depot,
                READTREE_PATH,
                crate::eval::READTREE_NIX,
                "drvkite's readTree",
            )?;
        }
        if root_text.is_none() {
            plan_file(
                plan,
                depot,
                "default.nix",
                ROOT_NIX,
                "the depot's root, laid out by readTree",
            )?;
            return Ok(());
        }
    }
    let how_to_use = "make the root default.nix call it, e.g. `let readTree = import ./nix/readTree { }; in readTree.fix (self: readTree { path = ./.; args = { depot = self; }; })` (see docs/nix.md, \"Adopting drvkite in a depot\")";
    plan.advice.push(match (root_text.is_some(), vendored || vendor) {
        (true, true) => format!(
            "default.nix does not mention readTree, so drvkite will not find the depot's targets: {how_to_use}"
        ),
        (true, false) => format!(
            "default.nix does not mention readTree, so drvkite will not find the depot's targets: run drvkite init --vendor-readtree to add drvkite's as {READTREE_PATH} (TVL's works too), then {how_to_use}"
        ),
        (false, _) => format!(
            "the depot has no default.nix: drvkite evaluates a root default.nix laid out by readTree; run drvkite init --vendor-readtree to add drvkite's readTree as {READTREE_PATH} and a default.nix that uses it"
        ),
    });
    Ok(())
}

/// Write one planned file atomically; a new file gets the usual mode, an
/// extended one keeps its own.
fn apply(depot: &Utf8Path, w: &Write) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = depot.join(w.path);
    let dir = path.parent().expect("a file below the depot");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    let mode = std::fs::metadata(&path).map_or(0o644, |m| m.permissions().mode());
    crate::atomic::write_file(&path, &w.bytes)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the permissions of {path}"))
}

/// What is left for the user to do, after the report.
fn next_steps(depot: &Utf8Path, plan: &Plan) -> String {
    let mut s = String::from("\nNext:\n");
    let mut n = 0;
    let mut step = |text: &str| {
        n += 1;
        let _ = writeln!(s, "  {n}. {text}");
    };
    for a in &plan.advice {
        step(a);
    }
    let touched = ["default.nix", "nix/readTree", BOOTSTRAP_PATH, ".gitignore"];
    let uncommitted = Command::new("git")
        .arg("-C")
        .arg(depot)
        .args(["status", "--porcelain", "--untracked-files=all", "--"])
        .args(touched)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    if !uncommitted.is_empty() {
        let files: Vec<String> = String::from_utf8_lossy(&uncommitted)
            .lines()
            .filter_map(|l| l.get(3..).map(str::to_owned))
            .collect();
        step(&format!("commit {}", files.join(" ")));
    }
    let indented: String = SETTINGS_STEPS
        .lines()
        .map(|l| format!("       {l}\n"))
        .collect();
    step(&format!(
        "in the Buildkite pipeline's settings, make its steps upload {BOOTSTRAP_PATH}, with the key every generated step depends on:\n{}",
        indented.trim_end()
    ));
    step(
        "on the agents: Nix, drvkite on PATH (or set DRVKITE in .buildkite/drvkite.yml), and a Buildkite API token with the GraphQL scope for the parent map (BUILDKITE_API_TOKEN, or a file named by BUILDKITE_TOKEN_PATH)",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_steps_are_in_the_pipeline_header() {
        for line in SETTINGS_STEPS.lines() {
            assert!(
                BOOTSTRAP_PIPELINE.contains(&format!("\n#   {line}\n")),
                "{line}"
            );
        }
    }

    #[test]
    fn differences_name_the_line() {
        assert_eq!(
            first_difference("a\nb\nc\n", "a\nx\nc\n"),
            "it differs from drvkite's from line 2 (yours: `b`; drvkite's: `x`)"
        );
        assert_eq!(
            first_difference("a\n", "a\nb\n"),
            "it ends at line 1, where drvkite's goes on (`b`)"
        );
        assert_eq!(
            first_difference("a\nb\n", "a\n"),
            "it has more lines than drvkite's from line 2 (`b`)"
        );
        assert_eq!(
            first_difference("a\r\n", "a\n"),
            "it differs from drvkite's in line endings"
        );
        let long = "y".repeat(100);
        assert!(first_difference(&long, "x").contains(&format!("`{}…`", "y".repeat(60))));
    }
}
