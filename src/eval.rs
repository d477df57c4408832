//! Evaluation: run `nix-instantiate` on drvkite's Nix expression to list a
//! depot's targets and write their `.drv` files to the store, building
//! nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;

use crate::drvmap::{DrvMap, Entry};
use crate::types::{AttrPath, DrvPath, Label};

const EVAL_NIX: &str = include_str!("../nix/eval.nix");
const READTREE_NIX: &str = include_str!("../nix/readTree/default.nix");

/// The Nix tools drvkite runs, located on PATH.
#[derive(Debug, Clone)]
pub struct Nix {
    pub instantiate: PathBuf,
}

impl Nix {
    pub fn locate() -> Result<Self> {
        match which::which("nix-instantiate") {
            Ok(instantiate) => Ok(Nix { instantiate }),
            Err(_) => bail!(
                "nix-instantiate not found on PATH: install Nix (on Debian: apt-get install nix-bin) or add its bin folder to PATH"
            ),
        }
    }
}

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
}

#[derive(Debug, Default)]
pub struct Evaluation {
    pub targets: Vec<Target>,
    pub broken: Vec<BrokenTarget>,
    /// The depot's pipeline settings attribute, if it has one.
    pub settings: Option<serde_json::Value>,
    pub duration: Duration,
}

impl Evaluation {
    pub fn drvmap(&self) -> DrvMap {
        DrvMap::from_entries(self.targets.iter().map(|t| {
            (
                t.label.clone(),
                Entry {
                    attr_path: t.attr_path.clone(),
                    drv_path: t.drv_path.clone(),
                },
            )
        }))
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub depot: Utf8PathBuf,
    /// Stop at the first broken target instead of reporting it and going on.
    pub fail_on_error: bool,
    /// Attribute path of the depot's pipeline settings.
    pub settings_attr: Vec<String>,
}

impl EvalOptions {
    pub fn new(depot: impl Into<Utf8PathBuf>) -> Self {
        EvalOptions {
            depot: depot.into(),
            fail_on_error: false,
            settings_attr: vec!["ci".into(), "drvkite".into()],
        }
    }
}

/// What one `nix-instantiate` run is asked for.
#[derive(Debug, Clone)]
struct Request {
    shard: (usize, usize),
    only: Option<Vec<Label>>,
    labels_only: bool,
    catch_errors: bool,
}

#[derive(Debug, Deserialize)]
struct RawOutput {
    targets: Vec<serde_json::Value>,
    settings: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHeader {
    label: Label,
    attr_path: AttrPath,
    #[serde(default)]
    failed: bool,
}

/// drvkite's Nix files, unpacked into a temporary folder for Nix to read.
struct Expression {
    dir: tempfile::TempDir,
}

impl Expression {
    fn unpack() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("drvkite-nix-")
            .tempdir()
            .context("cannot create a temporary folder for drvkite's Nix files")?;
        std::fs::create_dir(dir.path().join("readTree"))?;
        std::fs::write(dir.path().join("eval.nix"), EVAL_NIX)?;
        std::fs::write(dir.path().join("readTree/default.nix"), READTREE_NIX)?;
        Ok(Expression { dir })
    }

    fn eval_file(&self) -> PathBuf {
        self.dir.path().join("eval.nix")
    }
}

/// Check the depot path before Nix sees it, so mistakes get a plain answer.
pub fn check_depot(depot: &Utf8Path) -> Result<Utf8PathBuf> {
    let abs = depot
        .canonicalize_utf8()
        .with_context(|| format!("depot {depot} does not exist: pass the folder holding the depot's default.nix with --depot"))?;
    if !abs.join("default.nix").is_file() {
        bail!(
            "depot {depot} has no default.nix: pass the root folder of a readTree depot with --depot"
        );
    }
    Ok(abs)
}

pub struct Evaluator {
    nix: Nix,
    expr: Expression,
    depot: Utf8PathBuf,
    settings_attr: Vec<String>,
}

impl Evaluator {
    pub fn new(nix: Nix, depot: &Utf8Path, settings_attr: Vec<String>) -> Result<Self> {
        Ok(Evaluator {
            nix,
            expr: Expression::unpack()?,
            depot: check_depot(depot)?,
            settings_attr,
        })
    }

