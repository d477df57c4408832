//! `drvkite parent-map fetch`: the derivation map of an earlier passed
//! build of the default branch, found through Buildkite's GraphQL API, so
//! that `drvkite pipeline` skips the targets that build already built.
//!
//! Preference order: the build of the merge-base of this commit with the
//! default branch (what the branch started from), then its first-parent
//! ancestors, then the newest passed default-branch builds. The map is the
//! `pipeline/drvmap.json` artifact of the step that generated the pipeline.
//!
//! The map only saves work, so anything that goes wrong ends in one line
//! and exit 0 without a file: the pipeline then builds everything. A map
//! that does not parse is never written.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};
use ureq::http::Uri;

use super::{group, minor_group, short_branch};
use crate::drvmap::DrvMap;

// ureq: a blocking client is all one request at a time needs, it brings
// rustls (no OpenSSL on the agents), and it lets redirects be followed by
// hand so that the token only ever goes to the API's own host.

pub const DEFAULT_API_URL: &str = "https://graphql.buildkite.com/v1";
const MAX_REDIRECTS: usize = 5;
/// Larger responses are refused rather than read into memory.
const MAX_BODY: u64 = 512 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum ParentMapCommand {
    /// Download the derivation map of an earlier passed build of the default
    /// branch (the merge-base's build first). Exits 0 without a file when
    /// there is none: the pipeline then builds every target.
    Fetch(Box<FetchArgs>),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Where to write the map; its provenance goes to FILE.source.json.
    #[arg(long, value_name = "FILE")]
    pub out: Utf8PathBuf,
    /// The Buildkite organization's slug.
    #[arg(long, env = "BUILDKITE_ORGANIZATION_SLUG")]
    pub org: String,
    /// The Buildkite pipeline's slug.
    #[arg(long, env = "BUILDKITE_PIPELINE_SLUG")]
    pub pipeline: String,
    /// The branch being built; on the default branch nothing is fetched.
    #[arg(long, env = "BUILDKITE_BRANCH")]
    pub branch: Option<String>,
    /// The commit being built (any git revision).
    #[arg(long, env = "BUILDKITE_COMMIT", default_value = "HEAD")]
    pub commit: String,
    /// The pipeline's default branch, whose builds provide parent maps.
    #[arg(
        long,
        env = "BUILDKITE_PIPELINE_DEFAULT_BRANCH",
        default_value = "main"
    )]
    pub default_branch: String,
    /// The git ref of the default branch to take the merge-base with
    /// [default: origin/<default branch>].
    #[arg(long)]
    pub base_ref: Option<String>,
    /// The git checkout to read history from.
    #[arg(long, default_value = ".")]
    pub repo: Utf8PathBuf,
    /// How many first-parent ancestors of the merge-base to try.
    #[arg(long, default_value_t = 10)]
    pub depth: usize,
    /// How many of the newest passed default-branch builds to try last.
    #[arg(long, default_value_t = 20)]
    pub recent: usize,
    /// The key of the step that generated the pipeline and uploaded the map.
    #[arg(long, default_value = "pipeline-gen")]
    pub step_key: String,
    /// The artifact path of the map in that step.
    #[arg(long, default_value = "pipeline/drvmap.json")]
    pub artifact_path: String,
    /// A file holding the API token (GraphQL scope). Without it the token is
    /// read from the environment variable BUILDKITE_API_TOKEN.
    #[arg(long, env = "BUILDKITE_TOKEN_PATH")]
    pub token_file: Option<Utf8PathBuf>,
    /// Buildkite's GraphQL endpoint.
    #[arg(long, env = "DRVKITE_BUILDKITE_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// The build this runs in, never taken as its own parent.
    #[arg(long, env = "BUILDKITE_BUILD_ID")]
    pub build_id: Option<String>,
    /// Seconds allowed for each HTTP request.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// The API token. Never printed: its Debug says nothing, and every line
/// drvkite prints while it is known goes through [`Log`].
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(hidden)")
    }
}

/// Prints progress lines with the token blotted out, in case a server or a
/// downloaded file echoes it back.
#[derive(Default)]
struct Log {
    secret: Option<String>,
}

