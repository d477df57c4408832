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

mod extract;
mod guard;
mod links;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use tar::EntryType;

use super::anchor::SavedPath;
use super::credentials::credential_store;
use links::LinkTree;

pub use extract::{Staged, extract, recover};

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

/// Archive `sources` into `out` (tar + zstd).
pub fn create<W: Write>(sources: &[Source], out: W, limits: &Limits) -> Result<(Summary, W)> {
    let encoder = zstd::Encoder::new(out, ZSTD_LEVEL).context("cannot start zstd")?;
    let mut builder = tar::Builder::new(encoder);
    let mut summary = Summary::default();
    for (index, source) in sources.iter().enumerate() {
        let links = links_to_keep(source, &mut summary)?;
        let mut walk = walkdir::WalkDir::new(&source.real)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.with_context(|| format!("cannot read {}", source.saved))?;
            let rel = entry
                .path()
                .strip_prefix(&source.real)
                .expect("walkdir stays below its root");
            let shown = shown_path(&source.saved, rel);
            let is_dir = entry.file_type().is_dir();
            let member = Path::new(&index.to_string()).join(rel);
            let why = if let Some(tool) = credential_store(&shown) {
                Some(format!("credentials of {tool}"))
            } else if !restorable(&member) {
                Some("too long a name or too deep to restore".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                summary.skipped.push(format!("{shown} ({why})"));
                if is_dir {
                    walk.skip_current_dir();
                }
                continue;
            }
            let meta = entry
                .metadata()
                .with_context(|| format!("cannot read {shown}"))?;
            let mut header = tar::Header::new_gnu();
            // Only files keep their time (build tools compare those); folders
            // and links get 0, so persisting a restored tree is byte-identical.
            header.set_mtime(if entry.file_type().is_file() {
                mtime_secs(&meta)
            } else {
                0
            });
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(0);
            let ft = entry.file_type();
            let appended = if ft.is_dir() {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(0o755);
                builder.append_data(&mut header, &member, io::empty())
            } else if ft.is_file() {
                summary.unpacked += meta.len();
                if summary.unpacked > limits.max_unpacked {
                    bail!(
                        "the files to persist are bigger than the unpacked size cap ({}): raise \
                         --max-unpacked-size or persist less",
                        super::format_size(limits.max_unpacked)
                    );
                }
                append_file(&mut builder, &mut header, &member, entry.path(), &shown)
            } else if ft.is_symlink() {
                let Some(target) = links.get(rel) else {
                    continue;
                };
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                builder.append_link(&mut header, &member, OsStr::from_bytes(target))
            } else {
                summary
                    .skipped
                    .push(format!("{shown} (not a file, folder or link)"));
                continue;
            };
            appended.with_context(|| format!("cannot archive {shown}"))?;
            summary.entries += 1;
            if summary.entries > limits.max_entries {
                bail!(
                    "more than {} files to persist: persist less",
                    limits.max_entries
                );
            }
        }
    }
    let encoder = builder.into_inner().context("cannot finish the archive")?;
    let out = encoder.finish().context("cannot finish the archive")?;
    Ok((summary, out))
}

/// Would a restore accept this member name?
fn restorable(member: &Path) -> bool {
    let bytes = member.as_os_str().as_bytes();
    bytes.len() <= MAX_PATH
        && member.components().count() <= MAX_DEPTH + 1
        && member
            .components()
            .all(|c| c.as_os_str().len() <= MAX_COMPONENT)
}

fn shown_path(saved: &SavedPath, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        saved.to_string()
    } else {
        format!("{saved}/{}", rel.to_string_lossy())
    }
}

fn mtime_secs(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    member: &Path,
    path: &Path,
    shown: &str,
) -> io::Result<()> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let len = meta.len();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    });
    header.set_size(len);
    let mut reader = Exact {
        inner: (&file).take(len),
        remaining: len,
    };
    builder.append_data(header, member, &mut reader)?;
    if file.metadata()?.len() != len {
        return Err(io::Error::other(format!(
            "{shown} changed size while it was archived: persist it when nothing writes to it"
        )));
    }
    Ok(())
}

/// Reads exactly `remaining` bytes, failing if the file shrank meanwhile
/// (a short member would corrupt the archive).
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The symbolic links below `source` that may be archived: those whose
/// target, followed through the other kept links, stays inside `source`.
fn links_to_keep(source: &Source, summary: &mut Summary) -> Result<HashMap<PathBuf, Vec<u8>>> {
    let mut links = HashMap::new();
    for entry in walkdir::WalkDir::new(&source.real).follow_links(false) {
        let entry = entry.with_context(|| format!("cannot read {}", source.saved))?;
        if entry.file_type().is_symlink() {
            let target = fs::read_link(entry.path())
                .with_context(|| format!("cannot read the link {}", entry.path().display()))?;
            let rel = entry.path().strip_prefix(&source.real).expect("below root");
            links.insert(rel.to_path_buf(), target.as_os_str().as_bytes().to_vec());
        }
    }
    // Dropping a link changes how others resolve: repeat until stable.
    loop {
        let mut tree = LinkTree::new(LINK_BUDGET);
        let order: Vec<&PathBuf> = links.keys().collect();
        for p in &order {
            let parts: Vec<&[u8]> = p.components().map(|c| c.as_os_str().as_bytes()).collect();
            if tree.add(0, &parts, &links[*p]).is_err() {
                bail!(
                    "{} has more symbolic links than a restore accepts: persist less",
                    source.saved
                );
            }
        }
        let escaping: Vec<PathBuf> = tree
            .escaping()
            .into_iter()
            .map(|i| order[i].clone())
            .collect();
        if escaping.is_empty() {
            return Ok(links);
        }
        for p in escaping {
            summary.skipped.push(format!(
                "{} (a link pointing outside the persisted path)",
                shown_path(&source.saved, &p)
            ));
            links.remove(&p);
        }
    }
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
