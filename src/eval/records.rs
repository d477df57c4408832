//! The shapes of what an evaluation reports: each target's record (as Nix
//! streams it on stderr), the headers of a listing, a run's stdout, and
//! the reading of streamed records in target-list order.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::Deserialize;

use crate::types::{AttrPath, DrvPath, Label};

/// One CI target as the evaluation reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub label: Label,
    pub attr_path: AttrPath,
    pub drv_path: DrvPath,
    pub outputs: Vec<String>,
    /// `meta.timeout`, in seconds.
    pub timeout: Option<f64>,
    pub extra_deps: Vec<serde_json::Value>,
    pub extra_step_args: Option<serde_json::Map<String, serde_json::Value>>,
    pub extra_steps: BTreeMap<String, RawExtraStep>,
    /// Its record held text that is not UTF-8 (a folder or attribute
    /// name, a string of its options), read with U+FFFD in its place: no
    /// step can carry it, so it is set aside as broken.
    #[serde(skip)]
    pub not_utf8: bool,
}

/// `meta.ci.extraSteps.<name>` as evaluated; validated by the pipeline stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawExtraStep {
    pub name: String,
    /// Set when the step is not an attribute set (the type Nix saw).
    pub not_an_attrset: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    pub command: Option<RawCommand>,
    /// The parent as `parentOverride` returns it.
    pub parent_override: Option<RawCommand>,
    #[serde(default)]
    pub values: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawCommand {
    pub drv_path: Option<DrvPath>,
    #[serde(default)]
    pub outputs: Vec<String>,
    pub not_a_derivation: Option<String>,
    /// Set when `parentOverride` is not a function (the type Nix saw).
    pub not_a_function: Option<String>,
}

/// A target whose evaluation failed, with Nix's error trimmed to one line.
#[derive(Debug, Clone)]
pub struct BrokenTarget {
    pub label: Label,
    pub attr_path: AttrPath,
    pub error: String,
    pub kind: BrokenKind,
}

/// What keeps a broken target from its steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BrokenKind {
    /// Its evaluation failed.
    #[default]
    Evaluation,
    /// It evaluated, but its label cannot pass through
    /// `buildkite-agent pipeline upload` unchanged.
    Unuploadable,
    /// A readTree node (a file) that failed before the target list could
    /// be evaluated: whatever targets it defines are missing.
    Node,
}

/// What one `nix-instantiate` run printed on stdout. In full mode the
/// records came on stderr (see `Stream`) and `targets` holds a `null` for
/// each; in labels mode it holds them.
#[derive(Debug, Deserialize)]
pub(super) struct RawStdout<T> {
    pub(super) targets: Vec<T>,
    pub(super) settings: Option<serde_json::Value>,
}

/// What one successful `nix-instantiate` run found.
#[derive(Debug, Default)]
pub(super) struct RawOutput {
    /// Full mode: one record per selected target, in order.
    pub(super) records: Vec<Record>,
    /// Labels mode: one header per selected target, in order.
    pub(super) headers: Vec<RawHeader>,
    pub(super) settings: Option<serde_json::Value>,
}

/// One target's record, as Nix streams it in full mode.
#[derive(Debug)]
pub(super) enum Record {
    Target(Box<Target>),
    /// tryEval caught an error: it says that the target failed, not why.
    Failed(RawHeader),
    /// It evaluated, but to values of the wrong type (say, a string
    /// `meta.timeout`): broken, with what is wrong.
    Invalid(RawHeader, String),
}

