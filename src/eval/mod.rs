//! Evaluation: run `nix-instantiate` on drvkite's Nix expression
//! (nix/eval.nix) to list a depot's targets and write their `.drv` files
//! to the store, building nothing.
//!
//! The flow, one module per concern:
//!
//! 1. [`nix`]: locate `nix-instantiate`, unpack drvkite's Nix files, check
//!    the depot path.
//! 2. [`schedule`]: evaluate the target list in slices, one [`run`] of
//!    `nix-instantiate` each, streaming every target's record
//!    ([`records`]) as Nix evaluates it; split failed slices until their
//!    broken targets stand alone.
//! 3. [`walk`]: when the list itself fails, find the broken readTree
//!    nodes, hide their files, and schedule again (`Evaluator::isolate`).
//! 4. [`tuning`]: workers, the memory bound and progress, for all of it.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use camino::{Utf8Path, Utf8PathBuf};

use crate::drvmap::{DrvMap, Entry};
use crate::types::{DrvPath, Label};

mod nix;
mod records;
mod run;
mod schedule;
mod trace;
mod tuning;
mod walk;

pub use nix::{Nix, READTREE_NIX, check_depot, trim_nix_error};
pub use records::{BrokenKind, BrokenTarget, RawCommand, RawExtraStep, Target};
pub use tuning::{ByteSize, Tuning, default_workers};

use nix::Expression;
use records::Record;
use run::{Outcome, Request, Runner, stream_tag};
use schedule::ListFailed;
use tuning::Progress;
use walk::Scope;

#[derive(Debug, Default)]
pub struct Evaluation {
    pub targets: Vec<Target>,
    /// Targets that failed to evaluate, and readTree nodes (files) that
    /// failed so that their targets could not even be listed.
    pub broken: Vec<BrokenTarget>,
    /// What the user should know about, such as a deprecated attribute
    /// in use.
    pub warnings: Vec<String>,
    /// The depot's pipeline settings attribute, if it has one.
    pub settings: Option<serde_json::Value>,
    pub duration: Duration,
}

impl Evaluation {
    /// Every .drv the evaluation wrote that steps build: targets,
    /// extra-step commands and parent overrides.
    pub fn drv_paths(&self) -> BTreeSet<&DrvPath> {
        let mut all = BTreeSet::new();
        for t in &self.targets {
            all.insert(&t.drv_path);
            for s in t.extra_steps.values() {
                for c in [&s.command, &s.parent_override].into_iter().flatten() {
                    all.extend(c.drv_path.as_ref());
                }
            }
        }
        all
    }

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

/// Called with each target as soon as Nix has evaluated it (its .drv
/// files are written by then), so that later work can start while Nix goes
/// on: reading the derivation graph.
pub type TargetHook = Arc<dyn Fn(&Target) + Send + Sync>;

pub struct Evaluator {
    expr: Expression,
    runner: Arc<Runner>,
    workers: usize,
}

impl Evaluator {
    pub fn new(nix: Nix, depot: &Utf8Path, settings_attr: Vec<String>) -> Result<Self> {
        let expr = Expression::unpack()?;
        let runner = Runner {
            instantiate: nix.instantiate,
            internal_dir: expr.dir.path().to_owned(),
            depot: check_depot(depot)?,
            settings_attr,
            targets_attr: None,
            max_memory: None,
            progress: None,
            tag: stream_tag(),
            warnings: Default::default(),
        };
        Ok(Evaluator {
            expr,
            runner: Arc::new(runner),
            workers: default_workers(),
        })
    }

    /// Read the targets from this depot attribute (`--targets-attr`)
    /// instead of the `targetsAttr` setting or `ci.targets`.
    pub fn with_targets_attr(mut self, attr: Option<Vec<String>>) -> Self {
        let runner = Arc::get_mut(&mut self.runner).expect("runner not shared yet");
        runner.targets_attr = attr;
        self
    }

    /// Set the number of processes, their memory bound and progress.
    pub fn with_tuning(mut self, tuning: &Tuning) -> Self {
        let runner = Arc::get_mut(&mut self.runner).expect("runner not shared yet");
        runner.max_memory = tuning.max_memory.clone();
        runner.progress = tuning.progress.then(|| {
            Arc::new(Progress {
                done: AtomicUsize::new(0),
                total: AtomicUsize::new(0),
                started: Instant::now(),
                tty: std::io::stderr().is_terminal(),
            })
        });
        self.workers = tuning.workers.max(1);
        self
    }

    /// Evaluate the one target with this label.
    pub async fn evaluate_one(&self, label: &Label) -> Result<Target> {
        Ok(self.evaluate_one_with_settings(label).await?.0)
    }

