//! Writing files and folders so that readers see the old version or the new
//! one, never a half-written file: write to a temporary sibling, then rename.
//!
//! A folder is staged next to its final place and swapped in at once. A run
//! stopped by SIGTERM or SIGINT removes its staging folder before it dies;
//! one killed outright (SIGKILL, power loss) leaves it behind, and the next
//! run in that folder removes it (staging folders carry their owner's pid).

use std::io::Write;
use std::sync::{Mutex, MutexGuard, Once};

use anyhow::{Context, Result, bail};
use camino::{Utf8Path, Utf8PathBuf};

const STAGING_PREFIX: &str = ".drvkite-staging-";
const OLD_PREFIX: &str = ".drvkite-old-";

/// The folder a path lives in, `.` for a bare file name.
fn parent_of(path: &Utf8Path) -> &Utf8Path {
    match path.parent() {
        Some(p) if !p.as_str().is_empty() => p,
        _ => Utf8Path::new("."),
    }
}

/// Replace `path` with `bytes` atomically.
pub fn write_file(path: &Utf8Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".drvkite-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write {path}: is {dir} an existing, writable folder?"))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {path}"))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {path}"))?;
    Ok(())
}

/// Folders this process must remove if a signal stops it. Swapping a
/// folder in holds the lock, so a signal never lands between the two
/// renames of a swap.
static PENDING: Mutex<Vec<Utf8PathBuf>> = Mutex::new(Vec::new());
static HANDLER: Once = Once::new();

fn pending() -> MutexGuard<'static, Vec<Utf8PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(path: &Utf8Path) {
    pending().retain(|p| p != path);
}

/// On SIGTERM or SIGINT: remove the pending folders, then die of the signal
/// as if there were no handler.
fn install_handler() {
    HANDLER.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) else {
            // Without the handler a signal can leave a staging folder; the
            // next run removes it.
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let held = pending();
                for p in held.iter() {
                    let _ = std::fs::remove_dir_all(p);
                }
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        });
    });
}

/// The pid in a staging or old folder's name (`<prefix><pid>-<random>`).
fn owner_pid(name: &str) -> Option<(&'static str, i32)> {
    [STAGING_PREFIX, OLD_PREFIX].into_iter().find_map(|prefix| {
        let rest = name.strip_prefix(prefix)?;
        let pid = rest.split_once('-')?.0.parse().ok()?;
        Some((prefix, pid))
    })
}

