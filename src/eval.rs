//! Evaluation: run `nix-instantiate` on drvkite's Nix expression to list a
//! depot's targets and write their `.drv` files to the store, building
//! nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use crate::drvmap::{DrvMap, Entry};
use crate::types::{AttrPath, DrvPath, Label};

mod trace;

const EVAL_NIX: &str = include_str!("../nix/eval.nix");
pub const READTREE_NIX: &str = include_str!("../nix/readTree/default.nix");

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
    pub kind: BrokenKind,
}

/// What keeps a broken target from its steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BrokenKind {
    /// Its evaluation failed.
    #[default]
    Evaluation,
    /// It evaluated, but its label cannot pass through
    /// `buildkite-agent pipeline upload` unchanged.
    Unuploadable,
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

/// A size in bytes, as `--max-memory` takes it: `2G`, `500M`, `64K` or a
/// plain number of bytes (binary units: 1K = 1024).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    pub bytes: u64,
    /// As the user wrote it, for messages.
    text: String,
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let upper = t.to_ascii_uppercase();
        let upper = upper
            .strip_suffix("IB")
            .or_else(|| upper.strip_suffix('B'))
            .unwrap_or(&upper);
        let (digits, unit) = match upper.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&upper[..i], Some(c)),
            _ => (upper, None),
        };
        let shift = match unit {
            None => 0,
            Some('K') => 10,
            Some('M') => 20,
            Some('G') => 30,
            Some('T') => 40,
            Some(_) => return Err(format!("{s}: unknown unit (use K, M, G or T, e.g. 2G)")),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("{s} is not a size (e.g. 2G, 500M)"))?;
        let bytes = n
            .checked_mul(1 << shift)
            .filter(|b| *b >= 1 << 20)
            .ok_or_else(|| format!("{s} is out of range (at least 1M)"))?;
        Ok(ByteSize {
            bytes,
            text: t.to_owned(),
        })
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ByteSize::parse(s)
    }
}

/// One process by default. Every worker imports the whole depot again
/// (readTree reads every file to find the targets) and re-evaluates what
/// targets share: on a 4,000-target depot that listing is about a third
/// of a full evaluation's CPU time, so two workers on an idle 2-core agent
/// save roughly a quarter of the wall time but use about 1.7 times the
/// memory of one (measured: 150 MB summed against 94 MB). Memory is what
/// TVL's generator ran out of, so more workers are opt-in (`--workers`).
pub fn default_workers() -> usize {
    1
}

/// How an evaluation runs: how many processes, how much memory each may
/// use, and whether to show progress.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub workers: usize,
    pub max_memory: Option<ByteSize>,
    pub progress: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            workers: default_workers(),
            max_memory: None,
            progress: false,
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

/// What one `nix-instantiate` run printed on stdout. In full mode the
/// records came on stderr (see `Stream`) and `targets` holds a `null` for
/// each; in labels mode it holds them.
#[derive(Debug, Deserialize)]
struct RawStdout<T> {
    targets: Vec<T>,
    settings: Option<serde_json::Value>,
}

/// What one successful `nix-instantiate` run found.
#[derive(Debug, Default)]
struct RawOutput {
    /// Full mode: one record per selected target, in order.
    records: Vec<Record>,
    /// Labels mode: one header per selected target, in order.
    headers: Vec<RawHeader>,
    settings: Option<serde_json::Value>,
}

