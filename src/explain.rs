//! Why did a target change? Compare its old and new `.drv` files and follow
//! changed input derivations down, like a small nix-diff.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use anyhow::Result;
use nix_derivation::Derivation;

use crate::graph::{input_drvs, read_drv};
use crate::types::DrvPath;

/// One difference found between two derivations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Builder {
        old: String,
        new: String,
    },
    System {
        old: String,
        new: String,
    },
    Args {
        old: Vec<String>,
        new: Vec<String>,
    },
    Outputs {
        old: Vec<String>,
        new: Vec<String>,
    },
    EnvAdded {
        name: String,
        value: String,
    },
    EnvRemoved {
        name: String,
    },
    EnvChanged {
        name: String,
        old: String,
        new: String,
    },
    SourceAdded {
        path: String,
    },
    SourceRemoved {
        path: String,
    },
    SourceChanged {
        name: String,
        old: String,
        new: String,
    },
    InputAdded {
        path: DrvPath,
    },
    InputRemoved {
        path: DrvPath,
    },
    /// An input derivation changed; `why` holds its own differences.
    InputChanged {
        old: DrvPath,
        new: DrvPath,
        why: Vec<Difference>,
    },
}

/// Replace store hashes so values that differ only because an input's path
/// changed compare equal: that change is reported on the input itself.
fn mask_hashes(s: &str) -> String {
    let prefix = "/nix/store/";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(prefix) {
        out.push_str(&rest[..i + prefix.len()]);
        rest = &rest[i + prefix.len()..];
        if rest.len() >= 32 && rest.as_bytes()[..32].iter().all(u8::is_ascii_alphanumeric) {
            out.push_str("<hash>");
            rest = &rest[32..];
        }
    }
    out.push_str(rest);
    out
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Store paths keyed by their name (the part after the hash).
fn by_name(paths: impl Iterator<Item = String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in paths {
        let name = p
            .rsplit('/')
            .next()
            .and_then(|b| b.get(33..))
            .unwrap_or(&p)
            .to_owned();
        m.entry(name).or_default().insert(p);
    }
    m
}

fn compare(
    old: &Derivation,
    new: &Derivation,
    depth: usize,
    seen: &mut HashSet<(DrvPath, DrvPath)>,
) -> Result<Vec<Difference>> {
    let mut diffs = Vec::new();
    let outs = |d: &Derivation| d.outputs().keys().cloned().collect::<Vec<_>>();
    if outs(old) != outs(new) {
        diffs.push(Difference::Outputs {
            old: outs(old),
            new: outs(new),
        });
    }
    if old.builder() != new.builder() {
        diffs.push(Difference::Builder {
            old: old.builder().to_owned(),
            new: new.builder().to_owned(),
        });
    }
    if old.system() != new.system() {
        diffs.push(Difference::System {
            old: old.system().to_owned(),
            new: new.system().to_owned(),
        });
    }
    let masked = |d: &Derivation| {
        d.arguments()
            .iter()
            .map(|a| mask_hashes(a))
            .collect::<Vec<_>>()
    };
    if masked(old) != masked(new) {
        diffs.push(Difference::Args {
            old: old.arguments().to_vec(),
            new: new.arguments().to_vec(),
        });
    }

    // Sources: pair by name, so an edited file shows as "changed".
    let old_src = by_name(old.input_sources().iter().map(|p| p.to_absolute_path()));
    let new_src = by_name(new.input_sources().iter().map(|p| p.to_absolute_path()));
    for (name, olds) in &old_src {
        match new_src.get(name) {
            None => olds
                .iter()
                .for_each(|p| diffs.push(Difference::SourceRemoved { path: p.clone() })),
            Some(news) if news != olds => diffs.push(Difference::SourceChanged {
                name: name.clone(),
                old: olds.iter().next().cloned().unwrap_or_default(),
                new: news.iter().next().cloned().unwrap_or_default(),
            }),
            Some(_) => {}
        }
    }
    for (name, news) in &new_src {
        if !old_src.contains_key(name) {
            news.iter()
                .for_each(|p| diffs.push(Difference::SourceAdded { path: p.clone() }));
        }
    }

    // Input derivations: pair by name and follow the changed ones.
    let old_in = by_name(input_drvs(old).into_iter().map(|p| p.to_string()));
    let new_in = by_name(input_drvs(new).into_iter().map(|p| p.to_string()));
    for (name, olds) in &old_in {
        match new_in.get(name) {
            None => {
                for p in olds {
                    diffs.push(Difference::InputRemoved { path: p.parse()? });
                }
            }
            Some(news) if news != olds => {
                let (o, n): (DrvPath, DrvPath) = (
                    olds.difference(news)
                        .next()
                        .unwrap_or(olds.iter().next().expect("non-empty"))
                        .parse()?,
                    news.difference(olds)
                        .next()
                        .unwrap_or(news.iter().next().expect("non-empty"))
                        .parse()?,
                );
                let why = if depth > 0 && seen.insert((o.clone(), n.clone())) {
                    compare(&read_drv(&o)?, &read_drv(&n)?, depth - 1, seen)?
                } else {
                    Vec::new()
                };
                diffs.push(Difference::InputChanged {
                    old: o,
                    new: n,
                    why,
                });
            }
            Some(_) => {}
        }
    }
    for (name, news) in &new_in {
        if !old_in.contains_key(name) {
            for p in news {
                diffs.push(Difference::InputAdded { path: p.parse()? });
            }
        }
    }

    // Environment: output paths and input paths change with everything
    // else; only report values that still differ once hashes are masked.
    let (oe, ne) = (old.environment(), new.environment());
    for (k, v) in oe {
        match ne.get(k) {
            None => diffs.push(Difference::EnvRemoved { name: k.clone() }),
            Some(nv) if mask_hashes(&show(nv)) != mask_hashes(&show(v)) => {
                diffs.push(Difference::EnvChanged {
                    name: k.clone(),
                    old: show(v),
                    new: show(nv),
                })
            }
            Some(_) => {}
        }
    }
    for (k, v) in ne {
        if !oe.contains_key(k) {
            diffs.push(Difference::EnvAdded {
                name: k.clone(),
                value: show(v),
            });
        }
    }
    Ok(diffs)
}

/// Differences between two `.drv` files, following changed inputs down to
/// `depth` levels.
pub fn explain(old: &DrvPath, new: &DrvPath, depth: usize) -> Result<Vec<Difference>> {
    compare(&read_drv(old)?, &read_drv(new)?, depth, &mut HashSet::new())
}

/// A value on one line, cut to 100 characters. Values come from the
/// derivations (a pull request's): control characters are shown escaped,
/// so none reaches the terminal or a Buildkite log (see
/// [`crate::pipeline::text::printable`]).
fn clip(s: &str) -> String {
    let one_line = crate::pipeline::text::printable(s).into_owned();
    if one_line.chars().count() > 100 {
        format!("{}…", one_line.chars().take(100).collect::<String>())
    } else {
        one_line
    }
}

/// Render differences as an indented tree.
pub fn render(diffs: &[Difference]) -> String {
    let mut out = String::new();
    render_into(&mut out, diffs, 0);
    out
}

fn render_into(out: &mut String, diffs: &[Difference], indent: usize) {
    let pad = "  ".repeat(indent);
    for d in diffs {
        let _ = match d {
            Difference::Builder { old, new } => {
                writeln!(out, "{pad}builder: {} -> {}", clip(old), clip(new))
            }
            Difference::System { old, new } => {
                writeln!(out, "{pad}system: {} -> {}", clip(old), clip(new))
            }
            Difference::Args { old, new } => {
                writeln!(
                    out,
                    "{pad}args:\n{pad}  - {}\n{pad}  + {}",
                    clip(&old.join(" ")),
                    clip(&new.join(" "))
                )
            }
            Difference::Outputs { old, new } => {
                writeln!(out, "{pad}outputs: {} -> {}", old.join(","), new.join(","))
            }
            Difference::EnvAdded { name, value } => {
                writeln!(out, "{pad}env var {} added: {}", clip(name), clip(value))
            }
            Difference::EnvRemoved { name } => writeln!(out, "{pad}env var {} removed", clip(name)),
            Difference::EnvChanged { name, old, new } => {
                writeln!(
                    out,
                    "{pad}env var {}:\n{pad}  - {}\n{pad}  + {}",
                    clip(name),
                    clip(old),
                    clip(new)
                )
            }
            Difference::SourceAdded { path } => writeln!(out, "{pad}input source added: {path}"),
            Difference::SourceRemoved { path } => {
                writeln!(out, "{pad}input source removed: {path}")
            }
            Difference::SourceChanged { name, old, new } => {
                writeln!(out, "{pad}input source {name} changed: {old} -> {new}")
            }
            Difference::InputAdded { path } => writeln!(out, "{pad}input derivation added: {path}"),
            Difference::InputRemoved { path } => {
                writeln!(out, "{pad}input derivation removed: {path}")
            }
            Difference::InputChanged { old, new, why } => {
                let r = writeln!(
                    out,
                    "{pad}input derivation {} changed: {} -> {}",
                    new.name(),
                    old.hash(),
                    new.hash()
                );
                render_into(out, why, indent + 1);
                r
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_store_hashes_only() {
        assert_eq!(
            mask_hashes("x /nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a y /nix/store/short"),
            "x /nix/store/<hash>-a y /nix/store/short"
        );
    }
}
