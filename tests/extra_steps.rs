//! Extra steps with real Nix and a real git checkout: pipeline generation
//! builds no script, the generated command (run as a Buildkite agent would
//! after `pipeline upload`) builds and runs it, and the checkout stays
//! clean.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::schema::{flatten, read_pipeline};
use common::*;
use serde_json::{Value, json};

const SCRIPT_LINK: &str = "nix-buildkite-extra-step-command-script";
const UNCHANGED: &str = "Target has not changed.";

type Chunks = Vec<(String, Value)>;

/// `drvkite pipeline` into `<tmp>/<name>`; every chunk is checked against
/// Buildkite's schema, unique keys and existing dependencies.
fn pipeline(depot: &Depot, name: &str, args: &[&str]) -> (PathBuf, Chunks) {
    let out = depot.out(name);
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(args));
    let chunks = read_pipeline(&out);
    (out, chunks)
}

/// The phase and the step (or group) whose label (or group name) is `label`.
fn find<'a>(chunks: &'a Chunks, label: &str) -> (&'a str, &'a Value) {
    chunks
        .iter()
        .flat_map(|(p, c)| {
            flatten(c["steps"].as_array().unwrap())
                .into_iter()
                .map(move |s| (p.as_str(), s))
        })
        .find(|(_, s)| s.get("label").or(s.get("group")) == Some(&json!(label)))
        .unwrap_or_else(|| panic!("no step {label:?} in {chunks:#?}"))
}

fn command_of(step: &Value) -> &str {
    step["command"].as_str().expect("a command step")
}

/// Run a step's command (as uploaded: see `read_pipeline`) as an agent
/// does: by bash in the checkout.
fn run_step(depot: &Depot, command: &str, log: &Path) -> String {
    ok(&mut step_command(depot, command, log))
}

/// The agent's bash for a step's command, to add variables to.
fn step_command(depot: &Depot, command: &str, log: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(command)
        .current_dir(&depot.root)
        // No binary cache: nothing to download, and no network retries.
        .env("NIX_CONFIG", "substituters =")
        .env("EXTRA_STEP_LOG", log);
    cmd
}

/// The agent's bash for a step's command in job `n` of pull request 7,
/// with drvkite as `$DRVKITE` and its ephemera store in `store`; `RUN` is
/// `n` too.
fn pr_job(depot: &Depot, command: &str, log: &Path, store: &Path, n: &str) -> Command {
    let mut cmd = step_command(depot, command, log);
    cmd.env("DRVKITE", env!("CARGO_BIN_EXE_drvkite"))
        .env("DRVKITE_EPHEMERA_STORE", store)
        .env("BUILDKITE_ORGANIZATION_SLUG", "acme")
        .env("BUILDKITE_PIPELINE_SLUG", "depot")
        .env("BUILDKITE_REPO", "git@github.com:acme/depot.git")
        .env("BUILDKITE_PIPELINE_DEFAULT_BRANCH", "main")
        .env("BUILDKITE_BRANCH", "feature")
        .env("BUILDKITE_PULL_REQUEST", "7")
        .env(
            "BUILDKITE_PULL_REQUEST_REPO",
            "https://github.com/acme/depot",
        )
        .env("BUILDKITE_BUILD_NUMBER", n)
        .env("BUILDKITE_BUILD_ID", format!("build-{n}"))
        .env("BUILDKITE_JOB_ID", format!("job-{n}"))
        .env("RUN", n);
    cmd
}

fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_clean(depot: &Depot) {
    assert_eq!(
        depot.git(&["status", "--porcelain", "--ignored=no"]),
        "",
        "the checkout is dirty"
    );
}

/// `drvkite pipeline` that must fail; returns its stderr.
fn pipeline_fails(depot: &Depot, out: &Path, args: &[&str]) -> String {
    let res = fails(
        drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(out)
            .args(args),
    );
    String::from_utf8_lossy(&res.stderr).into_owned()
}

