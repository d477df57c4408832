//! `--skip-cached` against real binary caches: outputs built by Nix,
//! copied with `nix copy` into caches signed by `nix-store
//! --generate-binary-cache-key` keys, deleted from the local store, and
//! served over HTTP on 127.0.0.1 by Python's http.server (or read through
//! `file://`). Nix's configuration comes in through NIX_CONFIG, as it
//! would on an agent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::schema::{check_references, validate_pipeline};
use common::*;
use serde_json::Value;

/// Targets whose outputs (and so their closures) are copied into the cache:
/// lint's closure holds lib/strings and lib/greeting, server's greeting.
const COPIED: &[&str] = &["tools/lint", "tools/multi:server"];
/// Every output of these is in the cache, and so they are skipped.
const CACHED: &[&str] = &[
    "lib/greeting",
    "lib/strings",
    "tools/lint",
    "tools/multi:server",
];
/// A two-output target of which only `out` is copied: not skipped.
const SPLIT: &str = "tools/split";
/// Built and valid in the local store, in no cache: not skipped.
const LOCAL: &str = "tools/multi:client";

fn nix_command() -> Command {
    let mut cmd = Command::new("nix");
    cmd.args(["--extra-experimental-features", "nix-command"]);
    cmd
}

/// A signing key pair made by Nix: (secret key file, public key).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let (secret, public) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    ok(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&secret)
        .arg(&public));
    (secret, std::fs::read_to_string(public).unwrap())
}

/// The example depot plus a two-output target, its targets instantiated;
/// some built, copied into a signed `file://` cache, and deleted again.
struct Fixture {
    depot: Depot,
    drvs: BTreeMap<String, String>,
    cache: PathBuf,
    public_key: String,
    /// What `nix copy` put in the cache (copied targets' closures, and
    /// tools/split's `out`).
    copied: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let depot = Depot::new();
        depot.write(
            "tools/split.nix",
            "{ ... }:\nderivation {\n  name = \"split\";\n  system = builtins.currentSystem;\n  salt = builtins.readFile ../nix/salt;\n  outputs = [ \"out\" \"doc\" ];\n  builder = \"/bin/sh\";\n  args = [ \"-c\" \"echo split > $out; echo doc > $doc\" ];\n}\n",
        );
        let out = pipeline(&depot, &[]);
        let drvs: BTreeMap<String, String> = read_json(&out.join("drvmap.json"))
            .as_object()
            .unwrap()
            .iter()
            .map(|(l, e)| (l.clone(), e["drvPath"].as_str().unwrap().to_owned()))
            .collect();
        let mut build: Vec<&str> = COPIED.iter().map(|l| drvs[*l].as_str()).collect();
        build.extend([drvs[SPLIT].as_str(), drvs[LOCAL].as_str()]);
        ok(Command::new("nix-store")
            .env("NIX_CONFIG", "substituters =")
            .arg("--realise")
            .args(&build));

        let (secret, public_key) = keypair(depot.tmp.path(), "drvkite-test-1");
        let cache = depot.out("cache");
        let mut copy: Vec<String> = COPIED
            .iter()
            .flat_map(|l| output_paths(&drvs[*l]))
            .collect();
        let split = output_paths(&drvs[SPLIT]);
        let split_out = split.iter().find(|p| !p.ends_with("-doc")).unwrap();
        copy.push(split_out.clone());
        ok(nix_command()
            .env("NIX_CONFIG", "substituters =")
            .arg("copy")
            .arg("--to")
            .arg(format!(
                "file://{}?secret-key={}",
                cache.display(),
                secret.display()
            ))
            .args(&copy));
        let copied = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                let text = std::fs::read_to_string(cache.join(&name)).ok()?;
                name.ends_with(".narinfo").then(|| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("StorePath: "))
                        .unwrap()
                        .to_owned()
                })
            })
            .collect::<Vec<_>>();
        // The cached targets' outputs leave the local store: what counts is
        // the cache, as on an agent that never built them.
        let mut delete: Vec<String> = CACHED
            .iter()
            .flat_map(|l| output_paths(&drvs[*l]))
            .collect();
        delete.extend(split);
        ok(Command::new("nix-store").arg("--delete").args(&delete));
        for p in &delete {
            assert!(!Path::new(p).exists(), "{p} is still in the store");
        }
        Fixture {
            depot,
            drvs,
            cache,
            public_key,
            copied,
        }
    }

    fn config(&self, substituters: &str) -> String {
        format!(
            "substituters = {substituters}\ntrusted-public-keys = {}",
            self.public_key.trim()
        )
    }

    /// `drvkite pipeline --skip-cached` with this NIX_CONFIG.
    fn run(&self, nix_config: &str, args: &[&str]) -> Run {
        let out = self.depot.out("pipeline");
        let output = drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&self.depot.root)
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("NIX_CONFIG", nix_config)
            .env_remove("DRVKITE_SKIP_CACHED")
            .env_remove("DRVKITE_SUBSTITUTERS")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        Run { out, output }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Run {
    out: PathBuf,
    output: Output,
}