/// What is wrong in a target record that evaluated but does not read as
/// a [`Target`]: the first field of the wrong type, as the depot names it.
fn invalid_record(text: &str, error: &serde_json::Error) -> Option<Record> {
    use serde::de::DeserializeOwned;
    fn wrong<T: DeserializeOwned>(record: &serde_json::Value, field: &str) -> Option<String> {
        let value = record.get(field)?;
        serde_json::from_value::<T>(value.clone()).err().map(|_| {
            crate::pipeline::text::printable(&value.to_string())
                .chars()
                .take(100)
                .collect()
        })
    }
    let record: serde_json::Value = serde_json::from_str(text).ok()?;
    let header: RawHeader = serde_json::from_value(record.clone()).ok()?;
    let problem = if let Some(v) = wrong::<Option<f64>>(&record, "timeout") {
        format!("meta.timeout must be a number of seconds, not {v}")
    } else if let Some(v) =
        wrong::<Option<serde_json::Map<String, serde_json::Value>>>(&record, "extraStepArgs")
    {
        format!("meta.ci.buildkiteExtraStepArgs must be an attribute set of step fields, not {v}")
    } else if let Some(v) = wrong::<Vec<serde_json::Value>>(&record, "extraDeps") {
        format!("meta.ci.buildkiteExtraDeps must be a list of step keys, not {v}")
    } else if let Some(v) = wrong::<Vec<String>>(&record, "outputs") {
        format!("its outputs must be a list of output names, not {v}")
    } else if let Some(v) = wrong::<DrvPath>(&record, "drvPath") {
        format!("its drvPath must be the store path of a .drv file, not {v}")
    } else {
        format!("drvkite cannot read what it evaluated for it ({error})")
    };
    Some(Record::Invalid(header, problem))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawHeader {
    pub(super) label: Label,
    pub(super) attr_path: AttrPath,
}

/// Records read from one run's stderr while it evaluates, with their
/// index in the run's target list.
#[derive(Debug, Default)]
pub(super) struct Stream {
    pub(super) records: Vec<(usize, Record)>,
    /// The first record that did not parse; reported if the run succeeds.
    pub(super) error: Option<String>,
}

impl Stream {
    /// Parse `ok <index> <JSON>` or `failed <index> <JSON>`. Nix prints
    /// names as the bytes they are, and a folder name need not be UTF-8:
    /// such a record is read with U+FFFD in place of the bad bytes and its
    /// target marked, rather than failing the whole run.
    pub(super) fn add(&mut self, line: &[u8]) -> Option<&Record> {
        let parsed = (|| {
            let mut parts = line.splitn(3, |b| *b == b' ');
            let (kind, index, json) = (parts.next()?, parts.next()?, parts.next()?);
            let index: usize = std::str::from_utf8(index).ok()?.parse().ok()?;
            let text = String::from_utf8_lossy(json);
            let record = match kind {
                b"ok" => match serde_json::from_str::<Target>(&text) {
                    Ok(mut target) => {
                        target.not_utf8 = matches!(text, std::borrow::Cow::Owned(_));
                        Record::Target(Box::new(target))
                    }
                    // One target's wrong values must not fail the run.
                    Err(e) => invalid_record(&text, &e)?,
                },
                b"failed" => Record::Failed(serde_json::from_str(&text).ok()?),
                _ => return None,
            };
            Some((index, record))
        })();
        match parsed {
            Some(r) => {
                self.records.push(r);
                self.records.last().map(|(_, r)| r)
            }
            None => {
                if self.error.is_none() {
                    let text = String::from_utf8_lossy(line);
                    let cut: String = text.chars().take(200).collect();
                    self.error = Some(format!("unreadable target record: {cut}"));
                }
                None
            }
        }
    }

    /// The records of a run that listed `count` targets, in order: exactly
    /// one for each.
    pub(super) fn into_ordered(mut self, count: usize) -> Result<Vec<Record>> {
        if let Some(e) = self.error {
            bail!("unexpected output from drvkite's Nix expression: {e}");
        }
        self.records.sort_unstable_by_key(|(i, _)| *i);
        if self.records.len() != count || self.records.iter().enumerate().any(|(n, (i, _))| n != *i)
        {
            bail!(
                "unexpected output from drvkite's Nix expression: {} target records for {count} targets",
                self.records.len()
            );
        }
        Ok(self.records.into_iter().map(|(_, r)| r).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_records_count_once_each_in_list_order() {
        let drv = "/nix/store/0c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-a.drv";
        let ok = |i: usize, label: &str| {
            format!(
                r#"ok {i} {{"label":"{label}","attrPath":["{label}"],"drvPath":"{drv}","outputs":["out"],"timeout":null,"extraDeps":[],"extraStepArgs":null,"extraSteps":{{}}}}"#
            )
        };
        let failed = r#"failed 1 {"label":"b","attrPath":["b"]}"#;
        let stream = |lines: &[&str]| {
            let mut s = Stream::default();
            for l in lines {
                s.add(l.as_bytes());
            }
            s
        };
        let (a, c) = (ok(0, "a"), ok(2, "c"));
        let labels: Vec<String> = stream(&[&c, failed, &a])
            .into_ordered(3)
            .unwrap()
            .iter()
            .map(|r| match r {
                Record::Target(t) => format!("ok {}", t.label),
                Record::Failed(h) => format!("failed {}", h.label),
                Record::Invalid(h, _) => format!("invalid {}", h.label),
            })
            .collect();
        assert_eq!(labels, ["ok a", "failed b", "ok c"]);
        // One missing, one twice, one more than listed, one unreadable:
        // each is an error, never a silently different list.
        let twice = ok(0, "a");
        for (lines, count) in [
            (vec![a.as_str(), c.as_str()], 3),
            (vec![a.as_str(), twice.as_str(), c.as_str()], 3),
            (vec![a.as_str(), failed, c.as_str()], 2),
            (vec![a.as_str(), "failed 1 {\"label\":", c.as_str()], 3),
            (vec![a.as_str(), "ok x {}", c.as_str()], 3),
        ] {
            let err = stream(&lines).into_ordered(count).unwrap_err().to_string();
            assert!(
                err.starts_with("unexpected output from drvkite's Nix expression"),
                "{err}"
            );
        }
    }
}