impl Log {
    fn line(&self, s: &str) {
        eprintln!("{}", self.redact(s));
    }
    fn redact(&self, s: &str) -> String {
        let one_line = s.replace(['\n', '\r'], " ");
        match &self.secret {
            // Real tokens are long; a short test value would blot out words.
            Some(t) if t.len() >= 8 => one_line.replace(t.as_str(), "[token]"),
            _ => one_line,
        }
    }
}

/// What went wrong with one candidate build, or with the whole search.
enum Problem {
    /// This build has no usable map: try the next one.
    Skip(String),
    /// Nothing else will work either (token, API, network): stop.
    Fatal(String),
}

pub fn run(command: &ParentMapCommand) -> Result<()> {
    match command {
        ParentMapCommand::Fetch(args) => fetch(args),
    }
}

fn sidecar(out: &Utf8Path) -> Utf8PathBuf {
    Utf8PathBuf::from(format!("{out}.source.json"))
}

pub fn fetch(args: &FetchArgs) -> Result<()> {
    group(&format!(
        "parent map: looking for a passed {} build",
        args.default_branch
    ));
    // A map left by an earlier run in this checkout would be taken for
    // this build's: whatever happens below, it must not survive.
    for stale in [args.out.clone(), sidecar(&args.out)] {
        match std::fs::remove_file(&stale) {
            Ok(()) => eprintln!("removed the previous {stale}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot remove the previous {stale}: remove it by hand, it would be mistaken for this build's parent map")
                });
            }
        }
    }
    if let Some(branch) = &args.branch
        && short_branch(branch) == short_branch(&args.default_branch)
    {
        eprintln!(
            "no parent map: this is a build of the default branch {}, which builds every target",
            args.default_branch
        );
        return Ok(());
    }
    let mut log = Log::default();
    match find(args, &mut log) {
        Ok(found) => match write(args, &found) {
            Ok(()) => log.line(&format!(
                "parent map: wrote {} ({} targets) from {}",
                args.out,
                found.map.len(),
                found.describe()
            )),
            Err(e) => {
                let _ = std::fs::remove_file(&args.out);
                let _ = std::fs::remove_file(sidecar(&args.out));
                log.line(&format!("no parent map: {e:#}; every target will be built"));
            }
        },
        Err(reason) => log.line(&format!(
            "no parent map: {reason}; every target will be built"
        )),
    }
    Ok(())
}

fn write(args: &FetchArgs, found: &Found) -> Result<()> {
    if let Some(dir) = args.out.parent()
        && !dir.as_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    }
    // The provenance first: a reader that finds the map finds its source.
    let source = serde_json::to_vec_pretty(&found.source)?;
    crate::atomic::write_file(&sidecar(&args.out), &source)?;
    found.map.write(&args.out)
}

struct Found {
    map: DrvMap,
    source: Value,
}

impl Found {
    fn describe(&self) -> String {
        let s = &self.source;
        let mut d = format!(
            "build #{} at {}",
            s["buildNumber"],
            s["commit"].as_str().unwrap_or("?")
        );
        match s["how"].as_str() {
            Some("merge-base") => d.push_str(", the merge-base"),
            Some("ancestor") => {
                let n = s["distance"].as_u64().unwrap_or(0);
                let plural = if n == 1 { "" } else { "s" };
                d.push_str(&format!(
                    ", {n} first-parent commit{plural} before the merge-base"
                ));
            }
            _ => d.push_str(", the newest passed build with a map"),
        }
        d
    }
}

/// Where the build stands in git history: the merge-base and its
/// first-parent ancestors, nearest first.
struct Ancestry {
    merge_base: String,
    commits: Vec<String>,
}

fn git(repo: &Utf8Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().next().unwrap_or("").trim().to_owned())
    }
}