fn attr(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The .drv of an extra step's command, instantiated independently.
fn script_drv(depot: &Depot, parent: &[&str], name: &str) -> String {
    let mut path = attr(parent);
    path.extend(attr(&["meta", "ci", "extraSteps", name, "command"]));
    instantiate_attr(&depot.root, &path)
}

fn parent_output(depot: &Depot, parent: &[&str]) -> String {
    let drv = instantiate_attr(&depot.root, &attr(parent));
    output_paths(&drv).remove(0)
}

/// One extra step of the example depot, end to end.
struct Kind<'a> {
    parent: &'a [&'a str],
    parent_label: &'a str,
    name: &'a str,
    label: &'a str,
    phase: &'a str,
}

/// Generate, check that the script was not built, run the step's command,
/// check its side effect and that the checkout is clean. Returns the
/// depot, the chunks, the step and the log lines.
fn run_kind(kind: &Kind) -> (Depot, Chunks, Value, Vec<String>) {
    let depot = Depot::with_git();
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let full = format!(":gear: {} (from {})", kind.label, kind.parent_label);
    let (phase, step) = find(&chunks, &full);
    assert_eq!(phase, kind.phase, "phase of {full}");
    let step = step.clone();

    let drv = script_drv(&depot, kind.parent, kind.name);
    let outputs = output_paths(&drv);
    assert_eq!(outputs.len(), 1);
    assert!(
        !Path::new(&outputs[0]).exists(),
        "{full}: script {} was built by pipeline generation",
        outputs[0]
    );
    assert!(
        command_of(&step).contains(&drv),
        "{full}: the command does not realise {drv}"
    );

    let log = depot.out("log");
    let stdout = run_step(&depot, command_of(&step), &log);
    assert!(stdout.contains("Running extra step script"), "{stdout}");
    assert!(Path::new(&outputs[0]).exists(), "{full}: script not built");
    assert_eq!(
        std::fs::read_link(depot.path(SCRIPT_LINK)).unwrap(),
        PathBuf::from(&outputs[0]),
        "{full}: the out-link is not a root of the script"
    );
    assert_clean(&depot);
    let lines = log_lines(&log);
    (depot, chunks, step, lines)
}

#[test]
fn plain_step_builds_its_script_only_when_it_runs() {
    let (depot, chunks, step, log) = run_kind(&Kind {
        parent: &["tools", "lint"],
        parent_label: "tools/lint",
        name: "check",
        label: "lint check",
        phase: "build",
    });
    assert_eq!(log, ["lint-check"]);
    let lint = find(&chunks, ":nix: tools/lint").1;
    assert_eq!(step["depends_on"], json!([lint["key"]]));
    assert_eq!(step["skip"], json!(false));
    assert_eq!(step["soft_fail"], json!(false));
    // TVL's key: sha1 of "<label>-<parent label>".
    let sha = ok(Command::new("bash")
        .arg("-c")
        .arg("printf '%s' 'lint check-tools/lint' | sha1sum"));
    assert_eq!(
        step["key"],
        json!(format!("extra-step-{}", &sha[..40])),
        "{sha}"
    );
    assert!(!depot.path("result").exists(), "the parent was built");
}

#[test]
fn needs_output_step_builds_the_parent_into_result_and_exports_it() {
    let (depot, chunks, step, log) = run_kind(&Kind {
        parent: &["tools", "lint"],
        parent_label: "tools/lint",
        name: "inspect-output",
        label: "inspect-output",
        phase: "build",
    });
    let out = parent_output(&depot, &["tools", "lint"]);
    // The script saw $DRVKITE_PARENT_OUTPUT and TVL's ./result.
    assert_eq!(log, [format!("lint-inspect-output {out} {out}")]);
    // It builds the parent itself, so it waits for nothing.
    assert_eq!(step["depends_on"], json!([]));
    assert!(find(&chunks, ":nix: tools/lint").1["key"].is_string());
}

