//! `.narinfo` files as Nix's binary caches serve them, and the ed25519
//! signatures that make one trustworthy.
//!
//! The rules are Nix's (2.8, `NarInfo`, `ValidPathInfo::fingerprint`,
//! `verifyDetached`): a narinfo is `Key: value` lines; `StorePath`, `URL`,
//! `NarHash` and a non-zero `NarSize` are required; a signature
//! `name:base64` is made by the key called `name` over the fingerprint
//! `1;<store path>;sha256:<nixbase32 NAR hash>;<NAR size>;<references as
//! full store paths, sorted, comma-separated>`.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::types::{STORE_DIR, StorePath};

const NIXBASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base-32 rendering of a hash (its own alphabet and bit order).
pub fn nixbase32_encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    (0..len)
        .rev()
        .map(|n| {
            let (i, j) = (n * 5 / 8, n * 5 % 8);
            let low = u16::from(bytes[i]) >> j;
            let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
            NIXBASE32[usize::from((low | high) & 0x1f)] as char
        })
        .collect()
}

/// The bytes of a nixbase32 string of a `size`-byte hash.
pub fn nixbase32_decode(s: &str, size: usize) -> Option<Vec<u8>> {
    if s.len() != (size * 8 - 1) / 5 + 1 {
        return None;
    }
    let mut out = vec![0u8; size];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIXBASE32.iter().position(|&a| a == c)? as u16;
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        match out.get_mut(i + 1) {
            Some(b) => *b |= carry as u8,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

/// A SHA-256 NAR hash in any form Nix accepts in a narinfo: `sha256:`
/// with base 16, nixbase32 or base 64, or SRI `sha256-<base64>`.
fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let bytes = if let Some(sri) = s.strip_prefix("sha256-") {
        BASE64.decode(sri).ok()?
    } else {
        let digest = s.strip_prefix("sha256:")?;
        match digest.len() {
            64 => hex::decode(digest).ok()?,
            52 => nixbase32_decode(digest, 32)?,
            44 => BASE64.decode(digest).ok()?,
            _ => return None,
        }
    };
    bytes.try_into().ok()
}

/// The parts of a narinfo that decide whether it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    /// Basenames (`<hash>-<name>`), as the file lists them.
    pub references: Vec<String>,
    /// `Sig` lines, `name:base64`.
    pub sigs: Vec<String>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<Self> {
        let (mut store_path, mut url, mut nar_hash, mut nar_size) = (None, None, None, None);
        let mut references = Vec::new();
        let mut sigs = Vec::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .with_context(|| format!("line {line:?} is not `Key: value`"))?;
            match key {
                "StorePath" => store_path = Some(value.parse::<StorePath>()?),
                "URL" => url = Some(value.to_owned()),
                "NarHash" => {
                    nar_hash = Some(
                        parse_sha256(value)
                            .with_context(|| format!("NarHash {value:?} is not a SHA-256 hash"))?,
                    )
                }
                "NarSize" => {
                    nar_size = Some(
                        value
                            .parse::<u64>()
                            .with_context(|| format!("NarSize {value:?} is not a number"))?,
                    )
                }
                "References" => {
                    references = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect();
                    for r in &references {
                        format!("{STORE_DIR}/{r}")
                            .parse::<StorePath>()
                            .with_context(|| format!("reference {r:?} is not a store path"))?;
                    }
                }
                "Sig" => sigs.push(value.to_owned()),
                _ => {}
            }
        }
        let store_path = store_path.context("no StorePath")?;
        let url = url.filter(|u| !u.is_empty()).context("no URL")?;
        let nar_hash = nar_hash.context("no NarHash")?;
        let nar_size = nar_size.filter(|&n| n > 0).context("no NarSize")?;
        Ok(NarInfo {
            store_path,
            url,
            nar_hash,
            nar_size,
            references,
            sigs,
        })
    }

    /// What the signatures sign (Nix's `ValidPathInfo::fingerprint`).
    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<&str> = self.references.iter().map(String::as_str).collect();
        refs.sort_unstable();
        refs.dedup();
        let refs: Vec<String> = refs.iter().map(|r| format!("{STORE_DIR}/{r}")).collect();
        format!(
            "1;{};sha256:{};{};{}",
            self.store_path,
            nixbase32_encode(&self.nar_hash),
            self.nar_size,
            refs.join(",")
        )
    }

    /// Whether one of the signatures is a valid one by a trusted key.
    pub fn signed_by(&self, keys: &TrustedKeys) -> bool {
        let fingerprint = self.fingerprint();
        self.sigs
            .iter()
            .any(|sig| keys.verify(fingerprint.as_bytes(), sig))
    }
}

/// `trusted-public-keys`: ed25519 public keys by name.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<(String, ed25519_dalek::VerifyingKey)>);

