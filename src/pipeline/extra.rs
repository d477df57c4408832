//! Extra steps (`meta.ci.extraSteps.<name>`): validated like TVL's
//! `normaliseExtraStep`, rendered like its `mkExtraStep`, with the command
//! script built lazily when the step runs.

use std::collections::HashMap;

use anyhow::{Result, bail};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};

use super::command::{Fallback, build_command, build_command_with};
use super::text;
use super::{ParentStep, Settings};
use crate::ephemera::steps::{EphemeraSet, step_commands_with};
use crate::eval::{RawExtraStep, Target};
use crate::types::DrvPath;

/// TVL's out-link name for extra-step scripts, so existing `.gitignore`
/// entries keep the checkout clean.
pub const SCRIPT_LINK: &str = "nix-buildkite-extra-step-command-script";

const OPTIONS: &[&str] = &[
    "agents",
    "alwaysRun",
    "branches",
    "command",
    "ephemera",
    "label",
    "needsOutput",
    "parentOverride",
    "phase",
    "prompt",
    "skip",
    "softFail",
];

/// Buildkite refuses skip reasons longer than this.
const MAX_SKIP_REASON: usize = 70;

/// A validated extra step.
#[derive(Debug, Clone)]
pub struct ExtraStep {
    pub name: String,
    pub label: String,
    pub script: DrvPath,
    pub script_outputs: Vec<String>,
    pub needs_output: bool,
    /// The parent as `parentOverride` changed it, when the step has one.
    pub parent_override: Option<DrvPath>,
    pub branches: Option<Vec<String>>,
    pub always_run: bool,
    pub prompt: Option<String>,
    pub soft_fail: Value,
    pub phase: String,
    pub skip: Value,
    pub agents: Option<Value>,
    /// Caches restored before the script and persisted after it succeeds.
    pub ephemera: Vec<EphemeraSet>,
}

/// How generated steps call drvkite for ephemera: `$DRVKITE` when the
/// agent sets it (e.g. `nix run …#drvkite --`, hence unquoted), else from
/// PATH.
const DRVKITE_ON_AGENT: &str = "${DRVKITE:-drvkite}";

fn context(name: &str, label: &str, parent: &Target) -> String {
    let shown = if label.is_empty() { name } else { label };
    format!("in extra step '{shown}' (from {})", parent.label)
}

/// A user value as an error message shows it.
fn describe(v: &Value) -> String {
    match v {
        Value::Object(o) if o.contains_key("__drvkiteFunction") => "a function".to_owned(),
        Value::Object(_) => "an attribute set".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        Value::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

fn as_bool(v: Option<&Value>, what: &str, ctx: &str) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!(
            "{ctx}: '{what}' must be true or false, not {}",
            describe(other)
        ),
    }
}

fn soft_fail(v: Option<&Value>, ctx: &str) -> Result<Value> {
    let valid_entry = |e: &Value| {
        e.as_object().is_some_and(|o| {
            o.len() == 1
                && o.get("exit_status")
                    .is_some_and(|s| s.is_i64() || s.as_str() == Some("*"))
        })
    };
    match v {
        None | Some(Value::Null) => Ok(json!(false)),
        Some(b @ Value::Bool(_)) => Ok(b.clone()),
        Some(a @ Value::Array(entries)) if entries.iter().all(valid_entry) => Ok(a.clone()),
        Some(other) => bail!(
            "{ctx}: 'softFail' must be true, false or a list like [ {{ exit_status = 253; }} ] (exit_status a number or \"*\"), not {}",
            if other.is_array() {
                other.to_string()
            } else {
                describe(other)
            }
        ),
    }
}

