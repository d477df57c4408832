//! How an evaluation runs: the number of worker processes, the memory
//! bound of each (`--max-memory` sizes), and the live progress line.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// A size in bytes, as `--max-memory` takes it: `2G`, `500M`, `64K` or a
/// plain number of bytes (binary units: 1K = 1024).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    pub bytes: u64,
    /// As the user wrote it, for messages.
    text: String,
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let upper = t.to_ascii_uppercase();
        let upper = upper
            .strip_suffix("IB")
            .or_else(|| upper.strip_suffix('B'))
            .unwrap_or(&upper);
        let (digits, unit) = match upper.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&upper[..i], Some(c)),
            _ => (upper, None),
        };
        let shift = match unit {
            None => 0,
            Some('K') => 10,
            Some('M') => 20,
            Some('G') => 30,
            Some('T') => 40,
            Some(_) => return Err(format!("{s}: unknown unit (use K, M, G or T, e.g. 2G)")),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("{s} is not a size (e.g. 2G, 500M)"))?;
        let bytes = n
            .checked_mul(1 << shift)
            .filter(|b| *b >= 1 << 20)
            .ok_or_else(|| format!("{s} is out of range (at least 1M)"))?;
        Ok(ByteSize {
            bytes,
            text: t.to_owned(),
        })
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ByteSize::parse(s)
    }
}

/// One process by default. Every worker imports the whole depot again
/// (readTree reads every file to find the targets) and re-evaluates what
/// targets share: on a 4,000-target depot that listing is about a third
/// of a full evaluation's CPU time, so two workers on an idle 2-core agent
/// save roughly a quarter of the wall time but use about 1.7 times the
/// memory of one (measured: 150 MB summed against 94 MB). Memory is what
/// TVL's generator ran out of, so more workers are opt-in (`--workers`).
pub fn default_workers() -> usize {
    1
}

/// How an evaluation runs: how many processes, how much memory each may
/// use, and whether to show progress.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub workers: usize,
    pub max_memory: Option<ByteSize>,
    pub progress: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            workers: default_workers(),
            max_memory: None,
            progress: false,
        }
    }
}

/// Live progress, fed by the `trace: drvkite:…` lines of every child.
pub(super) struct Progress {
    pub(super) done: AtomicUsize,
    pub(super) total: AtomicUsize,
    pub(super) started: Instant,
    pub(super) tty: bool,
}

impl Progress {
    pub(super) fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let of = if total > 0 {
            format!("{}/{total}", done.min(total))
        } else {
            done.to_string()
        };
        format!(
            "drvkite: evaluating: {of} targets, {:.0}/s",
            done as f64 / secs
        )
    }

    pub(super) fn show(&self) {
        if self.tty {
            eprint!("\r\x1b[K{}", self.line());
        } else {
            eprintln!("{}", self.line());
        }
    }

    /// Clear a terminal's progress line; elsewhere, end with the totals.
    pub(super) fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        } else {
            self.show();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(ByteSize::parse("2G").unwrap().bytes, 2 << 30);
        assert_eq!(ByteSize::parse("500M").unwrap().bytes, 500 << 20);
        assert_eq!(ByteSize::parse("1536k").unwrap().bytes, 1536 << 10);
        assert_eq!(ByteSize::parse("3GiB").unwrap().bytes, 3 << 30);
        assert_eq!(ByteSize::parse("4194304").unwrap().bytes, 4 << 20);
        assert_eq!(ByteSize::parse("2G").unwrap().to_string(), "2G");
        for bad in ["", "G", "2X", "-1G", "1.5G", "10K"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }
}
