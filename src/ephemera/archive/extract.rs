//! Restoring an archive: validate and extract into staging folders next to
//! the targets, then swap each one in. A refused archive changes nothing
//! outside the staging folders; a swap interrupted half-way (the process
//! killed between two renames, on a filesystem without atomic exchange) is
//! put right by [`recover`] on the next run.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rustix::fs::{FlockOperation, Mode, OFlags, RenameFlags};
use tar::EntryType;

use super::guard::Guard;
use super::links::{LinkError, LinkTree};
use super::{
    LINK_BUDGET, Limits, MAX_NAME_BYTES, MAX_PATH, ZSTD_WINDOW_LOG_MAX, parse_member, shorten,
};
use crate::ephemera::anchor::SavedPath;
use crate::ephemera::credentials::credential_store_in;
use crate::ephemera::format_size;

const STAGING_PREFIX: &str = ".drvkite-ephemera-";
/// In a staging folder: the name of the target it is for.
const TARGET_FILE: &str = "target";
/// At most this many members left out are named; the rest are counted.
const SKIPPED_SHOWN: usize = 20;

/// Marks an error as this agent's (its checkout has a file where a target's
/// folder goes, its disk is full or read-only), not the archive's: the
/// entry is not broken, and must not be quarantined for it.
#[derive(Debug)]
pub struct LocalFailure;

impl std::fmt::Display for LocalFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this agent cannot write the files")
    }
}

/// `e` with `what` as context, marked [`LocalFailure`] when its kind
/// blames the disk rather than the archive.
fn written(e: io::Error, what: String) -> anyhow::Error {
    use io::ErrorKind::*;
    let local = matches!(
        e.kind(),
        StorageFull | QuotaExceeded | ReadOnlyFilesystem | PermissionDenied
    );
    let e = anyhow::Error::new(e).context(what);
    if local { e.context(LocalFailure) } else { e }
}

/// One target's staging folder, locked for as long as this process uses it
/// so [`recover`] in another process leaves it alone.
struct Part {
    dir: tempfile::TempDir,
    _lock: File,
    target: PathBuf,
}

/// An archive extracted into staging folders, not yet put in place.
pub struct Staged {
    parts: Vec<Part>,
    /// Missing parent folders of targets that extraction created; removed
    /// again (when empty) if the archive is not swapped in.
    created: Vec<PathBuf>,
    pub unpacked: u64,
    pub entries: u64,
    /// Members left out (credential stores), with the reason.
    pub skipped: Vec<String>,
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

fn lock(dir: &Path) -> io::Result<File> {
    let f = File::open(dir)?;
    rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive)?;
    Ok(f)
}

fn staging_for(target: &Path) -> Result<Part> {
    let parent = target.parent().context("a target has no parent folder")?;
    let name = target.file_name().context("a target has no name")?;
    let dir = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a staging folder in {}", parent.display()))?;
    // Locked before it says what it is for: recover() only touches staging
    // folders that say so and that nobody holds.
    let lock = lock(dir.path()).with_context(|| format!("cannot lock {}", dir.path().display()))?;
    fs::write(dir.path().join(TARGET_FILE), name.as_bytes())
        .with_context(|| format!("cannot write into {}", dir.path().display()))?;
    Ok(Part {
        dir,
        _lock: lock,
        target: target.to_path_buf(),
    })
}

