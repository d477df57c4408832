//! The Buildkite integration against stand-ins for the Buildkite service: a
//! fake `buildkite-agent` on PATH that records its arguments, and a local
//! HTTP server on 127.0.0.1 answering like Buildkite's GraphQL API and
//! artifact storage. Git history is real.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::schema::{pipeline_errors, read_pipeline_file, validate_pipeline};
use common::*;
use serde_json::{Value, json};

/// The drvkite binary with no Buildkite settings or proxies inherited from
/// the machine running the tests (which may itself be a Buildkite agent).
fn bk() -> Command {
    let mut cmd = drvkite();
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("BUILDKITE")
            || k.starts_with("DRVKITE")
            || k.to_lowercase().ends_with("_proxy")
        {
            cmd.env_remove(&*k);
        }
    }
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------
// A pipeline folder as `drvkite pipeline --out` writes it.

fn drv(n: usize, name: &str) -> String {
    format!("/nix/store/{n:0>32}-{name}.drv")
}

fn drvmap_json(labels: &[&str], salt: usize) -> String {
    let map: BTreeMap<&str, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let attr: Vec<&str> = l.split(['/', ':']).collect();
            (
                *l,
                json!({"attrPath": attr, "drvPath": drv(salt * 1000 + i, "t")}),
            )
        })
        .collect();
    serde_json::to_string(&map).unwrap()
}

fn summary(changed: &[&str], added: &[&str], broken: &[(&str, &str)]) -> Value {
    let targets = changed.len().max(7) + 5;
    json!({
        "version": 1,
        "targets": targets,
        "changed": changed,
        "unchanged": targets - changed.len(),
        "added": added,
        "removed": ["old/gone"],
        "broken": broken.iter().map(|(l, e)| json!({"label": l, "error": e})).collect::<Vec<_>>(),
        "extraSteps": 5,
        "steps": {"build": 20, "release": 2},
        "evaluationSeconds": 1.23,
        "parentMap": {
            "status": "used",
            "detail": "tmp/parent-map.json",
            "source": {"how": "merge-base", "distance": 0, "commit": "0123456789abcdef0123456789abcdef01234567",
                       "branch": "main", "buildNumber": 41, "buildUrl": "https://buildkite.example/o/p/builds/41"}
        }
    })
}

/// `root/pipeline/` with the given number of chunks per phase.
fn pipeline_dir(root: &Path, phases: &[(&str, usize)], summary: &Value) -> PathBuf {
    let dir = root.join("pipeline");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest_phases = Vec::new();
    for (name, n) in phases {
        let chunks: Vec<String> = (1..=*n)
            .map(|i| format!("{name}-chunk-{i:03}.json"))
            .collect();
        for c in &chunks {
            let step = json!({"label": c, "command": "true"});
            std::fs::write(dir.join(c), json!({"steps": [step]}).to_string()).unwrap();
        }
        manifest_phases.push(json!({"name": name, "steps": n, "chunks": chunks}));
    }
    let manifest = json!({"version": 1, "drvmap": "drvmap.json", "summary": "summary.json",
                          "phases": manifest_phases});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("drvmap.json"), drvmap_json(&["lib/a"], 1)).unwrap();
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// The fake buildkite-agent.

const FAKE_AGENT: &str = r#"#!/bin/sh
# Records each call as one line of bracketed arguments; annotate's stdin
# goes to annotation-N.md.
log="$FAKE_AGENT_DIR/calls.log"
n=$(wc -l < "$log" 2>/dev/null || echo 0)
line=""
for a in "$@"; do line="$line[$a] "; done
echo "$line" >> "$log"
if [ "$1" = annotate ]; then cat > "$FAKE_AGENT_DIR/annotation-$n.md"; fi
if [ -n "${FAKE_AGENT_FAIL:-}" ] && [ "$1 $2" = "$FAKE_AGENT_FAIL" ]; then
  echo "fake agent: refusing $FAKE_AGENT_FAIL" >&2
  exit 3
fi
exit 0
"#;

struct FakeAgent {
    tmp: tempfile::TempDir,
}

impl FakeAgent {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = bin.join("buildkite-agent");
        std::fs::write(&script, FAKE_AGENT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeAgent { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// drvkite run in the work folder with the fake agent first on PATH.
    fn cmd(&self) -> Command {
        let mut cmd = bk();
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env(
            "PATH",
            format!("{}:{path}", self.tmp.path().join("bin").display()),
        )
        .env("FAKE_AGENT_DIR", self.tmp.path())
        .current_dir(self.tmp.path());
        cmd
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    fn annotation(&self, n: usize) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("annotation-{n}.md"))).unwrap()
    }
}

fn upload_call(file: &str) -> String {
    format!("[pipeline] [upload] [{file}]")
}

