//! Extra steps (`meta.ci.extraSteps.<name>`): validated like TVL's
//! `normaliseExtraStep`, rendered like its `mkExtraStep`, with the command
//! script built lazily when the step runs.

use anyhow::{Result, bail};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};

use super::command::{build_command, escape_interpolation, sh_quote};
use super::{ParentStep, Settings};
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

/// A validated extra step.
#[derive(Debug, Clone)]
pub struct ExtraStep {
    pub name: String,
    pub label: String,
    pub script: DrvPath,
    pub script_outputs: Vec<String>,
    pub needs_output: bool,
    pub parent_drv: DrvPath,
    pub branches: Option<Vec<String>>,
    pub always_run: bool,
    pub prompt: Option<String>,
    pub soft_fail: Value,
    pub phase: String,
    pub skip: Value,
    pub agents: Option<Value>,
}

fn context(name: &str, label: &str, parent: &Target) -> String {
    let shown = if label.is_empty() { name } else { label };
    format!("in extra step '{shown}' (from {})", parent.label)
}

fn as_bool(v: Option<&Value>, what: &str, ctx: &str) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!("{ctx}: '{what}' must be true or false, not {other}"),
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
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => name.clone(),
        Some(other) => bail!(
            "{}: 'label' must be a string, not {other}",
            context(&name, "", parent)
        ),
    };
    let ctx = context(&name, &label, parent);
    if let Some(unknown) = raw.options.iter().find(|o| !OPTIONS.contains(&o.as_str())) {
        bail!(
            "{ctx}: unknown option '{unknown}' (known options: {})",
            OPTIONS.join(", ")
        );
    }
    let script = match &raw.command {
        None => bail!(
            "{ctx}: 'command' is required: a derivation that builds one executable (e.g. writeShellScript)"
        ),
        Some(c) => match (&c.drv_path, &c.not_a_derivation) {
            (Some(d), _) if c.outputs.len() == 1 => d.clone(),
            (Some(_), _) => bail!(
                "{ctx}: 'command' must have exactly one output, it has {} ({})",
                c.outputs.len(),
                c.outputs.join(", ")
            ),
            (None, t) => bail!(
                "{ctx}: 'command' must be a derivation, not a {}",
                t.as_deref().unwrap_or("value")
            ),
        },
    };
    let phase = match v.get("phase") {
        None | Some(Value::Null) => "build".to_owned(),
        Some(Value::String(p)) => p.clone(),
        Some(other) => bail!("{ctx}: 'phase' must be a string, not {other}"),
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
        Some(other) => bail!("{ctx}: 'prompt' must be the question to ask (a string), not {other}"),
    };
    if prompt.is_some() && phase == "build" {
        bail!(
            "{ctx}: 'prompt' cannot be used in the build phase: CI builds must not wait for a human; move the step to another phase (e.g. phase = \"release\")"
        );
    }
    let branches = match v.get("branches") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Some(
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_owned))
                .collect(),
        ),
        Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_owned).collect()),
        Some(other) => bail!("{ctx}: 'branches' must be a list of branch patterns, not {other}"),
    };
    let soft_fail = match v.get("softFail") {
        None | Some(Value::Null) => json!(false),
        Some(b @ Value::Bool(_)) => b.clone(),
        Some(a @ Value::Array(_)) => a.clone(),
        Some(other) => bail!(
            "{ctx}: 'softFail' must be a bool or a list of {{ exit_status = N; }}, not {other}"
        ),
    };
    let skip = match v.get("skip") {
        None | Some(Value::Null) => json!(false),
        Some(s @ (Value::Bool(_) | Value::String(_))) => s.clone(),
        Some(other) => bail!("{ctx}: 'skip' must be a bool or a reason string, not {other}"),
    };
    Ok(ExtraStep {
        name,
        script,
        script_outputs: raw
            .command
            .as_ref()
            .map(|c| c.outputs.clone())
            .unwrap_or_default(),
        needs_output: as_bool(v.get("needsOutput"), "needsOutput", &ctx)?,
        parent_drv: raw
            .parent_override_drv_path
            .clone()
            .unwrap_or_else(|| parent.drv_path.clone()),
        branches,
        always_run: as_bool(v.get("alwaysRun"), "alwaysRun", &ctx)?,
        prompt,
        soft_fail,
        phase,
        skip,
        agents: v.get("agents").filter(|a| !a.is_null()).cloned(),
        label,
    })
}

