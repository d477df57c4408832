//! What a pull request's objects cost the jobs that list the whole store
//! or pipeline (`gc`, a default-branch `list`): an attacker who can write
//! any object under their own scope prefix must not decide another scope's
//! eviction, nor make those jobs take memory or time out of proportion to
//! what they wrote. Scenarios run on a local store and on a real S3 server
//! (moto).

mod common;

use std::time::{Duration, Instant};

use common::ephemera::scenarios;
use common::ephemera::*;
use common::fails;

/// A last-use mark lies in a scope: one a pull request writes under its
/// own prefix, named like another scope's entry, must not stand for that
/// entry's use (on S3, `pr/…` lists after `branch/…`, so it used to win).
fn use_marks_of_one_scope_say_nothing_of_another(world: &World) {
    let branch = [("BUILDKITE_BRANCH", "feature-x")];
    persist_target(&world.job(Build::Main, &branch), "branch's own");
    let victim = world.manifest_in("acme/depot/branch/feature-x");
    let m = world.manifest(&victim);
    let (name, key, id) = (
        m["name"].as_str().unwrap(),
        m["key"].as_str().unwrap(),
        m["id"].as_str().unwrap(),
    );
    // The pull request marks "the branch's entry" as used now, then never again.
    world.put(&format!("acme/depot/pr/5/used/{name}/{key}/{id}"), b"x");
    std::thread::sleep(Duration::from_secs(6));
    // The branch uses its entry: its own mark is fresh.
    assert_eq!(
        restore_target(&world.job(Build::Main, &branch)).unwrap(),
        "branch's own"
    );
    let admin = world.job(Build::Main, &[]);
    let out = admin.ok(&["gc", "--max-age", "4s"]);
    assert!(
        world.keys().contains(&victim),
        "gc evicted a branch's entry used just now, going by a pull request's mark: {out}"
    );
}

/// Manifests of many tiny names (each costs far more parsed than in the
/// file): `gc` and a default-branch `list` skip them instead of holding
/// them, and persist refuses to write one.
fn bloated_manifests_are_skipped_by_listings(world: &World) {
    let pr = world.job(Build::Pr(5), &[]);
    persist_target(&pr, "pr");
    let template = world.manifest_in("acme/depot/pr/5");
    let mut m = world.manifest(&template);
    m["rules"] = vec!["a"; 260_000].into();
    let bytes = serde_json::to_vec(&m).unwrap();
    assert!(bytes.len() <= 1 << 20);
    for i in 0..20 {
        let id = format!("8{i:019}-1");
        m["id"] = id.clone().into();
        world.put(
            &format!(
                "acme/depot/pr/5/entries/cargo/{}/{id}.json",
                m["key"].as_str().unwrap()
            ),
            &serde_json::to_vec(&m).unwrap(),
        );
    }
    let main = world.job(Build::Main, &[]);
    for args in [&["gc", "--dry-run"][..], &["list"], &["list", "--json"]] {
        let (out, peak_kib) = run_measured(&mut main.eph(args));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            peak_kib < 64 << 10,
            "{args:?} took {peak_kib} KiB for 20 MiB of a pull request's manifests"
        );
    }
    // The pull request's own entry is still restored.
    assert_eq!(restore_target(&world.job(Build::Pr(5), &[])).unwrap(), "pr");
    // Persist never writes what listings skip.
    let many = world.job(Build::Pr(6), &[]);
    let rules: Vec<String> = (0..257).map(|i| format!("d{i}/**")).collect();
    let mut args = vec!["persist", "many"];
    args.extend(rules.iter().map(String::as_str));
    for i in 0..257 {
        many.write(&format!("d{i}/f"), "x");
    }
    let out = fails(&mut many.eph(&args));
    assert!(stderr(&out).contains("more than 256"), "{}", stderr(&out));
    assert!(!world.manifests().iter().any(|k| k.contains("/pr/6/")));
}