#[test]
fn always_run_step_runs_on_a_clean_tree_even_when_unchanged() {
    let (depot, _, step, log) = run_kind(&Kind {
        parent: &["tools", "fmt"],
        parent_label: "tools/fmt",
        name: "check",
        label: "formatting check",
        phase: "build",
    });
    // fmt's check fails on a dirty tree: it passed, after the links of the
    // run were made.
    assert_eq!(log, ["fmt-check"]);
    assert_eq!(step["depends_on"], json!([]));
    // Unchanged parent: still not skipped.
    let (first, _) = pipeline(&depot, "first", &[]);
    let map = first.join("drvmap.json");
    let (_, again) = pipeline(&depot, "again", &["--parent-map", map.to_str().unwrap()]);
    assert_eq!(find(&again, ":nix: tools/fmt").1["skip"], json!(UNCHANGED));
    let step = find(&again, ":gear: formatting check (from tools/fmt)").1;
    assert_eq!(step["skip"], json!(false));
    // Running it a second time (links exist now) keeps the tree clean.
    let log2 = depot.out("log2");
    run_step(&depot, command_of(step), &log2);
    assert_eq!(log_lines(&log2), ["fmt-check"]);
    assert_clean(&depot);
}

#[test]
fn gated_step_is_a_group_with_a_block_and_runs_lazily() {
    let (_, chunks, step, log) = run_kind(&Kind {
        parent: &["apps", "web"],
        parent_label: "apps/web",
        name: "deploy",
        label: "deploy",
        phase: "release",
    });
    assert_eq!(log, ["web-deploy"]);
    let (phase, group) = find(&chunks, "deploy");
    assert_eq!(phase, "release");
    let web = find(&chunks, ":nix: apps/web").1;
    assert_eq!(group["depends_on"], json!([web["key"]]));
    assert_eq!(group["skip"], json!(false));
    assert!(group.get("branches").is_none(), "groups take no branches");
    let inner = group["steps"].as_array().unwrap();
    assert_eq!(inner.len(), 2);
    assert_eq!(
        inner[0],
        json!({
            "block": ":radio_button: Run deploy? (from apps/web)",
            "prompt": "Deploy the web app?",
            "branches": "refs/heads/main",
        })
    );
    assert_eq!(inner[1], step);
    assert_eq!(step["branches"], json!("refs/heads/main"));
    assert!(step.get("depends_on").is_none());
}

#[test]
fn release_step_with_branches_runs_lazily() {
    let (_, chunks, step, log) = run_kind(&Kind {
        parent: &["ops", "changelog"],
        parent_label: "ops/changelog",
        name: "publish",
        label: "publish",
        phase: "release",
    });
    assert_eq!(log, ["changelog-publish"]);
    assert_eq!(step["branches"], json!("refs/heads/main"));
    let parent = find(&chunks, ":nix: ops/changelog").1;
    assert_eq!(step["depends_on"], json!([parent["key"]]));
}

#[test]
fn build_step_command_prints_exactly_one_store_path() {
    let depot = Depot::with_git();
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let step = find(&chunks, ":nix: tools/lint").1;
    let out = parent_output(&depot, &["tools", "lint"]);
    assert!(!Path::new(&out).exists());
    let stdout = run_step(&depot, command_of(step), &depot.out("log"));
    assert_eq!(stdout, format!("{out}\n"));
    assert_eq!(
        std::fs::read_link(depot.path("result")).unwrap(),
        PathBuf::from(&out)
    );
    assert_clean(&depot);
}

const GATES: &str = r#"{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
  gated = extra: {
    phase = "release";
    prompt = "Go ahead?";
    command = writeScript "gate" "true\n";
  } // extra;
in
mkTarget {
  name = "gates";
  meta.ci.extraSteps = {
    plain = gated { };
    always = gated { alwaysRun = true; };
    skipped = gated { skip = "skipped by hand"; };
  };
}
"#;