fn artifact_call(files: &[&str]) -> String {
    format!("[artifact] [upload] [{}]", files.join(";"))
}

const ALL_FILES: &[&str] = &[
    "pipeline/drvmap.json",
    "pipeline/manifest.json",
    "pipeline/summary.json",
    "pipeline/build-chunk-001.json",
    "pipeline/build-chunk-002.json",
    "pipeline/build-chunk-003.json",
    "pipeline/release-chunk-001.json",
];

#[test]
fn build_chunks_are_uploaded_last_first_then_kept_as_artifacts() {
    let agent = FakeAgent::new();
    pipeline_dir(
        agent.root(),
        &[("build", 3), ("release", 1)],
        &summary(&[], &[], &[]),
    );
    let out = agent
        .cmd()
        .args(["upload", "--dir", "pipeline"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        agent.calls(),
        [
            upload_call("pipeline/build-chunk-003.json"),
            upload_call("pipeline/build-chunk-002.json"),
            upload_call("pipeline/build-chunk-001.json"),
            artifact_call(ALL_FILES),
        ]
    );
    let log = text(&out.stderr);
    assert!(
        log.contains("--- uploading phase build: 3 steps in 3 chunks"),
        "{log}"
    );
    assert!(log.contains("--- uploading pipeline as artifacts"), "{log}");
}

#[test]
fn release_phase_is_uploaded_on_its_own() {
    let agent = FakeAgent::new();
    pipeline_dir(
        agent.root(),
        &[("build", 3), ("release", 2)],
        &summary(&[], &[], &[]),
    );
    ok(agent.cmd().args([
        "upload",
        "--dir",
        "pipeline",
        "--phase",
        "release",
        "--no-artifacts",
    ]));
    assert_eq!(
        agent.calls(),
        [
            upload_call("pipeline/release-chunk-002.json"),
            upload_call("pipeline/release-chunk-001.json"),
        ]
    );
}

#[test]
fn dry_run_prints_the_commands_and_runs_nothing() {
    let agent = FakeAgent::new();
    pipeline_dir(agent.root(), &[("build", 2)], &summary(&[], &[], &[]));
    let stdout = ok(agent
        .cmd()
        .args(["upload", "--dir", "pipeline", "--dry-run"]));
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "buildkite-agent pipeline upload pipeline/build-chunk-002.json",
            "buildkite-agent pipeline upload pipeline/build-chunk-001.json",
            "buildkite-agent artifact upload 'pipeline/drvmap.json;pipeline/manifest.json;pipeline/summary.json;pipeline/build-chunk-001.json;pipeline/build-chunk-002.json'",
        ]
    );
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
}

#[test]
fn a_phase_without_steps_uploads_only_the_artifacts() {
    let agent = FakeAgent::new();
    pipeline_dir(agent.root(), &[("build", 0)], &summary(&[], &[], &[]));
    let out = agent
        .cmd()
        .args(["upload", "--dir", "pipeline"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("phase build: no steps, nothing to upload"));
    // The map is still kept: it is the parent map of later builds.
    assert_eq!(
        agent.calls(),
        [artifact_call(&[
            "pipeline/drvmap.json",
            "pipeline/manifest.json",
            "pipeline/summary.json"
        ])]
    );
    // A known phase the manifest leaves out has no steps either.
    let out = agent
        .cmd()
        .args([
            "upload",
            "--dir",
            "pipeline",
            "--phase",
            "release",
            "--no-artifacts",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("phase release: no steps"));
    assert_eq!(agent.calls().len(), 1);
}

fn one_line_error(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("drvkite: "), "{err}");
    err
}

#[test]
fn upload_errors_are_one_line_and_say_what_to_do() {
    let agent = FakeAgent::new();
    let err = one_line_error(&fails(agent.cmd().args(["upload", "--dir", "nowhere"])));
    assert!(
        err.contains("nowhere/manifest.json") && err.contains("drvkite pipeline"),
        "{err}"
    );

    pipeline_dir(
        agent.root(),
        &[("build", 1), ("release", 1)],
        &summary(&[], &[], &[]),
    );
    let err = one_line_error(&fails(
        agent
            .cmd()
            .args(["upload", "--dir", "pipeline", "--phase", "relase"]),
    ));
    assert!(
        err.contains("\"relase\"") && err.contains("build, release"),
        "{err}"
    );

    std::fs::remove_file(agent.root().join("pipeline/build-chunk-001.json")).unwrap();
    let err = one_line_error(&fails(agent.cmd().args(["upload", "--dir", "pipeline"])));
    assert!(
        err.contains("pipeline/build-chunk-001.json is missing"),
        "{err}"
    );
    assert!(
        agent.calls().is_empty(),
        "nothing may be uploaded: {:?}",
        agent.calls()
    );
}

#[test]
fn a_failing_agent_fails_the_upload() {
    let agent = FakeAgent::new();
    pipeline_dir(agent.root(), &[("build", 2)], &summary(&[], &[], &[]));
    let out = fails(
        agent
            .cmd()
            .env("FAKE_AGENT_FAIL", "pipeline upload")
            .args(["upload", "--dir", "pipeline"]),
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "drvkite: `buildkite-agent pipeline upload pipeline/build-chunk-002.json` failed"
        ),
        "{err}"
    );
    // It stopped at the first failure.
    assert_eq!(
        agent.calls(),
        [upload_call("pipeline/build-chunk-002.json")]
    );
}

