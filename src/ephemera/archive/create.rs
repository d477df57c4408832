//! Persisting: walk each source (never following links), pick what its
//! rules select, leave out what may not travel, and write tar + zstd.
//! Everything written is something a restore accepts.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tar::EntryType;

use super::links::LinkTree;
use super::{LINK_BUDGET, Limits, MAX_COMPONENT, MAX_DEPTH, MAX_PATH, Source, Summary, ZSTD_LEVEL};
use crate::ephemera::anchor::SavedPath;
use crate::ephemera::credentials::credential_store;
use crate::ephemera::rules::{Pick, Selection};

/// Archive `sources` into `out` (tar + zstd): everything in them, or, with
/// `select`, what its rules pick (counted in it for `=` rules).
pub fn create<W: Write>(
    sources: &[Source],
    mut select: Option<&mut Selection>,
    out: W,
    limits: &Limits,
) -> Result<(Summary, W)> {
    let encoder = zstd::Encoder::new(out, ZSTD_LEVEL).context("cannot start zstd")?;
    let mut builder = tar::Builder::new(encoder);
    let mut summary = Summary::default();
    for (index, source) in sources.iter().enumerate() {
        let anchor = source.saved.anchor;
        let links = links_to_keep(source, select.as_deref(), &mut summary)?;
        let mut walk = walkdir::WalkDir::new(&source.real)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walk.next() {
            let entry = match entry {
                Ok(e) => e,
                // `%` rules tolerate files vanishing while they are walked.
                Err(e) if vanished(&e) && tolerated(select.as_deref(), source, e.path()) => {
                    let at = e.path().map_or(String::new(), |p| shown_at(source, p));
                    summary
                        .skipped
                        .push(format!("{at} (vanished while archived)"));
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", source.saved));
                }
            };
            let rel = entry
                .path()
                .strip_prefix(&source.real)
                .expect("walkdir stays below its root");
            let shown = shown_path(&source.saved, rel);
            let is_dir = entry.file_type().is_dir();
            let is_root = rel.as_os_str().is_empty();
            let pick = match select.as_deref_mut() {
                None => Pick::In { tolerant: false },
                Some(s) => s.pick(anchor, &anchored(&source.saved, rel)),
            };
            match pick {
                Pick::Excluded => {
                    if is_dir {
                        walk.skip_current_dir();
                    }
                    continue;
                }
                // Folders no rule picks are still walked, and the fixed
                // folder itself is always written: a restore replaces it.
                Pick::Out if !(is_root && is_dir) => continue,
                _ => {}
            }
            let tolerant = pick == Pick::In { tolerant: true };
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
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if tolerant && vanished(&e) => {
                    summary
                        .skipped
                        .push(format!("{shown} (vanished while archived)"));
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot read {shown}")),
            };
            let mut header = tar::Header::new_gnu();
            // Only files keep their time (build tools compare those); folders
            // and links get 0, so persisting a restored tree is byte-identical.
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(0);
            let ft = entry.file_type();
            if ft.is_dir() {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(0o755);
                builder
                    .append_data(&mut header, &member, io::empty())
                    .with_context(|| format!("cannot archive {shown}"))?;
            } else if ft.is_file() {
                summary.unpacked += meta.len();
                if summary.unpacked > limits.max_unpacked {
                    bail!(
                        "the files to persist are bigger than the unpacked size cap ({}): raise \
                         --max-unpacked-size or persist less",
                        crate::ephemera::format_size(limits.max_unpacked)
                    );
                }
                let file = if tolerant {
                    match Spooled::copy(entry.path())? {
                        Ok(s) => Opened::Spooled(s),
                        Err(why) => {
                            summary.unpacked -= meta.len();
                            summary
                                .skipped
                                .push(format!("{shown} ({why} while archived)"));
                            continue;
                        }
                    }
                } else {
                    Opened::Live(File::open(entry.path()).with_context(|| {
                        format!("cannot read {shown}: it vanished or cannot be opened")
                    })?)
                };
                append_file(&mut builder, &mut header, &member, file, &shown)?;
            } else if ft.is_symlink() {
                let Some(target) = links.get(rel) else {
                    continue;
                };
                header.set_entry_type(EntryType::Symlink);
                header.set_mode(0o777);
                builder
                    .append_link(&mut header, &member, OsStr::from_bytes(target))
                    .with_context(|| format!("cannot archive {shown}"))?;
            } else {
                summary
                    .skipped
                    .push(format!("{shown} (not a file, folder or link)"));
                continue;
            }
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

fn vanished(e: &(impl std::error::Error + 'static)) -> bool {
    let io = (e as &dyn std::error::Error)
        .downcast_ref::<io::Error>()
        .or_else(|| {
            (e as &dyn std::error::Error)
                .downcast_ref::<walkdir::Error>()
                .and_then(walkdir::Error::io_error)
        });
    io.is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Is `path` (below `source`) picked by a `%` rule?
fn tolerated(select: Option<&Selection>, source: &Source, path: Option<&Path>) -> bool {
    let (Some(select), Some(path)) = (select, path) else {
        return false;
    };
    let rel = path.strip_prefix(&source.real).unwrap_or(path);
    select.tolerates(source.saved.anchor, &anchored(&source.saved, rel))
}

/// `rel` below `saved`, relative to its anchor, as rules match it.
fn anchored(saved: &SavedPath, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        saved.path.clone()
    } else {
        format!("{}/{}", saved.path, rel.to_string_lossy())
    }
}

fn shown_at(source: &Source, path: &Path) -> String {
    shown_path(
        &source.saved,
        path.strip_prefix(&source.real).unwrap_or(path),
    )
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

pub(super) fn shown_path(saved: &SavedPath, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        saved.to_string()
    } else {
        format!("{saved}/{}", rel.to_string_lossy())
    }
}

fn mtime_secs(modified: SystemTime) -> u64 {
    modified
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A file to archive: read in place, or a copy taken first (for `%` rules).
enum Opened {
    Live(File),
    Spooled(Spooled),
}

/// A copy of a file that did not change while it was copied.
struct Spooled {
    copy: File,
    len: u64,
    modified: SystemTime,
    executable: bool,
}

impl Spooled {
    /// `Ok(Err(why))` when the file vanished or changed meanwhile.
    fn copy(path: &Path) -> Result<Result<Spooled, &'static str>> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err("vanished")),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let before = file.metadata()?;
        let mut copy = tempfile::tempfile().context("cannot create a temporary file")?;
        // At most what it had: a file that keeps growing is not read forever.
        let len = io::copy(&mut (&mut file).take(before.len()), &mut copy)?;
        let after = file.metadata()?;
        if len != before.len() || after.len() != len || after.modified()? != before.modified()? {
            return Ok(Err("changed"));
        }
        Ok(Ok(Spooled {
            copy,
            len,
            modified: before.modified()?,
            executable: before.permissions().mode() & 0o111 != 0,
        }))
    }
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    member: &Path,
    file: Opened,
    shown: &str,
) -> Result<()> {
    // A live file is checked again after it was read; a copy was checked
    // while it was made.
    let (file, len, modified, executable, live) = match file {
        Opened::Live(f) => {
            let meta = f.metadata()?;
            let exec = meta.permissions().mode() & 0o111 != 0;
            (f, meta.len(), meta.modified()?, exec, true)
        }
        Opened::Spooled(mut s) => {
            io::Seek::rewind(&mut s.copy)?;
            (s.copy, s.len, s.modified, s.executable, false)
        }
    };
    header.set_entry_type(EntryType::Regular);
    header.set_mode(if executable { 0o755 } else { 0o644 });
    header.set_mtime(mtime_secs(modified));
    header.set_size(len);
    let changed = || {
        anyhow::anyhow!(
            "{shown} changed while it was archived: persist it when nothing writes to it, or \
             select it with a `%` rule"
        )
    };
    let mut reader = Exact {
        inner: (&file).take(len),
        remaining: len,
    };
    match builder.append_data(header, member, &mut reader) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(changed()),
        other => other.with_context(|| format!("cannot archive {shown}"))?,
    }
    let after = file.metadata()?;
    if live && (after.len() != len || after.modified()? != modified) {
        return Err(changed());
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

/// The symbolic links below `source` that may be archived: those the rules
/// pick whose target, followed through the other kept links, stays inside
/// `source`. (A restore sees only the archived links, so only those count.)
fn links_to_keep(
    source: &Source,
    select: Option<&Selection>,
    summary: &mut Summary,
) -> Result<HashMap<PathBuf, Vec<u8>>> {
    let mut links = HashMap::new();
    for entry in walkdir::WalkDir::new(&source.real).follow_links(false) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if vanished(&e) && tolerated(select, source, e.path()) => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", source.saved)),
        };
        if entry.file_type().is_symlink() {
            let rel = entry.path().strip_prefix(&source.real).expect("below root");
            if select.is_some_and(|s| !s.keeps(source.saved.anchor, &anchored(&source.saved, rel)))
            {
                continue;
            }
            let target = fs::read_link(entry.path())
                .with_context(|| format!("cannot read the link {}", entry.path().display()))?;
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
