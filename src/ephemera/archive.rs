//! The archive format: tar compressed with zstd. Member `N` (and `N/…`) is
//! the N-th persisted path. Only regular files, folders and symbolic links
//! that stay inside their path are written and accepted; ownership, special
//! mode bits and extended attributes are dropped.
//!
//! Restoring extracts into fresh staging folders next to each target and
//! validates every entry with the same parser that reads it; the targets are
//! only touched by [`Staged::swap`], after the whole archive was accepted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tar::EntryType;

use super::anchor::{SavedPath, is_credential};

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
/// How many symbolic links one lookup may go through (as Linux allows).
const MAX_LINK_HOPS: usize = 40;
const ZSTD_LEVEL: i32 = 3;
/// Decoder memory cap (2^27 = 128 MiB window), as zstd's default.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

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
            if is_credential(&shown) {
                summary.skipped.push(format!("{shown} (credentials)"));
                if is_dir {
                    walk.skip_current_dir();
                }
                continue;
            }
            let member = Path::new(&index.to_string()).join(rel);
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
        let by_parts: HashMap<Vec<Vec<u8>>, Vec<u8>> = links
            .iter()
            .map(|(p, t)| (path_parts(p), t.clone()))
            .collect();
        let escaping: Vec<PathBuf> = links
            .keys()
            .filter(|p| {
                let parts = path_parts(p);
                !resolves_inside(&by_parts, &parts[..parts.len() - 1], &by_parts[&parts])
            })
            .cloned()
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

fn path_parts(p: &Path) -> Vec<Vec<u8>> {
    p.components()
        .map(|c| c.as_os_str().as_bytes().to_vec())
        .collect()
}