#[test]
fn without_buildkite_agent_on_path_the_error_says_so() {
    let agent = FakeAgent::new();
    pipeline_dir(agent.root(), &[("build", 1)], &summary(&[], &[], &[]));
    let empty = tempfile::tempdir().unwrap();
    let out = fails(
        bk().env("PATH", empty.path())
            .current_dir(agent.root())
            .args(["upload", "--dir", "pipeline"]),
    );
    let err = one_line_error(&out);
    assert!(
        err.contains("buildkite-agent is not on PATH") && err.contains("--dry-run"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Annotation.

#[test]
fn annotation_summarises_the_generation() {
    let agent = FakeAgent::new();
    pipeline_dir(
        agent.root(),
        &[("build", 1)],
        &summary(&["lib/a", "tools/multi:client", "x/new"], &["x/new"], &[]),
    );
    ok(agent.cmd().args(["annotate", "--dir", "pipeline"]));
    assert_eq!(
        agent.calls(),
        ["[annotate] [--context] [drvkite] [--style] [info]"]
    );
    let md = agent.annotation(0);
    assert!(
        md.contains("#### drvkite: 3 of 12 targets to build"),
        "{md}"
    );
    assert!(
        md.contains(
            "| targets | changed | unchanged | added | removed | extra steps | evaluation |"
        ),
        "{md}"
    );
    assert!(md.contains("| 12 | 3 | 9 | 1 | 1 | 5 | 1.2 s |"), "{md}");
    assert!(md.contains("Steps: build 20, release 2."), "{md}");
    assert!(
        md.contains("Parent map: build [#41](https://buildkite.example/o/p/builds/41) of main at 0123456789ab, the merge-base of this commit"),
        "{md}"
    );
    assert!(md.contains("**Changed targets (3)**"), "{md}");
    assert!(md.contains("| lib/a | changed |"), "{md}");
    assert!(md.contains("| tools/multi&#58;client | changed |"), "{md}");
    assert!(md.contains("| x/new | added |"), "{md}");
    assert!(
        md.contains("**Removed targets (1)**\n\n| target |\n| --- |\n| old/gone |\n"),
        "{md}"
    );
    assert!(!md.contains("<details>") && !md.contains("Broken"), "{md}");
}

#[test]
fn without_a_parent_map_the_annotation_says_to_build() {
    let agent = FakeAgent::new();
    let mut s = summary(&["lib/a", "tools/b"], &[], &[]);
    s["removed"] = json!([]);
    s["parentMap"] =
        json!({"status": "none", "detail": "no parent map given: building every target"});
    pipeline_dir(agent.root(), &[("build", 1)], &s);
    ok(agent.cmd().args(["annotate", "--dir", "pipeline"]));
    let md = agent.annotation(0);
    assert!(
        md.contains("| targets | to build | extra steps | evaluation |\n"),
        "{md}"
    );
    assert!(md.contains("| 12 | 2 | 5 | 1.2 s |"), "{md}");
    assert!(
        md.contains("**Targets to build (2)**\n\n| target |\n| --- |\n| lib/a |\n| tools/b |\n"),
        "{md}"
    );
    assert!(!md.contains("changed"), "{md}");
}

#[test]
fn long_lists_fold_away_and_labels_cannot_inject_markup() {
    let agent = FakeAgent::new();
    let mut changed: Vec<String> = (0..24).map(|i| format!("lib/t{i:02}")).collect();
    changed.push("evil/<script>|*x*".to_owned());
    let changed: Vec<&str> = changed.iter().map(String::as_str).collect();
    pipeline_dir(
        agent.root(),
        &[("build", 1)],
        &summary(
            &changed,
            &[],
            &[("broken/one", "error: attribute `x` missing\n at <y>")],
        ),
    );
    ok(agent
        .cmd()
        .args(["annotate", "--dir", "pipeline", "--context", "ctx"]));
    assert_eq!(
        agent.calls(),
        ["[annotate] [--context] [ctx] [--style] [error]"]
    );
    let md = agent.annotation(0);
    assert!(
        md.contains("<details>\n<summary>Changed targets (25)</summary>"),
        "{md}"
    );
    assert!(md.contains("</details>"), "{md}");
    assert!(md.contains("| lib/t23 | changed |"), "{md}");
    assert!(
        md.contains("evil/&#60;script&#62;&#124;&#42;x&#42;"),
        "{md}"
    );
    assert!(!md.contains("<script>") && !md.contains("|*x*"), "{md}");
    assert!(md.contains("**Broken targets (1)**"), "{md}");
    assert!(
        md.contains("| broken/one | error&#58; attribute &#96;x&#96; missing at &#60;y&#62; |"),
        "{md}"
    );
}

#[test]
fn annotate_dry_run_prints_the_markdown() {
    let agent = FakeAgent::new();
    pipeline_dir(
        agent.root(),
        &[("build", 1)],
        &summary(&["lib/a"], &[], &[]),
    );
    let stdout = ok(agent
        .cmd()
        .args(["annotate", "--dir", "pipeline", "--dry-run"]));
    assert!(
        stdout.starts_with("buildkite-agent annotate --context drvkite --style info <<'EOF'\n"),
        "{stdout}"
    );
    assert!(stdout.contains("| lib/a | changed |"), "{stdout}");
    assert!(agent.calls().is_empty());
    let err = one_line_error(&fails(agent.cmd().args([
        "annotate",
        "--dir",
        "elsewhere",
        "--dry-run",
    ])));
    assert!(err.contains("elsewhere/summary.json"), "{err}");
}

// ---------------------------------------------------------------------------
// The parent map, from a local stand-in for Buildkite's API.

const TOKEN: &str = "bkua_test_0123456789secret";

/// One build as the fake API knows it.
#[derive(Clone)]
struct FakeBuild {
    number: u64,
    commit: String,
    branch: String,
    /// The generating job's drvmap.json, if the job uploaded one.
    artifact: Option<FakeArtifact>,
}

#[derive(Clone)]
enum FakeArtifact {
    /// Served through a redirect to the storage server.
    Map(String),
    /// The API lists it, the download answers 404.
    Gone,
    /// Listed with this state (e.g. EXPIRED).
    State(&'static str),
}

#[derive(Clone, Copy, PartialEq)]
enum ApiMode {
    Normal,
    NotJson,
    /// Answers 401 with the token echoed back in the body.
    Unauthorized,
}

#[derive(Default)]
struct Record {
    /// The `variables` of every GraphQL request, in order.
    queries: Vec<Value>,
    /// Authorization headers the API saw.
    api_auth: Vec<Option<String>>,
    /// Authorization headers the storage saw (must stay empty of tokens).
    storage_auth: Vec<Option<String>>,
}

struct FakeBuildkite {
    api: Arc<tiny_http::Server>,
    storage: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
    record: Arc<Mutex<Record>>,
    api_url: String,
}

fn header(req: &tiny_http::Request, name: &'static str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_owned())
}

fn respond(req: tiny_http::Request, status: u16, body: &str, extra: Option<(&str, &str)>) {
    let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
    if let Some((k, v)) = extra {
        resp.add_header(tiny_http::Header::from_bytes(k, v).unwrap());
    }
    let _ = req.respond(resp);
}

impl FakeBuildkite {
    fn start(builds: Vec<FakeBuild>, mode: ApiMode) -> Self {
        let api = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let storage = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let api_port = api.server_addr().to_ip().unwrap().port();
        let storage_port = storage.server_addr().to_ip().unwrap().port();
        let api_base = format!("http://127.0.0.1:{api_port}");
        let record = Arc::new(Mutex::new(Record::default()));

        let mut threads = Vec::new();
        {
            let (server, record, builds) = (api.clone(), record.clone(), builds.clone());
            let api_base = api_base.clone();
            threads.push(std::thread::spawn(move || {
                for mut req in server.incoming_requests() {
                    let auth = header(&req, "Authorization");
                    record.lock().unwrap().api_auth.push(auth.clone());
                    let url = req.url().to_owned();
                    if auth.as_deref() != Some(&format!("Bearer {TOKEN}"))
                        || mode == ApiMode::Unauthorized
                    {
                        respond(
                            req,
                            401,
                            &format!("{{\"message\":\"bad token {TOKEN}\"}}"),
                            None,
                        );
                        continue;
                    }
                    if url == "/graphql" {
                        let mut body = String::new();
                        req.as_reader().read_to_string(&mut body).unwrap();
                        let body: Value = serde_json::from_str(&body).unwrap();
                        record
                            .lock()
                            .unwrap()
                            .queries
                            .push(body["variables"].clone());
                        if mode == ApiMode::NotJson {
                            respond(req, 200, "<html>maintenance</html>", None);
                        } else {
                            let answer = graphql_answer(&builds, &body, &api_base);
                            respond(req, 200, &answer.to_string(), None);
                        }
                    } else if let Some(n) = url.strip_prefix("/artifacts/") {
                        let b = builds.iter().find(|b| b.number.to_string() == n);
                        match b.and_then(|b| b.artifact.clone()) {
                            Some(FakeArtifact::Map(_)) => {
                                let to =
                                    format!("http://127.0.0.1:{storage_port}/blob/{n}?signature=x");
                                respond(req, 302, "", Some(("Location", &to)));
                            }
                            _ => respond(req, 404, "not found", None),
                        }
                    } else {
                        respond(req, 404, "no such endpoint", None);
                    }
                }
            }));
        }
        {
            let (server, record) = (storage.clone(), record.clone());
            threads.push(std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    record
                        .lock()
                        .unwrap()
                        .storage_auth
                        .push(header(&req, "Authorization"));
                    let n = req
                        .url()
                        .trim_start_matches("/blob/")
                        .split('?')
                        .next()
                        .unwrap()
                        .to_owned();
                    match builds
                        .iter()
                        .find(|b| b.number.to_string() == n)
                        .and_then(|b| b.artifact.clone())
                    {
                        Some(FakeArtifact::Map(body)) => respond(req, 200, &body, None),
                        _ => respond(req, 404, "", None),
                    }
                }
            }));
        }
        FakeBuildkite {
            api,
            storage,
            threads,
            record,
            api_url: format!("{api_base}/graphql"),
        }
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap()
    }
}

impl Drop for FakeBuildkite {
    fn drop(&mut self) {
        self.api.unblock();
        self.storage.unblock();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What Buildkite's GraphQL API answers to drvkite's builds query: passed
/// builds of the asked branch (and commits), newest first.
fn graphql_answer(builds: &[FakeBuild], body: &Value, api_base: &str) -> Value {
    let vars = &body["variables"];
    assert_eq!(vars["slug"], "acme/depot");
    assert_eq!(vars["step"], json!(["pipeline-gen"]));
    let query = body["query"].as_str().unwrap();
    assert!(query.contains("state: [PASSED]"), "{query}");
    let branches: Vec<&str> = vars["branch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    let commits: Option<Vec<&str>> = vars.get("commits").map(|c| {
        c.as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect()
    });
    let first = vars["first"].as_u64().unwrap() as usize;
    let mut found: Vec<&FakeBuild> = builds
        .iter()
        .filter(|b| branches.contains(&b.branch.as_str()))
        .filter(|b| {
            commits
                .as_ref()
                .is_none_or(|c| c.contains(&b.commit.as_str()))
        })
        .collect();
    found.sort_by_key(|b| std::cmp::Reverse(b.number));
    let edges: Vec<Value> = found
        .into_iter()
        .take(first)
        .map(|b| {
            let artifacts: Vec<Value> = match &b.artifact {
                None => vec![],
                Some(a) => {
                    let state = match a {
                        FakeArtifact::State(s) => s,
                        _ => "finished",
                    };
                    vec![
                        json!({"node": {"path": "pipeline/build-chunk-001.json", "state": "finished",
                                         "downloadURL": format!("{api_base}/artifacts/x")}}),
                        json!({"node": {"path": "pipeline/drvmap.json", "state": state,
                                         "downloadURL": format!("{api_base}/artifacts/{}", b.number)}}),
                    ]
                }
            };
            json!({"node": {
                "uuid": format!("build-uuid-{}", b.number),
                "number": b.number,
                "url": format!("https://buildkite.example/acme/depot/builds/{}", b.number),
                "commit": b.commit,
                "branch": b.branch,
                "jobs": {"edges": [{"node": {"uuid": format!("job-uuid-{}", b.number),
                                              "artifacts": {"edges": artifacts}}}]}
            }})
        })
        .collect();
    json!({"data": {"pipeline": {"builds": {"edges": edges}}}})
}

/// A repository whose `main` has commits m1..m5 (origin/main at m5) and a
/// branch `feature` forked at m3 with two commits of its own.
struct History {
    tmp: tempfile::TempDir,
    main: Vec<String>,
}

impl History {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        let git = |args: &[&str]| {
            ok(Command::new("git")
                .current_dir(&repo)
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "commit.gpgsign=false",
                ])
                .args(args))
            .trim()
            .to_owned()
        };
        git(&["init", "-q", "-b", "main"]);
        let mut main = Vec::new();
        for i in 1..=5 {
            git(&["commit", "-q", "--allow-empty", "-m", &format!("m{i}")]);
            main.push(git(&["rev-parse", "HEAD"]));
        }
        git(&["update-ref", "refs/remotes/origin/main", &main[4]]);
        git(&["checkout", "-q", "-b", "feature", &main[2]]);
        for i in 1..=2 {
            git(&["commit", "-q", "--allow-empty", "-m", &format!("f{i}")]);
        }
        History { tmp, main }
    }

    fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    fn out(&self) -> PathBuf {
        self.tmp.path().join("tmp/parent-map.json")
    }

    fn sidecar(&self) -> PathBuf {
        self.tmp.path().join("tmp/parent-map.json.source.json")
    }

    /// `drvkite parent-map fetch` as the pipeline-gen step of a `feature`
    /// build runs it, configured through Buildkite's variables.
    fn fetch(&self, fake: &FakeBuildkite) -> Command {
        self.fetch_from(&fake.api_url)
    }

    fn fetch_from(&self, api_url: &str) -> Command {
        let mut cmd = bk();
        cmd.current_dir(self.repo())
            .args(["parent-map", "fetch", "--out"])
            .arg(self.out())
            .args(["--depth", "2"])
            .env("BUILDKITE_ORGANIZATION_SLUG", "acme")
            .env("BUILDKITE_PIPELINE_SLUG", "depot")
            .env("BUILDKITE_BRANCH", "feature")
            .env("BUILDKITE_COMMIT", "HEAD")
            .env("BUILDKITE_PIPELINE_DEFAULT_BRANCH", "main")
            .env("BUILDKITE_BUILD_ID", "this-build")
            .env("BUILDKITE_API_TOKEN", TOKEN)
            .env("DRVKITE_BUILDKITE_API_URL", api_url);
        cmd
    }

    fn build(&self, number: u64, main_index: usize, artifact: Option<FakeArtifact>) -> FakeBuild {
        FakeBuild {
            number,
            commit: self.main[main_index].clone(),
            branch: "main".to_owned(),
            artifact,
        }
    }
}

