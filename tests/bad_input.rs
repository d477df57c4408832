//! Bad input to `drvkite pipeline`: each is one line naming the input and
//! what to do, and nothing is half-written. (Unknown phases, `prompt` in
//! the build phase and extra steps without `command` are covered in
//! tests/extra_steps.rs and tests/pipeline.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

fn pipeline_cmd(depot: &Path, out: &Path) -> Command {
    let mut cmd = drvkite();
    cmd.arg("pipeline")
        .arg("--depot")
        .arg(depot)
        .arg("--out")
        .arg(out);
    cmd
}

/// Names in `dir` that drvkite uses for temporary files and folders.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".drvkite"))
        .collect()
}

#[test]
fn pipeline_without_nix_on_path() {
    let depot = Depot::new();
    let out = depot.out("pipeline");
    let err = one_line_failure(
        &pipeline_cmd(&depot.root, &out)
            .env("PATH", "/nonexistent")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("nix-instantiate not found on PATH") && err.contains("install Nix"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn pipeline_on_a_missing_depot_or_one_without_default_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipeline");
    let missing = tmp.path().join("nope");
    let err = one_line_failure(&pipeline_cmd(&missing, &out).output().unwrap());
    assert!(
        err.contains(&format!("depot {} does not exist", missing.display()))
            && err.contains("--depot"),
        "{err}"
    );
    let err = one_line_failure(&pipeline_cmd(tmp.path(), &out).output().unwrap());
    assert!(
        err.contains("has no default.nix") && err.contains("--depot"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn a_depot_without_targets_is_an_error_not_an_empty_pipeline() {
    let depot = Depot::new();
    let out = pipeline(&depot, &[]);
    let before = files_of(&out);
    for root in [
        "{ ... }: { }",
        "{ ... }: { notes = \"no derivations\"; }",
        "{ ... }: { ci.targets = [ ]; }",
    ] {
        depot.write("default.nix", root);
        let err = one_line_failure(&pipeline_cmd(&depot.root, &out).output().unwrap());
        assert!(
            err.contains(&format!("depot {} has no CI targets", depot.root.display()))
                && err.contains("check --depot"),
            "{root}: {err}"
        );
        assert_eq!(files_of(&out), before, "{root}");
    }
}

/// Run with `--parent-map` = a file holding `body`: a warning naming the
/// file, every target built, the map reported unusable.
fn assert_parent_map_ignored(depot: &Depot, parent: &Path, what: &str) {
    let out = depot.out("pipeline");
    let res = pipeline_cmd(&depot.root, &out)
        .arg("--parent-map")
        .arg(parent)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{what}: {stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("drvkite: warning: "))
        .unwrap_or_else(|| panic!("{what}: no warning in {stderr}"));
    assert!(
        warning.contains(&parent.display().to_string())
            && warning.contains("building every target"),
        "{what}: {warning}"
    );
    let build = phases(&out).remove(0).1;
    assert!(!build.is_empty());
    assert!(build.iter().all(|s| s["skip"] == json!(false)), "{what}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["parentMap"]["status"], "invalid", "{what}");
    assert_eq!(summary["removed"], json!([]), "{what}");
}

#[test]
fn unusable_parent_maps_are_named_in_the_warning_and_build_everything() {
    let depot = Depot::new();
    let good = std::fs::read_to_string(pipeline(&depot, &[]).join("drvmap.json")).unwrap();
    let parent = depot.out("parent.json");
    // Malformed in ways tests/pipeline.rs does not try.
    for (what, body) in [
        ("empty", Vec::new()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("truncated", good.as_bytes()[..good.len() - 1].to_vec()),
        (
            "extra field",
            good.replacen("\"drvPath\"", "\"x\":1,\"drvPath\"", 1)
                .into_bytes(),
        ),
        (
            "attrPath not a list",
            good.replacen("[", "\"", 1).into_bytes(),
        ),
    ] {
        std::fs::write(&parent, body).unwrap();
        assert_parent_map_ignored(&depot, &parent, what);
    }
    // A folder where the file should be.
    let folder = depot.out("parent-folder");
    std::fs::create_dir(&folder).unwrap();
    assert_parent_map_ignored(&depot, &folder, "a folder");

    // Another depot's map: well-formed, but no label in common.
    let mut other: serde_json::Value = serde_json::from_str(&good).unwrap();
    let entries = std::mem::take(other.as_object_mut().unwrap());
    for (i, (_, entry)) in entries.into_iter().enumerate() {
        other[format!("elsewhere/t{i}")] = entry;
    }
    std::fs::write(&parent, other.to_string()).unwrap();
    assert_parent_map_ignored(&depot, &parent, "another depot");
    let res = pipeline_cmd(&depot.root, &depot.out("p"))
        .arg("--parent-map")
        .arg(&parent)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&res.stderr).contains(&format!(
            "none of its {} labels is a target of this depot",
            other.as_object().unwrap().len()
        )),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    // One label in common is enough to use it.
    let good: serde_json::Value = serde_json::from_str(&good).unwrap();
    let (label, entry) = good.as_object().unwrap().iter().next().unwrap();
    other[label] = entry.clone();
    std::fs::write(&parent, other.to_string()).unwrap();
    let out = pipeline(&depot, &["--parent-map", parent.to_str().unwrap()]);
    assert_eq!(
        read_json(&out.join("summary.json"))["parentMap"]["status"],
        "used"
    );
}

#[test]
fn an_output_folder_that_cannot_be_written_is_one_line_and_touches_nothing() {
    let depot = Depot::with_git();
    // Its parent is a file.
    let file = depot.out("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = one_line_failure(
        &pipeline_cmd(&depot.root, &file.join("pipeline"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains(&format!(
            "cannot create the output folder {}",
            file.display()
        )),
        "{err}"
    );
    // It is a file.
    let err = one_line_failure(&pipeline_cmd(&depot.root, &file).output().unwrap());
    assert!(
        err.contains(&file.display().to_string())
            && err.contains("a file of that name is in the way"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // A folder drvkite did not write, such as the checkout itself.
    let before = files_of(&depot.root);
    let err = one_line_failure(&pipeline_cmd(&depot.root, &depot.root).output().unwrap());
    assert!(
        err.contains("holds files but no manifest.json") && err.contains("choose another --out"),
        "{err}"
    );
    assert_eq!(files_of(&depot.root), before);
    // Checked before the evaluation, which may take long: even without Nix
    // the answer is about the folder.
    let err = one_line_failure(
        &pipeline_cmd(&depot.root, &depot.root)
            .env("PATH", "/nonexistent")
            .output()
            .unwrap(),
    );
    assert!(err.contains("holds files but no manifest.json"), "{err}");
    // A folder nobody may write into, root included.
    let err = one_line_failure(
        &pipeline_cmd(&depot.root, Path::new("/proc/drvkite-pipeline"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("cannot write into /proc"), "{err}");
    // Where permissions apply (not as root): a read-only parent.
    let ro = depot.out("read-only");
    std::fs::create_dir(&ro).unwrap();
    ok(Command::new("chmod").arg("0555").arg(&ro));
    let res = pipeline_cmd(&depot.root, &ro.join("pipeline"))
        .output()
        .unwrap();
    if !res.status.success() {
        let err = one_line_failure(&res);
        assert!(
            err.contains(&format!("cannot write into {}", ro.display())),
            "{err}"
        );
    }
    assert!(leftovers(depot.tmp.path()).is_empty());
}

/// A depot with many targets, so that writing its pipeline with one step
/// per chunk takes many files.
fn big_depot() -> Depot {
    let depot = Depot::new();
    let mut text = String::from("{ depot, ... }:\ndepot.nix.readTree.drvTargets {\n");
    for i in 0..60 {
        text.push_str(&format!(
            "  t{i} = depot.nix.build.mkTarget {{ name = \"t{i}\"; }};\n"
        ));
    }
    text.push_str("}\n");
    depot.write("many/default.nix", &text);
    depot
}

/// Kill `drvkite pipeline` (with `signal`) at many points; after each, the
/// folder is either the complete previous pipeline or the complete new
/// one, and a later run leaves nothing of the killed one behind.
fn kill_at_many_points(signal: &str) {
    let depot = big_depot();
    let args = ["--chunk-size", "1"];
    let out = pipeline(&depot, &args);
    let keep = depot.out("first-copy");
    copy_tree(&out, &keep);
    // The evaluation time in the summary differs between runs.
    let comparable = |dir: &Path| {
        let mut m = files_of(dir);
        m.remove(Path::new("summary.json"));
        m
    };
    let previous = comparable(&out);
    // A second depot state, whose complete pipeline differs.
    depot.write(
        "tools/extra.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"extra\"; }\n",
    );
    let fresh = depot.out("fresh");
    ok(pipeline_cmd(&depot.root, &fresh).args(args));
    let next = comparable(&fresh);
    assert!(previous != next, "the second state must differ");

    let parent = out.parent().unwrap().to_owned();
    let staged_files = || -> usize {
        std::fs::read_dir(&parent)
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                let name = p.file_name()?.to_string_lossy().into_owned();
                if !name.starts_with(".drvkite-staging-") {
                    return None;
                }
                std::fs::read_dir(&p).ok().map(|d| d.count())
            })
            .sum()
    };
    // Kill points: at once (during evaluation), and as soon as a given
    // number of files is staged: each file, then the swap.
    // (Every file early on and around the swap, every fifth between.)
    let points: Vec<usize> = (0..=next.len() + 1)
        .filter(|n| *n < 8 || n % 5 == 0 || n + 3 > next.len())
        .collect();
    let (mut mid_write, mut replaced) = (0, 0);
    for want in points {
        let mut child = pipeline_cmd(&depot.root, &out)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut exited = false;
        if want > 0 {
            loop {
                if child.try_wait().unwrap().is_some() {
                    exited = true;
                    break;
                }
                if staged_files() >= want {
                    mid_write += 1;
                    break;
                }
                std::thread::yield_now();
            }
        }
        if !exited {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
        let status = child.wait().unwrap();
        let now = comparable(&out);
        if now == next {
            replaced += 1;
        } else {
            // Name the files that differ: the folders are large.
            let odd: Vec<&PathBuf> = now
                .keys()
                .chain(previous.keys())
                .filter(|k| now.get(*k) != previous.get(*k))
                .collect();
            assert!(
                odd.is_empty(),
                "killed at {want} files: a half-written folder: {odd:?}"
            );
        }
        // The summary is complete JSON whichever folder it is.
        read_json(&out.join("summary.json"));
        if signal == "TERM" && !status.success() {
            // The handler removed its staging folder before dying.
            let left = leftovers(&parent);
            assert!(
                left.iter().all(|n| !n.starts_with(".drvkite-staging-")),
                "killed at {want} files: {left:?}"
            );
        }
        if now == next {
            // Back to the previous folder: every kill replaces one.
            std::fs::remove_dir_all(&out).unwrap();
            copy_tree(&keep, &out);
        }
    }
    eprintln!("{signal}: {mid_write} kills while staging, {replaced} runs finished the swap");
    // A complete run cleans up what killed runs left.
    ok(pipeline_cmd(&depot.root, &out).args(args));
    assert_eq!(comparable(&out), next);
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn sigkill_mid_write_leaves_the_old_or_the_new_folder() {
    kill_at_many_points("KILL");
}

#[test]
fn sigterm_mid_write_leaves_the_old_or_the_new_folder_and_no_staging() {
    kill_at_many_points("TERM");
}

#[test]
fn require_parent_map_fails_on_a_missing_or_unusable_map() {
    let depot = Depot::new();
    let out = depot.out("pipeline");
    let good = pipeline(&depot, &[]).join("drvmap.json");
    let before = files_of(&out);
    let strict = |parent: Option<&Path>, env: bool| {
        let mut cmd = pipeline_cmd(&depot.root, &out);
        if env {
            cmd.env("DRVKITE_REQUIRE_PARENT_MAP", "true");
        } else {
            cmd.arg("--require-parent-map");
        }
        if let Some(p) = parent {
            cmd.arg("--parent-map").arg(p);
        }
        cmd.output().unwrap()
    };
    let line = one_line_failure(&strict(None, false));
    assert!(
        line.contains("needs a parent map: pass --parent-map"),
        "{line}"
    );
    // A mistyped path.
    let typo = depot.out("drvmpa.json");
    for env in [false, true] {
        let line = one_line_failure(&strict(Some(&typo), env));
        assert!(
            line.contains(&format!("{} does not exist", typo.display())),
            "{line}"
        );
        assert!(line.contains("--require-parent-map"), "{line}");
        assert!(!line.contains("building every target:"), "{line}");
    }
    // Malformed.
    let bad = depot.out("bad.json");
    std::fs::write(&bad, "{").unwrap();
    let line = one_line_failure(&strict(Some(&bad), false));
    assert!(line.contains(&bad.display().to_string()), "{line}");
    // Another depot's map is found out after the evaluation.
    let other = depot.out("other.json");
    let mut map = read_json(&good);
    let entries = std::mem::take(map.as_object_mut().unwrap());
    for (i, (_, entry)) in entries.into_iter().enumerate() {
        map[format!("elsewhere/t{i}")] = entry;
    }
    std::fs::write(&other, map.to_string()).unwrap();
    let line = one_line_failure(&strict(Some(&other), false));
    assert!(line.contains("is a target of this depot"), "{line}");
    // Nothing was written by any of them.
    assert_eq!(files_of(&out), before);
    // A usable map passes.
    let res = strict(Some(&good), false);
    assert!(res.status.success(), "{res:?}");
}
