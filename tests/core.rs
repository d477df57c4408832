//! The core data path with real Nix: evaluation, derivation map, diff,
//! explain, and the errors users see on bad input.

mod common;

use std::path::Path;

use common::*;

fn drvmap(depot: &Depot, name: &str) -> std::path::PathBuf {
    let out = depot.out(name);
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out));
    out
}

const EXPECTED_LABELS: &[&str] = &[
    "apps/cli",
    "apps/web",
    "docs",
    "lib/greeting",
    "lib/strings",
    "ops/changelog",
    "tools/fmt",
    "tools/hello",
    "tools/hello/docs",
    "tools/lint",
    "tools/multi:client",
    "tools/multi:server",
];

#[test]
fn drvmap_matches_nix_instantiate_and_builds_nothing() {
    let depot = Depot::new();
    let map = read_json(&drvmap(&depot, "drvmap.json"));
    let map = map.as_object().unwrap();
    let labels: Vec<&str> = map.keys().map(String::as_str).collect();
    assert_eq!(labels, EXPECTED_LABELS);
    for (label, entry) in map {
        let attr_path: Vec<String> = serde_json::from_value(entry["attrPath"].clone()).unwrap();
        let drv = entry["drvPath"].as_str().unwrap();
        assert_eq!(
            instantiate_attr(&depot.root, &attr_path),
            drv,
            "drvPath of {label}"
        );
        assert!(
            Path::new(drv).is_file(),
            "{drv} of {label} is not in the store"
        );
        for out in output_paths(drv) {
            assert!(!Path::new(&out).exists(), "{out} of {label} was built");
        }
    }
}

#[test]
fn extra_step_scripts_are_instantiated_not_built() {
    let depot = Depot::new();
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(depot.out("m.json")));
    let script = instantiate_attr(
        &depot.root,
        &[
            "tools",
            "lint",
            "meta",
            "ci",
            "extraSteps",
            "check",
            "command",
        ]
        .map(String::from),
    );
    assert!(Path::new(&script).is_file());
    for out in output_paths(&script) {
        assert!(
            !Path::new(&out).exists(),
            "extra step script {out} was built"
        );
    }
}

/// drvkite's map has the same bytes as TVL's mkDrvmap: builtins.toJSON of
/// label → {drvPath, attrPath} over the same targets.
#[test]
fn drvmap_bytes_equal_nix_to_json() {
    let depot = Depot::new();
    let ours = std::fs::read_to_string(drvmap(&depot, "drvmap.json")).unwrap();
    let expr = r#"
      let
        depot = import ./. {};
        rt = depot.nix.readTree;
        eligible = t: (t.type or null) == "derivation" && !(t.meta.ci.skip or (t.meta.broken or false));
        attrPath = t: t.__readTree ++ (if t ? __subtarget then [ t.__subtarget ] else []);
      in builtins.toJSON (builtins.listToAttrs (map (t: {
        name = rt.mkLabel t;
        value = { drvPath = builtins.unsafeDiscardStringContext t.drvPath; attrPath = attrPath t; };
      }) (rt.gather eligible depot)))
    "#;
    let theirs = nix_eval_json(expr, &depot.root);
    assert_eq!(ours, theirs.as_str().unwrap());
    assert!(!ours.ends_with('\n'));
}

