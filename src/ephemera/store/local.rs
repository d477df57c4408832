//! The local folder store: one file per object under the root. Every write
//! goes to a temporary file in the same folder first; `create` then links
//! it into place, which fails if the name exists, so a manifest is never
//! replaced, and a reader never sees half a file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::NamedTempFile;

use super::Listed;

const TMP_PREFIX: &str = ".drvkite-tmp-";

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: &Path) -> Result<LocalStore> {
        // Only the agent's user should read or write the store.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| {
                format!(
                    "cannot create the ephemera store {}: check --store / DRVKITE_EPHEMERA_STORE",
                    root.display()
                )
            })?;
        // Absolute, so that a relative `--store` (taken from the working
        // directory) is still recognised as the store by the places no job
        // persists or restores over.
        let root = std::path::absolute(root)
            .with_context(|| format!("cannot resolve the ephemera store {}", root.display()))?;
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A temporary file next to `key`'s place, filled by `fill`.
    fn temp_for(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<NamedTempFile> {
        let dir = self.path(key);
        let dir = dir.parent().expect("keys have a folder");
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(dir)?;
        fill(tmp.as_file_mut())?;
        tmp.as_file().sync_all()?;
        Ok(tmp)
    }

    pub fn put_file(&self, key: &str, src: &Path) -> Result<()> {
        let tmp = self.temp_for(key, |f| io::copy(&mut File::open(src)?, f).map(drop))?;
        tmp.persist(self.path(key)).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.temp_for(key, |f| f.write_all(bytes))?;
        tmp.persist(self.path(key)).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn create(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let tmp = self.temp_for(key, |f| f.write_all(bytes))?;
        // A hard link fails if the name is taken: an atomic create-only.
        match fs::hard_link(tmp.path(), self.path(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn download<W: Write>(&self, key: &str, out: &mut W) -> Result<bool> {
        let mut file = match File::open(self.path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        io::copy(&mut file, out)?;
        Ok(true)
    }

    /// Files below `prefix`. Entries that vanish while listed (a
    /// concurrent gc or eviction) are simply not there; names that are not
    /// UTF-8 and folders that cannot be read are reported in `odd`.
    pub fn list(&self, prefix: &str, odd: &mut Vec<String>) -> Result<Vec<Listed>> {
        self.list_with(prefix, odd, |e| e.metadata())
    }

    /// [`LocalStore::list`] reading each entry's metadata with `stat`.
    fn list_with(
        &self,
        prefix: &str,
        odd: &mut Vec<String>,
        stat: impl Fn(&walkdir::DirEntry) -> walkdir::Result<fs::Metadata>,
    ) -> Result<Vec<Listed>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix)
        };
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&dir).follow_links(false) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.io_error().is_some_and(gone) => continue,
                Err(e) if e.depth() > 0 => {
                    odd.push(format!(
                        "{} ({e})",
                        e.path().map_or(String::new(), |p| p.display().to_string())
                    ));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // Only regular files are objects: never follow a link out.
            if !entry.file_type().is_file()
                || entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
            {
                continue;
            }
            let rel = entry.path().strip_prefix(&self.root).expect("below root");
            let Some(key) = rel.to_str() else {
                odd.push(format!("{:?}", rel.to_string_lossy()));
                continue;
            };
            let meta = match stat(&entry) {
                Ok(m) => m,
                Err(e) if e.io_error().is_some_and(gone) => continue,
                Err(e) => return Err(e.into()),
            };
            out.push(Listed {
                key: key.to_string(),
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
        Ok(out)
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    pub fn location(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_never_replaces_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(&dir.path().join("store")).unwrap();
        assert!(store.create("a/b/c.json", b"first").unwrap());
        assert!(!store.create("a/b/c.json", b"second").unwrap());
        assert_eq!(store.get("a/b/c.json").unwrap().unwrap(), b"first");
        store.put("a/u", b"1").unwrap();
        store.put("a/u", b"2").unwrap();
        assert_eq!(store.get("a/u").unwrap().unwrap(), b"2");
        let mut keys: Vec<String> = store
            .list("a", &mut Vec::new())
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        keys.sort();
        assert_eq!(keys, ["a/b/c.json", "a/u"]);
        let all = walkdir::WalkDir::new(dir.path())
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .count();
        assert_eq!(all, 0);
        assert!(store.get("missing").unwrap().is_none());
        store.delete("missing").unwrap();
        assert!(
            store
                .list("nothing/here", &mut Vec::new())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn objects_vanishing_while_listed_are_simply_not_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        for key in ["s/a", "s/b", "s/c"] {
            store.put(key, b"x").unwrap();
        }
        // A concurrent gc removes b between reading the folder and looking
        // at b.
        let listed = store
            .list_with("s", &mut Vec::new(), |e| {
                if e.file_name() == "b" {
                    fs::remove_file(e.path()).unwrap();
                }
                e.metadata()
            })
            .unwrap();
        let mut keys: Vec<String> = listed.into_iter().map(|l| l.key).collect();
        keys.sort();
        assert_eq!(keys, ["s/a", "s/c"]);
    }
}
