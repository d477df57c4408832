//! The concurrent check: derivations arrive while Nix is still evaluating
//! (the pipeline's target hook), a bounded set of threads looks their
//! outputs up over keep-alive connections, and [`Checker::finish`] gives
//! the verdicts once the last one is in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::Options;
use super::cache::{self, Cache, Failure, Lookup};
use super::config::NixConfig;
use super::narinfo::{NarInfo, TrustedKeys};
use super::netrc::Netrc;
use crate::types::{DrvPath, StorePath};

/// Most lookups in flight when Nix's `http-connections` sets no bound.
const MAX_CONNECTIONS: usize = 64;

/// What one cache answered for one output path.
#[derive(Debug)]
pub enum Answer {
    /// A narinfo for this path, signed by a trusted key if Nix requires it.
    Valid,
    Missing,
    Failed(Failure),
}

/// One output of a derivation and what each cache asked said, in order,
/// up to the first that has it.
#[derive(Debug)]
pub struct OutputCheck {
    pub output: String,
    /// `None`: the path is not known before the build (content-addressed).
    pub path: Option<StorePath>,
    /// Index into the cache names, and the answer.
    pub answers: Vec<(usize, Answer)>,
}

impl OutputCheck {
    /// The cache that has this output.
    pub fn found_in(&self) -> Option<usize> {
        self.answers
            .iter()
            .find_map(|(i, a)| matches!(a, Answer::Valid).then_some(*i))
    }
}

/// Nix's settings resolved into caches to ask.
struct Setup {
    caches: Vec<Cache>,
    /// `None` when Nix does not require signatures.
    keys: Option<TrustedKeys>,
    agent: ureq::Agent,
    connections: usize,
    /// Caches left out, and why; settings worth a word.
    notes: Vec<String>,
}

impl Setup {
    fn new(opts: &Options) -> Result<Self> {
        Self::with_config(opts, NixConfig::query()?)
    }

    fn with_config(opts: &Options, config: NixConfig) -> Result<Self> {
        let mut notes = Vec::new();
        let urls = if !config.substitute {
            notes.push("Nix's `substitute` setting is false, so Nix substitutes nothing".into());
            Vec::new()
        } else {
            opts.substituters
                .clone()
                .unwrap_or_else(|| config.substituters.clone())
        };
        let keys = if config.require_sigs {
            let keys = TrustedKeys::parse(&config.trusted_public_keys)?;
            if keys.is_empty() {
                notes.push(
                    "require-sigs is on and trusted-public-keys is empty: no narinfo can be trusted"
                        .into(),
                );
            }
            Some(keys)
        } else {
            None
        };
        let netrc = config
            .netrc_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| Netrc::parse(&t))
            .unwrap_or_default();
        let connections = match config.http_connections {
            0 => MAX_CONNECTIONS,
            n => n.min(MAX_CONNECTIONS),
        };
        let connect_timeout =
            (config.connect_timeout > 0).then(|| Duration::from_secs(config.connect_timeout));
        let agent = cache::agent(
            connections,
            opts.timeout,
            connect_timeout,
            config.ssl_cert_file.as_deref(),
        );
        let all: Vec<Cache> = urls.iter().map(|u| Cache::new(u, &netrc)).collect();
        // One request each; a slow cache must not hold up the others.
        std::thread::scope(|s| {
            for c in &all {
                s.spawn(|| c.open(&agent));
            }
        });
        let mut caches = Vec::new();
        for c in all {
            match c.unusable() {
                Some(why) => notes.push(format!("substituter {} not asked: {why}", c.name)),
                None => caches.push(c),
            }
        }
        Ok(Setup {
            caches,
            keys,
            agent,
            connections,
            notes,
        })
    }

    fn names(&self) -> Vec<String> {
        self.caches.iter().map(|c| c.name.clone()).collect()
    }

    fn validate(&self, text: &str, path: &StorePath) -> Answer {
        match NarInfo::parse(text) {
            Err(e) => Answer::Failed(Failure::Narinfo(format!("{e:#}"))),
            Ok(info) if info.store_path != *path => Answer::Failed(Failure::Narinfo(format!(
                "it is the narinfo of {}",
                info.store_path
            ))),
            Ok(info) => match &self.keys {
                Some(keys) if !info.signed_by(keys) => Answer::Failed(Failure::Signature),
                _ => Answer::Valid,
            },
        }
    }

    /// Ask the caches in order, up to the first with a valid narinfo.
    fn check_path(&self, path: &StorePath) -> Vec<(usize, Answer)> {
        let mut answers = Vec::new();
        for (i, c) in self.caches.iter().enumerate() {
            let answer = match c.narinfo(&self.agent, path.hash()) {
                Lookup::Found(text) => self.validate(&text, path),
                Lookup::Missing => Answer::Missing,
                Lookup::Failed(f) => Answer::Failed(f),
            };
            let valid = matches!(answer, Answer::Valid);
            answers.push((i, answer));
            if valid {
                break;
            }
        }
        answers
    }

    /// Check the outputs of a derivation; with `all` false, stop at the
    /// first output no cache has.
    fn check_drv(&self, drv: &DrvPath, all: bool) -> Result<Vec<OutputCheck>> {
        let mut checks = Vec::new();
        for (output, path) in crate::graph::read_outputs(drv)? {
            let answers = path
                .as_ref()
                .map(|p| self.check_path(p))
                .unwrap_or_default();
            let check = OutputCheck {
                output,
                path,
                answers,
            };
            let found = check.found_in().is_some();
            checks.push(check);
            if !found && !all {
                break;
            }
        }
        Ok(checks)
    }
}

