//! Declarative use from pipeline steps: the shell lines that restore a
//! step's ephemera sets before its script and persist them after it, only
//! when the script succeeded.
//!
//! The lines are shell text: every value is one bash word. A step's
//! command goes through [`crate::pipeline::text::exact`] as a whole before
//! it is uploaded ([`wrap_script`] does that).

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::check_name;
use crate::pipeline::text::{self, shell_word as quote};

/// One ephemera set of an extra step, as the Nix side declares it in
/// `meta.ci.extraSteps.<step>.ephemera`:
///
/// ```nix
/// ephemera = [
///   { name = "cargo-home"; paths = [ "~/.cargo/registry" "~/.cargo/git" ];
///     keyFiles = [ "Cargo.lock" ]; fallback = true; }
///   { name = "target"; paths = [ "target/**" "!target/tmp/**" ];
///     keyFiles = [ "Cargo.lock" ]; salt = "2"; keyDrv = pkgs.rustc.drvPath; }
/// ];
/// ```
///
/// The script sees how each restore went in `DRVKITE_EPHEMERA_<SET>_STATUS`
/// (`exact`, `fallback` or `miss`; see [`status_variable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EphemeraSet {
    /// The set's name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Paths or rules (see [`crate::ephemera::rules`]), relative to the
    /// checkout, or `~/…` for the agent's home.
    pub paths: Vec<String>,
    /// Files (relative to the checkout) whose contents are part of the key.
    #[serde(default)]
    pub key_files: Vec<String>,
    /// Change it to start afresh.
    #[serde(default)]
    pub salt: String,
    /// A derivation path (e.g. the toolchain's) that is part of the key.
    #[serde(default)]
    pub key_drv: Option<String>,
    /// When no entry has the current key, restore the newest under any key.
    #[serde(default)]
    pub fallback: bool,
}

/// The variable that tells a step's script how the restore of set `name`
/// went: `DRVKITE_EPHEMERA_` and the name in capitals with `.` and `-` as
/// `_`, then `_STATUS`.
pub fn status_variable(name: &str) -> String {
    let set: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("DRVKITE_EPHEMERA_{set}_STATUS")
}

/// Shell lines for a step's `command`, calling `drvkite` from `PATH`:
/// `(restore, persist)`. Put `restore` before the script and `persist`
/// right after it:
///
/// ```text
/// {restore}
/// {script}
/// {persist}
/// ```
///
/// `persist` starts by checking the exit status of the script's last
/// command; if it is not 0 it exits with that status and nothing is
/// persisted. A script that fails under `set -e` or calls `exit` never
/// reaches it at all.
pub fn step_commands(sets: &[EphemeraSet]) -> Result<(String, String)> {
    step_commands_with("drvkite", sets)
}

/// [`step_commands`] with another way to call drvkite (a path, or e.g.
/// `${DRVKITE:-drvkite}`; inserted as it is, so it must be valid shell).
pub fn step_commands_with(program: &str, sets: &[EphemeraSet]) -> Result<(String, String)> {
    let mut names = HashSet::new();
    let mut variables = HashMap::new();
    for set in sets {
        check_name(&set.name)?;
        if !names.insert(&set.name) {
            bail!("ephemera set {} is listed twice in one step", set.name);
        }
        if let Some(other) = variables.insert(status_variable(&set.name), &set.name) {
            bail!(
                "ephemera sets {other} and {} would both tell the script their status in {}: \
                 rename one",
                set.name,
                status_variable(&set.name)
            );
        }
        for path in &set.paths {
            crate::ephemera::rules::parse(path)
                .map_err(|e| anyhow::anyhow!("ephemera set {}: {e:#}", set.name))?;
        }
        if set.paths.is_empty() {
            bail!(
                "ephemera set {} has no paths: list what to persist",
                set.name
            );
        }
        let values = set
            .paths
            .iter()
            .chain(&set.key_files)
            .chain(set.key_drv.iter());
        for value in values {
            if value.is_empty() || value.chars().any(char::is_control) {
                bail!(
                    "ephemera set {} has an empty path or one with control characters: {value:?}",
                    set.name
                );
            }
        }
    }
    if sets.is_empty() {
        return Ok((String::new(), String::new()));
    }
    let key_flags = |set: &EphemeraSet| {
        let mut flags = String::new();
        for file in &set.key_files {
            flags.push_str(&format!(" --key-file={}", quote(file)));
        }
        if !set.salt.is_empty() {
            flags.push_str(&format!(" --salt={}", quote(&set.salt)));
        }
        if let Some(drv) = &set.key_drv {
            flags.push_str(&format!(" --key-drv={}", quote(drv)));
        }
        flags
    };
    // Each restore writes how it went to a file; the script gets it in a
    // variable.
    let mut restore = String::from("drvkite_ephemera_status_file=\"$(mktemp)\"\n");
    let mut persist = String::from(
        "drvkite_ephemera_status=$?\n\
         if [ \"$drvkite_ephemera_status\" -ne 0 ]; then exit \"$drvkite_ephemera_status\"; fi\n",
    );
    for set in sets {
        let flags = key_flags(set);
        let variable = status_variable(&set.name);
        restore.push_str(&format!(
            "{program} ephemera restore --status-file=\"$drvkite_ephemera_status_file\"{}{flags} \
             -- {}\n\
             {variable}=\"$(cat \"$drvkite_ephemera_status_file\")\"\n\
             export {variable}\n",
            if set.fallback { " --fallback" } else { "" },
            quote(&set.name)
        ));
        let paths: Vec<String> = set.paths.iter().map(|p| quote(p)).collect();
        persist.push_str(&format!(
            "{program} ephemera persist{flags} -- {} {}\n",
            quote(&set.name),
            paths.join(" ")
        ));
    }
    restore.push_str("rm -f \"$drvkite_ephemera_status_file\"\n");
    Ok((restore, persist))
}

