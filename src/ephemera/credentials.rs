//! The credential stores ephemera never carries: persisting them would hand
//! secrets to whoever can read the store (a pull request restoring the
//! trusted seed), and restoring them could plant credentials on an agent.
//!
//! One table, applied to paths given to `persist`, to every file and folder
//! inside a persisted folder, and to every member of an archive being
//! restored. docs/ephemera.md lists the same rows (a test keeps the two in
//! step). Matching is by name, on the path relative to its anchor (the
//! checkout or `$HOME`), anywhere in it: `.aws` is refused as `~/.aws` and as
//! `vendor/x/.aws`.

use std::collections::HashMap;
use std::sync::OnceLock;

/// How a row's components must appear in a path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A folder: the path is it or lies inside it.
    Folder,
    /// A file: the path ends with it.
    File,
}

use Kind::{File, Folder};

/// (tool, components, kind).
const STORES: &[(&str, &[&str], Kind)] = &[
    ("SSH", &[".ssh"], Folder),
    ("GnuPG", &[".gnupg"], Folder),
    ("pass", &[".password-store"], Folder),
    ("GNOME keyring", &[".local", "share", "keyrings"], Folder),
    ("netrc", &[".netrc"], File),
    ("netrc", &["_netrc"], File),
    ("git credential store", &[".git-credentials"], File),
    (
        "git credential store",
        &[".config", "git", "credentials"],
        File,
    ),
    ("git credential cache", &[".git-credential-cache"], Folder),
    (
        "git credential cache",
        &[".cache", "git", "credential"],
        Folder,
    ),
    ("Git Credential Manager", &[".gcm"], Folder),
    ("Subversion", &[".subversion", "auth"], Folder),
    ("AWS", &[".aws"], Folder),
    ("Google Cloud", &[".config", "gcloud"], Folder),
    ("Azure", &[".azure"], Folder),
    ("Oracle Cloud", &[".oci"], Folder),
    ("DigitalOcean", &[".config", "doctl"], Folder),
    ("Hetzner Cloud", &[".config", "hcloud"], Folder),
    ("Fly.io", &[".fly"], Folder),
    ("Doppler", &[".doppler"], Folder),
    ("1Password CLI", &[".config", "op"], Folder),
    ("SOPS / age", &[".config", "sops"], Folder),
    ("Kubernetes", &[".kube"], Folder),
    ("Helm registries", &[".config", "helm", "registry"], Folder),
    ("Docker", &[".docker", "config.json"], File),
    ("Docker TLS", &[".docker", "key.pem"], File),
    ("Docker contexts", &[".docker", "contexts"], Folder),
    (
        "Podman / Buildah / Skopeo",
        &["containers", "auth.json"],
        File,
    ),
    ("GitHub CLI", &[".config", "gh", "hosts.yml"], File),
    ("hub", &[".config", "hub"], File),
    ("GitLab CLI", &[".config", "glab-cli", "config.yml"], File),
    (
        "Terraform",
        &[".terraform.d", "credentials.tfrc.json"],
        File,
    ),
    ("Terraform", &[".terraformrc"], File),
    ("Terraform", &["terraform.rc"], File),
    ("Vault", &[".vault-token"], File),
    ("Cargo, RubyGems, AWS", &["credentials"], File),
    ("Cargo", &["credentials.toml"], File),
    ("Cargo (registry tokens)", &[".cargo", "config.toml"], File),
    ("Cargo (registry tokens)", &[".cargo", "config"], File),
    ("npm / pnpm", &[".npmrc"], File),
    ("Yarn", &[".yarnrc"], File),
    ("Yarn", &[".yarnrc.yml"], File),
    ("PyPI", &[".pypirc"], File),
    ("pip", &["pip.conf"], File),
    ("Poetry", &[".config", "pypoetry", "auth.toml"], File),
    ("Maven", &[".m2", "settings.xml"], File),
    ("Maven", &[".m2", "settings-security.xml"], File),
    ("Gradle", &[".gradle", "gradle.properties"], File),
    ("Composer", &[".composer", "auth.json"], File),
    ("Composer", &[".config", "composer", "auth.json"], File),
    ("NuGet", &[".nuget", "NuGet", "NuGet.Config"], File),
    ("NuGet", &[".config", "NuGet", "NuGet.Config"], File),
    ("Nix (access tokens)", &[".config", "nix", "nix.conf"], File),
    ("Nix (netrc)", &[".config", "nix", "netrc"], File),
    ("Cachix", &[".config", "cachix"], Folder),
    ("Attic", &[".config", "attic"], Folder),
    ("PostgreSQL", &[".pgpass"], File),
    ("MySQL", &[".my.cnf"], File),
    ("MySQL", &[".mylogin.cnf"], File),
    ("rclone", &[".config", "rclone", "rclone.conf"], File),
    ("s3cmd", &[".s3cfg"], File),
    ("boto", &[".boto"], File),
    ("Mercurial", &[".hgrc"], File),
    ("Buildkite agent", &["buildkite-agent.cfg"], File),
];

