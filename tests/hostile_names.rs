//! Names a pull request controls, where they meet Buildkite's rules
//! beyond one string's escaping: step keys that must be unique across the
//! whole build, and names Nix hands over that are not text.

mod common;

use common::*;

/// A target at `path` (a readTree file) with one extra step labelled
/// `label`.
fn target_with_step(name: &str, label: &str) -> String {
    format!(
        r#"{{ depot, ... }}:
depot.nix.build.mkTarget {{
  name = "{name}";
  meta.ci.extraSteps.step = {{
    label = {label};
    command = depot.nix.build.writeScript "{name}-step" "echo {name}";
  }};
}}
"#,
        label = nix_string(label)
    )
}

#[test]
fn extra_steps_of_two_targets_with_the_same_key_are_refused_by_name() {
    // TVL's key is the sha1 of "<label>-<target>": label "a-x" on
    // tools/p and label "a" on x-tools/p both hash "a-x-tools/p", and
    // Buildkite refuses the whole upload holding the second.
    let depot = Depot::with_git();
    depot.write("tools/p.nix", &target_with_step("p", "a-x"));
    depot.write("x-tools/p.nix", &target_with_step("xp", "a"));
    depot.commit("two steps, one key");
    let (out, res) = run_pipeline(&depot, &[]);
    let line = one_line_failure(&res);
    assert!(
        line.contains("extra step 'a-x' of tools/p and extra step 'a' of x-tools/p have the same step key extra-step-")
            && line.contains("give one of them another label"),
        "{line}"
    );
    assert!(!out.exists(), "a pipeline was written");

    // Another label for one of them, and both are generated.
    depot.write("x-tools/p.nix", &target_with_step("xp", "b"));
    depot.commit("another label");
    let out = pipeline(&depot, &[]);
    let keys: Vec<String> = phases(&out)
        .into_iter()
        .flat_map(|(_, steps)| steps)
        .filter_map(|s| s["key"].as_str().map(str::to_owned))
        .collect();
    let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "duplicate keys: {keys:?}");
}

#[test]
fn a_folder_name_that_is_not_utf8_breaks_its_own_target_only() {
    // Linux folder names are bytes, and Nix prints them as they are: the
    // record of such a target once failed the whole run ("unexpected
    // output from drvkite's Nix expression"), with nothing written.
    use std::os::unix::ffi::OsStrExt;
    let depot = Depot::with_git();
    let dir = depot
        .root
        .join("tools")
        .join(std::ffi::OsStr::from_bytes(b"bad\xff"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("default.nix"),
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"bad\"; }\n",
    )
    .unwrap();
    depot.commit("a name that is not UTF-8");
    let (out, _) = pipeline_with_broken(&depot, &[]);
    let broken = broken(&out);
    let error = &broken["tools/bad\u{fffd}"];
    assert!(error.contains("is not UTF-8"), "{error}");
    let steps: Vec<_> = phases(&out).into_iter().flat_map(|(_, s)| s).collect();
    assert!(
        steps
            .iter()
            .any(|s| s["label"] == ":x: tools/bad\u{fffd} cannot be uploaded"),
        "no failing step"
    );
    // Every other target is built as usual.
    build_step(&steps, "tools/hello");
    let map = read_json(&out.join("drvmap.json"));
    assert!(map.get("tools/bad\u{fffd}").is_none(), "{map}");
}

#[test]
fn escape_sequences_in_a_name_reach_no_log_raw() {
    // Buildkite's log renders `ESC ]1339;url=…;content=… BEL` as a link
    // and a line starting `+++ ` as an (expanded) group header: a broken
    // target's name printed raw, by drvkite or by its failing step, put a
    // fake link and a fake header into the job's log.
    let depot = Depot::with_git();
    let name = "\u{1b}]1339;url='https://evil.example/approve';content='Approve'\u{7}\n+++ fine";
    depot.write(
        "tools/esc.nix",
        &format!(
            r#"{{ depot, ... }}:
let
  name = {name};
  base = depot.nix.build.mkTarget {{ name = "esc"; meta.ci.targets = [ name ]; }};
in
base // {{ ${{name}} = {{ type = "derivation"; outPath = throw "boom"; drvPath = throw "boom"; }}; }}
"#,
            name = nix_string(name)
        ),
    );
    depot.commit("a name with escape sequences");
    let (out, res) = pipeline_with_broken(&depot, &[]);
    let raw = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.contains(['\u{1b}', '\u{7}']) || text.lines().any(|l| l.starts_with("+++"))
    };
    assert!(
        !raw(&res.stderr),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let steps: Vec<_> = phases(&out).into_iter().flat_map(|(_, s)| s).collect();
    let failing = steps
        .iter()
        .find(|s| s["key"].as_str().unwrap_or("").starts_with("eval-error-"))
        .expect("the failing step");
    let ran = run_step(&depot.root, failing["command"].as_str().unwrap(), &[]);
    assert_eq!(ran.status.code(), Some(1));
    let log = String::from_utf8_lossy(&ran.stderr);
    assert!(!raw(&ran.stderr) && log.contains("\\u{1b}]1339"), "{log}");
}

#[test]
fn values_of_the_wrong_type_break_their_own_target_only() {
    // Each of these once failed the whole run ("unexpected output from
    // drvkite's Nix expression"), with nothing written.
    let depot = Depot::with_git();
    let cases = [
        (
            "timeout",
            r#"depot.nix.build.mkTarget { name = "t"; meta.timeout = "90"; }"#,
            "meta.timeout must be a number of seconds, not \"90\"",
        ),
        (
            "args",
            "depot.nix.build.mkTarget { name = \"a\"; meta.ci.buildkiteExtraStepArgs = [ 1 ]; }",
            "meta.ci.buildkiteExtraStepArgs must be an attribute set of step fields, not [1]",
        ),
        (
            "deps",
            r#"depot.nix.build.mkTarget { name = "d"; meta.ci.buildkiteExtraDeps = "k"; }"#,
            "meta.ci.buildkiteExtraDeps must be a list of step keys, not \"k\"",
        ),
        (
            "outputs",
            r#"(depot.nix.build.mkTarget { name = "o"; }) // { outputs = 5; }"#,
            "its outputs must be a list of output names, not 5",
        ),
        (
            "drv",
            r#"{ type = "derivation"; outPath = "/x"; drvPath = "not-a-path"; }"#,
            "its drvPath must be the store path of a .drv file, not \"not-a-path\"",
        ),
    ];
    for (name, body, _) in &cases {
        depot.write(
            &format!("wrong/{name}.nix"),
            &format!("{{ depot, ... }}:\n{body}\n"),
        );
    }
    depot.commit("values of the wrong type");
    let (out, _) = pipeline_with_broken(&depot, &[]);
    let broken = broken(&out);
    for (name, _, error) in &cases {
        assert_eq!(broken[&format!("wrong/{name}")], *error);
    }
    let steps: Vec<_> = phases(&out).into_iter().flat_map(|(_, s)| s).collect();
    build_step(&steps, "tools/hello");
}