/// Put right what an interrupted restore left next to `targets`: a target
/// moved aside but not replaced gets its old contents back, and staging
/// folders nobody holds are removed. Returns what was put back.
pub fn recover(targets: &[PathBuf]) -> Vec<PathBuf> {
    let mut restored = Vec::new();
    let mut parents: Vec<&Path> = targets.iter().filter_map(|t| t.parent()).collect();
    parents.sort();
    parents.dedup();
    for parent in parents {
        let Ok(read) = fs::read_dir(parent) else {
            continue;
        };
        for entry in read.flatten() {
            if !entry
                .file_name()
                .as_bytes()
                .starts_with(STAGING_PREFIX.as_bytes())
            {
                continue;
            }
            let dir = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(_held) = lock(&dir) else {
                continue;
            };
            // Older versions wrote no name: leave their folders alone.
            let Ok(name) = fs::read(dir.join(TARGET_FILE)) else {
                continue;
            };
            let name = OsStr::from_bytes(&name);
            if Path::new(name).components().count() != 1 || name.as_bytes().contains(&b'/') {
                continue;
            }
            let target = parent.join(name);
            let old = dir.join("old");
            if fs::symlink_metadata(&target).is_err()
                && fs::symlink_metadata(&old).is_ok()
                && fs::rename(&old, &target).is_ok()
            {
                restored.push(target);
            }
            if fs::symlink_metadata(&old).is_err() {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    restored
}

/// Extract `reader` (tar + zstd) for `paths` (member N goes to
/// `paths[N].1`, recorded as `paths[N].0`) into staging folders next to the
/// targets. On error the staging folders are removed and the targets were
/// never touched.
pub fn extract<R: Read>(
    reader: R,
    paths: &[(SavedPath, PathBuf)],
    limits: &Limits,
) -> Result<Staged> {
    let mut staged = Staged {
        parts: Vec::new(),
        created: Vec::new(),
        unpacked: 0,
        entries: 0,
        skipped: Vec::new(),
    };
    for (_, target) in paths {
        let parent = target.parent().context("a target has no parent folder")?;
        staged
            .created
            .extend(create_dirs(parent).context(LocalFailure)?);
        staged
            .parts
            .push(staging_for(target).context(LocalFailure)?);
    }
    let mut decoder = zstd::Decoder::new(reader).context("cannot start zstd")?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .context("cannot configure zstd")?;
    let (guard, verdict) = Guard::new(decoder, MAX_PATH as u64 + 1, limits.max_unpacked);
    let mut archive = tar::Archive::new(guard);
    let corrupt = |e: io::Error| match verdict.borrow().as_ref() {
        Some(why) => anyhow::anyhow!("{why}"),
        None => anyhow::Error::new(e).context("the archive is corrupt"),
    };
    let saved_parts: Vec<(&SavedPath, Vec<&str>)> = paths
        .iter()
        .map(|(saved, _)| (saved, saved.path.split('/').collect()))
        .collect();
    let mut links = LinkTree::new(LINK_BUDGET);
    let mut dirs = LastDir::default();
    let (mut unpacked, mut entries, mut names, mut skipped) = (0u64, 0u64, 0u64, 0usize);
    let mut members = 0u64;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let link_target = entry.link_name_bytes().map(|l| l.into_owned());
        names += (raw.len() + link_target.as_ref().map_or(0, |l| l.len())) as u64;
        if names > MAX_NAME_BYTES {
            bail!(
                "the archive's names add up to more than {}",
                format_size(MAX_NAME_BYTES)
            );
        }
        let shown = shorten(&raw);
        let (index, comps) = parse_member(&raw, paths.len())?;
        // Every member counts, those left out below too: each costs a
        // header's work, and a tiny blob can hold millions.
        members += 1;
        if members > limits.max_entries {
            bail!("the archive has more than {} entries", limits.max_entries);
        }
        // Persist never writes these; an archive that has them was made by
        // hand. Leave them out rather than plant credentials.
        let (saved, saved_parts) = &saved_parts[index];
        let mut parts = saved_parts.clone();
        parts.extend(
            comps
                .iter()
                .map(|c| std::str::from_utf8(c).unwrap_or("\u{fffd}")),
        );
        if let Some(tool) = credential_store_in(&parts) {
            skipped += 1;
            if skipped <= SKIPPED_SHOWN {
                let rel = format!("{saved}/{}", shorten(&comps.join(&b'/')));
                staged
                    .skipped
                    .push(format!("{rel} (credentials of {tool})"));
            }
            continue;
        }
        entries += 1;
        let mut dest = staged.parts[index].dir.path().join("new");
        for c in &comps {
            dest.push(OsStr::from_bytes(c));
        }
        // No symbolic link exists in the staging folders until every file
        // and folder is written (links come last), so nothing below is
        // ever written through one.
        match entry.header().entry_type() {
            EntryType::Directory => match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!("entry {shown} appears twice"),
                Err(_) => fs::create_dir_all(&dest)
                    .and_then(|()| fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)))
                    .map_err(|e| written(e, format!("cannot create the folder {shown}")))?,
            },
            EntryType::Regular => {
                unpacked += entry.size();
                if unpacked > limits.max_unpacked {
                    bail!(
                        "the archive unpacks to more than {}",
                        format_size(limits.max_unpacked)
                    );
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                let mtime = entry.header().mtime().ok();
                match write_file(&mut dirs, &mut entry, &dest, mode, mtime) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        bail!("entry {shown} appears twice")
                    }
                    Err(e) => match verdict.borrow().as_ref() {
                        Some(why) => bail!("{why}"),
                        None => return Err(written(e, format!("cannot extract {shown}"))),
                    },
                }
            }
            EntryType::Symlink => {
                if comps.is_empty() {
                    bail!("entry {shown} makes a persisted path a symbolic link");
                }
                let target =
                    link_target.with_context(|| format!("symbolic link {shown} has no target"))?;
                match links.add(index, &comps, &target) {
                    Ok(()) => {}
                    Err(LinkError::BelowLink) => bail!("entry {shown} lies below a symbolic link"),
                    Err(LinkError::Clash) => {
                        bail!("entry {shown} appears twice, or lies below a symbolic link")
                    }
                    Err(LinkError::Budget) => bail!(
                        "the archive has more symbolic links than a restore accepts ({} of \
                         names and targets)",
                        format_size(LINK_BUDGET as u64)
                    ),
                }
            }
            EntryType::Link => bail!("entry {shown} is a hard link: refused"),
            EntryType::Char | EntryType::Block => bail!("entry {shown} is a device file: refused"),
            EntryType::Fifo => bail!("entry {shown} is a FIFO: refused"),
            other => bail!("entry {shown} has the unsupported type {other:?}: refused"),
        }
    }
    for i in 0..links.count() {
        let (index, path) = links.path(i);
        let shown = shorten(&path);
        let dest = staged.parts[index]
            .dir
            .path()
            .join("new")
            .join(OsStr::from_bytes(&path));
        make_parent(&dest)?;
        match std::os::unix::fs::symlink(OsStr::from_bytes(links.target(i)), &dest) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => bail!(
                "a file or folder lies below a symbolic link {shown}, or has its name: refused"
            ),
            other => other.map_err(|e| written(e, format!("cannot create the link {shown}")))?,
        }
    }
    // Only now: a link clashing with a file or folder says so above.
    if let Some(i) = links.escaping().first() {
        let (_, path) = links.path(*i);
        bail!(
            "symbolic link {} -> {} points outside its path: refused",
            shorten(&path),
            shorten(links.target(*i))
        );
    }
    if skipped > SKIPPED_SHOWN {
        staged
            .skipped
            .push(format!("{} more credential files", skipped - SKIPPED_SHOWN));
    }
    staged.unpacked = unpacked;
    staged.entries = entries;
    Ok(staged)
}

