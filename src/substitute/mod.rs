//! `--skip-cached`: whether a binary cache already has a target's outputs,
//! so that its build step can be skipped.
//!
//! A target counts as cached when every output path's narinfo is found in
//! one of the substituters Nix is configured with ([`config`]) and, when
//! Nix requires signatures, is signed by one of its trusted keys
//! ([`narinfo`]): the test Nix makes before it substitutes a path rather
//! than build it. Any doubt (an error, a timeout, a bad signature) is "not
//! cached": the target is built, never skipped wrongly. The local store
//! counts for nothing: build agents rarely share it with the agent that
//! generates the pipeline.

pub mod cache;
mod check;
pub mod config;
pub mod narinfo;
pub mod netrc;

use std::time::Duration;

use crate::types::DrvPath;

pub use check::{Answer, CheckSummary, Checker, OutputCheck, Report, explain, render_explain};

/// How the check is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--substituters`: these caches instead of Nix's `substituters`.
    pub substituters: Option<Vec<String>>,
    /// Most time one request may take.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            substituters: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }
}

pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// The command-line flags, shared by `pipeline` and `explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Skip targets whose outputs are all in a binary cache Nix is
    /// configured with, signed by a trusted key when Nix requires it
    /// (default: off, or the depot's skipCached). --skip-cached=false
    /// turns off the depot's setting.
    #[arg(
        long,
        env = "DRVKITE_SKIP_CACHED",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub skip_cached: Option<bool>,
    /// Binary caches to ask instead of Nix's substituters: URLs separated
    /// by spaces, or the flag given again.
    #[arg(long, env = "DRVKITE_SUBSTITUTERS", value_delimiter = ' ')]
    pub substituters: Option<Vec<String>>,
    /// Most seconds one binary cache request may take.
    #[arg(
        long,
        env = "DRVKITE_CACHE_TIMEOUT",
        default_value_t = DEFAULT_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub cache_timeout: u64,
}

impl CacheArgs {
    pub fn options(&self) -> Options {
        Options {
            substituters: self
                .substituters
                .as_ref()
                .map(|s| s.iter().filter(|u| !u.is_empty()).cloned().collect()),
            timeout: Duration::from_secs(self.cache_timeout),
        }
    }

    /// A checker started now, when the flag (not only the depot's
    /// setting) asks for the check: it then runs while Nix evaluates.
    pub fn early_checker(&self) -> Option<Checker> {
        (self.skip_cached == Some(true)).then(|| Checker::start(self.options()))
    }
}

/// The check's report when `enabled`: the early checker's, or one started
/// now (the depot's setting alone turned it on). `drvs` are the
/// derivations that may be skipped; those sent already are not asked again.
pub fn finish(
    checker: Option<Checker>,
    enabled: bool,
    opts: &Options,
    drvs: impl Iterator<Item = DrvPath>,
) -> Option<Report> {
    if !enabled {
        return None;
    }
    let checker = checker.unwrap_or_else(|| Checker::start(opts.clone()));
    let sender = checker.sender();
    for drv in drvs {
        let _ = sender.send(drv);
    }
    drop(sender);
    Some(checker.finish())
}

/// Buildkite refuses skip reasons longer than this.
const MAX_SKIP_REASON: usize = 70;

/// The skip reason of a step whose outputs are in the cache `name`,
/// shortened to Buildkite's limit.
pub fn skip_reason(name: &str) -> String {
    const PREFIX: &str = "Cached in ";
    let room = MAX_SKIP_REASON - PREFIX.len();
    if name.chars().count() <= room {
        format!("{PREFIX}{name}")
    } else {
        let cut: String = name.chars().take(room - 1).collect();
        format!("{PREFIX}{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_fit_buildkite() {
        assert_eq!(
            skip_reason("https://cache.example.org"),
            "Cached in https://cache.example.org"
        );
        let long = skip_reason(&format!("https://{}", "é".repeat(100)));
        assert_eq!(long.chars().count(), MAX_SKIP_REASON);
        assert!(long.ends_with('…'));
    }
}
