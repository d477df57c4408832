//! Validation of generated pipeline files against Buildkite's published
//! JSON schema, plus the checks the schema cannot express.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::Value;

/// Where the schema lives: beside the repository in CI (`../shared`), or
/// wherever DRVKITE_PIPELINE_SCHEMA points.
pub fn schema_path() -> PathBuf {
    match std::env::var_os("DRVKITE_PIPELINE_SCHEMA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(super::REPO).join("../shared/buildkite/pipeline-schema.json"),
    }
}

/// Panic unless `pipeline` is valid. A missing schema fails the test: a
/// validation that silently does not run proves nothing.
pub fn validate_pipeline(pipeline: &Value) {
    let path = schema_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "Buildkite pipeline schema not found at {}: {e} (set DRVKITE_PIPELINE_SCHEMA)",
            path.display()
        )
    });
    let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
    let validator = jsonschema::draft7::new(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(pipeline)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "pipeline does not match the schema:\n{}",
        errors.join("\n")
    );
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
