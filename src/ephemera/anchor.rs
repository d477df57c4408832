//! Where persisted paths live. A path is recorded relative to an anchor (the
//! job's working directory or its home), never as an absolute path, so a
//! restore on another agent puts it back in the same place relative to its
//! own checkout and home, and never anywhere else.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::credentials::{credential_store, whole_config_folder};
use super::places::Forbidden;

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

/// The anchors of this job, canonicalized, and what may not be placed
/// under them.
pub struct Anchors {
    workspace: PathBuf,
    home: Option<PathBuf>,
    forbidden: Forbidden,
    /// Home-relative config folders that need `--allow-config-folders`
    /// beyond `~/.config` and `~/.local/share` (`$XDG_CONFIG_HOME`…).
    config_folders: Vec<String>,
    allow_config_folders: bool,
}

impl Anchors {
    pub fn new(cwd: &Path, home: Option<&Path>) -> Result<Anchors> {
        let workspace = cwd
            .canonicalize()
            .with_context(|| format!("cannot resolve the working directory {}", cwd.display()))?;
        let home = home.and_then(|h| h.canonicalize().ok());
        Ok(Anchors {
            workspace,
            home,
            forbidden: Forbidden::default(),
            config_folders: Vec::new(),
            allow_config_folders: false,
        })
    }

    /// Refuse `forbidden` places; treat the folders `xdg` (absolute, e.g.
    /// `$XDG_CONFIG_HOME`) like `~/.config` when they lie in the home
    /// folder; allow whole config folders only with `allow_config_folders`.
    pub fn guarded(mut self, forbidden: Forbidden, xdg: &[PathBuf], allow_config: bool) -> Self {
        self.forbidden = forbidden;
        self.allow_config_folders = allow_config;
        if let Some(home) = &self.home {
            self.config_folders = xdg
                .iter()
                .filter_map(|p| p.canonicalize().ok())
                .filter_map(|p| {
                    p.strip_prefix(home)
                        .ok()
                        .and_then(|r| r.to_str())
                        .filter(|r| !r.is_empty())
                        .map(str::to_string)
                })
                .collect();
        }
        self
    }

    /// Refuse a whole config folder unless the operator opted in.
    fn check_config_folder(&self, saved: &SavedPath) -> Result<()> {
        if saved.anchor != Anchor::Home || self.allow_config_folders {
            return Ok(());
        }
        if let Some(folder) = whole_config_folder(&saved.path, &self.config_folders) {
            bail!(
                "{saved} is or holds the whole config folder ~/{folder}, where many tools keep \
                 credentials: persist the folders inside it that you need, or pass \
                 --allow-config-folders (DRVKITE_EPHEMERA_ALLOW_CONFIG_FOLDERS)"
            );
        }
        Ok(())
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

    /// Where a `persist` argument points, without following anything:
    /// `.` parts and trailing slashes dropped (`link/` would make the kernel
    /// follow the link before we could see it is one).
    pub fn place(&self, arg: &str) -> Result<PathBuf> {
        let (mut path, rest) = if arg == "~" || arg.starts_with("~/") {
            (self.dir(Anchor::Home)?.to_path_buf(), &arg[1..])
        } else if arg.starts_with('/') {
            (PathBuf::from("/"), arg)
        } else {
            (self.workspace.clone(), arg)
        };
        for part in rest.split('/').filter(|p| !p.is_empty() && *p != ".") {
            path.push(part);
        }
        Ok(path)
    }

    /// Resolve a `persist` argument: `~`/`~/…`, absolute, or relative to
    /// the working directory. `None` when it does not exist. Refuses what
    /// may not be persisted (credential stores, forbidden places…).
    pub fn resolve(&self, arg: &str) -> Result<Option<(SavedPath, PathBuf)>> {
        let Some((saved, real)) = self.locate(arg)? else {
            return Ok(None);
        };
        if let Some(tool) = credential_store(&saved.path) {
            bail!(
                "{arg} is or lies in a credential store ({tool}): ephemera never persists \
                 credentials"
            );
        }
        self.check_config_folder(&saved)?;
        self.forbidden.check(&real, arg)?;
        Ok(Some((saved, real)))
    }

    /// Where a `persist` argument is, relative to its anchor, and its real
    /// path; `None` when it does not exist. Refuses links and places
    /// outside the anchors, nothing else (for exclude rules).
    pub fn locate(&self, arg: &str) -> Result<Option<(SavedPath, PathBuf)>> {
        let path = self.place(arg)?;
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
        Ok(Some((saved, real)))
    }

    /// Where a recorded path goes on this agent, and where that really is
    /// relative to the anchor (its existing folders followed). Refuses paths
    /// that are not plain, credential stores, and places whose existing
    /// parent folders lead outside the anchor (through a symbolic link).
    pub fn target(&self, saved: &SavedPath) -> Result<(PathBuf, SavedPath)> {
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
        let rest = target.strip_prefix(existing).expect("an ancestor");
        let real = real.join(rest);
        self.forbidden
            .check(&real, &format!("entry path {saved}"))?;
        self.check_config_folder(saved)?;
        // A link in the checkout or home (`evil -> ~/.ssh`) must not make
        // a harmless-looking path land in a credential store: judge where
        // it leads too.
        let rel = real
            .strip_prefix(dir)
            .ok()
            .and_then(Path::to_str)
            .with_context(|| format!("entry path {saved} leads to a name that is not UTF-8"))?;
        let leads = SavedPath {
            anchor: saved.anchor,
            path: rel.to_string(),
        };
        check_saved(&leads)
            .and_then(|()| self.check_config_folder(&leads))
            .with_context(|| format!("entry path {saved} leads to {leads}"))?;
        Ok((target, leads))
    }
}

/// What a manifest may list at all, whatever the agent: plain relative
/// paths that are not credential stores.
pub fn check_saved(saved: &SavedPath) -> Result<()> {
    check_plain(&saved.path)?;
    if let Some(tool) = credential_store(&saved.path) {
        bail!("entry path {saved} is a credential store ({tool}): refused");
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
        let (t, _) = a.target(&saved).unwrap();
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
    fn trailing_slashes_do_not_follow_links() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ws.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", ws.path().join("link")).unwrap();
        let a = Anchors::new(ws.path(), None).unwrap();
        for arg in ["link", "link/", "link//", "link/.", "./link/"] {
            let err = a.resolve(arg).unwrap_err().to_string();
            assert!(err.contains("symbolic link"), "{arg}: {err}");
        }
        let (saved, _) = a.resolve("real/").unwrap().unwrap();
        assert_eq!(saved.path, "real");
    }
}