fn ancestry(args: &FetchArgs) -> Result<Ancestry, String> {
    let repo = &args.repo;
    let resolve = |rev: &str| {
        git(
            repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{rev}^{{commit}}"),
            ],
        )
    };
    let head = resolve(&args.commit)
        .map_err(|_| format!("cannot find commit {} in {repo}", args.commit))?;
    let base_ref = args
        .base_ref
        .clone()
        .unwrap_or_else(|| format!("origin/{}", short_branch(&args.default_branch)));
    resolve(&base_ref).map_err(|_| {
        format!("cannot find {base_ref} in {repo} (fetch the default branch before this step)")
    })?;
    let merge_base = git(repo, &["merge-base", &head, &base_ref])
        .map_err(|e| format!("no merge-base of {head} and {base_ref} (shallow clone?): {e}"))?;
    let count = format!("--max-count={}", args.depth + 1);
    let commits = git(repo, &["rev-list", "--first-parent", &count, &merge_base])
        .map_err(|e| format!("cannot list the ancestors of {merge_base}: {e}"))?;
    Ok(Ancestry {
        merge_base,
        commits: commits.lines().map(str::to_owned).collect(),
    })
}

fn resolve_token(token_file: Option<&Utf8Path>) -> Result<Token, String> {
    let (token, from) = match token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the token file {path}: {e}"))?;
            (t, format!("the token file {path}"))
        }
        None => match std::env::var("BUILDKITE_API_TOKEN") {
            Ok(t) => (t, "BUILDKITE_API_TOKEN".to_owned()),
            Err(_) => {
                return Err(
                    "no Buildkite API token: set BUILDKITE_API_TOKEN or pass --token-file"
                        .to_owned(),
                );
            }
        },
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(format!("{from} is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{from} holds characters a token cannot have: check it"
        ));
    }
    Ok(Token(token))
}

fn find(args: &FetchArgs, log: &mut Log) -> Result<Found, String> {
    let token = resolve_token(args.token_file.as_deref())?;
    log.secret = Some(token.0.clone());
    let api = Api::new(args, token)?;
    let mut tried: HashSet<String> = args.build_id.iter().cloned().collect();
    let mut skipped = 0usize;
    // Candidates in order of preference; the first usable map wins.
    let mut try_builds = |candidates: Vec<Candidate>| -> Result<Option<Found>, String> {
        for c in candidates {
            let b = c.build;
            if !tried.insert(b.uuid.clone()) {
                continue;
            }
            match api.take_map(b) {
                Ok((map, job)) => {
                    return Ok(Some(Found {
                        source: source(args, &c, &job, &map),
                        map,
                    }));
                }
                Err(Problem::Skip(why)) => {
                    skipped += 1;
                    log.line(&format!(
                        "build #{} ({}): {why}",
                        b.number,
                        short(&b.commit)
                    ));
                }
                Err(Problem::Fatal(why)) => return Err(why),
            }
        }
        Ok(None)
    };

    match ancestry(args) {
        Ok(anc) => {
            minor_group(&format!(
                "merge-base {} and {} first-parent ancestors",
                short(&anc.merge_base),
                anc.commits.len().saturating_sub(1)
            ));
            let builds = api.builds(Some(&anc.commits), anc.commits.len() * 3)?;
            // Nearest commit first; for one commit, newest build first.
            let candidates = anc
                .commits
                .iter()
                .enumerate()
                .flat_map(|(distance, commit)| {
                    builds
                        .iter()
                        .filter(move |b| b.commit == *commit)
                        .map(move |build| Candidate {
                            build,
                            how: if distance == 0 {
                                "merge-base"
                            } else {
                                "ancestor"
                            },
                            distance: Some(distance),
                        })
                })
                .collect();
            if let Some(found) = try_builds(candidates)? {
                return Ok(found);
            }
            log.line(&format!(
                "no passed {} build of the merge-base or its ancestors has a map",
                args.default_branch
            ));
        }
        Err(why) => log.line(&format!(
            "{why}: trying the newest {} builds",
            args.default_branch
        )),
    }

    minor_group(&format!("newest passed {} builds", args.default_branch));
    let builds = api.builds(None, args.recent)?;
    let candidates = builds
        .iter()
        .map(|build| Candidate {
            build,
            how: "newest",
            distance: None,
        })
        .collect();
    if let Some(found) = try_builds(candidates)? {
        return Ok(found);
    }
    Err(if skipped == 0 {
        format!(
            "no passed {} build of {}/{} has a {} artifact from step {}",
            args.default_branch, args.org, args.pipeline, args.artifact_path, args.step_key
        )
    } else {
        format!("none of the {skipped} candidate builds had a usable map (see above)")
    })
}

