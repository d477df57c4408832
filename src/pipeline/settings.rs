//! Pipeline settings: defaults, then the depot's settings attribute, then
//! command-line flags (the last one set wins).

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Buildkite accepts at most 500 jobs per `pipeline upload`.
pub const MAX_CHUNK_SIZE: usize = 500;
/// TVL's chunk size: small enough that uploads do not time out.
pub const DEFAULT_CHUNK_SIZE: usize = 192;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub phases: Vec<String>,
    pub active_phases: Vec<String>,
    pub cancel_on_build_failing: bool,
    pub default_step_overrides: Map<String, Value>,
    pub additional_steps: Vec<Value>,
    pub post_build_steps: Vec<Value>,
    pub chunk_size: usize,
    pub bootstrap_key: String,
    /// Folder for the out-links (GC roots) generated commands create;
    /// `None`: the checkout root, with TVL's names. Relative paths are taken
    /// from the depot root, where steps run.
    pub out_link_dir: Option<String>,
    /// Skip targets whose outputs a binary cache has (`--skip-cached`).
    pub skip_cached: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            phases: vec!["build".into(), "release".into()],
            active_phases: vec!["build".into(), "release".into()],
            cancel_on_build_failing: false,
            default_step_overrides: Map::new(),
            additional_steps: Vec::new(),
            post_build_steps: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            bootstrap_key: ":init:".into(),
            out_link_dir: None,
            skip_cached: false,
        }
    }
}

/// Settings as the depot's attribute or the flags give them: every field
/// optional, unknown fields refused (a typo must not be silently ignored).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Overrides {
    pub phases: Option<Vec<String>>,
    pub active_phases: Option<Vec<String>>,
    pub cancel_on_build_failing: Option<bool>,
    pub default_step_overrides: Option<Map<String, Value>>,
    pub additional_steps: Option<Vec<Value>>,
    pub post_build_steps: Option<Vec<Value>>,
    pub chunk_size: Option<usize>,
    pub bootstrap_key: Option<String>,
    pub out_link_dir: Option<String>,
    pub skip_cached: Option<bool>,
}

impl Overrides {
    pub fn from_depot(value: &Value, attr: &str) -> Result<Self> {
        serde_json::from_value(value.clone())
            .with_context(|| format!("the depot's pipeline settings ({attr}) are not valid: fix the attribute (see docs/commands.md, \"Pipeline settings from the depot\")"))
    }
}

impl Settings {
    /// Apply overrides on top; `active_phases` follows `phases` unless set.
    pub fn apply(mut self, o: Overrides) -> Self {
        let phases_changed = o.phases.is_some();
        if let Some(p) = o.phases {
            self.phases = p;
        }
        match o.active_phases {
            Some(a) => self.active_phases = a,
            None if phases_changed => self.active_phases = self.phases.clone(),
            None => {}
        }
        if let Some(v) = o.cancel_on_build_failing {
            self.cancel_on_build_failing = v;
        }
        if let Some(v) = o.default_step_overrides {
            self.default_step_overrides = v;
        }
        if let Some(v) = o.additional_steps {
            self.additional_steps = v;
        }
        if let Some(v) = o.post_build_steps {
            self.post_build_steps = v;
        }
        if let Some(v) = o.chunk_size {
            self.chunk_size = v;
        }
        if let Some(v) = o.bootstrap_key {
            self.bootstrap_key = v;
        }
        if let Some(v) = o.out_link_dir {
            self.out_link_dir = Some(v);
        }
        if let Some(v) = o.skip_cached {
            self.skip_cached = v;
        }
        self
    }

