//! Where persisted paths live. A path is recorded relative to an anchor (the
//! job's working directory or its home), never as an absolute path, so a
//! restore on another agent puts it back in the same place relative to its
//! own checkout and home, and never anywhere else.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anchor {
    /// The job's working directory (its checkout).
    Workspace,
    /// `$HOME`.
    Home,
}

/// A persisted path as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPath {
    pub anchor: Anchor,
    /// Relative, `/`-separated, only plain components.
    pub path: String,
}

impl std::fmt::Display for SavedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.anchor {
            Anchor::Workspace => write!(f, "{}", self.path),
            Anchor::Home => write!(f, "~/{}", self.path),
        }
    }
}

/// The anchors of this job, canonicalized.
pub struct Anchors {
    workspace: PathBuf,
    home: Option<PathBuf>,
}

impl Anchors {
    pub fn new(cwd: &Path, home: Option<&Path>) -> Result<Anchors> {
        let workspace = cwd
            .canonicalize()
            .with_context(|| format!("cannot resolve the working directory {}", cwd.display()))?;
        let home = home.and_then(|h| h.canonicalize().ok());
        Ok(Anchors { workspace, home })
    }

    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    fn dir(&self, anchor: Anchor) -> Result<&Path> {
        match anchor {
            Anchor::Workspace => Ok(&self.workspace),
            Anchor::Home => self
                .home
                .as_deref()
                .context("HOME is not set or does not exist: cannot place paths under ~"),
        }
    }

    /// Resolve a `persist` argument: `~`/`~/…`, absolute, or relative to
    /// the working directory. `None` when it does not exist.
    pub fn resolve(&self, arg: &str) -> Result<Option<(SavedPath, PathBuf)>> {
        let path = if arg == "~" || arg.starts_with("~/") {
            self.dir(Anchor::Home)?
                .join(arg[1..].trim_start_matches('/'))
        } else {
            self.workspace.join(arg)
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {arg}")),
        };
        if meta.file_type().is_symlink() {
            bail!(
                "{arg} is a symbolic link: ephemera does not follow links, give the path it \
                 points to instead"
            );
        }
        let real = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {arg}"))?;
        // The most specific anchor wins (a checkout usually lies inside $HOME).
        let mut best: Option<(Anchor, &Path)> = None;
        for (anchor, dir) in [
            (Anchor::Workspace, Some(self.workspace.as_path())),
            (Anchor::Home, self.home.as_deref()),
        ] {
            let Some(dir) = dir else { continue };
            if real.starts_with(dir)
                && best.is_none_or(|(_, b)| dir.as_os_str().len() > b.as_os_str().len())
            {
                best = Some((anchor, dir));
            }
        }
        let Some((anchor, dir)) = best else {
            bail!(
                "{arg} is outside the working directory and $HOME: ephemera only persists paths \
                 under those, so that a restore on another agent puts them back in place"
            );
        };
        let rel = real.strip_prefix(dir).expect("checked above");
        if rel.as_os_str().is_empty() {
            bail!(
                "{arg} is the whole {}: persist the folders inside it that you need",
                if anchor == Anchor::Home {
                    "home directory"
                } else {
                    "working directory"
                }
            );
        }
        let Some(rel) = rel.to_str() else {
            bail!("{arg} is not valid UTF-8: rename it to persist it");
        };
        let saved = SavedPath {
            anchor,
            path: rel.to_string(),
        };
        check_plain(&saved.path)?;
        if is_credential(&saved.path) {
            bail!("{arg} looks like a credential store: ephemera never persists credentials");
        }
        Ok(Some((saved, real)))
    }

    /// Where a recorded path goes on this agent. Refuses paths that are not
    /// plain, credential stores, and places whose existing parent folders
    /// lead outside the anchor (through a symbolic link).
    pub fn target(&self, saved: &SavedPath) -> Result<PathBuf> {
        check_saved(saved)?;
        let dir = self.dir(saved.anchor)?;
        let target = dir.join(&saved.path);
        let mut existing = target.parent().expect("target is below its anchor");
        while std::fs::symlink_metadata(existing).is_err() {
            existing = existing.parent().expect("the anchor exists");
        }
        let real = existing
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", existing.display()))?;
        if !real.starts_with(dir) {
            bail!(
                "entry path {saved} would be restored through {}, which leads outside {}",
                existing.display(),
                dir.display()
            );
        }
        Ok(target)
    }
}

