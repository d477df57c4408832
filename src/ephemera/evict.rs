//! Eviction: what leaves the store and when. A persist keeps its own
//! scope under `--max-scope-size` (least recently used entries first, never
//! another scope's); `gc` removes entries unused for `--max-age`,
//! invalidated entries and leftovers in the whole store.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use super::manifest::{self, Entry, ScopeIndex};
use super::store::Scoped;
use super::{Ctx, age, format_size, short};

/// Unreferenced blobs younger than this may belong to a persist in
/// progress (blob uploaded, manifest not yet written): leave them.
const GRACE: Duration = Duration::from_secs(3600);

/// Keep the scope under its cap: evict invalidated entries, then the least
/// recently used ones, of this scope only (other scopes never pay for it).
pub(super) async fn make_room(
    ctx: &Ctx,
    job: &Scoped<'_>,
    index: &ScopeIndex,
    name: &str,
    size: u64,
    sha256: &str,
) -> Result<()> {
    let cap = ctx.options.max_scope_size;
    if size > cap {
        bail!(
            "ephemera set {name} is {} compressed, more than --max-scope-size ({}): raise the cap \
             or persist less",
            format_size(size),
            format_size(cap)
        );
    }
    let new_blob = manifest::blob_key(&index.scope, sha256);
    let blob_sizes: HashMap<&str, u64> = index
        .blobs
        .iter()
        .map(|b| (b.key.as_str(), b.size))
        .collect();
    let mut usage = index.usage();
    if !blob_sizes.contains_key(new_blob.as_str()) {
        usage += size;
    }
    let mut refs: HashMap<String, usize> = HashMap::new();
    for e in &index.entries {
        *refs.entry(e.blob_key()).or_default() += 1;
    }
    let now = SystemTime::now();
    for blob in &index.blobs {
        if usage <= cap {
            return Ok(());
        }
        if blob.key != new_blob && !refs.contains_key(&blob.key) && age(now, blob.modified) > GRACE
        {
            job.delete(&blob.key).await?;
            usage -= blob.size;
        }
    }
    let mut candidates: Vec<&Entry> = index.entries.iter().collect();
    candidates.sort_by_key(|e| (!e.tombstoned, e.last_used));
    for e in candidates {
        if usage <= cap {
            return Ok(());
        }
        job.delete(&e.path).await?;
        job.delete(&e.used_key()).await?;
        let blob = e.blob_key();
        let left = refs.get_mut(&blob).expect("counted above");
        *left -= 1;
        if *left == 0 && blob != new_blob {
            job.delete(&blob).await?;
            usage -= blob_sizes.get(blob.as_str()).copied().unwrap_or(0);
        }
        eprintln!(
            "ephemera: evicted {} entry {} (key {}, {}) to keep scope {} under {}",
            e.manifest.name,
            e.manifest.id,
            short(&e.manifest.key),
            if e.tombstoned {
                "invalidated".to_string()
            } else {
                format!(
                    "last used {}",
                    humantime::format_rfc3339_seconds(e.last_used)
                )
            },
            index.scope,
            format_size(cap)
        );
    }
    if usage > cap {
        bail!(
            "scope {} stays above --max-scope-size ({}) after evicting every entry: raise the cap",
            index.scope,
            format_size(cap)
        );
    }
    Ok(())
}

/// Remove what nobody used for `max_age`, invalidated entries and
/// leftovers, in every scope of the store. Only entries whose manifests
/// agree with their place are acted upon, and every key removed is derived
/// from where an object lies; anything else is left alone with a warning.
pub(super) async fn gc(ctx: &Ctx, max_age: Duration, dry_run: bool) -> Result<ExitCode> {
    let now = SystemTime::now();
    let scopes = manifest::load(&ctx.store, "", None).await?;
    let mut doomed: Vec<String> = Vec::new();
    let (mut entries_removed, mut kept, mut bytes) = (0usize, 0usize, 0u64);
    let mut skipped = 0usize;
    for index in &scopes {
        if let Some(why) = &index.unreadable {
            // What could not be read may be an entry whose archive would
            // look orphaned, or a tombstone: leave the whole scope alone.
            eprintln!(
                "ephemera gc: warning: leaving scope {} alone: {why}",
                index.scope
            );
            continue;
        }
        let stored: HashSet<&str> = index.blobs.iter().map(|b| b.key.as_str()).collect();
        let mut live_blobs = HashSet::new();
        let mut live_markers = HashSet::new();
        let mut evicted_blobs = HashSet::new();
        for e in &index.entries {
            // An entry whose archive is gone cannot be restored.
            let lost = !stored.contains(e.blob_key().as_str()) && age(now, e.last_used) > GRACE;
            if e.tombstoned || lost || age(now, e.last_used) > max_age {
                doomed.push(e.path.clone());
                doomed.push(e.used_key());
                evicted_blobs.insert(e.blob_key());
                entries_removed += 1;
            } else {
                live_blobs.insert(e.blob_key());
                live_markers.insert(e.used_key());
                kept += 1;
            }
        }
        // Young archives no entry names may belong to a persist in
        // progress (blob stored, manifest not yet).
        for b in &index.blobs {
            let orphan_old = age(now, b.modified) > GRACE;
            if !live_blobs.contains(&b.key) && (evicted_blobs.contains(&b.key) || orphan_old) {
                doomed.push(b.key.clone());
                bytes += b.size;
            }
        }
        for u in &index.used {
            if !live_markers.contains(&u.key) && age(now, u.modified) > GRACE {
                doomed.push(u.key.clone());
            }
        }
        for (l, _) in &index.tombstones {
            if age(now, l.modified) > max_age {
                doomed.push(l.key.clone());
            }
        }
        for j in &index.junk {
            skipped += 1;
            if skipped <= 20 {
                eprintln!(
                    "ephemera gc: warning: skipping {}: {} (remove it by hand if it is not \
                     yours)",
                    ctx.store.location(&j.listed.key),
                    j.reason
                );
            }
        }
    }
    if skipped > 20 {
        eprintln!(
            "ephemera gc: warning: skipping {} more objects that are not valid entries",
            skipped - 20
        );
    }
    doomed.sort();
    doomed.dedup();
    for key in &doomed {
        if dry_run {
            println!("would remove {}", ctx.store.location(key));
        } else {
            ctx.store.delete(key).await?;
        }
    }
    println!(
        "ephemera gc: {} {entries_removed} entries and {} of archives ({} objects), kept \
         {kept} entries used within {}{}",
        if dry_run { "would remove" } else { "removed" },
        format_size(bytes),
        doomed.len(),
        humantime::format_duration(max_age),
        if skipped > 0 {
            format!(", skipped {skipped} objects that are not valid entries")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