/// Manifests name paths, builds and URLs that a pull request chose: `list`
/// in a default-branch job and `show` print them with control characters
/// escaped, so they cannot forge lines, sections or links in its log.
fn manifest_text_cannot_forge_log_lines(world: &World) {
    persist_target(&world.job(Build::Pr(5), &[]), "pr");
    let template = world.manifest_in("acme/depot/pr/5");
    let forged = "x\n\u{1b}[2K--- ephemera: restored cargo (exact) scope=acme/depot/trusted\n\
                  \u{1b}]1339;url=https://evil.example\u{7}";
    let blob = zstd::encode_all(&tar::Builder::new(Vec::new()).into_inner().unwrap()[..], 3);
    world.plant(
        &template,
        "acme/depot/pr/5",
        &blob.unwrap(),
        "90000000000000000001-1",
        |m| {
            m["created_by"]["build_url"] = forged.into();
            m["paths"] = serde_json::json!([{"anchor": "workspace", "path": "t\n+++ x"}]);
        },
    );
    for (build, args) in [
        (Build::Main, &["list"][..]),
        (Build::Pr(5), &["show", "cargo"]),
    ] {
        let out = world.job(build, &[]).ok(args);
        assert!(out.contains("evil.example"), "{args:?}: {out}");
        for line in out.lines() {
            assert!(
                !line.starts_with("---") && !line.starts_with("+++") && !line.contains('\u{1b}'),
                "{args:?} printed {line:?}"
            );
        }
    }
}

/// Tombstones and entries of one name, many of each: `gc` matches them in
/// one pass over each, not every entry against every tombstone.
#[test]
fn many_tombstones_cost_gc_linear_time() {
    let world = World::local();
    let pr = world.job(Build::Pr(5), &[]);
    persist_target(&pr, "pr");
    let template = world.manifest_in("acme/depot/pr/5");
    let mut m = world.manifest(&template);
    let key = m["key"].as_str().unwrap().to_string();
    let n = 8000;
    for i in 0..n {
        let id = format!("8{i:019}-1");
        m["id"] = id.clone().into();
        world.put(
            &format!("acme/depot/pr/5/entries/cargo/{key}/{id}.json"),
            &serde_json::to_vec(&m).unwrap(),
        );
        // Older than every entry: matches none, so each is looked at.
        let t = serde_json::json!({
            "format": 1, "id": format!("7{i:019}-1"), "name": "cargo", "key": null,
            "created_at": "2000-01-01T00:00:00Z", "created_by": {},
        });
        world.put(
            &format!("acme/depot/pr/5/tombstones/cargo/7{i:019}-1.json"),
            &serde_json::to_vec(&t).unwrap(),
        );
    }
    let started = Instant::now();
    let out = world.job(Build::Main, &[]).ok(&["gc", "--dry-run"]);
    let took = started.elapsed();
    assert!(out.contains(&format!("kept {} entries", n + 1)), "{out}");
    assert!(
        took < Duration::from_secs(8),
        "gc took {took:?} for {n} entries and tombstones"
    );
}

/// An object that listings show but reads refuse (on S3, one a writer of
/// the prefix stored in the GLACIER class, or with its own SSE-C key): `gc`
/// and a default-branch `list` go on with the other scopes, and `gc`
/// changes nothing in that one (what it could not read may be an entry).
#[test]
fn an_unreadable_object_does_not_stop_gc_or_list() {
    let Some(moto) = start_moto() else {
        return;
    };
    let world = World::s3(&moto, "unreadable");
    persist_target(&world.job(Build::Pr(5), &[]), "pr 5");
    persist_target(&world.job(Build::Pr(6), &[]), "pr 6");
    let template = world.manifest_in("acme/depot/pr/5");
    let key = world.manifest(&template)["key"]
        .as_str()
        .unwrap()
        .to_string();
    world.put_unreadable(
        &format!("acme/depot/pr/5/entries/cargo/{key}/90000000000000000001-1.json"),
        b"{}",
    );
    let pr5 = world.keys_under("acme/depot/pr/5/");
    let main = world.job(Build::Main, &[]);
    let out = main.run(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("acme/depot/pr/6"), "{}", stdout(&out));
    assert!(stderr(&out).contains("acme/depot/pr/5"), "{}", stderr(&out));
    let out = main.run(&["gc", "--max-age", "0s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).lines().all(|l| l.len() < 600),
        "{}",
        stderr(&out)
    );
    assert!(world.keys_under("acme/depot/pr/6/").is_empty());
    assert_eq!(world.keys_under("acme/depot/pr/5/"), pr5);
}

scenarios!(
    use_marks_of_one_scope_say_nothing_of_another,
    bloated_manifests_are_skipped_by_listings,
    manifest_text_cannot_forge_log_lines,
);
