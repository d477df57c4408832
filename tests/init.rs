//! `drvkite init` on a real git checkout of the example depot: what it
//! writes is Buildkite-valid and makes `drvkite pipeline` and its steps
//! happy; a second run changes nothing; edited files are kept; bad input
//! is one line and writes nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::schema::{read_pipeline, read_pipeline_file, validate_pipeline};
use common::*;
use serde_json::Value;

const BOOTSTRAP: &str = ".buildkite/drvkite.yml";

fn init(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = drvkite();
    cmd.arg("init").arg("--depot").arg(dir).args(args);
    cmd
}

/// The bootstrap pipeline as drvkite ships it (and docs/buildkite.md shows).
fn shipped() -> String {
    std::fs::read_to_string(Path::new(REPO).join("src/init/drvkite.yml")).unwrap()
}

/// The example depot in a git checkout, without its `.gitignore`.
fn bare_depot() -> Depot {
    let depot = Depot::with_git();
    depot.git(&["rm", "-q", ".gitignore"]);
    depot.commit("no .gitignore");
    depot
}

/// `drvkite pipeline` on the depot into `<tmp>/<name>`.
fn run_pipeline(depot: &Depot, name: &str) -> std::process::Output {
    drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(depot.out(name))
        .output()
        .unwrap()
}

fn status(depot: &Depot) -> String {
    depot.git(&["status", "--porcelain", "--ignored=no"])
}

#[test]
fn init_adopts_a_depot_and_a_second_run_changes_nothing() {
    let depot = bare_depot();
    // Without init, the pipeline refuses to dirty the checkout.
    let before = run_pipeline(&depot, "refused");
    assert!(!before.status.success());
    assert!(
        String::from_utf8_lossy(&before.stderr).contains(".gitignore"),
        "{before:?}"
    );

    let report = ok(&mut init(&depot.root, &[]));
    assert!(report.contains(&format!("wrote {BOOTSTRAP}")), "{report}");
    assert!(
        report.contains("wrote .gitignore: /result /result-* /nix-buildkite-extra-step-command-script /nix-buildkite-extra-step-command-script-*"),
        "{report}"
    );
    assert!(report.contains("readTree: default.nix uses it"), "{report}");
    assert!(
        report.contains("commit .buildkite/drvkite.yml .gitignore"),
        "{report}"
    );
    let written = std::fs::read_to_string(depot.path(BOOTSTRAP)).unwrap();
    assert_eq!(written, shipped());
    validate_pipeline(&read_pipeline_file(&depot.path(BOOTSTRAP)));
    depot.commit("drvkite init");

    // A second run: nothing written, nothing to commit.
    let files = files_of(&depot.root);
    let again = ok(&mut init(&depot.root, &[]));
    assert!(
        again.contains(&format!("unchanged: {BOOTSTRAP}")),
        "{again}"
    );
    assert!(again.contains("nothing to change"), "{again}");
    assert!(!again.contains("commit "), "{again}");
    assert_eq!(files_of(&depot.root), files);
    assert_eq!(status(&depot), "");

    // The pipeline now has nothing to complain about, and a build step run
    // as an agent would leaves the checkout clean.
    let res = run_pipeline(&depot, "pipeline");
    let out = depot.out("pipeline");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(!stderr.contains("gitignore"), "{stderr}");
    assert!(!stderr.contains("note:"), "{stderr}");
    read_pipeline(&out);
    let steps = &phases(&out)[0].1;
    let step = build_step(steps, "tools/multi:client");
    let run = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
    assert!(run.status.success(), "{run:?}");
    assert!(depot.path("result").exists());
    assert_eq!(status(&depot), "");
}