/// A build that may hold the parent map, and why it is a candidate.
struct Candidate<'a> {
    build: &'a BuildNode,
    /// `merge-base`, `ancestor` or `newest`.
    how: &'static str,
    /// First-parent commits between the merge-base and the build's commit.
    distance: Option<usize>,
}

/// The provenance written beside the map (FILE.source.json), which
/// `drvkite pipeline` copies into its summary.
fn source(args: &FetchArgs, c: &Candidate, job_id: &Option<String>, map: &DrvMap) -> Value {
    let b = c.build;
    json!({
        "how": c.how,
        "distance": c.distance,
        "commit": b.commit,
        "branch": b.branch,
        "buildNumber": b.number,
        "buildId": b.uuid,
        "buildUrl": b.url,
        "jobId": job_id,
        "stepKey": args.step_key,
        "artifactPath": args.artifact_path,
        "targets": map.len(),
    })
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

// ---------------------------------------------------------------------------
// The GraphQL API.

#[derive(Debug, Deserialize)]
struct Connection<T> {
    edges: Option<Vec<Option<Edge<T>>>>,
}

#[derive(Debug, Deserialize)]
struct Edge<T> {
    node: Option<T>,
}

impl<T> Connection<T> {
    fn into_nodes(self) -> impl Iterator<Item = T> {
        self.edges
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.node)
    }
}

#[derive(Debug, Deserialize)]
struct BuildNode {
    uuid: String,
    number: u64,
    url: String,
    commit: String,
    branch: String,
    jobs: Option<Connection<JobNode>>,
}

#[derive(Debug, Deserialize)]
struct JobNode {
    uuid: Option<String>,
    artifacts: Option<Connection<ArtifactNode>>,
}

#[derive(Debug, Deserialize)]
struct ArtifactNode {
    path: String,
    state: Option<String>,
    #[serde(rename = "downloadURL")]
    download_url: Option<String>,
}

fn builds_query(by_commit: bool) -> String {
    let (decl, filter) = if by_commit {
        (", $commits: [String!]", ", commit: $commits")
    } else {
        ("", "")
    };
    format!(
        "query DrvkiteParentMap($slug: ID!, $branch: [String!], $first: Int!, $step: [String!]{decl}) {{ \
           pipeline(slug: $slug) {{ \
             builds(first: $first, branch: $branch, state: [PASSED]{filter}) {{ edges {{ node {{ \
               uuid number url commit branch \
               jobs(first: 1, type: [COMMAND], passed: true, step: {{key: $step}}) {{ edges {{ node {{ \
                 ... on JobTypeCommand {{ uuid artifacts(first: 100) {{ edges {{ node {{ path state downloadURL }} }} }} }} \
               }} }} }} \
             }} }} }} \
           }} \
         }}"
    )
}

struct Api<'a> {
    args: &'a FetchArgs,
    agent: ureq::Agent,
    endpoint: Uri,
    bearer: String,
}

fn origin(uri: &Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map_or("?", |a| a.as_str())
    )
}

fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |u: &Uri| {
        u.port_u16().or(match u.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })
    };
    a.scheme_str() == b.scheme_str()
        && a.host().map(str::to_ascii_lowercase) == b.host().map(str::to_ascii_lowercase)
        && port(a) == port(b)
}

fn is_http(uri: &Uri) -> bool {
    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
}

