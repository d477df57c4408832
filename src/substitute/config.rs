//! The substitution settings Nix is configured with, as Nix itself reads
//! them.
//!
//! Nix's configuration comes from nix.conf (`NIX_CONF_DIR`), the user's
//! files (`NIX_USER_CONF_FILES`, `XDG_CONFIG_HOME`), `include` and
//! `!include` lines, `extra-*` settings that add to others, aliases
//! (`binary-caches`) and `NIX_CONFIG`. Rather than a second parser of all
//! that, drvkite asks Nix: `nix show-config --json` prints the settings in
//! effect for this environment, which is what a `nix-store --realise` run
//! in the same environment uses.

use std::process::Command;

use anyhow::{Context, Result, bail};
use camino::Utf8PathBuf;
use serde_json::Value;

/// The settings that decide what Nix would substitute.
#[derive(Debug, Clone, PartialEq)]
pub struct NixConfig {
    /// `substitute`: with `false` Nix substitutes nothing.
    pub substitute: bool,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    pub require_sigs: bool,
    pub netrc_file: Option<Utf8PathBuf>,
    pub ssl_cert_file: Option<Utf8PathBuf>,
    /// `http-connections` (0: Nix sets no bound).
    pub http_connections: usize,
    /// `connect-timeout` in seconds (0: none).
    pub connect_timeout: u64,
}

impl Default for NixConfig {
    /// Nix's defaults (2.8), as `nix show-config` prints them on a machine
    /// with no configuration.
    fn default() -> Self {
        NixConfig {
            substitute: true,
            substituters: vec!["https://cache.nixos.org/".into()],
            trusted_public_keys: vec![
                "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=".into(),
            ],
            require_sigs: true,
            netrc_file: Some("/etc/nix/netrc".into()),
            ssl_cert_file: None,
            http_connections: 25,
            connect_timeout: 0,
        }
    }
}

impl NixConfig {
    /// Ask the `nix` on PATH for the configuration in effect. Nix 2.8
    /// calls the command `show-config`; Nix 2.19 and later also `config
    /// show` (`show-config` still works there, deprecated).
    pub fn query() -> Result<Self> {
        let nix = which::which("nix").context(
            "cannot read Nix's configuration: `nix` is not on PATH (on Debian: apt-get install nix-bin)",
        )?;
        let run = |command: &[&str]| {
            Command::new(&nix)
                .args(["--extra-experimental-features", "nix-command"])
                .args(command)
                .arg("--json")
                .output()
                .with_context(|| format!("cannot run {}", nix.display()))
        };
        let mut out = run(&["show-config"])?;
        if !out.status.success() {
            // A Nix that has dropped the old name.
            out = run(&["config", "show"]).unwrap_or(out);
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "cannot read Nix's configuration: `nix show-config --json` failed ({}): {}",
                out.status,
                stderr.trim().lines().next().unwrap_or("no message")
            );
        }
        let json: Value = serde_json::from_slice(&out.stdout)
            .context("cannot read Nix's configuration: `nix show-config --json` printed no JSON")?;
        Self::from_json(&json)
    }

    /// From `nix show-config --json`: `{"<name>": {"value": …, …}, …}`.
    /// A setting Nix does not print keeps Nix's default.
    pub fn from_json(json: &Value) -> Result<Self> {
        let value = |name: &str| json.get(name).and_then(|s| s.get("value"));
        let strings = |name: &str| -> Result<Option<Vec<String>>> {
            value(name)
                .map(|v| {
                    serde_json::from_value::<Vec<String>>(v.clone())
                        .with_context(|| format!("Nix's setting {name} is not a list of strings"))
                })
                .transpose()
        };
        let path = |name: &str| {
            value(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(Utf8PathBuf::from)
        };
        let default = NixConfig::default();
        Ok(NixConfig {
            substitute: value("substitute")
                .and_then(Value::as_bool)
                .unwrap_or(default.substitute),
            substituters: strings("substituters")?.unwrap_or(default.substituters),
            trusted_public_keys: strings("trusted-public-keys")?
                .unwrap_or(default.trusted_public_keys),
            require_sigs: value("require-sigs")
                .and_then(Value::as_bool)
                .unwrap_or(default.require_sigs),
            netrc_file: if value("netrc-file").is_some() {
                path("netrc-file")
            } else {
                default.netrc_file
            },
            ssl_cert_file: path("ssl-cert-file"),
            http_connections: value("http-connections")
                .and_then(Value::as_u64)
                .map_or(default.http_connections, |n| n as usize),
            connect_timeout: value("connect-timeout")
                .and_then(Value::as_u64)
                .unwrap_or(default.connect_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_keeps_defaults_for_the_rest() {
        let json = serde_json::json!({
            "substituters": {"value": ["file:///c", "https://x/"], "defaultValue": []},
            "require-sigs": {"value": false},
            "netrc-file": {"value": ""},
            "http-connections": {"value": 4},
        });
        let c = NixConfig::from_json(&json).unwrap();
        assert_eq!(c.substituters, ["file:///c", "https://x/"]);
        assert!(!c.require_sigs);
        assert_eq!(c.netrc_file, None);
        assert_eq!(c.http_connections, 4);
        assert_eq!(
            c.trusted_public_keys,
            NixConfig::default().trusted_public_keys
        );
        let bad = serde_json::json!({"substituters": {"value": "x"}});
        assert!(NixConfig::from_json(&bad).is_err());
    }
}