#[test]
fn edited_files_are_kept_and_missing_lines_added() {
    let depot = bare_depot();
    let mine = shipped().replace("DRVKITE: drvkite", "DRVKITE: /opt/drvkite/bin/drvkite");
    depot.write(BOOTSTRAP, &mine);
    // The user's own lines, one of drvkite's, and no final newline.
    depot.write(".gitignore", "*.o\n/result");
    depot.commit("my CI");

    let report = ok(&mut init(&depot.root, &[]));
    assert!(
        report.contains(&format!(
            "kept {BOOTSTRAP} as it is: it differs from drvkite's from line 17 (yours: `DRVKITE: /opt/drvkite/bin/drvkite`; drvkite's: `DRVKITE: drvkite`)"
        )),
        "{report}"
    );
    assert!(
        report.contains("added to .gitignore: /result-* /nix-buildkite-extra-step-command-script /nix-buildkite-extra-step-command-script-*"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(depot.path(BOOTSTRAP)).unwrap(),
        mine
    );
    assert_eq!(
        std::fs::read_to_string(depot.path(".gitignore")).unwrap(),
        "*.o\n/result\n# Nix out-links made by drvkite's build and extra steps.\n/result-*\n/nix-buildkite-extra-step-command-script\n/nix-buildkite-extra-step-command-script-*\n"
    );
    depot.commit("init");
    let again = ok(&mut init(&depot.root, &[]));
    assert!(again.contains("nothing to change"), "{again}");
    assert_eq!(status(&depot), "");
}

#[test]
fn a_rule_that_undoes_the_lines_is_reported() {
    let depot = bare_depot();
    depot.write(".gitignore", "/result\n!/result\n");
    let res = fails(&mut init(&depot.root, &[]));
    let line = one_line_failure(&res);
    assert!(line.contains("git still does not ignore"), "{line}");
    assert!(line.contains("not ignored: result"), "{line}");
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let line = one_line_failure(&fails(&mut init(&tmp.path().join("nope"), &[])));
    assert!(line.contains("does not exist"), "{line}");
    // Not a git checkout.
    let line = one_line_failure(&fails(&mut init(tmp.path(), &[])));
    assert!(line.contains("is not in a git work tree"), "{line}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

    let depot = bare_depot();
    let files = files_of(&depot.root);
    // A folder inside the checkout.
    let line = one_line_failure(&fails(&mut init(&depot.path("tools"), &[])));
    assert!(
        line.contains("is not the root of its git checkout"),
        "{line}"
    );
    // Something in the way of .buildkite/drvkite.yml.
    depot.write(".buildkite", "not a folder");
    let line = one_line_failure(&fails(&mut init(&depot.root, &[])));
    assert!(line.contains(".buildkite is not a folder"), "{line}");
    std::fs::remove_file(depot.path(".buildkite")).unwrap();
    // A folder where .gitignore should be: the pipeline is not written
    // either.
    std::fs::create_dir(depot.path(".gitignore")).unwrap();
    let line = one_line_failure(&fails(&mut init(&depot.root, &[])));
    assert!(line.contains(".gitignore is not a regular file"), "{line}");
    std::fs::remove_dir(depot.path(".gitignore")).unwrap();
    assert_eq!(files_of(&depot.root), files);
}

#[test]
fn without_readtree_init_says_how_and_vendors_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    ok(Command::new("git").arg("-C").arg(root).args(["init", "-q"]));
    let salt = format!("{:?}", std::time::SystemTime::now());
    std::fs::create_dir(root.join("tools")).unwrap();
    std::fs::write(
        root.join("tools/hello.nix"),
        format!(
            "{{ ... }}: derivation {{ name = \"hello\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {salt} > $out\" ]; }}\n"
        ),
    )
    .unwrap();
    let report = ok(&mut init(root, &[]));
    assert!(report.contains("the depot has no default.nix"), "{report}");
    assert!(
        report.contains("drvkite init --vendor-readtree"),
        "{report}"
    );
    assert!(!root.join("default.nix").exists());
    assert!(!root.join("nix").exists());

    let report = ok(&mut init(root, &["--vendor-readtree"]));
    assert!(
        report.contains("wrote nix/readTree/default.nix: drvkite's readTree"),
        "{report}"
    );
    assert!(report.contains("wrote default.nix"), "{report}");
    assert_eq!(
        std::fs::read_to_string(root.join("nix/readTree/default.nix")).unwrap(),
        std::fs::read_to_string(Path::new(REPO).join("nix/readTree/default.nix")).unwrap()
    );
    // The vendored depot evaluates: its one derivation is its one target.
    let map = tmp.path().join("drvmap.json");
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(root)
        .arg("--out")
        .arg(&map));
    let labels: Vec<String> = read_json(&map)
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    std::fs::remove_file(&map).unwrap();
    assert_eq!(labels, ["tools/hello"]);
    let again = ok(&mut init(root, &["--vendor-readtree"]));
    assert!(again.contains("nothing to change"), "{again}");
}

#[test]
fn a_root_that_does_not_use_readtree_gets_advice_not_a_rewrite() {
    let depot = bare_depot();
    let odd = "{ ... }: { }\n";
    depot.write("default.nix", odd);
    let report = ok(&mut init(&depot.root, &["--vendor-readtree"]));
    assert!(
        report.contains("default.nix does not mention readTree"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(depot.path("default.nix")).unwrap(),
        odd
    );
}

/// The settings steps init prints, as YAML.
fn printed_settings(report: &str) -> Value {
    let start = report
        .find("       steps:")
        .expect("settings steps printed");
    let yaml: String = report[start..]
        .lines()
        .take_while(|l| l.starts_with("       "))
        .map(|l| format!("{}\n", &l[7..]))
        .collect();
    serde_norway::from_str(&yaml).unwrap()
}

#[test]
fn the_bootstrap_key_exists_and_every_generated_step_depends_on_it() {
    let depot = bare_depot();
    let report = ok(&mut init(&depot.root, &[]));
    // What the user pastes into Buildkite's settings: valid, uploading
    // the file init wrote.
    let settings = printed_settings(&report);
    validate_pipeline(&settings);
    let step = &settings["steps"][0];
    assert_eq!(
        step["command"],
        format!("buildkite-agent pipeline upload {BOOTSTRAP}")
    );
    let key = step["key"].as_str().unwrap();
    // The bootstrap pipeline names the same key for drvkite pipeline.
    let bootstrap = read_pipeline_file(&depot.path(BOOTSTRAP));
    assert_eq!(bootstrap["env"]["DRVKITE_BOOTSTRAP_KEY"], key);
    // And so every build step waits for it (read_pipeline checks that
    // every other dependency is a step of the pipeline).
    let out = pipeline(&depot, &["--bootstrap-key", key]);
    read_pipeline(&out);
    let steps = &phases(&out)[0].1;
    let builds: Vec<&Value> = steps
        .iter()
        .filter(|s| s["env"]["READTREE_TARGET"].is_string())
        .collect();
    assert!(builds.len() > 5, "{steps:?}");
    for s in builds {
        assert_eq!(s["depends_on"][0], Value::from(key), "{s}");
    }
}

#[test]
fn the_docs_show_the_settings_steps_init_prints() {
    let block = format!("```yaml\n{}```", drvkite::init::SETTINGS_STEPS);
    for page in ["README.md", "docs/buildkite.md"] {
        let text = std::fs::read_to_string(Path::new(REPO).join(page)).unwrap();
        assert!(text.contains(&block), "{page} must show {block}");
    }
}
