//! The slice schedule: which `nix-instantiate` runs evaluate the target
//! list, and what to do with each outcome. Slices that fail are listed and
//! split in halves until their broken targets stand alone; targets tryEval
//! caught are evaluated alone for Nix's message; a list that fails as a
//! whole is handed back for the node walk.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use tokio::task::JoinSet;

use super::records::{RawHeader, RawOutput, Record};
use super::run::{Outcome, Request, Runner};
use super::walk::Scope;
use super::{BrokenKind, BrokenTarget, Evaluation, Target, TargetHook};
use crate::types::Label;

/// A target list that failed to evaluate, with Nix's message: the
/// evaluation looks for broken nodes rather than failing.
#[derive(Debug)]
pub(super) struct ListFailed(pub(super) String);

impl std::fmt::Display for ListFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the target list failed to evaluate: {}", self.0)
    }
}

impl std::error::Error for ListFailed {}

/// A slice of the target list to evaluate. `key` orders results: the
/// top-level shards are 0..n, the halves of an item extend its key with
/// 0 and 1, and records within an item extend it with their index, so
/// sorting by key gives the full target-list order whatever the split.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub(super) key: Vec<u32>,
    pub(super) shard: (usize, usize),
    /// The item's targets, once listed: its runs select them by label.
    pub(super) headers: Option<Vec<RawHeader>>,
}

impl Item {
    pub(super) fn child(&self, n: usize) -> Vec<u32> {
        let mut key = self.key.clone();
        key.push(n as u32);
        key
    }
}

#[derive(Debug)]
pub(super) enum Job {
    /// Evaluate an item in full, catching what tryEval catches.
    Eval(Item),
    /// List an item whose full evaluation failed (`cause`, `None` for
    /// memory) to split it.
    List(Item, Option<String>),
    /// Evaluate one target tryEval caught, uncaught, to get Nix's message.
    Explain(Item, Vec<u32>, RawHeader),
}

impl Job {
    pub(super) fn request(&self, scope: &Arc<Scope>) -> Request {
        let (shard, only, labels_only, catch_errors) = match self {
            Job::Eval(item) => (
                item.shard,
                item.headers.as_ref().map(|h| labels_of(h)),
                false,
                true,
            ),
            Job::List(item, _) => (item.shard, None, true, true),
            Job::Explain(item, _, header) => {
                (item.shard, Some(vec![header.label.clone()]), false, false)
            }
        };
        Request {
            shard,
            only,
            labels_only,
            catch_errors,
            scope: Arc::clone(scope),
            walk: None,
        }
    }
}

/// The distinct labels of some targets, in order.
pub(super) fn labels_of(headers: &[RawHeader]) -> Vec<Label> {
    let mut seen = std::collections::HashSet::new();
    headers
        .iter()
        .filter(|h| seen.insert(h.label.clone()))
        .map(|h| h.label.clone())
        .collect()
}

pub(super) enum Found {
    Target(Box<Target>),
    Broken(BrokenTarget),
}

/// The state of one evaluation: jobs to run and what they found.
pub(super) struct Schedule<'a> {
    pub(super) runner: &'a Runner,
    pub(super) fail_on_error: bool,
    pub(super) queue: VecDeque<Job>,
    pub(super) found: Vec<(Vec<u32>, Found)>,
    pub(super) settings: Option<serde_json::Value>,
}