/// Does a link in folder `dir` (parts below the root) with `target` lead
/// to a place inside the root, following the other `links` of the tree?
/// The tree is all there is below the root (a fresh folder), so following
/// the recorded links is following what the kernel would.
fn resolves_inside(links: &HashMap<Vec<Vec<u8>>, Vec<u8>>, dir: &[Vec<u8>], target: &[u8]) -> bool {
    let mut pos: Vec<Vec<u8>> = dir.to_vec();
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut hops = 0;
    let push_target = |queue: &mut VecDeque<Vec<u8>>, target: &[u8]| {
        if target.is_empty() || target.starts_with(b"/") {
            return false;
        }
        for part in target.split(|b| *b == b'/').rev() {
            queue.push_front(part.to_vec());
        }
        true
    };
    if !push_target(&mut queue, target) {
        return false;
    }
    while let Some(part) = queue.pop_front() {
        match part.as_slice() {
            b"" | b"." => {}
            b".." => {
                if pos.pop().is_none() {
                    return false;
                }
            }
            _ => {
                pos.push(part);
                if let Some(next) = links.get(&pos) {
                    hops += 1;
                    pos.pop();
                    if hops > MAX_LINK_HOPS || !push_target(&mut queue, next) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Parse a member name into its path index and plain components.
fn parse_member(raw: &[u8], paths: usize) -> Result<(usize, Vec<Vec<u8>>)> {
    let shown = String::from_utf8_lossy(raw);
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
            _ => comps.push(part.to_vec()),
        }
    }
    Ok((index, comps))
}

/// Pax records this format may carry; anything else (sparse files, extended
/// attributes, unknown keys) could be read differently by other tools and is
/// refused.
const PAX_ALLOWED: &[&[u8]] = &[
    b"path",
    b"linkpath",
    b"size",
    b"mtime",
    b"atime",
    b"ctime",
    b"uid",
    b"gid",
    b"uname",
    b"gname",
];

/// An archive extracted into staging folders, not yet put in place.
pub struct Staged {
    parts: Vec<(tempfile::TempDir, PathBuf)>,
    /// Missing parent folders of targets that extraction created; removed
    /// again (when empty) if the archive is not swapped in.
    created: Vec<PathBuf>,
    pub unpacked: u64,
    pub entries: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.parts.clear();
        for dir in self.created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Create `dir` and its missing ancestors, returning those created,
/// outermost first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = dir;
    while fs::symlink_metadata(d).is_err() {
        missing.push(d.to_path_buf());
        d = match d.parent() {
            Some(p) => p,
            None => break,
        };
    }
    missing.reverse();
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(missing)
}

/// Extract `reader` (tar + zstd) for `targets` (member N goes to
/// `targets[N]`) into staging folders next to the targets. On error the
/// staging folders are removed and the targets were never touched.
pub fn extract<R: Read>(reader: R, targets: &[PathBuf], limits: &Limits) -> Result<Staged> {
    let mut staged = Staged {
        parts: Vec::new(),
        created: Vec::new(),
        unpacked: 0,
        entries: 0,
    };
    for target in targets {
        let parent = target.parent().context("a target has no parent folder")?;
        staged.created.extend(create_dirs(parent)?);
        let staging = tempfile::Builder::new()
            .prefix(".drvkite-ephemera-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a staging folder in {}", parent.display()))?;
        staged.parts.push((staging, target.clone()));
    }
    let mut decoder = zstd::Decoder::new(reader).context("cannot start zstd")?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .context("cannot configure zstd")?;
    let mut archive = tar::Archive::new(decoder);
    let mut seen: HashSet<(usize, Vec<Vec<u8>>)> = HashSet::new();
    let mut links: Vec<HashMap<Vec<Vec<u8>>, Vec<u8>>> = vec![HashMap::new(); targets.len()];
    let (mut unpacked, mut entries) = (0u64, 0u64);
    for entry in archive.entries().context("the archive is corrupt")? {
        let mut entry = entry.context("the archive is corrupt")?;
        if let Some(pax) = entry.pax_extensions().context("the archive is corrupt")? {
            for record in pax {
                let key = record.context("the archive is corrupt")?.key_bytes();
                if !PAX_ALLOWED.contains(&key) {
                    bail!(
                        "the archive uses the pax record {:?}, which is not accepted",
                        String::from_utf8_lossy(key)
                    );
                }
            }
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let (index, comps) = parse_member(&raw, targets.len())?;
        if !seen.insert((index, comps.clone())) {
            bail!("entry {shown} appears twice");
        }
        if (1..comps.len()).any(|k| links[index].contains_key(&comps[..k])) {
            bail!("entry {shown} lies below a symbolic link");
        }
        entries += 1;
        if entries > limits.max_entries {
            bail!("the archive has more than {} entries", limits.max_entries);
        }
        let mut dest = staged.parts[index].0.path().join("new");
        for c in &comps {
            dest.push(OsStr::from_bytes(c));
        }
        match entry.header().entry_type() {
            EntryType::Directory => {
                fs::create_dir_all(&dest)
                    .and_then(|()| fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)))
                    .with_context(|| format!("cannot create the folder {shown}"))?;
            }
            EntryType::Regular => {
                unpacked += entry.size();
                if unpacked > limits.max_unpacked {
                    bail!(
                        "the archive unpacks to more than {}",
                        super::format_size(limits.max_unpacked)
                    );
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                let mtime = entry.header().mtime().ok();
                write_file(&mut entry, &dest, mode, mtime)
                    .with_context(|| format!("cannot extract {shown}"))?;
            }
            EntryType::Symlink => {
                if comps.is_empty() {
                    bail!("entry {shown} makes a persisted path a symbolic link");
                }
                let target = entry
                    .link_name_bytes()
                    .with_context(|| format!("symbolic link {shown} has no target"))?
                    .into_owned();
                make_parent(&dest)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                    .with_context(|| format!("cannot create the link {shown}"))?;
                links[index].insert(comps, target);
            }
            EntryType::Link => bail!("entry {shown} is a hard link: refused"),
            EntryType::Char | EntryType::Block => bail!("entry {shown} is a device file: refused"),
            EntryType::Fifo => bail!("entry {shown} is a FIFO: refused"),
            other => bail!("entry {shown} has the unsupported type {other:?}: refused"),
        }
    }
    for map in &links {
        for (path, target) in map {
            if !resolves_inside(map, &path[..path.len() - 1], target) {
                bail!(
                    "symbolic link {} -> {} points outside its path: refused",
                    String::from_utf8_lossy(&path.join(&b'/')),
                    String::from_utf8_lossy(target)
                );
            }
        }
    }
    staged.unpacked = unpacked;
    staged.entries = entries;
    Ok(staged)
}

fn make_parent(dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("below the staging folder");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))
}

