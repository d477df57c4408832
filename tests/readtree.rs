//! The readTree library (nix/readTree) on small fixture trees under
//! tests/fixtures/readtree, evaluated with real `nix-instantiate`: one test
//! per traversal rule, each asserting exact values.
//!
//! Files that readTree must not read `throw`; every tree is evaluated with
//! `--strict`, so reading one of them fails the test.

mod common;

use std::process::{Command, Output};

use serde_json::{Value, json};

const LIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nix/readTree");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/readtree");

/// A Nix string literal holding `s`.
fn nix_str(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "\\$");
    format!("\"{escaped}\"")
}

/// `nix-instantiate --eval --strict --json` of `body`, with these in scope:
/// `readTree` (the library), `fixture NAME` (path of a fixture file or
/// folder) and `read NAME ARGS` (readTree of a fixture, `args = {}` unless
/// ARGS says otherwise).
fn nix(body: &str) -> Command {
    let expr = format!(
        "let readTree = import (/. + {lib}) {{ }}; \
         fixture = name: /. + {fixtures} + \"/${{name}}\"; \
         read = name: extra: readTree ({{ path = fixture name; args = {{ }}; }} // extra); \
         in {body}",
        lib = nix_str(LIB),
        fixtures = nix_str(FIXTURES),
    );
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--eval", "--strict", "--json", "-E", &expr]);
    cmd
}

fn eval(body: &str) -> Value {
    serde_json::from_str(&common::ok(&mut nix(body))).expect("JSON from nix-instantiate")
}

/// Evaluate `body`, which must succeed; returns the value and stderr (where
/// `builtins.trace` writes).
fn eval_with_stderr(body: &str) -> (Value, String) {
    let out: Output = nix(body).output().expect("spawn nix-instantiate");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "evaluation failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// Evaluate `body`, which must fail; returns stderr.
fn eval_error(body: &str) -> String {
    String::from_utf8_lossy(&common::fails(&mut nix(body)).stderr).into_owned()
}

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "{part:?} not in: {stderr}");
    }
}

// ---------------------------------------------------------------- traversal

#[test]
fn folders_and_nix_files_become_nested_attributes_with_markers() {
    assert_eq!(
        eval(r#"read "nesting" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["a", "num", "top"],
            "a": {
                "__readTree": ["a"],
                "__readTreeChildren": ["b", "x"],
                "b": {
                    "__readTree": ["a", "b"],
                    "__readTreeChildren": ["y"],
                    "y": { "v": "y", "__readTree": ["a", "b", "y"], "__readTreeChildren": [] },
                },
                "x": "x",
            },
            "num": 42,
            "top": {
                "v": "top",
                "inner": { "w": 1 },
                "__readTree": ["top"],
                "__readTreeChildren": [],
            },
        })
    );
}

