//! The key of an entry: a digest of everything that should invalidate it.
//! Changing the set's name, the salt, the contents of a key file or the
//! toolchain's derivation gives a new key, so an old entry is never restored.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{ARCHIVE_FORMAT, sha256_hex};

/// What went into a key, kept in the manifest so `show` can explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// Bumped when the archive layout changes, so old entries stop matching.
    pub format: u32,
    pub name: String,
    pub salt: String,
    pub files: Vec<KeyFile>,
    pub drv: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    pub path: String,
    pub sha256: String,
}

impl KeyInputs {
    /// Hash the key files (relative to `cwd`) and the other inputs.
    pub fn collect(
        name: &str,
        salt: &str,
        files: &[String],
        drv: Option<&str>,
        cwd: &Path,
    ) -> Result<KeyInputs> {
        let files = files
            .iter()
            .map(|path| {
                let bytes = std::fs::read(cwd.join(path)).with_context(|| {
                    format!(
                        "cannot read the key file {path} of ephemera set {name} (relative to {}): \
                         check --key-file",
                        cwd.display()
                    )
                })?;
                Ok(KeyFile {
                    path: path.clone(),
                    sha256: sha256_hex(&bytes),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(drv) = drv
            && !(drv.starts_with('/') && drv.ends_with(".drv"))
        {
            bail!(
                "--key-drv {drv:?} of ephemera set {name} is not a derivation path: pass the \
                 toolchain's drvPath, e.g. $(nix-instantiate -A rustc)"
            );
        }
        Ok(KeyInputs {
            format: ARCHIVE_FORMAT,
            name: name.to_string(),
            salt: salt.to_string(),
            files,
            drv: drv.map(str::to_string),
        })
    }

    /// The key: SHA-256 of the inputs' canonical JSON (fields in a fixed
    /// order, so the same inputs always give the same key).
    pub fn key(&self) -> String {
        sha256_hex(&serde_json::to_vec(self).expect("key inputs serialize"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.lock"), "a").unwrap();
        let files = vec!["Cargo.lock".to_string()];
        let key = |name: &str, salt: &str, drv: Option<&str>| {
            KeyInputs::collect(name, salt, &files, drv, dir.path())
                .unwrap()
                .key()
        };
        let base = key("cargo", "", None);
        assert_eq!(base, key("cargo", "", None));
        assert_eq!(base.len(), 64);
        assert_ne!(base, key("cargo2", "", None));
        assert_ne!(base, key("cargo", "1", None));
        assert_ne!(base, key("cargo", "", Some("/nix/store/x-rustc.drv")));
        std::fs::write(dir.path().join("Cargo.lock"), "b").unwrap();
        assert_ne!(base, key("cargo", "", None));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = KeyInputs::collect("c", "", &["missing.lock".into()], None, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.lock"), "{err}");
        assert!(KeyInputs::collect("c", "", &[], Some("rustc"), dir.path()).is_err());
    }
}
