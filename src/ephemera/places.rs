//! Places ephemera never persists from nor restores over, whatever a set or
//! a manifest says: the store itself (a restore replacing a folder that
//! holds it would delete other scopes' entries), the checkout's git folder
//! (hooks and config run code), and the Buildkite agent's hooks, plugins
//! and build folders (other pipelines' checkouts live there).
//!
//! A path is refused when it is, contains or lies inside one of them. The
//! agent's build folder is the exception that proves the rule: the job's own
//! checkout lies inside it, so only paths inside it but outside the checkout
//! are refused.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

struct Place {
    path: PathBuf,
    what: String,
    /// Paths inside `path` but also inside this one are allowed.
    except_inside: Option<PathBuf>,
}

#[derive(Default)]
pub struct Forbidden {
    places: Vec<Place>,
}

/// The canonical form of `p` when it exists, else `p` itself (a place that
/// does not exist yet is compared by name).
fn real(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

impl Forbidden {
    /// The places of this job: the local store's folder (if any), the git
    /// folders of the checkout around `workspace`, and the agent's folders
    /// named by `get` (Buildkite's variables).
    pub fn of_job(
        store: Option<&Path>,
        workspace: &Path,
        get: impl Fn(&str) -> Option<String>,
    ) -> Forbidden {
        let mut f = Forbidden::default();
        if let Some(store) = store {
            f.add(store, "the ephemera store".into(), None);
        }
        for git in git_folders(workspace) {
            f.add(&git, "the checkout's git folder".into(), None);
        }
        let var = |name: &str| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        for name in ["BUILDKITE_HOOKS_PATH", "BUILDKITE_PLUGINS_PATH"] {
            if let Some(p) = var(name) {
                f.add(&p, format!("the agent's folder {name}"), None);
            }
        }
        if let Some(p) = var("BUILDKITE_BUILD_PATH") {
            f.add(
                &p,
                "the agent's build folder BUILDKITE_BUILD_PATH".into(),
                Some(workspace),
            );
        }
        f
    }

    fn add(&mut self, path: &Path, what: String, except_inside: Option<&Path>) {
        if !path.is_absolute() {
            return;
        }
        self.places.push(Place {
            path: real(path),
            what,
            except_inside: except_inside.map(real),
        });
    }

    /// Refuse `path` (absolute, canonical up to its last existing folder)
    /// if it is, contains or lies inside a forbidden place; `shown` names
    /// it in the error.
    pub fn check(&self, path: &Path, shown: &str) -> Result<()> {
        for place in &self.places {
            let excepted = place
                .except_inside
                .as_deref()
                .is_some_and(|e| path.starts_with(e) && !e.starts_with(path));
            if place.path.starts_with(path) {
                bail!(
                    "{shown} contains {} ({}): ephemera never persists or restores it",
                    place.what,
                    place.path.display()
                );
            }
            if path.starts_with(&place.path) && !excepted {
                bail!(
                    "{shown} lies inside {} ({}): ephemera never persists or restores there",
                    place.what,
                    place.path.display()
                );
            }
        }
        Ok(())
    }
}

/// The git folders of the checkout `workspace` lies in: `.git` of the
/// closest folder that has one, and for a worktree (`.git` is a file) the
/// folder it points to and the repository's common folder.
fn git_folders(workspace: &Path) -> Vec<PathBuf> {
    for dir in workspace.ancestors() {
        let dot_git = dir.join(".git");
        let Ok(meta) = std::fs::symlink_metadata(&dot_git) else {
            continue;
        };
        let mut found = vec![dot_git.clone()];
        if meta.is_file()
            && let Ok(text) = std::fs::read_to_string(&dot_git)
            && let Some(target) = text.lines().find_map(|l| l.strip_prefix("gitdir:"))
        {
            let gitdir = dir.join(target.trim());
            if let Ok(common) = std::fs::read_to_string(gitdir.join("commondir")) {
                found.push(gitdir.join(common.trim()));
            }
            found.push(gitdir);
        }
        return found;
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_refused_inside_and_around() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        let ws = root.join("builds/agent/org/pipe");
        std::fs::create_dir_all(ws.join(".git")).unwrap();
        std::fs::create_dir_all(root.join("home/.cache/drvkite/ephemera")).unwrap();
        let store = root.join("home/.cache/drvkite/ephemera");
        let vars = |name: &str| match name {
            "BUILDKITE_BUILD_PATH" => Some(root.join("builds").display().to_string()),
            "BUILDKITE_HOOKS_PATH" => Some(root.join("hooks").display().to_string()),
            _ => None,
        };
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        // The git folder is found from a folder inside the checkout too.
        assert_eq!(git_folders(&ws.join("sub")), [ws.join(".git")]);
        let f = Forbidden::of_job(Some(&store), &ws, vars);
        let refused = |p: &Path| f.check(p, "x").is_err();
        assert!(refused(&root.join("home/.cache")));
        assert!(refused(&store.join("acme")));
        assert!(refused(&ws.join(".git/hooks")));
        assert!(refused(&ws));
        assert!(refused(&root.join("builds")));
        assert!(refused(&root.join("builds/agent/other-pipeline")));
        assert!(refused(&root.join("hooks/pre-command")));
        assert!(!refused(&ws.join("target")));
        assert!(!refused(&root.join("home/.cargo")));
        assert!(!refused(&root.join("home/.cache/other")));
    }

    #[test]
    fn worktrees_point_to_their_git_folders() {
        let root = tempfile::tempdir().unwrap();
        let main = root.path().join("main/.git");
        std::fs::create_dir_all(main.join("worktrees/w")).unwrap();
        std::fs::write(main.join("worktrees/w/commondir"), "../..\n").unwrap();
        let wt = root.path().join("w");
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(
            wt.join(".git"),
            format!("gitdir: {}\n", main.join("worktrees/w").display()),
        )
        .unwrap();
        let found: Vec<PathBuf> = git_folders(&wt).iter().map(|p| real(p)).collect();
        assert!(found.contains(&real(&main)), "{found:?}");
        assert!(found.contains(&real(&main.join("worktrees/w"))));
    }
}