#[test]
fn children_are_listed_in_lexicographic_order() {
    let order = json!(["10", "9", "B", "_u", "a", "b"]);
    assert_eq!(
        eval(r#"(read "order" { }).__readTreeChildren"#),
        order,
        "files and folders are sorted together, by bytes"
    );
    assert_eq!(
        eval(r#"builtins.attrNames (read "order" { addMarkers = false; })"#),
        order
    );
}

#[test]
fn nix_file_attrsets_are_leaves_with_empty_children() {
    // `inner` is an attribute set, but not one readTree added.
    assert_eq!(
        eval(r#"(read "nesting" { }).top"#),
        json!({
            "v": "top",
            "inner": { "w": 1 },
            "__readTree": ["top"],
            "__readTreeChildren": [],
        })
    );
    assert_eq!(eval(r#"(read "nesting" { }).num"#), json!(42));
}

#[test]
fn non_nix_files_are_ignored_and_an_empty_folder_is_a_bare_node() {
    assert_eq!(
        eval(r#"read "non-nix-files" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["empty"],
            "empty": { "__readTree": ["empty"], "__readTreeChildren": [] },
        })
    );
}

#[test]
fn a_nix_file_wins_over_a_folder_of_the_same_name() {
    assert_eq!(
        eval(r#"read "file-beats-folder" { }"#),
        json!({ "__readTree": [], "__readTreeChildren": ["same"], "same": "the file" })
    );
}

#[test]
fn default_nix_is_the_folder_value_merged_with_subfolders_not_siblings() {
    // sibling.nix throws; the sub folder replaces default.nix's `sub`.
    assert_eq!(
        eval(r#"(read "default-nix" { }).pkg"#),
        json!({
            "own": "pkg",
            "sub": { "leaf": "leaf", "__readTree": ["pkg", "sub"], "__readTreeChildren": ["leaf"] },
            "__readTree": ["pkg"],
            "__readTreeChildren": ["sub"],
        })
    );
}

#[test]
fn a_symlinked_default_nix_counts_as_default_nix() {
    // default.nix -> real.nix: the folder's value, and real.nix is then a
    // sibling that is not read on its own.
    assert_eq!(
        eval(r#"(read "default-nix" { }).link"#),
        json!({ "own": "through a symlink", "__readTree": ["link"], "__readTreeChildren": [] })
    );
}

#[test]
fn a_derivation_default_nix_keeps_its_drv_path_and_gets_children() {
    assert_eq!(
        eval(
            r#"let
                 t = read "default-nix" { };
                 bare = import (fixture "default-nix/drv/default.nix") { };
               in {
                 inherit (t.drv) type __readTree __readTreeChildren;
                 page = t.drv.docs.page;
                 sameDrvPath = t.drv.drvPath == bare.drvPath;
               }"#
        ),
        json!({
            "type": "derivation",
            "__readTree": ["drv"],
            "__readTreeChildren": ["docs"],
            "page": "page",
            "sameDrvPath": true,
        })
    );
}

#[test]
fn a_non_attrset_default_nix_is_returned_as_is_without_children() {
    // Both folders have children (and str a sibling) that throw.
    assert_eq!(
        eval(
            r#"let t = read "non-attrset-default" { }; in {
                 str = t.str;
                 fnType = builtins.typeOf t.fn;
                 fnResult = t.fn 41;
                 rootChildren = t.__readTreeChildren;
               }"#
        ),
        json!({
            "str": "just a string",
            "fnType": "lambda",
            "fnResult": 42,
            "rootChildren": ["fn", "str"],
        })
    );
}

#[test]
fn skip_tree_drops_the_folder() {
    assert_eq!(
        eval(r#"read "skip-tree" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["kept", "nested"],
            "kept": { "x": "kept", "__readTree": ["kept"], "__readTreeChildren": ["x"] },
            "nested": { "ok": "ok", "__readTree": ["nested"], "__readTreeChildren": ["ok"] },
        })
    );
}

#[test]
fn a_top_level_skip_tree_is_an_error() {
    let stderr = eval_error(r#"read "skip-tree-top" { }"#);
    assert_mentions(
        &stderr,
        &[
            "readTree",
            ".skip-tree",
            &format!("{FIXTURES}/skip-tree-top"),
        ],
    );
    assert!(
        !stderr.contains("must not read"),
        "a.nix was read: {stderr}"
    );
}

#[test]
fn skip_subtree_keeps_default_nix_but_reads_nothing_else() {
    assert_eq!(
        eval(r#"read "skip-subtree" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["nodefault", "withdefault"],
            "nodefault": { "__readTree": ["nodefault"], "__readTreeChildren": [] },
            "withdefault": {
                "own": "kept",
                "__readTree": ["withdefault"],
                "__readTreeChildren": [],
            },
        })
    );
}

#[test]
fn hidden_entries_are_ignored() {
    assert_eq!(
        eval(r#"read "hidden" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["sub", "visible"],
            "sub": { "shown": "shown", "__readTree": ["sub"], "__readTreeChildren": ["shown"] },
            "visible": "visible",
        })
    );
}

#[test]
fn add_markers_false_omits_the_markers() {
    assert_eq!(
        eval(r#"read "nesting" { addMarkers = false; }"#),
        json!({
            "a": { "b": { "y": { "v": "y" } }, "x": "x" },
            "num": 42,
            "top": { "v": "top", "inner": { "w": 1 } },
        })
    );
}

#[test]
fn the_root_default_nix_is_never_imported() {
    // Its default.nix and its top-level .nix file both throw.
    assert_eq!(
        eval(r#"read "root-default" { }"#),
        json!({
            "__readTree": [],
            "__readTreeChildren": ["sub"],
            "sub": { "x": "x", "__readTree": ["sub"], "__readTreeChildren": ["x"] },
        })
    );
}

#[test]
fn root_dir_false_imports_the_root_default_nix() {
    assert_eq!(
        eval(r#"read "root-dir-false" { rootDir = false; }"#),
        json!({
            "loc": [],
            "hereKids": ["sub"],
            "sub": { "x": "x", "__readTree": ["sub"], "__readTreeChildren": ["x"] },
            "__readTree": [],
            "__readTreeChildren": ["sub"],
        })
    );
}

// -------------------------------------------------------------- file args

#[test]
fn every_file_gets_located_at_the_args_and_here() {
    // `here` is the folder's node: for default.nix its own value, for x.nix
    // the containing folder (so it sees its sibling y).
    assert_eq!(
        eval(
            r#"let t = read "args" { args = { tag = "T"; }; }; in {
                 y = { inherit (t.a.b.y) locatedAt tag; };
                 x = { inherit (t.plain.x) locatedAt hereLoc hereKids sibling; };
                 d = { inherit (t.withdefault) locatedAt hereLoc hereKids hereOwn; };
               }"#
        ),
        json!({
            "y": { "locatedAt": ["a", "b", "y"], "tag": "T" },
            "x": {
                "locatedAt": ["plain", "x"],
                "hereLoc": ["plain"],
                "hereKids": ["x", "y"],
                "sibling": "Y",
            },
            "d": {
                "locatedAt": ["withdefault"],
                "hereLoc": ["withdefault"],
                "hereKids": ["kid"],
                "hereOwn": "me",
            },
        })
    );
}

#[test]
fn args_may_be_a_function_of_located_at() {
    assert_eq!(
        eval(
            r#"let t = read "args" {
                 args = { locatedAt }: { tag = builtins.concatStringsSep "." locatedAt; };
               }; in t.a.b.y"#
        ),
        json!({
            "locatedAt": ["a", "b", "y"],
            "tag": "a.b.y",
            "__readTree": ["a", "b", "y"],
            "__readTreeChildren": [],
        })
    );
}

#[test]
fn the_args_filter_is_applied_per_file() {
    assert_eq!(
        eval(
            r#"let
                 join = builtins.concatStringsSep "/";
                 t = read "args" {
                   args = { tag = "T"; };
                   filter = parts: args: args // {
                     tag = "${join parts} saw ${join args.locatedAt}, ${args.tag}"
                       + (if args ? here then " and here" else "");
                   };
                 };
               in t.a.b.y.tag"#
        ),
        json!("a/b/y saw a/b/y, T and here")
    );
}

/// The restrict fixture read as a depot (`depot` is the tree itself) with
/// //secret restricted; `body` sees it as `depot`.
fn restricted_depot(body: &str) -> String {
    format!(
        r#"let depot = readTree.fix (self: read "restrict" {{
             args = {{ depot = self; }};
             filter = readTree.restrictFolder {{
               folder = "secret";
               exceptions = [ [ "allowed" "x" ] ];
               reason = "secrets stay under //secret";
             }};
           }}); in {body}"#
    )
}

#[test]
fn restrict_folder_hides_it_from_files_outside_except_exceptions() {
    assert_eq!(
        eval(&restricted_depot(
            r#"{
                 peer = depot.secret.peer;
                 allowed = depot.allowed.x;
                 other = depot.outside.c;
                 outsideWorks = (builtins.tryEval depot.outside.b).success;
               }"#
        )),
        json!({
            "peer": "peer sees S",
            "allowed": "allowed sees S",
            "other": "outside sees O",
            "outsideWorks": false,
        })
    );
}

