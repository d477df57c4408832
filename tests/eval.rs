//! The evaluation engine with real Nix: worker processes, the memory
//! bound, narrowing errors down to single targets, progress and GC roots.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Depot, broken, drvkite, fails, ok, read_json};
use serde_json::Value;

/// Four targets that break in the four ways the issue names: `throw` and
/// `assert` (which tryEval catches), a missing attribute and an infinite
/// recursion (which it cannot).
const BROKEN: &[(&str, &str, &str)] = &[
    (
        "tools/broken/throws",
        r#"{ depot, ... }: depot.nix.build.mkTarget { name = "throws"; text = throw "thrown on purpose"; }"#,
        "thrown on purpose",
    ),
    (
        "tools/broken/asserts",
        r#"{ depot, ... }: depot.nix.build.mkTarget { name = "asserts"; text = assert 1 == 2; "never"; }"#,
        "assertion '(1 == 2)' failed",
    ),
    (
        "tools/broken/missing",
        r#"{ depot, ... }: depot.nix.build.mkTarget { name = "missing"; text = depot.lib.nope; }"#,
        "attribute 'nope' missing",
    ),
    (
        "tools/broken/recursion",
        r#"{ depot, ... }: depot.nix.build.mkTarget { name = "recursion"; text = let x = x + "."; in x; }"#,
        "infinite recursion encountered",
    ),
];

fn add_broken(depot: &Depot) {
    for (label, text, _) in BROKEN {
        depot.write(&format!("{label}.nix"), &format!("{text}\n"));
    }
}

/// More healthy targets, each depending on the one before, so shards cut
/// through dependency chains.
fn add_chain(depot: &Depot, n: usize) {
    for i in 0..n {
        let deps = if i == 0 {
            "depot.lib.greeting".to_owned()
        } else {
            format!("depot.gen.t{}", i - 1)
        };
        depot.write(
            &format!("gen/t{i}.nix"),
            &format!(
                "{{ depot, ... }}: depot.nix.build.mkTarget {{ name = \"gen-{i}\"; deps = [ {deps} ]; }}\n"
            ),
        );
    }
}

fn run(depot: &Depot, out: &str, args: &[&str]) -> (PathBuf, Output) {
    let out = depot.out(out);
    let mut cmd = drvkite();
    cmd.arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(args);
    let res = cmd.output().expect("spawn drvkite");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        out.join("summary.json").is_file(),
        "{cmd:?} failed: {stderr}"
    );
    // Status 3: written, with broken targets (and only then).
    let broken = read_json(&out.join("summary.json"))["broken"]
        .as_array()
        .is_some_and(|b| !b.is_empty());
    let expected = if broken { 3 } else { 0 };
    assert_eq!(res.status.code(), Some(expected), "{cmd:?}: {stderr}");
    (out, res)
}

/// Every file of a pipeline folder. summary.json holds the evaluation's
/// duration, which differs between any two runs: it is compared without.
fn folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(e.path()).unwrap();
            if name == "summary.json" {
                let mut v: Value = serde_json::from_slice(&bytes).unwrap();
                v.as_object_mut()
                    .unwrap()
                    .remove("evaluationSeconds")
                    .expect("summary has evaluationSeconds");
                bytes = serde_json::to_vec(&v).unwrap();
            }
            (name, bytes)
        })
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_and_three_workers_write_identical_folders() {
    let depot = Depot::new();
    add_chain(&depot, 20);
    add_broken(&depot);
    let (one, _) = run(&depot, "one", &["--workers", "1"]);
    let (three, _) = run(&depot, "three", &["--workers", "3"]);
    let a = folder(&one);
    let b = folder(&three);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different files"
    );
    assert!(a.keys().any(|n| n.starts_with("build-chunk-")), "{a:?}");
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs between 1 and 3 workers");
    }
    // Not identical by being empty: the targets and the broken ones are there.
    let map = read_json(&one.join("drvmap.json"));
    assert!(map.get("gen/t19").is_some() && map.get("tools/hello").is_some());
    assert_eq!(broken(&one).len(), BROKEN.len());
}

