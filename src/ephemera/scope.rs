//! Which entries a job may read and where it may write them. The scope is
//! derived from the variables the Buildkite agent sets for the job, never
//! from a flag: a pull request must not be able to ask for the default
//! branch's scope.

use std::fmt;

use anyhow::{Result, bail};

use super::sha256_hex;

/// The trust level of the build a job belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The pipeline's default branch, not a pull request.
    Trusted,
    /// A pull request from a branch of the pipeline's own repository.
    Pr { number: u64 },
    /// A pull request from another repository (a fork).
    Fork { repo: String, number: u64 },
    /// Any other branch pushed to the pipeline's repository.
    Branch { name: String },
    /// A tag build (`BUILDKITE_TAG` set). Never trusted, even when the tag
    /// is named like the default branch: anyone who may push a tag would
    /// otherwise write the trusted seed.
    Tag { name: String },
}

/// A scope: one namespace of entries, per organisation and pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub org: String,
    pub pipeline: String,
    pub kind: Kind,
}

/// What the pipeline's operator allows beyond the defaults (read from the
/// agent's or pipeline's environment).
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Default-branch builds write a "trusted seed" that pull requests and
    /// branch builds of the same repository fall back to.
    pub seed: bool,
    /// Default-branch builds restore trusted seeds (never anything else).
    pub trusted_restore: bool,
}

impl Scope {
    /// The job's scope, from Buildkite's variables (`get` looks one up).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Scope> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let need = |name: &str| {
            var(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "ephemera needs Buildkite's job environment but {name} is not set: run it \
                     inside a Buildkite job (the scope of an entry comes only from there)"
                )
            })
        };
        let org = need("BUILDKITE_ORGANIZATION_SLUG")?;
        let pipeline = need("BUILDKITE_PIPELINE_SLUG")?;
        let pr = var("BUILDKITE_PULL_REQUEST").filter(|v| v != "false");
        let kind = if let Some(pr) = pr {
            let Ok(number) = pr.parse::<u64>() else {
                bail!("BUILDKITE_PULL_REQUEST is {pr:?}: expected a pull request number or false");
            };
            let own = var("BUILDKITE_REPO").map(|r| normalize_repo(&r));
            match var("BUILDKITE_PULL_REQUEST_REPO").map(|r| normalize_repo(&r)) {
                Some(from) if Some(&from) == own.as_ref() => Kind::Pr { number },
                // An unknown source repository is treated as a fork: isolation
                // is the safe default.
                from => Kind::Fork {
                    repo: from.unwrap_or_else(|| "unknown".into()),
                    number,
                },
            }
        } else if let Some(tag) = var("BUILDKITE_TAG") {
            Kind::Tag { name: tag }
        } else {
            let branch = need("BUILDKITE_BRANCH")?;
            match var("BUILDKITE_PIPELINE_DEFAULT_BRANCH") {
                Some(default) if default == branch => Kind::Trusted,
                _ => Kind::Branch { name: branch },
            }
        };
        Ok(Scope {
            org,
            pipeline,
            kind,
        })
    }

    /// The trusted scope of the same pipeline.
    pub fn trusted(&self) -> Scope {
        Scope {
            kind: Kind::Trusted,
            ..self.clone()
        }
    }

    pub fn is_trusted(&self) -> bool {
        self.kind == Kind::Trusted
    }

    /// The store prefix of this scope, `/`-separated, without a trailing
    /// slash. Every part is a safe path component, and scopes never nest.
    pub fn prefix(&self) -> String {
        let base = format!("{}/{}", component(&self.org), component(&self.pipeline));
        match &self.kind {
            Kind::Trusted => format!("{base}/trusted"),
            Kind::Pr { number } => format!("{base}/pr/{number}"),
            Kind::Fork { repo, number } => format!("{base}/fork/{}/{number}", component(repo)),
            Kind::Branch { name } => format!("{base}/branch/{}", component(name)),
            Kind::Tag { name } => format!("{base}/tag/{}", component(name)),
        }
    }

    /// Where the job may restore from, in order.
    pub fn restore_scopes(&self, policy: Policy) -> Vec<Scope> {
        match &self.kind {
            Kind::Trusted if policy.trusted_restore => vec![self.clone()],
            Kind::Trusted => vec![],
            Kind::Pr { .. } | Kind::Branch { .. } | Kind::Tag { .. } if policy.seed => {
                vec![self.clone(), self.trusted()]
            }
            Kind::Pr { .. } | Kind::Branch { .. } | Kind::Tag { .. } | Kind::Fork { .. } => {
                vec![self.clone()]
            }
        }
    }

    /// Where the job's entries go; `None` when it may not write at all.
    pub fn write_scope(&self, policy: Policy) -> Option<Scope> {
        match self.kind {
            Kind::Trusted if !policy.seed => None,
            _ => Some(self.clone()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix())
    }
}

