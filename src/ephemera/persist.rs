//! `persist`: archive a set's paths into a new entry of the job's own
//! scope. Whether the job may write at all comes from [`super::scope`];
//! what may be archived from [`super::anchor`] and [`super::archive`];
//! keeping the scope under its cap from [`super::evict`].

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use super::anchor::{Anchors, SavedPath};
use super::archive::{self, Source};
use super::cli::KeyArgs;
use super::manifest::{self, Manifest};
use super::restore::touch;
use super::rules::{self, Rule, Selection};
use super::scope::Scope;
use super::store::{Hashing, Scoped};
use super::{Ctx, check_name, env, evict::make_room, format_size, show_paths};

pub(super) async fn persist(
    ctx: &Ctx,
    name: &str,
    paths: &[String],
    key: &KeyArgs,
) -> Result<ExitCode> {
    check_name(name)?;
    // In a post-command hook the agent tells how the command ended.
    if let Some(status) = env("BUILDKITE_COMMAND_EXIT_STATUS").filter(|s| s != "0") {
        eprintln!("ephemera: {name}: not persisting: the command failed (exit status {status})");
        return Ok(ExitCode::SUCCESS);
    }
    let job = Scope::from_env(env)?;
    let Some(scope) = job.write_scope(ctx.policy) else {
        eprintln!(
            "ephemera: {name}: not persisting: {job} is a default-branch build and trusted seeds \
             are off (DRVKITE_EPHEMERA_SEED)"
        );
        return Ok(ExitCode::SUCCESS);
    };
    let (cwd, anchors) = ctx.anchors()?;
    let inputs = key.inputs(name, &cwd)?;
    let key = inputs.key();
    let rules = paths
        .iter()
        .map(|p| rules::parse(p))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("ephemera set {name}"))?;
    // A restore of this set interrupted mid-swap would make a path look
    // missing: put it back first.
    let places: Vec<_> = rules
        .iter()
        .filter(|r| !r.exclude)
        .filter_map(|r| anchors.place(&r.fixed).ok())
        .collect();
    for back in archive::recover(&places) {
        eprintln!(
            "ephemera: {name}: put {} back as an interrupted restore left it",
            back.display()
        );
    }
    let (sources, placed) = sources_of(name, &rules, &anchors)?;
    if sources.is_empty() {
        eprintln!("ephemera: {name}: nothing to persist");
        return Ok(ExitCode::SUCCESS);
    }
    let recorded: Vec<String> = if rules::all_plain(&rules) {
        Vec::new()
    } else {
        rules.iter().map(|r| r.text.clone()).collect()
    };
    let mut selection = if rules::all_plain(&rules) {
        None
    } else {
        Some(Selection::new(rules, &placed)?)
    };

    let tmp = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    let mut writer = Hashing::new(
        BufWriter::new(tmp.reopen().context("cannot open the temporary file")?),
        ctx.options.max_entry_size,
    );
    let created =
        archive::create(&sources, selection.as_mut(), &mut writer, &ctx.limits()).map(|(s, _)| s);
    if writer.exceeded {
        bail!(
            "ephemera set {name} is bigger than --max-entry-size ({}) compressed: raise the cap \
             or persist less",
            format_size(ctx.options.max_entry_size)
        );
    }
    let summary = created.with_context(|| format!("cannot archive ephemera set {name}"))?;
    let (sha256, size, file) = writer.finish().context("cannot write the archive")?;
    file.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .context("cannot write the archive")?;
    report_left_out(name, &summary.skipped);
    if let Some(sel) = &selection
        && let Some(rule) = sel
            .rules
            .iter()
            .zip(&sel.matched)
            .find_map(|(r, n)| (r.must_match && *n == 0).then_some(r))
    {
        bail!(
            "ephemera set {name}: rule {} matched no file, folder or link, and `=` requires \
             one: nothing was persisted",
            rule.text
        );
    }

    let prefix = scope.prefix();
    let job = Scoped::new(&ctx.store, prefix.clone());
    let index = manifest::load_scope(&ctx.store, &prefix, None).await?;
    let blob = manifest::blob_key(&prefix, &sha256);
    // The same contents under the same key: nothing to store, as long as
    // the archive is still there (a concurrent eviction may have taken it).
    let stored = index.blobs.iter().any(|b| b.key == blob && b.size == size);
    if let Some(same) = index
        .newest(name, &key)
        .filter(|e| e.manifest.sha256 == sha256 && stored)
    {
        touch(&job, same).await;
        println!(
            "ephemera: {name} unchanged since entry {} in scope {scope} (sha256={sha256}): \
             nothing new stored",
            same.manifest.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    make_room(ctx, &job, &index, name, size, &sha256).await?;
    job.put_file(&blob, tmp.path()).await?;
    let now = SystemTime::now();
    let id = manifest::new_id(now);
    let m = Manifest {
        format: manifest::MANIFEST_FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        id: id.clone(),
        name: name.to_string(),
        scope: prefix.clone(),
        key: key.clone(),
        key_inputs: inputs,
        sha256: sha256.clone(),
        size,
        unpacked_size: summary.unpacked,
        entries: summary.entries,
        paths: sources.iter().map(|s| s.saved.clone()).collect(),
        rules: recorded,
        created_at: manifest::now_rfc3339(now),
        created_by: manifest::CreatedBy::from_env(env),
    };
    let entry_key = manifest::entry_key(&prefix, name, &key, &id);
    let bytes = serde_json::to_vec_pretty(&m)?;
    // Restores and listings skip such a manifest: do not write one.
    if let Some(why) = manifest::too_many(&m).or_else(|| {
        (bytes.len() as u64 > manifest::MAX_MANIFEST).then(|| {
            format!(
                "it would take {} bytes, more than {}",
                bytes.len(),
                manifest::MAX_MANIFEST
            )
        })
    }) {
        bail!(
            "ephemera set {name} cannot be recorded: {why}: persist fewer or shorter paths, rules \
             or key files"
        );
    }
    if !job.create(&entry_key, bytes).await? {
        bail!(
            "{} already exists: another job wrote the same entry id; run persist again",
            ctx.store.location(&entry_key)
        );
    }
    let used = manifest::used_key(&prefix, name, &key, &id);
    job.put(&used, manifest::now_rfc3339(now).into_bytes())
        .await?;
    println!(
        "ephemera: persisted {name} scope={scope} key={key} sha256={sha256} size={} \
         ({} files and folders, {} unpacked) paths={} location={}",
        format_size(size),
        summary.entries,
        format_size(summary.unpacked),
        show_paths(&m),
        ctx.store.location(&blob)
    );
    Ok(ExitCode::SUCCESS)
}

/// Tell what was left out (credentials, links leaving the path…), at most
/// 20 lines.
fn report_left_out(name: &str, skipped: &[String]) {
    const SHOWN: usize = 20;
    for what in skipped.iter().take(SHOWN) {
        eprintln!("ephemera: {name}: left out {what}");
    }
    if skipped.len() > SHOWN {
        eprintln!(
            "ephemera: {name}: left out {} more files, folders or links",
            skipped.len() - SHOWN
        );
    }
}

/// The folders a set's rules select from (nested ones merged into the
/// outermost), and where each rule's fixed folder is (`None`: missing).
fn sources_of(
    name: &str,
    rules: &[Rule],
    anchors: &Anchors,
) -> Result<(Vec<Source>, Vec<Option<SavedPath>>)> {
    let mut found: Vec<(Source, &Rule)> = Vec::new();
    let mut placed = Vec::new();
    for rule in rules {
        // Excludes only need placing: they never add anything.
        let at = if rule.exclude {
            anchors.locate(&rule.fixed)?
        } else {
            anchors.resolve(&rule.fixed)?
        };
        placed.push(at.as_ref().map(|(saved, _)| saved.clone()));
        let Some((saved, real)) = at else {
            if rule.must_match {
                bail!(
                    "ephemera set {name}: rule {} matches nothing ({} does not exist), and `=` \
                     requires a match: nothing was persisted",
                    rule.text,
                    rule.fixed
                );
            }
            if !rule.exclude {
                eprintln!(
                    "ephemera: {name}: {} does not exist, leaving it out",
                    rule.text
                );
            }
            continue;
        };
        if rule.exclude {
            continue;
        }
        if let Some((other, _)) = found.iter().find(|(s, r)| {
            r.glob.is_none()
                && rule.glob.is_none()
                && (s.real.starts_with(&real) || real.starts_with(&s.real))
        }) {
            bail!(
                "{} and {} overlap: give each path of ephemera set {name} once",
                rule.text,
                other.saved
            );
        }
        found.push((Source { saved, real }, rule));
    }
    // A rule's fixed folder inside another's is archived with it; the
    // others keep the order they were given in.
    let reals: Vec<PathBuf> = found.iter().map(|(s, _)| s.real.clone()).collect();
    let sources = found
        .into_iter()
        .enumerate()
        .filter(|(i, (s, _))| {
            !reals
                .iter()
                .enumerate()
                .any(|(j, r)| j != *i && s.real.starts_with(r) && (s.real != *r || j < *i))
        })
        .map(|(_, (s, _))| s)
        .collect();
    Ok((sources, placed))
}
