//! Restores through symbolic links an attacker planted in the checkout
//! (or a careless operator left in the home folder): a manifest's path is
//! judged by where it really leads, not by its spelling. Scenarios run on a
//! local store and on a real S3 server (moto).

mod common;

use common::ephemera::scenarios;
use common::ephemera::*;
use tar::EntryType;

/// One regular file as member 0 (a persisted path that is a file).
fn file_archive(content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "0", content).unwrap();
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

/// The checkout lies in the agent's home and holds `evil -> ../../.ssh`;
/// a pull request's entry names `~/builds/depot/evil/authorized_keys`,
/// and another `~/.cargo/credentials.toml` through `~/.cargo -> ~/.ssh`.
fn credential_stores_are_judged_where_links_lead(world: &World) {
    persist_target(&world.job(Build::Pr(5), &[]), "pr");
    let template = world.manifest_in("acme/depot/pr/5");
    let mut job = world.job(Build::Pr(5), &[]);
    job.ws = job.home.join("builds/depot");
    std::fs::create_dir_all(&job.ws).unwrap();
    job.write_home(".ssh/authorized_keys", "ssh-ed25519 AAAA admin\n");
    std::os::unix::fs::symlink("../../.ssh", job.ws.join("evil")).unwrap();
    std::os::unix::fs::symlink(".ssh", job.home.join(".cargo")).unwrap();
    let blob = file_archive(b"ssh-ed25519 AAAA attacker\n");
    for (i, path) in [
        "builds/depot/evil/authorized_keys",
        ".cargo/authorized_keys",
    ]
    .iter()
    .enumerate()
    {
        world.plant(
            &template,
            "acme/depot/pr/5",
            &blob,
            &format!("9{i:019}-1"),
            |m| m["paths"] = serde_json::json!([{"anchor": "home", "path": path}]),
        );
    }
    restore_target(&job);
    assert_eq!(
        std::fs::read_to_string(job.home.join(".ssh/authorized_keys")).unwrap(),
        "ssh-ed25519 AAAA admin\n",
        "a restore wrote into ~/.ssh"
    );
    assert_eq!(job.read("target/out.txt").unwrap(), "pr");
}

/// A restore that fails for this agent's reasons (a file where a target's
/// folder should be; likewise a full disk) leaves the entry alone: a
/// default-branch job must not invalidate the trusted seed every pull
/// request restores because its own checkout or disk could not take it.
fn a_failure_of_this_agent_is_not_a_broken_entry(world: &World) {
    let seed = [
        ("DRVKITE_EPHEMERA_SEED", "1"),
        ("DRVKITE_EPHEMERA_TRUSTED_RESTORE", "1"),
    ];
    let main = world.job(Build::Main, &seed);
    main.write("Cargo.lock", "lock v1\n");
    main.write("cache/x/f", "seed");
    main.ok(&["persist", "cargo", "cache/x", "--key-file", "Cargo.lock"]);
    let blocked = world.job(Build::Main, &seed);
    blocked.write("Cargo.lock", "lock v1\n");
    blocked.write("cache", "a file where the folder goes");
    let out = blocked.run(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing restored"),
        "{}",
        stderr(&out)
    );
    assert!(
        !world.keys().iter().any(|k| k.contains("/tombstones/")),
        "the seed was invalidated: {}",
        stderr(&out)
    );
    let pr = world.job(Build::Pr(5), &seed[..1]);
    pr.write("Cargo.lock", "lock v1\n");
    pr.ok(&["restore", "cargo", "--key-file", "Cargo.lock"]);
    assert_eq!(pr.read("cache/x/f").unwrap(), "seed");
}

scenarios!(
    credential_stores_are_judged_where_links_lead,
    a_failure_of_this_agent_is_not_a_broken_entry,
);
