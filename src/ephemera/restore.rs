//! `restore`: find the entry a job may use and put it in place. The scopes
//! searched, and in which order, come from [`super::scope`]; every check
//! of the manifest and the archive before anything is replaced lives here
//! and in [`super::archive`]. A job writes only into its own scope: use
//! marks and quarantine tombstones of other scopes are never written.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use super::anchor::{self, Anchors};
use super::archive;
use super::cli::KeyArgs;
use super::key::KeyInputs;
use super::manifest::{self, Entry, ScopeIndex, Tombstone};
use super::scope::Scope;
use super::store::{Hashing, Scoped};
use super::{Ctx, check_name, env, format_size, printable, show_paths};

const ANNOTATION_CONTEXT: &str = "drvkite-ephemera";

/// Record a use (best effort: it only steers eviction). Only entries of
/// the job's own scope are marked: trusted seeds are kept fresh by the
/// default branch persisting them.
pub(super) async fn touch(job: &Scoped<'_>, entry: &Entry) {
    if entry.scope != job.scope() {
        return;
    }
    let now = manifest::now_rfc3339(SystemTime::now()).into_bytes();
    if let Err(e) = job.put(&entry.used_key(), now).await {
        eprintln!(
            "ephemera: warning: cannot record the use of {}: {e:#}",
            entry.manifest.id
        );
    }
}

/// Why one candidate entry was not restored.
enum Refusal {
    /// Nothing was touched; try the next candidate. `integrity` failures
    /// (digest, archive) get the entry quarantined where the job may write.
    Skip {
        reason: anyhow::Error,
        integrity: bool,
    },
    /// Replacing the targets had started: the job must fail.
    Fatal(anyhow::Error),
}

/// How a restore went, as `--status-file` and scripts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// An entry with the current key.
    Exact,
    /// The newest entry of the set under another key (`--fallback`).
    Fallback,
    Miss,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Exact => "exact",
            Status::Fallback => "fallback",
            Status::Miss => "miss",
        }
    }
}

/// The entries a restore tries, in order: those with the current key
/// (`inputs`, whose key is `key`), scope by scope; then, with `fallback`,
/// the newest of the set under any other key with the same salt and
/// archive format (a new salt still starts afresh), in the same scopes and
/// order. Never anything else.
pub(super) fn candidates<'a, 'k>(
    indexes: &'k [&'a ScopeIndex],
    inputs: &'k KeyInputs,
    key: &'k str,
    fallback: bool,
) -> impl Iterator<Item = (&'a Entry, Status)> + 'k {
    let of_set = move |index: &&'a ScopeIndex, exact: bool| {
        let index: &'a ScopeIndex = index;
        index.entries.iter().filter(move |e| {
            let m = &e.manifest;
            !e.tombstoned
                && m.name == inputs.name
                && if exact {
                    m.key == key
                } else {
                    m.key != key
                        && m.key_inputs.salt == inputs.salt
                        && m.key_inputs.format == inputs.format
                }
        })
    };
    let exact = indexes
        .iter()
        .flat_map(move |i| of_set(i, true))
        .map(|e| (e, Status::Exact));
    let others = indexes
        .iter()
        .filter(move |_| fallback)
        .flat_map(move |i| of_set(i, false))
        .map(|e| (e, Status::Fallback));
    exact.chain(others)
}

/// What `restore` was asked besides the set and its key.
pub(super) struct Wanted {
    pub require: bool,
    pub annotate: bool,
    pub fallback: bool,
    pub status_file: Option<PathBuf>,
}