#[test]
fn restrict_folder_error_names_the_file_the_folder_and_the_reason() {
    let stderr = eval_error(&restricted_depot("depot.outside.b"));
    assert_mentions(
        &stderr,
        &["outside/b", "//secret", "secrets stay under //secret"],
    );
}

#[test]
fn a_file_that_is_not_a_function_is_an_error_naming_it() {
    assert_eq!(eval(r#"(read "not-a-function" { }).good"#), json!("good"));
    let stderr = eval_error(r#"(read "not-a-function" { }).bad"#);
    assert_mentions(
        &stderr,
        &[
            "readTree",
            &format!("{FIXTURES}/not-a-function/bad.nix"),
            "set",
            "function",
        ],
    );
}

#[test]
fn values_with_override_attrs_get_markers_through_passthru() {
    // `mk` stands in for mkDerivation: passthru attributes show up on the
    // result, and `overridden` counts overrideAttrs calls.
    let (pkg_markers, dir_markers) = (
        json!({ "__readTree": ["pkg"], "__readTreeChildren": [] }),
        json!({ "__readTree": ["dir"], "__readTreeChildren": ["kid"] }),
    );
    let kid = json!({ "k": "k", "__readTree": ["dir", "kid"], "__readTreeChildren": ["k"] });
    let with = |base: Value, extra: &Value| {
        let mut v = base;
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    assert_eq!(
        eval(
            r#"let
                 mk = attrs: attrs // (attrs.passthru or { }) // {
                   overridden = attrs.overridden or 0;
                   overrideAttrs = f: mk (attrs // f attrs // {
                     overridden = (attrs.overridden or 0) + 1;
                   });
                 };
                 t = read "override-attrs" { args = { inherit mk; }; };
                 data = v: removeAttrs v [ "overrideAttrs" ];
               in { pkg = data t.pkg; dir = data t.dir; }"#
        ),
        json!({
            "pkg": with(
                json!({
                    "name": "pkg",
                    "keep": "kept",
                    "overridden": 1,
                    "passthru": with(json!({ "keep": "kept" }), &pkg_markers),
                }),
                &pkg_markers
            ),
            "dir": with(
                json!({
                    "name": "dir",
                    "kid": kid,
                    "overridden": 1,
                    "passthru": with(json!({ "kid": kid }), &dir_markers),
                }),
                &dir_markers
            ),
        })
    );
}

/// readTree's scopedArgs as snix's root sets them: a throwing
/// `builtins.currentSystem` and a flag only tree files should see.
const SNIX_SCOPED: &str = r#"{ scopedArgs = {
    magic = "M";
    builtins = builtins // {
      scopedFlag = true;
      currentSystem = throw "use localSystem, not builtins.currentSystem";
    };
  }; }"#;