/// TVL-compatible key: sha1 of "<label>-<parent label>".
pub fn step_key(label: &str, parent_label: &str) -> String {
    let digest = Sha1::digest(format!("{label}-{parent_label}").as_bytes());
    format!("extra-step-{}", hex::encode(digest))
}

/// The step's shell script: build the parent first when asked, then build
/// the command script (lazily: only now, on the agent) and exec it.
fn script_body(step: &ExtraStep, parent: &Target) -> String {
    let mut lines = vec!["set -ueo pipefail".to_owned()];
    if step.needs_output {
        lines.push(format!(
            "echo {}",
            sh_quote(&format!("~~~ Preparing build output of {}", parent.label))
        ));
        let build = build_command(
            &step.parent_drv,
            &parent.outputs,
            &parent.attr_path,
            "result",
        );
        // Scripts get the parent's output path without relying on ./result.
        lines.push(format!("DRVKITE_PARENT_OUTPUT=\"$({build})\""));
        lines.push("export DRVKITE_PARENT_OUTPUT".to_owned());
    }
    lines.push("echo '--- Building extra step script'".to_owned());
    let attr = parent
        .attr_path
        .join(["meta", "ci", "extraSteps", step.name.as_str(), "command"]);
    let build = build_command(&step.script, &step.script_outputs, &attr, SCRIPT_LINK);
    lines.push(format!("command_script=\"$({build})\""));
    lines.push("echo '+++ Running extra step script'".to_owned());
    lines.push("exec \"$command_script\"".to_owned());
    lines.join("\n") + "\n"
}

/// Render a target's extra steps as (phase, step) pairs, in name order.
pub fn render(
    parent: &Target,
    parent_step: &ParentStep,
    settings: &Settings,
) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for raw in parent.extra_steps.values() {
        let step = validate(raw, parent, settings)?;
        let skip = if step.always_run {
            json!(false)
        } else if step.skip != json!(false) {
            step.skip.clone()
        } else {
            parent_step.skip.clone()
        };
        let depends_on: Vec<String> =
            if settings.build_enabled() && !step.always_run && !step.needs_output {
                vec![parent_step.key.as_str().to_owned()]
            } else {
                Vec::new()
            };
        let mut s = Map::new();
        s.insert(
            "key".into(),
            json!(step_key(&step.label, parent.label.as_str())),
        );
        s.insert(
            "label".into(),
            json!(escape_interpolation(&format!(
                ":gear: {} (from {})",
                step.label, parent.label
            ))),
        );
        s.insert("skip".into(), skip.clone());
        s.insert("depends_on".into(), json!(depends_on));
        s.insert(
            "command".into(),
            json!(escape_interpolation(&script_body(&step, parent))),
        );
        s.insert("soft_fail".into(), step.soft_fail.clone());
        for (k, v) in &settings.default_step_overrides {
            s.insert(k.clone(), v.clone());
        }
        if let Some(a) = &step.agents {
            s.insert("agents".into(), a.clone());
        }
        if let Some(b) = &step.branches {
            s.insert("branches".into(), json!(b.join(" ")));
        }
        let value = match &step.prompt {
            None => Value::Object(s),
            Some(prompt) => {
                let depends = s.remove("depends_on").unwrap_or(json!([]));
                let block = json!({
                    "prompt": escape_interpolation(prompt),
                    "branches": step.branches.as_ref().map_or(json!([]), |b| json!(b.join(" "))),
                    "block": escape_interpolation(&format!(":radio_button: Run {}? (from {})", step.label, parent.label)),
                });
                // The group honours the step's own skip and alwaysRun (TVL
                // used the parent's skip only).
                json!({
                    "group": escape_interpolation(&step.label),
                    "depends_on": depends,
                    "skip": skip,
                    "steps": [block, Value::Object(s)],
                })
            }
        };
        out.push((step.phase, value));
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
