//! Nix packaging without nixpkgs: every Nix file parses; default.nix,
//! shell.nix and the flake evaluate against a stand-in for nixpkgs
//! (tests/fixtures/fake-nixpkgs) and pass what they should; the flake's
//! `lib` runs for real on the example depot.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn fake_nixpkgs() -> PathBuf {
    Path::new(REPO).join("tests/fixtures/fake-nixpkgs")
}

/// Evaluate `expr`, a function of `{ repo, fake, … }`, with `<nixpkgs>`
/// pointing at the stand-in. `extra` adds more string arguments.
fn eval_with_fake(expr: &str, extra: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--eval", "--strict", "--json", "--read-write-mode"])
        .arg("-I")
        .arg(format!("nixpkgs={}", fake_nixpkgs().display()))
        .args(["--argstr", "repo", REPO])
        .arg("--argstr")
        .arg("fake")
        .arg(fake_nixpkgs());
    for (name, value) in extra {
        cmd.args(["--argstr", name, value]);
    }
    let out = ok(cmd.args(["-E", expr]));
    serde_json::from_str(&out).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Relative paths of the regular files under `dir`, skipping top-level
/// entries named in `skip` and every symlink (result links).
fn files_under(dir: &Path, skip: &[&str]) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let kind = entry.file_type().unwrap();
            if skip.contains(&rel.as_str()) || kind.is_symlink() {
                continue;
            }
            if kind.is_dir() {
                walk(root, &path, skip, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, skip, &mut out);
    out
}

const NOT_SOURCE: &[&str] = &["target", ".git"];

#[test]
fn every_nix_file_parses() {
    let files: Vec<String> = files_under(Path::new(REPO), NOT_SOURCE)
        .into_iter()
        .filter(|f| f.ends_with(".nix"))
        // These fixtures use variables that only readTree's scopedArgs
        // provide, so they cannot be parsed on their own.
        .filter(|f| !f.starts_with("tests/fixtures/readtree/scoped/"))
        .collect();
    for expected in [
        "default.nix",
        "shell.nix",
        "flake.nix",
        "nix/package.nix",
        "nix/lib.nix",
        "nix/eval.nix",
        "nix/readTree/default.nix",
        "tests/fixtures/fake-nixpkgs/default.nix",
        "tests/fixtures/fake-nixpkgs/flake.nix",
        "examples/depot/default.nix",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} not found");
    }
    for file in &files {
        ok(Command::new("nix-instantiate")
            .current_dir(REPO)
            .args(["--parse", file]));
    }
}

#[test]
fn default_nix_builds_from_cargo_lock_with_nix_on_path() {
    // `import <nixpkgs> { }` is default.nix's own default: -I points it at
    // the stand-in.
    let v = eval_with_fake(
        r#"{ repo, fake }:
        let
          p = import (/. + repo + "/default.nix") { };
          a = p.args;
        in {
          inherit (p) builtWith;
          inherit (a) pname version postInstall meta cargoTestFlags;
          lockFile = toString a.cargoLock.lockFile;
          # Hashes to update by hand: there must be none.
          hashes = builtins.filter (n: builtins.elem n [ "cargoHash" "cargoSha256" "cargoVendorDir" ]) (builtins.attrNames a)
            ++ builtins.attrNames (removeAttrs a.cargoLock [ "lockFile" ]);
          nativeBuildInputs = map (d: d.name) a.nativeBuildInputs;
          doCheck = a.doCheck or true;
        }"#,
        &[],
    );
    assert_eq!(v["builtWith"], "buildRustPackage");
    assert_eq!(v["pname"], env!("CARGO_PKG_NAME"));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        v["lockFile"].as_str().unwrap(),
        Path::new(REPO).join("Cargo.lock").to_str().unwrap()
    );
    assert_eq!(v["hashes"], serde_json::json!([]));
    assert_eq!(strings(&v["nativeBuildInputs"]), ["makeWrapper"]);
    assert_eq!(v["meta"]["mainProgram"], "drvkite");
    assert!(
        v["meta"]["description"]
            .as_str()
            .unwrap()
            .contains("Buildkite")
    );
    // The stand-in's nix package, on PATH ahead of the caller's.
    let nix_bin = "/nix/store/00000000000000000000000000000000-fake-nix/bin";
    let post_install = v["postInstall"].as_str().unwrap();
    assert!(
        post_install.contains(&format!(
            "wrapProgram $out/bin/drvkite --prefix PATH : {nix_bin}"
        )),
        "{post_install}"
    );
    // Only the pure unit tests run inside the build sandbox.
    assert_eq!(v["doCheck"], true);
    assert_eq!(strings(&v["cargoTestFlags"]), ["--lib", "--bins"]);
}

