//! Where entries are kept: a local folder (the default) or an S3-compatible
//! bucket. Both offer the same small set of operations on `/`-separated
//! keys; immutability of manifests rests on [`Store::create`], which never
//! replaces an existing object.

pub mod local;
pub mod s3;

use std::io::{self, Write};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::manifest::shorten;
use super::scope::split_scope;

/// One stored object, as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Relative to the store's root.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// S3 settings beyond the bucket; the rest comes from the usual `AWS_*`
/// variables (credentials, region).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub allow_http: bool,
}

pub enum Store {
    Local(local::LocalStore),
    S3(s3::S3Store),
}

impl Store {
    /// `s3://bucket[/prefix]` or a local folder.
    pub fn open(spec: &str, s3: &S3Options) -> Result<Store> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("store {spec} names no bucket: use s3://BUCKET[/PREFIX]");
            }
            Ok(Store::S3(s3::S3Store::new(bucket, prefix, s3)?))
        } else if spec.contains("://") {
            bail!("store {spec}: only local folders and s3:// URLs are supported");
        } else {
            Ok(Store::Local(local::LocalStore::new(Path::new(spec))?))
        }
    }

    /// Upload a file, replacing any object there (used for blobs, which are
    /// named by their content and checked on every restore).
    pub async fn put_file(&self, key: &str, src: &Path) -> Result<()> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.put_file(key, src),
            Store::S3(s) => s.put_file(key, src).await,
        }
        .with_context(|| format!("cannot store {}", self.location(key)))
    }

    /// Create an object only if none exists; `false` if one did.
    pub async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.create(key, &bytes),
            Store::S3(s) => s.create(key, bytes).await,
        }
        .with_context(|| format!("cannot store {}", self.location(key)))
    }

    /// Write an object, replacing any (used for last-use markers only).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.put(key, &bytes),
            Store::S3(s) => s.put(key, bytes).await,
        }
        .with_context(|| format!("cannot store {}", self.location(key)))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.get(key),
            Store::S3(s) => s.get(key).await,
        }
        .with_context(|| format!("cannot read {}", self.location(key)))
    }

    /// An object of at most `max` bytes: `None` if it does not exist,
    /// `Some(None)` if it is bigger (only `max + 1` bytes are read).
    pub async fn get_capped(&self, key: &str, max: u64) -> Result<Option<Option<Vec<u8>>>> {
        check_key(key)?;
        let mut buf = Capped {
            bytes: Vec::new(),
            max,
            over: false,
        };
        let found = match self {
            Store::Local(s) => s.download(key, &mut buf),
            Store::S3(s) => s.download(key, &mut buf).await,
        };
        if buf.over {
            return Ok(Some(None));
        }
        let found = found.with_context(|| format!("cannot read {}", self.location(key)))?;
        Ok(found.then_some(Some(buf.bytes)))
    }

    /// Copy an object into `out`; `false` if it does not exist.
    pub async fn download<W: Write>(&self, key: &str, out: &mut W) -> Result<bool> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.download(key, out),
            Store::S3(s) => s.download(key, out).await,
        }
        .with_context(|| format!("cannot download {}", self.location(key)))
    }

    /// Everything below `prefix` (a folder-like prefix; "" for all).
    /// Objects whose keys this tool would never write (empty parts, `.`,
    /// `..`, control characters, not UTF-8) are left out with a warning:
    /// one such object must not make a whole listing fail.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let mut odd = Vec::new();
        let listed = match self {
            Store::Local(s) => s.list(prefix, &mut odd),
            Store::S3(s) => s.list(prefix, &mut odd).await,
        }
        .with_context(|| format!("cannot list {}", self.location(prefix)))?;
        let mut kept = Vec::with_capacity(listed.len());
        for obj in listed {
            match check_key(&obj.key) {
                Ok(()) => kept.push(obj),
                Err(_) => odd.push(format!("{:?}", shorten(&obj.key))),
            }
        }
        const SHOWN: usize = 10;
        for what in odd.iter().take(SHOWN) {
            eprintln!(
                "ephemera: warning: skipping {what} in {}: not a key ephemera writes",
                self.location(prefix)
            );
        }
        if odd.len() > SHOWN {
            eprintln!(
                "ephemera: warning: skipping {} more such objects",
                odd.len() - SHOWN
            );
        }
        Ok(kept)
    }

    /// Remove an object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.delete(key),
            Store::S3(s) => s.delete(key).await,
        }
        .with_context(|| format!("cannot delete {}", self.location(key)))
    }

    /// The folder of a local store (`None` for a bucket).
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            Store::Local(s) => Some(s.root()),
            Store::S3(_) => None,
        }
    }

    /// Where an object is, for people: a file path or an s3:// URL.
    pub fn location(&self, key: &str) -> String {
        match self {
            Store::Local(s) => s.location(key),
            Store::S3(s) => s.location(key),
        }
    }
}