fn map_of(number: u64) -> FakeArtifact {
    FakeArtifact::Map(drvmap_json(
        &["lib/a", "tools/b", &format!("from/{number}")],
        number as usize,
    ))
}

/// Runs the fetch; checks it exited 0, printed exactly one outcome line and
/// never the token. Returns that line.
fn run_fetch(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "fetch must exit 0:\n{stderr}");
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "token printed:\n{stdout}\n{stderr}"
    );
    assert!(stderr.starts_with("--- parent map: "), "{stderr}");
    let outcomes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("parent map: ") || l.starts_with("no parent map: "))
        .collect();
    assert_eq!(outcomes.len(), 1, "one outcome line expected:\n{stderr}");
    outcomes[0].to_owned()
}

/// The fetch wrote `number`'s map and a matching source.json.
fn assert_fetched(
    h: &History,
    fake: &FakeBuildkite,
    number: u64,
    how: &str,
    distance: Option<usize>,
) {
    let FakeArtifact::Map(expected) = map_of(number) else {
        unreachable!()
    };
    let expected: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(read_json(&h.out()), expected);
    let source = read_json(&h.sidecar());
    assert_eq!(source["how"], how);
    assert_eq!(source["distance"], json!(distance));
    assert_eq!(source["buildNumber"], number);
    assert_eq!(source["buildId"], format!("build-uuid-{number}"));
    assert_eq!(
        source["buildUrl"],
        format!("https://buildkite.example/acme/depot/builds/{number}")
    );
    assert_eq!(source["jobId"], format!("job-uuid-{number}"));
    assert_eq!(source["branch"], "main");
    assert_eq!(source["stepKey"], "pipeline-gen");
    assert_eq!(source["artifactPath"], "pipeline/drvmap.json");
    assert_eq!(source["targets"], 3);
    let rec = fake.record();
    assert!(
        rec.api_auth
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {TOKEN}")))
    );
    assert!(
        !rec.storage_auth.is_empty(),
        "the map came from the storage"
    );
    assert!(
        rec.storage_auth.iter().all(Option::is_none),
        "token sent to storage: {:?}",
        rec.storage_auth
    );
}

