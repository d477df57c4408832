//! Rendering: turn evaluated targets into Buildkite steps, grouped by phase
//! and cut into chunks that `buildkite-agent pipeline upload` accepts.
//!
//! This module decides (which targets are built, what each step waits
//! for) and renders build steps and broken targets' steps; [`extra`]
//! renders extra steps, [`command`] the shell commands, [`text`] every
//! string as the upload reads it; `parent` is the parent map, `summary`
//! what `summary.json` says, `write` the pipeline folder.

pub mod checkout;
pub mod command;
pub mod extra;
mod parent;
pub mod settings;
mod summary;
pub mod text;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::eval::{BrokenKind, BrokenTarget, Evaluation, Target};
use crate::graph::DrvGraph;
use crate::types::{DrvPath, Label, StepKey};
pub use parent::{ParentMap, ParentStatus, require_parent_map};
pub use settings::Settings;
pub use summary::{BrokenSummary, CachedSummary, ParentSummary, Summary, counted};
pub use write::{check_output, chunk, write, write_with};

/// The reason Buildkite shows on skipped build steps (TVL's text).
pub const UNCHANGED: &str = "Target has not changed.";

/// Build-step facts an extra step needs about its parent.
#[derive(Debug, Clone)]
pub struct ParentStep {
    pub key: StepKey,
    pub label: Label,
    pub skip: Value,
}

/// A generated pipeline: steps per enabled phase, plus the facts the
/// summary reports.
#[derive(Debug)]
pub struct Pipeline {
    pub phases: Vec<(String, Vec<Value>)>,
    pub summary: Summary,
    /// Time spent reading and analysing the derivation graph.
    pub graph_duration: std::time::Duration,
}

/// Steps that build the same derivation are one step: Buildkite keys must
/// be unique, and building it once is enough.
struct BuildUnit<'a> {
    target: &'a Target,
    /// Every target building this derivation: each has its own extra steps.
    members: Vec<&'a Target>,
    labels: Vec<Label>,
    skip: bool,
    /// Not unchanged, but a binary cache (named) has its outputs.
    cached: Option<&'a str>,
}

impl BuildUnit<'_> {
    fn skipped(&self) -> bool {
        self.skip || self.cached.is_some()
    }

    /// The build step's `skip` (a reason as text, not yet written for
    /// the upload), which its extra steps follow.
    fn skip_value(&self) -> Value {
        match self.cached {
            _ if self.skip => json!(UNCHANGED),
            Some(cache) => Value::String(crate::substitute::skip_reason(cache)),
            None => json!(false),
        }
    }
}

fn group_by_drv<'a>(targets: &'a [Target], parent: &ParentMap) -> Vec<BuildUnit<'a>> {
    let mut index: HashMap<&DrvPath, usize> = HashMap::new();
    let mut units: Vec<BuildUnit> = Vec::new();
    for t in targets {
        let unchanged = parent.unchanged(&t.label, &t.drv_path);
        match index.get(&t.drv_path) {
            Some(&i) => {
                let u = &mut units[i];
                if !u.labels.contains(&t.label) {
                    u.labels.push(t.label.clone());
                    u.members.push(t);
                }
                // Built by the parent under any of its labels is built.
                u.skip |= unchanged;
            }
            None => {
                index.insert(&t.drv_path, units.len());
                units.push(BuildUnit {
                    target: t,
                    members: vec![t],
                    labels: vec![t.label.clone()],
                    skip: unchanged,
                    cached: None,
                });
            }
        }
    }
    units
}

fn merge(base: &mut Map<String, Value>, over: &Map<String, Value>) {
    for (k, v) in over {
        base.insert(k.clone(), v.clone());
    }
}