    async fn run(&self, req: &Request) -> Result<RawOutput, NixError> {
        let mut cmd = tokio::process::Command::new(&self.nix.instantiate);
        cmd.arg("--eval")
            .arg("--strict")
            .arg("--json")
            .arg("--read-write-mode")
            .arg(self.expr.eval_file())
            .arg("--argstr")
            .arg("depotPathStr")
            .arg(self.depot.as_str())
            .arg("--arg")
            .arg("shardIndex")
            .arg(req.shard.0.to_string())
            .arg("--arg")
            .arg("shardCount")
            .arg(req.shard.1.to_string())
            .arg("--argstr")
            .arg("mode")
            .arg(if req.labels_only { "labels" } else { "full" })
            .arg("--arg")
            .arg("catchErrors")
            .arg(if req.catch_errors { "true" } else { "false" })
            .arg("--argstr")
            .arg("settingsAttrJSON")
            .arg(serde_json::to_string(&self.settings_attr).expect("strings serialise"));
        if let Some(only) = &req.only {
            cmd.arg("--argstr")
                .arg("onlyLabelsJSON")
                .arg(serde_json::to_string(only).expect("labels serialise"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = cmd
            .output()
            .await
            .map_err(|e| NixError::Spawn(e.to_string()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(NixError::Failed(trim_nix_error(
                &stderr,
                self.expr.dir.path(),
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| NixError::Failed(format!("unexpected output from nix-instantiate: {e}")))
    }

    /// Evaluate the one target with this label.
    pub async fn evaluate_one(&self, label: &Label) -> Result<Target> {
        let req = Request {
            shard: (0, 1),
            only: Some(vec![label.clone()]),
            labels_only: false,
            catch_errors: false,
        };
        let raw = self
            .run(&req)
            .await
            .map_err(|e| e.into_anyhow(&self.depot))?;
        let value = raw.targets.into_iter().next().with_context(|| {
            format!(
                "depot {} has no target {label}: check the label (e.g. tools/foo or tools/foo:sub)",
                self.depot
            )
        })?;
        serde_json::from_value(value)
            .context("unexpected target record from drvkite's Nix expression")
    }

    /// Evaluate every target of the depot.
    pub async fn evaluate(&self, fail_on_error: bool) -> Result<Evaluation> {
        let started = Instant::now();
        let req = Request {
            shard: (0, 1),
            only: None,
            labels_only: false,
            catch_errors: !fail_on_error,
        };
        let raw = self
            .run(&req)
            .await
            .map_err(|e| e.into_anyhow(&self.depot))?;
        let mut eval = Evaluation {
            settings: raw.settings,
            ..Default::default()
        };
        let mut failed = Vec::new();
        for value in raw.targets {
            let header: RawHeader = serde_json::from_value(value.clone())
                .context("unexpected target record from drvkite's Nix expression")?;
            if header.failed {
                failed.push(header);
                continue;
            }
            let target: Target = serde_json::from_value(value).with_context(|| {
                format!(
                    "unexpected record for target {} from drvkite's Nix expression",
                    header.label
                )
            })?;
            eval.targets.push(target);
        }
        // tryEval says that a target failed, not why: evaluate each failed
        // target alone without it to get Nix's message.
        for header in failed {
            let req = Request {
                shard: (0, 1),
                only: Some(vec![header.label.clone()]),
                labels_only: false,
                catch_errors: false,
            };
            let error = match self.run(&req).await {
                Err(NixError::Failed(msg)) => msg,
                Err(e) => return Err(e.into_anyhow(&self.depot)),
                Ok(_) => "evaluation failed (Nix gave no message)".to_owned(),
            };
            eval.broken.push(BrokenTarget {
                label: header.label,
                attr_path: header.attr_path,
                error,
            });
        }
        eval.duration = started.elapsed();
        Ok(eval)
    }
}

#[derive(Debug)]
enum NixError {
    Spawn(String),
    Failed(String),
}

impl NixError {
    fn into_anyhow(self, depot: &Utf8Path) -> anyhow::Error {
        match self {
            NixError::Spawn(e) => anyhow::anyhow!("cannot run nix-instantiate: {e}"),
            NixError::Failed(e) => {
                anyhow::anyhow!("evaluating depot {depot} failed: {e}")
            }
        }
    }
}

/// Reduce Nix's multi-line error report to one line: the `error:` message
/// and the first location in the user's files (drvkite's own are noise).
pub fn trim_nix_error(stderr: &str, internal_dir: &std::path::Path) -> String {
    let internal = internal_dir.to_string_lossy();
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(start) = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("error:"))
    else {
        let last = lines.iter().rev().find(|l| !l.trim().is_empty());
        return last.map_or_else(
            || "nix-instantiate failed without a message".to_owned(),
            |l| l.trim().to_owned(),
        );
    };
    let first = lines[start].trim();
    let mut message = vec![
        first
            .strip_prefix("error:")
            .unwrap_or(first)
            .trim()
            .to_owned(),
    ];
    message.extend(
        lines[start + 1..]
            .iter()
            .map(|l| l.trim())
            .take_while(|t| !t.is_empty() && !t.starts_with("at "))
            .map(str::to_owned),
    );
    let location = lines[start + 1..]
        .iter()
        .filter_map(|l| l.trim().strip_prefix("at "))
        .map(|at| at.trim_end_matches(':'))
        .find(|at| !at.contains(internal.as_ref()) && !at.starts_with('«'));
    let mut s = message.join(" ");
    if let Some(loc) = location {
        s.push_str(&format!(" (at {loc})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_nix_errors_to_one_line() {
        let stderr = "error: attribute 'nope' missing\n\n       at /depot/tools/a.nix:3:5:\n\n            2| { depot, ... }:\n            3|   depot.nope\n             |   ^\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "attribute 'nope' missing (at /depot/tools/a.nix:3:5)"
        );
    }

    #[test]
    fn skips_internal_locations() {
        let stderr = "error: boom\n\n       at /tmp/drvkite-nix-x/eval.nix:10:3:\n\n       at /depot/b.nix:1:1:\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "boom (at /depot/b.nix:1:1)"
        );
    }
}