fn assert_no_map(h: &History) {
    assert!(!h.out().exists(), "a parent map was written");
    assert!(!h.sidecar().exists(), "a source.json was written");
}

#[test]
fn the_merge_base_build_provides_the_map() {
    let h = History::new();
    let fake = FakeBuildkite::start(
        vec![
            h.build(5, 4, Some(map_of(5))),
            h.build(3, 2, Some(map_of(3))),
            h.build(2, 1, Some(map_of(2))),
        ],
        ApiMode::Normal,
    );
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(
        line.starts_with("parent map: wrote ")
            && line.contains("build #3")
            && line.contains("the merge-base"),
        "{line}"
    );
    assert_fetched(&h, &fake, 3, "merge-base", Some(0));
    assert_eq!(read_json(&h.sidecar())["commit"], h.main[2]);
    // One query, for the merge-base m3 and its first-parent ancestors m2, m1.
    let q = &fake.record().queries;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["commits"], json!([h.main[2], h.main[1], h.main[0]]));
    assert_eq!(q[0]["branch"], json!(["main"]));
}

#[test]
fn an_ancestor_of_the_merge_base_is_next() {
    let h = History::new();
    // m3 has a build whose job kept no map, m2 none at all, m1 one with a map.
    let fake = FakeBuildkite::start(
        vec![
            h.build(5, 4, Some(map_of(5))),
            h.build(3, 2, None),
            h.build(1, 0, Some(map_of(1))),
        ],
        ApiMode::Normal,
    );
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(
        line.contains("build #1") && line.contains("2 first-parent commits before the merge-base"),
        "{line}"
    );
    assert_fetched(&h, &fake, 1, "ancestor", Some(2));
}

