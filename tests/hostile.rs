//! Hostile input, property-based: random attribute names full of shell and
//! Buildkite syntax go through real Nix, `drvkite pipeline`, and the
//! generated commands run by real bash in a git checkout; and the
//! derivation map reader takes arbitrary bytes.

mod common;

use std::path::Path;

use common::schema::read_pipeline;
use common::*;
use drvkite::drvmap::{DrvMap, Entry};
use drvkite::types::{AttrPath, Label};
use proptest::prelude::*;
use serde_json::json;

/// Pieces of names: quoting, expansion and injection attempts, whitespace,
/// non-ASCII, and plain text.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("\\".to_owned()),
        Just("`touch PWNED`".to_owned()),
        Just("$(touch PWNED)".to_owned()),
        Just("'; touch PWNED; '".to_owned()),
        Just("\"; touch PWNED; \"".to_owned()),
        Just("$HOME".to_owned()),
        Just("${HOME}".to_owned()),
        Just("${".to_owned()),
        Just("$$".to_owned()),
        Just("$".to_owned()),
        Just(" ".to_owned()),
        Just("\n".to_owned()),
        Just("\t".to_owned()),
        Just(";|&<>*?~#!{}[]()".to_owned()),
        Just("--help".to_owned()),
        Just(":".to_owned()),
        Just("/".to_owned()),
        Just("é".to_owned()),
        Just("日本".to_owned()),
        Just("🦀".to_owned()),
        Just("\u{202e}".to_owned()),
        "[a-zA-Z0-9]{1,4}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 1..6).prop_map(|parts| parts.concat())
}

/// Names readTree or Nix give a meaning of their own.
fn reserved(name: &str) -> bool {
    name.starts_with("__")
        || ["meta", "type", "outPath", "drvPath", "outputs", "name"].contains(&name)
}

/// One batch: a hostile folder name and distinct hostile subtarget names.
fn batch() -> impl Strategy<Value = (String, Vec<String>)> {
    let dir = prop::collection::vec(fragment(), 1..4)
        .prop_map(|parts| format!("d{}", parts.concat().replace('/', "_")));
    let names = prop::collection::btree_set(name(), 16..22)
        .prop_map(|set| set.into_iter().filter(|n| !reserved(n)).collect::<Vec<_>>());
    (dir, names).prop_filter("needs a broken and a healthy name", |(_, n)| n.len() >= 2)
}

/// What the broken target throws: its name on one line (Nix's message is
/// cut to one line) between markers.
fn thrown(name: &str) -> String {
    format!("boom<{}>end", name.replace(['\n', '\t', '\r'], " "))
}

fn check_batch(dir: &str, names: &[String]) {
    let depot = Depot::with_git();
    // The first name throws; the others are healthy, each its own drv.
    let mut text = String::from("{ depot, ... }:\ndepot.nix.readTree.drvTargets {\n");
    for (i, n) in names.iter().enumerate() {
        let value = if i == 0 {
            format!("throw {}", nix_string(&thrown(n)))
        } else {
            nix_string(&format!("target {i}"))
        };
        // The second target has an extra step named and labelled after
        // the next names.
        let meta = if i == 1 {
            format!(
                "meta.ci.extraSteps.{} = {{ label = {}; command = depot.nix.build.writeScript \"x\" \"echo ran >> \\\"\\$EXTRA_STEP_LOG\\\"\\n\"; }};",
                nix_string(&names[2 % names.len()]),
                nix_string(&names[3 % names.len()])
            )
        } else {
            String::new()
        };
        text.push_str(&format!(
            "  {} = depot.nix.build.mkTarget {{ name = \"h{i}\"; text = {value}; {meta} }};\n",
            nix_string(n)
        ));
    }
    text.push_str("}\n");
    depot.write(&format!("hostile/{dir}/default.nix"), &text);
    depot.commit("hostile");

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
    assert_eq!(res.status.code(), Some(3), "{stderr}");
    read_pipeline(&out);
    let build = phases(&out).remove(0).1;
    let map = read_json(&out.join("drvmap.json"));

    for (i, n) in names.iter().enumerate().skip(1) {
        let label = format!("hostile/{dir}:{n}");
        assert_eq!(
            map[label.as_str()]["attrPath"],
            json!(["hostile", dir, n]),
            "{label:?}"
        );
        let step = build_step(&build, &label);
        assert_eq!(
            uninterpolate(step["label"].as_str().unwrap()),
            format!(":nix: {label}")
        );
        let drv = map[label.as_str()]["drvPath"].as_str().unwrap().to_owned();
        assert!(drv.ends_with(&format!("-h{i}.drv")), "{label:?}: {drv}");
        let expected = output_paths(&drv).remove(0);
        // Without the .drv the command evaluates the attribute path: the
        // name goes through bash and Nix.
        ok(std::process::Command::new("nix-store").args(["--delete", &drv]));
        let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
        assert!(
            res.status.success(),
            "{label:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(
            String::from_utf8(res.stdout).unwrap().trim_end(),
            expected,
            "{label:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&expected).unwrap(),
            format!("target {i}\n"),
            "{label:?}"
        );
    }

    // The extra step runs its script, once.
    let want = format!(
        ":gear: {} (from hostile/{dir}:{})",
        names[3 % names.len()],
        names[1]
    );
    let extra = phases(&out)
        .into_iter()
        .flat_map(|(_, steps)| steps)
        .find(|s| s["label"].as_str().map(uninterpolate).as_deref() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no extra step {want:?}"));
    let log = depot.out("extra.log");
    let res = run_step(
        &depot.root,
        extra["command"].as_str().unwrap(),
        &[("EXTRA_STEP_LOG", log.to_str().unwrap())],
    );
    assert!(
        res.status.success(),
        "{want:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n");

    // The broken one: its step prints the error as it is, and fails.
    let broken = format!("hostile/{dir}:{}", names[0]);
    assert!(map.get(&broken).is_none());
    let want = format!(":x: {broken} failed to evaluate");
    let step = build
        .iter()
        .find(|s| s["label"].as_str().map(uninterpolate).as_deref() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no failing step {want:?}"));
    let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
    assert_eq!(res.status.code(), Some(1));
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(
        log.starts_with(&format!("{broken} failed to evaluate:\n")),
        "{log}"
    );
    assert!(log.contains(&thrown(&names[0])), "{log}");

    // Nothing was executed: no canary, a clean checkout.
    for place in [depot.root.as_path(), depot.tmp.path(), Path::new(REPO)] {
        assert!(!place.join("PWNED").exists(), "injected in {place:?}");
    }
    assert_eq!(depot.git(&["status", "--porcelain"]), "");
}

proptest! {
    // Each case evaluates a depot and builds a dozen targets with Nix.
    #![proptest_config(ProptestConfig {
        cases: 3,
        max_shrink_iters: 4,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_names_build_the_right_attribute_and_run_nothing((dir, names) in batch()) {
        check_batch(&dir, &names);
    }
}

// ---------------------------------------------------------------------------
// The derivation map reader.

const NIXBASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn drv_path() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(0..NIXBASE32.len(), 32),
        "[a-zA-Z0-9+._?=-]{1,12}",
    )
        .prop_map(|(hash, name)| {
            let hash: String = hash.into_iter().map(|i| NIXBASE32[i] as char).collect();
            format!("/nix/store/{hash}-{name}.drv")
        })
}