/// What a manifest may list at all, whatever the agent: plain relative
/// paths that are not credential stores.
pub fn check_saved(saved: &SavedPath) -> Result<()> {
    check_plain(&saved.path)?;
    if is_credential(&saved.path) {
        bail!("entry path {saved} is a credential store: refused");
    }
    Ok(())
}

/// A relative path of plain components only (no `..`, `.`, root, empty).
pub fn check_plain(path: &str) -> Result<()> {
    let plain = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("path {path:?} is not a plain relative path: refused");
    }
    Ok(())
}

/// Paths that usually hold credentials. Persisting them would hand secrets
/// to whoever can read the store; restoring them could plant credentials.
pub fn is_credential(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let dirs = [".ssh", ".gnupg", ".aws", ".kube", ".password-store"];
    let files = [
        ".netrc",
        ".git-credentials",
        ".npmrc",
        ".pypirc",
        ".pgpass",
        "credentials",
        "credentials.toml",
    ];
    parts.iter().any(|p| dirs.contains(p))
        || parts.last().is_some_and(|f| files.contains(f))
        || parts.windows(2).any(|w| w == [".docker", "config.json"])
        || parts
            .windows(3)
            .any(|w| w == [".config", "gh", "hosts.yml"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_recorded_relative_to_the_closest_anchor() {
        let home = tempfile::tempdir().unwrap();
        let ws = home.path().join("builds/x");
        std::fs::create_dir_all(ws.join("target")).unwrap();
        std::fs::create_dir_all(home.path().join(".cargo/registry")).unwrap();
        let a = Anchors::new(&ws, Some(home.path())).unwrap();
        let (saved, _) = a.resolve("target").unwrap().unwrap();
        assert_eq!(saved.anchor, Anchor::Workspace);
        assert_eq!(saved.path, "target");
        let (saved, _) = a.resolve("~/.cargo/registry").unwrap().unwrap();
        assert_eq!(saved.anchor, Anchor::Home);
        assert_eq!(saved.path, ".cargo/registry");
        assert_eq!(saved.to_string(), "~/.cargo/registry");
        assert!(a.resolve("missing").unwrap().is_none());
        assert!(a.resolve(".").is_err());
        assert!(a.resolve("/").is_err());
        std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
        assert!(a.resolve("~/.ssh").is_err());
        std::os::unix::fs::symlink("target", ws.join("link")).unwrap();
        assert!(a.resolve("link").is_err());
        let t = a.target(&saved).unwrap();
        assert_eq!(
            t,
            home.path().canonicalize().unwrap().join(".cargo/registry")
        );
    }

    #[test]
    fn targets_do_not_leave_their_anchor() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join("out")).unwrap();
        let a = Anchors::new(ws.path(), None).unwrap();
        let via_link = SavedPath {
            anchor: Anchor::Workspace,
            path: "out/x".into(),
        };
        assert!(a.target(&via_link).is_err());
        for bad in ["../x", "/etc", "a/../../b", "", "a//b", "./a"] {
            let p = SavedPath {
                anchor: Anchor::Workspace,
                path: bad.into(),
            };
            assert!(a.target(&p).is_err(), "{bad}");
        }
        let home = SavedPath {
            anchor: Anchor::Home,
            path: "x".into(),
        };
        assert!(a.target(&home).is_err());
    }

    #[test]
    fn credentials_are_recognised() {
        for c in [
            ".ssh/id_ed25519",
            ".cargo/credentials.toml",
            ".docker/config.json",
            "x/.netrc",
        ] {
            assert!(is_credential(c), "{c}");
        }
        for c in [".cargo/registry/index", "target/debug/credentials.rs"] {
            assert!(!is_credential(c), "{c}");
        }
    }
}
