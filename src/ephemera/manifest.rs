//! Manifests, tombstones and how a scope's objects are laid out:
//!
//! ```text
//! <scope>/blobs/<sha256>.tar.zst             the archive, named by content
//! <scope>/entries/<name>/<key>/<id>.json     manifest (created once, never replaced)
//! <scope>/used/<name>/<key>/<id>             last use (the object's own time)
//! <scope>/tombstones/<name>/<id>.json        invalidation (created once)
//! ```
//!
//! Ids start with the creation time in nanoseconds, so they sort by age.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::anchor::SavedPath;
use super::check_name;
use super::key::KeyInputs;
use super::scope::split_scope;
use super::store::{Listed, Store};

/// Bumped when the manifest's meaning changes.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tool_version: String,
    pub id: String,
    pub name: String,
    pub scope: String,
    pub key: String,
    pub key_inputs: KeyInputs,
    /// SHA-256 of the compressed archive (the blob).
    pub sha256: String,
    /// Compressed size in bytes.
    pub size: u64,
    pub unpacked_size: u64,
    pub entries: u64,
    pub paths: Vec<SavedPath>,
    /// The rules that picked the files in `paths`, when not just the paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    pub created_at: String,
    pub created_by: CreatedBy,
}

/// The Buildkite job that wrote an entry or tombstone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreatedBy {
    pub build_id: Option<String>,
    pub build_number: Option<String>,
    pub build_url: Option<String>,
    pub job_id: Option<String>,
    pub step_key: Option<String>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub agent: Option<String>,
}

impl CreatedBy {
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> CreatedBy {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        CreatedBy {
            build_id: var("BUILDKITE_BUILD_ID"),
            build_number: var("BUILDKITE_BUILD_NUMBER"),
            build_url: var("BUILDKITE_BUILD_URL"),
            job_id: var("BUILDKITE_JOB_ID"),
            step_key: var("BUILDKITE_STEP_KEY"),
            branch: var("BUILDKITE_BRANCH"),
            commit: var("BUILDKITE_COMMIT"),
            agent: var("BUILDKITE_AGENT_NAME"),
        }
    }

    /// "build 42 (url) job 0190…" for provenance lines.
    pub fn describe(&self) -> String {
        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
        let mut s = format!("build {}", or(&self.build_number));
        if let Some(url) = &self.build_url {
            s.push_str(&format!(" ({url})"));
        }
        s.push_str(&format!(" job {}", or(&self.job_id)));
        s
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    pub format: u32,
    pub id: String,
    pub name: String,
    /// Only this key; all keys of the name when absent.
    pub key: Option<String>,
    pub created_at: String,
    pub created_by: CreatedBy,
}

/// A new id: creation time in nanoseconds, then the process, so two
/// writers in one scope do not pick the same name.
pub fn new_id(now: SystemTime) -> String {
    let nanos = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:020}-{}", std::process::id())
}

