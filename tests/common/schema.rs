//! Checking pipelines against Buildkite's JSON schema
//! (`shared/buildkite/pipeline-schema.json`, beside the repository).
//!
//! Outside CI a missing schema file skips the check with a note; with
//! `CI=true` it fails the test, so CI never passes without checking.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

/// `$DRVKITE_PIPELINE_SCHEMA`, or `../shared/buildkite/pipeline-schema.json`
/// relative to the crate.
pub fn schema_path() -> PathBuf {
    match std::env::var_os("DRVKITE_PIPELINE_SCHEMA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(super::REPO).join("../shared/buildkite/pipeline-schema.json"),
    }
}

fn validator() -> Option<&'static jsonschema::Validator> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let path = schema_path();
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
                    assert!(
                        !in_ci,
                        "the Buildkite pipeline schema {} cannot be read ({e}): CI must check \
                         pipelines against it (set DRVKITE_PIPELINE_SCHEMA to its path)",
                        path.display()
                    );
                    eprintln!(
                        "note: {} is missing ({e}); pipelines are not checked against the schema",
                        path.display()
                    );
                    return None;
                }
            };
            let schema: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            let v = jsonschema::draft7::new(&schema)
                .unwrap_or_else(|e| panic!("{} is not a usable schema: {e}", path.display()));
            Some(v)
        })
        .as_ref()
}

/// The schema's complaints about a pipeline (empty when valid), or None
/// when the schema is missing outside CI.
pub fn pipeline_errors(value: &Value) -> Option<Vec<String>> {
    let v = validator()?;
    Some(
        v.iter_errors(value)
            .map(|e| format!("at {}: {e}", e.instance_path()))
            .collect(),
    )
}

/// Panics, listing every complaint, unless `value` is a valid Buildkite
/// pipeline (a whole pipeline or an uploaded chunk, `{"steps": [...]}`).
pub fn validate_pipeline(value: &Value) {
    if let Some(errors) = pipeline_errors(value) {
        assert!(
            errors.is_empty(),
            "pipeline does not match the Buildkite schema:\n{}",
            errors.join("\n")
        );
    }
}

/// A pipeline file (YAML, or JSON which is YAML too) as JSON.
pub fn read_pipeline_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}
/// All step keys in a list of steps, groups included.
pub fn keys(steps: &[Value], out: &mut Vec<String>) {
    for s in steps {
        if let Some(k) = s.get("key").and_then(Value::as_str) {
            out.push(k.to_owned());
        }
        if let Some(inner) = s.get("steps").and_then(Value::as_array) {
            keys(inner, out);
        }
    }
}

/// Keys are unique and every `depends_on` names a step of the pipeline or
/// one of `external` (static steps such as `:init:`).
pub fn check_references(steps: &[Value], external: &[&str]) {
    let mut all = Vec::new();
    keys(steps, &mut all);
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "duplicate step keys: {all:?}");
    let mut stack: Vec<&Value> = steps.iter().collect();
    while let Some(s) = stack.pop() {
        let deps = match s.get("depends_on") {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::String(d)) => vec![Value::String(d.clone())],
            _ => Vec::new(),
        };
        for d in deps {
            let d = d
                .as_str()
                .map(str::to_owned)
                .or_else(|| d.get("step").and_then(Value::as_str).map(str::to_owned))
                .unwrap();
            assert!(
                unique.contains(&d) || external.contains(&d.as_str()),
                "depends_on {d:?} names no step"
            );
        }
        if let Some(inner) = s.get("steps").and_then(Value::as_array) {
            stack.extend(inner.iter());
        }
    }
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

/// Read a pipeline folder through its manifest, each chunk as the agent
/// uploads it ([`super::upload::upload_file`]): every chunk is checked
/// with [`validate_pipeline`] and all of them with [`check_keys`].
/// Returns (phase, chunk) pairs.
pub fn read_pipeline(dir: &Path) -> Vec<(String, Value)> {
    let manifest = super::read_json(&dir.join("manifest.json"));
    let mut chunks = Vec::new();
    for phase in manifest["phases"].as_array().expect("phases") {
        for name in phase["chunks"].as_array().expect("chunks") {
            let chunk = super::upload::upload_file(&dir.join(name.as_str().unwrap()));
            validate_pipeline(&chunk);
            chunks.push((phase["name"].as_str().unwrap().to_owned(), chunk));
        }
    }
    let all: Vec<Value> = chunks.iter().map(|(_, c)| c.clone()).collect();
    check_keys(&all, ":init:");
    chunks
}