#[test]
fn gated_groups_honour_the_steps_own_skip_and_always_run() {
    let depot = Depot::with_git();
    depot.write("gates/default.nix", GATES);
    depot.commit("gates");
    let check = |chunks: &Chunks, expected: [(&str, Value); 3]| {
        let parent = find(chunks, ":nix: gates").1["key"].clone();
        for (name, skip) in expected {
            let group = find(chunks, name).1;
            assert_eq!(group["skip"], skip, "group {name}");
            let inner = &group["steps"][1];
            assert_eq!(inner["skip"], skip, "step {name}");
            let deps = if name == "always" {
                json!([])
            } else {
                json!([parent])
            };
            assert_eq!(group["depends_on"], deps, "group {name}");
        }
    };
    let (first, chunks) = pipeline(&depot, "first", &[]);
    check(
        &chunks,
        [
            ("plain", json!(false)),
            ("always", json!(false)),
            ("skipped", json!("skipped by hand")),
        ],
    );
    let map = first.join("drvmap.json");
    let (_, chunks) = pipeline(&depot, "again", &["--parent-map", map.to_str().unwrap()]);
    check(
        &chunks,
        [
            ("plain", json!(UNCHANGED)),
            ("always", json!(false)),
            ("skipped", json!("skipped by hand")),
        ],
    );
    // An unchanged parent skips its plain extra steps too.
    let lint = find(&chunks, ":gear: lint check (from tools/lint)").1;
    assert_eq!(lint["skip"], json!(UNCHANGED));
}

/// A fixture target `bad` with one extra step (Nix text).
fn bad_target(step: &str) -> String {
    format!(
        r#"{{ depot, ... }}:
let
  inherit (depot.nix.build) mkTarget writeScript;
  script = writeScript "bad-step" "true\n";
  twoOutputs = derivation {{
    name = "two-outputs";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out; echo > $doc" ];
    outputs = [ "out" "doc" ];
  }};
in
mkTarget {{
  name = "bad";
  meta.ci.extraSteps.{step};
}}
"#
    )
}

#[test]
fn invalid_extra_steps_fail_with_one_line_naming_step_and_parent() {
    let depot = Depot::new();
    let cases = [
        (
            r#"ask = { prompt = "Sure?"; command = script; }"#,
            "in extra step 'ask' (from bad): 'prompt' cannot be used in the build phase",
        ),
        (
            r#"ship = { phase = "deploy"; command = script; }"#,
            "in extra step 'ship' (from bad): phase 'deploy' is not valid; known phases: build, release",
        ),
        (
            "old = { postBuild = true; command = script; }",
            "in extra step 'old' (from bad): unknown option 'postBuild'",
        ),
        (
            r#"empty = { label = "no command"; }"#,
            "in extra step 'no command' (from bad): 'command' is required",
        ),
        (
            "two = { command = twoOutputs; }",
            "in extra step 'two' (from bad): 'command' must have exactly one output, it has 2 (out, doc)",
        ),
        (
            r#"text = { command = "echo hi"; }"#,
            "in extra step 'text' (from bad): 'command' must be a derivation that builds one executable (e.g. writeShellScript), not a string",
        ),
        (
            "fn = { skip = x: x; command = script; }",
            "in extra step 'fn' (from bad): 'skip' must be a bool or a reason string, not a function",
        ),
        (
            "over = { needsOutput = true; parentOverride = 3; command = script; }",
            "in extra step 'over' (from bad): 'parentOverride' must be a function from the parent target to a derivation, not a int",
        ),
        (
            r#"dup = { label = "same"; command = script; }; meta.ci.extraSteps.dup2 = { label = "same"; command = script; }"#,
            "extra steps 'dup' and 'dup2' of bad have the same label 'same'",
        ),
        (
            r#"cache = { command = script; ephemera = "~/.cargo"; }"#,
            "in extra step 'cache' (from bad): 'ephemera' must be a list of sets like",
        ),
        (
            r#"cache = { command = script; ephemera = [ { name = "c"; paths = [ ]; } ]; }"#,
            "in extra step 'cache' (from bad): ephemera set c has no paths",
        ),
    ];
    for (step, expected) in cases {
        depot.write("bad/default.nix", &bad_target(step));
        let out = depot.out("pipeline");
        let stderr = pipeline_fails(&depot, &out, &[]);
        assert!(
            stderr.starts_with("drvkite: ") && stderr.trim_end().lines().count() == 1,
            "not one line: {stderr}"
        );
        assert!(stderr.contains(expected), "{step}: {stderr}");
        assert!(!out.exists(), "{step}: a pipeline was written");
    }
}

