//! One `nix-instantiate` run: its command line, its stderr read live
//! (streamed target records, walk marks, progress traces, readTree's
//! warnings, the error text), its memory watched, and how it ended.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use camino::Utf8PathBuf;
use tokio::io::AsyncReadExt;

use super::TargetHook;
use super::nix::trim_nix_error;
use super::records::{RawHeader, RawOutput, RawStdout, Record, Stream};
use super::trace;
use super::tuning::{ByteSize, Progress};
use super::walk::{self, Scope};
use crate::types::Label;

/// What one `nix-instantiate` run is asked for.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub(super) shard: (usize, usize),
    pub(super) only: Option<Vec<Label>>,
    pub(super) labels_only: bool,
    pub(super) catch_errors: bool,
    /// The depot as this evaluation sees it (broken nodes hidden).
    pub(super) scope: Arc<Scope>,
    /// Walk the readTree nodes instead of listing targets.
    pub(super) walk: Option<walk::WalkSpec>,
}

/// A random tag for streamed records: the hasher's keys are random per
/// process and per call.
pub(super) fn stream_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// How one `nix-instantiate` run ended.
#[derive(Debug)]
pub(super) enum Outcome {
    Done(RawOutput),
    /// Killed for exceeding `--max-memory`, or Nix itself ran out.
    OutOfMemory,
    /// An error `tryEval` could not catch, trimmed to one line.
    Failed(String),
}

/// Everything a worker needs to run `nix-instantiate`, shared by the tasks.
pub(super) struct Runner {
    pub(super) instantiate: PathBuf,
    pub(super) internal_dir: PathBuf,
    pub(super) depot: Utf8PathBuf,
    pub(super) settings_attr: Vec<String>,
    /// `--targets-attr`: the depot attribute listing the targets.
    pub(super) targets_attr: Option<Vec<String>>,
    pub(super) max_memory: Option<ByteSize>,
    pub(super) progress: Option<Arc<Progress>>,
    /// Marks this run's streamed records: `trace: drvkite:<tag>:`.
    pub(super) tag: String,
    /// Warnings the depot's evaluation printed that the user should see,
    /// once each however many runs print them.
    pub(super) warnings: std::sync::Mutex<BTreeSet<String>>,
}

/// Most stderr text kept per child: the error is at its end.
const STDERR_KEEP: usize = 1 << 20;

/// How often a child's stderr is read while it runs.
const STDERR_POLL: Duration = Duration::from_millis(1);

/// What `Runner::read_stderr` makes of a child's stderr, line by line.
pub(super) struct StderrLines<'a> {
    pub(super) runner: &'a Runner,
    pub(super) record_prefix: Vec<u8>,
    pub(super) traced: &'a AtomicUsize,
    /// Where a node walk got to: kept outside, so a run killed for memory
    /// still tells.
    pub(super) trail: &'a std::sync::Mutex<walk::Trail>,
    pub(super) hook: Option<&'a TargetHook>,
    pub(super) text: String,
    pub(super) stream: Stream,
}