impl Run {
    /// The build phase's build steps (not its extra steps).
    fn build_steps(&self) -> Vec<Value> {
        phases(&self.out)
            .remove(0)
            .1
            .into_iter()
            .filter(|s| s["key"].as_str().unwrap_or("").starts_with("drv-"))
            .collect()
    }

    /// Labels of build steps skipped with this reason.
    fn skipped_with(&self, reason: &str) -> BTreeSet<String> {
        self.build_steps()
            .iter()
            .filter(|s| s["skip"] == reason)
            .map(|s| s["env"]["READTREE_TARGET"].as_str().unwrap().to_owned())
            .collect()
    }

    fn skipped(&self) -> BTreeSet<String> {
        self.build_steps()
            .iter()
            .filter(|s| s["skip"] != false)
            .map(|s| s["env"]["READTREE_TARGET"].as_str().unwrap().to_owned())
            .collect()
    }

    fn summary(&self) -> Value {
        read_json(&self.out.join("summary.json"))
    }

    fn warning(&self) -> Option<String> {
        stderr(&self.output)
            .lines()
            .find(|l| l.starts_with("drvkite: warning: --skip-cached"))
            .map(str::to_owned)
    }
}

/// Python's http.server on a free port of 127.0.0.1, serving `dir`;
/// `handler` may replace the request handler class. Stopped on drop.
struct Server {
    child: Child,
    url: String,
}

const SERVE: &str = r#"
import functools, http.server, sys
class Server(http.server.ThreadingHTTPServer):
    # drvkite opens its connections at once: the default backlog of 5
    # would drop connection attempts and make the client wait a second.
    request_queue_size = 128
    daemon_threads = True
Handler = http.server.SimpleHTTPRequestHandler
EXTRA
server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

impl Server {
    fn start(dir: &Path, extra: &str) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SERVE.replace("EXTRA", extra))
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server's port");
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

