//! Writing files and folders so that readers see the old version or the new
//! one, never a half-written file: write to a temporary sibling, then rename.

use std::io::Write;

use anyhow::{Context, Result};
use camino::{Utf8Path, Utf8PathBuf};

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

/// How many threads `StagedDir` flushes its files with.
const SYNC_THREADS: usize = 16;

/// A folder being filled in a temporary sibling of its final place. Dropped
/// without `commit`, it leaves nothing behind.
pub struct StagedDir {
    staging: tempfile::TempDir,
    target: Utf8PathBuf,
    /// Files written so far, flushed to disk by `commit`.
    written: std::cell::RefCell<Vec<Utf8PathBuf>>,
}

impl StagedDir {
    pub fn new(target: &Utf8Path) -> Result<Self> {
        let dir = parent_of(target);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {dir}"))?;
        let staging = tempfile::Builder::new()
            .prefix(".drvkite-staging-")
            .tempdir_in(dir)
            .with_context(|| {
                format!("cannot write into {dir}: is it writable? (needed for {target})")
            })?;
        Ok(StagedDir {
            staging,
            target: target.to_owned(),
            written: Default::default(),
        })
    }

    /// Where to write the folder's files before `commit`.
    pub fn path(&self) -> &Utf8Path {
        Utf8Path::from_path(self.staging.path()).expect("staging path is UTF-8")
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).with_context(|| format!("cannot write {path}"))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {path}"))?;
        self.written.borrow_mut().push(path);
        Ok(())
    }

    /// Flush every written file to disk: once for all files rather than
    /// after each write, and from several threads, so the file system can
    /// commit them together. One fsync after each write cost ~6 ms per file
    /// here, most of drvkite's own time on a 4,000-target depot.
    fn sync(&self) -> Result<()> {
        let written = self.written.borrow();
        let per_thread = written.len().div_ceil(SYNC_THREADS).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = written
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter().try_for_each(|path| {
                            std::fs::File::open(path)
                                .and_then(|f| f.sync_all())
                                .with_context(|| format!("cannot write {path}"))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("an fsync thread panicked"))
        })
    }

    /// Put the folder in place. An existing folder is moved aside first and
    /// removed after the swap, so a reader sees the old folder or the new.
    pub fn commit(self) -> Result<()> {
        self.sync()?;
        let staging = self.staging.keep();
        let target = &self.target;
        let parent = parent_of(target);
        let old = if target.exists() {
            let aside = tempfile::Builder::new()
                .prefix(".drvkite-old-")
                .tempdir_in(parent)
                .with_context(|| format!("cannot replace {target}"))?
                .keep();
            let aside = aside.join("previous");
            std::fs::rename(target, &aside)
                .with_context(|| format!("cannot move the previous {target} aside"))?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&staging, target) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, target);
            }
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e).with_context(|| format!("cannot put {target} in place"));
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(old.parent().unwrap_or(&old));
        }
        Ok(())
    }
}