#[test]
fn the_newest_default_branch_build_is_the_last_resort() {
    let h = History::new();
    // Builds only of m5 and of a feature-branch commit (never a parent).
    let mut other = h.build(9, 4, Some(map_of(9)));
    other.branch = "feature".to_owned();
    let fake = FakeBuildkite::start(vec![h.build(5, 4, Some(map_of(5))), other], ApiMode::Normal);
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(
        line.contains("build #5") && line.contains("newest"),
        "{line}"
    );
    assert_fetched(&h, &fake, 5, "newest", None);
    let q = &fake.record().queries;
    assert_eq!(q.len(), 2);
    assert!(q[1].get("commits").is_none(), "{:?}", q[1]);
}

#[test]
fn without_the_default_branch_ref_the_newest_build_is_used() {
    let h = History::new();
    ok(Command::new("git").current_dir(h.repo()).args([
        "update-ref",
        "-d",
        "refs/remotes/origin/main",
    ]));
    let fake = FakeBuildkite::start(vec![h.build(5, 4, Some(map_of(5)))], ApiMode::Normal);
    let out = h.fetch(&fake).output().unwrap();
    assert!(
        text(&out.stderr).contains("cannot find origin/main"),
        "{}",
        text(&out.stderr)
    );
    run_fetch(&mut h.fetch(&fake));
    assert_fetched(&h, &fake, 5, "newest", None);
}

