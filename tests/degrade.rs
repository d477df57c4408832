//! Targets that fail to evaluate: each becomes one failing step, every
//! other target is built as usual, and the exit status says so.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::schema::read_pipeline;
use common::*;
use serde_json::{Value, json};

/// What the throwing target's error says: quotes, `$(…)`, backticks and a
/// `$NAME` must reach the log as text.
const THROWN: &str = r#"no good: it's "bad" $(touch PWNED) `touch PWNED2` $HOME \ é"#;

/// Four broken targets (a throw with extra steps, a failed assertion, a
/// missing attribute, infinite recursion: the last two are beyond
/// `tryEval`) next to the example depot's healthy ones, committed.
fn broken_depot() -> Depot {
    let depot = Depot::with_git();
    depot.write(
        "tools/throws.nix",
        &format!(
            r#"{{ depot, ... }}:
depot.nix.build.mkTarget {{
  name = "throws";
  text = throw {};
  meta.ci.extraSteps.lint = {{ command = depot.nix.build.writeScript "lint" "true"; }};
}}
"#,
            nix_string(THROWN)
        ),
    );
    depot.write(
        "tools/asserts.nix",
        "{ depot, ... }:\ndepot.nix.build.mkTarget { name = \"asserts\"; text = assert 1 == 2; \"never\"; }\n",
    );
    depot.write(
        "tools/missing.nix",
        "{ depot, ... }:\ndepot.nix.build.mkTarget { name = \"missing\"; text = depot.lib.nope; }\n",
    );
    depot.write(
        "tools/recursion.nix",
        "{ depot, ... }:\nlet x = { y = x.y; }; in depot.nix.build.mkTarget { name = \"recursion\"; text = x.y; }\n",
    );
    depot.commit("broken");
    depot
}

fn run_pipeline(depot: &Depot, out: &Path, args: &[&str]) -> Output {
    drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn all_steps(out: &Path) -> Vec<Value> {
    phases(out).into_iter().flat_map(|(_, s)| s).collect()
}

fn failing_step<'a>(steps: &'a [Value], label: &str) -> &'a Value {
    let want = format!(":x: {label} failed to evaluate");
    let found: Vec<&Value> = steps
        .iter()
        .filter(|s| s["label"].as_str() == Some(want.as_str()))
        .collect();
    assert_eq!(found.len(), 1, "{want}: {steps:#?}");
    found[0]
}

/// The labels of a pristine copy of the example depot.
fn healthy_labels() -> BTreeSet<String> {
    let depot = Depot::new();
    let map = depot.out("m.json");
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&map));
    labels_of(&read_json(&map))
}