#[test]
fn scoped_args_reach_tree_files_only_not_the_files_they_import() {
    let (value, stderr) = eval_with_stderr(&format!(
        r#"let t = read "scoped" {SNIX_SCOPED}; in {{ inherit (t) pkg other; }}"#
    ));
    let markers = |p: &[&str]| json!({ "__readTree": p, "__readTreeChildren": [] });
    let with = |v: Value, m: Value| {
        let mut v = v;
        v.as_object_mut()
            .unwrap()
            .extend(m.as_object().unwrap().clone());
        v
    };
    let system = eval("builtins.currentSystem");
    assert_eq!(
        value,
        json!({
            "pkg": with(json!({
                "direct": "M",
                "treeSeesFlag": true,
                "helperSeesFlag": false,
                "helperViaBuiltinsSeesFlag": false,
                "shared": { "value": 1 },
            }), markers(&["pkg"])),
            // The helper reads the real currentSystem, as under TVL.
            "other": with(json!({ "shared": { "value": 1 }, "system": system }), markers(&["other"])),
        })
    );
    // Imported twice through plain `import`: Nix's import cache evaluates
    // it once (a scopedImport would evaluate it for each).
    assert_eq!(
        stderr.matches("drvkite-test: shared.nix evaluated").count(),
        1,
        "{stderr}"
    );
    // The tree file itself does get the throwing currentSystem.
    let err = eval_error(&format!(
        r#"(read "scoped" {SNIX_SCOPED}).uses-system.system"#
    ));
    assert_mentions(&err, &["use localSystem"]);
}

#[test]
fn a_folder_named_like_a_nix_file_is_read_twice_as_in_tvl() {
    // `d.nix/` is a folder (attribute `d.nix`) and, by its name, a file
    // whose import is its default.nix (attribute `d`).
    assert_eq!(
        eval(
            r#"let t = read "dnix" { }; in { names = builtins.attrNames t; inherit (t) d; dnix = t."d.nix"; }"#
        ),
        json!({
            "names": ["__readTree", "__readTreeChildren", "d", "d.nix", "plain"],
            "d": { "locatedAt": ["d"], "__readTree": ["d"], "__readTreeChildren": [] },
            "dnix": { "locatedAt": ["d.nix"], "__readTree": ["d.nix"], "__readTreeChildren": [] },
        })
    );
}