pub(super) async fn restore(
    ctx: &Ctx,
    name: &str,
    key: &KeyArgs,
    wanted: &Wanted,
) -> Result<ExitCode> {
    check_name(name)?;
    let job = Scope::from_env(env)?;
    let scopes = job.restore_scopes(ctx.policy);
    let miss = |why: String| -> Result<ExitCode> {
        write_status(wanted.status_file.as_deref(), Status::Miss)?;
        if wanted.require {
            bail!("ephemera: {name}: nothing restored and --require is set: {why}");
        }
        eprintln!("ephemera: {name}: nothing restored: {why}");
        Ok(ExitCode::SUCCESS)
    };
    if scopes.is_empty() {
        return miss(format!(
            "{job} is a default-branch build, which starts pristine \
             (DRVKITE_EPHEMERA_TRUSTED_RESTORE allows trusted seeds)"
        ));
    }
    let (cwd, anchors) = ctx.anchors()?;
    let inputs = key.inputs(name, &cwd)?;
    let key = inputs.key();
    // Where this job may change anything: its own scope, if it may write.
    let own = job
        .write_scope(ctx.policy)
        .map(|s| Scoped::new(&ctx.store, s.prefix()));
    let mut indexes = Vec::new();
    for scope in &scopes {
        indexes.push(manifest::load_scope(&ctx.store, &scope.prefix(), Some(name)).await?);
    }
    let read: Vec<&ScopeIndex> = indexes.iter().collect();
    for (entry, status) in candidates(&read, &inputs, &key, wanted.fallback) {
        match restore_entry(ctx, entry, &anchors, status, &key).await {
            Ok(line) => {
                write_status(wanted.status_file.as_deref(), status)?;
                println!("{line}");
                if wanted.annotate {
                    append_annotation(&line);
                }
                if let Some(own) = &own {
                    touch(own, entry).await;
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(Refusal::Fatal(e)) => return Err(e),
            Err(Refusal::Skip { reason, integrity }) => {
                eprintln!(
                    "ephemera: warning: {name}: entry {} in scope {} refused: {reason:#}",
                    entry.manifest.id, entry.scope
                );
                if let Some(own) = own.as_ref().filter(|_| integrity) {
                    quarantine(own, entry).await;
                }
            }
        }
    }
    let searched: Vec<String> = scopes.iter().map(|s| s.prefix()).collect();
    miss(format!(
        "no entry with key {key}{} in {}",
        if wanted.fallback {
            " nor any other key"
        } else {
            ""
        },
        searched.join(", ")
    ))
}

/// Write `status` to `file` (if asked), whole or not at all.
fn write_status(file: Option<&Path>, status: Status) -> Result<()> {
    let Some(file) = file else { return Ok(()) };
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write the status file {}", file.display()))?;
    writeln!(tmp, "{}", status.as_str())?;
    tmp.persist(file)
        .with_context(|| format!("cannot write the status file {}", file.display()))?;
    Ok(())
}

async fn restore_entry(
    ctx: &Ctx,
    entry: &Entry,
    anchors: &Anchors,
    status: Status,
    current_key: &str,
) -> Result<String, Refusal> {
    let skip = |reason: anyhow::Error, integrity: bool| Refusal::Skip { reason, integrity };
    let m = &entry.manifest;
    if m.size > ctx.options.max_entry_size {
        return Err(skip(
            anyhow::anyhow!(
                "it is {} compressed, more than --max-entry-size ({})",
                format_size(m.size),
                format_size(ctx.options.max_entry_size)
            ),
            false,
        ));
    }
    // A manifest listing unsafe paths is broken (or forged); a path this
    // agent cannot place (no HOME, a link in the checkout) is not.
    for p in &m.paths {
        anchor::check_saved(p).map_err(|e| skip(e, true))?;
    }
    let targets = m
        .paths
        .iter()
        .map(|p| anchors.target(p).map(|(t, leads)| (leads, t)))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| skip(e, false))?;
    // Persist never writes these; a manifest that has them was forged.
    let overlapping = targets.iter().enumerate().any(|(i, (_, a))| {
        targets[i + 1..]
            .iter()
            .any(|(_, b)| a.starts_with(b) || b.starts_with(a))
    });
    if targets.is_empty() || overlapping {
        return Err(skip(
            anyhow::anyhow!("its manifest lists no paths or overlapping paths"),
            true,
        ));
    }
    let blob = entry.blob_key();
    let location = ctx.store.location(&blob);
    // Download and check the digest before anything is extracted.
    let tmp = tempfile::NamedTempFile::new().map_err(|e| skip(e.into(), false))?;
    let file = tmp.reopen().map_err(|e| skip(e.into(), false))?;
    let mut writer = Hashing::new(BufWriter::new(file), ctx.options.max_entry_size.min(m.size));
    let found = ctx.store.download(&blob, &mut writer).await;
    if writer.exceeded {
        return Err(skip(
            anyhow::anyhow!(
                "{location} is bigger than its manifest says ({} bytes)",
                m.size
            ),
            true,
        ));
    }
    // Gone since it was listed (gc or another job's eviction), or lost: not
    // the entry's fault, and the next persist of these contents stores it
    // again.
    if !found.map_err(|e| skip(e, false))? {
        return Err(skip(
            anyhow::anyhow!("{location} is missing (removed meanwhile?)"),
            false,
        ));
    }
    let (sha256, len, file) = writer.finish().map_err(|e| skip(e.into(), false))?;
    drop(file);
    if sha256 != m.sha256 {
        return Err(skip(
            anyhow::anyhow!(
                "sha256 mismatch: the manifest says {} but {location} has {sha256}; nothing was \
                 extracted",
                m.sha256
            ),
            true,
        ));
    }
    if len != m.size {
        return Err(skip(
            anyhow::anyhow!(
                "{location} has {len} bytes but its manifest says {}",
                m.size
            ),
            true,
        ));
    }
    let places: Vec<PathBuf> = targets.iter().map(|(_, t)| t.clone()).collect();
    for back in archive::recover(&places) {
        eprintln!(
            "ephemera: {}: put {} back as an interrupted restore left it",
            m.name,
            back.display()
        );
    }
    let reader = std::fs::File::open(tmp.path()).map_err(|e| skip(e.into(), false))?;
    let staged = archive::extract(std::io::BufReader::new(reader), &targets, &ctx.limits())
        .map_err(|e| {
            // A full disk is not the entry's fault: quarantining it would
            // hide it from every job of its scope (the trusted seed too).
            if e.downcast_ref::<archive::LocalFailure>().is_some() {
                skip(e.context("nothing was changed"), false)
            } else {
                skip(
                    e.context("the archive was refused; nothing was changed"),
                    true,
                )
            }
        })?;
    for what in &staged.skipped {
        eprintln!("ephemera: {}: left out {what}", m.name);
    }
    staged.swap().map_err(Refusal::Fatal)?;
    let how = match status {
        Status::Fallback => format!("fallback: no entry has the current key {current_key}"),
        _ => status.as_str().to_string(),
    };
    Ok(printable(&format!(
        "ephemera: restored {} ({how}) scope={} key={} sha256={} size={} paths={} created by {} \
         at {} location={}",
        m.name,
        entry.scope,
        m.key,
        m.sha256,
        format_size(m.size),
        show_paths(m),
        m.created_by.describe(),
        m.created_at,
        location
    ))
    .into_owned())
}

/// Tombstone a broken entry's key so later jobs of the scope skip it; only
/// in the job's own scope.
async fn quarantine(job: &Scoped<'_>, entry: &Entry) {
    if entry.scope != job.scope() {
        return;
    }
    let m = &entry.manifest;
    match write_tombstone(job, &m.name, Some(m.key.clone())).await {
        Ok(()) => eprintln!(
            "ephemera: {}: invalidated key {} in scope {} so the next persist starts afresh",
            m.name,
            m.key,
            job.scope()
        ),
        Err(e) => eprintln!("ephemera: warning: cannot invalidate the broken entry: {e:#}"),
    }
}

pub(super) async fn write_tombstone(
    job: &Scoped<'_>,
    name: &str,
    key: Option<String>,
) -> Result<()> {
    let now = SystemTime::now();
    let t = Tombstone {
        format: manifest::MANIFEST_FORMAT,
        id: manifest::new_id(now),
        name: name.to_string(),
        key,
        created_at: manifest::now_rfc3339(now),
        created_by: manifest::CreatedBy::from_env(env),
    };
    let path = manifest::tombstone_key(job.scope(), name, &t.id);
    if !job.create(&path, serde_json::to_vec_pretty(&t)?).await? {
        bail!(
            "{} already exists: run invalidate again",
            job.store().location(&path)
        );
    }
    Ok(())
}

fn append_annotation(line: &str) {
    let body = format!("- `{}`\n", line.replace('`', "'"));
    let status = std::process::Command::new("buildkite-agent")
        .args([
            "annotate",
            "--append",
            "--context",
            ANNOTATION_CONTEXT,
            "--style",
            "info",
            &body,
        ])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("ephemera: warning: buildkite-agent annotate failed ({s})"),
        Err(e) => eprintln!("ephemera: warning: cannot run buildkite-agent annotate: {e}"),
    }
}
