//! The archive format: tar compressed with zstd. Member `N` (and `N/…`) is
//! the N-th persisted path. Only regular files, folders and symbolic links
//! that stay inside their path are written and accepted; ownership, special
//! mode bits and extended attributes are dropped.
//!
//! Restoring ([`extract`]) extracts into fresh staging folders next to each
//! target and validates every entry with the same parser that reads it; the
//! targets are only touched by [`Staged::swap`], after the whole archive was
//! accepted. Whatever an archive declares, a restore's memory stays bounded:
//! [`guard`] checks headers before the tar reader buffers what they announce,
//! nothing is kept per member but symbolic links ([`links`], on a budget),
//! and names, depth and sizes are capped.

mod create;
mod extract;
mod guard;
mod links;

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::anchor::SavedPath;

pub use create::create;
pub use extract::{LocalFailure, Staged, extract, recover};

/// Caps checked while archiving and while extracting.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sum of the sizes of the files.
    pub max_unpacked: u64,
    /// Number of files, folders and links.
    pub max_entries: u64,
}

const MAX_PATH: usize = 4096;
const MAX_COMPONENT: usize = 255;
/// Folders below a persisted path; deeper trees are not persisted.
const MAX_DEPTH: usize = 256;
/// Total bytes of member names and link targets one archive may have.
const MAX_NAME_BYTES: u64 = 256 << 20;
/// Memory for the symbolic links of one archive (names, targets, maps).
const LINK_BUDGET: usize = 16 << 20;
const ZSTD_LEVEL: i32 = 3;
/// Decoder window cap: 2^23 = 8 MiB. Level 3 writes 2 MiB windows; a blob
/// declaring a bigger one is refused rather than given the memory.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A path to persist: where the manifest says it goes, and where it is now.
pub struct Source {
    pub saved: SavedPath,
    pub real: PathBuf,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub unpacked: u64,
    pub entries: u64,
    /// Paths left out, with the reason (shown to the user).
    pub skipped: Vec<String>,
}

/// At most 200 characters of a name from an archive, for messages.
fn shorten(raw: &[u8]) -> String {
    super::manifest::shorten(&String::from_utf8_lossy(raw))
}

/// Parse a member name into its path index and plain components.
fn parse_member(raw: &[u8], paths: usize) -> Result<(usize, Vec<&[u8]>)> {
    let shown = shorten(raw);
    if raw.is_empty() {
        bail!("an entry has an empty name");
    }
    if raw.starts_with(b"/") {
        bail!("entry {shown} has an absolute path");
    }
    if raw.len() > MAX_PATH {
        bail!("entry {shown} has a path longer than {MAX_PATH} bytes");
    }
    let raw = raw.strip_suffix(b"/").unwrap_or(raw);
    let mut parts = raw.split(|b| *b == b'/');
    let first = parts.next().unwrap_or_default();
    let index = std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|i| i.to_string().as_bytes() == first && *i < paths);
    let Some(index) = index else {
        bail!("entry {shown} does not belong to any persisted path");
    };
    let mut comps = Vec::new();
    for part in parts {
        match part {
            b".." => bail!("entry {shown} contains `..`"),
            b"" | b"." => bail!("entry {shown} is not a plain path"),
            _ if part.len() > MAX_COMPONENT => bail!("entry {shown} has a too long component"),
            _ => comps.push(part),
        }
        if comps.len() > MAX_DEPTH {
            bail!("entry {shown} is deeper than {MAX_DEPTH} folders");
        }
    }
    Ok((index, comps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_plain() {
        assert_eq!(parse_member(b"0", 1).unwrap(), (0, vec![]));
        assert_eq!(
            parse_member(b"1/a/b/", 2).unwrap(),
            (1, vec![&b"a"[..], &b"b"[..]])
        );
        let deep = format!("0{}", "/a".repeat(MAX_DEPTH + 1));
        let long = format!("0/{}", "a".repeat(300));
        for bad in [
            &b"/0/a"[..],
            b"0/../a",
            b"0/./a",
            b"0//a",
            b"2/a",
            b"00/a",
            b"x",
            b"",
            deep.as_bytes(),
            long.as_bytes(),
        ] {
            assert!(
                parse_member(bad, 2).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = format!("0/{}", "a/".repeat(5000));
        let err = parse_member(huge.as_bytes(), 1).unwrap_err().to_string();
        assert!(err.len() < 400, "{err}");
    }
}
