//! Rendering: turn evaluated targets into Buildkite steps, grouped by phase
//! and cut into chunks that `buildkite-agent pipeline upload` accepts.

pub mod checkout;
pub mod command;
pub mod extra;
pub mod settings;
pub mod text;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{Context, Result};
use camino::Utf8Path;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::drvmap::DrvMap;
use crate::eval::{BrokenKind, BrokenTarget, Evaluation, Target};
use crate::graph::DrvGraph;
use crate::types::{DrvPath, Label, StepKey};
pub use settings::Settings;

/// The reason Buildkite shows on skipped build steps (TVL's text).
pub const UNCHANGED: &str = "Target has not changed.";

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
    let uploadable = |t: &Target| text::exact(t.label.as_str()).is_ok();
    if eval.targets.iter().all(uploadable) {
        return;
    }
    let (keep, refuse): (Vec<Target>, Vec<Target>) = std::mem::take(&mut eval.targets)
        .into_iter()
        .partition(uploadable);
    eval.targets = keep;
    eval.broken.extend(refuse.into_iter().map(|t| BrokenTarget {
        error: "its label has a backslash directly before `$`, which `buildkite-agent pipeline upload` reads as an escaped `$`, so no step can set READTREE_TARGET to it: rename the folder or attribute".to_owned(),
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
    };
    let lines = [
        format!("{} {what}:", b.label),
        format!("  {}", b.error),
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
    }
}

/// One unit's build step (when the build phase is on) and extra steps.
type UnitSteps = (Option<Value>, Vec<(String, Value)>);

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
    for rendered in render_units(&units, &deps, build_enabled, settings) {
        let (build, extras) = rendered?;
        if let Some(step) = build {
            phase_steps
                .get_mut("build")
                .expect("build is enabled")
                .push(step);
        }
        for (phase, step) in extras {
            // Counted only when generated: inactive phases are not.
            if let Some(list) = phase_steps.get_mut(phase.as_str()) {
                extra_count += 1;
                list.push(step);
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

/// How many jobs a step creates: a group counts its inner steps.
fn job_weight(step: &Value) -> usize {
    step.get("steps")
        .and_then(Value::as_array)
        .map_or(1, |s| s.len().max(1))
}

/// Cut a phase's steps into chunks of at most `size` jobs each.
pub fn chunk(steps: &[Value], size: usize) -> Vec<Vec<Value>> {
    chunk_ranges(steps, size)
        .into_iter()
        .map(|r| steps[r].to_vec())
        .collect()
}

/// [`chunk`] as index ranges, so writing needs no copy of the steps.
fn chunk_ranges(steps: &[Value], size: usize) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut weight = 0;
    for (i, step) in steps.iter().enumerate() {
        let w = job_weight(step);
        if weight + w > size && i > start {
            chunks.push(start..i);
            start = i;
            weight = 0;
        }
        weight += w;
    }
    if start < steps.len() {
        chunks.push(start..steps.len());
    }
    chunks
}

/// A chunk file: `{"steps": [...]}`.
#[derive(Serialize)]
struct ChunkFile<'a> {
    steps: &'a [Value],
}

#[derive(Debug, Serialize)]
struct Manifest {
    version: u32,
    drvmap: &'static str,
    summary: &'static str,
    phases: Vec<ManifestPhase>,
}

#[derive(Debug, Serialize)]
struct ManifestPhase {
    name: String,
    steps: usize,
    chunks: Vec<String>,
}

/// Chunk file names sort in chunk order: `build-chunk-001.json`, … (TVL's
/// unpadded numbers sorted 1, 10, 11, 2).
fn chunk_name(phase: &str, n: usize, count: usize) -> String {
    let width = count.to_string().len().max(3);
    format!("{phase}-chunk-{n:0width$}.json")
}

/// Check before the (long) evaluation that the output folder can be
/// written, so a mistake fails at once; `write` checks again.
pub fn check_output(out: &Utf8Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!(
            "cannot write the folder {out}: a file of that name is in the way; remove it or choose another output folder"
        );
    }
    refuse_foreign_folder(out)?;
    crate::atomic::check_writable(out)
}

/// The output folder is replaced as a whole: refuse to replace one that
/// drvkite did not write (a mistyped `--out .` must not take the checkout).
fn refuse_foreign_folder(out: &Utf8Path) -> Result<()> {
    let Ok(mut entries) = out.read_dir_utf8() else {
        return Ok(());
    };
    if entries.next().is_some() && !out.join("manifest.json").is_file() {
        anyhow::bail!(
            "output folder {out} holds files but no manifest.json, so drvkite did not write it and will not replace it: choose another --out, or empty the folder"
        );
    }
    Ok(())
}

/// Write the pipeline folder: chunks, manifest, summary and derivation
/// map, all at once: a reader sees the previous folder or the new one.
pub fn write(
    pipeline: &Pipeline,
    drvmap: &DrvMap,
    out: &Utf8Path,
    chunk_size: usize,
) -> Result<Vec<String>> {
    write_with(pipeline, &drvmap.to_tvl_json(), out, chunk_size)
}

/// [`write`], with the derivation map serialised already (`drvmap.json`).
pub fn write_with(
    pipeline: &Pipeline,
    drvmap_json: &str,
    out: &Utf8Path,
    chunk_size: usize,
) -> Result<Vec<String>> {
    refuse_foreign_folder(out)?;
    let staged = crate::atomic::StagedDir::new(out)?;
    let mut files = Vec::new();
    let mut manifest = Manifest {
        version: 1,
        drvmap: "drvmap.json",
        summary: "summary.json",
        phases: Vec::new(),
    };
    let mut chunk_files: Vec<(String, ChunkFile)> = Vec::new();
    for (phase, steps) in &pipeline.phases {
        if steps.is_empty() {
            continue;
        }
        let chunks = chunk_ranges(steps, chunk_size);
        let mut names = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let name = chunk_name(phase, i + 1, chunks.len());
            let file = ChunkFile {
                steps: &steps[c.clone()],
            };
            chunk_files.push((name.clone(), file));
            names.push(name);
        }
        files.extend(names.iter().cloned());
        manifest.phases.push(ManifestPhase {
            name: phase.clone(),
            steps: steps.len(),
            chunks: names,
        });
    }
    // Serialising the steps is most of writing: chunks are independent,
    // so other threads take them while this one writes the rest.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let write_chunks = |part: &[(String, ChunkFile)]| -> Result<()> {
        part.iter()
            .try_for_each(|(name, file)| staged.write(name, &text::to_vec(file)?))
    };
    std::thread::scope(|scope| -> Result<()> {
        let per_thread = chunk_files.len().div_ceil(threads).max(1);
        let handles: Vec<_> = chunk_files
            .chunks(per_thread)
            .map(|part| scope.spawn(move || write_chunks(part)))
            .collect();
        let own = staged.write("drvmap.json", drvmap_json.as_bytes());
        for h in handles {
            h.join().expect("a writing thread panicked")?;
        }
        own
    })?;
    staged.write(
        "summary.json",
        serde_json::to_string_pretty(&pipeline.summary)?.as_bytes(),
    )?;
    staged.write(
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    staged.commit()?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_exactly_size_jobs() {
        let steps: Vec<Value> = (0..2000).map(|i| json!({ "key": i })).collect();
        let sizes: Vec<usize> = chunk(&steps, 192).iter().map(Vec::len).collect();
        assert_eq!(sizes[0], 192);
        assert_eq!(sizes.len(), 11);
        assert_eq!(sizes[10], 2000 - 10 * 192);
        let groups = vec![json!({"group": "g", "steps": [{}, {}]}); 3];
        assert_eq!(
            chunk(&groups, 4).iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 1]
        );
    }

    #[test]
    fn chunk_names_sort_numerically() {
        assert_eq!(chunk_name("build", 2, 11), "build-chunk-002.json");
        assert!(chunk_name("build", 10, 11) > chunk_name("build", 9, 11));
        assert_eq!(chunk_name("build", 7, 1200), "build-chunk-0007.json");
    }
}