fn alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// Remove what killed runs left in `dir`. A previous folder that a killed
/// run had moved aside (only where the folders cannot be exchanged at once)
/// goes back to its place if nothing replaced it.
fn clean_stale(dir: &Utf8Path) {
    let Ok(entries) = dir.read_dir_utf8() else {
        return;
    };
    for entry in entries.flatten() {
        let Some((prefix, pid)) = owner_pid(entry.file_name()) else {
            continue;
        };
        if pid == std::process::id() as i32 || alive(pid) {
            continue;
        }
        let path = entry.path();
        if prefix == OLD_PREFIX
            && let Ok(inner) = path.read_dir_utf8()
        {
            for kept in inner.flatten() {
                let back = dir.join(kept.file_name());
                if !back.exists() {
                    let _ = std::fs::rename(kept.path(), &back);
                }
            }
        }
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Fail now if `target` could not be staged in its parent folder (when
/// that exists). The probe is named like a staging folder, so one left by
/// a killed run is cleaned up like one.
pub fn check_writable(target: &Utf8Path) -> Result<()> {
    let dir = parent_of(target);
    if dir.is_dir() {
        install_handler();
        // Created and removed with the lock held: a signal never finds it.
        let _held = pending();
        tempfile::Builder::new()
            .prefix(&format!("{STAGING_PREFIX}{}-", std::process::id()))
            .tempdir_in(dir)
            .with_context(|| {
                format!("cannot write into {dir}: is it writable? (needed for {target})")
            })?;
    }
    Ok(())
}

/// A folder being filled in a temporary sibling of its final place. Dropped
/// without `commit`, it leaves nothing behind.
pub struct StagedDir {
    staging: Utf8PathBuf,
    target: Utf8PathBuf,
    done: bool,
}

impl StagedDir {
    pub fn new(target: &Utf8Path) -> Result<Self> {
        if target.exists() && !target.is_dir() {
            bail!(
                "cannot write the folder {target}: a file of that name is in the way; remove it or choose another output folder"
            );
        }
        let dir = parent_of(target);
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the output folder {dir}: is the path right and its parent writable?"
            )
        })?;
        install_handler();
        clean_stale(dir);
        let mut held = pending();
        let staging = tempfile::Builder::new()
            .prefix(&format!("{STAGING_PREFIX}{}-", std::process::id()))
            .tempdir_in(dir)
            .with_context(|| {
                format!("cannot write into {dir}: is it writable? (needed for {target})")
            })?
            .keep();
        let staging = Utf8PathBuf::from_path_buf(staging)
            .map_err(|p| anyhow::anyhow!("staging path {} is not UTF-8", p.display()))?;
        held.push(staging.clone());
        Ok(StagedDir {
            staging,
            target: target.to_owned(),
            done: false,
        })
    }

    /// Where to write the folder's files before `commit`.
    pub fn path(&self) -> &Utf8Path {
        &self.staging
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        // Held while writing, so a signal's cleanup does not race a file
        // being created in the folder it removes.
        let _held = pending();
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).with_context(|| format!("cannot write {path}"))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {path}"))?;
        Ok(())
    }

    /// Put the folder in place: a reader sees the old folder or the new.
    /// Where the file system can, the two are exchanged in one step;
    /// elsewhere the old folder is moved aside first.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    ///
    /// Nothing is flushed to disk (no fsync): the renames alone make the
    /// swap atomic for every reader and against a kill at any point, which
    /// is what a pipeline folder needs. Durability against power loss would
    /// be for a folder that outlives its CI job, and this one does not: a
    /// machine that loses power loses the job, whose retry writes the
    /// folder anew. Flushing cost ~8 ms of a 4,000-target run's ~60 ms
    /// after Nix (measured on a 2-core VM with ext4).
    fn commit_with(mut self, exchange: bool) -> Result<()> {
        {
            // Held until the previous folder is gone too: a signal's
            // cleanup racing this removal could leave half of it behind.
            let mut held = pending();
            let garbage = self.swap_in(&mut held, exchange)?;
            self.done = true;
            held.retain(|p| p != &self.staging);
            if let Some(g) = garbage {
                let _ = std::fs::remove_dir_all(&g);
                held.retain(|p| p != &g);
            }
        }
        Ok(())
    }

    /// The renames, with the lock held; returns what to remove afterwards
    /// (registered, so a signal removes it too).
    fn swap_in(&self, held: &mut Vec<Utf8PathBuf>, exchange: bool) -> Result<Option<Utf8PathBuf>> {
        let target = &self.target;
        if !target.exists() {
            std::fs::rename(&self.staging, target)
                .with_context(|| format!("cannot put {target} in place"))?;
            return Ok(None);
        }
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        let exchanged = if !exchange {
            Err(rustix::io::Errno::NOSYS)
        } else {
            renameat_with(
                CWD,
                self.staging.as_std_path(),
                CWD,
                target.as_std_path(),
                RenameFlags::EXCHANGE,
            )
        };
        match exchanged {
            // The staging path now holds the previous folder.
            Ok(()) => return Ok(Some(self.staging.clone())),
            Err(e)
                if e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::NOTSUP => {}
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot put {target} in place"));
            }
        }
        let parent = parent_of(target);
        let aside = tempfile::Builder::new()
            .prefix(&format!("{OLD_PREFIX}{}-", std::process::id()))
            .tempdir_in(parent)
            .with_context(|| format!("cannot replace {target}"))?
            .keep();
        let aside = Utf8PathBuf::from_path_buf(aside)
            .map_err(|p| anyhow::anyhow!("path {} is not UTF-8", p.display()))?;
        held.push(aside.clone());
        let kept = aside.join(target.file_name().unwrap_or("previous"));
        std::fs::rename(target, &kept)
            .with_context(|| format!("cannot move the previous {target} aside"))?;
        if let Err(e) = std::fs::rename(&self.staging, target) {
            let _ = std::fs::rename(&kept, target);
            return Err(e).with_context(|| format!("cannot put {target} in place"));
        }
        Ok(Some(aside))
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.staging);
            forget(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn stale_folders_of_dead_runs_go_and_moved_aside_folders_come_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8Path::from_path(tmp.path()).unwrap();
        let dead = dead_pid();
        let stale = dir.join(format!("{STAGING_PREFIX}{dead}-abc"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("half.json"), "{").unwrap();
        let aside = dir.join(format!("{OLD_PREFIX}{dead}-def"));
        std::fs::create_dir_all(aside.join("pipeline")).unwrap();
        std::fs::write(aside.join("pipeline/manifest.json"), "old").unwrap();
        // Another run's folders, still in use: not touched.
        let live = dir.join(format!("{STAGING_PREFIX}1-ghi"));
        let own = dir.join(format!("{STAGING_PREFIX}{}-jkl", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        std::fs::create_dir(&own).unwrap();

        clean_stale(dir);
        assert!(!stale.exists() && !aside.exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("pipeline/manifest.json")).unwrap(),
            "old"
        );
        assert!(live.exists() && own.exists());
    }

    #[test]
    fn commit_replaces_the_folder_and_leaves_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8Path::from_path(tmp.path()).unwrap();
        let target = dir.join("out");
        // Exchanged in one step, and (where the file system cannot) moved
        // aside first.
        for (content, exchange) in [("one", true), ("two", true), ("three", false)] {
            let staged = StagedDir::new(&target).unwrap();
            staged.write("f", content.as_bytes()).unwrap();
            staged.commit_with(exchange).unwrap();
            assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), content);
        }
        let dropped = StagedDir::new(&target).unwrap();
        dropped.write("f", b"four").unwrap();
        drop(dropped);
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["out"]);
        assert!(!pending().iter().any(|p| p.starts_with(dir)));
    }
}
