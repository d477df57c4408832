//! Ephemera: files carried from one build to the next (cargo registries,
//! compiler caches), without letting untrusted builds poison trusted ones.
//!
//! - [`scope`]: which entries a job may read and write, from Buildkite's
//!   environment only. Default-branch builds restore nothing unless the
//!   operator allows trusted seeds; pull requests never write where the
//!   default branch reads; forks are isolated.
//! - [`key`]: what invalidates an entry (name, salt, key files, drvPath).
//! - [`archive`]: tar + zstd, strict validation, staging and swap.
//! - [`manifest`]: immutable manifests and tombstones, store layout.
//! - [`store`]: a local folder (default) or an S3-compatible bucket.
//! - [`steps`]: shell lines for declarative use from pipeline steps.

pub mod anchor;
pub mod archive;
pub mod key;
pub mod manifest;
pub mod scope;
pub mod steps;
pub mod store;

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::builder::FalseyValueParser;
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use steps::{EphemeraSet, step_commands, step_commands_with, wrap_script};

use anchor::Anchors;
use archive::{Limits, Source};
use key::KeyInputs;
use manifest::{Entry, Manifest, ScopeIndex, Tombstone};
use scope::{Policy, Scope, component};
use store::{Hashing, S3Options, Store};

/// Version of the archive layout; part of every key.
pub const ARCHIVE_FORMAT: u32 = 1;
const MAX_ENTRIES: u64 = 1_000_000;
/// Unreferenced blobs younger than this may belong to a persist in
/// progress (blob uploaded, manifest not yet written): leave them.
const GRACE: Duration = Duration::from_secs(3600);
const ANNOTATION_CONTEXT: &str = "drvkite-ephemera";

#[derive(Debug, Args)]
pub struct EphemeraArgs {
    #[command(flatten)]
    pub options: Options,
    #[command(subcommand)]
    pub command: EphemeraCommand,
}

/// Options of every ephemera command. The scope is not among them: it
/// comes from Buildkite's environment only.
#[derive(Debug, Args)]
pub struct Options {
    /// Where entries are kept: a local folder or s3://BUCKET[/PREFIX].
    /// [default: $XDG_CACHE_HOME/drvkite/ephemera or ~/.cache/drvkite/ephemera]
    #[arg(long, env = "DRVKITE_EPHEMERA_STORE", global = true)]
    pub store: Option<String>,
    /// S3 endpoint URL for S3-compatible servers (MinIO, Garage…); otherwise
    /// AWS_ENDPOINT_URL or AWS itself.
    #[arg(long, env = "DRVKITE_EPHEMERA_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// Allow plain http:// for the S3 endpoint.
    #[arg(long, env = "DRVKITE_EPHEMERA_S3_ALLOW_HTTP", value_parser = FalseyValueParser::new(), global = true)]
    pub s3_allow_http: bool,
    /// Default-branch builds write a trusted seed, which pull requests and
    /// branch builds of the pipeline's own repository fall back to.
    #[arg(long, env = "DRVKITE_EPHEMERA_SEED", value_parser = FalseyValueParser::new(), global = true)]
    pub seed: bool,
    /// Default-branch builds restore trusted seeds (never entries of pull
    /// requests or branches).
    #[arg(long, env = "DRVKITE_EPHEMERA_TRUSTED_RESTORE", value_parser = FalseyValueParser::new(), global = true)]
    pub trusted_restore: bool,
    /// Largest compressed entry to write or restore (e.g. 4GiB, 500MB).
    #[arg(long, env = "DRVKITE_EPHEMERA_MAX_ENTRY_SIZE", default_value = "4GiB", value_parser = parse_size, global = true)]
    pub max_entry_size: u64,
    /// Largest total size of the files of one entry.
    #[arg(long, env = "DRVKITE_EPHEMERA_MAX_UNPACKED_SIZE", default_value = "16GiB", value_parser = parse_size, global = true)]
    pub max_unpacked_size: u64,
    /// Largest total size of one scope's archives: persisting evicts the
    /// scope's least recently used entries to stay under it.
    #[arg(long, env = "DRVKITE_EPHEMERA_MAX_SCOPE_SIZE", default_value = "20GiB", value_parser = parse_size, global = true)]
    pub max_scope_size: u64,
}

