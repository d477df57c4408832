//! Ephemera: files carried from one build to the next (cargo registries,
//! compiler caches), without letting untrusted builds poison trusted ones.
//!
//! - [`cli`]: flags, environment variables and subcommands (no policy).
//! - [`scope`]: which entries a job may read and write, from Buildkite's
//!   environment only. Default-branch builds restore nothing unless the
//!   operator allows trusted seeds; pull requests never write where the
//!   default branch reads; forks are isolated.
//! - [`anchor`]: which paths may be persisted and restored, and where;
//!   [`credentials`] and [`places`] are what never may.
//! - [`key`]: what invalidates an entry (name, salt, key files, drvPath).
//! - [`persist`], [`restore`], [`report`]: the commands.
//! - [`evict`]: what leaves the store (scope caps, `gc`).
//! - [`archive`]: tar + zstd, strict validation, staging and swap.
//! - [`manifest`]: immutable manifests and tombstones, store layout.
//! - [`store`]: a local folder (default) or an S3-compatible bucket.
//! - [`steps`]: shell lines for declarative use from pipeline steps.
//!
//! This file holds what they share: the job context and small helpers.

pub mod anchor;
pub mod archive;
pub mod cli;
pub mod credentials;
mod evict;
pub mod key;
pub mod manifest;
mod persist;
pub mod places;
mod report;
mod restore;
pub mod rules;
pub mod scope;
pub mod steps;
pub mod store;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub use cli::{EphemeraArgs, run};
pub use steps::{EphemeraSet, step_commands, step_commands_with, wrap_script};

use anchor::Anchors;
use archive::Limits;
use cli::Options;
use manifest::Manifest;
use places::Forbidden;
use scope::Policy;
use store::Store;

/// Version of the archive layout; part of every key.
pub const ARCHIVE_FORMAT: u32 = 1;
const MAX_ENTRIES: u64 = 1_000_000;

pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What every command works with: the store, the operator's policy and
/// the options.
pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) policy: Policy,
    pub(crate) options: Options,
}

impl Ctx {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_unpacked: self.options.max_unpacked_size,
            max_entries: MAX_ENTRIES,
        }
    }

    /// The job's anchors, guarded by the places no job may persist or
    /// restore (see [`places`]).
    pub(crate) fn anchors(&self) -> Result<(PathBuf, Anchors)> {
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        let home = env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let anchors = Anchors::new(&cwd, home.as_deref())?;
        let forbidden = Forbidden::of_job(self.store.local_root(), anchors.workspace(), env);
        let xdg: Vec<PathBuf> = ["XDG_CONFIG_HOME", "XDG_DATA_HOME"]
            .iter()
            .filter_map(|v| env(v).filter(|p| p.starts_with('/')))
            .map(PathBuf::from)
            .collect();
        let anchors = anchors.guarded(forbidden, &xdg, self.options.allow_config_folders);
        Ok((cwd, anchors))
    }
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

pub(crate) fn show_paths(m: &Manifest) -> String {
    m.paths
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Manifests say what a pull request chose, and lines built from them go
/// to build logs (a default-branch `list` included): they are printed
/// with control characters escaped, as names are in the pipeline's logs.
pub(crate) use crate::pipeline::text::printable;

pub(crate) fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

pub(crate) fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
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
