//! Rule-selected files and warm restores: `persist` with output_rules-style
//! rules, `restore --fallback` within the scopes an exact restore reads,
//! and how `show`, `list` and `--status-file` tell exact, fallback and miss.
//! Every scenario runs on a local store and on a real S3 server (moto).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use common::ephemera::scenarios;
use common::ephemera::*;
use common::fails;

fn files(job: &Job, dir: &str) -> Vec<String> {
    let mut found = files_under(&job.ws.join(dir));
    found.sort();
    found
}

fn rules_pick_files_and_restore_their_folders(world: &World) {
    let a = world.job(Build::Pr(5), &[]);
    for f in [
        "cache/a.o",
        "cache/sub/deep/b.o",
        "cache/sub/c.txt",
        "cache/tmp/scratch",
        "cache/tmp/more/x",
        "logs/run.log",
        "logs/old/run.log",
        "logs/notes.txt",
    ] {
        a.write(f, f);
    }
    let out = a.run(&["persist", "c", "cache/**", "!cache/tmp/**", "logs/*.log"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("paths=cache,logs"),
        "{}",
        stdout(&out)
    );
    // `*.log` in logs/ only: `*` stays in one folder.
    let b = world.job(Build::Pr(5), &[]);
    b.write("cache/stale", "replaced, not merged");
    b.write("logs/stale.txt", "replaced, not merged");
    b.ok(&["restore", "c"]);
    assert_eq!(files(&b, "cache"), ["a.o", "sub/c.txt", "sub/deep/b.o"]);
    assert_eq!(files(&b, "logs"), ["run.log"]);
    assert!(!b.ws.join("cache/tmp").exists());
    let m = world.manifest(&world.manifest_of("c"));
    assert_eq!(
        m["rules"],
        serde_json::json!(["cache/**", "!cache/tmp/**", "logs/*.log"])
    );

    // `=`: a rule that matches nothing fails the persist, and nothing is
    // written.
    let before = world.keys();
    for rules in [
        &["cache/**", "=cache/**/*.rlib"][..],
        &["=missing/**"],
        &["=%missing"],
    ] {
        let mut args = vec!["persist", "d"];
        args.extend(rules);
        let out = fails(&mut a.eph(&args));
        assert!(
            stderr(&out).contains("nothing was persisted"),
            "{rules:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(world.keys(), before);
    a.ok(&["persist", "d", "=cache/**/*.o"]);
    let c = world.job(Build::Pr(5), &[]);
    c.ok(&["restore", "d"]);
    assert_eq!(files(&c, "cache"), ["a.o", "sub/deep/b.o"]);

    // Rules with no folder to start from, or a bad combination, are refused.
    for bad in ["**/*.o", "!=cache", "cache/[a"] {
        let out = fails(&mut a.eph(&["persist", "e", bad]));
        assert!(stderr(&out).contains("rule"), "{bad}: {}", stderr(&out));
    }
}

fn percent_rules_tolerate_files_changing_while_archived(world: &World) {
    let job = world.job(Build::Pr(5), &[]);
    job.write("cache/steady", "steady");
    // Big enough that reading it takes a while; another process keeps
    // appending to it meanwhile.
    std::fs::write(job.ws.join("cache/live.log"), noise(8 << 20, 1)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(job.ws.join("cache/live.log"))
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(b"x").unwrap();
                f.flush().unwrap();
            }
        });
        // Whether the writer gets a turn while a file is read is up to the
        // scheduler: on a busy machine one persist may slip through, so
        // each kind is tried until the change is seen (nearly always at
        // once). Nothing in here may panic before the writer is stopped.
        let attempt = |args: &[&str], seen: &dyn Fn(&std::process::Output) -> bool| {
            (0..20).find_map(|_| {
                let before = world.manifests().len();
                let out = job.run(args);
                seen(&out).then(|| (out, world.manifests().len() - before))
            })
        };
        let strict = attempt(&["persist", "strict", "cache/**"], &|out| {
            !out.status.success()
        });
        let tolerant = attempt(&["persist", "tolerant", "%cache/**"], &|out| {
            stderr(out).contains("left out cache/live.log (changed while archived)")
        });
        stop.store(true, Ordering::Relaxed);
        let (strict, written) = strict.expect("the file never changed while it was archived");
        assert!(
            stderr(&strict).contains("changed while it was archived"),
            "{}",
            stderr(&strict)
        );
        assert_eq!(written, 0, "the failed persist wrote a manifest");
        let (tolerant, _) = tolerant.expect("the file never changed while it was archived");
        assert!(tolerant.status.success(), "{}", stderr(&tolerant));
    });
    let next = world.job(Build::Pr(5), &[]);
    next.ok(&["restore", "tolerant"]);
    assert_eq!(files(&next, "cache"), ["steady"]);
}

/// Persist `target/out.txt` = `content` with Cargo.lock = `lock`.
fn persist_with(job: &Job, lock: &str, content: &str) {
    job.write("Cargo.lock", lock);
    job.write("target/out.txt", content);
    job.ok(&["persist", "cargo", "target", "--key-file", "Cargo.lock"]);
}

/// Restore with Cargo.lock = `lock` and `args`: (out.txt, stdout, status).
fn restore_with(job: &Job, lock: &str, args: &[&str]) -> (Option<String>, String, String) {
    job.write("Cargo.lock", lock);
    let status = job.ws.join("status");
    let status_arg = format!("--status-file={}", status.display());
    let mut all = vec!["restore", "cargo", "--key-file", "Cargo.lock", &status_arg];
    all.extend(args);
    let out = job.ok(&all);
    (
        job.read("target/out.txt"),
        out,
        std::fs::read_to_string(status).unwrap(),
    )
}

