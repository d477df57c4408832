//! `drvkite parent-map fetch`: the derivation map of an earlier passed
//! build of the default branch, found through Buildkite's GraphQL API, so
//! that `drvkite pipeline` skips the targets that build already built.
//!
//! Preference order: the build of the merge-base of this commit with the
//! default branch (what the branch started from), then its first-parent
//! ancestors, then the newest passed default-branch builds. The map is the
//! `pipeline/drvmap.json` artifact of the step that generated the pipeline.
//!
//! The map only saves work, so anything that goes wrong ends in one line
//! and exit 0 without a file: the pipeline then builds everything. A map
//! that does not parse is never written.
//!
//! `search` decides which build to take; `api` talks to Buildkite.

mod api;
mod search;

use anyhow::{Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{group, short_branch};
use crate::drvmap::DrvMap;
pub use api::DEFAULT_API_URL;

#[derive(Debug, Subcommand)]
pub enum ParentMapCommand {
    /// Download the derivation map of an earlier passed build of the default
    /// branch (the merge-base's build first). Exits 0 without a file when
    /// there is none: the pipeline then builds every target.
    Fetch(Box<FetchArgs>),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Where to write the map; its provenance goes to FILE.source.json.
    #[arg(long, value_name = "FILE")]
    pub out: Utf8PathBuf,
    /// The Buildkite organization's slug.
    #[arg(long, env = "BUILDKITE_ORGANIZATION_SLUG")]
    pub org: String,
    /// The Buildkite pipeline's slug.
    #[arg(long, env = "BUILDKITE_PIPELINE_SLUG")]
    pub pipeline: String,
    /// The branch being built; on the default branch nothing is fetched.
    #[arg(long, env = "BUILDKITE_BRANCH")]
    pub branch: Option<String>,
    /// The commit being built (any git revision).
    #[arg(long, env = "BUILDKITE_COMMIT", default_value = "HEAD")]
    pub commit: String,
    /// The pipeline's default branch, whose builds provide parent maps.
    #[arg(
        long,
        env = "BUILDKITE_PIPELINE_DEFAULT_BRANCH",
        default_value = "main"
    )]
    pub default_branch: String,
    /// The git ref of the default branch to take the merge-base with
    /// [default: origin/<default branch>].
    #[arg(long)]
    pub base_ref: Option<String>,
    /// The git checkout to read history from.
    #[arg(long, default_value = ".")]
    pub repo: Utf8PathBuf,
    /// How many first-parent ancestors of the merge-base to try.
    #[arg(long, default_value_t = 10)]
    pub depth: usize,
    /// How many of the newest passed default-branch builds to try last.
    #[arg(long, default_value_t = 20)]
    pub recent: usize,
    /// The key of the step that generated the pipeline and uploaded the map.
    #[arg(long, default_value = "pipeline-gen")]
    pub step_key: String,
    /// The artifact path of the map in that step.
    #[arg(long, default_value = "pipeline/drvmap.json")]
    pub artifact_path: String,
    /// A file holding the API token (GraphQL scope). Without it the token is
    /// read from the environment variable BUILDKITE_API_TOKEN.
    #[arg(long, env = "BUILDKITE_TOKEN_PATH")]
    pub token_file: Option<Utf8PathBuf>,
    /// Buildkite's GraphQL endpoint.
    #[arg(long, env = "DRVKITE_BUILDKITE_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// The build this runs in, never taken as its own parent.
    #[arg(long, env = "BUILDKITE_BUILD_ID")]
    pub build_id: Option<String>,
    /// Seconds allowed for each HTTP request.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Prints progress lines with the token blotted out, in case a server or a
/// downloaded file echoes it back.
#[derive(Default)]
struct Log {
    secret: Option<String>,
}

impl Log {
    fn line(&self, s: &str) {
        eprintln!("{}", self.redact(s));
    }
    fn redact(&self, s: &str) -> String {
        let one_line = s.replace(['\n', '\r'], " ");
        match &self.secret {
            // Real tokens are long; a short test value would blot out words.
            Some(t) if t.len() >= 8 => one_line.replace(t.as_str(), "[token]"),
            _ => one_line,
        }
    }
}

pub fn run(command: &ParentMapCommand) -> Result<()> {
    match command {
        ParentMapCommand::Fetch(args) => fetch(args),
    }
}

fn sidecar(out: &Utf8Path) -> Utf8PathBuf {
    Utf8PathBuf::from(format!("{out}.source.json"))
}

pub fn fetch(args: &FetchArgs) -> Result<()> {
    group(&format!(
        "parent map: looking for a passed {} build",
        args.default_branch
    ));
    // A map left by an earlier run in this checkout would be taken for
    // this build's: whatever happens below, it must not survive.
    for stale in [args.out.clone(), sidecar(&args.out)] {
        match std::fs::remove_file(&stale) {
            Ok(()) => eprintln!("removed the previous {stale}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot remove the previous {stale}: remove it by hand, it would be mistaken for this build's parent map")
                });
            }
        }
    }
    if let Some(branch) = &args.branch
        && short_branch(branch) == short_branch(&args.default_branch)
    {
        eprintln!(
            "no parent map: this is a build of the default branch {}, which builds every target",
            args.default_branch
        );
        return Ok(());
    }
    let mut log = Log::default();
    match search::find(args, &mut log) {
        Ok(found) => match write(args, &found) {
            Ok(()) => log.line(&format!(
                "parent map: wrote {} ({} targets) from {}",
                args.out,
                found.map.len(),
                found.describe()
            )),
            Err(e) => {
                let _ = std::fs::remove_file(&args.out);
                let _ = std::fs::remove_file(sidecar(&args.out));
                log.line(&format!("no parent map: {e:#}; every target will be built"));
            }
        },
        Err(reason) => log.line(&format!(
            "no parent map: {reason}; every target will be built"
        )),
    }
    Ok(())
}

fn write(args: &FetchArgs, found: &Found) -> Result<()> {
    if let Some(dir) = args.out.parent()
        && !dir.as_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    }
    // The provenance first: a reader that finds the map finds its source.
    let source = serde_json::to_vec_pretty(&found.source)?;
    crate::atomic::write_file(&sidecar(&args.out), &source)?;
    found.map.write(&args.out)
}

struct Found {
    map: DrvMap,
    source: Value,
}

impl Found {
    fn describe(&self) -> String {
        let s = &self.source;
        let mut d = format!(
            "build #{} at {}",
            s["buildNumber"],
            s["commit"].as_str().unwrap_or("?")
        );
        match s["how"].as_str() {
            Some("merge-base") => d.push_str(", the merge-base"),
            Some("ancestor") => {
                let n = s["distance"].as_u64().unwrap_or(0);
                let plural = if n == 1 { "" } else { "s" };
                d.push_str(&format!(
                    ", {n} first-parent commit{plural} before the merge-base"
                ));
            }
            _ => d.push_str(", the newest passed build with a map"),
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_hides_the_token() {
        let log = Log {
            secret: Some("s3cr3t-token".into()),
        };
        assert_eq!(log.redact("bad s3cr3t-token\nhere"), "bad [token] here");
        let short = Log {
            secret: Some("x".into()),
        };
        assert_eq!(short.redact("example"), "example");
    }
}