/// The store as one job may change it: only objects inside its own scope
/// prefix. Every write, replacement and deletion a job makes (persist,
/// eviction, use marks, tombstones) goes through this, so no entry, however
/// forged, can steer a job into another scope.
pub struct Scoped<'a> {
    store: &'a Store,
    scope: String,
}

impl<'a> Scoped<'a> {
    pub fn new(store: &'a Store, scope: String) -> Scoped<'a> {
        Scoped { store, scope }
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    pub fn store(&self) -> &'a Store {
        self.store
    }

    fn check(&self, key: &str) -> Result<()> {
        match split_scope(key) {
            Some((scope, _)) if scope == self.scope => Ok(()),
            _ => bail!(
                "internal error: {} lies outside the job's scope {}",
                shorten(key),
                self.scope
            ),
        }
    }

    pub async fn put_file(&self, key: &str, src: &Path) -> Result<()> {
        self.check(key)?;
        self.store.put_file(key, src).await
    }

    pub async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        self.check(key)?;
        self.store.create(key, bytes).await
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.check(key)?;
        self.store.put(key, bytes).await
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.check(key)?;
        self.store.delete(key).await
    }
}

/// Keys are built by this module from safe parts; refuse anything else so
/// a bug can never make the local store write outside its folder.
fn check_key(key: &str) -> Result<()> {
    let ok = key
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".drvkite-tmp-"))
        && !key.contains('\\')
        && !key.chars().any(char::is_control);
    if !ok {
        bail!("internal error: unsafe store key {key:?}");
    }
    Ok(())
}

/// A writer into memory that stops at a cap.
struct Capped {
    bytes: Vec<u8>,
    max: u64,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() as u64 + buf.len() as u64 > self.max {
            self.over = true;
            return Err(io::Error::other("the object is bigger than expected"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes and counts what goes through it and refuses to
/// grow past a cap (so an oversized archive is noticed while streaming).
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
    limit: u64,
    pub exceeded: bool,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            len: 0,
            limit,
            exceeded: false,
        }
    }

    /// The SHA-256 (hex) and length of everything written.
    pub fn finish(mut self) -> io::Result<(String, u64, W)> {
        self.inner.flush()?;
        let digest = super::hex(&self.hasher.finalize());
        Ok((digest, self.len, self.inner))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("the size cap was exceeded"));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_keys_are_refused() {
        for bad in ["../x", "a//b", "/a", "a/./b", "a/.drvkite-tmp-1", "a\nb"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key("o/p/pr/1/blobs/ab.tar.zst").is_ok());
    }

    #[test]
    fn a_job_changes_only_its_own_scope() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string(), &S3Options::default()).unwrap();
        let job = Scoped::new(&store, "o/p/pr/5".into());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            job.put("o/p/pr/5/used/a/b/c", b"1".to_vec()).await.unwrap();
            for key in [
                "o/p/trusted/used/a/b/c",
                "o/p/pr/50/used/a/b/c",
                "o/p/pr/5",
                "o/p/pr/6/blobs/x.tar.zst",
            ] {
                assert!(job.put(key, b"1".to_vec()).await.is_err(), "{key}");
                assert!(job.delete(key).await.is_err(), "{key}");
                assert!(job.create(key, b"1".to_vec()).await.is_err(), "{key}");
            }
        });
    }

    #[test]
    fn hashing_counts_and_caps() {
        let mut w = Hashing::new(Vec::new(), 5);
        w.write_all(b"abc").unwrap();
        assert!(w.write_all(b"def").is_err());
        assert!(w.exceeded);
        let mut w = Hashing::new(Vec::new(), 100);
        w.write_all(b"abc").unwrap();
        let (digest, len, out) = w.finish().unwrap();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((len, out), (3, b"abc".to_vec()));
    }
}