fn make_parent(dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("below the staging folder");
    fs::create_dir_all(parent)
        .map_err(|e| written(e, format!("cannot create {}", parent.display())))
}

/// The folder the last file was written to, kept open: archives list a
/// folder's files together, so most files are created relative to it
/// instead of walking their whole path again (deep trees stay cheap).
#[derive(Default)]
struct LastDir {
    path: PathBuf,
    fd: Option<rustix::fd::OwnedFd>,
}

impl LastDir {
    fn open(&mut self, dir: &Path) -> io::Result<&rustix::fd::OwnedFd> {
        if self.fd.is_none() || self.path != dir {
            fs::create_dir_all(dir)?;
            let fd = rustix::fs::open(
                dir,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            self.path = dir.to_path_buf();
            self.fd = Some(fd);
        }
        Ok(self.fd.as_ref().expect("opened above"))
    }
}

fn write_file(
    dirs: &mut LastDir,
    entry: &mut impl Read,
    dest: &Path,
    mode: u32,
    mtime: Option<u64>,
) -> io::Result<()> {
    let parent = dest.parent().expect("below the staging folder");
    let name = dest.file_name().expect("a file name");
    let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    // EXCL: never write through anything already there.
    let fd = rustix::fs::openat(
        dirs.open(parent)?,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let mut file = File::from(fd);
    io::copy(entry, &mut file)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some(secs) = mtime {
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))?;
    }
    Ok(())
}

