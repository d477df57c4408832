//! Typed values that cross module boundaries: target labels, attribute
//! paths, derivation store paths and Buildkite step keys.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, bail};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A target's label as readTree spells it: `tools/foo` or `tools/foo:sub`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    pub fn new(s: impl Into<String>) -> Self {
        Label(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The attribute path of a target below the depot root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttrPath(Vec<String>);

impl AttrPath {
    pub fn new(parts: Vec<String>) -> Self {
        AttrPath(parts)
    }
    pub fn parts(&self) -> &[String] {
        &self.0
    }
    /// A new path with `more` appended.
    pub fn join<I, S>(&self, more: I) -> AttrPath
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut parts = self.0.clone();
        parts.extend(more.into_iter().map(Into::into));
        AttrPath(parts)
    }
}

/// The Nix store directory drvkite works with.
pub const STORE_DIR: &str = "/nix/store";

/// The absolute path of a `.drv` file in the Nix store, validated on
/// construction: `/nix/store/<32 nixbase32 chars>-<name>.drv`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DrvPath(String);

/// Hashes the 32-character hash part only: it already tells paths apart,
/// and the graph keeps tens of thousands of paths in hash maps.
impl std::hash::Hash for DrvPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.basename()[..32].hash(state)
    }
}

#[cfg(test)]
const NIXBASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// Whether `b` is in [`NIXBASE32`] (which lacks e, o, t and u), without a
/// search: every evaluated and every read derivation path is checked.
fn is_nixbase32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

impl DrvPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn basename(&self) -> &str {
        &self.0[STORE_DIR.len() + 1..]
    }

    /// The 32-character store hash.
    pub fn hash(&self) -> &str {
        &self.basename()[..32]
    }

    /// The derivation's name, without hash and `.drv` suffix.
    pub fn name(&self) -> &str {
        let base = self.basename();
        &base[33..base.len() - 4]
    }

    /// The Buildkite key of the build step for this derivation. Only the
    /// hash is used: it is short, unique and needs no escaping.
    pub fn step_key(&self) -> StepKey {
        StepKey(format!("drv-{}", self.hash()))
    }
}

/// The part of `s` after the store directory, when `s` is a store path:
/// 32 nixbase32 characters, `-`, and a name of Nix's allowed characters.
fn store_basename(s: &str) -> Option<&str> {
    let base = s.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let (hash, rest) = base.split_at_checked(32)?;
    let name = rest.strip_prefix('-')?;
    let valid = hash.bytes().all(is_nixbase32)
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
    valid.then_some(base)
}

impl FromStr for DrvPath {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if !s.starts_with(STORE_DIR) {
            bail!("{s:?} is not a path in {STORE_DIR}");
        }
        match store_basename(s) {
            Some(base) if base.len() > 33 + 4 && base.ends_with(".drv") => {}
            _ => bail!("{s:?} is not a store path of a .drv file"),
        }
        Ok(DrvPath(s.to_owned()))
    }
}

/// Any store path, such as a derivation's output: `/nix/store/<32
/// nixbase32 chars>-<name>`, validated on construction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<hash>-<name>`, as narinfo files write references.
    pub fn basename(&self) -> &str {
        &self.0[STORE_DIR.len() + 1..]
    }

    /// The 32-character store hash, which names the path's narinfo.
    pub fn hash(&self) -> &str {
        &self.basename()[..32]
    }
}

impl FromStr for StorePath {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        store_basename(s).with_context(|| format!("{s:?} is not a path in {STORE_DIR}"))?;
        Ok(StorePath(s.to_owned()))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for DrvPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for DrvPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DrvPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A Buildkite step key (`drv-<hash>`, `extra-step-<sha1>`, `:init:`, …).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepKey(String);

impl StepKey {
    pub fn new(s: impl Into<String>) -> Self {
        StepKey(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nixbase32_check_is_the_alphabet() {
        for b in 0..=u8::MAX {
            assert_eq!(is_nixbase32(b), NIXBASE32.as_bytes().contains(&b), "{b}");
        }
    }

    #[test]
    fn drv_path_parts() {
        let p: DrvPath = "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a.drv"
            .parse()
            .unwrap();
        assert_eq!(p.hash(), "9knhsmy055kqkfcl5k0scg07ckny2maw");
        assert_eq!(p.name(), "lib-a");
        assert_eq!(
            p.step_key().as_str(),
            "drv-9knhsmy055kqkfcl5k0scg07ckny2maw"
        );
    }

    #[test]
    fn drv_path_rejects_bad_paths() {
        for bad in [
            "",
            "/nix/store/short-x.drv",
            "/tmp/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a.drv",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maE-lib-a.drv",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a b.drv",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-.drv",
        ] {
            assert!(bad.parse::<DrvPath>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn store_path_parts_and_bad_paths() {
        let p: StorePath = "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a-doc"
            .parse()
            .unwrap();
        assert_eq!(p.hash(), "9knhsmy055kqkfcl5k0scg07ckny2maw");
        assert_eq!(p.basename(), "9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a-doc");
        for bad in [
            "",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2mae-x",
            "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a/b",
            "/nix/storeX9knhsmy055kqkfcl5k0scg07ckny2maw-x",
        ] {
            assert!(bad.parse::<StorePath>().is_err(), "{bad:?} accepted");
        }
    }
}