/// A whole step command, ready for a pipeline file: the restore lines,
/// the script (shell text, as it should run), the persist lines, written
/// for `buildkite-agent pipeline upload`.
pub fn wrap_script(sets: &[EphemeraSet], script: &str) -> Result<String> {
    let (restore, persist) = step_commands(sets)?;
    let command = if sets.is_empty() {
        script.to_string()
    } else {
        format!("{restore}{}\n{persist}", script.trim_end_matches('\n'))
    };
    Ok(text::exact_owned(command)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, paths: &[&str]) -> EphemeraSet {
        EphemeraSet {
            name: name.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            key_files: vec![],
            salt: String::new(),
            key_drv: None,
            fallback: false,
        }
    }

    #[test]
    fn values_are_quoted() {
        let mut s = set("cargo", &["~/.cargo/registry", "target"]);
        s.key_files = vec!["Cargo.lock".into()];
        s.salt = "v$1".into();
        let (restore, persist) = step_commands(&[s]).unwrap();
        assert!(
            restore.contains(
                "drvkite ephemera restore --status-file=\"$drvkite_ephemera_status_file\" \
                 --key-file='Cargo.lock' --salt='v$1' -- 'cargo'\n\
                 DRVKITE_EPHEMERA_CARGO_STATUS=\"$(cat \"$drvkite_ephemera_status_file\")\"\n\
                 export DRVKITE_EPHEMERA_CARGO_STATUS\n"
            ),
            "{restore}"
        );
        assert!(persist.starts_with("drvkite_ephemera_status=$?\n"));
        assert!(persist.ends_with(
            "drvkite ephemera persist --key-file='Cargo.lock' --salt='v$1' -- 'cargo' \
             '~/.cargo/registry' 'target'\n"
        ));
        // The whole command is written for the upload.
        let command = wrap_script(&[set("c", &["a\\$b"])], "echo $x").unwrap();
        assert!(command.contains("echo $$x\n"), "{command}");
        assert!(command.contains("'a\\''$$b'"), "{command}");
    }

    #[test]
    fn bad_sets_are_refused() {
        assert!(step_commands(&[set("a b", &["x"])]).is_err());
        assert!(step_commands(&[set("a", &[])]).is_err());
        assert!(step_commands(&[set("a", &["x"]), set("a", &["y"])]).is_err());
        assert!(step_commands(&[set("a", &["x\ny"])]).is_err());
        // Rules are checked too, and status variables must not clash.
        assert!(step_commands(&[set("a", &["**/*.o"])]).is_err());
        assert!(step_commands(&[set("a-b", &["x"]), set("a.b", &["y"])]).is_err());
        assert_eq!(
            status_variable("cargo-home.v2"),
            "DRVKITE_EPHEMERA_CARGO_HOME_V2_STATUS"
        );
        let mut warm = set("w", &["cache/**", "!cache/tmp/**"]);
        warm.fallback = true;
        let (restore, _) = step_commands(&[warm]).unwrap();
        assert!(restore.contains(" --fallback -- 'w'\n"), "{restore}");
        assert_eq!(step_commands(&[]).unwrap(), (String::new(), String::new()));
        assert_eq!(wrap_script(&[], "make").unwrap(), "make");
    }

    #[test]
    fn the_nix_shape_deserializes() {
        let sets: Vec<EphemeraSet> = serde_json::from_str(
            r#"[{"name":"t","paths":["target"],"keyFiles":["Cargo.lock"],"salt":"1",
                 "keyDrv":"/nix/store/abc-rustc.drv"},{"name":"r","paths":["~/.cargo"]}]"#,
        )
        .unwrap();
        assert_eq!(sets[0].key_files, ["Cargo.lock"]);
        assert_eq!(sets[1].salt, "");
        assert!(
            serde_json::from_str::<Vec<EphemeraSet>>(r#"[{"name":"t","path":["x"]}]"#).is_err()
        );
    }
}