#[test]
fn a_file_that_evaluates_to_a_functor_is_not_called() {
    assert_eq!(eval(r#"(read "functor" { }).g"#), json!("fine"));
    let stderr = eval_error(r#"(read "functor" { }).f"#);
    assert_mentions(
        &stderr,
        &[
            &format!("{FIXTURES}/functor/f.nix"),
            "__functor",
            "must be a function",
        ],
    );
}

// ------------------------------------------------------------------ gather

/// Labels of what `gather` finds with `eligible = t: t.ok or false`.
fn gathered_labels(node: &str) -> String {
    format!("map readTree.mkLabel (readTree.gather (t: t.ok or false) ({node}))")
}

#[test]
fn gather_yields_each_node_then_its_children_then_its_subtargets() {
    // a's subtargets come in list order (sub2 before sub1); `missing` does
    // not exist, `off` is not eligible, sub1's own subtarget `deep` and the
    // non-child `stray` are not followed, c/e is a string.
    assert_eq!(
        eval(&gathered_labels(r#"read "gather" { }"#)),
        json!([
            "a", "a/m/leaf", "a/z/leaf", "a:sub2", "a:sub1", "b:s", "c/d"
        ])
    );
}

#[test]
fn gather_marks_subtargets_with_their_parents_location() {
    assert_eq!(
        eval(
            r#"map (t: {
                 inherit (t) __readTree __readTreeChildren __subtarget;
                 ownTargets = t.meta.ci.targets or [ ];
               }) (builtins.filter (t: t ? __subtarget)
                    (readTree.gather (t: t.ok or false) (read "gather" { })))"#
        ),
        json!([
            { "__readTree": ["a"], "__readTreeChildren": [], "__subtarget": "sub2", "ownTargets": [] },
            { "__readTree": ["a"], "__readTreeChildren": [], "__subtarget": "sub1", "ownTargets": ["deep"] },
            { "__readTree": ["b"], "__readTreeChildren": [], "__subtarget": "s", "ownTargets": [] },
        ])
    );
}

#[test]
fn gather_follows_only_readtree_children() {
    assert_eq!(
        eval(&gathered_labels(
            r#"{
                 __readTree = [ "n" ];
                 __readTreeChildren = [ "child" "plain" ];
                 child = { ok = true; __readTree = [ "n" "child" ]; __readTreeChildren = [ ]; };
                 plain = "not a node";
                 stray = { ok = true; __readTree = [ "n" "stray" ]; __readTreeChildren = [ ]; };
               }"#
        )),
        json!(["n/child"])
    );
}

#[test]
fn gather_still_accepts_deprecated_meta_targets_with_a_warning() {
    let (labels, stderr) = eval_with_stderr(&gathered_labels(
        r#"{
             __readTree = [ "x" "y" ];
             __readTreeChildren = [ ];
             meta.targets = [ "old" ];
             meta.ci.targets = [ "new" ];
             old.ok = true;
             new.ok = true;
           }"#,
    ));
    assert_eq!(labels, json!(["x/y:old", "x/y:new"]));
    assert_mentions(&stderr, &["trace:", "x/y", "meta.targets", "deprecated"]);
}

#[test]
fn drv_targets_lists_only_derivations_and_keeps_meta() {
    // `fake` counts: like nixpkgs' isDerivation, only `type` is checked.
    assert_eq!(
        eval(
            r#"let
                 d = name: builtins.derivation {
                   inherit name; builder = "/bin/sh"; system = builtins.currentSystem;
                 };
                 r = readTree.drvTargets {
                   y = d "y";
                   x = d "x";
                   fake = { type = "derivation"; };
                   notadrv = "hello";
                   nested.z = d "z";
                   meta = { description = "kept"; ci = { skip = false; targets = [ "stale" ]; }; };
                 };
               in {
                 inherit (r) meta notadrv;
                 gathered = map readTree.mkLabel (readTree.gather (t: t ? outPath)
                   ({ __readTree = [ "p" ]; __readTreeChildren = [ ]; } // r));
               }"#
        ),
        json!({
            "meta": {
                "description": "kept",
                "ci": { "skip": false, "targets": ["fake", "x", "y"] },
            },
            "notadrv": "hello",
            "gathered": ["p:x", "p:y"],
        })
    );
}

// ----------------------------------------------------------------- helpers

#[test]
fn mk_label_joins_the_path_and_names_the_subtarget() {
    assert_eq!(
        eval(
            r#"map readTree.mkLabel [
                 (read "nesting" { }).a.b
                 { __readTree = [ "a" "b" ]; __subtarget = "sub"; }
                 { __readTree = [ ]; }
               ]"#
        ),
        json!(["a/b", "a/b:sub", ""])
    );
}

#[test]
fn fix_passes_the_result_to_itself() {
    assert_eq!(
        eval(r#"readTree.fix (self: { a = 1; b = self.a + 1; })"#),
        json!({ "a": 1, "b": 2 })
    );
}