#[test]
fn no_build_means_no_map() {
    let h = History::new();
    let fake = FakeBuildkite::start(vec![], ApiMode::Normal);
    // A map left over from an earlier run in the same checkout must go.
    std::fs::create_dir_all(h.out().parent().unwrap()).unwrap();
    std::fs::write(h.out(), drvmap_json(&["stale/map"], 7)).unwrap();
    std::fs::write(h.sidecar(), "{}").unwrap();
    let line = run_fetch(&mut h.fetch(&fake));
    assert_eq!(
        line,
        "no parent map: no passed main build of acme/depot has a pipeline/drvmap.json artifact from step pipeline-gen; every target will be built"
    );
    assert_no_map(&h);
}

#[test]
fn a_gone_artifact_is_no_map() {
    let h = History::new();
    let fake = FakeBuildkite::start(
        vec![h.build(3, 2, Some(FakeArtifact::Gone))],
        ApiMode::Normal,
    );
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(line.starts_with("no parent map: "), "{line}");
    let out = h.fetch(&fake).output().unwrap();
    assert!(
        text(&out.stderr).contains("build #3 ("),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("HTTP 404: expired or deleted"),
        "{}",
        text(&out.stderr)
    );
    assert_no_map(&h);
}

#[test]
fn an_expired_artifact_falls_back_to_a_newer_build() {
    let h = History::new();
    let fake = FakeBuildkite::start(
        vec![
            h.build(3, 2, Some(FakeArtifact::State("EXPIRED"))),
            h.build(5, 4, Some(map_of(5))),
        ],
        ApiMode::Normal,
    );
    run_fetch(&mut h.fetch(&fake));
    assert_fetched(&h, &fake, 5, "newest", None);
}

#[test]
fn a_malformed_map_is_never_written() {
    let h = History::new();
    let fake = FakeBuildkite::start(
        vec![
            h.build(
                3,
                2,
                Some(FakeArtifact::Map(
                    "{\"lib/a\": {\"attrPath\": [\"lib\"".to_owned(),
                )),
            ),
            h.build(
                2,
                1,
                Some(FakeArtifact::Map(
                    "{\"lib/a\": {\"drvPath\": \"/tmp/x\"}}".to_owned(),
                )),
            ),
        ],
        ApiMode::Normal,
    );
    let out = h.fetch(&fake).output().unwrap();
    let err = text(&out.stderr);
    assert!(
        err.contains("build #3 (") && err.contains("is not a derivation map"),
        "{err}"
    );
    let line = run_fetch(&mut h.fetch(&fake));
    assert_eq!(
        line,
        "no parent map: none of the 2 candidate builds had a usable map (see above); every target will be built"
    );
    assert_no_map(&h);
}