    /// [`Evaluator::evaluate_one`], and the depot's pipeline settings.
    pub async fn evaluate_one_with_settings(
        &self,
        label: &Label,
    ) -> Result<(Target, Option<serde_json::Value>)> {
        let req = Request {
            shard: (0, 1),
            only: Some(vec![label.clone()]),
            labels_only: false,
            catch_errors: false,
            scope: Arc::default(),
            walk: None,
        };
        let raw = match self.runner.run(&req, None).await? {
            Outcome::Done(raw) => raw,
            Outcome::Failed(message) => {
                bail!("evaluating depot {} failed: {message}", self.runner.depot)
            }
            Outcome::OutOfMemory => bail!(
                "evaluating {label} in depot {} failed: {}",
                self.runner.depot,
                self.runner.memory_message()
            ),
        };
        match raw.records.into_iter().next() {
            Some(Record::Target(t)) => Ok((*t, raw.settings)),
            Some(Record::Invalid(_, problem)) => {
                bail!("{label} in depot {}: {problem}", self.runner.depot)
            }
            Some(Record::Failed(_)) => bail!(
                "evaluating {label} in depot {} failed without a message from Nix",
                self.runner.depot
            ),
            None => bail!(
                "depot {} has no target {label}: check the label (e.g. tools/foo or tools/foo:sub)",
                self.runner.depot
            ),
        }
    }

    /// Evaluate every target of the depot in `workers` processes, each on a
    /// slice of the target list. A target that fails to evaluate becomes a
    /// broken target (or, with `fail_on_error`, fails the run); the order
    /// of the result is the target list's, whatever the number of workers.
    pub async fn evaluate(&self, fail_on_error: bool) -> Result<Evaluation> {
        self.evaluate_into(fail_on_error, None).await
    }

    /// [`Evaluator::evaluate`], calling `hook` with each target as soon as
    /// Nix has evaluated it; also for runs whose results are then dropped
    /// (a shard that fails later is evaluated again): the result alone is
    /// the evaluation's.
    pub async fn evaluate_into(
        &self,
        fail_on_error: bool,
        hook: Option<TargetHook>,
    ) -> Result<Evaluation> {
        let started = Instant::now();
        let ticker = self.runner.progress.clone().map(|p| {
            tokio::spawn(async move {
                let every = Duration::from_millis(if p.tty { 200 } else { 5000 });
                loop {
                    tokio::time::sleep(every).await;
                    p.show();
                }
            })
        });
        let result = self.isolate(fail_on_error, hook).await;
        if let Some(t) = ticker {
            t.abort();
            let _ = t.await;
        }
        if let Some(p) = &self.runner.progress {
            // Traces count what evaluated; broken targets are done too.
            if let Ok(e) = &result {
                p.done
                    .store(e.targets.len() + e.broken.len(), Ordering::Relaxed);
            }
            p.finish();
        }
        let mut eval = result?;
        eval.duration = started.elapsed();
        Ok(eval)
    }

    /// The slice schedule over the whole target list (see [`schedule`]).
    async fn schedule(
        &self,
        fail_on_error: bool,
        hook: Option<TargetHook>,
        scope: Scope,
    ) -> Result<Evaluation> {
        schedule::run(
            &self.runner,
            self.workers,
            fail_on_error,
            hook,
            Arc::new(scope),
        )
        .await
    }

    /// Evaluate; when the target list itself fails, find the broken readTree
    /// nodes (see [`walk`]), hide them and evaluate again: each becomes a
    /// broken target of its own, and every healthy target is still listed.
    async fn isolate(&self, fail_on_error: bool, hook: Option<TargetHook>) -> Result<Evaluation> {
        let mut scope = Scope::default();
        let mut nodes: Vec<BrokenTarget> = Vec::new();
        loop {
            let error = match self
                .schedule(fail_on_error, hook.clone(), scope.clone())
                .await
            {
                Ok(mut eval) => {
                    nodes.append(&mut eval.broken);
                    eval.broken = nodes;
                    let printed = std::mem::take(
                        &mut *self
                            .runner
                            .warnings
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()),
                    );
                    eval.warnings.extend(printed);
                    return Ok(eval);
                }
                Err(e) => e.downcast::<ListFailed>()?,
            };
            let ListFailed(message) = error;
            let depot_error =
                || anyhow!("evaluating depot {} failed: {message}", self.runner.depot);
            // The walk covers every node of the depot with the broken ones
            // hidden: once it has run, a list that still fails fails in
            // the depot's own code (its definition, or a rule forcing more
            // of the nodes than gather does). A guessed list could hold
            // targets the depot leaves out: no guess.
            if fail_on_error || !scope.hidden.is_empty() {
                return Err(depot_error());
            }
            let found = walk::find_broken_nodes(&self.runner, &scope).await?;
            if found.is_empty() {
                return Err(depot_error());
            }
            for node in found {
                scope.hide(&node.file);
                nodes.push(node.into_broken());
            }
        }
    }

    /// Make every instantiated .drv (targets, extra-step commands and
    /// parent overrides) a GC root through one link, `<dir>/drvkite-drvs`
    /// (see [`Expression::register_gc_roots`]).
    pub async fn register_gc_roots(&self, eval: &Evaluation, dir: &Utf8Path) -> Result<usize> {
        self.expr
            .register_gc_roots(&self.runner.instantiate, eval, dir)
            .await
    }
}