pub fn now_rfc3339(now: SystemTime) -> String {
    humantime::format_rfc3339_nanos(now).to_string()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

pub fn entry_key(scope: &str, name: &str, key: &str, id: &str) -> String {
    format!("{scope}/entries/{name}/{key}/{id}.json")
}

pub fn used_key(scope: &str, name: &str, key: &str, id: &str) -> String {
    format!("{scope}/used/{name}/{key}/{id}")
}

pub fn blob_key(scope: &str, sha256: &str) -> String {
    format!("{scope}/blobs/{sha256}.tar.zst")
}

pub fn tombstone_key(scope: &str, name: &str, id: &str) -> String {
    format!("{scope}/tombstones/{name}/{id}.json")
}

/// An entry found in a scope.
#[derive(Debug, Clone)]
pub struct Entry {
    pub manifest: Manifest,
    /// The scope its manifest lies in (the manifest's own `scope` field
    /// agrees, or it would not be an entry).
    pub scope: String,
    /// Its manifest's store key.
    pub path: String,
    pub last_used: SystemTime,
    pub tombstoned: bool,
}

impl Entry {
    /// Keys are derived from where the manifest lies, never from what it
    /// says, so no entry can name another scope's objects.
    pub fn used_key(&self) -> String {
        let m = &self.manifest;
        used_key(&self.scope, &m.name, &m.key, &m.id)
    }

    pub fn blob_key(&self) -> String {
        blob_key(&self.scope, &self.manifest.sha256)
    }
}

/// An object in a scope that is not what its place says (a manifest whose
/// fields disagree with its key, an unknown object…), with the reason.
#[derive(Debug, Clone)]
pub struct Junk {
    pub listed: Listed,
    pub reason: String,
}

/// Everything stored in one scope.
#[derive(Debug, Default)]
pub struct ScopeIndex {
    pub scope: String,
    /// Newest first.
    pub entries: Vec<Entry>,
    pub tombstones: Vec<(Listed, Tombstone)>,
    pub blobs: Vec<Listed>,
    /// Last-use markers (also those whose entry is gone).
    pub used: Vec<Listed>,
    /// Objects that are not what their place says (forged or unreadable
    /// manifests…): never acted upon.
    pub junk: Vec<Junk>,
    /// Why an object of the scope could not be read, if one could not: what
    /// it holds is unknown (an entry, a tombstone), so nothing in the scope
    /// may be acted upon.
    pub unreadable: Option<String>,
}

impl ScopeIndex {
    /// The newest live entry for `name` and `key`.
    pub fn newest<'a>(&'a self, name: &'a str, key: &'a str) -> Option<&'a Entry> {
        self.live(name, key).next()
    }

    /// Live entries for `name` and `key`, newest first.
    pub fn live<'a>(&'a self, name: &'a str, key: &'a str) -> impl Iterator<Item = &'a Entry> {
        self.entries
            .iter()
            .filter(move |e| !e.tombstoned && e.manifest.name == name && e.manifest.key == key)
    }

    /// Bytes used by the scope's blobs.
    pub fn usage(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

/// Largest manifest or tombstone read; anything bigger is not one of ours
/// (a manifest lists a few paths and key files). `gc` and `list` hold every
/// manifest of what they list in memory, so this bounds what one object a
/// pull request wrote costs them.
pub const MAX_MANIFEST: u64 = 64 << 10;
/// Most paths, rules or key files a manifest may list: parsed, each short
/// name costs far more memory than its bytes in the file, so a manifest of
/// many tiny names would multiply what a listing of the store takes.
pub const MAX_LISTED: usize = 256;

/// Why a manifest lists too much, if it does (persist refuses to write
/// such a manifest; a listing skips it).
pub fn too_many(m: &Manifest) -> Option<String> {
    [
        ("paths", m.paths.len()),
        ("rules", m.rules.len()),
        ("key files", m.key_inputs.files.len()),
    ]
    .into_iter()
    .find(|(_, n)| *n > MAX_LISTED)
    .map(|(what, n)| format!("it lists {n} {what}, more than {MAX_LISTED}"))
}

/// Why a manifest read from `key` in `scope` is not an entry, if it is not.
fn refuse_manifest(m: &Manifest, scope: &str, key: &str) -> Option<String> {
    let id_ok =
        m.id.split_once('-')
            .is_some_and(|(t, p)| t.len() == 20 && [t, p].iter().all(|x| digits(x)));
    if m.scope != scope {
        Some(format!(
            "it says scope {:?} but lies in scope {scope}",
            shorten(&m.scope)
        ))
    } else if m.format != MANIFEST_FORMAT {
        Some(format!("unknown manifest format {}", m.format))
    } else if check_name(&m.name).is_err() || !is_sha256(&m.key) || !id_ok {
        Some("its name, key or id is not valid".into())
    } else if key != entry_key(scope, &m.name, &m.key, &m.id) {
        Some("its name, key or id disagree with its place".into())
    } else if !is_sha256(&m.sha256) {
        Some("its sha256 is not valid".into())
    } else {
        too_many(m)
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// At most 200 characters of `s`, for messages about untrusted names.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// Load the scopes below `prefix` ("" for the whole store, or a scope's or
/// pipeline's prefix). With `name`, only that set's manifests are read.
///
/// What an object's place says is authoritative: a manifest or tombstone
/// whose fields disagree with its key is junk, never an entry, and an
/// entry's other objects are found from its place.
pub async fn load(store: &Store, prefix: &str, name: Option<&str>) -> Result<Vec<ScopeIndex>> {
    let mut scopes: HashMap<String, ScopeIndex> = HashMap::new();
    let mut manifests = Vec::new();
    let mut used = HashMap::new();
    for obj in store.list(prefix).await? {
        let Some((scope, rest)) = split_scope(&obj.key) else {
            continue;
        };
        let index = scopes
            .entry(scope.to_string())
            .or_insert_with(|| ScopeIndex {
                scope: scope.to_string(),
                ..Default::default()
            });
        let parts: Vec<&str> = rest.split('/').collect();
        let junk = |reason: &str| Junk {
            listed: obj.clone(),
            reason: reason.to_string(),
        };
        match parts.as_slice() {
            ["entries", n, _, file] if file.ends_with(".json") => {
                if name.is_none_or(|want| want == *n) {
                    manifests.push(obj);
                }
            }
            ["used", _, _, _] => {
                // Keyed by the whole key: a mark in one scope never says
                // when another scope's entry was used.
                used.insert(obj.key.clone(), obj.modified);
                index.used.push(obj);
            }
            ["tombstones", n, file] if file.ends_with(".json") => {
                if name.is_some_and(|want| want != *n) {
                    continue;
                }
                match read_json::<Tombstone>(store, &obj).await {
                    Read::Gone => {}
                    Read::Bad(reason) => index.junk.push(junk(&reason)),
                    Read::Unreadable(reason) => {
                        index.unreadable.get_or_insert(reason.clone());
                        index.junk.push(junk(&reason));
                    }
                    Read::Ok(t) if t.name == *n && format!("{}.json", t.id) == *file => {
                        index.tombstones.push((obj, t));
                    }
                    Read::Ok(_) => {
                        index
                            .junk
                            .push(junk("its name or id disagree with its place"));
                    }
                }
            }
            ["blobs", file] if file.ends_with(".tar.zst") => index.blobs.push(obj),
            _ => index.junk.push(junk("nothing of ephemera's lies there")),
        }
    }
    for obj in manifests {
        let (scope, _) = split_scope(&obj.key).expect("checked above");
        let index = scopes.get_mut(scope).expect("created above");
        let m = match read_json::<Manifest>(store, &obj).await {
            Read::Gone => continue,
            Read::Unreadable(reason) => {
                index.unreadable.get_or_insert(reason.clone());
                index.junk.push(Junk {
                    listed: obj,
                    reason,
                });
                continue;
            }
            Read::Ok(m) => match refuse_manifest(&m, scope, &obj.key) {
                None => m,
                Some(reason) => {
                    index.junk.push(Junk {
                        listed: obj,
                        reason,
                    });
                    continue;
                }
            },
            Read::Bad(reason) => {
                index.junk.push(Junk {
                    listed: obj,
                    reason,
                });
                continue;
            }
        };
        let marker = used_key(scope, &m.name, &m.key, &m.id);
        let last_used = used.get(&marker).copied().unwrap_or(obj.modified);
        index.entries.push(Entry {
            manifest: m,
            scope: scope.to_string(),
            path: obj.key,
            last_used,
            tombstoned: false,
        });
    }
    let mut out: Vec<ScopeIndex> = scopes.into_values().collect();
    for index in &mut out {
        // The newest tombstone of each name (all keys) and of each name and
        // key, `None` when one's time cannot be read: one pass over each,
        // however many a scope holds.
        let mut newest: HashMap<(&str, Option<&str>), Option<SystemTime>> = HashMap::new();
        for (_, t) in &index.tombstones {
            let time = parse_time(&t.created_at);
            newest
                .entry((t.name.as_str(), t.key.as_deref()))
                .and_modify(|n| *n = n.zip(time).map(|(a, b)| a.max(b)))
                .or_insert(time);
        }
        for entry in &mut index.entries {
            let m = &entry.manifest;
            let created = parse_time(&m.created_at);
            entry.tombstoned = [None, Some(m.key.as_str())].into_iter().any(|key| {
                match (newest.get(&(m.name.as_str(), key)), created) {
                    (None, _) => false,
                    (Some(Some(t)), Some(c)) => *t >= c,
                    // An entry whose time cannot be read is not trusted.
                    _ => true,
                }
            });
        }
        index
            .entries
            .sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id));
    }
    out.sort_by(|a, b| a.scope.cmp(&b.scope));
    Ok(out)
}

/// Load one scope (empty if it holds nothing); an object of it that cannot
/// be read is an error (never a reason to restore, evict or delete).
pub async fn load_scope(store: &Store, scope: &str, name: Option<&str>) -> Result<ScopeIndex> {
    let found = load(store, scope, name).await?;
    let index = found
        .into_iter()
        .find(|s| s.scope == scope)
        .unwrap_or_else(|| ScopeIndex {
            scope: scope.to_string(),
            ..Default::default()
        });
    if let Some(why) = &index.unreadable {
        bail!("{why}: check the store, or remove that object if it is not ephemera's");
    }
    Ok(index)
}

enum Read<T> {
    Ok(T),
    /// Deleted since it was listed (a concurrent gc or eviction).
    Gone,
    /// Too big, or not JSON of that shape.
    Bad(String),
    /// The store refused to give it (why, shortened): its scope is
    /// [`ScopeIndex::unreadable`]. A writer of a scope's prefix can store
    /// such objects (on S3, in the GLACIER class, or encrypted with their
    /// own key), so this must not stop a listing of the other scopes.
    Unreadable(String),
}

async fn read_json<T: for<'de> Deserialize<'de>>(store: &Store, obj: &Listed) -> Read<T> {
    if obj.size > MAX_MANIFEST {
        return Read::Bad(format!("it is bigger than {MAX_MANIFEST} bytes"));
    }
    match store.get_capped(&obj.key, MAX_MANIFEST).await {
        Err(e) => Read::Unreadable(shorten(&format!("{e:#}"))),
        Ok(None) => Read::Gone,
        Ok(Some(None)) => Read::Bad(format!("it is bigger than {MAX_MANIFEST} bytes")),
        Ok(Some(Some(bytes))) => match serde_json::from_slice(&bytes) {
            Ok(v) => Read::Ok(v),
            Err(_) => Read::Bad("it is not a valid manifest or tombstone".into()),
        },
    }
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_with_nanoseconds() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(parse_time(&now_rfc3339(t)), Some(t));
        assert!(new_id(t).starts_with("01700000000123456789-"));
    }
}
