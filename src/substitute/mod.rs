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

pub use check::{Answer, Checker, OutputCheck, Report, explain};

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