fn remove_gitignore(depot: &Depot) {
    std::fs::remove_file(depot.path(".gitignore")).unwrap();
    depot.commit("no ignores");
}

#[test]
fn links_git_does_not_ignore_fail_with_the_lines_to_add() {
    let depot = Depot::with_git();
    remove_gitignore(&depot);
    // A two-output target: its build step also makes result-doc.
    depot.write(
        "multi-out/default.nix",
        r#"{ depot, ... }:
derivation {
  name = "multi-out";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo > $out; echo > $doc" ];
  outputs = [ "out" "doc" ];
  salt = builtins.readFile ../nix/salt;
}
"#,
    );
    depot.commit("multi");
    let out = depot.out("pipeline");
    let stderr = pipeline_fails(&depot, &out, &[]);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let gitignore = depot.root.canonicalize().unwrap().join(".gitignore");
    let expected = format!(
        "add to {} the lines \"/nix-buildkite-extra-step-command-script\" \"/result\" \"/result-*\"",
        gitignore.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("--out-link-dir"), "{stderr}");
    assert!(!out.exists());

    // Those lines are enough.
    depot.write(
        ".gitignore",
        "/nix-buildkite-extra-step-command-script\n/result\n/result-*\n",
    );
    depot.commit("ignore");
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let step = find(&chunks, ":nix: multi-out").1;
    run_step(&depot, command_of(step), &depot.out("log"));
    assert!(depot.path("result-doc").exists());
    assert_clean(&depot);
}

#[test]
fn out_link_dir_in_the_git_directory_needs_no_ignores() {
    let depot = Depot::with_git();
    remove_gitignore(&depot);
    let (_, chunks) = pipeline(
        &depot,
        "pipeline",
        &["--out-link-dir", ".git/drvkite-roots"],
    );
    let roots = depot.path(".git/drvkite-roots");
    let log = depot.out("log");

    let check = find(&chunks, ":gear: lint check (from tools/lint)").1;
    let drv = script_drv(&depot, &["tools", "lint"], "check");
    let script = output_paths(&drv).remove(0);
    assert!(!Path::new(&script).exists());
    run_step(&depot, command_of(check), &log);
    assert_eq!(
        std::fs::read_link(roots.join(SCRIPT_LINK)).unwrap(),
        PathBuf::from(&script)
    );

    // needsOutput: the parent's root is in the folder too, so the script
    // has $DRVKITE_PARENT_OUTPUT and no ./result.
    let inspect = find(&chunks, ":gear: inspect-output (from tools/lint)").1;
    run_step(&depot, command_of(inspect), &log);
    let out = parent_output(&depot, &["tools", "lint"]);
    assert_eq!(
        log_lines(&log),
        [
            "lint-check".to_owned(),
            format!("lint-inspect-output {out} no-result")
        ]
    );
    assert_eq!(
        std::fs::read_link(roots.join("result")).unwrap(),
        PathBuf::from(&out)
    );

    // Build steps put their roots there as well.
    let build = find(&chunks, ":nix: tools/hello").1;
    let stdout = run_step(&depot, command_of(build), &log);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(
        std::fs::read_link(roots.join("result")).unwrap(),
        PathBuf::from(stdout.trim())
    );
    assert!(!depot.path("result").exists());
    assert!(!depot.path(SCRIPT_LINK).exists());
    assert_clean(&depot);
}

