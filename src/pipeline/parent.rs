//! The parent build's derivation map as the pipeline uses it: loading it,
//! refusing one that cannot be this depot's, and deciding per target
//! whether the parent built the same derivation.

use anyhow::Result;
use camino::Utf8Path;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::drvmap::DrvMap;
use crate::eval::Evaluation;
use crate::types::{DrvPath, Label};

/// The parent build's derivation map, or why there is none.
#[derive(Debug, Default, Clone)]
pub struct ParentMap {
    pub map: Option<DrvMap>,
    pub status: ParentStatus,
    /// Provenance written by `drvkite parent-map fetch` next to the map.
    pub source: Option<Value>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParentStatus {
    Used,
    #[default]
    None,
    Invalid,
}

impl ParentMap {
    /// Load a parent map. Anything wrong with it is a warning, never an
    /// error: without a trustworthy map everything is built, and nothing is
    /// skipped wrongly.
    pub fn load(path: Option<&Utf8Path>) -> (Self, Option<String>) {
        let Some(path) = path else {
            return (ParentMap::default(), None);
        };
        if !path.exists() {
            let msg = format!("parent map {path} does not exist: building every target");
            return (ParentMap::default(), Some(msg));
        }
        let source_path = format!("{path}.source.json");
        let source = std::fs::read(&source_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        match DrvMap::load(path) {
            Ok(map) => (
                ParentMap {
                    map: Some(map),
                    status: ParentStatus::Used,
                    source,
                },
                None,
            ),
            Err(e) => (
                ParentMap {
                    map: None,
                    status: ParentStatus::Invalid,
                    source,
                },
                Some(format!(
                    "ignoring the parent map: {e:#}; building every target"
                )),
            ),
        }
    }

    /// Refuse a map that cannot be this depot's: it names targets, this
    /// depot has targets, and not one label is in both (a map of another
    /// depot, or of a depot so changed that nothing could be skipped).
    /// Like any unusable map, it is a warning and everything is built.
    pub fn check_against(&mut self, path: &Utf8Path, eval: &Evaluation) -> Option<String> {
        let map = self.map.as_ref()?;
        let mut ours = eval
            .targets
            .iter()
            .map(|t| &t.label)
            .chain(eval.broken.iter().map(|b| &b.label))
            .peekable();
        if map.is_empty() || ours.peek().is_none() || ours.any(|l| map.get(l).is_some()) {
            return None;
        }
        let len = map.len();
        self.map = None;
        self.status = ParentStatus::Invalid;
        Some(format!(
            "ignoring the parent map {path}: none of its {len} labels is a target of this depot (is it another depot's map?); building every target"
        ))
    }

    /// Whether the parent built this target's derivation.
    pub fn unchanged(&self, label: &Label, drv: &DrvPath) -> bool {
        self.map
            .as_ref()
            .and_then(|m| m.get(label))
            .is_some_and(|e| &e.drv_path == drv)
    }
}

/// `--require-parent-map`: the reason the parent map cannot be used (a
/// warning from [`ParentMap`]) becomes an error.
pub fn require_parent_map(required: bool, given: bool, warning: &Option<String>) -> Result<()> {
    if !required {
        return Ok(());
    }
    if !given {
        anyhow::bail!(
            "--require-parent-map (DRVKITE_REQUIRE_PARENT_MAP) needs a parent map: pass --parent-map FILE; nothing was written"
        );
    }
    if let Some(w) = warning {
        // The warning's wording, less what no longer happens.
        let reason = w
            .strip_suffix("; building every target")
            .or_else(|| w.strip_suffix(": building every target"))
            .unwrap_or(w);
        let reason = match reason.strip_prefix("ignoring the parent map") {
            Some(rest) => format!("parent map{}", rest.strip_prefix(':').unwrap_or(rest)),
            None => reason.to_owned(),
        };
        anyhow::bail!(
            "{reason}; --require-parent-map fails the run rather than build every target: check --parent-map; nothing was written"
        );
    }
    Ok(())
}