fn valid_map() -> impl Strategy<Value = DrvMap> {
    prop::collection::vec(
        (
            any::<String>(),
            prop::collection::vec(any::<String>(), 1..4),
            drv_path(),
        ),
        0..6,
    )
    .prop_map(|entries| {
        DrvMap::from_entries(entries.into_iter().map(|(label, parts, drv)| {
            (
                Label::new(label),
                Entry {
                    attr_path: AttrPath::new(parts),
                    drv_path: drv.parse().unwrap(),
                },
            )
        }))
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Repeat(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), 1..40usize).prop_map(|(i, n)| Mutation::Repeat(i, n)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match *m {
        Mutation::Truncate(i) => bytes.truncate(at(i, bytes.len() + 1)),
        Mutation::Flip(i, b) if !bytes.is_empty() => {
            let i = at(i, bytes.len());
            bytes[i] ^= b;
        }
        Mutation::Insert(i, b) => bytes.insert(at(i, bytes.len() + 1), b),
        Mutation::Delete(i) if !bytes.is_empty() => {
            bytes.remove(at(i, bytes.len()));
        }
        Mutation::Repeat(i, n) if !bytes.is_empty() => {
            let i = at(i, bytes.len());
            let end = (i + n).min(bytes.len());
            let piece = bytes[i..end].to_vec();
            bytes.splice(i..i, piece);
        }
        _ => {}
    }
}

/// Parses, or fails with one line; what parses writes back the same.
fn parse_or_one_line_error(bytes: &[u8]) -> Result<(), TestCaseError> {
    match DrvMap::parse(bytes) {
        Ok(map) => {
            let again = DrvMap::parse(map.to_tvl_json().as_bytes())
                .map_err(|e| TestCaseError::fail(format!("re-parse: {e:#}")))?;
            prop_assert_eq!(again, map);
        }
        Err(e) => {
            let msg = format!("{e:#}");
            prop_assert!(!msg.is_empty() && !msg.contains('\n'), "{:?}", msg);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn drvmap_reader_takes_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        parse_or_one_line_error(&bytes)?;
    }

    #[test]
    fn drvmap_reader_takes_mutated_maps(map in valid_map(), ms in prop::collection::vec(mutation(), 1..5)) {
        let text = map.to_tvl_json();
        prop_assert_eq!(&DrvMap::parse(text.as_bytes()).unwrap(), &map);
        let mut bytes = text.into_bytes();
        for m in &ms {
            mutate(&mut bytes, m);
        }
        parse_or_one_line_error(&bytes)?;
    }

    #[test]
    fn drvmap_reader_takes_json_of_other_shapes(v in json_value()) {
        parse_or_one_line_error(v.to_string().as_bytes())?;
    }
}

/// Arbitrary JSON, shaped a little like a map: objects of objects with the
/// right keys now and then.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        drv_path().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let key = prop_oneof![
            Just("attrPath".to_owned()),
            Just("drvPath".to_owned()),
            any::<String>()
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key, inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn a_line_break_in_a_label_keeps_the_error_on_one_line() {
    let depot = Depot::new();
    depot.write(
        "tools/nl.nix",
        r#"{ depot, ... }:
depot.nix.readTree.drvTargets {
  "line\nbreak" = depot.nix.build.mkTarget {
    name = "nl";
    meta.ci.extraSteps.ask = { prompt = "Sure?"; command = depot.nix.build.writeScript "s" "true"; };
  };
}
"#,
    );
    let out = depot.out("pipeline");
    let err = one_line_failure(
        &drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains(r"(from tools/nl:line\nbreak): 'prompt' cannot be used in the build phase"),
        "{err}"
    );
    assert!(!out.exists());
}