#[test]
fn an_api_answer_that_is_not_json_is_no_map() {
    let h = History::new();
    let fake = FakeBuildkite::start(vec![h.build(3, 2, Some(map_of(3)))], ApiMode::NotJson);
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(
        line.starts_with("no parent map: the Buildkite API at http://127.0.0.1:")
            && line.contains("not JSON"),
        "{line}"
    );
    assert_no_map(&h);
}

#[test]
fn a_refused_token_is_no_map_and_stays_secret() {
    let h = History::new();
    let fake = FakeBuildkite::start(vec![h.build(3, 2, Some(map_of(3)))], ApiMode::Unauthorized);
    let line = run_fetch(&mut h.fetch(&fake));
    assert!(line.contains("refused the token (HTTP 401)"), "{line}");
    assert_no_map(&h);
    assert_eq!(fake.record().queries.len(), 0);

    // The same through a token file (TVL's BUILDKITE_TOKEN_PATH).
    let file = h.tmp.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let line = run_fetch(
        h.fetch(&fake)
            .env_remove("BUILDKITE_API_TOKEN")
            .env("BUILDKITE_TOKEN_PATH", &file),
    );
    assert!(line.contains("HTTP 401"), "{line}");
    assert_no_map(&h);
}

#[test]
fn a_missing_token_or_unreachable_api_is_no_map() {
    let h = History::new();
    let fake = FakeBuildkite::start(vec![h.build(3, 2, Some(map_of(3)))], ApiMode::Normal);
    let line = run_fetch(h.fetch(&fake).env_remove("BUILDKITE_API_TOKEN"));
    assert_eq!(
        line,
        "no parent map: no Buildkite API token: set BUILDKITE_API_TOKEN or pass --token-file; every target will be built"
    );
    // A server that hangs up on every connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/graphql", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let line = run_fetch(&mut h.fetch_from(&url));
    assert!(
        line.starts_with("no parent map: cannot reach the Buildkite API at http://127.0.0.1:"),
        "{line}"
    );
    assert_no_map(&h);
}

#[test]
fn on_the_default_branch_nothing_is_fetched() {
    let h = History::new();
    let fake = FakeBuildkite::start(vec![h.build(5, 4, Some(map_of(5)))], ApiMode::Normal);
    std::fs::create_dir_all(h.out().parent().unwrap()).unwrap();
    std::fs::write(h.out(), drvmap_json(&["stale/map"], 7)).unwrap();
    // TVL's builds name the branch as a ref.
    let line = run_fetch(h.fetch(&fake).env("BUILDKITE_BRANCH", "refs/heads/main"));
    assert_eq!(
        line,
        "no parent map: this is a build of the default branch main, which builds every target"
    );
    assert_no_map(&h);
    assert!(fake.record().api_auth.is_empty(), "the API was asked");
}

// ---------------------------------------------------------------------------
// The static pipeline that bootstraps drvkite in CI.

fn example_pipeline() -> PathBuf {
    Path::new(REPO).join("src/init/drvkite.yml")
}

#[test]
fn the_example_pipeline_is_valid_and_escapes_its_dollars() {
    let pipeline = read_pipeline_file(&example_pipeline());
    validate_pipeline(&pipeline);
    let steps = pipeline["steps"].as_array().unwrap();
    let keys: Vec<&str> = steps.iter().filter_map(|s| s["key"].as_str()).collect();
    assert_eq!(keys, ["pipeline-gen", "check", "release"]);
    // Every `$` is meant for the shell at run time: the upload expands
    // nothing.
    common::upload::uploaded_value(&pipeline).unwrap();
    let generate = steps[0]["command"].as_str().unwrap();
    let order = [
        "parent-map fetch",
        "pipeline --depot",
        "annotate",
        "upload --dir pipeline --phase build",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|s| generate.find(s).unwrap_or_else(|| panic!("{s} missing")))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{generate}");
    assert!(
        steps[3]["command"]
            .as_str()
            .unwrap()
            .contains("upload --dir pipeline --phase release")
    );
}

#[test]
fn the_schema_check_can_fail() {
    // Keys with `/` and unknown properties are not Buildkite pipelines.
    let bad =
        json!({"steps": [{"command": "true", "key": "a/b"}, {"command": "true", "colour": 1}]});
    if let Some(errors) = pipeline_errors(&bad) {
        assert!(errors.len() >= 2, "{errors:?}");
    }
}

#[test]
fn the_docs_show_the_example_pipeline() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("docs/buildkite.md")).unwrap();
    let yaml = std::fs::read_to_string(example_pipeline()).unwrap();
    assert!(
        readme.contains(&format!("```yaml\n{yaml}```")),
        "docs/buildkite.md must carry src/init/drvkite.yml (what drvkite init writes) verbatim"
    );
}