/// Is this error the filesystem saying it cannot exchange two names?
fn no_exchange(e: &rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::NOSYS, Errno::NOTSUP, Errno::OPNOTSUPP].contains(e)
}

impl Staged {
    /// Put each extracted path in place of its target. Where the filesystem
    /// can, the two are exchanged in one step (no moment without the
    /// target); elsewhere the old one is moved into the staging folder and
    /// the new one renamed in, which [`recover`] completes if interrupted.
    /// Returns the targets replaced.
    pub fn swap(mut self) -> Result<Vec<PathBuf>> {
        self.created.clear();
        let mut done = Vec::new();
        for part in std::mem::take(&mut self.parts) {
            let (staging, target) = (part.dir.path(), &part.target);
            let new = staging.join("new");
            if fs::symlink_metadata(&new).is_err() {
                continue;
            }
            let cwd = rustix::fs::CWD;
            match rustix::fs::renameat_with(cwd, &new, cwd, target, RenameFlags::EXCHANGE) {
                Ok(()) => {
                    done.push(target.clone());
                    continue;
                }
                Err(e) if e == rustix::io::Errno::NOENT || no_exchange(&e) => {}
                Err(e) => {
                    return Err(io::Error::from(e))
                        .with_context(|| format!("cannot put {} in place", target.display()));
                }
            }
            let old = staging.join("old");
            let had_old = match fs::rename(target, &old) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot move {} aside to replace it", target.display())
                    });
                }
            };
            if let Err(e) = fs::rename(&new, target) {
                if had_old {
                    let _ = fs::rename(&old, target);
                }
                return Err(e).with_context(|| format!("cannot put {} in place", target.display()));
            }
            done.push(target.clone());
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ephemera::anchor::Anchor;

    #[test]
    fn members_left_out_count_towards_the_entry_cap() {
        let mut b = tar::Builder::new(Vec::new());
        for _ in 0..11 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            b.append_data(&mut h, "0/.netrc", io::empty()).unwrap();
        }
        let blob = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedPath {
            anchor: Anchor::Workspace,
            path: "t".into(),
        };
        let limits = Limits {
            max_unpacked: 1 << 20,
            max_entries: 10,
        };
        let err = extract(&blob[..], &[(saved, dir.path().join("t"))], &limits)
            .err()
            .expect("more members than the cap");
        assert!(err.to_string().contains("more than 10 entries"), "{err:#}");
    }

    #[test]
    fn an_interrupted_swap_is_completed_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        // What a kill between the two renames leaves: the target moved
        // aside into an unlocked staging folder, nothing in its place.
        let staging = dir.path().join(format!("{STAGING_PREFIX}abc"));
        fs::create_dir_all(staging.join("old/sub")).unwrap();
        fs::write(staging.join("old/sub/f"), "old").unwrap();
        fs::write(staging.join(TARGET_FILE), "target").unwrap();
        // A staging folder someone holds is left alone.
        let busy = staging_for(&dir.path().join("other")).unwrap();
        let back = recover(std::slice::from_ref(&target));
        assert_eq!(back, std::slice::from_ref(&target));
        assert_eq!(fs::read_to_string(target.join("sub/f")).unwrap(), "old");
        assert!(!staging.exists());
        assert!(busy.dir.path().exists());
        // Nothing to do the second time.
        assert!(recover(std::slice::from_ref(&target)).is_empty());
    }
}
