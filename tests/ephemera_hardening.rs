//! Ephemera against an attacker who can write any object under their own
//! scope prefix (a pull request's `pr/N`), and against careless use: every
//! scenario runs on a local store and on a real S3 server (moto).

mod common;

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ephemera::scenarios;
use common::ephemera::*;
use common::fails;
use tar::EntryType;

const SEED: [(&str, &str); 1] = [("DRVKITE_EPHEMERA_SEED", "1")];

/// Copy the manifest at `from` unchanged into `scope`, at the place its own
/// name, key and id give (with `id` instead if given): its `scope` field
/// then names where it came from, not where it lies.
fn forge(world: &World, from: &str, scope: &str, id: Option<&str>) -> String {
    let mut m = world.manifest(from);
    if let Some(id) = id {
        m["id"] = id.into();
    }
    let key = format!(
        "{scope}/entries/{}/{}/{}.json",
        m["name"].as_str().unwrap(),
        m["key"].as_str().unwrap(),
        m["id"].as_str().unwrap()
    );
    world.put(&key, &serde_json::to_vec(&m).unwrap());
    key
}

fn forged_manifests_naming_other_scopes_are_refused(world: &World) {
    persist_target(&world.job(Build::Main, &SEED), "seed");
    persist_target(&world.job(Build::Pr(6), &[]), "pr 6 secret");
    let trusted = world.manifest_in("acme/depot/trusted");
    let pr6 = world.manifest_in("acme/depot/pr/6");
    let trusted_before = world.keys_under("acme/depot/trusted/");
    let pr6_before = world.keys_under("acme/depot/pr/6/");

    // Another pull request's files, through a manifest in pr/5 naming pr/6.
    forge(world, &pr6, "acme/depot/pr/5", None);
    // The trusted seed's tombstone, through a broken entry naming trusted:
    // restoring it fails, and the quarantine would tombstone its scope.
    let broken = forge(
        world,
        &trusted,
        "acme/depot/pr/5",
        Some("99999999999999999999-1"),
    );
    let mut m = world.manifest(&broken);
    m["sha256"] = "0".repeat(64).into();
    world.put(&broken, &serde_json::to_vec(&m).unwrap());
    let pr5 = world.job(Build::Pr(5), &[]);
    assert_eq!(restore_target(&pr5), None);
    let out = pr5.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("invalidated"), "{}", stderr(&out));
    assert_eq!(world.keys_under("acme/depot/trusted/"), trusted_before);
    assert_eq!(
        restore_target(&world.job(Build::Pr(7), &SEED)).unwrap(),
        "seed"
    );

    // Eviction and gc, through a copy of the trusted manifest in pr/5: its
    // blob and last-use mark are the trusted entry's.
    forge(world, &trusted, "acme/depot/pr/5", None);
    pr5.ok(&["invalidate", "cargo"]);
    let cap = [("DRVKITE_EPHEMERA_MAX_SCOPE_SIZE", "60KiB")];
    for (i, seed) in [1u64, 2].iter().enumerate() {
        let job = world.job(Build::Pr(5), &cap);
        std::fs::create_dir_all(job.ws.join("big")).unwrap();
        std::fs::write(job.ws.join("big/blob"), noise(40 << 10, *seed)).unwrap();
        let out = job.run(&["persist", "big", "big"]);
        assert!(out.status.success(), "persist {i}: {}", stderr(&out));
    }
    assert_eq!(world.keys_under("acme/depot/trusted/"), trusted_before);
    assert_eq!(world.keys_under("acme/depot/pr/6/"), pr6_before);
    let gc = pr5.run(&["gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(stderr(&gc).contains("skipping"), "{}", stderr(&gc));
    assert!(
        stderr(&gc).contains("but lies in scope acme/depot/pr/5"),
        "{}",
        stderr(&gc)
    );
    assert_eq!(world.keys_under("acme/depot/trusted/"), trusted_before);
    assert_eq!(world.keys_under("acme/depot/pr/6/"), pr6_before);
    assert_eq!(
        restore_target(&world.job(Build::Pr(7), &SEED)).unwrap(),
        "seed"
    );
    assert_eq!(
        restore_target(&world.job(Build::Pr(6), &[])).unwrap(),
        "pr 6 secret"
    );
    // show and list say nothing of the forgeries as entries.
    let listed = pr5.ok(&["list"]);
    assert!(
        !listed
            .lines()
            .any(|l| l.starts_with("acme/depot/pr/5") && l.contains("  cargo  ")),
        "{listed}"
    );
}

const SECRETS: &[&str] = &[
    ".config/gcloud/application_default_credentials.json",
    ".config/gcloud/credentials.db",
    ".config/gcloud/access_tokens.db",
    ".config/containers/auth.json",
    ".config/hub",
    ".config/gh/hosts.yml",
    ".config/pip/pip.conf",
    ".terraform.d/credentials.tfrc.json",
    ".m2/settings.xml",
    ".gradle/gradle.properties",
    ".cargo/config.toml",
    ".cargo/credentials.toml",
    ".docker/config.json",
];

const KEPT: &[&str] = &[
    ".config/nvim/init.lua",
    ".terraform.d/plugins/p/x",
    ".m2/repository/a.jar",
    ".gradle/caches/c",
    ".cargo/registry/index/i",
    ".docker/buildx/instances",
];

fn credentials_never_travel(world: &World) {
    let allow = ("DRVKITE_EPHEMERA_ALLOW_CONFIG_FOLDERS", "1");
    let main = world.job(Build::Main, &[SEED[0], allow]);
    for rel in SECRETS.iter().chain(KEPT) {
        main.write_home(rel, "token = \"s3cr3t\"");
    }
    main.write_home(".azure/msal_token_cache.json", "{}");
    main.write_home(".vault-token", "s.x");
    main.write("web/.yarnrc.yml", "npmAuthToken: x");
    main.write("web/node_modules/m", "m");
    let paths = [
        "~/.config",
        "~/.terraform.d",
        "~/.m2",
        "~/.gradle",
        "~/.cargo",
        "~/.docker",
        "web",
    ];
    // Whole config folders need opting in; credential stores never go.
    let strict = world.job(Build::Main, &SEED);
    std::fs::create_dir_all(strict.home.join(".config/nvim")).unwrap();
    std::fs::create_dir_all(strict.home.join(".local/share/x")).unwrap();
    for path in ["~/.config", "~/.local"] {
        let out = fails(&mut strict.eph(&["persist", "home", path]));
        assert!(
            stderr(&out).contains("--allow-config-folders"),
            "{path}: {}",
            stderr(&out)
        );
    }
    for path in ["~/.azure", "~/.vault-token", "~/.config/gcloud"] {
        let out = fails(&mut main.eph(&["persist", "creds", path]));
        assert!(
            stderr(&out).contains("credential store"),
            "{path}: {}",
            stderr(&out)
        );
    }
    let mut args = vec!["persist", "home"];
    args.extend(paths);
    let out = main.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    for secret in SECRETS {
        // A credential folder is left out whole, and named once.
        let reported = if secret.starts_with(".config/gcloud/") {
            ".config/gcloud"
        } else {
            secret
        };
        assert!(
            stderr(&out).contains(&format!("left out ~/{reported} (credentials of")),
            "{secret} not reported: {}",
            stderr(&out)
        );
    }
    assert!(stderr(&out).contains("left out web/.yarnrc.yml"));

    let pr = world.job(Build::Pr(5), &[SEED[0], allow]);
    pr.ok(&["restore", "home"]);
    for kept in KEPT {
        assert!(pr.home.join(kept).is_file(), "{kept} was not restored");
    }
    assert!(pr.ws.join("web/node_modules/m").is_file());
    for secret in SECRETS {
        assert!(!pr.home.join(secret).exists(), "{secret} was restored");
    }
    assert!(!pr.ws.join("web/.yarnrc.yml").exists());
    // Without the opt-in, a restore does not replace a whole config folder.
    let shy = world.job(Build::Pr(5), &SEED);
    let out = shy.run(&["restore", "home"]);
    assert!(
        stderr(&out).contains("--allow-config-folders"),
        "{}",
        stderr(&out)
    );
    assert!(!shy.home.join(".config").exists());

    // An archive carrying credential files under innocent paths.
    let docker = world.job(Build::Pr(5), &[]);
    docker.write_home(".docker/buildx/instances", "b");
    docker.ok(&["persist", "docker", "~/.docker"]);
    let template = world.manifest_of("docker");
    let mut evil = Evil::empty();
    evil.entry("0", EntryType::Directory, None, b"");
    evil.entry("0/config.json", EntryType::Regular, None, b"{\"auths\":{}}");
    evil.entry("0/buildx", EntryType::Directory, None, b"");
    evil.entry("0/buildx/instances", EntryType::Regular, None, b"planted");
    world.plant(
        &template,
        "acme/depot/pr/5",
        &evil.finish(),
        "90000000000000000000-1",
        |_| {},
    );
    let victim = world.job(Build::Pr(5), &[]);
    let out = victim.run(&["restore", "docker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("left out ~/.docker/config.json (credentials of Docker)"),
        "{}",
        stderr(&out)
    );
    assert!(!victim.home.join(".docker/config.json").exists());
    assert_eq!(
        std::fs::read_to_string(victim.home.join(".docker/buildx/instances")).unwrap(),
        "planted"
    );
}

fn places_are_never_persisted_or_restored(world: &World) {
    let job = world.job(Build::Pr(5), &[]);
    let git = Command::new("git")
        .args(["init", "-q"])
        .current_dir(&job.ws)
        .status()
        .unwrap();
    assert!(git.success());
    for path in [".git", ".git/hooks"] {
        let out = fails(&mut job.eph(&["persist", "git", path]));
        assert!(
            stderr(&out).contains("the checkout's git folder"),
            "{path}: {}",
            stderr(&out)
        );
    }
    // The agent's folders: hooks, and builds of other pipelines.
    let agent = job.ws.parent().unwrap().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(agent.join("hooks")).unwrap();
    std::fs::create_dir_all(agent.join("builds/other")).unwrap();
    let hooks = agent.join("hooks").display().to_string();
    let builds = agent.join("builds").display().to_string();
    let mut roaming = world.job(
        Build::Pr(5),
        &[
            ("BUILDKITE_HOOKS_PATH", &hooks),
            ("BUILDKITE_BUILD_PATH", &builds),
        ],
    );
    roaming.ws = job.ws.clone();
    roaming.home = agent.clone();
    for (path, what) in [
        ("~/hooks", "BUILDKITE_HOOKS_PATH"),
        ("~/builds/other", "BUILDKITE_BUILD_PATH"),
        ("~/builds", "contains"),
    ] {
        let out = fails(&mut roaming.eph(&["persist", "agent", path]));
        assert!(stderr(&out).contains(what), "{path}: {}", stderr(&out));
    }
    roaming.write("target/x", "x");
    roaming.ok(&["persist", "fine", "target"]);

    // A manifest naming the git folder is refused on restore.
    let template = world.manifest_of("fine");
    let mut evil = Evil::empty();
    evil.entry("0", EntryType::Directory, None, b"");
    evil.entry("0/post-checkout", EntryType::Regular, None, b"#!/bin/sh\n");
    world.plant(
        &template,
        "acme/depot/pr/5",
        &evil.finish(),
        "90000000000000000000-1",
        |m| m["paths"] = serde_json::json!([{"anchor": "workspace", "path": ".git/hooks"}]),
    );
    let out = job.run(&["restore", "fine"]);
    assert!(
        stderr(&out).contains("the checkout's git folder"),
        "{}",
        stderr(&out)
    );
    assert!(!job.ws.join(".git/hooks/post-checkout").exists());

    // The store itself, inside a persisted or restored folder.
    if world.is_local() {
        let mut keeper = world.job(Build::Pr(5), &[]);
        keeper.home = world.root.path().to_path_buf();
        let out = fails(&mut keeper.eph(&["persist", "store", "~"]));
        assert!(stderr(&out).contains("whole home"), "{}", stderr(&out));
        let out = fails(&mut keeper.eph(&["persist", "store", "~/store"]));
        assert!(
            stderr(&out).contains("the ephemera store"),
            "{}",
            stderr(&out)
        );
        let before = world.keys();
        let mut benign = Evil::empty();
        benign.entry("0", EntryType::Directory, None, b"");
        world.plant(
            &template,
            "acme/depot/pr/5",
            &benign.finish(),
            "90000000000000000000-2",
            |m| m["paths"] = serde_json::json!([{"anchor": "home", "path": "store"}]),
        );
        let out = keeper.run(&["restore", "fine"]);
        assert!(
            stderr(&out).contains("the ephemera store"),
            "{}",
            stderr(&out)
        );
        let after = world.keys();
        for key in before {
            assert!(after.contains(&key), "{key} is gone from the store");
        }
    }
}

/// A tar stream with a header of `kind` declaring `size` bytes, followed by
/// that many bytes of `fill`, compressed: tiny, whatever `size` is.
fn declaring(kind: u8, size: u64, fill: u8) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(EntryType::new(kind));
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    let mut z = zstd::Encoder::new(Vec::new(), 3).unwrap();
    z.write_all(h.as_bytes()).unwrap();
    let chunk = vec![fill; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        z.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    z.write_all(&[0; 1024]).unwrap();
    z.finish().unwrap()
}

/// `members` files `depth` folders deep, with GNU long names.
fn deep(members: usize, depth: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = format!("0{}", "/d".repeat(depth));
    for i in 0..members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("{dir}/f{i}"), std::io::empty())
            .unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 9).unwrap()
}

