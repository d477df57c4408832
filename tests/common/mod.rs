//! Shared test helpers: a fresh copy of the example depot with its own
//! store paths, and small wrappers around real Nix and git.
#![allow(dead_code)]

pub mod ephemera;
pub mod schema;
pub mod upload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn drvkite() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drvkite"))
}

/// Run and insist on success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Run and insist on failure; returns the output.
pub fn fails(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A copy of examples/depot (in `<tmp>/examples/depot`), salted so that
/// its store paths are new to this test.
pub struct Depot {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Depot {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("examples/depot");
        copy_dir(&Path::new(REPO).join("examples/depot"), &root);
        let salt = format!(
            "{}-{}-{:?}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
        );
        std::fs::write(root.join("nix/salt"), salt).unwrap();
        Depot { tmp, root }
    }

    /// The same depot as a git repository with everything committed.
    pub fn with_git() -> Self {
        let d = Self::new();
        d.git(&["init", "-q", "-b", "main"]);
        d.git(&["add", "-A"]);
        d.git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "init",
        ]);
        d
    }

    pub fn git(&self, args: &[&str]) -> String {
        ok(Command::new("git").current_dir(&self.root).args(args))
    }

    /// Commit everything in the depot's checkout.
    pub fn commit(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            message,
        ]);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// `nix-instantiate --eval --strict --json` of an expression.
pub fn nix_eval_json(expr: &str, cwd: &Path) -> serde_json::Value {
    let out = ok(Command::new("nix-instantiate").current_dir(cwd).args([
        "--eval",
        "--strict",
        "--json",
        "--read-write-mode",
        "-E",
        expr,
    ]));
    serde_json::from_str(&out).unwrap()
}

/// `nix-instantiate` of one attribute path of a depot: its drvPath.
pub fn instantiate_attr(depot: &Path, attr_path: &[String]) -> String {
    let expr = attr_path.iter().fold("import ./. {}".to_owned(), |e, a| {
        format!(
            "builtins.getAttr {} ({e})",
            // A JSON string is a Nix string once `${` cannot interpolate.
            serde_json::to_string(a).unwrap().replace("${", "\\${")
        )
    });
    let out = ok(Command::new("nix-instantiate")
        .current_dir(depot)
        .args(["-E", &expr]));
    out.lines()
        .last()
        .unwrap()
        .trim()
        .split('!')
        .next()
        .unwrap()
        .to_owned()
}

/// The output paths of a .drv, read from the file itself.
pub fn output_paths(drv: &str) -> Vec<String> {
    let out = ok(Command::new("nix-store").args(["--query", "--outputs", drv]));
    out.lines().map(str::to_owned).collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Run a step command as uploaded (see [`phases`]) the way an agent does:
/// through bash, in the checkout.
pub fn run_step(dir: &Path, command: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(command).current_dir(dir);
    // No binary cache is reachable here: do not wait on it.
    cmd.env("NIX_CONFIG", "substituters =");
    // What a pull request's author controls: nothing may run it.
    cmd.env("BUILDKITE_MESSAGE", "x'; touch PWNED; echo '");
    cmd.env("BUILDKITE_BRANCH", "$(touch PWNED)");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn bash")
}

/// `drvkite pipeline` on a depot into its `pipeline` folder, whatever
/// the outcome: (folder, output).
pub fn run_pipeline(depot: &Depot, extra_args: &[&str]) -> (PathBuf, Output) {
    let out = depot.out("pipeline");
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(extra_args)
        .output()
        .expect("spawn drvkite");
    (out, res)
}

/// `drvkite pipeline` on a depot with broken targets: it must exit with
/// status 3 (steps written, some targets broken).
pub fn pipeline_with_broken(depot: &Depot, extra_args: &[&str]) -> (PathBuf, Output) {
    let (out, res) = run_pipeline(depot, extra_args);
    assert_eq!(
        res.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    (out, res)
}

/// `drvkite pipeline` on a depot; returns the output folder.
pub fn pipeline(depot: &Depot, extra_args: &[&str]) -> PathBuf {
    let out = depot.out("pipeline");
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(extra_args));
    out
}

/// Every step of every chunk, per phase, in manifest order, as
/// `buildkite-agent pipeline upload` hands them on (see [`upload`]).
pub fn phases(out: &Path) -> Vec<(String, Vec<serde_json::Value>)> {
    let manifest = read_json(&out.join("manifest.json"));
    manifest["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let steps = p["chunks"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| {
                    upload::upload_file(&out.join(c.as_str().unwrap()))["steps"]
                        .as_array()
                        .unwrap()
                        .clone()
                })
                .collect();
            (p["name"].as_str().unwrap().to_owned(), steps)
        })
        .collect()
}

/// The build step for a label (labels may be merged: "a, b").
pub fn build_step<'a>(steps: &'a [serde_json::Value], label: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| s["env"]["READTREE_TARGET"].as_str() == Some(label))
        .unwrap_or_else(|| panic!("no build step for {label}"))
}

/// A pipeline folder's broken targets (summary.json): label -> error.
pub fn broken(out: &Path) -> std::collections::BTreeMap<String, String> {
    read_json(&out.join("summary.json"))["broken"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["label"].as_str().unwrap().to_owned(),
                b["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `s` as a Nix string literal: `"`, `\` and every `$` escaped (so no
/// `${` can interpolate), line breaks and tabs as escapes, the rest as is.
pub fn nix_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The single `drvkite: …` stderr line of a failed run.
pub fn one_line_failure(out: &Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("drvkite: "), "{stderr}");
    stderr
}

/// Every file below `dir` (relative path) with its bytes.
pub fn files_of(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_owned();
                files.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    files
}