/// One target's record, as Nix streams it in full mode.
#[derive(Debug)]
enum Record {
    Target(Box<Target>),
    /// tryEval caught an error: it says that the target failed, not why.
    Failed(RawHeader),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHeader {
    label: Label,
    attr_path: AttrPath,
}

/// Records read from one run's stderr while it evaluates, with their
/// index in the run's target list.
#[derive(Debug, Default)]
struct Stream {
    records: Vec<(usize, Record)>,
    /// The first record that did not parse; reported if the run succeeds.
    error: Option<String>,
}

impl Stream {
    /// Parse `ok <index> <JSON>` or `failed <index> <JSON>`: as bytes, as
    /// stdout would be, so text that is not UTF-8 fails the same way.
    fn add(&mut self, line: &[u8]) -> Option<&Record> {
        let parsed = (|| {
            let mut parts = line.splitn(3, |b| *b == b' ');
            let (kind, index, json) = (parts.next()?, parts.next()?, parts.next()?);
            let index: usize = std::str::from_utf8(index).ok()?.parse().ok()?;
            let record = match kind {
                b"ok" => Record::Target(Box::new(serde_json::from_slice(json).ok()?)),
                b"failed" => Record::Failed(serde_json::from_slice(json).ok()?),
                _ => return None,
            };
            Some((index, record))
        })();
        match parsed {
            Some(r) => {
                self.records.push(r);
                self.records.last().map(|(_, r)| r)
            }
            None => {
                if self.error.is_none() {
                    let text = String::from_utf8_lossy(line);
                    let cut: String = text.chars().take(200).collect();
                    self.error = Some(format!("unreadable target record: {cut}"));
                }
                None
            }
        }
    }

    /// The records of a run that listed `count` targets, in order: exactly
    /// one for each.
    fn into_ordered(mut self, count: usize) -> Result<Vec<Record>> {
        if let Some(e) = self.error {
            bail!("unexpected output from drvkite's Nix expression: {e}");
        }
        self.records.sort_unstable_by_key(|(i, _)| *i);
        if self.records.len() != count || self.records.iter().enumerate().any(|(n, (i, _))| n != *i)
        {
            bail!(
                "unexpected output from drvkite's Nix expression: {} target records for {count} targets",
                self.records.len()
            );
        }
        Ok(self.records.into_iter().map(|(_, r)| r).collect())
    }
}

/// Called with each target as soon as Nix has evaluated it (its .drv
/// files are written by then), so that later work can start while Nix goes
/// on: reading the derivation graph.
pub type TargetHook = Arc<dyn Fn(&Target) + Send + Sync>;

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
        std::fs::write(dir.path().join("gc-roots.nix"), GC_ROOTS_NIX)?;
        Ok(Expression { dir })
    }
}

/// A random tag for streamed records: the hasher's keys are random per
/// process and per call.
fn stream_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
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

/// How one `nix-instantiate` run ended.
#[derive(Debug)]
enum Outcome {
    Done(RawOutput),
    /// Killed for exceeding `--max-memory`, or Nix itself ran out.
    OutOfMemory,
    /// An error `tryEval` could not catch, trimmed to one line.
    Failed(String),
}

/// Live progress, fed by the `trace: drvkite:…` lines of every child.
struct Progress {
    done: AtomicUsize,
    total: AtomicUsize,
    started: Instant,
    tty: bool,
}

impl Progress {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let of = if total > 0 {
            format!("{}/{total}", done.min(total))
        } else {
            done.to_string()
        };
        format!(
            "drvkite: evaluating: {of} targets, {:.0}/s",
            done as f64 / secs
        )
    }

    fn show(&self) {
        if self.tty {
            eprint!("\r\x1b[K{}", self.line());
        } else {
            eprintln!("{}", self.line());
        }
    }

    /// Clear a terminal's progress line; elsewhere, end with the totals.
    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        } else {
            self.show();
        }
    }
}

/// Everything a worker needs to run `nix-instantiate`, shared by the tasks.
struct Runner {
    instantiate: PathBuf,
    internal_dir: PathBuf,
    depot: Utf8PathBuf,
    settings_attr: Vec<String>,
    max_memory: Option<ByteSize>,
    progress: Option<Arc<Progress>>,
    /// Marks this run's streamed records: `trace: drvkite:<tag>:`.
    tag: String,
}

/// Most stderr text kept per child: the error is at its end.
const STDERR_KEEP: usize = 1 << 20;