/// The cache every output is in (the first output's), if all are.
fn verdict(checks: &[OutputCheck]) -> Option<usize> {
    let mut found = checks.iter().map(OutputCheck::found_in);
    let first = found.next()??;
    found.all(|f| f.is_some()).then_some(first)
}

/// The verdicts, and what went wrong on the way.
#[derive(Debug, Default)]
pub struct Report {
    /// Names of the caches asked, in order.
    pub caches: Vec<String>,
    found: HashMap<DrvPath, usize>,
    /// Derivations checked.
    pub checked: usize,
    /// Failed lookups by kind (see [`Failure::kind`]).
    pub failures: BTreeMap<&'static str, usize>,
    /// Caches left out or disabled, and why; settings worth a word.
    pub notes: Vec<String>,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
}

impl Report {
    /// The name of the cache that has every output of `drv`.
    pub fn cache_of(&self, drv: &DrvPath) -> Option<&str> {
        self.found.get(drv).map(|&i| self.caches[i].as_str())
    }

    /// How many derivations are cached.
    pub fn cached(&self) -> usize {
        self.found.len()
    }

    /// One line for everything that went wrong, if anything did.
    pub fn warning(&self) -> Option<String> {
        let total: usize = self.failures.values().sum();
        let mut parts = Vec::new();
        if total > 0 {
            let kinds: Vec<String> = self
                .failures
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            let lookups = if total == 1 { "lookup" } else { "lookups" };
            parts.push(format!(
                "{total} binary cache {lookups} failed ({})",
                kinds.join(", ")
            ));
        }
        parts.extend(self.notes.iter().cloned());
        (!parts.is_empty()).then(|| {
            format!(
                "--skip-cached: {}; targets not found for sure are built, not skipped",
                parts.join("; ")
            )
        })
    }

    /// What summary.json keeps of the check.
    pub fn summary(&self) -> CheckSummary {
        CheckSummary {
            caches: self.caches.clone(),
            checked: self.checked,
            cached: self.cached(),
            seconds: match (self.started, self.finished) {
                (Some(s), Some(f)) => (f - s).as_secs_f64(),
                _ => 0.0,
            },
            warning: self.warning(),
        }
    }

    fn failed(why: String) -> Self {
        Report {
            notes: vec![why],
            ..Default::default()
        }
    }
}

/// The check in summary.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckSummary {
    /// The caches asked, in order.
    pub caches: Vec<String>,
    /// Derivations checked, and found in a cache.
    pub checked: usize,
    pub cached: usize,
    /// From the start of the check (with the evaluation) to its end.
    pub seconds: f64,
    #[serde(default)]
    pub warning: Option<String>,
}

/// Checks derivations sent to it on threads of its own.
pub struct Checker {
    sender: Option<Sender<DrvPath>>,
    thread: std::thread::JoinHandle<Report>,
}

impl Checker {
    /// Start: read Nix's configuration and open the caches while the first
    /// derivations arrive.
    pub fn start(opts: Options) -> Self {
        let (sender, arrivals) = channel();
        let thread = std::thread::spawn(move || run(&opts, arrivals));
        Checker {
            sender: Some(sender),
            thread,
        }
    }

    /// Where to send derivations (each is checked once, however often
    /// sent). Every sender must be gone before `finish`.
    pub fn sender(&self) -> Sender<DrvPath> {
        self.sender.clone().expect("not finished")
    }

    /// The report, once every derivation sent is checked.
    pub fn finish(mut self) -> Report {
        self.sender = None;
        self.thread
            .join()
            .expect("the binary cache checker panicked")
    }
}