impl<'a> Api<'a> {
    fn new(args: &'a FetchArgs, token: Token) -> Result<Self, String> {
        let endpoint: Uri = args
            .api_url
            .parse()
            .ok()
            .filter(is_http)
            .ok_or_else(|| format!("--api-url {:?} is not an http(s) URL", args.api_url))?;
        // Plain http only where it cannot leave the machine (tests).
        let loopback = matches!(endpoint.host(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if endpoint.scheme_str() == Some("http") && !loopback {
            return Err(format!(
                "--api-url {} is plain http: the token is only sent over https",
                origin(&endpoint)
            ));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(args.timeout)))
            .user_agent(concat!("drvkite/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Api {
            args,
            agent,
            endpoint,
            bearer: format!("Bearer {}", token.0),
        })
    }

    fn graphql(&self, query: &str, variables: Value) -> Result<Value, String> {
        let at = origin(&self.endpoint);
        let body = json!({ "query": query, "variables": variables }).to_string();
        let mut resp = self
            .agent
            .post(&self.endpoint)
            .header("Authorization", &self.bearer)
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(|e| format!("cannot reach the Buildkite API at {at}: {e}"))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => {}
            401 => {
                return Err(format!(
                    "the Buildkite API at {at} refused the token (HTTP 401): check BUILDKITE_API_TOKEN or the token file"
                ));
            }
            403 => {
                return Err(format!(
                    "the Buildkite API at {at} denied access (HTTP 403): the token needs the GraphQL scope and access to {}/{}",
                    self.args.org, self.args.pipeline
                ));
            }
            s => return Err(format!("the Buildkite API at {at} answered HTTP {s}")),
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| format!("cannot read the Buildkite API's answer: {e}"))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
            format!("the Buildkite API at {at} answered with something that is not JSON")
        })?;
        if let Some(first) = v
            .get("errors")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            let msg = first
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(format!("the Buildkite API reported an error: {msg}"));
        }
        Ok(v)
    }

    /// Passed default-branch builds, newest first; only those of `commits`
    /// when given.
    fn builds(&self, commits: Option<&[String]>, first: usize) -> Result<Vec<BuildNode>, String> {
        let slug = format!("{}/{}", self.args.org, self.args.pipeline);
        let mut vars = json!({
            "slug": slug,
            "branch": [self.args.default_branch],
            "first": first.clamp(1, 100),
            "step": [self.args.step_key],
        });
        if let Some(c) = commits {
            vars["commits"] = json!(c);
        }
        let v = self.graphql(&builds_query(commits.is_some()), vars)?;
        let pipeline = v.get("data").and_then(|d| d.get("pipeline"));
        match pipeline {
            None => Err("the Buildkite API's answer has no data.pipeline".to_owned()),
            Some(Value::Null) => Err(format!(
                "pipeline {slug} was not found, or the token cannot see it"
            )),
            Some(p) => {
                let builds: Option<Connection<BuildNode>> =
                    serde_json::from_value(p.get("builds").cloned().unwrap_or(Value::Null))
                        .map_err(|e| {
                            format!("the Buildkite API's list of builds is malformed: {e}")
                        })?;
                Ok(builds.map(|c| c.into_nodes().collect()).unwrap_or_default())
            }
        }
    }

    /// The map of one build: its generating job's artifact, downloaded and
    /// checked.
    fn take_map(&self, b: &BuildNode) -> Result<(DrvMap, Option<String>), Problem> {
        let path = &self.args.artifact_path;
        let key = &self.args.step_key;
        let job =
            first_job(b).ok_or_else(|| Problem::Skip(format!("no passed job of step {key}")))?;
        let artifacts: Vec<&ArtifactNode> = job
            .artifacts
            .iter()
            .flat_map(|c| c.edges.iter().flatten().flatten())
            .filter_map(|e| e.node.as_ref())
            .collect();
        let art = artifacts
            .iter()
            .find(|a| a.path == *path)
            .ok_or_else(|| Problem::Skip(format!("step {key} has no {path} artifact")))?;
        if let Some(state) = &art.state
            && !state.eq_ignore_ascii_case("finished")
        {
            return Err(Problem::Skip(format!(
                "its {path} artifact is {} (expired, deleted or never uploaded)",
                state.to_ascii_lowercase()
            )));
        }
        let url = art
            .download_url
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Problem::Skip(format!("its {path} artifact has no download URL")))?;
        let bytes = self.download(url)?;
        let map = DrvMap::parse(&bytes)
            .map_err(|e| Problem::Skip(format!("its {path} is not a derivation map: {e:#}")))?;
        Ok((map, job.uuid.clone()))
    }

    /// GET an artifact, following redirects by hand: the token goes only to
    /// the API's own origin, never to the storage a link points at.
    fn download(&self, url: &str) -> Result<Vec<u8>, Problem> {
        let path = &self.args.artifact_path;
        let mut uri: Uri = url.parse().ok().filter(is_http).ok_or_else(|| {
            Problem::Skip(format!("its {path} download URL is not an http(s) URL"))
        })?;
        for _ in 0..=MAX_REDIRECTS {
            let ours = same_origin(&uri, &self.endpoint);
            let at = origin(&uri);
            let mut req = self.agent.get(&uri);
            if ours {
                req = req.header("Authorization", &self.bearer);
            }
            let mut resp = req
                .call()
                .map_err(|e| Problem::Fatal(format!("cannot download {path} from {at}: {e}")))?;
            match resp.status().as_u16() {
                200..=299 => {
                    return resp
                        .body_mut()
                        .with_config()
                        .limit(MAX_BODY)
                        .read_to_vec()
                        .map_err(|e| {
                            Problem::Skip(format!("downloading its {path} broke off: {e}"))
                        });
                }
                301 | 302 | 303 | 307 | 308 => {
                    let location = resp
                        .headers()
                        .get("location")
                        .and_then(|l| l.to_str().ok())
                        .ok_or_else(|| Problem::Skip(format!("{at} redirected {path} nowhere")))?;
                    uri = redirect_target(&uri, location).ok_or_else(|| {
                        Problem::Skip(format!("{at} redirected {path} to a non-http(s) URL"))
                    })?;
                }
                s @ (404 | 410) => {
                    return Err(Problem::Skip(format!(
                        "its {path} is gone (HTTP {s}: expired or deleted)"
                    )));
                }
                s @ (401 | 403) if ours => {
                    return Err(Problem::Fatal(format!(
                        "the Buildkite API at {at} refused the token for {path} (HTTP {s}): it needs the read_artifacts scope"
                    )));
                }
                403 => {
                    return Err(Problem::Skip(format!(
                        "the download link of its {path} was refused (HTTP 403: expired link?)"
                    )));
                }
                s => {
                    return Err(Problem::Fatal(format!(
                        "downloading {path} from {at} failed with HTTP {s}"
                    )));
                }
            }
        }
        Err(Problem::Skip(format!(
            "its {path} download was redirected more than {MAX_REDIRECTS} times"
        )))
    }
}