/// Check one extra step's options; errors name the step and its parent.
pub fn validate(raw: &RawExtraStep, parent: &Target, settings: &Settings) -> Result<ExtraStep> {
    let name = raw.name.clone();
    if let Some(t) = &raw.not_an_attrset {
        bail!(
            "{}: must be an attribute set of options, not a {t}",
            context(&name, "", parent)
        );
    }
    let v = &raw.values;
    let label = match v.get("label") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        None | Some(Value::Null) => name.clone(),
        Some(other) => bail!(
            "{}: 'label' must be a non-empty string, not {}",
            context(&name, "", parent),
            describe(other)
        ),
    };
    let ctx = context(&name, &label, parent);
    if let Some(unknown) = raw.options.iter().find(|o| !OPTIONS.contains(&o.as_str())) {
        bail!(
            "{ctx}: unknown option '{unknown}' (known options: {})",
            OPTIONS.join(", ")
        );
    }
    let (script, script_outputs) = match &raw.command {
        None => bail!(
            "{ctx}: 'command' is required: a derivation that builds one executable (e.g. writeShellScript)"
        ),
        Some(c) => match (&c.drv_path, &c.not_a_derivation) {
            (Some(d), _) if c.outputs.len() == 1 => (d.clone(), c.outputs.clone()),
            (Some(_), _) => bail!(
                "{ctx}: 'command' must have exactly one output, it has {} ({}): its store path is run as the step's script",
                c.outputs.len(),
                c.outputs.join(", ")
            ),
            (None, t) => bail!(
                "{ctx}: 'command' must be a derivation that builds one executable (e.g. writeShellScript), not a {}",
                t.as_deref().unwrap_or("value")
            ),
        },
    };
    let phase = match v.get("phase") {
        None | Some(Value::Null) => "build".to_owned(),
        Some(Value::String(p)) => p.clone(),
        Some(other) => bail!("{ctx}: 'phase' must be a string, not {}", describe(other)),
    };
    if !settings.phases.contains(&phase) {
        bail!(
            "{ctx}: phase '{phase}' is not valid; known phases: {}",
            settings.phases.join(", ")
        );
    }
    let prompt = match v.get("prompt") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // TVL ignores a non-string prompt outside the build phase; a gate
        // the user asked for must not vanish silently.
        Some(other) => bail!(
            "{ctx}: 'prompt' must be the question to ask (a string), not {}",
            describe(other)
        ),
    };
    if prompt.is_some() && phase == "build" {
        bail!(
            "{ctx}: 'prompt' cannot be used in the build phase: CI builds must not wait for a human; move the step to another phase (e.g. phase = \"release\")"
        );
    }
    let branches: Option<Vec<String>> = match v.get("branches") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a))
            if a.iter().all(|b| {
                b.as_str()
                    .is_some_and(|s| !s.is_empty() && !s.contains(char::is_whitespace))
            }) =>
        {
            Some(
                a.iter()
                    .filter_map(|b| b.as_str().map(str::to_owned))
                    .collect(),
            )
        }
        Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_owned).collect()),
        // Buildkite takes one space-separated string: a pattern with a
        // space in it would silently become two.
        Some(other) => bail!(
            "{ctx}: 'branches' must be a list of branch patterns without spaces (e.g. [ \"refs/heads/main\" ]), not {}",
            if other.is_array() {
                other.to_string()
            } else {
                describe(other)
            }
        ),
    };
    let skip = match v.get("skip") {
        None | Some(Value::Null) => json!(false),
        Some(Value::String(r)) if text::display_form(r).chars().count() > MAX_SKIP_REASON => bail!(
            "{ctx}: the 'skip' reason is longer than Buildkite's limit of {MAX_SKIP_REASON} characters: shorten it"
        ),
        Some(s @ (Value::Bool(_) | Value::String(_))) => s.clone(),
        Some(other) => bail!(
            "{ctx}: 'skip' must be a bool or a reason string, not {}",
            describe(other)
        ),
    };
    let agents = match v.get("agents") {
        None | Some(Value::Null) => None,
        Some(a @ Value::Object(o)) if !o.contains_key("__drvkiteFunction") => Some(a.clone()),
        Some(Value::Array(l)) if l.iter().all(Value::is_string) => Some(json!(l)),
        Some(other) => bail!(
            "{ctx}: 'agents' must be an attribute set of agent tags (e.g. {{ queue = \"deploy\"; }}) or a list of \"key=value\" strings, not {}",
            describe(other)
        ),
    };
    // Branch patterns and agent tags are data: exact, or refused.
    for pattern in branches.iter().flatten() {
        text::exact(pattern)
            .map_err(|e| anyhow::anyhow!("{ctx}: 'branches' cannot be uploaded: {e}"))?;
    }
    if let Some(a) = &agents {
        text::exact_value(a)
            .map_err(|e| anyhow::anyhow!("{ctx}: 'agents' cannot be uploaded: {e}"))?;
    }
    let parent_override = match &raw.parent_override {
        None => None,
        Some(p) => match (&p.drv_path, &p.not_a_function, &p.not_a_derivation) {
            (Some(d), _, _) => Some(d.clone()),
            (None, Some(t), _) => bail!(
                "{ctx}: 'parentOverride' must be a function from the parent target to a derivation, not a {t}"
            ),
            (None, None, t) => bail!(
                "{ctx}: 'parentOverride' must return a derivation, not a {}",
                t.as_deref().unwrap_or("value")
            ),
        },
    };
    let ephemera = match v.get("ephemera") {
        None | Some(Value::Null) => Vec::new(),
        Some(list) => serde_json::from_value::<Vec<EphemeraSet>>(list.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{ctx}: 'ephemera' must be a list of sets like [ {{ name = \"cargo\"; paths = [ \"~/.cargo/registry\" ]; keyFiles = [ \"Cargo.lock\" ]; }} ] ({e})"
            )
        })?,
    };
    // Checks names, duplicates and paths now rather than on the agent.
    step_commands_with(DRVKITE_ON_AGENT, &ephemera).map_err(|e| anyhow::anyhow!("{ctx}: {e:#}"))?;
    Ok(ExtraStep {
        name,
        ephemera,
        script,
        script_outputs,
        needs_output: as_bool(v.get("needsOutput"), "needsOutput", &ctx)?,
        parent_override,
        branches,
        always_run: as_bool(v.get("alwaysRun"), "alwaysRun", &ctx)?,
        prompt,
        soft_fail: soft_fail(v.get("softFail"), &ctx)?,
        phase,
        skip,
        agents,
        label,
    })
}