fn write_file(entry: &mut impl Read, dest: &Path, mode: u32, mtime: Option<u64>) -> Result<()> {
    make_parent(dest)?;
    let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    // create_new: never write through anything already there.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dest)?;
    io::copy(entry, &mut file)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some(secs) = mtime {
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))?;
    }
    Ok(())
}

impl Staged {
    /// Put each extracted path in place of its target: the old one is moved
    /// into the staging folder, the new one renamed in, the old one removed.
    /// Returns the targets replaced.
    pub fn swap(mut self) -> Result<Vec<PathBuf>> {
        self.created.clear();
        let mut done = Vec::new();
        for (staging, target) in std::mem::take(&mut self.parts) {
            let new = staging.path().join("new");
            if fs::symlink_metadata(&new).is_err() {
                continue;
            }
            let old = staging.path().join("old");
            let had_old = match fs::rename(&target, &old) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot move {} aside to replace it", target.display())
                    });
                }
            };
            if let Err(e) = fs::rename(&new, &target) {
                if had_old {
                    let _ = fs::rename(&old, &target);
                }
                return Err(e).with_context(|| format!("cannot put {} in place", target.display()));
            }
            done.push(target);
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(pairs: &[(&str, &str)]) -> HashMap<Vec<Vec<u8>>, Vec<u8>> {
        pairs
            .iter()
            .map(|(p, t)| {
                (
                    p.split('/').map(|c| c.as_bytes().to_vec()).collect(),
                    t.as_bytes().to_vec(),
                )
            })
            .collect()
    }

    fn inside(map: &HashMap<Vec<Vec<u8>>, Vec<u8>>, path: &str) -> bool {
        let parts: Vec<Vec<u8>> = path.split('/').map(|c| c.as_bytes().to_vec()).collect();
        resolves_inside(map, &parts[..parts.len() - 1], &map[&parts])
    }

    #[test]
    fn links_are_followed_through_other_links() {
        let m = links(&[("a", "b/c"), ("d/e", "../a")]);
        assert!(inside(&m, "a"));
        assert!(inside(&m, "d/e"));
        let m = links(&[("up", ".."), ("abs", "/etc"), ("empty", "")]);
        assert!(!inside(&m, "up"));
        assert!(!inside(&m, "abs"));
        assert!(!inside(&m, "empty"));
        // Each link alone stays inside; together they escape.
        let m = links(&[("x/y/s", "../.."), ("x/y/l", "s/../z")]);
        assert!(inside(&m, "x/y/s"));
        assert!(!inside(&m, "x/y/l"));
        let m = links(&[("a", "b"), ("b", "a")]);
        assert!(!inside(&m, "a"));
    }

    #[test]
    fn member_names_are_plain() {
        assert_eq!(parse_member(b"0", 1).unwrap(), (0, vec![]));
        assert_eq!(
            parse_member(b"1/a/b/", 2).unwrap(),
            (1, vec![b"a".to_vec(), b"b".to_vec()])
        );
        for bad in [
            &b"/0/a"[..],
            b"0/../a",
            b"0/./a",
            b"0//a",
            b"2/a",
            b"00/a",
            b"x",
            b"",
        ] {
            assert!(
                parse_member(bad, 2).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