/// What an entry's key is made of, besides the set's name.
#[derive(Debug, Args, Clone)]
pub struct KeyArgs {
    /// A file whose contents are part of the key (e.g. Cargo.lock);
    /// repeatable; relative to the working directory.
    #[arg(
        long = "key-file",
        env = "DRVKITE_EPHEMERA_KEY_FILES",
        value_delimiter = ','
    )]
    pub key_files: Vec<String>,
    /// Any string; change it to start afresh.
    #[arg(long, env = "DRVKITE_EPHEMERA_SALT", default_value = "")]
    pub salt: String,
    /// A Nix derivation path (e.g. the toolchain's drvPath) that is part of
    /// the key.
    #[arg(long, env = "DRVKITE_EPHEMERA_KEY_DRV")]
    pub key_drv: Option<String>,
}

impl KeyArgs {
    /// The key inputs of set `name`, with key files read relative to `cwd`.
    fn inputs(&self, name: &str, cwd: &std::path::Path) -> Result<KeyInputs> {
        KeyInputs::collect(
            name,
            &self.salt,
            &self.key_files,
            self.key_drv.as_deref(),
            cwd,
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum EphemeraCommand {
    /// Archive PATHs (relative to the working directory, or ~/…) as a new
    /// entry of set NAME in this job's scope. Run it only after success.
    Persist {
        /// The set's name (letters, digits, '.', '_', '-'), e.g. cargo-target.
        name: String,
        /// Files and folders to archive, relative to the working directory
        /// or ~/…; each is restored to the same place.
        #[arg(required = true)]
        paths: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Put the newest allowed entry of set NAME back where it was persisted
    /// from (replacing what is there). A miss is not an error.
    Restore {
        /// The set's name (letters, digits, '.', '_', '-'), e.g. cargo-target.
        name: String,

        #[command(flatten)]
        key: KeyArgs,
        /// Fail when nothing is restored.
        #[arg(long, env = "DRVKITE_EPHEMERA_REQUIRE", value_parser = FalseyValueParser::new())]
        require: bool,
        /// Also append the provenance line to the build's annotation
        /// (context drvkite-ephemera).
        #[arg(long, env = "DRVKITE_EPHEMERA_ANNOTATE", value_parser = FalseyValueParser::new())]
        annotate: bool,
    },
    /// List the entries of this pipeline (of the whole store outside
    /// Buildkite).
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show the entries of set NAME this job can see, and which one a
    /// restore would use.
    Show {
        /// The set's name (letters, digits, '.', '_', '-'), e.g. cargo-target.
        name: String,
        #[command(flatten)]
        key: KeyArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tombstone the entries of set NAME in this job's scope: restores skip
    /// entries created before now.
    Invalidate {
        /// The set's name (letters, digits, '.', '_', '-'), e.g. cargo-target.
        name: String,

        /// Only entries with this key (see `show`); all keys otherwise.
        #[arg(long)]
        key: Option<String>,
    },
    /// Remove entries unused for longer than --max-age, invalidated
    /// entries, and archives no entry needs, in the whole store.
    Gc {
        /// e.g. 7d, 36h, 30m.
        #[arg(long, env = "DRVKITE_EPHEMERA_MAX_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
        max_age: Duration,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

struct Ctx {
    store: Store,
    policy: Policy,
    options: Options,
}

impl Ctx {
    fn limits(&self) -> Limits {
        Limits {
            max_unpacked: self.options.max_unpacked_size,
            max_entries: MAX_ENTRIES,
        }
    }

    fn anchors(&self) -> Result<(PathBuf, Anchors)> {
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        let home = env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let anchors = Anchors::new(&cwd, home.as_deref())?;
        Ok((cwd, anchors))
    }
}

pub async fn run(args: EphemeraArgs) -> Result<ExitCode> {
    let options = args.options;
    let spec = match &options.store {
        Some(s) if !s.is_empty() => s.clone(),
        _ => default_store()?,
    };
    let store = Store::open(
        &spec,
        &S3Options {
            endpoint: options.s3_endpoint.clone(),
            allow_http: options.s3_allow_http,
        },
    )?;
    let ctx = Ctx {
        store,
        policy: Policy {
            seed: options.seed,
            trusted_restore: options.trusted_restore,
        },
        options,
    };
    match args.command {
        EphemeraCommand::Persist { name, paths, key } => persist(&ctx, &name, &paths, &key).await,
        EphemeraCommand::Restore {
            name,
            key,
            require,
            annotate,
        } => restore(&ctx, &name, &key, require, annotate).await,
        EphemeraCommand::List { json } => list(&ctx, json).await,
        EphemeraCommand::Show { name, key, json } => show(&ctx, &name, &key, json).await,
        EphemeraCommand::Invalidate { name, key } => invalidate(&ctx, &name, key).await,
        EphemeraCommand::Gc { max_age, dry_run } => gc(&ctx, max_age, dry_run).await,
    }
}

fn default_store() -> Result<String> {
    let base = env("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").filter(|v| !v.is_empty()).map(|h| Path::new(&h).join(".cache")))
        .context("neither --store, DRVKITE_EPHEMERA_STORE, XDG_CACHE_HOME nor HOME is set: say where the ephemera store is")?;
    Ok(base.join("drvkite/ephemera").display().to_string())
}

/// Set names: letters, digits, `.`, `_`, `-`; not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        bail!(
            "ephemera set name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', \
             not starting with '.' or '-'"
        );
    }
    Ok(())
}

async fn persist(ctx: &Ctx, name: &str, paths: &[String], key: &KeyArgs) -> Result<ExitCode> {
    check_name(name)?;
    // In a post-command hook the agent tells how the command ended.
    if let Some(status) = env("BUILDKITE_COMMAND_EXIT_STATUS").filter(|s| s != "0") {
        eprintln!("ephemera: {name}: not persisting: the command failed (exit status {status})");
        return Ok(ExitCode::SUCCESS);
    }
    let job = Scope::from_env(env)?;
    let Some(scope) = job.write_scope(ctx.policy) else {
        eprintln!(
            "ephemera: {name}: not persisting: {job} is a default-branch build and trusted seeds \
             are off (DRVKITE_EPHEMERA_SEED)"
        );
        return Ok(ExitCode::SUCCESS);
    };
    let (cwd, anchors) = ctx.anchors()?;
    let inputs = key.inputs(name, &cwd)?;
    let key = inputs.key();
    let mut sources: Vec<Source> = Vec::new();
    for arg in paths {
        match anchors.resolve(arg)? {
            Some((saved, real)) => {
                if let Some(other) = sources
                    .iter()
                    .find(|s| s.real.starts_with(&real) || real.starts_with(&s.real))
                {
                    bail!(
                        "{arg} and {} overlap: give each path of ephemera set {name} once",
                        other.saved
                    );
                }
                sources.push(Source { saved, real });
            }
            None => eprintln!("ephemera: {name}: {arg} does not exist, leaving it out"),
        }
    }
    if sources.is_empty() {
        eprintln!("ephemera: {name}: nothing to persist");
        return Ok(ExitCode::SUCCESS);
    }

    let tmp = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    let mut writer = Hashing::new(
        BufWriter::new(tmp.reopen().context("cannot open the temporary file")?),
        ctx.options.max_entry_size,
    );
    let created = archive::create(&sources, &mut writer, &ctx.limits()).map(|(s, _)| s);
    if writer.exceeded {
        bail!(
            "ephemera set {name} is bigger than --max-entry-size ({}) compressed: raise the cap \
             or persist less",
            format_size(ctx.options.max_entry_size)
        );
    }
    let summary = created.with_context(|| format!("cannot archive ephemera set {name}"))?;
    let (sha256, size, file) = writer.finish().context("cannot write the archive")?;
    file.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .context("cannot write the archive")?;
    for skipped in &summary.skipped {
        eprintln!("ephemera: {name}: left out {skipped}");
    }

    let prefix = scope.prefix();
    let index = manifest::load_scope(&ctx.store, &prefix, None).await?;
    if let Some(same) = index
        .newest(name, &key)
        .filter(|e| e.manifest.sha256 == sha256)
    {
        touch(ctx, same).await;
        println!(
            "ephemera: {name} unchanged since entry {} in scope {scope} (sha256={sha256}): \
             nothing new stored",
            same.manifest.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    make_room(ctx, &index, name, size, &sha256).await?;
    let blob = manifest::blob_key(&prefix, &sha256);
    ctx.store.put_file(&blob, tmp.path()).await?;
    let now = SystemTime::now();
    let id = manifest::new_id(now);
    let m = Manifest {
        format: manifest::MANIFEST_FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        id: id.clone(),
        name: name.to_string(),
        scope: prefix.clone(),
        key: key.clone(),
        key_inputs: inputs,
        sha256: sha256.clone(),
        size,
        unpacked_size: summary.unpacked,
        entries: summary.entries,
        paths: sources.iter().map(|s| s.saved.clone()).collect(),
        created_at: manifest::now_rfc3339(now),
        created_by: manifest::CreatedBy::from_env(env),
    };
    let entry_key = manifest::entry_key(&prefix, name, &key, &id);
    if !ctx
        .store
        .create(&entry_key, serde_json::to_vec_pretty(&m)?)
        .await?
    {
        bail!(
            "{} already exists: another job wrote the same entry id; run persist again",
            ctx.store.location(&entry_key)
        );
    }
    let used = manifest::used_key(&prefix, name, &key, &id);
    ctx.store
        .put(&used, manifest::now_rfc3339(now).into_bytes())
        .await?;
    println!(
        "ephemera: persisted {name} scope={scope} key={key} sha256={sha256} size={} \
         ({} files and folders, {} unpacked) paths={} location={}",
        format_size(size),
        summary.entries,
        format_size(summary.unpacked),
        show_paths(&m),
        ctx.store.location(&blob)
    );
    Ok(ExitCode::SUCCESS)
}

fn show_paths(m: &Manifest) -> String {
    m.paths
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Keep the scope under its cap: evict invalidated entries, then the least
/// recently used ones, of this scope only (other scopes never pay for it).
async fn make_room(
    ctx: &Ctx,
    index: &ScopeIndex,
    name: &str,
    size: u64,
    sha256: &str,
) -> Result<()> {
    let cap = ctx.options.max_scope_size;
    if size > cap {
        bail!(
            "ephemera set {name} is {} compressed, more than --max-scope-size ({}): raise the cap \
             or persist less",
            format_size(size),
            format_size(cap)
        );
    }
    let new_blob = manifest::blob_key(&index.scope, sha256);
    let blob_sizes: HashMap<&str, u64> = index
        .blobs
        .iter()
        .map(|b| (b.key.as_str(), b.size))
        .collect();
    let mut usage = index.usage();
    if !blob_sizes.contains_key(new_blob.as_str()) {
        usage += size;
    }
    let mut refs: HashMap<String, usize> = HashMap::new();
    for e in &index.entries {
        *refs.entry(e.blob_key()).or_default() += 1;
    }
    let now = SystemTime::now();
    for blob in &index.blobs {
        if usage <= cap {
            return Ok(());
        }
        if blob.key != new_blob && !refs.contains_key(&blob.key) && age(now, blob.modified) > GRACE
        {
            ctx.store.delete(&blob.key).await?;
            usage -= blob.size;
        }
    }
    let mut candidates: Vec<&Entry> = index.entries.iter().collect();
    candidates.sort_by_key(|e| (!e.tombstoned, e.last_used));
    for e in candidates {
        if usage <= cap {
            return Ok(());
        }
        ctx.store.delete(&e.path).await?;
        ctx.store.delete(&e.used_key()).await?;
        let blob = e.blob_key();
        let left = refs.get_mut(&blob).expect("counted above");
        *left -= 1;
        if *left == 0 && blob != new_blob {
            ctx.store.delete(&blob).await?;
            usage -= blob_sizes.get(blob.as_str()).copied().unwrap_or(0);
        }
        eprintln!(
            "ephemera: evicted {} entry {} (key {}, {}) to keep scope {} under {}",
            e.manifest.name,
            e.manifest.id,
            short(&e.manifest.key),
            if e.tombstoned {
                "invalidated".to_string()
            } else {
                format!(
                    "last used {}",
                    humantime::format_rfc3339_seconds(e.last_used)
                )
            },
            index.scope,
            format_size(cap)
        );
    }
    if usage > cap {
        bail!(
            "scope {} stays above --max-scope-size ({}) after evicting every entry: raise the cap",
            index.scope,
            format_size(cap)
        );
    }
    Ok(())
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// Record a use (best effort: it only steers eviction).
async fn touch(ctx: &Ctx, entry: &Entry) {
    let now = manifest::now_rfc3339(SystemTime::now()).into_bytes();
    if let Err(e) = ctx.store.put(&entry.used_key(), now).await {
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

async fn restore(
    ctx: &Ctx,
    name: &str,
    key: &KeyArgs,
    require: bool,
    annotate: bool,
) -> Result<ExitCode> {
    check_name(name)?;
    let job = Scope::from_env(env)?;
    let scopes = job.restore_scopes(ctx.policy);
    let miss = |why: String| -> Result<ExitCode> {
        if require {
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
    let key = key.inputs(name, &cwd)?.key();
    let write_scope = job.write_scope(ctx.policy).map(|s| s.prefix());
    for scope in &scopes {
        let prefix = scope.prefix();
        let index = manifest::load_scope(&ctx.store, &prefix, Some(name)).await?;
        for entry in index.live(name, &key) {
            match restore_entry(ctx, entry, &anchors).await {
                Ok(line) => {
                    println!("{line}");
                    if annotate {
                        append_annotation(&line);
                    }
                    // A job writes only into its own scope, even last-use
                    // marks: trusted seeds are kept fresh by the default
                    // branch persisting them.
                    if write_scope.as_deref() == Some(prefix.as_str()) {
                        touch(ctx, entry).await;
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Err(Refusal::Fatal(e)) => return Err(e),
                Err(Refusal::Skip { reason, integrity }) => {
                    eprintln!(
                        "ephemera: warning: {name}: entry {} in scope {scope} refused: {reason:#}",
                        entry.manifest.id
                    );
                    if integrity && write_scope.as_deref() == Some(prefix.as_str()) {
                        quarantine(ctx, entry).await;
                    }
                }
            }
        }
    }
    let searched: Vec<String> = scopes.iter().map(|s| s.prefix()).collect();
    miss(format!(
        "no entry with key {key} in {}",
        searched.join(", ")
    ))
}

async fn restore_entry(ctx: &Ctx, entry: &Entry, anchors: &Anchors) -> Result<String, Refusal> {
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
        .map(|p| anchors.target(p))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| skip(e, false))?;
    // Persist never writes these; a manifest that has them was forged.
    let overlapping = targets.iter().enumerate().any(|(i, a)| {
        targets[i + 1..]
            .iter()
            .any(|b| a.starts_with(b) || b.starts_with(a))
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
    if !found.map_err(|e| skip(e, false))? {
        return Err(skip(anyhow::anyhow!("{location} is missing"), true));
    }
    let (sha256, _, file) = writer.finish().map_err(|e| skip(e.into(), false))?;
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
    let reader = std::fs::File::open(tmp.path()).map_err(|e| skip(e.into(), false))?;
    let staged = archive::extract(std::io::BufReader::new(reader), &targets, &ctx.limits())
        .map_err(|e| {
            skip(
                e.context("the archive was refused; nothing was changed"),
                true,
            )
        })?;
    staged.swap().map_err(Refusal::Fatal)?;
    Ok(format!(
        "ephemera: restored {} scope={} key={} sha256={} size={} paths={} created by {} at {} \
         location={}",
        m.name,
        m.scope,
        m.key,
        m.sha256,
        format_size(m.size),
        show_paths(m),
        m.created_by.describe(),
        m.created_at,
        location
    ))
}

/// Tombstone a broken entry's key so later jobs of the scope skip it.
async fn quarantine(ctx: &Ctx, entry: &Entry) {
    let m = &entry.manifest;
    match write_tombstone(ctx, &m.scope, &m.name, Some(m.key.clone())).await {
        Ok(()) => eprintln!(
            "ephemera: {}: invalidated key {} in scope {} so the next persist starts afresh",
            m.name, m.key, m.scope
        ),
        Err(e) => eprintln!("ephemera: warning: cannot invalidate the broken entry: {e:#}"),
    }
}

async fn write_tombstone(ctx: &Ctx, scope: &str, name: &str, key: Option<String>) -> Result<()> {
    let now = SystemTime::now();
    let t = Tombstone {
        format: manifest::MANIFEST_FORMAT,
        id: manifest::new_id(now),
        name: name.to_string(),
        key,
        created_at: manifest::now_rfc3339(now),
        created_by: manifest::CreatedBy::from_env(env),
    };
    let path = manifest::tombstone_key(scope, name, &t.id);
    if !ctx
        .store
        .create(&path, serde_json::to_vec_pretty(&t)?)
        .await?
    {
        bail!(
            "{} already exists: run invalidate again",
            ctx.store.location(&path)
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

/// An entry as `list --json` and `show --json` print it.
#[derive(Serialize)]
struct Listing<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    last_used: String,
    invalidated: bool,
}

impl<'a> From<&'a Entry> for Listing<'a> {
    fn from(e: &'a Entry) -> Self {
        Listing {
            manifest: &e.manifest,
            last_used: humantime::format_rfc3339_seconds(e.last_used).to_string(),
            invalidated: e.tombstoned,
        }
    }
}

fn entry_line(e: &Entry) -> String {
    let m = &e.manifest;
    format!(
        "{}  {}  key={}  sha256={}  {}  paths={}  created {} by {}  last used {}{}",
        m.scope,
        m.name,
        short(&m.key),
        short(&m.sha256),
        format_size(m.size),
        show_paths(m),
        m.created_at,
        m.created_by.describe(),
        humantime::format_rfc3339_seconds(e.last_used),
        if e.tombstoned { "  (invalidated)" } else { "" }
    )
}

async fn list(ctx: &Ctx, json: bool) -> Result<ExitCode> {
    let prefix = match (
        env("BUILDKITE_ORGANIZATION_SLUG").filter(|v| !v.is_empty()),
        env("BUILDKITE_PIPELINE_SLUG").filter(|v| !v.is_empty()),
    ) {
        (Some(org), Some(pipeline)) => format!("{}/{}", component(&org), component(&pipeline)),
        _ => String::new(),
    };
    let scopes = manifest::load(&ctx.store, &prefix, None).await?;
    let entries: Vec<&Entry> = scopes.iter().flat_map(|s| &s.entries).collect();
    if json {
        let out: Vec<Listing> = entries.into_iter().map(Listing::from).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if entries.is_empty() {
        eprintln!("ephemera: no entries in {}", ctx.store.location(&prefix));
    } else {
        for e in entries {
            println!("{}", entry_line(e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(ctx: &Ctx, name: &str, key: &KeyArgs, json: bool) -> Result<ExitCode> {
    check_name(name)?;
    let job = Scope::from_env(env)?;
    let mut scopes = job.restore_scopes(ctx.policy);
    if let Some(w) = job.write_scope(ctx.policy).filter(|w| !scopes.contains(w)) {
        scopes.push(w);
    }
    let readable = job.restore_scopes(ctx.policy);
    let (cwd, _) = ctx.anchors()?;
    let current = key.inputs(name, &cwd).map(|k| k.key());
    let mut chosen: Option<String> = None;
    let mut all = Vec::new();
    for scope in &scopes {
        let index = manifest::load_scope(&ctx.store, &scope.prefix(), Some(name)).await?;
        if chosen.is_none()
            && readable.contains(scope)
            && let Ok(k) = &current
        {
            chosen = index.newest(name, k).map(|e| e.manifest.id.clone());
        }
        all.extend(index.entries);
    }
    if json {
        let out: Vec<Listing> = all.iter().map(Listing::from).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job scope: {job}");
    let shown: Vec<String> = readable.iter().map(|s| s.prefix()).collect();
    println!(
        "restores from: {}",
        if shown.is_empty() {
            "nothing".to_string()
        } else {
            shown.join(", ")
        }
    );
    match &current {
        Ok(k) => println!("current key: {k}"),
        Err(e) => println!("current key: unknown ({e:#})"),
    }
    for e in &all {
        let mark = if chosen.as_deref() == Some(e.manifest.id.as_str()) {
            "  <- restore would use this"
        } else {
            ""
        };
        println!("{}{mark}", entry_line(e));
    }
    if all.is_empty() {
        println!("no entries of {name}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn invalidate(ctx: &Ctx, name: &str, key: Option<String>) -> Result<ExitCode> {
    check_name(name)?;
    if let Some(k) = &key
        && !manifest::is_sha256(k)
    {
        bail!("--key {k} is not a key: copy it from `drvkite ephemera show {name}`");
    }
    // A job invalidates in its own scope: a pull request can never hide
    // (or unhide) the default branch's seeds.
    let job = Scope::from_env(env)?;
    write_tombstone(ctx, &job.prefix(), name, key.clone()).await?;
    println!(
        "ephemera: invalidated {name} ({}) in scope {job}: restores skip entries created before now",
        key.map_or("all keys".to_string(), |k| format!("key {k}"))
    );
    Ok(ExitCode::SUCCESS)
}

async fn gc(ctx: &Ctx, max_age: Duration, dry_run: bool) -> Result<ExitCode> {
    let now = SystemTime::now();
    let scopes = manifest::load(&ctx.store, "", None).await?;
    let mut doomed: Vec<String> = Vec::new();
    let (mut entries_removed, mut kept, mut bytes) = (0usize, 0usize, 0u64);
    for index in &scopes {
        let mut live_blobs = std::collections::HashSet::new();
        let mut live_markers = std::collections::HashSet::new();
        let mut evicted_blobs = std::collections::HashSet::new();
        for e in &index.entries {
            if e.tombstoned || age(now, e.last_used) > max_age {
                doomed.push(e.path.clone());
                doomed.push(e.used_key());
                evicted_blobs.insert(e.blob_key());
                entries_removed += 1;
            } else {
                live_blobs.insert(e.blob_key());
                live_markers.insert(e.used_key());
                kept += 1;
            }
        }
        for b in &index.blobs {
            let orphan_old = age(now, b.modified) > GRACE;
            if !live_blobs.contains(&b.key) && (evicted_blobs.contains(&b.key) || orphan_old) {
                doomed.push(b.key.clone());
                bytes += b.size;
            }
        }
        for u in &index.used {
            if !live_markers.contains(&u.key) && age(now, u.modified) > GRACE {
                doomed.push(u.key.clone());
            }
        }
        for (l, _) in &index.tombstones {
            if age(now, l.modified) > max_age {
                doomed.push(l.key.clone());
            }
        }
        for j in &index.junk {
            if age(now, j.modified) > GRACE {
                doomed.push(j.key.clone());
            }
        }
    }
    doomed.sort();
    doomed.dedup();
    for key in &doomed {
        if dry_run {
            println!("would remove {}", ctx.store.location(key));
        } else {
            ctx.store.delete(key).await?;
        }
    }
    println!(
        "ephemera gc: {} {entries_removed} entries and {} of archives ({} objects), kept \
         {kept} entries used within {}",
        if dry_run { "would remove" } else { "removed" },
        format_size(bytes),
        doomed.len(),
        humantime::format_duration(max_age)
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Parse sizes like `4GiB`, `500MB`, `1024`, `10k` (K/M/G/T are powers of
/// 1000, KiB/MiB/GiB/TiB of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 4GiB, 500MB or 1024"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000u64.pow(2),
        "g" | "gb" => 1000u64.pow(3),
        "t" | "tb" => 1000u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10k"), Ok(10_000));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(3 << 20), "3.0 MiB");
    }

    #[test]
    fn names_are_checked() {
        for ok in ["cargo", "cargo-registry", "a.b_c"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