    /// Refuse settings TVL would silently accept or mangle.
    pub fn validate(&self) -> Result<()> {
        if self.phases.is_empty() {
            bail!("no phases configured: set at least one phase (e.g. --phases build,release)");
        }
        for p in &self.phases {
            if p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!(
                    "phase name {p:?} is not valid: use letters, digits, - and _ (it names chunk files)"
                );
            }
        }
        for a in &self.active_phases {
            if !self.phases.contains(a) {
                bail!(
                    "active phase {a:?} is not a known phase (known: {}): fix --active-phases or add it to --phases",
                    self.phases.join(", ")
                );
            }
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            bail!(
                "chunk size {} is out of range: use 1 to {MAX_CHUNK_SIZE} (Buildkite's limit of jobs per upload)",
                self.chunk_size
            );
        }
        if self.bootstrap_key.is_empty() {
            bail!(
                "the bootstrap step key is empty: pass the key of the step that runs drvkite's pipeline upload's parent (e.g. :init:)"
            );
        }
        if let Some(dir) = &self.out_link_dir
            && (dir.is_empty() || dir.contains(['\n', '\0']))
        {
            bail!(
                "the out-link folder {dir:?} is not a usable path: give a folder such as .git/drvkite-roots (--out-link-dir, outLinkDir)"
            );
        }
        Ok(())
    }

    /// Where a generated command puts the out-link `name`: in the checkout
    /// root (TVL's place), or in the configured GC root folder.
    pub fn out_link(&self, name: &str) -> String {
        match &self.out_link_dir {
            None => name.to_owned(),
            Some(dir) => format!("{}/{name}", dir.trim_end_matches('/')),
        }
    }

    /// Enabled phases in `phases` order.
    pub fn enabled_phases(&self) -> Vec<&str> {
        self.phases
            .iter()
            .filter(|p| self.active_phases.contains(p))
            .map(String::as_str)
            .collect()
    }

    pub fn build_enabled(&self) -> bool {
        self.active_phases.iter().any(|p| p == "build") && self.phases.iter().any(|p| p == "build")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_depot_which_overrides_defaults() {
        let depot = Overrides::from_depot(
            &serde_json::json!({"phases": ["build", "release", "deploy"], "chunkSize": 100}),
            "ci.drvkite",
        )
        .unwrap();
        let flags = Overrides {
            chunk_size: Some(50),
            ..Default::default()
        };
        let s = Settings::default().apply(depot).apply(flags);
        assert_eq!(s.chunk_size, 50);
        assert_eq!(s.phases, ["build", "release", "deploy"]);
        assert_eq!(s.active_phases, s.phases);
        s.validate().unwrap();
        // A flag can turn off what the depot turns on.
        let depot =
            Overrides::from_depot(&serde_json::json!({"skipCached": true}), "ci.drvkite").unwrap();
        assert!(Settings::default().apply(depot.clone()).skip_cached);
        let off = Overrides {
            skip_cached: Some(false),
            ..Default::default()
        };
        assert!(!Settings::default().apply(depot).apply(off).skip_cached);
    }

    #[test]
    fn rejects_unknown_phase_and_bad_chunk_size() {
        let s = Settings::default().apply(Overrides {
            active_phases: Some(vec!["deploy".into()]),
            ..Default::default()
        });
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("\"deploy\" is not a known phase")
        );
        for n in [0, 501] {
            let s = Settings {
                chunk_size: n,
                ..Default::default()
            };
            assert!(s.validate().is_err());
        }
        assert!(Overrides::from_depot(&serde_json::json!({"chunksize": 3}), "ci.drvkite").is_err());
    }

    #[test]
    fn out_link_dir_places_out_links() {
        assert_eq!(Settings::default().out_link("result"), "result");
        let depot = Overrides::from_depot(
            &serde_json::json!({"outLinkDir": ".git/drvkite-roots/"}),
            "ci.drvkite",
        )
        .unwrap();
        let s = Settings::default().apply(depot);
        s.validate().unwrap();
        assert_eq!(s.out_link("result"), ".git/drvkite-roots/result");
        let empty = Settings {
            out_link_dir: Some(String::new()),
            ..Default::default()
        };
        assert!(empty.validate().is_err());
    }
}
