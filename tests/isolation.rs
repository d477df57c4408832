//! Fault isolation at the node level, with real Nix: a readTree file that
//! breaks at its top level (so that the target list itself cannot be
//! evaluated) gets one failing step, and every other target is built as
//! if the broken files were deleted. On a depot with a TVL-style
//! `ci.targets = readTree.gather …` and on one without `ci.targets`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Depot, broken, drvkite, phases, read_json};
use serde_json::Value;

/// Files broken at their top level, one for each way a file can break,
/// with their label and a part of the message each must report.
const BROKEN_FILES: &[(&str, &str, &str)] = &[
    (
        "tools/broken/throws.nix",
        "{ ... }: throw \"thrown at the top\"\n",
        "thrown at the top",
    ),
    (
        "tools/broken/asserts.nix",
        "{ ... }: assert 1 == 2; { }\n",
        "assertion '(1 == 2)' failed",
    ),
    (
        "tools/broken/no-arg.nix",
        "{ depot, required, ... }: { }\n",
        "called without required argument 'required'",
    ),
    (
        "tools/broken/missing-attr.nix",
        "{ depot, ... }: depot.nope\n",
        "attribute 'nope' missing",
    ),
    (
        "tools/broken/type-error.nix",
        "{ ... }: 1 + \"a\"\n",
        "cannot add a string to an integer",
    ),
    (
        "tools/broken/recursion.nix",
        "{ ... }: let x = x; in x\n",
        "infinite recursion encountered",
    ),
    (
        "tools/broken/syntax.nix",
        "{ depot, ... }: {\n",
        "syntax error",
    ),
    (
        "tools/broken/imports-missing.nix",
        "{ ... }: import ./not-there.nix\n",
        "not-there.nix': No such file or directory (imported by ",
    ),
    // A folder's default.nix: its subfolder is still read, as it would be
    // without the file.
    (
        "apps/broken-dir/default.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"x\"; } // throw \"folder broken\"\n",
        "folder broken",
    ),
];

/// Healthy files placed around the broken ones, and targets that fail on
/// their own (inside the derivation, as before).
const AROUND: &[(&str, &str)] = &[
    (
        "apps/broken-dir/sub/default.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"under-a-broken-folder\"; }\n",
    ),
    (
        "tools/broken/zz-after.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"after-the-broken-ones\"; deps = [ depot.lib.greeting ]; }\n",
    ),
    (
        "tools/target-throws.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"t\"; text = throw \"inside the derivation\"; }\n",
    ),
    (
        "tools/target-missing.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"t\"; text = depot.lib.nope; }\n",
    ),
];

const TARGET_ERRORS: &[&str] = &["tools/target-missing", "tools/target-throws"];

/// TVL's depot wiring (its root default.nix): `ci.targets` gathered with
/// TVL's rule, the pipelines left out, and a pipeline target that reads
/// the list (so it fails whenever the list does, without being broken).
fn make_tvl_style(depot: &Depot) {
    depot.write(
        "default.nix",
        r#"{ ... }@args:
let
  readTree = import ./nix/readTree { };
  eligible = node: (node ? outPath) && !(node.meta.ci.skip or (node.meta.broken or false));
in
readTree.fix (
  self:
  readTree {
    path = ./.;
    args = {
      depot = self;
      externalArgs = args;
    };
  }
  // {
    ci.excluded = [ ];
    ci.targets = readTree.gather (t: eligible t && !builtins.elem t self.ci.excluded) (
      self // { ops = self.ops // { pipelines = null; }; }
    );
  }
)
"#,
    );
    depot.write(
        "ops/pipelines/depot.nix",
        "{ depot, ... }: assert builtins.length depot.ci.targets > 0; depot.nix.build.mkTarget { name = \"pipeline\"; }\n",
    );
}

fn label_of(file: &str) -> String {
    file.trim_end_matches(".nix")
        .trim_end_matches("/default")
        .to_owned()
}

