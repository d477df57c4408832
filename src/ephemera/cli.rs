//! The `drvkite ephemera` command line: flags, environment variables and
//! subcommands, and turning them into a [`Ctx`] before handing over to the
//! command modules. No policy lives here: which scopes a job may read or
//! write, what may be archived and what is evicted are decided in the
//! modules this one calls.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::FalseyValueParser;
use clap::{Args, Subcommand};

use super::key::KeyInputs;
use super::scope::Policy;
use super::store::{S3Options, Store};
use super::{Ctx, env, evict, parse_size, persist, report, restore};

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
    /// Allow persisting and restoring whole config folders (~/.config,
    /// ~/.local/share), where many tools keep credentials. Credential stores
    /// inside them are left out all the same.
    #[arg(long, env = "DRVKITE_EPHEMERA_ALLOW_CONFIG_FOLDERS", value_parser = FalseyValueParser::new(), global = true)]
    pub allow_config_folders: bool,
    /// When no entry has the current key, restore the newest entry of the
    /// set under any key (same scopes, same order); `show` and `list` say
    /// what a restore would then do.
    #[arg(long, env = "DRVKITE_EPHEMERA_FALLBACK", value_parser = FalseyValueParser::new(), global = true)]
    pub fallback: bool,
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
    pub(super) fn inputs(&self, name: &str, cwd: &std::path::Path) -> Result<KeyInputs> {
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
        /// or ~/…, or rules picking files in them (`target/**`,
        /// `!target/tmp/**`, `=…` must match, `%…` may change); each path
        /// or rule's fixed folder is restored to the same place.
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
        /// Write `exact`, `fallback` or `miss` to this file (replacing it).
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
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
        EphemeraCommand::Persist { name, paths, key } => {
            persist::persist(&ctx, &name, &paths, &key).await
        }
        EphemeraCommand::Restore {
            name,
            key,
            require,
            annotate,
            status_file,
        } => {
            let wanted = restore::Wanted {
                require,
                annotate,
                fallback: ctx.options.fallback,
                status_file,
            };
            restore::restore(&ctx, &name, &key, &wanted).await
        }
        EphemeraCommand::List { json } => report::list(&ctx, json).await,
        EphemeraCommand::Show { name, key, json } => report::show(&ctx, &name, &key, json).await,
        EphemeraCommand::Invalidate { name, key } => report::invalidate(&ctx, &name, key).await,
        EphemeraCommand::Gc { max_age, dry_run } => evict::gc(&ctx, max_age, dry_run).await,
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