/// Split a store key into its scope prefix and the rest, if it lies in a
/// scope: `org/pipeline/KIND[/…]/rest`. Parsed from the front, because the
/// shape of each kind is fixed.
pub fn split_scope(key: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = key.splitn(6, '/').collect();
    let kind_len = match *parts.get(2)? {
        "trusted" => 1,
        "pr" | "branch" | "tag" => 2,
        "fork" => 3,
        _ => return None,
    };
    let scope_parts = 2 + kind_len;
    let prefix_len: usize = parts
        .iter()
        .take(scope_parts)
        .map(|p| p.len())
        .sum::<usize>()
        + scope_parts
        - 1;
    let rest = key.get(prefix_len + 1..)?;
    if rest.is_empty() || parts.len() <= scope_parts {
        return None;
    }
    Some((&key[..prefix_len], rest))
}

/// `git@github.com:Org/Repo.git`, `https://github.com/org/repo` and
/// `git://github.com/org/repo.git` all become `github.com/org/repo`, so the
/// pull request's repository can be compared with the pipeline's.
pub fn normalize_repo(url: &str) -> String {
    let s = url.trim().to_ascii_lowercase();
    let (has_scheme, s) = match s.split_once("://") {
        Some((_, rest)) => (true, rest.to_string()),
        None => (false, s),
    };
    let s = match s.split_once('@') {
        Some((user, rest)) if !user.contains('/') => rest.to_string(),
        _ => s,
    };
    let s = if has_scheme {
        s
    } else {
        // scp-like syntax: host:path
        s.replacen(':', "/", 1)
    };
    let s = s.trim_end_matches('/');
    s.strip_suffix(".git").unwrap_or(s).to_string()
}