fn build_step(
    unit: &BuildUnit,
    deps: &[DrvPath],
    settings: &Settings,
) -> Result<Map<String, Value>> {
    let t = unit.target;
    let label_text = unit
        .labels
        .iter()
        .map(Label::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut depends_on = vec![Value::String(text::exact(&settings.bootstrap_key)?)];
    depends_on.extend(
        deps.iter()
            .map(|d| Value::String(d.step_key().into_string())),
    );
    for extra in &t.extra_deps {
        let dep = match extra {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let dep = Value::String(text::exact(&dep).with_context(|| {
            format!(
                "{}: meta.ci.buildkiteExtraDeps names a step key that cannot be uploaded",
                t.label
            )
        })?);
        if !depends_on.contains(&dep) {
            depends_on.push(dep);
        }
    }
    let command = command::build_command(
        &t.drv_path,
        &t.outputs,
        &t.attr_path,
        &settings.out_link("result"),
    );
    // Values built from owned strings (json!(s) would copy each): this
    // runs once per build step.
    let mut step = Map::new();
    step.insert(
        "label".into(),
        Value::String(text::display(&format!(":nix: {label_text}"))),
    );
    step.insert(
        "key".into(),
        Value::String(t.drv_path.step_key().into_string()),
    );
    let skip = match unit.skip_value() {
        Value::String(reason) => Value::String(text::display(&reason)),
        other => other,
    };
    step.insert("skip".into(), skip);
    step.insert("command".into(), Value::String(text::exact_owned(command)?));
    // A label no step can carry exactly never gets here
    // (`set_aside_unuploadable`).
    let mut env = Map::new();
    env.insert(
        "READTREE_TARGET".into(),
        Value::String(text::exact(t.label.as_str())?),
    );
    step.insert("env".into(), Value::Object(env));
    step.insert(
        "cancel_on_build_failing".into(),
        json!(settings.cancel_on_build_failing),
    );
    step.insert("depends_on".into(), Value::Array(depends_on));
    merge(&mut step, &settings.default_step_overrides);
    if let Some(secs) = t.timeout {
        // Round up and never 0: TVL's integer division turned 90 s into 1
        // minute and 30 s into an invalid 0.
        let minutes = (secs / 60.0).ceil().max(1.0) as u64;
        step.insert("timeout_in_minutes".into(), json!(minutes));
    }
    if let Some(args) = &t.extra_step_args {
        merge(&mut step, args);
    }
    Ok(step)
}

/// Move the targets whose label no step can carry exactly (see [`text`])
/// to the broken ones: each gets a failing step naming it, rather than a
/// step whose `READTREE_TARGET` would name something else. They are left
/// out of `drvmap.json` like any broken target.
pub fn set_aside_unuploadable(eval: &mut Evaluation) {
    let uploadable = |t: &Target| !t.not_utf8 && text::exact(t.label.as_str()).is_ok();
    if eval.targets.iter().all(uploadable) {
        return;
    }
    let (keep, refuse): (Vec<Target>, Vec<Target>) = std::mem::take(&mut eval.targets)
        .into_iter()
        .partition(uploadable);
    eval.targets = keep;
    eval.broken.extend(refuse.into_iter().map(|t| BrokenTarget {
        error: if t.not_utf8 {
            "its name or one of its options is not UTF-8 (U+FFFD marks the bytes in its label), which no step can carry: rename the folder or attribute, or fix the string".to_owned()
        } else {
            "its label has a backslash directly before `$`, which `buildkite-agent pipeline upload` reads as an escaped `$`, so no step can set READTREE_TARGET to it: rename the folder or attribute".to_owned()
        },
        label: t.label,
        attr_path: t.attr_path,
        kind: BrokenKind::Unuploadable,
    }));
}

/// The key of a broken target's failing step: stable across builds, unique
/// per label, needs no escaping, and cannot clash with `drv-` or
/// `extra-step-` keys.
pub fn broken_step_key(label: &Label) -> StepKey {
    use sha1::{Digest, Sha1};
    StepKey::new(format!(
        "eval-error-{}",
        hex::encode(Sha1::digest(label.as_str().as_bytes()))
    ))
}

/// The step standing in for a target that failed to evaluate (or cannot
/// be uploaded): it prints why and fails, so the build fails while every
/// healthy target is still built.
fn broken_step(b: &BrokenTarget, settings: &Settings) -> Result<Map<String, Value>> {
    let what = broken_what(b.kind);
    let hint = match b.kind {
        BrokenKind::Evaluation => {
            "drvkite generated neither its build step nor its extra steps: fix the error above (nix-instantiate on the target shows it in full)"
        }
        BrokenKind::Unuploadable => {
            "drvkite generated neither its build step nor its extra steps: fix the error above"
        }
        BrokenKind::Node => {
            "this readTree file fails before its targets can even be listed, so drvkite generated no step for any of them: fix the error above"
        }
    };
    // Printed into the job's log: escape sequences in a name stay visible.
    let lines = [
        format!("{} {what}:", text::printable(b.label.as_str())),
        format!("  {}", text::printable(&b.error)),
        hint.to_owned(),
    ];
    let mut script = String::from("printf '%s\\n'");
    for line in &lines {
        script.push(' ');
        text::push_shell_word(&mut script, line);
    }
    script.push_str(" >&2; exit 1");
    // Options such as `agents` apply; what makes it this step does not change.
    let mut step = settings.default_step_overrides.clone();
    step.insert(
        "label".into(),
        json!(text::display(&format!(":x: {} {what}", b.label))),
    );
    step.insert("key".into(), json!(broken_step_key(&b.label)));
    step.insert("command".into(), json!(text::exact_owned(script)?));
    step.insert(
        "depends_on".into(),
        json!([text::exact(&settings.bootstrap_key)?]),
    );
    step.remove("skip");
    step.remove("soft_fail");
    Ok(step)
}

/// How a broken target's step and warnings say what happened.
pub fn broken_what(kind: BrokenKind) -> &'static str {
    match kind {
        BrokenKind::Evaluation => "failed to evaluate",
        BrokenKind::Unuploadable => "cannot be uploaded",
        BrokenKind::Node => "failed to evaluate",
    }
}

/// One unit's build step (when the build phase is on) and extra steps.
type UnitSteps = (Option<Value>, Vec<extra::Rendered>);

fn render_unit(
    unit: &BuildUnit,
    deps: &HashMap<DrvPath, Vec<DrvPath>>,
    build_enabled: bool,
    settings: &Settings,
) -> Result<UnitSteps> {
    let t = unit.target;
    let build = build_enabled.then(|| {
        let d = deps.get(&t.drv_path).map(Vec::as_slice).unwrap_or(&[]);
        build_step(unit, d, settings).map(Value::Object)
    });
    let build = build.transpose()?;
    let mut extras = Vec::new();
    for member in &unit.members {
        let parent_step = ParentStep {
            key: t.drv_path.step_key(),
            label: member.label.clone(),
            skip: unit.skip_value(),
        };
        extras.extend(extra::render(member, &parent_step, settings)?);
    }
    Ok((build, extras))
}

/// [`render_unit`] of every unit, in order. Units are independent, so a
/// large depot's are rendered on every core (Nix is done by now).
fn render_units(
    units: &[BuildUnit],
    deps: &HashMap<DrvPath, Vec<DrvPath>>,
    build_enabled: bool,
    settings: &Settings,
) -> Vec<Result<UnitSteps>> {
    let render = |u| render_unit(u, deps, build_enabled, settings);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads < 2 || units.len() < 512 {
        return units.iter().map(render).collect();
    }
    let per_thread = units.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = units
            .chunks(per_thread)
            .map(|part| scope.spawn(move || part.iter().map(render).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a rendering thread panicked"))
            .collect()
    })
}

/// Render the pipeline for an evaluation.
pub fn generate(
    eval: &Evaluation,
    parent: &ParentMap,
    parent_detail: &str,
    settings: &Settings,
) -> Result<Pipeline> {
    generate_with(
        eval,
        parent,
        parent_detail,
        settings,
        DrvGraph::default(),
        None,
    )
}

/// [`generate`], with part of the derivation graph read already, and
/// what the binary caches have when `--skip-cached` is on.
pub fn generate_with(
    eval: &Evaluation,
    parent: &ParentMap,
    parent_detail: &str,
    settings: &Settings,
    graph: DrvGraph,
    cached: Option<&crate::substitute::Report>,
) -> Result<Pipeline> {
    settings.validate()?;
    let enabled = settings.enabled_phases();
    let build_enabled = settings.build_enabled();
    let mut units = group_by_drv(&eval.targets, parent);
    if let Some(report) = cached {
        for u in units.iter_mut().filter(|u| !u.skip) {
            u.cached = report.cache_of(&u.target.drv_path);
        }
    }

    // Dependencies between changed targets: only those are "known", so an
    // unchanged or cached (skipped) target is looked through, like any
    // derivation.
    let changed: HashSet<DrvPath> = units
        .iter()
        .filter(|u| !u.skipped())
        .map(|u| u.target.drv_path.clone())
        .collect();
    let graph_started = std::time::Instant::now();
    let deps = if build_enabled && !changed.is_empty() {
        let graph = graph
            .complete(changed.iter().cloned())
            .context("cannot analyse the derivation graph")?;
        let deps = graph.closest_known(&changed);
        // Some 20,000 allocations on a large depot: freed meanwhile.
        std::thread::spawn(move || drop(graph));
        deps
    } else {
        HashMap::new()
    };
    let graph_duration = graph_started.elapsed();

    let mut phase_steps: BTreeMap<&str, Vec<Value>> =
        enabled.iter().map(|p| (*p, Vec::new())).collect();
    let mut extra_count = 0;
    // TVL's extra-step keys hash "<label>-<target>", so two targets can
    // give the same key (label "a-x" on tools/p, label "a" on x-tools/p):
    // Buildkite would refuse the whole upload holding the second.
    let mut extra_keys: HashMap<String, String> = HashMap::new();
    for rendered in render_units(&units, &deps, build_enabled, settings) {
        let (build, extras) = rendered?;
        if let Some(step) = build {
            phase_steps
                .get_mut("build")
                .expect("build is enabled")
                .push(step);
        }
        for extra in extras {
            // Counted only when generated: inactive phases are not.
            if let Some(list) = phase_steps.get_mut(extra.phase.as_str()) {
                if let Some(other) = extra_keys.insert(extra.key.clone(), extra.what.clone()) {
                    bail!(
                        "{other} and {} have the same step key {} (the sha1 of \"<label>-<target>\", as in TVL), which Buildkite refuses: give one of them another label",
                        extra.what,
                        extra.key
                    );
                }
                extra_count += 1;
                list.push(extra.step);
            }
        }
    }
    // A broken target fails the build where its build step would have
    // been; with the build phase off, in the first phase generated.
    let broken_phase = if build_enabled {
        Some("build")
    } else {
        enabled.first().copied()
    };
    if let Some(list) = broken_phase.and_then(|p| phase_steps.get_mut(p)) {
        let mut seen = HashSet::new();
        let steps = eval
            .broken
            .iter()
            .filter(|b| seen.insert(&b.label))
            .map(|b| broken_step(b, settings).map(Value::Object))
            .collect::<Result<Vec<_>>>()?;
        list.splice(0..0, steps);
    }
    if let Some(list) = phase_steps.get_mut("build") {
        list.extend(settings.additional_steps.iter().cloned());
    }
    if let Some(list) = phase_steps.get_mut("release") {
        list.extend(settings.post_build_steps.iter().cloned());
    }
    let phases: Vec<(String, Vec<Value>)> = enabled
        .iter()
        .map(|p| (p.to_string(), phase_steps.remove(p).unwrap_or_default()))
        .collect();

    let mut summary = summarise(eval, parent, parent_detail, &units, extra_count, &phases);
    summary.cache_check = cached.map(crate::substitute::Report::summary);
    Ok(Pipeline {
        phases,
        summary,
        graph_duration,
    })
}

fn summarise(
    eval: &Evaluation,
    parent: &ParentMap,
    parent_detail: &str,
    units: &[BuildUnit],
    extra_steps: usize,
    phases: &[(String, Vec<Value>)],
) -> Summary {
    let mut changed = BTreeSet::new();
    let mut unchanged = 0;
    let mut cached = BTreeMap::new();
    for u in units {
        if u.skip {
            unchanged += u.labels.len();
        } else if let Some(cache) = u.cached {
            cached.extend(u.labels.iter().map(|l| (l.clone(), cache)));
        } else {
            changed.extend(u.labels.iter().cloned());
        }
    }
    let current: BTreeSet<&Label> = eval.targets.iter().map(|t| &t.label).collect();
    // A broken target is still there, even though it is not in the map.
    let broken: BTreeSet<&Label> = eval.broken.iter().map(|b| &b.label).collect();
    let (added, removed) = match &parent.map {
        Some(m) => (
            current
                .iter()
                .filter(|l| m.get(l).is_none())
                .map(|l| (*l).clone())
                .collect(),
            m.iter()
                .map(|(l, _)| l)
                .filter(|l| !current.contains(l) && !broken.contains(l))
                .cloned()
                .collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    Summary {
        version: 1,
        targets: eval.targets.len(),
        changed: changed.into_iter().collect(),
        unchanged,
        added,
        removed,
        broken: eval
            .broken
            .iter()
            .map(|b: &BrokenTarget| BrokenSummary {
                label: b.label.clone(),
                error: b.error.clone(),
            })
            .collect(),
        extra_steps,
        steps: phases.iter().map(|(p, s)| (p.clone(), s.len())).collect(),
        evaluation_seconds: eval.duration.as_secs_f64(),
        parent_map: ParentSummary {
            status: parent.status.clone(),
            detail: parent_detail.to_owned(),
            source: parent.source.clone(),
        },
        cached: cached
            .into_iter()
            .map(|(label, cache)| CachedSummary {
                label,
                cache: cache.to_owned(),
            })
            .collect(),
        cache_check: None,
    }
}