/// The source filter, asked about sample paths, and the source it actually
/// puts in the store.
#[test]
fn source_holds_only_what_cargo_reads() {
    let samples = serde_json::json!([
        ["target", "directory"],
        ["target/release/drvkite", "regular"],
        [".git", "directory"],
        [".git/HEAD", "regular"],
        [".git", "regular"],
        ["result", "symlink"],
        ["result-man", "symlink"],
        ["tests", "directory"],
        ["examples/depot/default.nix", "regular"],
        ["README.md", "regular"],
        ["nix/package.nix", "regular"],
        ["flake.nix", "regular"],
        ["Cargo.toml", "regular"],
        ["Cargo.lock", "regular"],
        ["src", "directory"],
        ["src/main.rs", "regular"],
        ["nix", "directory"],
        ["nix/eval.nix", "regular"],
        ["nix/readTree", "directory"],
        ["nix/readTree/default.nix", "regular"],
    ]);
    let v = eval_with_fake(
        r#"{ repo, fake, samples }:
        let
          src = (import (/. + repo + "/default.nix") { }).args.src;
          keep = s: src.filter (repo + "/" + builtins.elemAt s 0) (builtins.elemAt s 1);
        in {
          kept = map (s: builtins.elemAt s 0) (builtins.filter keep (builtins.fromJSON samples));
          origSrc = toString src.origSrc;
          store = "${src}";
        }"#,
        &[("samples", &samples.to_string())],
    );
    assert_eq!(
        strings(&v["kept"]),
        [
            "Cargo.toml",
            "Cargo.lock",
            "src",
            "src/main.rs",
            "nix",
            "nix/eval.nix",
            "nix/readTree",
            "nix/readTree/default.nix",
        ]
    );
    assert_eq!(v["origSrc"], REPO);

    let store = Path::new(v["store"].as_str().unwrap());
    let mut expected: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "nix/eval.nix"]
        .map(String::from)
        .into();
    for dir in ["src", "nix/readTree"] {
        let under = files_under(&Path::new(REPO).join(dir), &[]);
        expected.extend(under.into_iter().map(|f| format!("{dir}/{f}")));
    }
    assert_eq!(files_under(store, &[]), expected);
}

#[test]
fn shell_nix_has_the_dev_tools() {
    let v = eval_with_fake(
        r#"{ repo, fake }:
        let s = import (/. + repo + "/shell.nix") { };
        in { inherit (s) builtWith; packages = map (p: p.name) s.args.packages; }"#,
        &[],
    );
    assert_eq!(v["builtWith"], "mkShell");
    let packages = strings(&v["packages"]);
    for tool in ["cargo", "rustc", "clippy", "rustfmt", "nix"] {
        assert!(packages.iter().any(|p| p == tool), "{tool} missing");
    }
}

const SYSTEMS: [&str; 4] = [
    "aarch64-darwin",
    "aarch64-linux",
    "x86_64-darwin",
    "x86_64-linux",
];

/// The flake's outputs, evaluated as `nix flake` would call them but with
/// nix-instantiate: `self` is the outputs themselves, `nixpkgs` the stand-in.
const FLAKE_OUTPUTS: &str = r#"
  flake = import (/. + repo + "/flake.nix");
  nixpkgs = let o = (import (/. + fake + "/flake.nix")).outputs { self = o; }; in o;
  self = flake.outputs { inherit self nixpkgs; };
"#;