/// `drvkite pipeline`, which must write the folder; returns it and the run.
fn run(depot: &Depot, name: &str, args: &[&str]) -> (PathBuf, Output) {
    run_with(depot, name, args, |_| {})
}

fn run_with(
    depot: &Depot,
    name: &str,
    args: &[&str],
    tweak: impl FnOnce(&mut Command),
) -> (PathBuf, Output) {
    let out = depot.out(name);
    let mut cmd = drvkite();
    cmd.arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(args);
    tweak(&mut cmd);
    let res = cmd.output().expect("spawn drvkite");
    assert!(
        out.join("summary.json").is_file(),
        "{cmd:?} wrote nothing: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    (out, res)
}

fn is_broken_step(step: &Value, label: &str) -> bool {
    step["label"].as_str() == Some(&format!(":x: {label} failed to evaluate"))
}

/// Every step of every phase, without the failing steps of `labels`.
fn steps_without(out: &Path, labels: &BTreeSet<String>) -> Vec<(String, Vec<Value>)> {
    phases(out)
        .into_iter()
        .map(|(phase, steps)| {
            let kept = steps
                .into_iter()
                .filter(|s| !labels.iter().any(|l| is_broken_step(s, l)))
                .collect();
            (phase, kept)
        })
        .collect()
}

/// The whole check: broken files give one failing step each and exit
/// status 3; everything else equals the same depot with them deleted.
fn isolates_broken_files(depot: &Depot) {
    for (file, text) in AROUND {
        depot.write(file, text);
    }
    for (file, text, _) in BROKEN_FILES {
        depot.write(file, text);
    }
    let (with_broken, res) = run(depot, "with-broken", &[]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(3), "{stderr}");

    for (file, _, _) in BROKEN_FILES {
        std::fs::remove_file(depot.path(file)).unwrap();
    }
    let (deleted, res) = run(depot, "deleted", &[]);
    assert_eq!(
        res.status.code(),
        Some(3),
        "the target-level errors remain: {}",
        String::from_utf8_lossy(&res.stderr)
    );

    // The derivation map: exactly the healthy targets.
    assert_eq!(
        std::fs::read_to_string(with_broken.join("drvmap.json")).unwrap(),
        std::fs::read_to_string(deleted.join("drvmap.json")).unwrap()
    );
    let map = read_json(&with_broken.join("drvmap.json"));
    for label in [
        "apps/broken-dir/sub",
        "tools/broken/zz-after",
        "tools/hello",
    ] {
        assert!(map.get(label).is_some(), "{label} missing from {map}");
    }

    // One broken entry per broken file, with Nix's message on one line,
    // besides the target-level ones.
    let nodes: BTreeSet<String> = BROKEN_FILES.iter().map(|b| label_of(b.0)).collect();
    let found = broken(&with_broken);
    let expected: BTreeSet<String> = nodes
        .iter()
        .cloned()
        .chain(TARGET_ERRORS.iter().map(|l| l.to_string()))
        .collect();
    assert_eq!(
        found.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{found:#?}"
    );
    assert_eq!(
        broken(&deleted)
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        TARGET_ERRORS
    );
    for (file, _, message) in BROKEN_FILES {
        let error = &found[&label_of(file)];
        assert!(error.contains(message), "{file}: {error}");
        assert!(
            !error.contains('\n') && !error.contains("trace:"),
            "{error}"
        );
        assert!(!error.contains("drvkite-nix-"), "internal path in {error}");
    }
    let summary = read_json(&with_broken.join("summary.json"));
    assert_eq!(
        summary["targets"],
        read_json(&deleted.join("summary.json"))["targets"]
    );

    // Steps: one failing step per broken file, and the rest identical to
    // the depot without those files.
    assert_eq!(steps_without(&with_broken, &nodes), phases(&deleted));
    let all: Vec<Value> = phases(&with_broken)
        .into_iter()
        .flat_map(|(_, s)| s)
        .collect();
    for label in &nodes {
        let steps: Vec<&Value> = all.iter().filter(|s| is_broken_step(s, label)).collect();
        assert_eq!(steps.len(), 1, "{label}: {steps:?}");
        let run = common::run_step(&depot.root, steps[0]["command"].as_str().unwrap(), &[]);
        assert_eq!(run.status.code(), Some(1));
        let printed = String::from_utf8_lossy(&run.stderr);
        assert!(printed.contains(&found[label]), "{printed}");
    }
    // Counted in the summary and the annotation like broken targets.
    let annotation = common::ok(
        drvkite()
            .args(["annotate", "--dry-run", "--dir"])
            .arg(&with_broken),
    );
    assert!(
        annotation.contains(&format!(
            "{} failed to evaluate",
            nodes.len() + TARGET_ERRORS.len()
        )),
        "{annotation}"
    );
    assert!(annotation.contains("tools/broken/syntax"), "{annotation}");
    for label in &nodes {
        assert!(
            stderr.contains(&format!("drvkite: warning: {label} failed to evaluate")),
            "{stderr}"
        );
    }
}

#[test]
fn broken_files_are_isolated_in_a_depot_without_ci_targets() {
    isolates_broken_files(&Depot::new());
}

#[test]
fn broken_files_are_isolated_in_a_tvl_style_depot_with_ci_targets() {
    if std::env::var("KEEP").is_ok() {
        let d = Depot::new();
        make_tvl_style(&d);
        for (f, t) in AROUND {
            d.write(f, t);
        }
        for (f, t, _) in BROKEN_FILES {
            d.write(f, t);
        }
        let p = d.tmp.keep();
        eprintln!("KEPT {}", p.display());
        return;
    }
    let depot = Depot::new();
    make_tvl_style(&depot);
    isolates_broken_files(&depot);
}

/// Run drvkite pipeline, which must fail with one line; returns it.
fn one_line_error(depot: &Depot, args: &[&str]) -> String {
    let out = depot.out("failed");
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .unwrap();
    assert!(
        !out.exists(),
        "wrote {out:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(res.status.code(), Some(1));
    common::one_line_failure(&res)
}

#[test]
fn fail_on_eval_error_fails_at_a_broken_file() {
    let depot = Depot::new();
    depot.write("tools/broken/throws.nix", BROKEN_FILES[0].1);
    let err = one_line_error(&depot, &["--fail-on-eval-error"]);
    assert!(
        err.starts_with("drvkite: evaluating depot ") && err.contains("thrown at the top"),
        "{err}"
    );
}

#[test]
fn errors_outside_every_node_fail_the_run_naming_the_error() {
    let depot = Depot::new();
    make_tvl_style(&depot);
    let root = std::fs::read_to_string(depot.path("default.nix")).unwrap();
    // A broken file too: it must not hide or replace the real error.
    depot.write("tools/broken/throws.nix", BROKEN_FILES[0].1);
    for (what, from, to, message) in [
        (
            "settings",
            "ci.excluded = [ ];",
            "ci.excluded = [ ]; ci.drvkite = throw \"settings are broken\";",
            "settings are broken",
        ),
        (
            "list",
            "ci.targets = readTree.gather",
            "ci.targets = throw \"the list is broken\"; ci.unused = readTree.gather",
            "the list is broken",
        ),
        (
            "readTree args",
            "depot = self;",
            "depot = throw \"args are broken\";",
            "args are broken",
        ),
        (
            "readTree filter",
            "path = ./.;",
            "path = ./.; filter = parts: args: throw \"every file is filtered away\";",
            "every file is filtered away",
        ),
        (
            "root",
            "readTree.fix (",
            "assert builtins.pathExists ./nowhere; readTree.fix (",
            "assertion",
        ),
    ] {
        depot.write("default.nix", &root.replace(from, to));
        let err = one_line_error(&depot, &[]);
        assert!(
            err.starts_with("drvkite: evaluating depot ") && err.contains(message),
            "{what}: {err}"
        );
        assert!(!err.contains("no CI targets"), "{what}: {err}");
    }
}

#[test]
fn a_depot_whose_only_target_is_broken_gets_its_failing_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("depot");
    std::fs::create_dir_all(&root).unwrap();
    // Its readTree lives outside the depot (as when a depot imports it from
    // a pinned drvkite): hiding the broken file must reach it all the same.
    let read_tree = Path::new(common::REPO).join("nix/readTree");
    std::fs::write(
        root.join("default.nix"),
        format!(
            "{{ ... }}: let readTree = import (/. + {}) {{ }}; in readTree.fix (self: readTree {{ path = ./.; args = {{ depot = self; }}; }})\n",
            common::nix_string(read_tree.to_str().unwrap())
        ),
    )
    .unwrap();
    // Top-level files beside the root's default.nix are not read (as in
    // TVL): the only one sits in a folder.
    std::fs::create_dir_all(root.join("tools")).unwrap();
    std::fs::write(root.join("tools/only.nix"), "{ depot, ... }: depot.nope\n").unwrap();
    let out = tmp.path().join("pipeline");
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(3), "{stderr}");
    assert_eq!(broken(&out).keys().collect::<Vec<_>>(), ["tools/only"]);
    assert_eq!(read_json(&out.join("drvmap.json")), serde_json::json!({}));
}

/// A `nix-instantiate` that logs each run, in front of the real one.
fn counting_nix(dir: &Path) -> (PathBuf, PathBuf) {
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v nix-instantiate"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bin = dir.join("bin");
    let log = dir.join("runs.log");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("nix-instantiate");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, log)
}

