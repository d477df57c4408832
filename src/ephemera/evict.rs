//! Eviction: what leaves the store and when. A persist keeps its own
//! scope under `--max-scope-size` (least recently used entries first, never
//! another scope's); `gc` removes entries unused for `--max-age`,
//! invalidated entries and leftovers in the whole store.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use super::manifest::{self, Entry, ScopeIndex};
use super::{Ctx, age, format_size, short};

/// Unreferenced blobs younger than this may belong to a persist in
/// progress (blob uploaded, manifest not yet written): leave them.
const GRACE: Duration = Duration::from_secs(3600);

/// Keep the scope under its cap: evict invalidated entries, then the least
/// recently used ones, of this scope only (other scopes never pay for it).
pub(super) async fn make_room(
    ctx: &Ctx,
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
            ctx.store.delete(&blob.key).await?;
            usage -= blob.size;
        }
    }
    let mut candidates: Vec<&Entry> = index.entries.iter().collect();
    candidates.sort_by_key(|e| (!e.tombstoned, e.last_used));
    for e in candidates {
        if usage <= cap {
            return Ok(());
        }
        ctx.store.delete(&e.path).await?;
        ctx.store.delete(&e.used_key()).await?;
        let blob = e.blob_key();
        let left = refs.get_mut(&blob).expect("counted above");
        *left -= 1;
        if *left == 0 && blob != new_blob {
            ctx.store.delete(&blob).await?;
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

pub(super) async fn gc(ctx: &Ctx, max_age: Duration, dry_run: bool) -> Result<ExitCode> {
    let now = SystemTime::now();
    let scopes = manifest::load(&ctx.store, "", None).await?;
    let mut doomed: Vec<String> = Vec::new();
    let (mut entries_removed, mut kept, mut bytes) = (0usize, 0usize, 0u64);
    for index in &scopes {
        let mut live_blobs = HashSet::new();
        let mut live_markers = HashSet::new();
        let mut evicted_blobs = HashSet::new();
        for e in &index.entries {
            if e.tombstoned || age(now, e.last_used) > max_age {
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
            if age(now, j.modified) > GRACE {
                doomed.push(j.key.clone());
            }
        }
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
         {kept} entries used within {}",
        if dry_run { "would remove" } else { "removed" },
        format_size(bytes),
        doomed.len(),
        humantime::format_duration(max_age)
    );
    Ok(ExitCode::SUCCESS)
}