#[test]
fn flake_outputs_cover_every_system() {
    let v = eval_with_fake(
        &format!(
            r#"{{ repo, fake }}:
            let
              {FLAKE_OUTPUTS}
              pkgs = import (/. + fake) {{ system = "x86_64-linux"; }};
              overlaid = let final = pkgs // self.overlays.default final pkgs; in final;
              names = builtins.mapAttrs (_: builtins.attrNames);
            in {{
              nixpkgsUrl = flake.inputs.nixpkgs.url;
              outputs = builtins.attrNames self;
              packageNames = names self.packages;
              packages = builtins.mapAttrs (_: ps: {{
                # Not `outPath`: JSON would print the record as that string.
                inherit (ps.default) builtWith system;
                out = ps.default.outPath;
                drvkite = ps.drvkite.outPath;
                mainProgram = ps.default.meta.mainProgram;
                lockFile = toString ps.default.args.cargoLock.lockFile;
              }}) self.packages;
              apps = builtins.mapAttrs (_: a: {{ inherit (a.default) type program; }}) self.apps;
              devShells = builtins.mapAttrs (_: d: {{
                inherit (d.default) builtWith system;
                packages = map (p: p.name) d.default.args.packages;
              }}) self.devShells;
              overlay = {{ inherit (overlaid.drvkite) builtWith system; }};
              lib = builtins.attrNames self.lib;
            }}"#
        ),
        &[],
    );
    assert!(
        v["nixpkgsUrl"]
            .as_str()
            .unwrap()
            .starts_with("github:NixOS/nixpkgs/")
    );
    assert_eq!(
        strings(&v["outputs"]),
        ["apps", "devShells", "lib", "overlays", "packages"]
    );
    for output in ["packageNames", "packages", "apps", "devShells"] {
        let systems: Vec<&String> = v[output].as_object().unwrap().keys().collect();
        assert_eq!(systems, SYSTEMS, "{output}");
    }
    for system in SYSTEMS {
        assert_eq!(strings(&v["packageNames"][system]), ["default", "drvkite"]);
        let p = &v["packages"][system];
        assert_eq!(p["builtWith"], "buildRustPackage");
        // Each system's package comes from that system's package set.
        assert_eq!(p["system"], system);
        assert_eq!(p["out"], p["drvkite"]);
        assert_eq!(p["mainProgram"], "drvkite");
        assert_eq!(
            p["lockFile"].as_str().unwrap(),
            Path::new(REPO).join("Cargo.lock").to_str().unwrap()
        );
        let app = &v["apps"][system];
        assert_eq!(app["type"], "app");
        assert_eq!(
            app["program"].as_str().unwrap(),
            format!("{}/bin/drvkite", p["out"].as_str().unwrap())
        );
        let shell = &v["devShells"][system];
        assert_eq!(shell["builtWith"], "mkShell");
        assert_eq!(shell["system"], system);
        assert!(strings(&shell["packages"]).contains(&"nix".to_owned()));
    }
    assert_eq!(v["overlay"]["builtWith"], "buildRustPackage");
    assert_eq!(v["overlay"]["system"], "x86_64-linux");
    for name in ["readTree", "ciTargets", "mkCiTargets", "ciEligible"] {
        assert!(
            strings(&v["lib"]).contains(&name.to_owned()),
            "lib.{name} missing"
        );
    }
}

/// The same flake through Nix's own flake machinery (inputs, `self`, pure
/// evaluation, source copied to the store), with nixpkgs overridden by the
/// stand-in as a local flake: nothing is fetched.
#[test]
fn flake_evaluates_with_nix_flake_commands() {
    // A copy without target/ and .git: a `path:` flake copies its whole
    // folder to the store, and the repository may be a git worktree.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("drvkite");
    for rel in files_under(Path::new(REPO), NOT_SOURCE) {
        let dest = copy.join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(Path::new(REPO).join(&rel), dest).unwrap();
    }
    let flake_eval = |attr: &str, apply: &str| -> Value {
        let out = ok(Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                "--json",
                "--override-input",
                "nixpkgs",
            ])
            .arg(format!("path:{}", fake_nixpkgs().display()))
            .arg(format!("path:{}#{attr}", copy.display()))
            .args(["--apply", apply]));
        serde_json::from_str(&out).unwrap()
    };

    let packages = flake_eval(
        "packages",
        r#"builtins.mapAttrs (_: ps: {
          inherit (ps.default) builtWith system;
          src = "${ps.default.args.src}";
          lockFile = toString ps.default.args.cargoLock.lockFile;
        })"#,
    );
    let systems: Vec<&String> = packages.as_object().unwrap().keys().collect();
    assert_eq!(systems, SYSTEMS);
    for system in SYSTEMS {
        let p = &packages[system];
        assert_eq!(p["system"], system);
        // Cargo.lock of the flake's own source, and a source filtered to
        // what cargo reads.
        let lock = Path::new(p["lockFile"].as_str().unwrap());
        assert!(lock.starts_with("/nix/store"), "{}", lock.display());
        assert_eq!(
            std::fs::read(lock).unwrap(),
            std::fs::read(Path::new(REPO).join("Cargo.lock")).unwrap()
        );
        let src = files_under(Path::new(p["src"].as_str().unwrap()), &[]);
        assert!(src.contains("src/main.rs") && src.contains("nix/eval.nix"));
        assert!(!src.iter().any(|f| f.starts_with("tests/")), "{src:?}");
    }

    let apps = flake_eval(
        "apps",
        "builtins.mapAttrs (_: a: { inherit (a.default) type program; })",
    );
    for system in SYSTEMS {
        assert_eq!(apps[system]["type"], "app");
        assert!(
            apps[system]["program"]
                .as_str()
                .unwrap()
                .ends_with("/bin/drvkite")
        );
    }
    let shells = flake_eval("devShells", "builtins.mapAttrs (_: d: d.default.builtWith)");
    for system in SYSTEMS {
        assert_eq!(shells[system], "mkShell");
    }
    let overlay = flake_eval("overlays", "o: builtins.isFunction o.default");
    assert_eq!(overlay, true);
    let lib = flake_eval("lib", "builtins.attrNames");
    assert!(strings(&lib).contains(&"ciTargets".to_owned()), "{lib}");
}