fn first_job(b: &BuildNode) -> Option<&JobNode> {
    b.jobs
        .as_ref()?
        .edges
        .as_ref()?
        .iter()
        .flatten()
        .find_map(|e| e.node.as_ref())
}

/// Where a `Location` header points, relative to the URL that answered.
fn redirect_target(from: &Uri, location: &str) -> Option<Uri> {
    let target = if location.starts_with('/') && !location.starts_with("//") {
        format!("{}{location}", origin(from))
    } else {
        location.to_owned()
    };
    target.parse().ok().filter(is_http)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert!(same_origin(&u("https://a.b/x"), &u("https://A.b:443/y")));
        assert!(!same_origin(&u("https://a.b/x"), &u("http://a.b/x")));
        assert!(!same_origin(
            &u("http://127.0.0.1:1/x"),
            &u("http://127.0.0.1:2/x")
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:1/"),
            &u("http://localhost:1/")
        ));
        assert_eq!(
            redirect_target(&u("http://h:8/a/b"), "/c?d=1").unwrap(),
            u("http://h:8/c?d=1")
        );
        assert!(redirect_target(&u("http://h:8/a"), "s3://bucket/x").is_none());
    }

    #[test]
    fn log_hides_the_token() {
        let log = Log {
            secret: Some("s3cr3t-token".into()),
        };
        assert_eq!(log.redact("bad s3cr3t-token\nhere"), "bad [token] here");
        let short = Log {
            secret: Some("x".into()),
        };
        assert_eq!(short.redact("example"), "example");
    }
}