#[test]
fn out_link_dir_from_depot_settings_outside_the_work_tree() {
    let depot = Depot::with_git();
    remove_gitignore(&depot);
    let roots = depot.out("roots");
    depot.write(
        "ci/drvkite.nix",
        &format!(
            "{{ ... }}: {{ outLinkDir = {}; }}\n",
            serde_json::to_string(roots.to_str().unwrap()).unwrap()
        ),
    );
    depot.commit("settings");
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let step = find(&chunks, ":gear: publish (from ops/changelog)").1;
    let log = depot.out("log");
    run_step(&depot, command_of(step), &log);
    assert_eq!(log_lines(&log), ["changelog-publish"]);
    let script = output_paths(&script_drv(&depot, &["ops", "changelog"], "publish")).remove(0);
    assert_eq!(
        std::fs::read_link(roots.join(SCRIPT_LINK)).unwrap(),
        PathBuf::from(script)
    );
    assert_clean(&depot);

    // A folder inside the work tree must be ignored: the whole folder.
    let stderr = pipeline_fails(&depot, &depot.out("p2"), &["--out-link-dir", "gc-roots"]);
    assert!(stderr.contains("the lines \"/gc-roots/\""), "{stderr}");
}

#[test]
fn depot_outside_git_is_not_checked_and_says_so() {
    let depot = Depot::new();
    std::fs::remove_file(depot.path(".gitignore")).unwrap();
    let out = depot.out("pipeline");
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not in a git work tree: not checking that the steps' out-links (nix-buildkite-extra-step-command-script, result) are ignored"),
        "{stderr}"
    );
    read_pipeline(&out);
}

const HOSTILE_DIR: &str = r#"it's "odd" $HOME dir"#;

#[test]
fn hostile_names_survive_quoting_interpolation_and_the_fallback() {
    let depot = Depot::with_git();
    depot.write(
        &format!("hostile/{HOSTILE_DIR}/default.nix"),
        r#"{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "hostile";
  meta.ci.extraSteps."step's \"q\" $HOME ${"$"}{x} name" = {
    label = "label's \"q\" $HOME";
    needsOutput = true;
    command = writeScript "hostile-step" ''
      echo "hostile-step $(cat "$DRVKITE_PARENT_OUTPUT")" >> "$EXTRA_STEP_LOG"
    '';
  };
}
"#,
    );
    depot.commit("hostile");
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    // As uploaded: upload-time interpolation left $HOME alone.
    let step = find(
        &chunks,
        r#":gear: label's "q" $HOME (from hostile/it's "odd" $HOME dir)"#,
    )
    .1;
    let name = r#"step's "q" $HOME ${x} name"#;
    let parent = ["hostile", HOSTILE_DIR];
    let drv = script_drv(&depot, &parent, name);
    let parent_drv = instantiate_attr(&depot.root, &attr(&parent));
    assert!(command_of(step).contains(&drv));
    assert!(command_of(step).contains(&parent_drv));
    assert!(find(&chunks, ":nix: hostile/it's \"odd\" $HOME dir").1["key"].is_string());

    // Without the .drv files (garbage-collected, or another agent's
    // evaluation), the command builds both from the attribute paths.
    ok(Command::new("nix-store").args(["--delete", &drv, &parent_drv]));
    assert!(!Path::new(&drv).exists());
    let log = depot.out("log");
    run_step(&depot, command_of(step), &log);
    assert_eq!(log_lines(&log), ["hostile-step hostile"]);
    let script = output_paths(&script_drv(&depot, &parent, name)).remove(0);
    assert_eq!(
        std::fs::read_link(depot.path(SCRIPT_LINK)).unwrap(),
        PathBuf::from(script)
    );
    assert_clean(&depot);
}