#[test]
fn broken_targets_are_found_and_the_rest_evaluates() {
    let depot = Depot::new();
    add_chain(&depot, 6);
    let (clean, _) = run(&depot, "clean", &[]);
    add_broken(&depot);
    for workers in ["1", "2"] {
        let (out, res) = run(
            &depot,
            &format!("broken-{workers}"),
            &["--workers", workers],
        );
        // Every healthy target, with the same derivation as without the
        // broken ones, and none of the broken ones.
        assert_eq!(
            std::fs::read(out.join("drvmap.json")).unwrap(),
            std::fs::read(clean.join("drvmap.json")).unwrap(),
            "workers {workers}"
        );
        let found = broken(&out);
        assert_eq!(
            found.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            BROKEN.iter().map(|b| b.0).collect::<BTreeSet<_>>(),
            "workers {workers}: {found:?}"
        );
        for (label, _, message) in BROKEN {
            let error = &found[*label];
            assert!(error.contains(message), "{label}: {error}");
            assert!(
                !error.contains('\n') && !error.contains("trace:"),
                "{error}"
            );
            assert!(!error.contains("--show-trace"), "{error}");
        }
        // Errors Nix locates point at the user's file, not drvkite's.
        assert!(found["tools/broken/missing"].contains("tools/broken/missing.nix:1:"));
        assert!(stderr(&res).contains("tools/broken/recursion failed to evaluate"));
    }
}

#[test]
fn shard_killed_for_memory_is_split_and_retried() {
    let depot = Depot::new();
    add_chain(&depot, 4);
    let (clean, _) = run(&depot, "clean", &[]);
    // Forcing this target's drvPath builds a list of three million strings:
    // some 500 MB, where the others need a few dozen.
    depot.write(
        "tools/heavy.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"heavy\"; text = toString (builtins.length (builtins.filter (s: s != \"\") (builtins.genList (i: \"x${toString i}\") 3000000))); }\n",
    );
    // One worker: the heavy target shares its shard with every other one.
    let (out, _) = run(
        &depot,
        "bounded",
        &["--workers", "1", "--max-memory", "150M"],
    );
    assert_eq!(
        std::fs::read(out.join("drvmap.json")).unwrap(),
        std::fs::read(clean.join("drvmap.json")).unwrap(),
        "a target was lost with the shard that ran out of memory"
    );
    let found = broken(&out);
    assert_eq!(found.len(), 1, "{found:?}");
    let error = &found["tools/heavy"];
    assert!(error.contains("--max-memory 150M"), "{error}");
}