#[test]
fn exactly_the_cached_targets_are_skipped_and_their_dependents_still_build() {
    let fx = Fixture::new();
    // The fixture copied what it meant to: every output of the cached
    // targets, one of tools/split's two.
    let copied: BTreeSet<&str> = fx.copied.iter().map(String::as_str).collect();
    for l in CACHED {
        for p in output_paths(&fx.drvs[*l]) {
            assert!(copied.contains(p.as_str()), "{l}: {p} not copied");
        }
    }
    let server = Server::start(&fx.cache, "");
    let run = fx.run(&fx.config(&server.url), &["--skip-cached"]);
    let reason = format!("Cached in {}", server.url);
    assert_eq!(
        run.skipped_with(&reason),
        set(CACHED),
        "{}",
        stderr(&run.output)
    );
    assert_eq!(run.skipped(), set(CACHED));
    assert_eq!(run.warning(), None);

    for (_, steps) in phases(&run.out) {
        validate_pipeline(&serde_json::json!({ "steps": steps }));
    }
    let all: Vec<Value> = phases(&run.out).into_iter().flat_map(|(_, s)| s).collect();
    check_references(&all, &[":init:"]);
    // Extra steps follow their target's skip; alwaysRun ones run anyway.
    let extra = |label: &str| {
        all.iter()
            .find(|s| s["label"].as_str().unwrap_or("").contains(label))
            .unwrap_or_else(|| panic!("no step {label}"))
            .clone()
    };
    assert_eq!(
        extra("lint check (from tools/lint)")["skip"],
        reason.as_str()
    );
    assert_eq!(extra("formatting check")["skip"], false);

    let summary = run.summary();
    let cached: BTreeSet<String> = summary["cached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["cache"], server.url.as_str());
            c["label"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(cached, set(CACHED));
    let changed: BTreeSet<String> = summary["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    assert!(changed.is_disjoint(&cached));
    assert!(changed.contains(SPLIT) && changed.contains(LOCAL));
    assert_eq!(summary["unchanged"], 0);
    assert_eq!(summary["cacheCheck"]["caches"][0], server.url.as_str());
    assert_eq!(summary["cacheCheck"]["cached"], CACHED.len());

    // tools/hello's step builds lib/strings' closure from the cache: Nix
    // substitutes what drvkite skipped (its signature shows it came from
    // the cache), so the skip cost nothing.
    let steps = run.build_steps();
    let hello = build_step(&steps, "tools/hello");
    let deps = hello["depends_on"].as_array().unwrap();
    assert!(
        !deps.contains(&build_step(&steps, "lib/strings")["key"]),
        "a skipped target is looked through: {deps:?}"
    );
    let done = run_step(
        &fx.depot.root,
        hello["command"].as_str().unwrap(),
        &[("NIX_CONFIG", &fx.config(&server.url))],
    );
    assert!(done.status.success(), "{}", stderr(&done));
    let strings = output_paths(&fx.drvs["lib/strings"]).remove(0);
    let info: Value = serde_json::from_slice(
        &nix_command()
            .args(["path-info", "--json", &strings])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let sigs = info[0]["signatures"].to_string();
    assert!(sigs.contains("drvkite-test-1:"), "{info}");

    // The annotation counts cached skips apart (no parent map here, so
    // the others are to build, not changed).
    let md = ok(drvkite()
        .args(["annotate", "--dry-run", "--dir"])
        .arg(&run.out));
    assert!(
        md.contains("| targets | to build | cached | extra steps | evaluation |"),
        "{md}"
    );
    assert!(md.contains("**Skipped as cached (4)**"), "{md}");
}

#[test]
fn untrusted_tampered_missing_and_dead_caches_skip_nothing() {
    let fx = Fixture::new();

    // Signed by a key Nix does not trust.
    let server = Server::start(&fx.cache, "");
    let (_, other) = keypair(fx.depot.tmp.path(), "other-1");
    let untrusted = format!(
        "substituters = {}\ntrusted-public-keys = {other}",
        server.url
    );
    let run = fx.run(&untrusted, &["--skip-cached"]);
    assert!(run.skipped().is_empty());
    let warning = run.warning().expect("a warning");
    assert!(warning.contains("bad or missing signatures"), "{warning}");
    drop(server);

    // A narinfo changed after signing: that target alone is built.
    let tampered = fx.depot.out("tampered");
    copy_tree(&fx.cache, &tampered);
    let greeting = output_paths(&fx.drvs["lib/greeting"]).remove(0);
    let hash = &greeting["/nix/store/".len()..][..32];
    let file = tampered.join(format!("{hash}.narinfo"));
    let text = std::fs::read_to_string(&file).unwrap();
    let size = text.lines().find(|l| l.starts_with("NarSize: ")).unwrap();
    std::fs::write(&file, text.replace(size, "NarSize: 4096")).unwrap();
    let server = Server::start(&tampered, "");
    let run = fx.run(&fx.config(&server.url), &["--skip-cached"]);
    let mut expected = set(CACHED);
    expected.remove("lib/greeting");
    assert_eq!(run.skipped(), expected);
    assert!(
        run.warning()
            .unwrap()
            .contains("1 bad or missing signatures")
    );
    drop(server);

    // A cache without these paths: 404s, which are no error.
    let empty = fx.depot.out("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(
        fx.cache.join("nix-cache-info"),
        empty.join("nix-cache-info"),
    )
    .unwrap();
    let server = Server::start(&empty, "");
    let run = fx.run(&fx.config(&server.url), &["--skip-cached"]);
    assert!(run.skipped().is_empty());
    assert_eq!(run.warning(), None);
    drop(server);

    // A server that errs, and one that is gone.
    let erring = Server::start(
        &fx.cache,
        "class Handler(http.server.SimpleHTTPRequestHandler):\n    def do_GET(self):\n        if self.path.endswith('.narinfo'):\n            self.send_error(500)\n        else:\n            super().do_GET()\n",
    );
    let run = fx.run(&fx.config(&erring.url), &["--skip-cached"]);
    assert!(run.skipped().is_empty());
    let warning = run.warning().unwrap();
    assert!(warning.contains("HTTP errors"), "{warning}");
    assert!(
        warning.contains("HTTP 500) and was not asked again"),
        "{warning}"
    );
    let dead = erring.url.clone();
    drop(erring);
    let run = fx.run(&fx.config(&dead), &["--skip-cached"]);
    assert!(run.skipped().is_empty());
    let warning = run.warning().unwrap();
    assert!(
        warning.contains(&format!("substituter {dead} not asked")),
        "{warning}"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn file_caches_every_output_and_the_depot_setting() {
    let fx = Fixture::new();
    let url = format!("file://{}", fx.cache.display());
    // Through --substituters, Nix's own list being empty; the depot's
    // setting turns the check on.
    fx.depot
        .write("ci/drvkite.nix", "{ ... }: { skipCached = true; }\n");
    let run = fx.run(&fx.config(""), &["--substituters", &url]);
    assert_eq!(run.skipped_with(&format!("Cached in {url}")), set(CACHED));
    // --skip-cached=false wins over the depot.
    let run = fx.run(&fx.config(&url), &["--skip-cached=false"]);
    assert!(run.skipped().is_empty());
    assert!(run.summary().get("cacheCheck").is_none());

    // Once both outputs of tools/split are in, it is skipped too.
    let split = output_paths(&fx.drvs[SPLIT]);
    ok(Command::new("nix-store")
        .env("NIX_CONFIG", "substituters =")
        .arg("--realise")
        .arg(&fx.drvs[SPLIT]));
    let (secret, public) = keypair(fx.depot.tmp.path(), "second-1");
    ok(nix_command()
        .env("NIX_CONFIG", "substituters =")
        .arg("copy")
        .arg("--to")
        .arg(format!("{url}?secret-key={}", secret.display()))
        .args(&split));
    // The doc output is signed by the second key only: trusting both keys
    // (as `extra-trusted-public-keys` adds) is what makes it count.
    let run = fx.run(&fx.config(&url), &["--skip-cached"]);
    assert_eq!(run.skipped(), set(CACHED));
    let both = format!("{}\nextra-trusted-public-keys = {public}", fx.config(&url));
    let run = fx.run(&both, &["--skip-cached"]);
    let mut expected = set(CACHED);
    expected.insert(SPLIT.into());
    assert_eq!(run.skipped(), expected);

    // explain agrees, output by output.
    let empty = fx.depot.out("empty-map.json");
    std::fs::write(&empty, "{}").unwrap();
    let explain = |label: &str, nix_config: &str| {
        ok(drvkite()
            .args(["explain", label, "--skip-cached", "--parent-map"])
            .arg(&empty)
            .arg("--depot")
            .arg(&fx.depot.root)
            .env("NIX_CONFIG", nix_config))
    };
    let text = explain(SPLIT, &both);
    assert!(
        text.contains(&format!(
            "{SPLIT} is skipped as cached (--skip-cached): every output is in a binary cache; skip reason \"Cached in {url}\""
        )),
        "{text}"
    );
    let doc = split.iter().find(|p| p.ends_with("-doc")).unwrap();
    let text = explain(SPLIT, &fx.config(&url));
    assert!(text.contains(&format!("{SPLIT} is built")), "{text}");
    assert!(
        text.contains(&format!("doc {doc}: {url}: not signed by a trusted key")),
        "{text}"
    );
}

#[test]
fn netrc_credentials_reach_a_cache_that_wants_them() {
    let fx = Fixture::new();
    let server = Server::start(
        &fx.cache,
        "import base64\nclass Handler(http.server.SimpleHTTPRequestHandler):\n    def do_GET(self):\n        if self.headers.get('Authorization') != 'Basic ' + base64.b64encode(b'ci:s3cret').decode():\n            self.send_error(401)\n        else:\n            super().do_GET()\n",
    );
    let netrc = fx.depot.out("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1\n  login ci\n  password s3cret\n").unwrap();
    let config = format!(
        "{}\nnetrc-file = {}",
        fx.config(&server.url),
        netrc.display()
    );
    let run = fx.run(&config, &["--skip-cached"]);
    assert_eq!(run.skipped(), set(CACHED), "{}", stderr(&run.output));
    // Without them, the cache refuses: nothing skipped, and a warning.
    let run = fx.run(&fx.config(&server.url), &["--skip-cached"]);
    assert!(run.skipped().is_empty());
    assert!(run.warning().unwrap().contains("HTTP 401"));
}
