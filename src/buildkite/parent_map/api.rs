//! Buildkite's GraphQL API, as the parent-map search uses it: the token,
//! the query for passed builds with their generating job's artifacts, and
//! artifact downloads that never send the token to another origin.

use std::time::Duration;

use camino::Utf8Path;

use serde::Deserialize;
use serde_json::{Value, json};
use ureq::http::Uri;

use super::FetchArgs;
use crate::drvmap::DrvMap;

// ureq: a blocking client is all one request at a time needs, it brings
// rustls (no OpenSSL on the agents), and it lets redirects be followed by
// hand so that the token only ever goes to the API's own host.

pub const DEFAULT_API_URL: &str = "https://graphql.buildkite.com/v1";
const MAX_REDIRECTS: usize = 5;
/// Larger responses are refused rather than read into memory.
const MAX_BODY: u64 = 512 * 1024 * 1024;

/// The API token. Never printed: its Debug says nothing, and every line
/// drvkite prints while it is known goes through [`super::Log`].
pub(super) struct Token(String);

impl Token {
    /// The token itself, for the log to blot out.
    pub(super) fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(hidden)")
    }
}

/// What went wrong with one candidate build, or with the whole search.
pub(super) enum Problem {
    /// This build has no usable map: try the next one.
    Skip(String),
    /// Nothing else will work either (token, API, network): stop.
    Fatal(String),
}

pub(super) fn resolve_token(token_file: Option<&Utf8Path>) -> Result<Token, String> {
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
pub(super) struct BuildNode {
    pub uuid: String,
    pub number: u64,
    pub url: String,
    pub commit: String,
    pub branch: String,
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

pub(super) struct Api<'a> {
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
    pub(super) fn new(args: &'a FetchArgs, token: Token) -> Result<Self, String> {
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
    pub(super) fn builds(
        &self,
        commits: Option<&[String]>,
        first: usize,
    ) -> Result<Vec<BuildNode>, String> {
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
    pub(super) fn take_map(&self, b: &BuildNode) -> Result<(DrvMap, Option<String>), Problem> {
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
}
