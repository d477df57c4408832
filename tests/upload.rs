//! Generated pipelines survive Buildkite's real upload. Names, labels and
//! option strings full of interpolation, quoting, YAML and control
//! characters go through real Nix and `drvkite pipeline`; each chunk goes
//! through a model of `buildkite-agent pipeline upload` (YAML 1.2, then
//! interpolation with a hostile environment: `common::upload`); every
//! field must come out as the exact intended text, and the commands, run
//! by real bash in a git checkout, build the intended attributes, also
//! through the `nix-build` fallback, and run nothing else.

mod common;

use std::path::Path;

use common::schema::read_pipeline;
use common::*;
use drvkite::pipeline::text::printable;
use proptest::prelude::*;
use serde_json::{Value, json};

/// The display rule for labels and other display text (docs/commands.md):
/// a text with a backslash directly before a `$` shows every backslash
/// doubled; any other text shows as it is.
fn shown(text: &str) -> String {
    if text.contains("\\$") {
        text.replace('\\', "\\\\")
    } else {
        text.to_owned()
    }
}

/// Whether a value can pass the upload exactly: the agent pairs
/// backslashes up, so an odd run of them before a `$` loses one.
fn uploadable(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        match c {
            '\\' => run += 1,
            '$' if run % 2 == 1 => return false,
            _ => run = 0,
        }
    }
    true
}

/// Pieces of names: interpolation, quoting, YAML line breaks and controls.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("$".to_owned()),
        Just("$$".to_owned()),
        Just("$HOME".to_owned()),
        Just("${HOME}".to_owned()),
        Just("${NOPE?boom}".to_owned()),
        Just("${1}".to_owned()),
        Just("${".to_owned()),
        Just("$1".to_owned()),
        Just("\\".to_owned()),
        Just("\\$".to_owned()),
        Just("\\\\$".to_owned()),
        Just("$(touch PWNED)".to_owned()),
        Just("`touch PWNED`".to_owned()),
        Just("'; touch PWNED; '".to_owned()),
        Just("\"".to_owned()),
        Just("{}()".to_owned()),
        Just(":?-!".to_owned()),
        Just(" ".to_owned()),
        Just("\t".to_owned()),
        Just("\n".to_owned()),
        Just("\u{7f}".to_owned()),
        Just("\u{80}\u{9b}".to_owned()),
        Just("\u{85}".to_owned()),
        Just("\u{2028}".to_owned()),
        Just("\u{2029}".to_owned()),
        Just("\u{feff}".to_owned()),
        Just("\u{fffe}".to_owned()),
        Just("é🦀".to_owned()),
        "[a-zA-Z0-9]{1,4}",
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 1..max).prop_map(|p| p.concat())
}

/// Names readTree or Nix give a meaning of their own.
fn reserved(name: &str) -> bool {
    name.starts_with("__")
        || ["meta", "type", "outPath", "drvPath", "outputs", "name"].contains(&name)
}

#[derive(Debug, Clone)]
struct Case {
    dir: String,
    names: Vec<String>,
    step_name: String,
    step_label: String,
    prompt: String,
    skip: String,
    branch: String,
    queue: String,
}

fn case() -> impl Strategy<Value = Case> {
    let dir = text(4).prop_map(|t| format!("d{}", t.replace('/', "_")));
    let names = prop::collection::btree_set(text(5), 6..9)
        .prop_map(|s| s.into_iter().filter(|n| !reserved(n)).collect::<Vec<_>>());
    (
        dir,
        names,
        text(5),
        text(5),
        text(5),
        text(3),
        text(3),
        text(3),
    )
        .prop_filter("needs three names", |c| c.1.len() >= 3)
        .prop_map(
            |(dir, names, step_name, step_label, prompt, skip, branch, queue)| Case {
                dir,
                names,
                step_name,
                step_label,
                prompt,
                // Buildkite's limit on skip reasons.
                skip: skip.chars().take(30).collect(),
                // A branch pattern has no blanks; data values that cannot
                // be uploaded are refused (tested on their own below).
                branch: branch
                    .replace(char::is_whitespace, "_")
                    .replace("\\$", "\\_$"),
                queue: queue.replace("\\$", "\\_$"),
            },
        )
}