impl TrustedKeys {
    /// Parse `name:base64` keys. One that Nix would reject is an error:
    /// Nix then substitutes nothing, so nothing may be skipped.
    pub fn parse<S: AsRef<str>>(keys: &[S]) -> Result<Self> {
        let mut out = Vec::new();
        for key in keys {
            let key = key.as_ref();
            let parsed = key
                .split_once(':')
                .filter(|(name, b64)| !name.is_empty() && !b64.is_empty())
                .and_then(|(name, b64)| {
                    let bytes: [u8; 32] = BASE64.decode(b64).ok()?.try_into().ok()?;
                    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()?;
                    Some((name.to_owned(), key))
                });
            match parsed {
                Some(k) => out.push(k),
                None => bail!(
                    "trusted public key {key:?} is not `name:<base64 of 32 bytes>`: fix trusted-public-keys"
                ),
            }
        }
        Ok(TrustedKeys(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `sig` (`name:base64`) is a valid signature of `data` by the
    /// trusted key of that name. Strict verification: libsodium, which Nix
    /// uses, also refuses non-canonical and small-order values.
    fn verify(&self, data: &[u8], sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        let Some(bytes) = BASE64
            .decode(b64)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, key)| key.verify_strict(data, &signature).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nixbase32_round_trips_and_matches_nix() {
        // `nix hash to-base32 sha256:<hex>` of sha256("").
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes = hex::decode(hex).unwrap();
        let b32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_eq!(nixbase32_encode(&bytes), b32);
        assert_eq!(nixbase32_decode(b32, 32).unwrap(), bytes);
        // 20-byte store hashes too.
        let h = [0xffu8; 20];
        assert_eq!(nixbase32_decode(&nixbase32_encode(&h), 20).unwrap(), h);
        assert!(nixbase32_decode("e", 1).is_none());
        // Bits beyond the hash's size are refused.
        assert!(nixbase32_decode(&"z".repeat(52), 32).is_none());
    }

    #[test]
    fn nar_hash_in_every_form_nix_accepts() {
        let bytes: [u8; 32] =
            hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .unwrap()
                .try_into()
                .unwrap();
        for form in [
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            assert_eq!(parse_sha256(form), Some(bytes), "{form}");
        }
        assert_eq!(parse_sha256("sha1:0mdqa9w1p6cmli6976v4wi0sw9r4p5pr"), None);
        assert_eq!(
            parse_sha256("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
            None
        );
    }

    const INFO: &str = "StorePath: /nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a\n\
URL: nar/1b2.nar.xz\n\
Compression: xz\n\
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
NarSize: 120\n\
References: zzzhsmy055kqkfcl5k0scg07ckny2maw-b 9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a\n\
Deriver: 1knhsmy055kqkfcl5k0scg07ckny2maw-lib-a.drv\n";

    #[test]
    fn fingerprint_sorts_full_reference_paths() {
        let info = NarInfo::parse(INFO).unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a;\
sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;120;\
/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-lib-a,/nix/store/zzzhsmy055kqkfcl5k0scg07ckny2maw-b"
        );
    }

    #[test]
    fn incomplete_or_malformed_narinfos_are_refused() {
        for (drop, why) in [
            ("StorePath", "no StorePath"),
            ("URL", "no URL"),
            ("NarHash", "no NarHash"),
            ("NarSize", "no NarSize"),
        ] {
            let text: String = INFO
                .lines()
                .filter(|l| !l.starts_with(drop))
                .map(|l| format!("{l}\n"))
                .collect();
            let err = NarInfo::parse(&text).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        for bad in [
            INFO.replace("NarSize: 120", "NarSize: 0"),
            INFO.replace("NarSize: 120", "NarSize: lots"),
            INFO.replace("References: zzz", "References: /nix/store/zzz"),
            INFO.replace("Compression: xz", "Compression"),
            INFO.replace("sha256:0mdq", "sha256:0mdqq"),
        ] {
            assert!(NarInfo::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signatures_need_a_trusted_key_of_that_name() {
        use ed25519_dalek::{Signer, SigningKey};
        let secret = SigningKey::from_bytes(&[7u8; 32]);
        let public = BASE64.encode(secret.verifying_key().as_bytes());
        let mut info = NarInfo::parse(INFO).unwrap();
        let sig = BASE64.encode(secret.sign(info.fingerprint().as_bytes()).to_bytes());
        info.sigs = vec![format!("other:{sig}"), format!("test-1:{sig}")];
        let trusted = TrustedKeys::parse(&[format!("test-1:{public}")]).unwrap();
        assert!(info.signed_by(&trusted));
        // The same key under another name signs nothing.
        let renamed = TrustedKeys::parse(&[format!("test-2:{public}")]).unwrap();
        assert!(!info.signed_by(&renamed));
        // A changed field breaks the signature.
        let mut tampered = info.clone();
        tampered.nar_size += 1;
        assert!(!tampered.signed_by(&trusted));
        tampered = info.clone();
        tampered.references.pop();
        assert!(!tampered.signed_by(&trusted));
        info.sigs = vec![format!("test-1:{}", &sig[4..])];
        assert!(!info.signed_by(&trusted));
        assert!(TrustedKeys::parse(&["nocolon"]).is_err());
        assert!(TrustedKeys::parse(&["k:c2hvcnQ="]).is_err());
    }
}
