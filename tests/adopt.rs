//! What a new user meets first: the demo script, the example depot copied
//! away as a template, import errors that say where to look, and `--help`
//! that explains every argument.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use common::*;

/// `drvkite drvmap` of a depot into `out`; the map's labels.
fn drvmap(depot: &Path, out: &Path) -> serde_json::Value {
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(depot)
        .arg("--out")
        .arg(out));
    read_json(out)
}

/// `drvkite pipeline` on a depot into `<tmp>/p`: its status and stderr.
fn run_pipeline(depot: &Depot, args: &[&str]) -> (Option<i32>, String) {
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(depot.out("p"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    (res.status.code(), stderr)
}

fn copy_tree(from: &Path, to: &Path) {
    ok(Command::new("cp").arg("-r").arg(from).arg(to));
}

#[test]
fn a_copied_example_depot_evaluates_to_the_same_map() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = drvmap(
        &Path::new(REPO).join("examples/depot"),
        &tmp.path().join("repo.json"),
    );
    // Copied as a user would, to a place with nothing around it.
    let copy = tmp.path().join("my-depot");
    copy_tree(&Path::new(REPO).join("examples/depot"), &copy);
    assert_eq!(drvmap(&copy, &tmp.path().join("copy.json")), repo);
    assert!(repo.as_object().unwrap().len() > 10, "{repo}");
    // Its readTree is a copy of drvkite's, kept the same.
    let read = |p: &str| std::fs::read(Path::new(REPO).join(p)).unwrap();
    assert!(
        read("examples/depot/nix/readTree/default.nix") == read("nix/readTree/default.nix"),
        "examples/depot/nix/readTree/default.nix must be a copy of nix/readTree/default.nix"
    );
}

#[test]
fn a_missing_import_names_the_file_that_imports_it() {
    let depot = Depot::new();
    // What copying the example depot used to do: its readTree forwarded
    // to a path that is not there.
    depot.write(
        "nix/readTree/default.nix",
        "import ../../../../nix/readTree\n",
    );
    let out = fails(
        drvkite()
            .arg("drvmap")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(depot.out("m.json")),
    );
    let line = one_line_failure(&out);
    let importer = depot.root.join("nix/readTree/default.nix");
    assert!(
        line.contains(&format!("(imported by {}:1)", importer.display())),
        "{line}"
    );
    assert!(line.contains("getting status of"), "{line}");

    // In one target: that target is broken, and says where.
    let depot = Depot::new();
    depot.write(
        "tools/gone.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"gone\"; text = import ./moved.nix; }\n",
    );
    let (status, stderr) = run_pipeline(&depot, &[]);
    assert_eq!(status, Some(3), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("tools/gone failed to evaluate"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        warning.contains(&format!(
            "(imported by {}:1)",
            depot.root.join("tools/gone.nix").display()
        )),
        "{warning}"
    );
}

/// The folder cargo builds this crate in: the test binaries' profile
/// folder's parent.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_drvkite"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned()
}

#[test]
fn the_demo_runs_with_cargo_target_dir_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    // This build's target folder, given relative to the caller's folder:
    // the script must resolve it there, and ask cargo for the binary.
    // (The same folder, so cargo has nothing to rebuild.)
    let up = "../".repeat(tmp.path().components().count() - 1);
    let relative = format!(
        "{up}{}",
        target_dir().display().to_string().trim_start_matches('/')
    );
    let mut demo = Command::new("bash");
    // A user's shell has none of what cargo sets for this test (some
    // build scripts rebuild when CARGO_MANIFEST_DIR changes).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO") && name != "CARGO_HOME")
            || ["RUST_RECURSION_COUNT", "LD_LIBRARY_PATH", "DRVKITE_BIN"].contains(&&*name)
        {
            demo.env_remove(&*name);
        }
    }
    let res = demo
        .arg(Path::new(REPO).join("scripts/demo.sh"))
        .arg("out")
        .current_dir(tmp.path())
        .env("CARGO_TARGET_DIR", &relative)
        .env("NIX_CONFIG", "substituters =")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr),
    );
    assert!(res.status.success(), "{stdout}\n{stderr}");
    let out = tmp.path().join("out");
    assert!(
        stdout.contains(&format!("The demo's output is in {}", out.display())),
        "{stdout}"
    );
    // Cargo names the binary by its resolved path.
    let bin = target_dir().canonicalize().unwrap().join("debug/drvkite");
    assert!(
        stdout.contains(&format!("{} init --depot DIR", bin.display())),
        "{stdout}"
    );
    assert!(!stderr.contains("note:"), "{stderr}");
    let summary = read_json(&out.join("pipeline-changed/summary.json"));
    assert_eq!(summary["unchanged"], 4, "{summary}");
    assert_eq!(summary["changed"].as_array().unwrap().len(), 8);
}

#[test]
fn every_argument_has_help() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("{path} {} (no about)", sub.get_name()));
            }
            walk(sub, &path, missing);
        }
    }
    let mut missing = Vec::new();
    walk(&drvkite::cli::Cli::command(), "", &mut missing);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}

#[test]
fn the_last_line_says_to_build_without_a_parent_map_and_counts_in_english() {
    let depot = Depot::new();
    let run = |args: &[&str]| {
        let (status, stderr) =
            run_pipeline(&depot, &[&["--active-phases", "build"], args].concat());
        assert_eq!(status, Some(0), "{stderr}");
        stderr
            .lines()
            .find(|l| l.starts_with("wrote "))
            .unwrap_or_else(|| panic!("{stderr}"))
            .to_owned()
    };
    let first = run(&[]);
    assert!(
        first.contains(": 1 chunk file; 12 targets, 12 to build (no usable parent map), 3 extra steps, 0 broken;"),
        "{first}"
    );
    let map = depot.out("parent.json");
    std::fs::copy(depot.out("p").join("drvmap.json"), &map).unwrap();
    let second = run(&["--parent-map", map.to_str().unwrap()]);
    assert!(
        second.contains(": 1 chunk file; 12 targets, 0 changed, 12 unchanged, 3 extra steps"),
        "{second}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn the_readme_is_a_front_page_and_every_doc_link_resolves() {
    let repo = Path::new(REPO);
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    assert!(readme.len() < 20_000, "README.md is {} bytes", readme.len());
    let mut pages = vec![repo.join("README.md")];
    for e in std::fs::read_dir(repo.join("docs")).unwrap() {
        pages.push(e.unwrap().path());
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        // Markdown links: `](target)`, never across lines here.
        for (_, rest) in text.match_indices("](").map(|(i, _)| ((), &text[i + 2..])) {
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http") || target.contains(' ') {
                continue;
            }
            let (file, frag) = target.split_once('#').unwrap_or((target, ""));
            let file = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !file.exists() {
                broken.push(format!("{}: {target} (no such file)", page.display()));
            } else if !frag.is_empty()
                && !anchors(&std::fs::read_to_string(&file).unwrap()).contains(&frag.to_owned())
            {
                broken.push(format!("{}: {target} (no such heading)", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}