/// A depot with the case's targets: the first name throws, the others
/// build; the second has a `needsOutput` extra step with a
/// `parentOverride`, and a gated release step with every text option.
fn write_depot(c: &Case) -> Depot {
    let depot = Depot::with_git();
    let mut nix = String::from(
        "{ depot, ... }:\nlet inherit (depot.nix.build) mkTarget writeScript; in\ndepot.nix.readTree.drvTargets {\n",
    );
    for (i, n) in c.names.iter().enumerate() {
        let (text, meta) = match i {
            0 => (format!("throw {}", nix_string(&thrown(n))), String::new()),
            1 => (
                nix_string(&format!("target {i}")),
                format!(
                    r#"meta.ci.extraSteps = {{
      {} = {{
        label = {};
        needsOutput = true;
        parentOverride = p: mkTarget {{ name = "ov{i}"; text = "override"; }};
        command = writeScript "x" "echo \"ran $(cat \"$DRVKITE_PARENT_OUTPUT\")\" >> \"$EXTRA_STEP_LOG\"\n";
      }};
      gate = {{
        phase = "release";
        prompt = {};
        skip = {};
        branches = [ "main" {} ];
        agents = {{ queue = {}; }};
        command = writeScript "g" "true\n";
      }};
    }};"#,
                    nix_string(&c.step_name),
                    nix_string(&c.step_label),
                    nix_string(&c.prompt),
                    nix_string(&c.skip),
                    nix_string(&c.branch),
                    nix_string(&c.queue),
                ),
            ),
            _ => (nix_string(&format!("target {i}")), String::new()),
        };
        nix.push_str(&format!(
            "  {} = mkTarget {{ name = \"h{i}\"; text = {text}; {meta} }};\n",
            nix_string(n)
        ));
    }
    nix.push_str("}\n");
    depot.write(&format!("hostile/{}/default.nix", c.dir), &nix);
    depot.commit("hostile");
    depot
}

/// What the broken target throws: its name between markers, on one line
/// (Nix's message is cut to one line).
fn thrown(name: &str) -> String {
    format!("boom<{}>end", name.replace(['\n', '\t', '\r'], " "))
}

fn all_steps(out: &Path) -> Vec<Value> {
    let mut steps = Vec::new();
    for (_, chunk) in read_pipeline(out) {
        steps.extend(
            common::schema::flatten(chunk["steps"].as_array().unwrap())
                .into_iter()
                .cloned(),
        );
    }
    steps
}

fn find<'a>(steps: &'a [Value], field: &str, want: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s[field].as_str() == Some(want))
        .unwrap_or_else(|| panic!("no step with {field} {want:?}"))
}