/// The rows of [`STORES`] by their first component in lower case, so a
/// path is checked in one pass over its components, however deep it is.
fn by_first() -> &'static HashMap<String, Vec<usize>> {
    static MAP: OnceLock<HashMap<String, Vec<usize>>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (_, seq, _)) in STORES.iter().enumerate() {
            map.entry(seq[0].to_ascii_lowercase()).or_default().push(i);
        }
        map
    })
}

/// The tool whose credential store `rel` (a `/`-separated path relative to
/// its anchor) is or lies in, if any.
pub fn credential_store(rel: &str) -> Option<&'static str> {
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    credential_store_in(&parts)
}

/// [`credential_store`] of a path given as its components. Names are
/// compared without regard to ASCII case: on a case-insensitive file
/// system (macOS's default) `~/.SSH` is `~/.ssh`.
pub fn credential_store_in(parts: &[&str]) -> Option<&'static str> {
    let rows = by_first();
    for (i, part) in parts.iter().enumerate() {
        let found = if part.bytes().any(|b| b.is_ascii_uppercase()) {
            rows.get(&part.to_ascii_lowercase())
        } else {
            rows.get(*part)
        };
        let Some(candidates) = found else {
            continue;
        };
        for &row in candidates {
            let (tool, seq, kind) = STORES[row];
            let fits = match kind {
                Folder => parts.len() >= i + seq.len(),
                File => parts.len() == i + seq.len(),
            };
            let same = || {
                parts[i..i + seq.len()]
                    .iter()
                    .zip(seq.iter())
                    .all(|(a, b)| a.eq_ignore_ascii_case(b))
            };
            if fits && same() {
                return Some(tool);
            }
        }
    }
    None
}

pub fn is_credential(rel: &str) -> bool {
    credential_store(rel).is_some()
}

/// Home folders that hold many tools' settings and credentials; persisting
/// one whole needs `--allow-config-folders`.
const CONFIG_FOLDERS: &[&str] = &[".config", ".local/share"];

/// The config folder a home-relative path `rel` is or contains (`.local`
/// contains `.local/share`), if any. `extra` adds `$XDG_CONFIG_HOME` and
/// `$XDG_DATA_HOME` when they lie in the home folder.
pub fn whole_config_folder(rel: &str, extra: &[String]) -> Option<String> {
    CONFIG_FOLDERS
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .find(|folder| {
            let (folder, rel) = (folder.to_ascii_lowercase(), rel.to_ascii_lowercase());
            folder == rel || folder.starts_with(&format!("{rel}/"))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_recognised_by_name() {
        for (path, tool) in [
            (".ssh/id_ed25519", "SSH"),
            (
                ".config/gcloud/application_default_credentials.json",
                "Google Cloud",
            ),
            (".config/gcloud/credentials.db", "Google Cloud"),
            (".config/containers/auth.json", "Podman / Buildah / Skopeo"),
            (".config/hub", "hub"),
            (".azure/msal_token_cache.json", "Azure"),
            (".terraform.d/credentials.tfrc.json", "Terraform"),
            (".vault-token", "Vault"),
            (".m2/settings.xml", "Maven"),
            (".gradle/gradle.properties", "Gradle"),
            (".cargo/config.toml", "Cargo (registry tokens)"),
            (".config/pip/pip.conf", "pip"),
            ("project/.yarnrc.yml", "Yarn"),
            (".docker/config.json", "Docker"),
            ("x/.netrc", "netrc"),
            (".cargo/credentials.toml", "Cargo"),
            // Case-insensitive file systems: the same files.
            (".SSH/authorized_keys", "SSH"),
            ("x/.Docker/Config.json", "Docker"),
        ] {
            assert_eq!(credential_store(path), Some(tool), "{path}");
        }
        for path in [
            ".cargo/registry/index",
            "target/debug/credentials.rs",
            ".terraform.d/plugins/x",
            ".config/nvim/init.lua",
            ".docker/buildx/instances",
            ".m2/repository/a.jar",
        ] {
            assert_eq!(credential_store(path), None, "{path}");
        }
    }

    #[test]
    fn whole_config_folders_need_opting_in() {
        let found = |rel: &str, extra: &[String]| whole_config_folder(rel, extra);
        assert_eq!(found(".config", &[]).as_deref(), Some(".config"));
        assert_eq!(found(".Config", &[]).as_deref(), Some(".config"));
        assert_eq!(found(".local", &[]).as_deref(), Some(".local/share"));
        assert_eq!(found(".local/share", &[]).as_deref(), Some(".local/share"));
        assert_eq!(found(".config/nvim", &[]), None);
        assert_eq!(found(".cache", &[]), None);
        let xdg = vec!["xdg/config".to_string()];
        assert_eq!(found("xdg", &xdg).as_deref(), Some("xdg/config"));
    }

    #[test]
    fn the_documentation_lists_every_store() {
        let docs = include_str!("../../docs/ephemera.md");
        for (tool, seq, kind) in STORES {
            let shown = format!(
                "`{}{}`",
                seq.join("/"),
                if *kind == Folder { "/" } else { "" }
            );
            assert!(
                docs.contains(&shown) && docs.contains(tool),
                "docs/ephemera.md does not list {tool} {shown}"
            );
        }
    }
}