/// A store path component for an arbitrary string: safe names stay as they
/// are; anything else (and anything that could be mistaken for an encoded
/// name) becomes `x-` and hex, or `x-h` and a hash when long.
pub fn component(s: &str) -> String {
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && !s.starts_with("x-")
        && s.bytes().all(safe)
    {
        return s.to_string();
    }
    if s.len() <= 100 {
        let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    } else {
        format!("x-h{}", sha256_hex(s.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(vars: &[(&str, &str)]) -> Result<Scope> {
        let mut all = vec![
            ("BUILDKITE_ORGANIZATION_SLUG", "acme"),
            ("BUILDKITE_PIPELINE_SLUG", "depot"),
            ("BUILDKITE_REPO", "git@github.com:acme/depot.git"),
            ("BUILDKITE_PIPELINE_DEFAULT_BRANCH", "main"),
            ("BUILDKITE_PULL_REQUEST", "false"),
        ];
        all.extend_from_slice(vars);
        Scope::from_env(|name| {
            all.iter()
                .rev()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn kinds_come_from_the_environment() {
        let main = scope(&[("BUILDKITE_BRANCH", "main")]).unwrap();
        assert_eq!(main.kind, Kind::Trusted);
        assert_eq!(main.prefix(), "acme/depot/trusted");

        let pr = scope(&[
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_PULL_REQUEST", "12"),
            (
                "BUILDKITE_PULL_REQUEST_REPO",
                "https://github.com/acme/depot",
            ),
        ])
        .unwrap();
        assert_eq!(pr.kind, Kind::Pr { number: 12 });
        assert_eq!(pr.prefix(), "acme/depot/pr/12");

        let fork = scope(&[
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_PULL_REQUEST", "12"),
            (
                "BUILDKITE_PULL_REQUEST_REPO",
                "git://github.com/mallory/depot.git",
            ),
        ])
        .unwrap();
        assert_eq!(
            fork.kind,
            Kind::Fork {
                repo: "github.com/mallory/depot".into(),
                number: 12
            }
        );
        assert!(fork.prefix().starts_with("acme/depot/fork/x-"));

        let unknown = scope(&[("BUILDKITE_BRANCH", "x"), ("BUILDKITE_PULL_REQUEST", "3")]).unwrap();
        assert!(matches!(unknown.kind, Kind::Fork { number: 3, .. }));

        let branch = scope(&[("BUILDKITE_BRANCH", "feature/a")]).unwrap();
        assert_eq!(
            branch.kind,
            Kind::Branch {
                name: "feature/a".into()
            }
        );
        // Without the default branch nothing is trusted.
        let unsure = scope(&[
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_PIPELINE_DEFAULT_BRANCH", ""),
        ])
        .unwrap();
        assert!(!unsure.is_trusted());

        // A tag named like the default branch is a tag, not the default
        // branch (the agent sets BUILDKITE_BRANCH to the tag's name).
        let tag = scope(&[("BUILDKITE_BRANCH", "main"), ("BUILDKITE_TAG", "main")]).unwrap();
        assert_eq!(
            tag.kind,
            Kind::Tag {
                name: "main".into()
            }
        );
        assert_eq!(tag.prefix(), "acme/depot/tag/main");
        assert!(!tag.is_trusted());
        assert_eq!(
            split_scope("acme/depot/tag/main/blobs/x"),
            Some(("acme/depot/tag/main", "blobs/x"))
        );

        assert!(scope(&[("BUILDKITE_BRANCH", "x"), ("BUILDKITE_PULL_REQUEST", "abc")]).is_err());
        assert!(Scope::from_env(|_| None).is_err());
    }

    #[test]
    fn search_order_follows_the_policy() {
        let main = scope(&[("BUILDKITE_BRANCH", "main")]).unwrap();
        let pr = scope(&[
            ("BUILDKITE_BRANCH", "x"),
            ("BUILDKITE_PULL_REQUEST", "5"),
            (
                "BUILDKITE_PULL_REQUEST_REPO",
                "git@github.com:acme/depot.git",
            ),
        ])
        .unwrap();
        let fork = scope(&[("BUILDKITE_BRANCH", "x"), ("BUILDKITE_PULL_REQUEST", "5")]).unwrap();
        let none = Policy::default();
        let seed = Policy {
            seed: true,
            trusted_restore: false,
        };
        assert!(main.restore_scopes(none).is_empty());
        assert!(main.restore_scopes(seed).is_empty());
        assert_eq!(main.write_scope(none), None);
        assert_eq!(main.write_scope(seed), Some(main.clone()));
        assert_eq!(pr.restore_scopes(none), vec![pr.clone()]);
        assert_eq!(pr.restore_scopes(seed), vec![pr.clone(), main.clone()]);
        assert_eq!(fork.restore_scopes(seed), vec![fork.clone()]);
        let trusted_restore = Policy {
            seed: true,
            trusted_restore: true,
        };
        assert_eq!(main.restore_scopes(trusted_restore), vec![main.clone()]);
    }

    #[test]
    fn repositories_compare_by_host_and_path() {
        for url in [
            "git@github.com:Acme/Depot.git",
            "https://github.com/acme/depot",
            "git://github.com/acme/depot.git",
            "ssh://git@github.com/acme/depot.git/",
        ] {
            assert_eq!(normalize_repo(url), "github.com/acme/depot", "{url}");
        }
    }

    #[test]
    fn components_are_safe_and_distinct() {
        assert_eq!(component("main"), "main");
        assert_eq!(component(".."), "x-2e2e");
        assert_eq!(component("a/b"), "x-612f62");
        assert_ne!(component("x-612f62"), component("a/b"));
        assert!(component(&"y".repeat(300)).starts_with("x-h"));
        assert_eq!(component(""), "x-");
    }

    #[test]
    fn keys_split_at_the_scope() {
        assert_eq!(
            split_scope("o/p/pr/12/entries/a/b/c.json"),
            Some(("o/p/pr/12", "entries/a/b/c.json"))
        );
        assert_eq!(
            split_scope("o/p/trusted/blobs/x"),
            Some(("o/p/trusted", "blobs/x"))
        );
        assert_eq!(
            split_scope("o/p/fork/r/3/used/a"),
            Some(("o/p/fork/r/3", "used/a"))
        );
        assert_eq!(
            split_scope("o/p/branch/entries/tombstones/a/b.json"),
            Some(("o/p/branch/entries", "tombstones/a/b.json"))
        );
        assert_eq!(split_scope("o/p/other/x"), None);
        assert_eq!(split_scope("o/p/pr/12"), None);
    }
}