/// TVL-compatible key: sha1 of "<label>-<parent label>".
pub fn step_key(label: &str, parent_label: &str) -> String {
    let digest = Sha1::digest(format!("{label}-{parent_label}").as_bytes());
    format!("extra-step-{}", hex::encode(digest))
}

/// The out-link names (relative to the link folder) a step's command
/// creates: `link` for output `out`, `link-<output>` for the others, as
/// nix-store and nix-build name them.
pub fn link_names(link: &str, outputs: &[String]) -> Vec<String> {
    if outputs.is_empty() {
        return vec![link.to_owned()];
    }
    outputs
        .iter()
        .map(|o| {
            if o == "out" {
                link.to_owned()
            } else {
                format!("{link}-{o}")
            }
        })
        .collect()
}

/// The out-links the command of `step` (on `parent`) creates, before
/// they are placed in the GC root folder.
pub fn out_links(step: &ExtraStep, parent: &Target) -> Vec<String> {
    let mut links = link_names(SCRIPT_LINK, &step.script_outputs);
    if step.needs_output {
        links.extend(link_names("result", &parent.outputs));
    }
    links
}

/// The step's command, as the shell should see it: build the parent first
/// when asked, then build the command script (lazily: only now, on the
/// agent) and run it, between restoring and persisting its ephemera sets.
fn step_command(step: &ExtraStep, parent: &Target, settings: &Settings) -> Result<String> {
    let mut c = String::from("set -ueo pipefail\n");
    if step.needs_output {
        c.push_str("echo ");
        text::push_shell_word(
            &mut c,
            &format!(
                "~~~ Preparing build output of {}",
                text::printable(parent.label.as_str())
            ),
        );
        c.push('\n');
        let (drv, fallback) = match &step.parent_override {
            None => (&parent.drv_path, Fallback::Attr(&parent.attr_path)),
            Some(d) => (
                d,
                Fallback::ParentOverride {
                    parent: &parent.attr_path,
                    step: &step.name,
                },
            ),
        };
        let build =
            build_command_with(drv, &parent.outputs, fallback, &settings.out_link("result"));
        // Scripts get the parent's output path without relying on ./result
        // (which is elsewhere when a GC root folder is configured).
        c.push_str(&format!("DRVKITE_PARENT_OUTPUT=\"$({build})\"\n"));
        c.push_str("export DRVKITE_PARENT_OUTPUT\n");
    }
    c.push_str("echo '--- Building extra step script'\n");
    let attr = parent
        .attr_path
        .join(["meta", "ci", "extraSteps", step.name.as_str(), "command"]);
    let build = build_command(
        &step.script,
        &step.script_outputs,
        &attr,
        &settings.out_link(SCRIPT_LINK),
    );
    c.push_str(&format!("command_script=\"$({build})\"\n"));
    if step.ephemera.is_empty() {
        c.push_str("echo '+++ Running extra step script'\nexec \"$command_script\"\n");
        return Ok(c);
    }
    // No exec: the persist lines must run after the script. Under `set -e`
    // a failing script ends the job before them, so nothing is persisted.
    let (restore, persist) = step_commands_with(DRVKITE_ON_AGENT, &step.ephemera)?;
    c.push_str("echo '--- Restoring ephemera'\n");
    c.push_str(&restore);
    c.push_str("echo '+++ Running extra step script'\n\"$command_script\"\n");
    c.push_str(&persist);
    Ok(c)
}