fn run(opts: &Options, arrivals: Receiver<DrvPath>) -> Report {
    let started = Instant::now();
    let setup = match Setup::new(opts) {
        Ok(s) => s,
        Err(e) => {
            return Report {
                started: Some(started),
                finished: Some(Instant::now()),
                ..Report::failed(format!("{e:#}"))
            };
        }
    };
    let queue = Mutex::new(arrivals);
    let claimed = Mutex::new(HashSet::new());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..setup.connections {
            s.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    // Holding the lock while waiting is fine: whoever
                    // holds it takes the next arrival.
                    let next = queue.lock().expect("queue").recv();
                    let Ok(drv) = next else { break };
                    if !claimed.lock().expect("claimed").insert(drv.clone()) {
                        continue;
                    }
                    let checks = setup.check_drv(&drv, false);
                    mine.push((drv, checks));
                }
                results.lock().expect("results").extend(mine);
            });
        }
    });
    let mut report = Report {
        caches: setup.names(),
        notes: setup.notes.clone(),
        started: Some(started),
        ..Default::default()
    };
    let results = results.into_inner().expect("results");
    let mut unreadable = 0;
    for (drv, checks) in results {
        report.checked += 1;
        let Ok(checks) = checks else {
            unreadable += 1;
            continue;
        };
        for (_, answer) in checks.iter().flat_map(|c| &c.answers) {
            if let Answer::Failed(f) = answer {
                *report.failures.entry(f.kind()).or_default() += 1;
            }
        }
        if let Some(i) = verdict(&checks) {
            report.found.insert(drv, i);
        }
    }
    if unreadable > 0 {
        report.notes.push(format!(
            "{unreadable} .drv files could not be read (garbage-collected?)"
        ));
    }
    for c in &setup.caches {
        if let Some(why) = c.unusable() {
            report
                .notes
                .push(format!("{} failed ({why}) and was not asked again", c.name));
        }
    }
    report.finished = Some(Instant::now());
    report
}

/// `drvkite explain`: every output of `drv`, and what each cache said.
pub fn explain(
    opts: &Options,
    drv: &DrvPath,
) -> Result<(Vec<String>, Vec<OutputCheck>, Vec<String>)> {
    let setup = Setup::new(opts)?;
    let checks = setup.check_drv(drv, true)?;
    Ok((setup.names(), checks, setup.notes))
}

/// [`explain`]'s answer as text: the verdict, then each output.
pub fn render_explain(
    label: &crate::types::Label,
    caches: &[String],
    checks: &[OutputCheck],
    notes: &[String],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match verdict(checks) {
        Some(i) => {
            let _ = writeln!(
                out,
                "{label} is skipped as cached (--skip-cached): every output is in a binary cache; skip reason \"{}\"",
                super::skip_reason(&caches[i])
            );
        }
        None if caches.is_empty() => {
            let _ = writeln!(
                out,
                "{label} is built: --skip-cached has no binary cache to ask"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "{label} is built: not every output is in a binary cache ({})",
                caches.join(", ")
            );
        }
    }
    for c in checks {
        let Some(path) = &c.path else {
            let _ = writeln!(
                out,
                "  {}: its path is not known before it is built",
                c.output
            );
            continue;
        };
        let answers: Vec<String> = c
            .answers
            .iter()
            .map(|(i, a)| match a {
                Answer::Valid => format!("{} has it", caches[*i]),
                Answer::Missing => format!("{}: missing", caches[*i]),
                Answer::Failed(f) => format!("{}: {f}", caches[*i]),
            })
            .collect();
        let answers = if answers.is_empty() {
            "no cache asked".to_owned()
        } else {
            answers.join("; ")
        };
        let _ = writeln!(out, "  {} {path}: {answers}", c.output);
    }
    for n in notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(found: &[Option<usize>]) -> Vec<OutputCheck> {
        found
            .iter()
            .map(|f| OutputCheck {
                output: "out".into(),
                path: None,
                answers: match f {
                    Some(i) => vec![(0, Answer::Missing), (*i, Answer::Valid)],
                    None => vec![(0, Answer::Failed(Failure::Signature))],
                },
            })
            .collect()
    }

    #[test]
    fn cached_only_when_every_output_is() {
        assert_eq!(verdict(&check(&[Some(1), Some(0)])), Some(1));
        assert_eq!(verdict(&check(&[Some(1), None])), None);
        assert_eq!(verdict(&check(&[None])), None);
        // No outputs at all is nothing to skip for.
        assert_eq!(verdict(&[]), None);
    }

    #[test]
    fn unsupported_and_misconfigured_caches_are_noted_not_asked() {
        let config = NixConfig {
            substituters: vec!["s3://bucket".into(), "daemon".into()],
            trusted_public_keys: vec![],
            ..NixConfig::default()
        };
        let setup = Setup::with_config(&Options::default(), config.clone()).unwrap();
        assert!(setup.caches.is_empty());
        assert_eq!(setup.notes.len(), 3, "{:?}", setup.notes);
        let off = NixConfig {
            substitute: false,
            ..config.clone()
        };
        let opts = Options {
            substituters: Some(vec!["file:///nonexistent".into()]),
            ..Options::default()
        };
        assert!(Setup::with_config(&opts, off).unwrap().caches.is_empty());
        let bad_key = NixConfig {
            trusted_public_keys: vec!["k:short".into()],
            ..config
        };
        assert!(Setup::with_config(&opts, bad_key).is_err());
    }
}