impl StderrLines<'_> {
    pub(super) fn line(&mut self, line: &[u8]) {
        let progress = &self.runner.progress;
        if let Some(record) = line.strip_prefix(self.record_prefix.as_slice()) {
            let record = record.strip_suffix(b"\n").unwrap_or(record);
            if let Some(mark) = walk::Mark::parse(record) {
                self.trail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(mark);
                return;
            }
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
                if let Some(w) = deprecation_warning(&s) {
                    self.runner
                        .warnings
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(w);
                }
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
    pub(super) fn command(&self, req: &Request) -> tokio::process::Command {
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
        if let Some(attr) = &self.targets_attr {
            cmd.arg("--argstr")
                .arg("targetsAttrJSON")
                .arg(serde_json::to_string(attr).expect("strings serialise"));
        }
        if !req.scope.hidden.is_empty() {
            cmd.arg("--argstr")
                .arg("maskJSON")
                .arg(serde_json::to_string(&req.scope.hidden).expect("strings serialise"));
        }
        if let Some(walk) = &req.walk {
            cmd.arg("--argstr")
                .arg("walkJSON")
                .arg(serde_json::to_string(walk).expect("node paths serialise"));
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

    pub(super) async fn run(&self, req: &Request, hook: Option<&TargetHook>) -> Result<Outcome> {
        Ok(self.run_traced(req, hook).await?.0)
    }

    /// [`Runner::run`], with the trail a node walk left on stderr.
    pub(super) async fn run_traced(
        &self,
        req: &Request,
        hook: Option<&TargetHook>,
    ) -> Result<(Outcome, walk::Trail)> {
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
        let trail = std::sync::Mutex::new(walk::Trail::default());
        let finished = tokio::select! {
            (out, err) = async { tokio::join!(read_stdout, self.read_stderr(stderr, &traced, &trail, hook)) } => Some((out, err)),
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
                        let listed = trail.lock().map_or(true, |t| t.listed());
                        Outcome::Failed(self.locate_missing(req, message, listed).await)
                    }
                }
            }
        };
        if let (Some(p), false) = (&self.progress, matches!(outcome, Outcome::Done(_))) {
            // Targets of a failed run are evaluated again: do not count twice.
            p.done
                .fetch_sub(traced.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let trail = trail.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok((outcome, trail))
    }

    /// A missing path's message, with the place that imported it (see
    /// [`trace`]); on this error only, and only for a run cheap to repeat
    /// (the target list, a run that died listing it, a node walk, or one
    /// target), not for each half of a split.
    pub(super) async fn locate_missing(
        &self,
        req: &Request,
        message: String,
        listed: bool,
    ) -> String {
        let small = req.labels_only
            || req.walk.is_some()
            || (req.only.is_none() && !listed)
            || req.only.as_ref().is_some_and(|o| o.len() == 1);
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
    pub(super) fn output(req: &Request, stdout: &[u8], streamed: Stream) -> Result<RawOutput> {
        let unexpected = |e| anyhow!("unexpected output from drvkite's Nix expression: {e}");
        if req.walk.is_some() {
            // A walk's result is its trail.
            return Ok(RawOutput::default());
        }
        // Names need not be UTF-8 (see `Stream::add`).
        let stdout = String::from_utf8_lossy(stdout);
        if req.labels_only {
            let raw: RawStdout<RawHeader> = serde_json::from_str(&stdout).map_err(unexpected)?;
            return Ok(RawOutput {
                headers: raw.targets,
                settings: raw.settings,
                ..Default::default()
            });
        }
        let raw: RawStdout<serde::de::IgnoredAny> =
            serde_json::from_str(&stdout).map_err(unexpected)?;
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
    pub(super) async fn read_stderr(
        &self,
        stderr: std::io::PipeReader,
        traced: &AtomicUsize,
        trail: &std::sync::Mutex<walk::Trail>,
        hook: Option<&TargetHook>,
    ) -> (String, Stream) {
        use std::io::Read;
        let mut lines = StderrLines {
            runner: self,
            record_prefix: format!("trace: drvkite:{}:", self.tag).into_bytes(),
            traced,
            trail,
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
    pub(super) async fn watch_memory(&self, pid: Option<u32>) {
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

    pub(super) fn memory_message(&self) -> String {
        match &self.max_memory {
            Some(max) => format!(
                "evaluating it alone needs more memory than --max-memory {max} allows: raise --max-memory or make the target cheaper to evaluate"
            ),
            None => "nix-instantiate ran out of memory evaluating it alone: give the machine more memory or make the target cheaper to evaluate".to_owned(),
        }
    }
}

/// VmRSS from /proc/<pid>/status, in bytes.
pub(super) fn rss_bytes(status_file: &str) -> Option<u64> {
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
pub(super) fn died_of_memory(
    status: std::process::ExitStatus,
    message: &str,
    stderr: &str,
) -> bool {
    use std::os::unix::process::ExitStatusExt;
    message == "out of memory"
        || status.signal() == Some(9)
        || (status.signal().is_some() && stderr.contains("Out of Memory"))
}

/// readTree's warning about the deprecated `meta.targets` (drvkite's
/// readTree and TVL's word it differently), as one line for the user;
/// `None` for any other stderr line.
pub(super) fn deprecation_warning(line: &str) -> Option<String> {
    let text = line.trim().strip_prefix("trace:").unwrap_or(line).trim();
    let label = if let Some(rest) = text.split_once("readTree: ").map(|(_, r)| r) {
        rest.split_once(" uses meta.targets, which is deprecated")?
            .0
    } else {
        // TVL's, over lines: "Please move the subtargets of //<label> to
        // the\nmeta.ci.targets attribute."
        text.strip_prefix("Please move the subtargets of //")?
            .strip_suffix(" to the")?
    };
    Some(format!(
        "{label} lists subtargets in meta.targets, which is deprecated (they are still built, as TVL does): move them to meta.ci.targets"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn recognises_both_readtrees_deprecation_warnings() {
        let ours = "trace: \u{1b}[1;31mreadTree: tools/a uses meta.targets, which is deprecated; use meta.ci.targets\u{1b}[0m\n";
        let tvl = "Please move the subtargets of //tools/b to the\n";
        let w = deprecation_warning(ours).unwrap();
        assert!(
            w.starts_with("tools/a lists subtargets in meta.targets"),
            "{w}"
        );
        assert!(deprecation_warning(tvl).unwrap().starts_with("tools/b "));
        for other in [
            "meta.ci.targets attribute.",
            "trace: readTree: something else",
            "error: boom",
            "",
        ] {
            assert_eq!(deprecation_warning(other), None, "{other}");
        }
    }
}