fn drvmap_labels(depot: &Depot) -> Vec<String> {
    let out = depot.out("drvmap.json");
    ok(drvkite()
        .arg("drvmap")
        .arg("--depot")
        .arg(&depot.root)
        .arg("--out")
        .arg(&out));
    read_json(&out)
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// `lib.ciTargets` finds exactly what drvkite finds on a depot without
/// `ci.targets`; `lib.mkCiTargets` takes another rule.
#[test]
fn flake_lib_ci_targets_match_drvmap() {
    let depot = Depot::new();
    let labels = drvmap_labels(&depot);
    assert!(labels.len() >= 10, "{labels:?}");
    let v = eval_with_fake(
        &format!(
            r#"{{ repo, fake, depotDir }}:
            let
              {FLAKE_OUTPUTS}
              lib = self.lib;
              depot = import (/. + depotDir) {{ }};
              labels = ts: map lib.mkLabel ts;
            in {{
              all = labels (lib.ciTargets depot);
              tools = labels (lib.mkCiTargets {{
                inherit depot;
                eligible = t: lib.ciEligible t && builtins.head t.__readTree == "tools";
              }});
            }}"#
        ),
        &[("depotDir", depot.root.to_str().unwrap())],
    );
    let mut all = strings(&v["all"]);
    all.sort();
    assert_eq!(all, labels);
    let mut tools = strings(&v["tools"]);
    tools.sort();
    let expected: Vec<String> = labels
        .iter()
        .filter(|l| l.starts_with("tools/"))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(tools, expected);
}

/// A copy of the example depot adopting drvkite as docs/nix.md shows:
/// drvkite's library copied into the depot's tree (readTree walks it like
/// any other folder) and a default.nix that takes readTree from there and
/// sets `ci.targets` to `ci_targets`.
fn adopting_depot(ci_targets: &str) -> Depot {
    let depot = Depot::new();
    for (from, to) in [
        ("nix/lib.nix", "nix/drvkite/lib.nix"),
        (
            "nix/readTree/default.nix",
            "nix/drvkite/readTree/default.nix",
        ),
    ] {
        depot.write(
            to,
            &std::fs::read_to_string(Path::new(REPO).join(from)).unwrap(),
        );
    }
    depot.write(
        "default.nix",
        &format!(
            r#"{{ ... }}@args:
let
  drvkite = import ./nix/drvkite/lib.nix {{ }};
  readTree = drvkite.readTree;
in
readTree.fix (
  self:
  readTree {{
    path = ./.;
    args = {{
      depot = self;
      externalArgs = args;
    }};
  }}
  // {{
    ci.targets = {ci_targets};
  }}
)
"#
        ),
    );
    depot
}

#[test]
fn depot_setting_ci_targets_with_the_lib_is_honoured() {
    let all = drvmap_labels(&Depot::new());

    // Everything drvkite would gather, except //tools.
    let own_rule = adopting_depot(
        r#"drvkite.mkCiTargets {
      depot = self;
      eligible = t: drvkite.ciEligible t && builtins.head t.__readTree != "tools";
    }"#,
    );
    let expected: Vec<String> = all
        .iter()
        .filter(|l| !l.starts_with("tools/"))
        .cloned()
        .collect();
    assert!(expected.len() < all.len() && !expected.is_empty());
    assert_eq!(drvmap_labels(&own_rule), expected);

    // The default rule: what drvkite finds by itself.
    let default_rule = adopting_depot("drvkite.ciTargets self");
    assert_eq!(drvmap_labels(&default_rule), all);
}