fn labels_of(map: &Value) -> BTreeSet<String> {
    map.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn broken_targets_fail_their_own_step_and_everything_else_builds() {
    let depot = broken_depot();
    let out = depot.out("pipeline");
    let res = run_pipeline(&depot, &out, &[]);
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(3), "{err}");
    assert!(
        err.contains("4 of ")
            && err.contains("targets failed to evaluate")
            && err.contains("status 3"),
        "{err}"
    );
    assert!(err.contains(", 4 broken;"), "{err}");
    // Schema, unique keys, existing dependencies.
    read_pipeline(&out);

    // Healthy targets: the same build steps as without the broken ones,
    // and only they are in the map.
    let map = read_json(&out.join("drvmap.json"));
    let healthy = healthy_labels();
    assert_eq!(labels_of(&map), healthy);
    let (first, build) = phases(&out).remove(0);
    assert_eq!(first, "build");
    for label in &healthy {
        build_step(&build, label);
    }

    // One failing step each, first in the build phase.
    let throws = failing_step(&build, "tools/throws");
    let asserts = failing_step(&build, "tools/asserts");
    let missing = failing_step(&build, "tools/missing");
    let recursion = failing_step(&build, "tools/recursion");
    let failing = [throws, asserts, missing, recursion];
    assert!(failing.iter().all(|s| build[..4].contains(s)));
    let keys: BTreeSet<&str> = failing.iter().map(|s| s["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 4);
    for k in &keys {
        assert!(k.starts_with("eval-error-") && k.len() == 51, "{k}");
    }
    assert_eq!(throws["depends_on"], json!([":init:"]));
    // Its extra steps are not generated.
    let all = all_steps(&out);
    assert!(
        !all.iter().any(|s| s["label"]
            .as_str()
            .unwrap_or("")
            .contains("from tools/throws")),
        "{all:#?}"
    );

    // The step prints the error verbatim and fails; nothing in it runs.
    let res = run_step(&depot.root, throws["command"].as_str().unwrap(), &[]);
    assert_eq!(res.status.code(), Some(1));
    let log = stderr(&res);
    assert!(
        log.starts_with("tools/throws failed to evaluate:\n"),
        "{log}"
    );
    assert!(log.contains(THROWN), "{log}");
    assert!(log.contains("extra steps"), "{log}");
    let res = run_step(&depot.root, asserts["command"].as_str().unwrap(), &[]);
    assert_eq!(res.status.code(), Some(1));
    assert!(stderr(&res).contains("assertion"), "{}", stderr(&res));
    for (step, says) in [
        (missing, "attribute 'nope' missing"),
        (recursion, "infinite recursion"),
    ] {
        let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
        assert_eq!(res.status.code(), Some(1));
        assert!(stderr(&res).contains(says), "{}", stderr(&res));
    }
    assert!(!depot.path("PWNED").exists() && !depot.path("PWNED2").exists());
    assert_eq!(depot.git(&["status", "--porcelain"]), "");

    // The summary counts and lists them.
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["targets"], json!(healthy.len()));
    let broken: Vec<&str> = summary["broken"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        broken,
        [
            "tools/asserts",
            "tools/missing",
            "tools/recursion",
            "tools/throws"
        ]
    );
    assert!(
        summary["broken"][3]["error"]
            .as_str()
            .unwrap()
            .contains(THROWN)
    );

    // And so does the annotation.
    let md = ok(drvkite().args(["annotate", "--dry-run", "--dir"]).arg(&out));
    assert!(md.contains("--style error"), "{md}");
    assert!(
        md.contains("targets to build, 4 failed to evaluate"),
        "{md}"
    );
    assert!(md.contains("**Broken targets (4)**"), "{md}");
    assert!(md.contains("| tools/throws | no good&#58;"), "{md}");

    // The next build, with this map as parent: healthy targets are skipped,
    // broken ones still fail, and none counts as removed.
    let parent = depot.out("parent.json");
    std::fs::copy(out.join("drvmap.json"), &parent).unwrap();
    let out2 = depot.out("pipeline2");
    let res = run_pipeline(&depot, &out2, &["--parent-map", parent.to_str().unwrap()]);
    assert_eq!(res.status.code(), Some(3), "{}", stderr(&res));
    let build = phases(&out2).remove(0).1;
    for label in &healthy {
        assert_eq!(
            build_step(&build, label)["skip"],
            json!("Target has not changed.")
        );
    }
    assert_eq!(failing_step(&build, "tools/throws")["key"], throws["key"]);
    assert!(failing_step(&build, "tools/asserts").get("skip").is_none());
    let summary = read_json(&out2.join("summary.json"));
    assert_eq!(summary["removed"], json!([]));
    assert_eq!(summary["changed"], json!([]));
}

#[test]
fn without_the_build_phase_broken_targets_fail_the_first_phase() {
    let depot = broken_depot();
    let out = depot.out("pipeline");
    let res = run_pipeline(&depot, &out, &["--active-phases", "release"]);
    assert_eq!(res.status.code(), Some(3), "{}", stderr(&res));
    let phases = phases(&out);
    assert_eq!(phases.len(), 1);
    assert_eq!(phases[0].0, "release");
    failing_step(&phases[0].1, "tools/throws");
}

#[test]
fn fail_on_eval_error_is_all_or_nothing() {
    let depot = broken_depot();
    let out = depot.out("pipeline");
    let res = run_pipeline(&depot, &out, &["--fail-on-eval-error"]);
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("drvkite: target tools/"), "{err}");
    assert!(err.contains("failed to evaluate"), "{err}");
    assert!(!out.exists());
    // An earlier pipeline stays as it was.
    let healthy = Depot::new();
    let earlier = pipeline(&healthy, &[]);
    let before = files_of(&earlier);
    let res = run_pipeline(&depot, &earlier, &["--fail-on-eval-error"]);
    assert_eq!(res.status.code(), Some(1));
    assert_eq!(files_of(&earlier), before);
    // The environment variable does the same.
    let res = drvkite()
        .env("DRVKITE_FAIL_ON_EVAL_ERROR", "true")
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1), "{}", stderr(&res));
    assert!(!out.exists());
}

/// The example pipeline's generating step, run by bash with a stand-in
/// for drvkite that exits with `status` from `drvkite pipeline`.
fn run_generate_step(status: i32) -> (Option<i32>, Vec<String>) {
    let yaml = std::fs::read_to_string(Path::new(REPO).join("src/init/drvkite.yml")).unwrap();
    let pipeline: Value = serde_norway::from_str(&yaml).unwrap();
    let pipeline = upload::uploaded_value(&pipeline).unwrap();
    let step = &pipeline["steps"][0];
    assert_eq!(step["soft_fail"], json!([{ "exit_status": 3 }]));
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("calls");
    let fake = tmp.path().join("drvkite");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$1\" >> '{}'\nif [ \"$1\" = pipeline ]; then exit {status}; fi\n",
            log.display()
        ),
    )
    .unwrap();
    ok(Command::new("chmod").arg("+x").arg(&fake));
    let res = run_step(
        tmp.path(),
        step["command"].as_str().unwrap(),
        &[
            ("DRVKITE", fake.to_str().unwrap()),
            ("BUILDKITE_PIPELINE_DEFAULT_BRANCH", "main"),
        ],
    );
    let calls = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    (res.status.code(), calls)
}

#[test]
fn the_example_pipeline_uploads_and_soft_fails_on_status_3_only() {
    let all = ["parent-map", "pipeline", "annotate", "upload"];
    assert_eq!(
        run_generate_step(0),
        (Some(0), all.map(String::from).to_vec())
    );
    assert_eq!(
        run_generate_step(3),
        (Some(3), all.map(String::from).to_vec())
    );
    assert_eq!(
        run_generate_step(1),
        (
            Some(1),
            vec!["parent-map".to_owned(), "pipeline".to_owned()]
        )
    );
}
