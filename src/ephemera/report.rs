//! What people and scripts are told about the store: `list`, `show`, and
//! `invalidate` (a tombstone in the job's own scope).

use std::process::ExitCode;

use anyhow::{Result, bail};
use serde::Serialize;

use super::cli::KeyArgs;
use super::manifest::{self, Entry, Manifest};
use super::restore::write_tombstone;
use super::scope::{Scope, component};
use super::store::Scoped;
use super::{Ctx, check_name, env, format_size, short, show_paths};

/// An entry as `list --json` and `show --json` print it.
#[derive(Serialize)]
struct Listing<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    last_used: String,
    invalidated: bool,
}

impl<'a> From<&'a Entry> for Listing<'a> {
    fn from(e: &'a Entry) -> Self {
        Listing {
            manifest: &e.manifest,
            last_used: humantime::format_rfc3339_seconds(e.last_used).to_string(),
            invalidated: e.tombstoned,
        }
    }
}

fn entry_line(e: &Entry) -> String {
    let m = &e.manifest;
    format!(
        "{}  {}  key={}  sha256={}  {}  paths={}  created {} by {}  last used {}{}",
        m.scope,
        m.name,
        short(&m.key),
        short(&m.sha256),
        format_size(m.size),
        show_paths(m),
        m.created_at,
        m.created_by.describe(),
        humantime::format_rfc3339_seconds(e.last_used),
        if e.tombstoned { "  (invalidated)" } else { "" }
    )
}

pub(super) async fn list(ctx: &Ctx, json: bool) -> Result<ExitCode> {
    let prefix = match (
        env("BUILDKITE_ORGANIZATION_SLUG").filter(|v| !v.is_empty()),
        env("BUILDKITE_PIPELINE_SLUG").filter(|v| !v.is_empty()),
    ) {
        (Some(org), Some(pipeline)) => format!("{}/{}", component(&org), component(&pipeline)),
        _ => String::new(),
    };
    let scopes = manifest::load(&ctx.store, &prefix, None).await?;
    let entries: Vec<&Entry> = scopes.iter().flat_map(|s| &s.entries).collect();
    if json {
        let out: Vec<Listing> = entries.into_iter().map(Listing::from).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if entries.is_empty() {
        eprintln!("ephemera: no entries in {}", ctx.store.location(&prefix));
    } else {
        for e in entries {
            println!("{}", entry_line(e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn show(ctx: &Ctx, name: &str, key: &KeyArgs, json: bool) -> Result<ExitCode> {
    check_name(name)?;
    let job = Scope::from_env(env)?;
    let mut scopes = job.restore_scopes(ctx.policy);
    if let Some(w) = job.write_scope(ctx.policy).filter(|w| !scopes.contains(w)) {
        scopes.push(w);
    }
    let readable = job.restore_scopes(ctx.policy);
    let (cwd, _) = ctx.anchors()?;
    let current = key.inputs(name, &cwd).map(|k| k.key());
    let mut chosen: Option<String> = None;
    let mut all = Vec::new();
    for scope in &scopes {
        let index = manifest::load_scope(&ctx.store, &scope.prefix(), Some(name)).await?;
        if chosen.is_none()
            && readable.contains(scope)
            && let Ok(k) = &current
        {
            chosen = index.newest(name, k).map(|e| e.manifest.id.clone());
        }
        all.extend(index.entries);
    }
    if json {
        let out: Vec<Listing> = all.iter().map(Listing::from).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job scope: {job}");
    let shown: Vec<String> = readable.iter().map(|s| s.prefix()).collect();
    println!(
        "restores from: {}",
        if shown.is_empty() {
            "nothing".to_string()
        } else {
            shown.join(", ")
        }
    );
    match &current {
        Ok(k) => println!("current key: {k}"),
        Err(e) => println!("current key: unknown ({e:#})"),
    }
    for e in &all {
        let mark = if chosen.as_deref() == Some(e.manifest.id.as_str()) {
            "  <- restore would use this"
        } else {
            ""
        };
        println!("{}{mark}", entry_line(e));
    }
    if all.is_empty() {
        println!("no entries of {name}");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn invalidate(ctx: &Ctx, name: &str, key: Option<String>) -> Result<ExitCode> {
    check_name(name)?;
    if let Some(k) = &key
        && !manifest::is_sha256(k)
    {
        bail!("--key {k} is not a key: copy it from `drvkite ephemera show {name}`");
    }
    // A job invalidates in its own scope: a pull request can never hide
    // (or unhide) the default branch's seeds.
    let job = Scope::from_env(env)?;
    write_tombstone(&Scoped::new(&ctx.store, job.prefix()), name, key.clone()).await?;
    println!(
        "ephemera: invalidated {name} ({}) in scope {job}: restores skip entries created before now",
        key.map_or("all keys".to_string(), |k| format!("key {k}"))
    );
    Ok(ExitCode::SUCCESS)
}