fn check(c: &Case) {
    let depot = write_depot(c);
    let (out, res) = run_pipeline(&depot, &[]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(3), "{stderr}");
    // Every chunk is read by the agent's YAML parser and interpolated;
    // any expansion or failure panics here.
    let steps = all_steps(&out);
    let map = read_json(&out.join("drvmap.json"));
    let label = |n: &str| format!("hostile/{}:{n}", c.dir);

    // Healthy targets: exact labels and READTREE_TARGET, or a failing
    // step when the label cannot be uploaded.
    for (i, n) in c.names.iter().enumerate().skip(1) {
        let l = label(n);
        if !uploadable(&l) {
            assert!(map.get(&l).is_none(), "{l:?} is in drvmap.json");
            let step = find(
                &steps,
                "label",
                &shown(&format!(":x: {l} cannot be uploaded")),
            );
            let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
            assert_eq!(res.status.code(), Some(1));
            let log = String::from_utf8(res.stderr).unwrap();
            assert!(
                log.starts_with(&format!("{} cannot be uploaded:\n", printable(&l))),
                "{log}"
            );
            continue;
        }
        let step = find(&steps, "label", &shown(&format!(":nix: {l}")));
        assert_eq!(step["env"]["READTREE_TARGET"], json!(l));
        let drv = map[l.as_str()]["drvPath"].as_str().unwrap().to_owned();
        let expected = output_paths(&drv).remove(0);
        // Without the .drv, the command evaluates the attribute path.
        ok(std::process::Command::new("nix-store").args(["--delete", &drv]));
        let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
        assert!(
            res.status.success(),
            "{l:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(String::from_utf8(res.stdout).unwrap().trim_end(), expected);
        assert_eq!(
            std::fs::read_to_string(&expected).unwrap(),
            format!("target {i}\n")
        );
    }

    // The extra steps of the second target.
    let parent = label(&c.names[1]);
    if uploadable(&parent) {
        let gear = shown(&format!(":gear: {} (from {parent})", c.step_label));
        let step = find(&steps, "label", &gear);
        let log = depot.out("extra.log");
        // Neither .drv is left: the script and the overridden parent are
        // built from their attribute paths, the step name through bash.
        let command = step["command"].as_str().unwrap();
        for drv in command.split('\'').filter(|w| w.ends_with(".drv")) {
            let _ = std::process::Command::new("nix-store")
                .args(["--delete", drv])
                .output();
        }
        let res = run_step(
            &depot.root,
            command,
            &[("EXTRA_STEP_LOG", log.to_str().unwrap())],
        );
        assert!(
            res.status.success(),
            "{gear:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran override\n");

        let group = find(&steps, "group", "gate");
        assert_eq!(group["skip"], json!(shown(&c.skip)));
        let block = &group["steps"][0];
        assert_eq!(block["prompt"], json!(shown(&c.prompt)));
        assert_eq!(
            block["block"],
            json!(shown(&format!(":radio_button: Run gate? (from {parent})")))
        );
        assert_eq!(block["branches"], json!(format!("main {}", c.branch)));
        let gated = &group["steps"][1];
        assert_eq!(gated["agents"], json!({ "queue": c.queue }));
        assert_eq!(gated["branches"], json!(format!("main {}", c.branch)));
    }

    // The broken target: its step prints the label and Nix's error, with
    // control characters escaped for the log, and fails.
    let broken = label(&c.names[0]);
    assert!(map.get(&broken).is_none());
    let step = find(
        &steps,
        "label",
        &shown(&format!(":x: {broken} failed to evaluate")),
    );
    let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
    assert_eq!(res.status.code(), Some(1));
    let log = String::from_utf8(res.stderr).unwrap();
    assert!(
        log.starts_with(&format!("{} failed to evaluate:\n", printable(&broken))),
        "{log}"
    );
    assert!(log.contains(&*printable(&thrown(&c.names[0]))), "{log}");

    // Nothing else ran, and the checkout is clean.
    for place in [depot.root.as_path(), depot.tmp.path(), Path::new(REPO)] {
        assert!(!place.join("PWNED").exists(), "injected in {place:?}");
    }
    assert_eq!(depot.git(&["status", "--porcelain"]), "");
}

proptest! {
    // Each case evaluates a depot and builds a few targets with Nix.
    #![proptest_config(ProptestConfig {
        cases: 6,
        max_shrink_iters: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_text_survives_the_upload_and_builds_the_right_attribute(c in case()) {
        check(&c);
    }
}

/// The reports that started this: each name on its own, through the same
/// checks.
#[test]
fn reported_names_survive_the_upload() {
    check(&Case {
        dir: "inj\\$BUILDKITE_MESSAGE".into(),
        names: vec![
            "bk\\$HOME".into(),
            "n\\$HOME".into(),
            "k${1}".into(),
            "m${NOPE?boom}".into(),
            "del\u{7f}c1\u{9b}".into(),
            "nel\u{85}x".into(),
            "ls\u{2028}ps\u{2029}bom\u{feff}".into(),
            "even\\\\$HOME".into(),
        ],
        step_name: "n\\$HOME".into(),
        step_label: "l\\$HOME".into(),
        prompt: "Deploy $HOME?".into(),
        skip: "skip \\$HOME".into(),
        branch: "x$HOME".into(),
        queue: "q$HOME".into(),
    });
    check(&Case {
        dir: "plain$BUILDKITE_MESSAGE".into(),
        names: vec![
            "bk\\$HOME".into(),
            "n\\$HOME".into(),
            "k${1}".into(),
            "nel\u{85}x".into(),
        ],
        step_name: "n\\$HOME".into(),
        step_label: "l$HOME".into(),
        prompt: "Deploy?".into(),
        skip: "later".into(),
        branch: "x$HOME".into(),
        queue: "q".into(),
    });
}

/// Data that no escaping can carry is refused with one line naming the
/// target and the option, and nothing is written.
#[test]
fn unuploadable_option_values_are_refused() {
    for (option, value) in [
        ("branches", r#"[ "x\\$HOME" ]"#),
        ("agents", r#"{ queue = "q\\$HOME"; }"#),
    ] {
        let depot = Depot::new();
        depot.write(
            "tools/opt.nix",
            &format!(
                r#"{{ depot, ... }}:
depot.nix.build.mkTarget {{
  name = "opt";
  meta.ci.extraSteps.s = {{ {option} = {value}; command = depot.nix.build.writeScript "s" "true"; }};
}}
"#
            ),
        );
        let (out, res) = run_pipeline(&depot, &[]);
        let err = one_line_failure(&res);
        assert!(err.contains("(from tools/opt)"), "{err}");
        assert!(
            err.contains(&format!("'{option}' cannot be uploaded")),
            "{err}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn the_model_follows_the_grammar() {
    use common::upload::{Env, interpolate, uploaded_text};
    let env: Env = [("A", "1"), ("E", ""), ("LONG", "abcdef")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let text = |s: &str| interpolate(s, &env).map(|i| i.text);
    assert_eq!(
        text("$A ${A} $$A \\$A \\\\ $(x) 1$ $ $-").unwrap(),
        "1 1 $A $A \\\\ $(x) 1$ $ $-"
    );
    assert_eq!(text("${E:-d} ${E-d} ${U-d} ${U:-${A}}").unwrap(), "d  d 1");
    assert_eq!(
        text("${LONG:1:2} ${LONG:-2} ${LONG%ef}").unwrap(),
        "bc ef abcd"
    );
    assert!(text("${U?boom}").unwrap_err().contains("boom"));
    assert!(text("${1}").is_err());
    assert!(text("${A").is_err());
    assert!(text("${A.b}").is_err());
    // A backslash pairs with the next backslash first.
    assert_eq!(text("\\\\$$A").unwrap(), "\\\\$A");
    assert_eq!(text("\\\\\\$A").unwrap(), "\\\\$A");
    assert!(uploaded_text("$$HOME").is_ok());
    assert!(uploaded_text("$HOME").is_err());
    assert!(uploaded_text("cost: 5$").is_err());
}