fn hostile_archives_restore_in_bounded_memory(world: &World) {
    persist_target(&world.job(Build::Pr(5), &[]), "good");
    let template = world.manifest_in("acme/depot/pr/5");
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "a pax header declaring 1 GiB",
            declaring(b'x', 1 << 30, b'a'),
            Some("pax"),
        ),
        (
            "a GNU long name of 32 MiB",
            declaring(b'L', 32 << 20, b'a'),
            Some("long name of 33554432 bytes"),
        ),
        (
            "8,000 members 1,900 folders deep",
            deep(8000, 1900),
            Some("deeper than"),
        ),
        ("6,000 members 250 folders deep", deep(6000, 250), None),
    ];
    for (i, (what, blob, refusal)) in cases.into_iter().enumerate() {
        assert!(blob.len() < 160_000, "{what}: {} bytes", blob.len());
        world.plant(
            &template,
            "acme/depot/pr/5",
            &blob,
            &format!("9{i:019}-1"),
            |_| {},
        );
        let job = world.job(Build::Pr(5), &[]);
        job.write("Cargo.lock", "lock v1\n");
        let (out, peak_kib) =
            run_measured(&mut job.eph(&["restore", "cargo", "--key-file", "Cargo.lock"]));
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert!(
            peak_kib < 64 << 10,
            "{what}: restoring took {peak_kib} KiB at its peak: {}",
            stderr(&out)
        );
        assert!(
            out.stderr.len() < 4096,
            "{what}: {} bytes of messages",
            out.stderr.len()
        );
        match refusal {
            Some(reason) => {
                assert!(stderr(&out).contains(reason), "{what}: {}", stderr(&out));
                assert!(stderr(&out).contains("refused"), "{what}: {}", stderr(&out));
            }
            None => assert!(stdout(&out).contains("restored cargo"), "{what}"),
        }
    }
}

