//! TVL parity on whole depots, with real Nix: a snix-style depot (throwing
//! `builtins.currentSystem` in readTree's scopedArgs, a fast target list
//! beside the full one) run with `--targets-attr`, and drvkite's own
//! gather with TVL's eligibility and deprecated `meta.targets`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{Depot, drvkite, ok, read_json};
use serde_json::Value;

/// snix's root default.nix in small: tree files get a throwing
/// currentSystem, and `meta.ci.fast` splits the targets into two
/// disjoint lists.
const SNIX_ROOT: &str = r#"{ ... }@args:
let
  readTree = import ./nix/readTree { };
  common = node: (node ? outPath) && !(node.meta.ci.skip or (node.meta.broken or false));
  eligible = node: common node && !(node.meta.ci.fast or false);
  fastEligible = node: common node && (node.meta.ci.fast or false);
  gatherRoot = self: self // { ops = self.ops // { pipelines = null; }; };
in
readTree.fix (
  self:
  readTree {
    path = ./.;
    args = {
      depot = self;
      externalArgs = args;
    };
    scopedArgs.builtins = builtins // {
      currentSystem = throw "Use localSystem from the readTree args instead of builtins.currentSystem!";
    };
  }
  // {
    ci.targets = readTree.gather eligible (gatherRoot self);
    ci.fastTargets = readTree.gather fastEligible (gatherRoot self);
    ci.notAList = { };
  }
)
"#;

fn snix_style() -> Depot {
    let depot = Depot::new();
    depot.write("default.nix", SNIX_ROOT);
    // The example's builders ask for the system through a helper file, as
    // snix's tree files get theirs through nixpkgs: only tree files see
    // the throwing currentSystem.
    let build = std::fs::read_to_string(depot.path("nix/build.nix")).unwrap();
    assert!(build.contains("system = builtins.currentSystem;"));
    depot.write(
        "nix/build.nix",
        &build.replace(
            "system = builtins.currentSystem;",
            "system = import ./.system.nix;",
        ),
    );
    depot.write("nix/.system.nix", "builtins.currentSystem\n");
    for name in ["fmt", "clippy"] {
        depot.write(
            &format!("checks/{name}.nix"),
            &format!(
                "{{ depot, ... }}: depot.nix.build.mkTarget {{ name = \"check-{name}\"; meta.ci.fast = true; }}\n"
            ),
        );
    }
    depot
}

/// The labels Nix itself gives a depot list: `mkLabel` of each element.
fn nix_labels(depot: &Depot, attr: &str) -> BTreeSet<String> {
    let out = ok(Command::new("nix-instantiate")
        .current_dir(&depot.root)
        .args(["--eval", "--strict", "--json", "-E"])
        .arg(format!(
            "let d = import ./. {{ }}; in map (import ./nix/readTree {{ }}).mkLabel d.{attr}"
        )));
    serde_json::from_str::<Vec<String>>(&out)
        .unwrap()
        .into_iter()
        .collect()
}

fn map_labels(out: &std::path::Path) -> BTreeSet<String> {
    read_json(&out.join("drvmap.json"))
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// Labels of the build steps (READTREE_TARGET; merged steps name each).
fn step_labels(out: &std::path::Path) -> BTreeSet<String> {
    common::phases(out)
        .into_iter()
        .flat_map(|(_, steps)| steps)
        .filter_map(|s| s["env"]["READTREE_TARGET"].as_str().map(str::to_owned))
        .flat_map(|l| l.split(", ").map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

#[test]
fn targets_attr_picks_the_fast_list_and_scoped_args_stay_in_tree_files() {
    let depot = snix_style();
    let full = nix_labels(&depot, "ci.targets");
    let fast = nix_labels(&depot, "ci.fastTargets");
    assert_eq!(
        fast,
        BTreeSet::from(["checks/clippy".to_owned(), "checks/fmt".to_owned()])
    );
    assert!(
        full.contains("tools/hello") && full.is_disjoint(&fast),
        "{full:?}"
    );

    let default = common::pipeline(&depot, &[]);
    assert_eq!(map_labels(&default), full);
    assert_eq!(step_labels(&default), full);

    let out = depot.out("fast");
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .args(["--targets-attr", "ci.fastTargets"])
        .args(["--default-step-overrides", r#"{"priority":100}"#]));
    assert_eq!(map_labels(&out), fast);
    assert_eq!(step_labels(&out), fast);
    for (_, steps) in common::phases(&out) {
        for s in steps {
            assert_eq!(s["priority"], Value::from(100), "{s}");
        }
    }
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["targets"], Value::from(2));

    // The environment variable and the depot's setting choose it too.
    let by_env = depot.out("fast-env");
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&by_env)
        .env("DRVKITE_TARGETS_ATTR", "ci.fastTargets"));
    assert_eq!(map_labels(&by_env), fast);
    depot.write(
        "default.nix",
        &SNIX_ROOT.replace(
            "ci.notAList = { };",
            "ci.notAList = { }; ci.drvkite.targetsAttr = \"ci.fastTargets\";",
        ),
    );
    let by_setting = depot.out("fast-setting");
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&by_setting));
    assert_eq!(map_labels(&by_setting), fast);
    // The flag wins over the setting.
    let flag_wins = depot.out("flag-wins");
    ok(drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&flag_wins)
        .args(["--targets-attr", "ci.targets"]));
    assert_eq!(map_labels(&flag_wins), full);
}

#[test]
fn a_missing_or_non_list_targets_attr_is_one_line_naming_it() {
    let depot = snix_style();
    for (attr, expected) in [
        (
            "ci.nope",
            "the depot has no attribute ci.nope (named by --targets-attr)",
        ),
        ("nope.deeper", "the depot has no attribute nope.deeper"),
        (
            "ci.notAList",
            "the depot's ci.notAList is a set, not a list",
        ),
    ] {
        let out = depot.out("failed");
        let res = drvkite()
            .arg("pipeline")
            .arg("--depot")
            .arg(&depot.root)
            .arg("--out")
            .arg(&out)
            .args(["--targets-attr", attr])
            .output()
            .unwrap();
        let line = common::one_line_failure(&res);
        assert!(line.contains(expected), "{attr}: {line}");
        assert!(!out.exists());
    }
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .args(["--targets-attr", "ci..x"])
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(
        String::from_utf8_lossy(&res.stderr).contains("not an attribute path"),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn own_gather_uses_tvl_eligibility_and_deprecated_meta_targets() {
    let depot = Depot::new();
    // Marked broken, but `meta.ci.skip = false` keeps it (TVL's rule);
    // marked broken alone, it stays out (experimental/flaky).
    depot.write(
        "tools/unskipped.nix",
        "{ depot, ... }: depot.nix.build.mkTarget { name = \"unskipped\"; meta = { broken = true; ci.skip = false; }; }\n",
    );
    depot.write(
        "tools/old-style.nix",
        "{ depot, ... }: { meta.targets = [ \"sub\" ]; sub = depot.nix.build.mkTarget { name = \"old-sub\"; }; }\n",
    );
    let out = depot.out("pipeline");
    let res = drvkite()
        .arg("pipeline")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let labels = map_labels(&out);
    assert!(labels.contains("tools/unskipped"), "{labels:?}");
    assert!(labels.contains("tools/old-style:sub"), "{labels:?}");
    assert!(!labels.contains("experimental/flaky"), "{labels:?}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("meta.targets"))
        .collect();
    assert_eq!(
        warnings,
        [
            "drvkite: warning: tools/old-style lists subtargets in meta.targets, which is deprecated (they are still built, as TVL does): move them to meta.ci.targets"
        ],
        "{stderr}"
    );
}