impl Schedule<'_> {
    pub(super) fn depot_error(&self, message: &str) -> anyhow::Error {
        anyhow!("evaluating depot {} failed: {message}", self.runner.depot)
    }

    pub(super) fn broken(&mut self, key: Vec<u32>, header: RawHeader, error: String) -> Result<()> {
        if self.fail_on_error {
            bail!(
                "target {} of depot {} failed to evaluate: {error}",
                header.label,
                self.runner.depot
            );
        }
        self.found.push((
            key,
            Found::Broken(BrokenTarget {
                label: header.label,
                attr_path: header.attr_path,
                error,
                kind: BrokenKind::Evaluation,
            }),
        ));
        Ok(())
    }

    pub(super) fn keep_settings(&mut self, item: &Item, raw: &mut RawOutput) {
        if item.shard.0 == 0 && self.settings.is_none() {
            self.settings = raw.settings.take();
        }
    }

    /// An item whose targets are known failed (`cause`; `None`: memory):
    /// one label left is the culprit, more are split in halves.
    pub(super) fn narrow(
        &mut self,
        item: Item,
        headers: Vec<RawHeader>,
        cause: Option<String>,
    ) -> Result<()> {
        let labels = labels_of(&headers);
        if labels.len() <= 1 {
            let error = cause.unwrap_or_else(|| self.runner.memory_message());
            for (i, h) in headers.into_iter().enumerate() {
                self.broken(item.child(i), h, error.clone())?;
            }
            return Ok(());
        }
        let first: std::collections::HashSet<&Label> = labels[..labels.len() / 2].iter().collect();
        let (a, b): (Vec<RawHeader>, Vec<RawHeader>) = headers
            .iter()
            .cloned()
            .partition(|h| first.contains(&h.label));
        for (n, half) in [a, b].into_iter().enumerate() {
            self.queue.push_back(Job::Eval(Item {
                key: item.child(n),
                shard: item.shard,
                headers: Some(half),
            }));
        }
        Ok(())
    }

    /// Take what a run found; `listed`: whether it got as far as the length
    /// of the target list.
    pub(super) fn handle(&mut self, job: Job, outcome: Outcome, listed: bool) -> Result<()> {
        match (job, outcome) {
            (Job::Eval(item), Outcome::Done(mut raw)) => {
                self.keep_settings(&item, &mut raw);
                for (i, record) in raw.records.into_iter().enumerate() {
                    match record {
                        Record::Target(t) => self.found.push((item.child(i), Found::Target(t))),
                        // tryEval says that it failed, not why.
                        Record::Failed(header) => {
                            self.queue
                                .push_back(Job::Explain(item.clone(), item.child(i), header))
                        }
                        Record::Invalid(header, problem) => {
                            self.broken(item.child(i), header, problem)?
                        }
                    }
                }
            }
            // Died before the list was whole: listing it again would die
            // the same way.
            (Job::Eval(item), Outcome::Failed(message)) if item.headers.is_none() && !listed => {
                return Err(anyhow::Error::new(ListFailed(message)));
            }
            (Job::Eval(item), failure) => {
                let cause = match failure {
                    Outcome::Failed(message) => Some(message),
                    _ => None,
                };
                match item.headers.clone() {
                    Some(headers) => self.narrow(item, headers, cause)?,
                    None => self.queue.push_back(Job::List(item, cause)),
                }
            }
            (Job::List(item, cause), Outcome::Done(mut raw)) => {
                self.keep_settings(&item, &mut raw);
                let headers = raw.headers;
                if headers.is_empty() {
                    // Failed without targets: the failure is the depot's.
                    return Err(self.depot_error(
                        cause
                            .as_deref()
                            .unwrap_or("nix-instantiate ran out of memory"),
                    ));
                }
                self.narrow(item, headers, cause)?;
            }
            // The list itself fails: its broken nodes are looked for.
            (Job::List(..), Outcome::Failed(message)) => {
                return Err(anyhow::Error::new(ListFailed(message)));
            }
            (Job::List(..), Outcome::OutOfMemory) => {
                return Err(match &self.runner.max_memory {
                    Some(max) => anyhow!(
                        "evaluating depot {} needs more memory than --max-memory {max} allows just to list its targets: raise --max-memory",
                        self.runner.depot
                    ),
                    None => {
                        self.depot_error("nix-instantiate ran out of memory listing the targets")
                    }
                });
            }
            (Job::Explain(_, key, header), Outcome::Done(raw)) => {
                match raw.records.into_iter().next() {
                    // Fine when evaluated alone: a healthy target after all.
                    Some(Record::Target(t)) => self.found.push((key, Found::Target(t))),
                    Some(Record::Invalid(header, problem)) => self.broken(key, header, problem)?,
                    // Not caught, so not expected; and no message either.
                    Some(Record::Failed(_)) | None => self.broken(
                        key,
                        header,
                        "evaluation failed (Nix gave no message)".to_owned(),
                    )?,
                }
            }
            (Job::Explain(_, key, header), Outcome::Failed(message)) => {
                self.broken(key, header, message)?
            }
            (Job::Explain(_, key, header), Outcome::OutOfMemory) => {
                let message = self.runner.memory_message();
                self.broken(key, header, message)?
            }
        }
        Ok(())
    }
}

/// Evaluate every target in `workers` processes, each on a slice of the
/// target list; slices that fail are split, and targets tryEval caught are
/// explained, until every target is found or broken. The result is in
/// target-list order whatever the number of workers.
pub(super) async fn run(
    runner: &Arc<Runner>,
    workers: usize,
    fail_on_error: bool,
    hook: Option<TargetHook>,
    scope: Arc<Scope>,
) -> Result<Evaluation> {
    let n = workers;
    let mut s = Schedule {
        runner,
        fail_on_error,
        queue: (0..n)
            .map(|i| {
                Job::Eval(Item {
                    key: vec![i as u32],
                    shard: (i, n),
                    headers: None,
                })
            })
            .collect(),
        found: Vec::new(),
        settings: None,
    };
    // Dropping the set (on error) kills the children still running.
    let mut running = JoinSet::new();
    loop {
        while running.len() < n {
            let Some(job) = s.queue.pop_front() else {
                break;
            };
            let runner = Arc::clone(runner);
            let hook = hook.clone();
            let request = job.request(&scope);
            running.spawn(async move {
                let outcome = runner.run_traced(&request, hook.as_ref()).await;
                (job, outcome)
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (job, outcome) = joined.context("an evaluation task failed")?;
        let (outcome, trail) = outcome?;
        s.handle(job, outcome, trail.listed())?;
    }
    s.found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut eval = Evaluation {
        settings: s.settings,
        ..Default::default()
    };
    for (_, f) in s.found {
        match f {
            Found::Target(t) => eval.targets.push(*t),
            Found::Broken(b) => eval.broken.push(b),
        }
    }
    Ok(eval)
}
