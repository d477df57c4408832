//! Hostile input: the derivation map reader takes arbitrary bytes, and a
//! line break in a label keeps errors on one line. (Hostile names through
//! Nix, the upload and bash: tests/upload.rs.)

mod common;

use common::*;
use drvkite::drvmap::{DrvMap, Entry};
use drvkite::types::{AttrPath, Label};
use proptest::prelude::*;

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
