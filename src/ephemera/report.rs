//! What people and scripts are told about the store: `list`, `show`, and
//! `invalidate` (a tombstone in the job's own scope).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::cli::KeyArgs;
use super::key::KeyInputs;
use super::manifest::{self, Entry, Manifest, ScopeIndex};
use super::restore::{Status, candidates, write_tombstone};
use super::scope::{Scope, component};
use super::store::Scoped;
use super::{Ctx, check_name, env, format_size, printable, short, show_paths};

/// An entry as `list --json` and `show --json` print it.
#[derive(Serialize)]
struct Listing<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    last_used: String,
    invalidated: bool,
    /// `exact` or `fallback` on the entry this job's restore would use.
    #[serde(skip_serializing_if = "Option::is_none")]
    restore: Option<&'static str>,
}

impl<'a> Listing<'a> {
    fn new(e: &'a Entry, chosen: &[(&Entry, Status)]) -> Self {
        Listing {
            manifest: &e.manifest,
            last_used: humantime::format_rfc3339_seconds(e.last_used).to_string(),
            invalidated: e.tombstoned,
            restore: chosen
                .iter()
                .find(|(c, _)| std::ptr::eq(*c, e))
                .map(|(_, st)| st.as_str()),
        }
    }
}

/// What a restore with key `inputs` would do, reading `readable` (the
/// job's restore scopes, in order): the entry it would try first.
fn prospect<'a>(
    readable: &[&'a ScopeIndex],
    inputs: &KeyInputs,
    fallback: bool,
) -> Option<(&'a Entry, Status)> {
    let key = inputs.key();
    candidates(readable, inputs, &key, fallback).next()
}

/// `exact (entry ID in SCOPE)`, `fallback (…, key K)` or `miss`.
fn describe(found: Option<(&Entry, Status)>) -> String {
    match found {
        None => Status::Miss.as_str().to_string(),
        Some((e, Status::Fallback)) => format!(
            "fallback (entry {} in {}, key {})",
            e.manifest.id, e.scope, e.manifest.key
        ),
        Some((e, st)) => format!("{} (entry {} in {})", st.as_str(), e.manifest.id, e.scope),
    }
}

fn entry_line(e: &Entry) -> String {
    let m = &e.manifest;
    printable(&format!(
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
    ))
    .into_owned()
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
    for index in scopes.iter().filter(|i| i.unreadable.is_some()) {
        eprintln!(
            "ephemera: warning: scope {} may hold more than listed: {}",
            index.scope,
            index.unreadable.as_deref().unwrap_or_default()
        );
    }
    let entries: Vec<&Entry> = scopes.iter().flat_map(|s| &s.entries).collect();
    // Inside a job: what a restore of each set would do, taking each set's
    // key inputs as its newest readable entry recorded them.
    let mut statuses: Vec<(String, String)> = Vec::new();
    let mut chosen: Vec<(&Entry, Status)> = Vec::new();
    if let Ok(job) = Scope::from_env(env) {
        let readable: Vec<&ScopeIndex> = job
            .restore_scopes(ctx.policy)
            .iter()
            .filter_map(|s| scopes.iter().find(|i| i.scope == s.prefix()))
            .collect();
        let mut names: Vec<&str> = readable
            .iter()
            .flat_map(|i| i.entries.iter().map(|e| e.manifest.name.as_str()))
            .collect();
        names.sort();
        names.dedup();
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        for name in names {
            let newest = readable
                .iter()
                .flat_map(|i| i.entries.iter())
                .filter(|e| e.manifest.name == name)
                .max_by(|a, b| a.manifest.id.cmp(&b.manifest.id))
                .expect("the name comes from an entry");
            let k = &newest.manifest.key_inputs;
            let files: Vec<String> = k.files.iter().map(|f| f.path.clone()).collect();
            let line = match KeyInputs::collect(name, &k.salt, &files, k.drv.as_deref(), &cwd) {
                Ok(inputs) => {
                    let found = prospect(&readable, &inputs, ctx.options.fallback);
                    chosen.extend(found);
                    describe(found)
                }
                Err(e) => format!("unknown ({e:#})"),
            };
            statuses.push((name.to_string(), printable(&line).into_owned()));
        }
    }
    if json {
        let out: Vec<Listing> = entries
            .into_iter()
            .map(|e| Listing::new(e, &chosen))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        eprintln!("ephemera: no entries in {}", ctx.store.location(&prefix));
    }
    for e in entries {
        println!("{}", entry_line(e));
    }
    if !statuses.is_empty() {
        println!(
            "a restore in this job would be (with each set's key files, salt and derivation as \
             its newest entry recorded them{}):",
            if ctx.options.fallback {
                ", --fallback"
            } else {
                ""
            }
        );
        for (name, line) in statuses {
            println!("  {name}: {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn show(ctx: &Ctx, name: &str, key: &KeyArgs, json: bool) -> Result<ExitCode> {
    check_name(name)?;
    let job = Scope::from_env(env)?;
    let readable = job.restore_scopes(ctx.policy);
    let mut scopes = readable.clone();
    if let Some(w) = job.write_scope(ctx.policy).filter(|w| !scopes.contains(w)) {
        scopes.push(w);
    }
    let (cwd, _) = ctx.anchors()?;
    let current = key.inputs(name, &cwd);
    let mut indexes = Vec::new();
    for scope in &scopes {
        indexes.push(manifest::load_scope(&ctx.store, &scope.prefix(), Some(name)).await?);
    }
    let read: Vec<&ScopeIndex> = indexes[..readable.len()].iter().collect();
    let found = current
        .as_ref()
        .ok()
        .and_then(|k| prospect(&read, k, ctx.options.fallback));
    let chosen: Vec<(&Entry, Status)> = found.into_iter().collect();
    let all: Vec<&Entry> = indexes.iter().flat_map(|i| &i.entries).collect();
    if json {
        let out: Vec<Listing> = all.iter().map(|e| Listing::new(e, &chosen)).collect();
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
        Ok(k) => println!("current key: {}", k.key()),
        Err(e) => println!("current key: unknown ({e:#})"),
    }
    println!(
        "a restore would be: {}",
        match &current {
            Ok(_) => describe(found),
            Err(_) => "unknown".to_string(),
        }
    );
    for e in &all {
        let mark = match chosen.first() {
            Some((c, st)) if std::ptr::eq(*c, *e) => {
                format!("  <- restore would use this ({})", st.as_str())
            }
            _ => String::new(),
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