const FILES: usize = 8;

/// Persist a `target/` whose files all say `generation`, and some noise.
fn persist_generation(
    world: &World,
    extra: &[(&str, &str)],
    generation: &str,
    seed: u64,
) -> std::process::Output {
    let job = world.job(Build::Pr(5), extra);
    job.write("Cargo.lock", "lock v1\n");
    for f in 0..FILES {
        job.write(&format!("target/f{f}"), generation);
    }
    std::fs::write(job.ws.join("target/pad"), noise(8 << 10, seed)).unwrap();
    job.run(&["persist", "cargo", "target", "--key-file", "Cargo.lock"])
}

fn concurrent_jobs_in_one_scope(world: &World) {
    // A few seconds, and a few runs of each kind however busy the machine.
    let until = Instant::now() + Duration::from_secs(4);
    let cap = [("DRVKITE_EPHEMERA_MAX_SCOPE_SIZE", "40KiB")];
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let restored = std::sync::atomic::AtomicUsize::new(0);
    let first = persist_generation(world, &[], "first", 0);
    assert!(first.status.success(), "{}", stderr(&first));
    let template = world.manifest_in("acme/depot/pr/5");
    let count = if world.is_local() { 1000 } else { 50 };
    std::thread::scope(|s| {
        for part in 0..2 {
            let template = &template;
            s.spawn(move || churn(world, template, part, count, until));
        }
        for w in 0..2u64 {
            let (runs, cap) = (&runs, &cap);
            s.spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until || n < 3 {
                    n += 1;
                    let out = persist_generation(world, cap, &format!("{w} {n}"), w * 1000 + n);
                    assert!(out.status.success(), "persist: {}", stderr(&out));
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        for _ in 0..2 {
            let (runs, restored) = (&runs, &restored);
            s.spawn(move || {
                let mut n = 0;
                while Instant::now() < until || n < 3 {
                    n += 1;
                    let job = world.job(Build::Pr(5), &[]);
                    job.write("Cargo.lock", "lock v1\n");
                    let out = job.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
                    assert!(out.status.success(), "restore: {}", stderr(&out));
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !job.ws.join("target").exists() {
                        continue;
                    }
                    let contents: Vec<Option<String>> = (0..FILES)
                        .map(|f| job.read(&format!("target/f{f}")))
                        .collect();
                    assert!(
                        contents[0].is_some() && contents.iter().all(|c| *c == contents[0]),
                        "a mixed tree: {contents:?}"
                    );
                    assert!(job.leftovers().is_empty(), "{:?}", job.leftovers());
                    restored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        // Admin gc, and jobs that only look: they list the most.
        let looking: [&[&str]; 7] = [
            &["gc", "--max-age", "0s"],
            &["gc", "--max-age", "1s"],
            &["list"],
            &["list"],
            &["list", "--json"],
            &["show", "cargo"],
            &["show", "cargo"],
        ];
        for args in looking {
            let runs = &runs;
            s.spawn(move || {
                let mut n = 0;
                while Instant::now() < until || n < 3 {
                    n += 1;
                    let out = world.job(Build::Pr(5), &[]).run(args);
                    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let (runs, restored) = (runs.into_inner(), restored.into_inner());
    eprintln!("{runs} jobs, {restored} restores with a tree");
}

/// Keep writing `count` valid (old, so tried last) entries next to the
/// manifest at `template` until `until`: objects appearing and, with gc
/// running, vanishing while other jobs list the scope.
fn churn(world: &World, template: &str, part: usize, count: usize, until: Instant) {
    let m = world.manifest(template);
    let (name, key) = (m["name"].as_str().unwrap(), m["key"].as_str().unwrap());
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        for i in 0..count {
            let id = format!("{:020}-{round}", part * count + i + 1);
            let mut copy = m.clone();
            copy["id"] = id.clone().into();
            let entry = format!("acme/depot/pr/5/entries/{name}/{key}/{id}.json");
            world.put(&entry, &serde_json::to_vec(&copy).unwrap());
            world.put(&format!("acme/depot/pr/5/used/{name}/{key}/{id}"), b"x");
        }
    }
}

fn odd_keys_do_not_break_listing(world: &World) {
    persist_target(&world.job(Build::Pr(6), &[]), "fine");
    let mut odd: Vec<String> = vec!["acme/depot/pr/5/entries/cargo/k/\u{1}.json".into()];
    if world.is_local() {
        odd.push("acme/depot/pr/5/used/cargo/k/x\ny".into());
    } else {
        odd.extend(
            [
                "acme/depot/pr/5//x",
                "acme/depot/pr/5/../x",
                "acme/depot/pr/5/./x",
                "acme/depot/pr/5/blobs/a\\b.tar.zst",
            ]
            .map(String::from),
        );
    }
    for key in &odd {
        world.put(key, b"x");
    }
    if let Raw::Local(dir) = &world.raw {
        let name = std::ffi::OsStr::from_bytes(b"\xff\xfe.json");
        let p = dir.join("acme/depot/pr/5/entries/cargo/k").join(name);
        std::fs::write(p, "x").unwrap();
    }
    let job = world.job(Build::Pr(6), &[]);
    let out = job.run(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("acme/depot/pr/6  cargo"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("warning: skipping"),
        "{}",
        stderr(&out)
    );
    for args in [&["list", "--json"][..], &["gc"], &["gc", "--dry-run"]] {
        let out = job.run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let pr5 = world.job(Build::Pr(5), &[]);
    pr5.write("Cargo.lock", "lock v1\n");
    let out = pr5.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        restore_target(&world.job(Build::Pr(6), &[])).unwrap(),
        "fine"
    );
    persist_target(&world.job(Build::Pr(5), &[]), "pr 5 goes on");
}

fn tags_are_never_the_default_branch(world: &World) {
    let trusting = [
        ("DRVKITE_EPHEMERA_SEED", "1"),
        ("DRVKITE_EPHEMERA_TRUSTED_RESTORE", "1"),
    ];
    let tag = [trusting[0], trusting[1], ("BUILDKITE_TAG", "main")];
    let out = persist_target(&world.job(Build::Main, &tag), "from a tag");
    assert!(out.contains("scope=acme/depot/tag/main"), "{out}");
    assert!(world.keys().iter().all(|k| !k.contains("/trusted/")));
    assert_eq!(restore_target(&world.job(Build::Pr(5), &SEED)), None);
    assert_eq!(restore_target(&world.job(Build::Main, &trusting)), None);
    assert_eq!(
        restore_target(&world.job(Build::Main, &tag)).unwrap(),
        "from a tag"
    );
}

fn overstated_sizes_are_refused(world: &World) {
    persist_target(&world.job(Build::Pr(5), &[]), "good");
    let template = world.manifest_in("acme/depot/pr/5");
    let mut planted = Evil::new();
    planted.entry("0/out.txt", EntryType::Regular, None, b"planted");
    world.plant(
        &template,
        "acme/depot/pr/5",
        &planted.finish(),
        "90000000000000000000-1",
        |m| m["size"] = (m["size"].as_u64().unwrap() + 1000).into(),
    );
    let job = world.job(Build::Pr(5), &[]);
    job.write("Cargo.lock", "lock v1\n");
    let out = job.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(
        stderr(&out).contains("but its manifest says"),
        "{}",
        stderr(&out)
    );
    assert_eq!(job.read("target/out.txt").unwrap(), "good");
}

/// What a restore killed between moving `name` aside and renaming the new
/// one in leaves: `name` missing, its contents in a staging folder.
fn half_swapped(dir: &Path, name: &str, content: &str) {
    let staging = dir.join(".drvkite-ephemera-killed");
    std::fs::create_dir_all(staging.join("old")).unwrap();
    std::fs::write(staging.join("old/out.txt"), content).unwrap();
    std::fs::write(staging.join("target"), name).unwrap();
    assert!(!dir.join(name).exists());
}

fn interrupted_swaps_are_recovered(world: &World) {
    persist_target(&world.job(Build::Pr(5), &[]), "v1");
    let b = world.job(Build::Pr(5), &[]);
    half_swapped(&b.ws, "target", "old");
    assert_eq!(restore_target(&b).unwrap(), "v1");
    assert!(b.leftovers().is_empty(), "{:?}", b.leftovers());

    let c = world.job(Build::Pr(5), &[]);
    half_swapped(&c.ws, "target", "mine");
    c.write("Cargo.lock", "lock v1\n");
    let out = c.ok(&["persist", "cargo", "target", "--key-file", "Cargo.lock"]);
    assert!(out.contains("persisted cargo"), "{out}");
    assert_eq!(c.read("target/out.txt").unwrap(), "mine");
    assert!(c.leftovers().is_empty(), "{:?}", c.leftovers());
    assert_eq!(
        restore_target(&world.job(Build::Pr(5), &[])).unwrap(),
        "mine"
    );
}

fn trailing_slashes_do_not_follow_links(world: &World) {
    let job = world.job(Build::Pr(5), &[]);
    job.write("real/x", "x");
    std::os::unix::fs::symlink("real", job.ws.join("link")).unwrap();
    for arg in ["link/", "link//", "./link/."] {
        let out = fails(&mut job.eph(&["persist", "l", arg]));
        assert!(
            stderr(&out).contains("is a symbolic link"),
            "{arg}: {}",
            stderr(&out)
        );
    }
    assert!(world.manifests().is_empty());
}

/// A careless `DRVKITE_EPHEMERA_STORE=cache/ephemera` (relative to the
/// checkout) is still the store: persisting `cache` would archive every
/// scope's entries, and restoring it would delete them all.
#[test]
fn a_relative_store_is_never_persisted_or_restored_over() {
    let world = World::local();
    let relative = [("DRVKITE_EPHEMERA_STORE", "cache/ephemera")];
    let main = world.job(Build::Main, &[SEED[0], relative[0]]);
    main.write("cache/f", "x");
    let out = fails(&mut main.eph(&["persist", "c", "cache"]));
    assert!(
        stderr(&out).contains("contains the ephemera store"),
        "{}",
        stderr(&out)
    );
    // A pull request on the same checkout, whose entry names `cache`.
    let mut pr = world.job(Build::Pr(5), &relative);
    pr.ws = main.ws.clone();
    persist_target(&pr, "pr");
    let store = main.ws.join("cache/ephemera");
    let raw = World {
        root: tempfile::tempdir().unwrap(),
        store: store.display().to_string(),
        extra: vec![],
        raw: Raw::Local(store.clone()),
    };
    let template = raw.manifest_in("acme/depot/pr/5");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_mode(0o755);
    b.append_data(&mut h, "0", std::io::empty()).unwrap();
    let blob = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
    raw.plant(
        &template,
        "acme/depot/pr/5",
        &blob,
        "90000000000000000001-1",
        |m| {
            m["paths"] = serde_json::json!([{"anchor": "workspace", "path": "cache"}]);
        },
    );
    let before = files_under(&store).len();
    let out = pr.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(
        stderr(&out).contains("contains the ephemera store"),
        "{}",
        stderr(&out)
    );
    assert!(
        files_under(&store).len() >= before,
        "the store was replaced"
    );
}

scenarios!(
    forged_manifests_naming_other_scopes_are_refused,
    credentials_never_travel,
    places_are_never_persisted_or_restored,
    hostile_archives_restore_in_bounded_memory,
    concurrent_jobs_in_one_scope,
    odd_keys_do_not_break_listing,
    tags_are_never_the_default_branch,
    overstated_sizes_are_refused,
    interrupted_swaps_are_recovered,
    trailing_slashes_do_not_follow_links,
);