#[test]
fn fail_on_eval_error_fails_with_one_line_naming_the_target() {
    let depot = Depot::new();
    depot.write("tools/broken/missing.nix", &format!("{}\n", BROKEN[2].1));
    let out = depot.out("pipeline");
    let res = fails(
        drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out)
            .arg("--fail-on-eval-error")
            .arg("--workers")
            .arg("2"),
    );
    let err = stderr(&res);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("drvkite: target tools/broken/missing of depot ")
            && err.contains("attribute 'nope' missing"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn an_error_outside_every_node_is_one_whole_run_error() {
    let depot = Depot::new();
    // The root default.nix is no readTree node: nothing can be listed
    // without it. (A broken file inside the tree is isolated instead:
    // tests/isolation.rs.)
    let root = std::fs::read_to_string(depot.path("default.nix")).unwrap();
    depot.write(
        "default.nix",
        &root.replace("readTree.fix (", "readTree.fix ( {"),
    );
    let out = depot.out("pipeline");
    let res = fails(
        drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out)
            .arg("--workers")
            .arg("2"),
    );
    let err = stderr(&res);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("drvkite: evaluating depot "), "{err}");
    assert!(
        err.contains("syntax error") && err.contains("/default.nix:"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn progress_is_shown_when_asked_and_stage_times_always() {
    let depot = Depot::new();
    add_broken(&depot);
    let (_, quiet) = run(&depot, "quiet", &[]);
    // Not a terminal here: no progress unless asked.
    assert!(
        !stderr(&quiet).contains("evaluating:"),
        "{}",
        stderr(&quiet)
    );
    let (out, loud) = run(&depot, "loud", &["--progress", "--workers", "2"]);
    let err = stderr(&loud);
    let targets = read_json(&out.join("summary.json"))["targets"]
        .as_u64()
        .unwrap();
    // The last line counts every healthy target; the traces it is made of
    // never reach the output.
    let last = err
        .lines()
        .rfind(|l| l.starts_with("drvkite: evaluating: "))
        .unwrap_or_else(|| panic!("no progress line: {err}"));
    let total = targets as usize + BROKEN.len();
    assert!(
        last.starts_with(&format!("drvkite: evaluating: {total}/{total} targets")),
        "{last}"
    );
    assert!(!err.contains("trace:"), "{err}");
    for e in [&err, &stderr(&quiet)] {
        assert!(
            e.lines()
                .any(|l| l.starts_with("drvkite: stage times: evaluation ")
                    && l.contains("graph analysis")
                    && l.contains("rendering")
                    && l.contains("writing")),
            "{e}"
        );
    }
}

/// Store paths of .drv files mentioned anywhere in a pipeline folder.
fn drvs_in(out: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for e in std::fs::read_dir(out).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for (i, _) in text.match_indices("/nix/store/") {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/-._+?=".contains(c)))
                .unwrap_or(rest.len());
            if rest[..end].ends_with(".drv") {
                found.insert(rest[..end].to_owned());
            }
        }
    }
    found
}

/// What a garbage collection would delete now (it deletes nothing: the
/// store is shared with other tests, so no real collection runs here).
fn dead_paths() -> BTreeSet<String> {
    ok(Command::new("nix-store").args(["--gc", "--print-dead"]))
        .lines()
        .map(str::to_owned)
        .collect()
}

fn references(path: &Path) -> BTreeSet<String> {
    ok(Command::new("nix-store")
        .arg("--query")
        .arg("--references")
        .arg(path))
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn gc_roots_keep_every_drv_through_a_garbage_collection() {
    let rooted = Depot::new();
    let unrooted = Depot::new();
    let roots = rooted.out("roots");
    let (out, _) = run(
        &rooted,
        "pipeline",
        &["--gc-roots-dir", roots.to_str().unwrap()],
    );
    let (plain_out, _) = run(&unrooted, "pipeline", &[]);

    let link = roots.join("drvkite-drvs");
    let first_root = std::fs::read_link(&link).expect("a root link");
    let drvs = drvs_in(&out);
    // Targets and extra-step commands alike.
    let map = read_json(&out.join("drvmap.json"));
    assert!(drvs.len() > map.as_object().unwrap().len(), "{drvs:?}");
    assert!(references(&link).is_superset(&drvs));

    let dead = dead_paths();
    let plain = drvs_in(&plain_out);
    assert!(
        !plain.is_empty() && plain.is_subset(&dead),
        "unrooted drvs are collectable"
    );
    assert!(drvs.is_disjoint(&dead), "rooted drvs would be collected");
    assert!(!dead.contains(first_root.to_str().unwrap()));
    // And a real deletion is refused.
    let victim = drvs.iter().next().unwrap();
    fails(Command::new("nix-store").arg("--delete").arg(victim));
    assert!(Path::new(victim).exists());

    // The next run replaces the root: one link, and the old roots become
    // collectable (deleting them now succeeds), so they do not pile up.
    rooted.write("nix/salt", "another salt");
    run(
        &rooted,
        "pipeline",
        &["--gc-roots-dir", roots.to_str().unwrap()],
    );
    let second_root = std::fs::read_link(&link).unwrap();
    assert_ne!(first_root, second_root);
    assert_eq!(std::fs::read_dir(&roots).unwrap().count(), 1);
    ok(Command::new("nix-store").arg("--delete").arg(&first_root));
    assert!(!first_root.exists());
}