#[test]
fn broken_files_cost_runs_by_their_number_not_the_depots_size() {
    let depot = Depot::new();
    make_tvl_style(&depot);
    for i in 0..60 {
        depot.write(
            &format!("gen/g{i:02}.nix"),
            &format!("{{ depot, ... }}: depot.nix.build.mkTarget {{ name = \"g{i}\"; }}\n"),
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bin, log) = counting_nix(tmp.path());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let runs = |name: &str| {
        let _ = std::fs::remove_file(&log);
        let (out, res) = run_with(&depot, name, &[], |c| {
            c.env("PATH", &path);
        });
        let count = std::fs::read_to_string(&log).unwrap().lines().count();
        (out, res, count)
    };
    let (_, res, healthy) = runs("healthy");
    assert_eq!((res.status.code(), healthy), (Some(0), 1));
    // Two broken files among 60 healthy ones (and the pipeline that reads
    // the list): one failed run, a walk of three runs, two to confirm,
    // and the evaluation itself.
    depot.write("gen/g17.nix", BROKEN_FILES[4].1);
    depot.write("gen/g42.nix", BROKEN_FILES[6].1);
    let (out, res, broken_runs) = runs("broken");
    assert_eq!(res.status.code(), Some(3));
    assert_eq!(
        broken(&out).keys().map(String::as_str).collect::<Vec<_>>(),
        ["gen/g17", "gen/g42"]
    );
    assert!(broken_runs <= 1 + 3 + 3 + 1, "{broken_runs} runs");
}

#[test]
fn the_same_error_in_files_apart_is_each_files_own() {
    // A throw has no location: four files throwing the same text read as
    // one error, unless healthy files lie between them (a filter that
    // throws for every file leaves none).
    let depot = Depot::new();
    let files = [
        "apps/todo.nix",
        "lib/todo.nix",
        "ops/todo.nix",
        "tools/todo.nix",
    ];
    for file in files {
        depot.write(file, "{ ... }: throw \"TODO\"\n");
    }
    let (out, res) = run(&depot, "todo", &[]);
    assert_eq!(
        res.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let found = broken(&out);
    assert_eq!(
        found.keys().cloned().collect::<BTreeSet<_>>(),
        files.iter().map(|f| label_of(f)).collect::<BTreeSet<_>>()
    );
    assert!(found.values().all(|e| e == "TODO"), "{found:?}");
}