fn key_of(world: &World, scope: &str) -> String {
    let m = world
        .manifests()
        .into_iter()
        .find(|m| m.starts_with(scope) && m.contains("/entries/cargo/"))
        .unwrap();
    world.manifest(&m)["key"].as_str().unwrap().to_string()
}

fn fallback_restores_an_older_key_within_the_same_scopes(world: &World) {
    let seed = ("DRVKITE_EPHEMERA_SEED", "1");
    let trusting = [seed, ("DRVKITE_EPHEMERA_TRUSTED_RESTORE", "1")];
    persist_with(&world.job(Build::Main, &[seed]), "v1", "seed v1");
    persist_with(&world.job(Build::Pr(5), &[]), "v1", "pr5 v1");
    let pr5_v1 = key_of(world, "acme/depot/pr/5/");

    // No entry has the new key: a miss without --fallback…
    let job = world.job(Build::Pr(5), &[]);
    let (got, _, status) = restore_with(&job, "v2", &[]);
    assert_eq!((got, status.as_str()), (None, "miss\n"));
    // …the older key's entry with it, and the line says so.
    let (got, line, status) = restore_with(&job, "v2", &["--fallback"]);
    assert_eq!(got.as_deref(), Some("pr5 v1"));
    assert_eq!(status, "fallback\n");
    assert!(
        line.contains("(fallback: no entry has the current key"),
        "{line}"
    );
    assert!(line.contains(&format!("key={pr5_v1}")), "{line}");
    let show = job.ok(&["show", "cargo", "--key-file", "Cargo.lock", "--fallback"]);
    assert!(
        show.contains("a restore would be: fallback (entry "),
        "{show}"
    );
    assert!(
        show.contains("<- restore would use this (fallback)"),
        "{show}"
    );
    let show = job.ok(&["show", "cargo", "--key-file", "Cargo.lock"]);
    assert!(show.contains("a restore would be: miss"), "{show}");
    // The next persist writes the current key; then restores are exact.
    persist_with(&job, "v2", "pr5 v2");
    let next = world.job(Build::Pr(5), &[]);
    let (got, line, status) = restore_with(&next, "v2", &["--fallback"]);
    assert_eq!(got.as_deref(), Some("pr5 v2"));
    assert_eq!(status, "exact\n");
    assert!(line.contains("restored cargo (exact)"), "{line}");
    let show = next.ok(&["show", "cargo", "--key-file", "Cargo.lock"]);
    assert!(show.contains("a restore would be: exact (entry "), "{show}");
    let listed = next.ok(&["list", "--fallback"]);
    assert!(listed.contains("\n  cargo: exact (entry "), "{listed}");
    let json: serde_json::Value =
        serde_json::from_str(&next.ok(&["list", "--json", "--fallback"])).unwrap();
    let marked: Vec<&serde_json::Value> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["restore"] == "exact")
        .collect();
    assert_eq!(marked.len(), 1, "{json:#}");
    assert_eq!(marked[0]["scope"], "acme/depot/pr/5");

    // Never across scopes: another pull request has nothing of its own…
    let other = world.job(Build::Pr(6), &[]);
    let (got, _, status) = restore_with(&other, "v3", &["--fallback"]);
    assert_eq!((got, status.as_str()), (None, "miss\n"));
    let listed = other.ok(&["list", "--fallback"]);
    assert!(!listed.contains("  cargo:"), "{listed}");
    // …falls back to the trusted seed when seeds are on, its own scope first.
    let seeded = world.job(Build::Pr(6), &[seed]);
    let (got, _, status) = restore_with(&seeded, "v3", &["--fallback"]);
    assert_eq!(
        (got.as_deref(), status.as_str()),
        (Some("seed v1"), "fallback\n")
    );
    let own_first = world.job(Build::Pr(5), &[seed]);
    let (got, _, _) = restore_with(&own_first, "v3", &["--fallback"]);
    assert_eq!(got.as_deref(), Some("pr5 v2"));
    // A fork sees only its own scope, seeds or not.
    let fork = world.job(Build::Fork(5, "https://github.com/mallory/depot"), &[seed]);
    let (got, _, status) = restore_with(&fork, "v3", &["--fallback"]);
    assert_eq!((got, status.as_str()), (None, "miss\n"));
    // The default branch: nothing without --trusted-restore, and only the
    // trusted scope with it.
    let main = world.job(Build::Main, &[seed]);
    let (got, _, status) = restore_with(&main, "v3", &["--fallback"]);
    assert_eq!((got, status.as_str()), (None, "miss\n"));
    let main = world.job(Build::Main, &trusting);
    let (got, _, status) = restore_with(&main, "v3", &["--fallback"]);
    assert_eq!(
        (got.as_deref(), status.as_str()),
        (Some("seed v1"), "fallback\n")
    );
    // The variable works as the flag does.
    let by_env = world.job(Build::Pr(5), &[("DRVKITE_EPHEMERA_FALLBACK", "true")]);
    let (got, _, _) = restore_with(&by_env, "v9", &[]);
    assert_eq!(got.as_deref(), Some("pr5 v2"));
    // A new salt still starts afresh.
    let salted = world.job(Build::Pr(5), &[("DRVKITE_EPHEMERA_SALT", "2")]);
    let (got, _, status) = restore_with(&salted, "v2", &["--fallback"]);
    assert_eq!((got, status.as_str()), (None, "miss\n"));
}

scenarios!(
    rules_pick_files_and_restore_their_folders,
    percent_rules_tolerate_files_changing_while_archived,
    fallback_restores_an_older_key_within_the_same_scopes,
);
