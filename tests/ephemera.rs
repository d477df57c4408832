//! Ephemera end to end: the real binary, real files, a real local store and
//! a real S3 server (moto) on 127.0.0.1. Each job gets a fresh working
//! directory and home, as a pristine agent would.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::ephemera::*;
use common::{fails, ok};
use drvkite::ephemera::store::{S3Options, Store};
use drvkite::ephemera::{EphemeraSet, wrap_script};
use sha2::{Digest, Sha256};
use tar::EntryType;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn round_trip_restores_files_folders_links_and_modes_with_provenance() {
    let world = World::local();
    let a = world.job(Build::Pr(5), &[]);
    a.write("Cargo.lock", "lock\n");
    a.write("target/debug/app", "#!/bin/sh\n");
    std::fs::set_permissions(
        a.ws.join("target/debug/app"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    a.write("target/debug/deps/lib.rlib", "rlib");
    std::fs::create_dir_all(a.ws.join("target/empty")).unwrap();
    std::os::unix::fs::symlink("debug/app", a.ws.join("target/current")).unwrap();
    // Not persisted: a link leaving target/, and credentials under ~/.cargo.
    std::os::unix::fs::symlink("../../../..", a.ws.join("target/up")).unwrap();
    std::fs::create_dir_all(a.home.join(".cargo/registry/index")).unwrap();
    std::fs::write(a.home.join(".cargo/registry/index/config.json"), "{}").unwrap();
    std::fs::write(a.home.join(".cargo/credentials.toml"), "token = \"s3cr3t\"").unwrap();
    let out = a
        .eph(&[
            "persist",
            "cargo",
            "target",
            "~/.cargo",
            "--key-file",
            "Cargo.lock",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ephemera: persisted cargo scope=acme/depot/pr/5"));
    assert!(
        stderr(&out).contains("left out target/up"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("left out ~/.cargo/credentials.toml"));

    let b = world.job(Build::Pr(5), &[]);
    b.write("Cargo.lock", "lock\n");
    let line = b.ok(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert_eq!(b.read("target/debug/app").unwrap(), "#!/bin/sh\n");
    assert_eq!(mode(&b.ws.join("target/debug/app")), 0o755);
    assert_eq!(mode(&b.ws.join("target/debug/deps/lib.rlib")), 0o644);
    assert_eq!(b.read("target/debug/deps/lib.rlib").unwrap(), "rlib");
    assert!(b.ws.join("target/empty").is_dir());
    assert_eq!(
        std::fs::read_link(b.ws.join("target/current")).unwrap(),
        Path::new("debug/app")
    );
    assert!(std::fs::symlink_metadata(b.ws.join("target/up")).is_err());
    assert_eq!(
        std::fs::read_to_string(b.home.join(".cargo/registry/index/config.json")).unwrap(),
        "{}"
    );
    assert!(!b.home.join(".cargo/credentials.toml").exists());
    assert!(b.leftovers().is_empty(), "{:?}", b.leftovers());

    // One provenance line naming everything the issue asks for.
    let manifests = world.manifests();
    assert_eq!(manifests.len(), 1);
    let m = common::read_json(&world.store_path().join(&manifests[0]));
    let lines: Vec<&str> = line.lines().collect();
    assert_eq!(lines.len(), 1, "{line}");
    let line = lines[0];
    for part in [
        "ephemera: restored cargo".to_string(),
        "scope=acme/depot/pr/5".to_string(),
        format!("key={}", m["key"].as_str().unwrap()),
        format!("sha256={}", m["sha256"].as_str().unwrap()),
        "size=".to_string(),
        "paths=target,~/.cargo".to_string(),
        format!(
            "created by build {} (https://buildkite.com/acme/depot/builds/{}) job job-{} at {}",
            m["created_by"]["build_number"].as_str().unwrap(),
            m["created_by"]["build_number"].as_str().unwrap(),
            m["created_by"]["build_number"].as_str().unwrap(),
            m["created_at"].as_str().unwrap()
        ),
        format!(
            "location={}/acme/depot/pr/5/blobs/{}.tar.zst",
            world.store,
            m["sha256"].as_str().unwrap()
        ),
    ] {
        assert!(line.contains(&part), "{part:?} missing from {line}");
    }
    // The blob really has that digest.
    let blob = std::fs::read(world.store_path().join(format!(
        "acme/depot/pr/5/blobs/{}.tar.zst",
        m["sha256"].as_str().unwrap()
    )))
    .unwrap();
    assert_eq!(hex(&Sha256::digest(&blob)), m["sha256"].as_str().unwrap());

    // Persisting the same contents again stores nothing new.
    let again = b.ok(&[
        "persist",
        "cargo",
        "target",
        "~/.cargo",
        "--key-file",
        "Cargo.lock",
    ]);
    assert!(again.contains("unchanged"), "{again}");
    assert_eq!(world.manifests().len(), 1);
}

#[test]
fn restore_appends_provenance_to_the_annotation_when_asked() {
    let world = World::local();
    persist_target(&world.job(Build::Pr(5), &[]), "built");
    let bin = world.root.path().join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = world.root.path().join("agent.log");
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{}'; done\n",
        log.display()
    );
    std::fs::write(bin.join("buildkite-agent"), script).unwrap();
    std::fs::set_permissions(
        bin.join("buildkite-agent"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let job = world.job(Build::Pr(5), &[]);
    job.write("Cargo.lock", "lock v1\n");
    let line = ok(job
        .eph(&["restore", "cargo", "--key-file", "Cargo.lock", "--annotate"])
        .env("PATH", path_var(Some(&bin))));
    let args = std::fs::read_to_string(&log).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        &args[..6],
        [
            "annotate",
            "--append",
            "--context",
            "drvkite-ephemera",
            "--style",
            "info"
        ]
    );
    assert!(args[6].contains(line.trim()), "{args:?}");

    // Without --annotate the agent is not called.
    std::fs::remove_file(&log).unwrap();
    ok(job
        .eph(&["restore", "cargo", "--key-file", "Cargo.lock"])
        .env("PATH", path_var(Some(&bin))));
    assert!(!log.exists());
}

/// Every file, folder and link below `dir` (except the store), with
/// contents, to prove a refused restore changed nothing.
fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| e.path() != skip)
        .filter_map(Result::ok)
        .map(|e| {
            let what = if e.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(e.path()).unwrap().display())
            } else if e.file_type().is_file() {
                std::fs::read_to_string(e.path()).unwrap_or_else(|_| "<binary>".into())
            } else {
                format!("dir {:o}", mode(e.path()))
            };
            (e.path().to_path_buf(), what)
        })
        .collect()
}

/// Invalidate the set, then plant `archive` as the only live entry, next
/// to the manifest at `template`: what someone who can write into the scope
/// could do. A matching blob and manifest, so only the archive's contents
/// are wrong.
fn plant(world: &World, template: &str, archive: &[u8], id: &str) {
    plant_with(world, template, archive, id, |_| {});
}

/// [`plant`], with the manifest changed by `edit` as well.
fn plant_with(
    world: &World,
    template: &str,
    archive: &[u8],
    id: &str,
    edit: impl Fn(&mut serde_json::Value),
) {
    let m = world.manifest(template);
    let name = m["name"].as_str().unwrap();
    world.job(Build::Pr(5), &[]).ok(&["invalidate", name]);
    world.plant(template, m["scope"].as_str().unwrap(), archive, id, edit);
}

#[test]
fn restore_verifies_sha256_before_extracting() {
    let world = World::local();
    let a = world.job(Build::Pr(5), &[]);
    // Padding, so the forged archive below is not bigger than the real one.
    std::fs::create_dir_all(a.ws.join("target")).unwrap();
    std::fs::write(a.ws.join("target/pad.bin"), noise(4096, 3)).unwrap();
    persist_target(&a, "good");
    let manifest = world.manifests().pop().unwrap();
    let m = common::read_json(&world.store_path().join(&manifest));
    // Swap the blob for another valid archive: extracting it would show.
    let mut evil = Evil::new();
    evil.entry("0/evil.txt", EntryType::Regular, None, b"evil");
    let blob = world.store_path().join(format!(
        "acme/depot/pr/5/blobs/{}.tar.zst",
        m["sha256"].as_str().unwrap()
    ));
    std::fs::write(&blob, evil.finish()).unwrap();

    let job = world.job(Build::Pr(5), &[]);
    job.write("Cargo.lock", "lock v1\n");
    job.write("target/keep.txt", "mine");
    let before = snapshot(world.root.path(), &world.store_path());
    let out = fails(&mut job.eph(&["restore", "cargo", "--key-file", "Cargo.lock", "--require"]));
    let err = stderr(&out);
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(err.contains("nothing was extracted"), "{err}");
    assert_eq!(snapshot(world.root.path(), &world.store_path()), before);
    assert!(job.leftovers().is_empty());

    // The broken entry was quarantined in the job's own scope: a miss now,
    // and a fresh persist works again.
    let out = job.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("nothing restored"),
        "{}",
        stderr(&out)
    );
    assert_eq!(job.read("target/keep.txt").unwrap(), "mine");
    persist_target(&world.job(Build::Pr(5), &[]), "fresh");
    assert_eq!(
        restore_target(&world.job(Build::Pr(5), &[])).unwrap(),
        "fresh"
    );
}

#[test]
fn malicious_archives_are_refused_and_touch_nothing() {
    let world = World::local();
    persist_target(&world.job(Build::Pr(5), &[]), "good");
    let template = world.manifests().pop().unwrap();
    let outside = world.root.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim.txt"), "untouched").unwrap();
    let outside_s = outside.display().to_string();

    type Make = Box<dyn Fn(&mut Evil)>;
    let cases: Vec<(&str, Make, &str)> = vec![
        (
            "absolute path",
            Box::new({
                let p = format!("{outside_s}/abs.txt");
                move |e: &mut Evil| {
                    e.entry(&p, EntryType::Regular, None, b"x");
                }
            }),
            "absolute path",
        ),
        (
            "dot-dot",
            Box::new(|e: &mut Evil| {
                e.entry(
                    "0/../../../../outside/dotdot.txt",
                    EntryType::Regular,
                    None,
                    b"x",
                );
            }),
            "contains `..`",
        ),
        (
            "symlink escaping, then a file through it",
            Box::new(|e: &mut Evil| {
                e.entry(
                    "0/esc",
                    EntryType::Symlink,
                    Some("../../../../outside"),
                    b"",
                );
                e.entry("0/esc/through.txt", EntryType::Regular, None, b"x");
            }),
            "below a symbolic link",
        ),
        (
            "symlink escaping, alone",
            Box::new(|e: &mut Evil| {
                e.entry(
                    "0/esc",
                    EntryType::Symlink,
                    Some("../../../../outside/victim.txt"),
                    b"",
                );
            }),
            "points outside",
        ),
        (
            "absolute symlink",
            Box::new({
                let p = outside_s.clone();
                move |e: &mut Evil| {
                    e.entry("0/abs", EntryType::Symlink, Some(&p), b"");
                }
            }),
            "points outside",
        ),
        (
            "chained symlinks escaping together",
            Box::new(|e: &mut Evil| {
                e.entry("0/a", EntryType::Directory, None, b"");
                e.entry("0/a/s", EntryType::Symlink, Some(".."), b"");
                e.entry("0/a/l", EntryType::Symlink, Some("s/../victim.txt"), b"");
            }),
            "points outside",
        ),
        (
            "hard link escaping",
            Box::new({
                let p = format!("{outside_s}/victim.txt");
                move |e: &mut Evil| {
                    e.entry("0/hl", EntryType::Link, Some(&p), b"");
                }
            }),
            "hard link",
        ),
        (
            "relative hard link escaping",
            Box::new(|e: &mut Evil| {
                e.entry(
                    "0/hl",
                    EntryType::Link,
                    Some("../../../outside/victim.txt"),
                    b"",
                );
            }),
            "hard link",
        ),
        (
            "device file",
            Box::new(|e: &mut Evil| {
                e.entry("0/null", EntryType::Char, None, b"");
            }),
            "device file",
        ),
        (
            "fifo",
            Box::new(|e: &mut Evil| {
                e.entry("0/pipe", EntryType::Fifo, None, b"");
            }),
            "FIFO",
        ),
        (
            "a member for a path the manifest does not list",
            Box::new(|e: &mut Evil| {
                e.entry("1/other.txt", EntryType::Regular, None, b"x");
            }),
            "does not belong",
        ),
        (
            "duplicate entry",
            Box::new(|e: &mut Evil| {
                e.entry("0/fine.txt", EntryType::Regular, None, b"again");
            }),
            "appears twice",
        ),
    ];
    for (i, (what, make, reason)) in cases.into_iter().enumerate() {
        let mut evil = Evil::new();
        make(&mut evil);
        // Ids sort after the real entry's, so each planted one is newest.
        plant(&world, &template, &evil.finish(), &format!("9{i:019}-1"));
        let job = world.job(Build::Pr(5), &[]);
        job.write("Cargo.lock", "lock v1\n");
        job.write("target/keep.txt", "mine");
        let before = snapshot(world.root.path(), &world.store_path());
        let out =
            fails(&mut job.eph(&["restore", "cargo", "--key-file", "Cargo.lock", "--require"]));
        let err = stderr(&out);
        assert!(err.contains("refused"), "{what}: {err}");
        assert!(err.contains(reason), "{what}: expected {reason:?} in {err}");
        assert_eq!(
            snapshot(world.root.path(), &world.store_path()),
            before,
            "{what} changed files"
        );
        assert!(job.leftovers().is_empty(), "{what}: {:?}", job.leftovers());
        assert!(!job.ws.join("target/fine.txt").exists(), "{what}");
    }
    // A forged manifest may name places outside the anchors, credential
    // stores, or the same place twice: refused before anything is made.
    let forged = [
        (
            serde_json::json!([{"anchor": "workspace", "path": "../../../outside"}]),
            "not a plain relative path",
        ),
        (
            serde_json::json!([{"anchor": "workspace", "path": outside_s}]),
            "not a plain relative path",
        ),
        (
            serde_json::json!([{"anchor": "home", "path": ".ssh"}]),
            "credential store",
        ),
        (
            serde_json::json!([{"anchor": "workspace", "path": "a"}, {"anchor": "workspace", "path": "a/b"}]),
            "overlapping paths",
        ),
    ];
    for (i, (paths, reason)) in forged.into_iter().enumerate() {
        let mut benign = Evil::new();
        benign.entry("1", EntryType::Directory, None, b"");
        plant_with(
            &world,
            &template,
            &benign.finish(),
            &format!("8{i:019}-1"),
            |m| {
                m["paths"] = paths.clone();
            },
        );
        let job = world.job(Build::Pr(5), &[]);
        job.write("Cargo.lock", "lock v1\n");
        let before = snapshot(world.root.path(), &world.store_path());
        let out = job.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
        assert!(stderr(&out).contains(reason), "{reason}: {}", stderr(&out));
        assert_eq!(
            snapshot(world.root.path(), &world.store_path()),
            before,
            "{reason}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("victim.txt")).unwrap(),
        "untouched"
    );
    assert_eq!(files_under(&outside), ["victim.txt"]);
}

#[test]
fn extraction_is_staged_then_swapped_in_replacing_the_old_folder() {
    let world = World::local();
    let a = world.job(Build::Pr(5), &[]);
    a.write("target/new.txt", "new");
    persist_target(&a, "built");

    let b = world.job(Build::Pr(5), &[]);
    b.write("target/stale.txt", "stale");
    b.write("target/sub/old.txt", "old");
    assert_eq!(restore_target(&b).unwrap(), "built");
    assert_eq!(b.read("target/new.txt").unwrap(), "new");
    // Replaced, not merged.
    assert!(b.read("target/stale.txt").is_none());
    assert!(!b.ws.join("target/sub").exists());
    assert!(b.leftovers().is_empty(), "{:?}", b.leftovers());

    // A target that did not exist is created, parents included.
    let c = world.job(Build::Pr(5), &[]);
    assert_eq!(restore_target(&c).unwrap(), "built");

    // An archive refused at its very last entry leaves the old folder as it
    // was: the earlier entries only ever reached the staging folder.
    let template = world.manifests().pop().unwrap();
    let mut evil = Evil::new();
    for i in 0..20 {
        evil.entry(&format!("0/f{i}.txt"), EntryType::Regular, None, b"x");
    }
    evil.entry("0/null", EntryType::Char, None, b"");
    plant(&world, &template, &evil.finish(), "90000000000000000000-1");
    let d = world.job(Build::Pr(5), &[]);
    d.write("target/stale.txt", "stale");
    d.write("Cargo.lock", "lock v1\n");
    let out = d.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(stderr(&out).contains("device file"), "{}", stderr(&out));
    assert_eq!(files_under(&d.ws.join("target")), ["stale.txt"]);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());

    // Missing parent folders made for the staging folder go away again.
    let e = world.job(Build::Pr(5), &[]);
    e.write("deep/er/cache/x", "x");
    e.ok(&["persist", "nested", "deep/er/cache"]);
    let template = world
        .manifests()
        .into_iter()
        .find(|m| m.contains("/entries/nested/"))
        .unwrap();
    let mut evil = Evil::new();
    evil.entry("0/null", EntryType::Char, None, b"");
    plant(&world, &template, &evil.finish(), "90000000000000000000-2");
    let f = world.job(Build::Pr(5), &[]);
    let out = f.run(&["restore", "nested"]);
    assert!(stderr(&out).contains("device file"), "{}", stderr(&out));
    assert!(files_under(&f.ws).is_empty(), "{:?}", files_under(&f.ws));
    assert!(!f.ws.join("deep").exists());
}

#[test]
fn the_default_branch_never_restores_pull_request_entries() {
    let world = World::local();
    persist_target(&world.job(Build::Pr(5), &[]), "from pr");

    // Main restores nothing, whatever is in the store.
    let main = world.job(Build::Main, &[]);
    assert_eq!(restore_target(&main), None);
    let out = main.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(
        stderr(&out).contains("default-branch build"),
        "{}",
        stderr(&out)
    );
    fails(&mut main.eph(&["restore", "cargo", "--key-file", "Cargo.lock", "--require"]));
    // Even allowed to restore trusted seeds, it never reads a PR's scope.
    let trusting = [
        ("DRVKITE_EPHEMERA_SEED", "1"),
        ("DRVKITE_EPHEMERA_TRUSTED_RESTORE", "1"),
    ];
    let main = world.job(Build::Main, &trusting);
    assert_eq!(restore_target(&main), None);
    // A job cannot pick its scope by a flag.
    let out = fails(&mut main.eph(&["restore", "cargo", "--scope", "acme/depot/pr/5"]));
    assert!(stderr(&out).contains("--scope"), "{}", stderr(&out));

    // Main persists nothing by default...
    let out = persist_target(&world.job(Build::Main, &[]), "from main");
    assert!(out.is_empty(), "{out}");
    assert!(world.manifests().iter().all(|m| !m.contains("/trusted/")));
    // ...and writes the trusted seed when the operator turns seeds on.
    persist_target(
        &world.job(Build::Main, &[("DRVKITE_EPHEMERA_SEED", "1")]),
        "seed",
    );
    // A PR with seeds on writes its own scope, never the seed.
    persist_target(
        &world.job(Build::Pr(6), &[("DRVKITE_EPHEMERA_SEED", "1")]),
        "pr 6",
    );
    assert_eq!(
        restore_target(&world.job(Build::Main, &trusting)).unwrap(),
        "seed"
    );
    // A PR without its own entry falls back to the seed only when allowed.
    assert_eq!(restore_target(&world.job(Build::Pr(7), &[])), None);
    let pr7 = world.job(Build::Pr(7), &[("DRVKITE_EPHEMERA_SEED", "1")]);
    assert_eq!(restore_target(&pr7).unwrap(), "seed");
    // Its own entry comes first.
    let pr5 = world.job(Build::Pr(5), &[("DRVKITE_EPHEMERA_SEED", "1")]);
    assert_eq!(restore_target(&pr5).unwrap(), "from pr");
}

#[test]
fn fork_pull_requests_are_isolated() {
    let world = World::local();
    let mallory = Build::Fork(7, "https://github.com/mallory/depot.git");
    let eve = Build::Fork(7, "git@github.com:eve/depot.git");
    persist_target(&world.job(mallory, &[]), "from mallory");
    persist_target(
        &world.job(Build::Main, &[("DRVKITE_EPHEMERA_SEED", "1")]),
        "seed",
    );

    // Same PR number, but the pipeline's own repository: another scope.
    assert_eq!(restore_target(&world.job(Build::Pr(7), &[])), None);
    assert_eq!(restore_target(&world.job(eve, &[])), None);
    // The trusted build never sees it.
    let trusting = [
        ("DRVKITE_EPHEMERA_SEED", "1"),
        ("DRVKITE_EPHEMERA_TRUSTED_RESTORE", "1"),
    ];
    assert_eq!(
        restore_target(&world.job(Build::Main, &trusting)).unwrap(),
        "seed"
    );
    // Forks do not read the seed either, only their own scope.
    let eve_seed = world.job(eve, &[("DRVKITE_EPHEMERA_SEED", "1")]);
    assert_eq!(restore_target(&eve_seed), None);
    assert_eq!(
        restore_target(&world.job(mallory, &[("DRVKITE_EPHEMERA_SEED", "1")])).unwrap(),
        "from mallory"
    );
    // A PR whose source repository is unknown is treated as a fork.
    let unknown = world.job(Build::Pr(7), &[("BUILDKITE_PULL_REQUEST_REPO", "")]);
    let out = unknown.ok(&["show", "cargo"]);
    assert!(out.contains("job scope: acme/depot/fork/"), "{out}");
}

fn sets() -> Vec<EphemeraSet> {
    serde_json::from_value(serde_json::json!([
        { "name": "cargo", "paths": ["target", "cost $5 'x'"], "keyFiles": ["Cargo.lock"] },
        { "name": "home", "paths": ["~/.cache/tool"], "salt": "1" },
    ]))
    .unwrap()
}

/// Run a step command as Buildkite would: uploaded (see
/// `common::upload`), then run by bash (`-e` unless `plain`).
fn run_step(job: &Job, command: &str, errexit: bool) -> Output {
    let interpolated = common::upload::uploaded_text(command).unwrap();
    let mut cmd = job.base(Command::new("bash"));
    if errexit {
        cmd.arg("-e");
    }
    cmd.arg("-c").arg(interpolated).output().unwrap()
}

#[test]
fn a_failing_step_persists_nothing() {
    let world = World::local();
    let failing = [
        (
            "mkdir -p target && echo built > target/out.txt\nfalse",
            false,
        ),
        (
            "mkdir -p target && echo built > target/out.txt\nfalse",
            true,
        ),
        (
            "mkdir -p target && echo built > target/out.txt; exit 3",
            false,
        ),
        ("false\necho never > target/out.txt", true),
    ];
    for (script, errexit) in failing {
        let job = world.job(Build::Pr(5), &[]);
        job.write("Cargo.lock", "lock\n");
        std::fs::create_dir_all(job.ws.join("cost $5 'x'")).unwrap();
        std::fs::create_dir_all(job.home.join(".cache/tool")).unwrap();
        let command = wrap_script(&sets(), script).unwrap();
        let out = run_step(&job, &command, errexit);
        assert!(!out.status.success(), "{script}: {}", stderr(&out));
        if script.contains("exit 3") {
            assert_eq!(out.status.code(), Some(3));
        }
        assert!(world.manifests().is_empty(), "{script} persisted something");
    }
    // The post-command hook's view: a failed command persists nothing.
    let job = world.job(Build::Pr(5), &[("BUILDKITE_COMMAND_EXIT_STATUS", "1")]);
    let out = persist_target(&job, "failed");
    assert!(out.is_empty());
    assert!(world.manifests().is_empty());

    // The same step succeeding persists both sets, odd path names included.
    let job = world.job(Build::Pr(5), &[]);
    job.write("Cargo.lock", "lock\n");
    job.write("cost $5 'x'/price.txt", "5");
    std::fs::create_dir_all(job.home.join(".cache/tool")).unwrap();
    std::fs::write(job.home.join(".cache/tool/state"), "warm").unwrap();
    let command = wrap_script(&sets(), "mkdir -p target && echo built > target/out.txt").unwrap();
    let out = run_step(&job, &command, true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.manifests().len(), 2);

    // The next job's restore lines run before its script.
    let next = world.job(Build::Pr(5), &[]);
    next.write("Cargo.lock", "lock\n");
    let check = "test \"$(cat target/out.txt)\" = built && test -f \"cost \"'$5'\" 'x'/price.txt\" \
                 && test \"$(cat ~/.cache/tool/state)\" = warm && echo restored-first";
    let command = wrap_script(&sets(), check).unwrap();
    let out = run_step(&next, &command, false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored-first"), "{}", stdout(&out));
}

#[test]
fn a_key_file_change_or_invalidate_stops_restores() {
    let world = World::local();
    persist_target(&world.job(Build::Pr(5), &[]), "v1");

    let changed = world.job(Build::Pr(5), &[]);
    changed.write("Cargo.lock", "lock v2\n");
    assert_eq!(restore_target(&changed), None);
    assert_eq!(restore_target(&world.job(Build::Pr(5), &[])).unwrap(), "v1");

    // The salt and the toolchain's drvPath are part of the key too.
    let salted = world.job(Build::Pr(5), &[("DRVKITE_EPHEMERA_SALT", "2")]);
    assert_eq!(restore_target(&salted), None);
    let drv = |d: &str| world.job(Build::Pr(5), &[("DRVKITE_EPHEMERA_KEY_DRV", d)]);
    persist_target(&drv("/nix/store/aaaa-rustc-1.drv"), "rustc 1");
    assert_eq!(restore_target(&drv("/nix/store/bbbb-rustc-2.drv")), None);
    assert_eq!(
        restore_target(&drv("/nix/store/aaaa-rustc-1.drv")).unwrap(),
        "rustc 1"
    );

    // Invalidating one key leaves the others.
    let job = world.job(Build::Pr(5), &[]);
    job.write("Cargo.lock", "lock v1\n");
    let show = job.ok(&["show", "cargo", "--key-file", "Cargo.lock"]);
    let key = show
        .lines()
        .find_map(|l| l.strip_prefix("current key: "))
        .unwrap()
        .to_string();
    job.ok(&["invalidate", "cargo", "--key", &key]);
    assert_eq!(restore_target(&world.job(Build::Pr(5), &[])), None);
    assert_eq!(
        restore_target(&drv("/nix/store/aaaa-rustc-1.drv")).unwrap(),
        "rustc 1"
    );
    // Invalidating the name hides every key; a new persist is used again.
    let out = job.ok(&["invalidate", "cargo"]);
    assert!(out.contains("all keys"), "{out}");
    assert_eq!(restore_target(&drv("/nix/store/aaaa-rustc-1.drv")), None);
    persist_target(&world.job(Build::Pr(5), &[]), "v1 again");
    assert_eq!(
        restore_target(&world.job(Build::Pr(5), &[])).unwrap(),
        "v1 again"
    );
    let listed = job.ok(&["list"]);
    assert!(listed.contains("(invalidated)"), "{listed}");

    // A PR invalidates in its own scope only: the seed stays.
    persist_target(
        &world.job(Build::Main, &[("DRVKITE_EPHEMERA_SEED", "1")]),
        "seed",
    );
    let seeded = [("DRVKITE_EPHEMERA_SEED", "1")];
    world
        .job(Build::Pr(5), &seeded)
        .ok(&["invalidate", "cargo"]);
    assert_eq!(
        restore_target(&world.job(Build::Pr(5), &seeded)).unwrap(),
        "seed"
    );
}

fn persist_noise(
    world: &World,
    build: Build,
    set: &str,
    len: usize,
    extra: &[(&str, &str)],
) -> Output {
    let job = world.job(build, extra);
    let dir = format!("cache-{set}");
    std::fs::create_dir_all(job.ws.join(&dir)).unwrap();
    let seed = set
        .bytes()
        .fold(len as u64, |a, b| a.wrapping_mul(31) + u64::from(b));
    std::fs::write(job.ws.join(&dir).join("blob"), noise(len, seed)).unwrap();
    job.run(&["persist", set, &dir])
}

fn restored(world: &World, build: Build, set: &str, extra: &[(&str, &str)]) -> bool {
    let job = world.job(build, extra);
    job.ok(&["restore", set]);
    job.ws.join(format!("cache-{set}/blob")).exists()
}

#[test]
fn size_caps_refuse_big_entries_and_evict_within_the_scope() {
    let world = World::local();
    // Per entry, compressed.
    let out = persist_noise(
        &world,
        Build::Pr(5),
        "big",
        64 << 10,
        &[("DRVKITE_EPHEMERA_MAX_ENTRY_SIZE", "16KiB")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bigger than --max-entry-size"),
        "{}",
        stderr(&out)
    );
    assert!(files_under(&world.store_path()).is_empty());
    // Per entry, unpacked.
    let out = persist_noise(
        &world,
        Build::Pr(5),
        "big",
        8 << 10,
        &[("DRVKITE_EPHEMERA_MAX_UNPACKED_SIZE", "4KiB")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unpacked size cap"),
        "{}",
        stderr(&out)
    );
    assert!(files_under(&world.store_path()).is_empty());
    // Restores refuse entries over the cap too.
    assert!(
        persist_noise(&world, Build::Pr(5), "big", 64 << 10, &[])
            .status
            .success()
    );
    assert!(!restored(
        &world,
        Build::Pr(5),
        "big",
        &[("DRVKITE_EPHEMERA_MAX_ENTRY_SIZE", "16KiB")]
    ));
    assert!(restored(&world, Build::Pr(5), "big", &[]));

    // Per scope: 3 entries of 40 KiB do not fit in 100 KiB; the least
    // recently used one goes, in this scope only.
    let world = World::local();
    let cap = [("DRVKITE_EPHEMERA_MAX_SCOPE_SIZE", "100KiB")];
    assert!(
        persist_noise(&world, Build::Pr(9), "other", 40 << 10, &cap)
            .status
            .success()
    );
    assert!(
        persist_noise(&world, Build::Pr(5), "a", 40 << 10, &cap)
            .status
            .success()
    );
    assert!(
        persist_noise(&world, Build::Pr(5), "b", 40 << 10, &cap)
            .status
            .success()
    );
    assert!(restored(&world, Build::Pr(5), "a", &cap));
    let out = persist_noise(&world, Build::Pr(5), "c", 40 << 10, &cap);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("evicted b entry"), "{}", stderr(&out));
    assert!(restored(&world, Build::Pr(5), "a", &cap));
    assert!(!restored(&world, Build::Pr(5), "b", &cap));
    assert!(restored(&world, Build::Pr(5), "c", &cap));
    assert!(restored(&world, Build::Pr(9), "other", &cap));
    let blobs = files_under(&world.store_path().join("acme/depot/pr/5/blobs"));
    assert_eq!(blobs.len(), 2, "{blobs:?}");
    // An entry bigger than the whole scope cap is refused.
    let out = persist_noise(&world, Build::Pr(5), "huge", 200 << 10, &cap);
    assert!(
        stderr(&out).contains("more than --max-scope-size"),
        "{}",
        stderr(&out)
    );
}

fn set_mtime(path: &Path, ago: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

#[test]
fn gc_evicts_entries_unused_for_max_age() {
    let world = World::local();
    for set in ["fresh", "stale", "dropped"] {
        assert!(
            persist_noise(&world, Build::Pr(5), set, 1024, &[])
                .status
                .success()
        );
    }
    world.job(Build::Pr(5), &[]).ok(&["invalidate", "dropped"]);
    let store = world.store_path();
    let scope = store.join("acme/depot/pr/5");
    let month = Duration::from_secs(30 * 24 * 3600);
    for marker in files_under(&scope.join("used/stale")) {
        set_mtime(&scope.join("used/stale").join(marker), month);
    }
    // An archive no manifest names: old ones go, recent ones may belong to a
    // persist in progress.
    std::fs::write(
        scope
            .join("blobs")
            .join(format!("{}.tar.zst", "0".repeat(64))),
        "x",
    )
    .unwrap();
    set_mtime(
        &scope
            .join("blobs")
            .join(format!("{}.tar.zst", "0".repeat(64))),
        month,
    );
    std::fs::write(
        scope
            .join("blobs")
            .join(format!("{}.tar.zst", "1".repeat(64))),
        "y",
    )
    .unwrap();
    let before = files_under(&store);

    let job = world.job(Build::Pr(5), &[]);
    let dry = job.ok(&["gc", "--max-age", "7d", "--dry-run"]);
    assert!(dry.contains("would remove 2 entries"), "{dry}");
    assert_eq!(files_under(&store), before);

    let out = job.ok(&["gc", "--max-age", "7d"]);
    assert!(out.contains("removed 2 entries"), "{out}");
    assert!(out.contains("kept 1 entries"), "{out}");
    let after = files_under(&store);
    for gone in [
        "entries/stale/",
        "used/stale/",
        "entries/dropped/",
        "used/dropped/",
    ] {
        assert!(after.iter().all(|f| !f.contains(gone)), "{gone}: {after:?}");
    }
    assert!(!after.iter().any(|f| f.contains(&"0".repeat(64))));
    assert!(after.iter().any(|f| f.contains(&"1".repeat(64))));
    // Only the fresh entry's blob and the young orphan are left.
    assert_eq!(
        after.iter().filter(|f| f.contains("/blobs/")).count(),
        2,
        "{after:?}"
    );
    assert!(restored(&world, Build::Pr(5), "fresh", &[]));
    assert!(!restored(&world, Build::Pr(5), "stale", &[]));
}

#[test]
fn s3_store_round_trip_on_loopback() {
    let Some(moto) = start_moto() else { return };
    let world = World::s3(&moto, "ephemera");

    let a = world.job(Build::Pr(5), &[]);
    // Big enough for a multipart upload.
    std::fs::create_dir_all(a.ws.join("target")).unwrap();
    std::fs::write(a.ws.join("target/big.bin"), noise(12 << 20, 1)).unwrap();
    let out = persist_target(&a, "over s3");
    assert!(
        out.contains("location=s3://ephemera/ci/acme/depot/pr/5/blobs/"),
        "{out}"
    );
    let b = world.job(Build::Pr(5), &[]);
    assert_eq!(restore_target(&b).unwrap(), "over s3");
    assert_eq!(
        std::fs::read(b.ws.join("target/big.bin")).unwrap(),
        noise(12 << 20, 1)
    );
    let again = b.ok(&["persist", "cargo", "target", "--key-file", "Cargo.lock"]);
    assert!(again.contains("unchanged"), "{again}");

    // Isolation holds on S3 too.
    assert_eq!(restore_target(&world.job(Build::Main, &[])), None);
    assert_eq!(restore_target(&world.job(Build::Pr(6), &[])), None);

    let listed = b.ok(&["list"]);
    let entries: Vec<&str> = listed.lines().filter(|l| l.starts_with("acme/")).collect();
    assert_eq!(entries.len(), 1, "{listed}");
    assert!(listed.starts_with("acme/depot/pr/5  cargo"), "{listed}");
    assert!(listed.contains("\n  cargo: exact (entry "), "{listed}");

    b.ok(&["invalidate", "cargo"]);
    assert_eq!(restore_target(&world.job(Build::Pr(5), &[])), None);
    persist_target(&world.job(Build::Pr(5), &[]), "after invalidate");
    assert_eq!(
        restore_target(&world.job(Build::Pr(5), &[])).unwrap(),
        "after invalidate"
    );

    // The bucket itself refuses to replace an object written with create
    // (If-None-Match: *). In-process, so the AWS_* variables the store reads
    // are set for this test process; no other test reads them.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let s3 = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        allow_http: true,
    };
    let store = Store::open("s3://ephemera/immutability", &s3).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        assert!(store.create("m/1.json", b"first".to_vec()).await.unwrap());
        assert!(!store.create("m/1.json", b"second".to_vec()).await.unwrap());
        assert_eq!(store.get("m/1.json").await.unwrap().unwrap(), b"first");
    });

    // gc with a zero age evicts everything; the bucket ends up empty of
    // entries.
    let out = b.ok(&["gc", "--max-age", "0s"]);
    assert!(out.contains("removed 2 entries"), "{out}");
    let json = b.ok(&["list", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        serde_json::json!([])
    );
}
