//! The benchmark script (scripts/bench.sh) in its smoke mode, so it cannot
//! rot: a 50-target synthetic depot, the floor and `drvkite pipeline` on it,
//! with and without `--skip-cached` against a loopback binary cache.
//! Only the table's shape is checked; timings are never asserted.

mod common;

use std::process::Command;

use common::{REPO, ok};

/// Table rows as cells: `| 50 | 6 | floor | 0.10 | 0.09 | 30 | 1.00 | 1.00 |`.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| targets"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn smoke_run_prints_floor_and_drvkite_rows_with_ratios() {
    let out = ok(Command::new("bash")
        .arg(format!("{REPO}/scripts/bench.sh"))
        .arg("--smoke")
        .env("DRVKITE_BIN", env!("CARGO_BIN_EXE_drvkite")));
    let rows = rows(&out);
    let commands: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert!(commands.contains(&"floor"), "no floor row in:\n{out}");
    assert!(commands.contains(&"drvkite"), "no drvkite row in:\n{out}");
    for r in &rows {
        assert_eq!(r.len(), 8, "row {r:?} in:\n{out}");
        assert_eq!(r[0], "50", "smoke mode is 50 targets: {r:?}");
        // Wall, CPU, RSS and both ratios are numbers; all but CPU (which
        // may round to 0.00) positive.
        for (i, cell) in r.iter().enumerate().skip(3) {
            let n: f64 = cell
                .parse()
                .unwrap_or_else(|_| panic!("{cell:?} is not a number in row {r:?}"));
            assert!(n > 0.0 || (i == 4 && n == 0.0), "{cell} in row {r:?}");
        }
        if r[2] == "floor" {
            assert_eq!((r[6].as_str(), r[7].as_str()), ("1.00", "1.00"));
        }
    }
    assert!(out.contains("machine: "), "no machine line in:\n{out}");
    // The binary cache check ran against the loopback cache, and found
    // what the cache holds.
    assert!(
        commands.contains(&"drvkite --skip-cached"),
        "no --skip-cached row in:\n{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("--skip-cached at 50 targets: "))
        .unwrap_or_else(|| panic!("no --skip-cached line in:\n{out}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // "at 50 targets: S skipped as cached (C of T derivations' ...": the
    // cached derivations' targets, and nothing else, are skipped.
    let (skipped, cached) = (numbers[1], numbers[2]);
    assert!(cached > 0 && skipped >= cached, "{line}");
}
