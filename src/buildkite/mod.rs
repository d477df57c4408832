//! Buildkite integration: the commands a CI job runs around `drvkite
//! pipeline`. [`parent_map`] fetches the derivation map of an earlier build,
//! [`upload`] hands the generated chunks to `buildkite-agent` in the order
//! Buildkite shows them, and [`annotate`] puts a summary on the build page.

pub mod annotate;
pub mod parent_map;
pub mod upload;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use camino::Utf8Path;
use serde::de::DeserializeOwned;

/// Read one of the JSON files of a `drvkite pipeline` folder (version 1),
/// with errors that say how to get a good one.
fn read_pipeline_json<T: DeserializeOwned>(dir: &Utf8Path, name: &str, what: &str) -> Result<T> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {path}: is {dir} the --out folder of `drvkite pipeline`? Run that first"
        )
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{path} is not JSON: regenerate {dir} with `drvkite pipeline`"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(1) => {}
        Some(v) => bail!(
            "{path} has version {v}, this drvkite reads version 1: regenerate {dir} with this drvkite"
        ),
        None => bail!("{path} is not a drvkite {what}: regenerate {dir} with `drvkite pipeline`"),
    }
    serde_json::from_value(value).with_context(|| {
        format!("{path} is not a drvkite {what}: regenerate {dir} with `drvkite pipeline`")
    })
}

/// A Buildkite log group header (`--- `): collapsed in the job log, with
/// the last one expanded by Buildkite.
pub fn group(title: &str) {
    eprintln!("--- {title}");
}

/// A de-emphasised Buildkite log group (`~~~ `), for details.
pub fn minor_group(title: &str) {
    eprintln!("~~~ {title}");
}

/// How `buildkite-agent` commands are carried out: for real, or printed.
pub enum Agent {
    DryRun,
    Real(PathBuf),
}

impl Agent {
    /// The real agent from PATH, or a printer when `dry_run`.
    pub fn new(dry_run: bool) -> Result<Self> {
        if dry_run {
            return Ok(Agent::DryRun);
        }
        let path = which::which("buildkite-agent").map_err(|_| {
            anyhow!(
                "buildkite-agent is not on PATH: run this inside a Buildkite job, \
                 or pass --dry-run to print the commands instead"
            )
        })?;
        Ok(Agent::Real(path))
    }

    /// Run `buildkite-agent ARGS`, feeding `stdin` when given. In a dry run,
    /// print the command line (and what would go to stdin) on stdout.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<()> {
        let line = command_line("buildkite-agent", args);
        let path = match self {
            Agent::DryRun => {
                match stdin {
                    Some(body) => println!(
                        "{line} <<'EOF'\n{}\nEOF",
                        String::from_utf8_lossy(body).trim_end()
                    ),
                    None => println!("{line}"),
                }
                return Ok(());
            }
            Agent::Real(path) => path,
        };
        eprintln!("$ {line}");
        let mut cmd = Command::new(path);
        cmd.args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", path.display()))?;
        if let (Some(body), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(body)
                .with_context(|| format!("cannot send input to {line}"))?;
        }
        let status = child
            .wait()
            .with_context(|| format!("cannot wait for {line}"))?;
        if !status.success() {
            bail!("`{line}` failed ({status}): see its output above");
        }
        Ok(())
    }
}

/// A command line as a POSIX shell would read it back.
pub fn command_line(program: &str, args: &[&str]) -> String {
    let mut s = shell_quote(program);
    for a in args {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Branch names as Buildkite reports them may carry `refs/heads/` (TVL's
/// builds do); compare and build git refs without it.
pub fn short_branch(branch: &str) -> &str {
    branch.strip_prefix("refs/heads/").unwrap_or(branch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            command_line("buildkite-agent", &["pipeline", "upload", "p/a-1.json"]),
            "buildkite-agent pipeline upload p/a-1.json"
        );
        assert_eq!(
            command_line("x", &["a b", "it's", "", "$HOME;*"]),
            r"x 'a b' 'it'\''s' '' '$HOME;*'"
        );
    }

    #[test]
    fn branches() {
        assert_eq!(short_branch("refs/heads/canon"), "canon");
        assert_eq!(short_branch("main"), "main");
    }
}