#[test]
fn parent_override_builds_the_overridden_parent_even_without_its_drv() {
    let depot = Depot::with_git();
    depot.write(
        "override/default.nix",
        r#"{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "override";
  meta.ci.extraSteps.release = {
    needsOutput = true;
    parentOverride = p: mkTarget { name = p.name; text = "release build"; };
    command = writeScript "override-release" ''
      echo "override-release $(cat "$DRVKITE_PARENT_OUTPUT")" >> "$EXTRA_STEP_LOG"
    '';
  };
}
"#,
    );
    depot.commit("override");
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let step = find(&chunks, ":gear: release (from override)").1;
    let overridden = nix_eval_json(
        r#"builtins.unsafeDiscardStringContext (let t = (import ./. {}).override; in (t.meta.ci.extraSteps.release.parentOverride t).drvPath)"#,
        &depot.root,
    );
    let overridden = overridden.as_str().unwrap();
    assert!(
        command_of(step).contains(overridden),
        "{}",
        command_of(step)
    );
    ok(Command::new("nix-store").args(["--delete", overridden]));
    let log = depot.out("log");
    run_step(&depot, command_of(step), &log);
    assert_eq!(log_lines(&log), ["override-release release build"]);
    // The target itself was not built: only the overridden parent.
    assert!(!Path::new(&parent_output(&depot, &["override"])).exists());
    assert_eq!(step["depends_on"], json!([]));
    assert_clean(&depot);
}

#[test]
fn targets_sharing_a_derivation_keep_their_own_extra_steps() {
    let depot = Depot::new();
    for name in ["twin-a", "twin-b"] {
        depot.write(
            &format!("twins/{name}.nix"),
            &format!(
                r#"{{ depot, ... }}:
depot.nix.build.mkTarget {{
  name = "twin";
  meta.ci.extraSteps.check.command = depot.nix.build.writeScript "{name}-check" "true\n";
}}
"#
            ),
        );
    }
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    // One build step for the shared derivation, both targets' extra steps.
    let build = find(&chunks, ":nix: twins/twin-a, twins/twin-b").1;
    for parent in ["twins/twin-a", "twins/twin-b"] {
        let step = find(&chunks, &format!(":gear: check (from {parent})")).1;
        assert_eq!(step["depends_on"], json!([build["key"]]));
    }
}

#[test]
fn ephemera_sets_are_restored_before_the_script_and_persisted_only_after_success() {
    let depot = Depot::with_git();
    depot.write(
        "cached/default.nix",
        r#"{ depot, ... }:
depot.nix.build.mkTarget {
  name = "cached";
  meta.ci.extraSteps.warm = {
    command = depot.nix.build.writeScript "warm" ''
      if [ -f cache-dir/state ]; then echo "hit $(cat cache-dir/state)" >> "$EXTRA_STEP_LOG"; else echo miss >> "$EXTRA_STEP_LOG"; fi
      mkdir -p cache-dir
      echo "$RUN" > cache-dir/state
      [ -z "''${FAIL:-}" ]
    '';
    ephemera = [ { name = "cache"; paths = [ "cache-dir" ]; keyFiles = [ "cached/key.txt" ]; } ];
  };
}
"#,
    );
    depot.write("cached/key.txt", "v1\n");
    let ignore = std::fs::read_to_string(depot.path(".gitignore")).unwrap_or_default();
    depot.write(".gitignore", &format!("{ignore}/cache-dir\n"));
    depot.commit("cached target");
    let (_, chunks) = pipeline(&depot, "pipeline", &[]);
    let command = command_of(find(&chunks, ":gear: warm (from cached)").1).to_owned();
    assert!(
        command.contains("${DRVKITE:-drvkite} ephemera restore"),
        "{command}"
    );

    let store = tempfile::tempdir().unwrap();
    let log = depot.out("warm.log");
    // Each run is a fresh job of the same pull request on a pristine checkout.
    let run = |n: &str, fail: bool| {
        let _ = std::fs::remove_dir_all(depot.path("cache-dir"));
        let mut cmd = pr_job(&depot, &command, &log, store.path(), n);
        if fail {
            cmd.env("FAIL", "1");
            let out = cmd.output().unwrap();
            assert!(!out.status.success(), "the failing script passed");
        } else {
            ok(&mut cmd);
        }
        assert_clean(&depot);
    };
    run("1", true);
    run("2", false);
    run("3", false);
    depot.write("cached/key.txt", "v2\n");
    depot.commit("new key");
    run("4", false);
    // Run 1 failed: nothing persisted, so run 2 missed; run 3 restored
    // run 2's cache; a changed key file starts afresh.
    assert_eq!(log_lines(&log), ["miss", "miss", "hit 2", "miss"]);
}

