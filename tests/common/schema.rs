//! Checks every generated pipeline must pass: Buildkite's JSON schema, and
//! what the schema cannot see (unique keys, dependencies that exist).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

fn schema_path() -> PathBuf {
    match std::env::var_os("DRVKITE_PIPELINE_SCHEMA") {
        Some(p) => PathBuf::from(p),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/buildkite/pipeline-schema.json")
        }
    }
}

fn validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let path = schema_path();
        // A missing schema fails the test: skipping would let invalid
        // pipelines pass unnoticed.
        let text = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the Buildkite pipeline schema {} ({e}): set DRVKITE_PIPELINE_SCHEMA to its path",
                path.display()
            )
        });
        let schema: Value = serde_json::from_slice(&text).expect("the schema is JSON");
        jsonschema::draft7::new(&schema).expect("the schema compiles")
    })
}

/// Panic with every schema error when `v` is not a valid pipeline.
pub fn validate_pipeline(v: &Value) {
    let errors: Vec<String> = validator()
        .iter_errors(v)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "pipeline does not match Buildkite's schema:\n{}\n{}",
        errors.join("\n"),
        serde_json::to_string_pretty(v).unwrap()
    );
}

/// Every step, with group members after their group.
pub fn flatten(steps: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for s in steps {
        out.push(s);
        if let Some(inner) = s.get("steps").and_then(Value::as_array) {
            out.extend(flatten(inner));
        }
    }
    out
}

/// Keys are unique across all chunks, and every `depends_on` names a step
/// of the pipeline or the bootstrap step.
pub fn check_keys(chunks: &[Value], bootstrap: &str) {
    let steps: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| flatten(c["steps"].as_array().expect("a chunk has steps")))
        .collect();
    let mut keys = HashSet::new();
    for s in &steps {
        if let Some(k) = s.get("key").and_then(Value::as_str) {
            assert!(keys.insert(k), "duplicate step key {k}");
        }
    }
    for s in &steps {
        let deps = match s.get("depends_on") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(d)) => vec![d.as_str()],
            Some(Value::Array(a)) => a.iter().map(|d| d.as_str().expect("string key")).collect(),
            Some(other) => panic!("unexpected depends_on {other}"),
        };
        for d in deps {
            assert!(
                d == bootstrap || keys.contains(d),
                "{} depends on {d}, which is not a step of the pipeline",
                s.get("label").or(s.get("group")).unwrap_or(&Value::Null)
            );
        }
    }
}

/// Read a pipeline folder through its manifest: every chunk is checked
/// with [`validate_pipeline`] and all of them with [`check_keys`].
/// Returns (phase, chunk) pairs.
pub fn read_pipeline(dir: &Path) -> Vec<(String, Value)> {
    let manifest = super::read_json(&dir.join("manifest.json"));
    let mut chunks = Vec::new();
    for phase in manifest["phases"].as_array().expect("phases") {
        for name in phase["chunks"].as_array().expect("chunks") {
            let chunk = super::read_json(&dir.join(name.as_str().unwrap()));
            validate_pipeline(&chunk);
            chunks.push((phase["name"].as_str().unwrap().to_owned(), chunk));
        }
    }
    let all: Vec<Value> = chunks.iter().map(|(_, c)| c.clone()).collect();
    check_keys(&all, ":init:");
    chunks
}
