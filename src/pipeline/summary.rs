//! `summary.json`: what a generated pipeline holds, for the last line of
//! `drvkite pipeline` and for `drvkite annotate`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ParentStatus;
use crate::types::Label;

/// `summary.json`, which `drvkite annotate` reads back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub version: u32,
    pub targets: usize,
    pub changed: Vec<Label>,
    pub unchanged: usize,
    pub added: Vec<Label>,
    pub removed: Vec<Label>,
    pub broken: Vec<BrokenSummary>,
    pub extra_steps: usize,
    pub steps: BTreeMap<String, usize>,
    pub evaluation_seconds: f64,
    pub parent_map: ParentSummary,
    /// Targets skipped because a binary cache has them (`--skip-cached`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached: Vec<CachedSummary>,
    /// The binary cache check, when it was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_check: Option<crate::substitute::CheckSummary>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CachedSummary {
    pub label: Label,
    pub cache: String,
}

impl Summary {
    /// The counts for the line `drvkite pipeline` ends with. Without a
    /// usable parent map nothing "changed": every target is to build.
    pub fn counts(&self, chunk_files: usize) -> String {
        let targets = match self.parent_map.status {
            ParentStatus::Used => format!(
                "{}, {} changed, {} unchanged",
                counted(self.targets, "target"),
                self.changed.len(),
                self.unchanged
            ),
            ParentStatus::None | ParentStatus::Invalid => format!(
                "{}, {} to build (no usable parent map)",
                counted(self.targets, "target"),
                self.changed.len()
            ),
        };
        // Only when the check was on (bench/run.py reads "N cached, ").
        let cached = match &self.cache_check {
            Some(_) => format!(", {} cached", self.cached.len()),
            None => String::new(),
        };
        format!(
            "{}; {targets}{cached}, {}, {} broken; evaluation {:.1}s",
            counted(chunk_files, "chunk file"),
            counted(self.extra_steps, "extra step"),
            self.broken.len(),
            self.evaluation_seconds
        )
    }
}

/// "1 thing", "2 things".
pub fn counted(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BrokenSummary {
    pub label: Label,
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ParentSummary {
    pub status: ParentStatus,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub source: Option<Value>,
}