#[test]
fn ephemera_rules_and_fallback_warm_a_step_whose_key_changed() {
    let depot = Depot::with_git();
    depot.write(
        "cached/default.nix",
        r#"{ depot, ... }:
depot.nix.build.mkTarget {
  name = "cached";
  meta.ci.extraSteps.warm = {
    command = depot.nix.build.writeScript "warm" ''
      if [ -e cache-dir/tmp/scratch ]; then tmp=tmp; else tmp=notmp; fi
      echo "$DRVKITE_EPHEMERA_CACHE_DIR_STATUS $(cat cache-dir/state 2>/dev/null || echo none) $tmp" >> "$EXTRA_STEP_LOG"
      mkdir -p cache-dir/tmp
      echo "$RUN" > cache-dir/state
      echo scratch > cache-dir/tmp/scratch
    '';
    ephemera = [ {
      name = "cache-dir";
      paths = [ "cache-dir/**" "!cache-dir/tmp/**" ];
      keyFiles = [ "cached/key.txt" ];
      fallback = true;
    } ];
  };
}
"#,
    );
    depot.write("cached/key.txt", "v1\n");
    let ignore = std::fs::read_to_string(depot.path(".gitignore")).unwrap_or_default();
    depot.write(".gitignore", &format!("{ignore}/cache-dir\n"));
    depot.commit("cached target");
    let store = tempfile::tempdir().unwrap();
    let log = depot.out("warm.log");
    // Each run: the pipeline as the commit makes it, then its step in a
    // fresh job of the same pull request on a pristine checkout.
    let run = |n: &str| {
        let (_, chunks) = pipeline(&depot, &format!("pipeline-{n}"), &[]);
        let command = command_of(find(&chunks, ":gear: warm (from cached)").1).to_owned();
        let _ = std::fs::remove_dir_all(depot.path("cache-dir"));
        let mut cmd = pr_job(&depot, &command, &log, store.path(), n);
        let out = ok(&mut cmd);
        assert_clean(&depot);
        out
    };
    run("1");
    depot.write("cached/key.txt", "v2\n");
    depot.commit("new key");
    let second = run("2");
    assert!(second.contains("restored cache-dir (fallback"), "{second}");
    run("3");
    // Run 1 missed; run 2's key changed, so it warmed up from run 1's entry
    // (without the excluded tmp/) and persisted under the new key, which
    // run 3 restored exactly.
    assert_eq!(
        log_lines(&log),
        ["miss none notmp", "fallback 1 notmp", "exact 2 notmp"]
    );
    // Entries under two keys: v1 (run 1), v2 (runs 2 and 3).
    let mut keys: Vec<String> = walkdir::WalkDir::new(store.path())
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let p = e.path().to_string_lossy().into_owned();
            let rest = p.split_once("/entries/cache-dir/")?.1.to_owned();
            Some(rest.split('/').next()?.to_owned())
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 2, "{keys:?}");
}
