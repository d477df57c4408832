//! The search for a parent build: the merge-base of this commit with the
//! default branch, its first-parent ancestors, then the newest passed
//! default-branch builds; the first build with a usable map wins.

use std::collections::HashSet;
use std::process::Command;

use camino::Utf8Path;
use serde_json::{Value, json};

use super::api::{Api, BuildNode, Problem, resolve_token};
use super::{FetchArgs, Found, Log};
use crate::buildkite::{minor_group, short_branch};
use crate::drvmap::DrvMap;

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

pub(super) fn find(args: &FetchArgs, log: &mut Log) -> Result<Found, String> {
    let token = resolve_token(args.token_file.as_deref())?;
    log.secret = Some(token.secret().to_owned());
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