#[test]
fn changing_one_file_changes_that_target_and_its_dependents() {
    let depot = Depot::new();
    let before = drvmap(&depot, "before.json");
    depot.write(
        "lib/greeting.nix",
        "{ depot, ... }:\ndepot.nix.build.mkTarget { name = \"greeting\"; text = \"hello, world\"; }\n",
    );
    let after = drvmap(&depot, "after.json");
    let out = ok(drvkite().arg("diff").arg(&before).arg(&after).arg("--json"));
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    let changed: Vec<&str> = d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        changed,
        [
            "apps/web",
            "lib/greeting",
            "lib/strings",
            "ops/changelog",
            "tools/hello",
            "tools/hello/docs",
            "tools/lint",
            "tools/multi:server"
        ]
    );
    assert_eq!(d["added"], serde_json::json!([]));
    assert_eq!(d["removed"], serde_json::json!([]));
    assert_eq!(d["unchanged"], 4);

    let text = ok(drvkite().arg("diff").arg(&before).arg(&after));
    assert!(text.contains("~ lib/greeting"), "{text}");
    assert!(
        text.contains("0 added, 0 removed, 8 changed, 4 unchanged"),
        "{text}"
    );

    // explain follows tools/hello down to the edited greeting.
    let why = ok(drvkite()
        .arg("explain")
        .arg("tools/hello")
        .arg("--parent-map")
        .arg(&before)
        .arg("--depot")
        .arg(&depot.root));
    assert!(why.contains("tools/hello changed"), "{why}");
    assert!(
        why.contains("input derivation hello-generated-sources changed"),
        "{why}"
    );
    assert!(why.contains("input derivation strings changed"), "{why}");
    assert!(why.contains("input derivation greeting changed"), "{why}");
    assert!(
        why.contains("hello, world"),
        "explain does not show the edited text: {why}"
    );

    let same = ok(drvkite()
        .arg("explain")
        .arg("apps/cli")
        .arg("--parent-map")
        .arg(&before)
        .arg("--depot")
        .arg(&depot.root));
    assert!(same.contains("apps/cli has not changed"), "{same}");
}

#[test]
fn diff_reports_added_and_removed() {
    let depot = Depot::new();
    let before = drvmap(&depot, "before.json");
    std::fs::remove_file(depot.path("apps/cli.nix")).unwrap();
    depot.write(
        "apps/extra.nix",
        "{ depot, ... }:\ndepot.nix.build.mkTarget { name = \"extra\"; }\n",
    );
    let after = drvmap(&depot, "after.json");
    let text = ok(drvkite().arg("diff").arg(&before).arg(&after));
    assert!(text.contains("+ apps/extra\n"), "{text}");
    assert!(text.contains("- apps/cli\n"), "{text}");
    assert!(
        text.contains("1 added, 1 removed, 0 changed, 11 unchanged"),
        "{text}"
    );
}

fn one_line_error(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    stderr
}

#[test]
fn missing_nix_is_one_line_with_install_hint() {
    let depot = Depot::new();
    let out = depot.out("m.json");
    let res = fails(
        drvkite()
            .env("PATH", "/nonexistent")
            .arg("drvmap")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out),
    );
    let err = one_line_error(&res);
    assert!(
        err.contains("nix-instantiate not found") && err.contains("apt-get install nix-bin"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn depot_without_default_nix_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.json");
    let res = fails(
        drvkite()
            .arg("drvmap")
            .arg("--depot")
            .arg(tmp.path())
            .arg("--out")
            .arg(&out),
    );
    let err = one_line_error(&res);
    assert!(err.contains("has no default.nix"), "{err}");
    let res = fails(
        drvkite()
            .arg("drvmap")
            .arg("--depot")
            .arg(tmp.path().join("nope"))
            .arg("--out")
            .arg(&out),
    );
    assert!(one_line_error(&res).contains("does not exist"));
    assert!(!out.exists());
}

#[test]
fn evaluation_error_is_trimmed_and_leaves_no_file() {
    let depot = Depot::new();
    depot.write(
        "tools/bad.nix",
        "{ depot, ... }:\ndepot.nix.build.mkTarget { name = depot.no-such-thing; }\n",
    );
    let out = depot.out("m.json");
    let res = fails(
        drvkite()
            .arg("drvmap")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out),
    );
    let err = one_line_error(&res);
    assert!(err.contains("attribute 'no-such-thing' missing"), "{err}");
    assert!(err.contains("tools/bad.nix:2:"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(depot.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".drvkite")),
        "{leftovers:?}"
    );
}

#[test]
fn existing_map_survives_a_failed_run() {
    let depot = Depot::new();
    let out = drvmap(&depot, "m.json");
    let before = std::fs::read(&out).unwrap();
    depot.write("tools/bad.nix", "{ ... }: throw \"broken on purpose\"\n");
    fails(
        drvkite()
            .arg("drvmap")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out),
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn unreadable_parent_map_is_a_clear_error_for_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"a\":").unwrap();
    let res = fails(drvkite().arg("diff").arg(&bad).arg(&bad));
    let err = one_line_error(&res);
    assert!(err.contains("bad.json is not a derivation map"), "{err}");
}