/// The step's skip: `alwaysRun` wins, then its own `skip`, then the
/// parent's (unchanged parent: nothing to do).
fn effective_skip(step: &ExtraStep, parent_step: &ParentStep) -> Value {
    if step.always_run {
        json!(false)
    } else if step.skip != json!(false) {
        step.skip.clone()
    } else {
        parent_step.skip.clone()
    }
}

/// A skip reason is display text; `true` and `false` stay as they are.
fn display_skip(skip: &Value) -> Value {
    match skip {
        Value::String(reason) => Value::String(text::display(reason)),
        other => other.clone(),
    }
}

/// One rendered extra step.
#[derive(Debug)]
pub struct Rendered {
    pub phase: String,
    /// Its step key (for a gated step, the inner step's).
    pub key: String,
    /// How an error names it: "extra step '<label>' of <target>".
    pub what: String,
    pub step: Value,
}

/// Render a target's extra steps, in name order.
pub fn render(
    parent: &Target,
    parent_step: &ParentStep,
    settings: &Settings,
) -> Result<Vec<Rendered>> {
    let mut out = Vec::new();
    let mut keys: HashMap<String, String> = HashMap::new();
    for raw in parent.extra_steps.values() {
        let step = validate(raw, parent, settings)?;
        let key = step_key(&step.label, parent.label.as_str());
        if let Some(other) = keys.insert(key.clone(), step.name.clone()) {
            bail!(
                "extra steps '{other}' and '{}' of {} have the same label '{}', so the same step key: give one of them another label",
                step.name,
                parent.label,
                step.label
            );
        }
        let skip = effective_skip(&step, parent_step);
        // needsOutput builds the parent itself, and alwaysRun must not wait
        // for a parent step that may be skipped or failing.
        let depends_on: Vec<String> =
            if settings.build_enabled() && !step.always_run && !step.needs_output {
                vec![parent_step.key.as_str().to_owned()]
            } else {
                Vec::new()
            };
        let skip = display_skip(&skip);
        let mut s = Map::new();
        s.insert("key".into(), json!(key));
        s.insert(
            "label".into(),
            json!(text::display(&format!(
                ":gear: {} (from {})",
                step.label, parent.label
            ))),
        );
        s.insert("skip".into(), skip.clone());
        s.insert("depends_on".into(), json!(depends_on));
        s.insert(
            "command".into(),
            json!(text::exact_owned(step_command(&step, parent, settings)?)?),
        );
        s.insert("soft_fail".into(), text::exact_value(&step.soft_fail)?);
        for (k, v) in &settings.default_step_overrides {
            s.insert(k.clone(), v.clone());
        }
        if let Some(a) = &step.agents {
            s.insert("agents".into(), text::exact_value(a)?);
        }
        let branches = match &step.branches {
            Some(b) => Some(text::exact(&b.join(" "))?),
            None => None,
        };
        if let Some(b) = &branches {
            s.insert("branches".into(), json!(b));
        }
        let value = match &step.prompt {
            None => Value::Object(s),
            Some(prompt) => {
                let depends = s.remove("depends_on").unwrap_or(json!([]));
                let block = json!({
                    "prompt": text::display(prompt),
                    "branches": branches.map_or(json!([]), Value::String),
                    "block": text::display(&format!(":radio_button: Run {}? (from {})", step.label, parent.label)),
                });
                // The group honours the step's own skip and alwaysRun (TVL
                // used the parent's skip only). It carries no branches:
                // Buildkite refuses them on groups.
                json!({
                    "group": text::display(&step.label),
                    "depends_on": depends,
                    "skip": skip,
                    "steps": [block, Value::Object(s)],
                })
            }
        };
        out.push(Rendered {
            phase: step.phase,
            what: format!("extra step '{}' of {}", step.label, parent.label),
            key,
            step: value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_matches_tvl() {
        // sha1("lint-app"), as TVL computes it.
        assert_eq!(
            step_key("lint", "app"),
            "extra-step-8ebd3c623daf608ff555cf40a4b3f962a6026dd1"
        );
    }
}