/// How often a child's stderr is read while it runs.
const STDERR_POLL: Duration = Duration::from_millis(1);

/// What `Runner::read_stderr` makes of a child's stderr, line by line.
struct StderrLines<'a> {
    runner: &'a Runner,
    record_prefix: Vec<u8>,
    traced: &'a AtomicUsize,
    hook: Option<&'a TargetHook>,
    text: String,
    stream: Stream,
}

impl StderrLines<'_> {
    fn line(&mut self, line: &[u8]) {
        let progress = &self.runner.progress;
        if let Some(record) = line.strip_prefix(self.record_prefix.as_slice()) {
            let record = record.strip_suffix(b"\n").unwrap_or(record);
            if let (Some(Record::Target(t)), Some(hook)) = (self.stream.add(record), self.hook) {
                hook(t);
            }
            self.traced.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = progress {
                p.done.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let s = String::from_utf8_lossy(line);
        match s.trim_end().strip_prefix("trace: drvkite:") {
            Some("done") => {
                self.traced.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = progress {
                    p.done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(rest) if rest.starts_with("total ") => {
                if let (Some(p), Ok(n)) = (progress, rest[6..].parse()) {
                    p.total.fetch_max(n, Ordering::Relaxed);
                }
            }
            _ => {
                let text = &mut self.text;
                if text.len() > STDERR_KEEP {
                    let cut = text.len() - STDERR_KEEP / 2;
                    let cut = (cut..text.len())
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap_or(text.len());
                    text.drain(..cut);
                }
                text.push_str(&s);
            }
        }
    }
}

impl Runner {
    fn command(&self, req: &Request) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.instantiate);
        cmd.arg("--eval")
            .arg("--strict")
            .arg("--json")
            .arg("--read-write-mode")
            .arg(self.internal_dir.join("eval.nix"))
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
        if self.progress.is_some() {
            cmd.arg("--arg").arg("progress").arg("true");
        }
        if !req.labels_only {
            cmd.arg("--argstr").arg("streamTag").arg(&self.tag);
        }
        if let Some(max) = &self.max_memory {
            // Boehm's heap is most of the process but not all of it (parse
            // trees, symbols and C++ strings live outside): capping it makes
            // Nix collect garbage before it nears the bound, and fail with
            // "out of memory" when live data alone is too much. The RSS
            // watch below enforces the bound for everything else.
            let heap = max.bytes - (max.bytes / 4).min(128 << 20);
            cmd.env("GC_MAXIMUM_HEAP_SIZE", heap.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, req: &Request, hook: Option<&TargetHook>) -> Result<Outcome> {
        let (stderr, stderr_writer) =
            std::io::pipe().context("cannot create a pipe for nix-instantiate's messages")?;
        let mut cmd = self.command(req);
        cmd.stderr(stderr_writer);
        let spawned = cmd.spawn();
        // Our copy of the pipe's write end goes with the command, so that
        // the pipe ends when the child does.
        drop(cmd);
        let mut child = spawned.with_context(|| {
            format!(
                "cannot run {}: check the Nix installation",
                self.instantiate.display()
            )
        })?;
        let pid = child.id();
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let traced = AtomicUsize::new(0);
        let read_stdout = async {
            let mut buf = Vec::new();
            stdout.read_to_end(&mut buf).await.map(|_| buf)
        };
        let finished = tokio::select! {
            (out, err) = async { tokio::join!(read_stdout, self.read_stderr(stderr, &traced, hook)) } => Some((out, err)),
            () = self.watch_memory(pid) => None,
        };
        let outcome = match finished {
            None => {
                // Over the bound: it has not exited, so the pid is still its.
                let _ = child.start_kill();
                let _ = child.wait().await;
                Outcome::OutOfMemory
            }
            Some((out, (err, streamed))) => {
                let status = child
                    .wait()
                    .await
                    .context("lost track of a nix-instantiate process")?;
                let out = out.context("cannot read nix-instantiate's output")?;
                if status.success() {
                    let raw = Self::output(req, &out, streamed)?;
                    Outcome::Done(raw)
                } else {
                    let message = trim_nix_error(&err, &self.internal_dir);
                    if died_of_memory(status, &message, &err) {
                        Outcome::OutOfMemory
                    } else {
                        Outcome::Failed(self.locate_missing(req, message).await)
                    }
                }
            }
        };
        if let (Some(p), false) = (&self.progress, matches!(outcome, Outcome::Done(_))) {
            // Targets of a failed run are evaluated again: do not count twice.
            p.done
                .fetch_sub(traced.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// A missing path's message, with the place that imported it (see
    /// [`trace`]); on this error only, and only for a run cheap to repeat
    /// (the target list, or one target), not for each half of a split.
    async fn locate_missing(&self, req: &Request, message: String) -> String {
        let small = req.labels_only || req.only.as_ref().is_some_and(|o| o.len() == 1);
        let Some(missing) = trace::missing_path(&message).filter(|_| small) else {
            return message;
        };
        if let Some(place) = trace::search_importer(&self.depot, missing) {
            return message + &place;
        }
        if message.contains(" (at ") {
            return message;
        }
        let mut cmd = self.command(req);
        cmd.arg("--show-trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let Ok(out) = cmd.output().await else {
            return message;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        match trace::traced_importer(&stderr, &self.internal_dir.to_string_lossy()) {
            Some(place) => message + &place,
            None => message,
        }
    }

    /// A successful run's result: its stdout, and in full mode the records
    /// it streamed.
    fn output(req: &Request, stdout: &[u8], streamed: Stream) -> Result<RawOutput> {
        let unexpected = |e| anyhow!("unexpected output from drvkite's Nix expression: {e}");
        if req.labels_only {
            let raw: RawStdout<RawHeader> = serde_json::from_slice(stdout).map_err(unexpected)?;
            return Ok(RawOutput {
                headers: raw.targets,
                settings: raw.settings,
                ..Default::default()
            });
        }
        let raw: RawStdout<serde::de::IgnoredAny> =
            serde_json::from_slice(stdout).map_err(unexpected)?;
        Ok(RawOutput {
            records: streamed.into_ordered(raw.targets.len())?,
            settings: raw.settings,
            ..Default::default()
        })
    }

    /// Read a child's stderr as it comes: records are parsed (and given to
    /// `hook`) and progress traces counted; the rest is kept
    /// (its tail) for the error message.
    ///
    /// The pipe is polled every millisecond rather than waited on:
    /// Nix writes each record with its own write, and waking a waiting
    /// reader for each cost Nix more than a tenth of its time on a
    /// 4,000-target depot (measured on a 2-core VM); nobody waiting, a
    /// write is cheap. A larger pipe lets Nix run ahead between polls.
    async fn read_stderr(
        &self,
        stderr: std::io::PipeReader,
        traced: &AtomicUsize,
        hook: Option<&TargetHook>,
    ) -> (String, Stream) {
        use std::io::Read;
        let mut lines = StderrLines {
            runner: self,
            record_prefix: format!("trace: drvkite:{}:", self.tag).into_bytes(),
            traced,
            hook,
            text: String::new(),
            stream: Stream::default(),
        };
        let nonblocking = rustix::fs::fcntl_getfl(&stderr)
            .and_then(|fl| rustix::fs::fcntl_setfl(&stderr, fl | rustix::fs::OFlags::NONBLOCK));
        let _ = rustix::pipe::fcntl_setpipe_size(&stderr, 1 << 20);
        let mut reader = &stderr;
        let mut buf = vec![0; 1 << 16];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let read = if nonblocking.is_ok() {
                reader.read(&mut buf)
            } else {
                // Cannot happen on Linux; if it did, a read would block.
                tokio::task::block_in_place(|| reader.read(&mut buf))
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    let mut start = 0;
                    while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
                        lines.line(&pending[start..start + end + 1]);
                        start += end + 1;
                    }
                    pending.drain(..start);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(STDERR_POLL).await
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if !pending.is_empty() {
            lines.line(&pending);
        }
        (lines.text, lines.stream)
    }

    /// Resolve when the child's resident memory exceeds `--max-memory`;
    /// never without a bound (or without /proc).
    async fn watch_memory(&self, pid: Option<u32>) {
        let (Some(max), Some(pid)) = (&self.max_memory, pid) else {
            return std::future::pending().await;
        };
        let status = format!("/proc/{pid}/status");
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if rss_bytes(&status).is_some_and(|rss| rss > max.bytes) {
                return;
            }
        }
    }

    fn memory_message(&self) -> String {
        match &self.max_memory {
            Some(max) => format!(
                "evaluating it alone needs more memory than --max-memory {max} allows: raise --max-memory or make the target cheaper to evaluate"
            ),
            None => "nix-instantiate ran out of memory evaluating it alone: give the machine more memory or make the target cheaper to evaluate".to_owned(),
        }
    }
}

/// VmRSS from /proc/<pid>/status, in bytes.
fn rss_bytes(status_file: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status_file).ok()?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Nix reports an exhausted (or capped) heap as "error: out of memory";
/// Boehm may abort instead, and the kernel's OOM killer sends SIGKILL.
fn died_of_memory(status: std::process::ExitStatus, message: &str, stderr: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    message == "out of memory"
        || status.signal() == Some(9)
        || (status.signal().is_some() && stderr.contains("Out of Memory"))
}

/// A slice of the target list to evaluate. `key` orders results: the
/// top-level shards are 0..n, the halves of an item extend its key with
/// 0 and 1, and records within an item extend it with their index, so
/// sorting by key gives the full target-list order whatever the split.
#[derive(Debug, Clone)]
struct Item {
    key: Vec<u32>,
    shard: (usize, usize),
    /// The item's targets, once listed: its runs select them by label.
    headers: Option<Vec<RawHeader>>,
}

impl Item {
    fn child(&self, n: usize) -> Vec<u32> {
        let mut key = self.key.clone();
        key.push(n as u32);
        key
    }
}

#[derive(Debug)]
enum Job {
    /// Evaluate an item in full, catching what tryEval catches.
    Eval(Item),
    /// List an item whose full evaluation failed (`cause`, `None` for
    /// memory) to split it.
    List(Item, Option<String>),
    /// Evaluate one target tryEval caught, uncaught, to get Nix's message.
    Explain(Item, Vec<u32>, RawHeader),
}

impl Job {
    fn request(&self) -> Request {
        match self {
            Job::Eval(item) => Request {
                shard: item.shard,
                only: item.headers.as_ref().map(|h| labels_of(h)),
                labels_only: false,
                catch_errors: true,
            },
            Job::List(item, _) => Request {
                shard: item.shard,
                only: None,
                labels_only: true,
                catch_errors: true,
            },
            Job::Explain(item, _, header) => Request {
                shard: item.shard,
                only: Some(vec![header.label.clone()]),
                labels_only: false,
                catch_errors: false,
            },
        }
    }
}

/// The distinct labels of some targets, in order.
fn labels_of(headers: &[RawHeader]) -> Vec<Label> {
    let mut seen = std::collections::HashSet::new();
    headers
        .iter()
        .filter(|h| seen.insert(h.label.clone()))
        .map(|h| h.label.clone())
        .collect()
}

enum Found {
    Target(Box<Target>),
    Broken(BrokenTarget),
}

/// The state of one evaluation: jobs to run and what they found.
struct Schedule<'a> {
    runner: &'a Runner,
    fail_on_error: bool,
    queue: VecDeque<Job>,
    found: Vec<(Vec<u32>, Found)>,
    settings: Option<serde_json::Value>,
}

impl Schedule<'_> {
    fn depot_error(&self, message: &str) -> anyhow::Error {
        anyhow!("evaluating depot {} failed: {message}", self.runner.depot)
    }

    fn broken(&mut self, key: Vec<u32>, header: RawHeader, error: String) -> Result<()> {
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

    fn keep_settings(&mut self, item: &Item, raw: &mut RawOutput) {
        if item.shard.0 == 0 && self.settings.is_none() {
            self.settings = raw.settings.take();
        }
    }

    /// An item whose targets are known failed (`cause`; `None`: memory):
    /// one label left is the culprit, more are split in halves.
    fn narrow(&mut self, item: Item, headers: Vec<RawHeader>, cause: Option<String>) -> Result<()> {
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

    fn handle(&mut self, job: Job, outcome: Outcome) -> Result<()> {
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
                    }
                }
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
            (Job::List(..), Outcome::Failed(message)) => return Err(self.depot_error(&message)),
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
            max_memory: None,
            progress: None,
            tag: stream_tag(),
        };
        Ok(Evaluator {
            expr,
            runner: Arc::new(runner),
            workers: default_workers(),
        })
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
        let result = self.schedule(fail_on_error, hook).await;
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

    async fn schedule(&self, fail_on_error: bool, hook: Option<TargetHook>) -> Result<Evaluation> {
        let n = self.workers;
        let mut s = Schedule {
            runner: &self.runner,
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
                let runner = Arc::clone(&self.runner);
                let hook = hook.clone();
                running.spawn(async move {
                    let outcome = runner.run(&job.request(), hook.as_ref()).await;
                    (job, outcome)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (job, outcome) = joined.context("an evaluation task failed")?;
            s.handle(job, outcome?)?;
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

    /// Make every instantiated .drv (targets, extra-step commands and
    /// parent overrides) a GC root through one link, `<dir>/drvkite-drvs`,
    /// replaced on each run. The link points at a .drv that lists all of
    /// them as inputs: rooting it keeps them, and the previous run's roots
    /// become collectable. Nix registers the link as an indirect root
    /// itself (as `nix-store --add-root --indirect` does), and writes it
    /// in one rename; nothing is built.
    pub async fn register_gc_roots(&self, eval: &Evaluation, dir: &Utf8Path) -> Result<usize> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create --gc-roots-dir {dir}: check the path and permissions")
        })?;
        let dir = dir
            .canonicalize_utf8()
            .with_context(|| format!("cannot resolve --gc-roots-dir {dir}"))?;
        let drvs: Vec<&str> = eval.drv_paths().into_iter().map(DrvPath::as_str).collect();
        let list = self.expr.dir.path().join("gc-roots.json");
        std::fs::write(&list, serde_json::to_vec(&drvs)?)
            .context("cannot write the list of GC roots to a temporary file")?;
        let link = dir.join("drvkite-drvs");
        let out = tokio::process::Command::new(&self.runner.instantiate)
            .arg(self.expr.dir.path().join("gc-roots.nix"))
            .arg("--argstr")
            .arg("listFile")
            .arg(&list)
            .arg("--add-root")
            .arg(link.as_str())
            .arg("--indirect")
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run nix-instantiate to register GC roots")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "cannot register GC roots in --gc-roots-dir {dir}: {}",
                trim_nix_error(&stderr, self.expr.dir.path())
            );
        }
        Ok(drvs.len())
    }
}

/// One derivation with every .drv of a run as input sources: the single
/// thing `register_gc_roots` roots. `storePath` turns each path back into a
/// store reference (the JSON list has none) and fails on a missing one.
const GC_ROOTS_NIX: &str = r#"{ listFile }:
derivation {
  name = "drvkite-gc-roots";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo this derivation only holds GC roots; do not build it; exit 1" ];
  drvs = map builtins.storePath (builtins.fromJSON (builtins.readFile listFile));
}
"#;

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
            .filter(|t| !t.starts_with("(use '--show-trace'"))
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
    fn parses_sizes() {
        assert_eq!(ByteSize::parse("2G").unwrap().bytes, 2 << 30);
        assert_eq!(ByteSize::parse("500M").unwrap().bytes, 500 << 20);
        assert_eq!(ByteSize::parse("1536k").unwrap().bytes, 1536 << 10);
        assert_eq!(ByteSize::parse("3GiB").unwrap().bytes, 3 << 30);
        assert_eq!(ByteSize::parse("4194304").unwrap().bytes, 4 << 20);
        assert_eq!(ByteSize::parse("2G").unwrap().to_string(), "2G");
        for bad in ["", "G", "2X", "-1G", "1.5G", "10K"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_resident_memory() {
        let rss = rss_bytes("/proc/self/status").expect("Linux has /proc");
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(rss_bytes("/proc/no-such-process/status"), None);
    }

    #[test]
    fn recognises_death_by_memory() {
        use std::os::unix::process::ExitStatusExt;
        let exit1 = std::process::ExitStatus::from_raw(1 << 8);
        let killed = std::process::ExitStatus::from_raw(9);
        let aborted = std::process::ExitStatus::from_raw(6);
        assert!(died_of_memory(exit1, "out of memory", ""));
        assert!(!died_of_memory(
            exit1,
            "attribute 'x' missing",
            "Out of Memory"
        ));
        assert!(died_of_memory(killed, "", ""));
        assert!(died_of_memory(
            aborted,
            "",
            "GC Warning: Out of Memory! Heap size: 3 MiB"
        ));
        assert!(!died_of_memory(aborted, "", "assertion failed"));
    }

    #[test]
    fn streamed_records_count_once_each_in_list_order() {
        let drv = "/nix/store/0c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-a.drv";
        let ok = |i: usize, label: &str| {
            format!(
                r#"ok {i} {{"label":"{label}","attrPath":["{label}"],"drvPath":"{drv}","outputs":["out"],"timeout":null,"extraDeps":[],"extraStepArgs":null,"extraSteps":{{}}}}"#
            )
        };
        let failed = r#"failed 1 {"label":"b","attrPath":["b"]}"#;
        let stream = |lines: &[&str]| {
            let mut s = Stream::default();
            for l in lines {
                s.add(l.as_bytes());
            }
            s
        };
        let (a, c) = (ok(0, "a"), ok(2, "c"));
        let labels: Vec<String> = stream(&[&c, failed, &a])
            .into_ordered(3)
            .unwrap()
            .iter()
            .map(|r| match r {
                Record::Target(t) => format!("ok {}", t.label),
                Record::Failed(h) => format!("failed {}", h.label),
            })
            .collect();
        assert_eq!(labels, ["ok a", "failed b", "ok c"]);
        // One missing, one twice, one more than listed, one unreadable:
        // each is an error, never a silently different list.
        let twice = ok(0, "a");
        for (lines, count) in [
            (vec![a.as_str(), c.as_str()], 3),
            (vec![a.as_str(), twice.as_str(), c.as_str()], 3),
            (vec![a.as_str(), failed, c.as_str()], 2),
            (vec![a.as_str(), "failed 1 {\"label\":", c.as_str()], 3),
            (vec![a.as_str(), "ok x {}", c.as_str()], 3),
        ] {
            let err = stream(&lines).into_ordered(count).unwrap_err().to_string();
            assert!(
                err.starts_with("unexpected output from drvkite's Nix expression"),
                "{err}"
            );
        }
    }

    #[test]
    fn drops_the_show_trace_hint() {
        let stderr = "error: thrown on purpose\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            trim_nix_error(stderr, std::path::Path::new("/tmp/drvkite-nix-x")),
            "thrown on purpose"
        );
    }

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
