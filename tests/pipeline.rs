//! Pipeline generation with real Nix: TVL's decisions on the example depot,
//! the fixes drvkite makes, and generated commands run for real.

mod common;

use std::path::Path;

use common::schema::{check_references, validate_pipeline};
use common::*;
use serde_json::{Value, json};

fn all_steps(out: &Path) -> Vec<Value> {
    phases(out).into_iter().flat_map(|(_, s)| s).collect()
}

fn validate_chunks(out: &Path) {
    let manifest = read_json(&out.join("manifest.json"));
    for p in manifest["phases"].as_array().unwrap() {
        for c in p["chunks"].as_array().unwrap() {
            validate_pipeline(&upload::upload_file(&out.join(c.as_str().unwrap())));
        }
    }
    check_references(&all_steps(out), &[":init:"]);
}

fn key_of(steps: &[Value], label: &str) -> String {
    build_step(steps, label)["key"].as_str().unwrap().to_owned()
}

#[test]
fn example_depot_pipeline_has_tvl_build_steps() {
    let depot = Depot::new();
    let out = pipeline(&depot, &[]);
    validate_chunks(&out);
    let p = phases(&out);
    assert_eq!(
        p.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["build", "release"]
    );
    let build = &p[0].1;

    let drvmap = read_json(&out.join("drvmap.json"));
    let hello = build_step(build, "tools/hello");
    let drv = drvmap["tools/hello"]["drvPath"].as_str().unwrap();
    let hash = &drv["/nix/store/".len().."/nix/store/".len() + 32];
    assert_eq!(hello["key"], format!("drv-{hash}"));
    assert_eq!(hello["label"], ":nix: tools/hello");
    assert_eq!(hello["skip"], false);
    assert_eq!(hello["cancel_on_build_failing"], false);
    // 90 s is 2 minutes, not TVL's integer-divided 1.
    assert_eq!(hello["timeout_in_minutes"], 2);
    // tools/hello reaches lib/strings through a derivation that is no target.
    assert_eq!(
        hello["depends_on"],
        json!([":init:", key_of(build, "lib/strings")])
    );
    // apps/web: the closest targets below it, not lib/greeting further down.
    let web_deps = build_step(build, "apps/web")["depends_on"]
        .as_array()
        .unwrap()
        .clone();
    assert!(web_deps.contains(&json!(key_of(build, "tools/hello"))));
    assert!(web_deps.contains(&json!(key_of(build, "lib/strings"))));
    assert!(!web_deps.contains(&json!(key_of(build, "lib/greeting"))));
    assert_eq!(
        build_step(build, "lib/greeting")["depends_on"],
        json!([":init:"])
    );

    // Every target has a step; skipped and broken ones do not.
    for label in [
        "tools/multi:client",
        "tools/multi:server",
        "docs",
        "tools/hello/docs",
    ] {
        build_step(build, label);
    }
    assert!(build.iter().all(|s| s["label"] != ":nix: experimental/wip"));

    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["targets"], 12);
    assert_eq!(summary["changed"].as_array().unwrap().len(), 12);
    assert_eq!(summary["parentMap"]["status"], "none");
}

#[test]
fn unchanged_targets_are_skipped_and_dependencies_look_through_them() {
    let depot = Depot::new();
    let first = pipeline(&depot, &[]);
    let parent = depot.out("parent.json");
    std::fs::copy(first.join("drvmap.json"), &parent).unwrap();
    depot.write(
        "tools/hello/default.nix",
        "{ depot, ... }:\nlet inherit (depot.nix.build) mkTarget; generated = mkTarget { name = \"hello-generated-sources\"; deps = [ depot.lib.strings ]; }; in\nmkTarget { name = \"hello\"; text = \"hello again\"; deps = [ generated ]; meta.timeout = 90; }\n",
    );
    let out = pipeline(&depot, &["--parent-map", parent.to_str().unwrap()]);
    validate_chunks(&out);
    let build = phases(&out).remove(0).1;
    for label in ["lib/strings", "lib/greeting", "apps/cli", "docs"] {
        assert_eq!(
            build_step(&build, label)["skip"],
            "Target has not changed.",
            "{label}"
        );
    }
    for label in [
        "tools/hello",
        "tools/hello/docs",
        "apps/web",
        "ops/changelog",
    ] {
        assert_eq!(build_step(&build, label)["skip"], false, "{label}");
    }
    // Unchanged lib/strings is not a dependency any more (it is skipped).
    assert_eq!(
        build_step(&build, "tools/hello")["depends_on"],
        json!([":init:"])
    );
    assert_eq!(
        build_step(&build, "apps/web")["depends_on"],
        json!([":init:", key_of(&build, "tools/hello")])
    );
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(
        summary["changed"],
        json!([
            "apps/web",
            "ops/changelog",
            "tools/hello",
            "tools/hello/docs"
        ])
    );
    assert_eq!(summary["unchanged"], 8);
    assert_eq!(summary["parentMap"]["status"], "used");
}

#[test]
fn build_commands_build_in_a_clean_checkout() {
    let depot = Depot::with_git();
    let out = pipeline(&depot, &[]);
    let build = phases(&out).remove(0).1;
    let drvmap = read_json(&out.join("drvmap.json"));
    for label in ["tools/hello", "tools/multi:client"] {
        let res = run_step(
            &depot.root,
            build_step(&build, label)["command"].as_str().unwrap(),
            &[],
        );
        assert!(
            res.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let stdout = String::from_utf8(res.stdout).unwrap();
        let paths: Vec<&str> = stdout.lines().collect();
        assert_eq!(paths.len(), 1, "{label} printed {stdout:?}");
        let expected = output_paths(drvmap[label]["drvPath"].as_str().unwrap());
        assert_eq!(paths, [expected[0].as_str()]);
        assert!(Path::new(paths[0]).exists());
        assert_eq!(
            depot.git(&["status", "--porcelain"]),
            "",
            "{label} dirtied the checkout"
        );
    }
}

#[test]
fn build_command_falls_back_to_the_attribute_when_the_drv_is_gone() {
    let depot = Depot::with_git();
    let out = pipeline(&depot, &[]);
    let build = phases(&out).remove(0).1;
    // Nothing depends on docs, so its .drv can be deleted from the store.
    let drv = read_json(&out.join("drvmap.json"))["docs"]["drvPath"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(std::process::Command::new("nix-store").args(["--delete", &drv]));
    assert!(!Path::new(&drv).exists());
    let res = run_step(
        &depot.root,
        build_step(&build, "docs")["command"].as_str().unwrap(),
        &[],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8(res.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.trim_end().ends_with("-docs"), "{stdout}");
    assert_eq!(depot.git(&["status", "--porcelain"]), "");
}

#[test]
fn hostile_attribute_names_build_the_right_attribute() {
    let depot = Depot::with_git();
    let nasty = "we'ird \"q\" $(touch PWNED) `touch PWNED2` $HOME \\ ü";
    depot.write(
        "tools/hostile.nix",
        &format!(
            "{{ depot, ... }}:\ndepot.nix.readTree.drvTargets {{\n  {} = depot.nix.build.mkTarget {{ name = \"hostile\"; text = \"nasty\"; }};\n  \"line\\nbreak\" = depot.nix.build.mkTarget {{ name = \"linebreak\"; }};\n}}\n",
            serde_json::to_string(nasty).unwrap().replace("${", "\\${")
        ),
    );
    depot.commit("hostile");
    let out = pipeline(&depot, &[]);
    validate_chunks(&out);
    let build = phases(&out).remove(0).1;
    let drvmap = read_json(&out.join("drvmap.json"));
    for sub in [nasty, "line\nbreak"] {
        let label = format!("tools/hostile:{sub}");
        let step = build_step(&build, &label);
        assert_eq!(step["label"].as_str().unwrap(), format!(":nix: {label}"));
        let drv = drvmap[label.as_str()]["drvPath"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            drvmap[label.as_str()]["attrPath"],
            json!(["tools", "hostile", sub])
        );
        let expected = output_paths(&drv)[0].clone();
        // Force the fallback, which evaluates the attribute path.
        ok(std::process::Command::new("nix-store").args(["--delete", &drv]));
        let res = run_step(&depot.root, step["command"].as_str().unwrap(), &[]);
        assert!(
            res.status.success(),
            "{label:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(String::from_utf8(res.stdout).unwrap().trim_end(), expected);
    }
    assert!(!depot.path("PWNED").exists() && !depot.path("PWNED2").exists());
    assert_eq!(depot.git(&["status", "--porcelain"]), "");
}

#[test]
fn targets_with_the_same_derivation_share_one_step() {
    let depot = Depot::new();
    depot.write("apps/alias.nix", "{ depot, ... }: depot.apps.cli\n");
    let out = pipeline(&depot, &[]);
    validate_chunks(&out);
    let build = phases(&out).remove(0).1;
    let shared: Vec<&Value> = build
        .iter()
        .filter(|s| s["label"] == ":nix: apps/alias, apps/cli")
        .collect();
    assert_eq!(shared.len(), 1, "{build:#?}");
    let drvmap = read_json(&out.join("drvmap.json"));
    assert_eq!(
        drvmap["apps/alias"]["drvPath"],
        drvmap["apps/cli"]["drvPath"]
    );
}

#[test]
fn a_bad_parent_map_builds_everything() {
    let depot = Depot::new();
    let good = pipeline(&depot, &[]);
    let text = std::fs::read_to_string(good.join("drvmap.json")).unwrap();
    let bad_maps = [
        ("truncated", text[..text.len() / 2].to_owned()),
        ("not json", "this is not json".to_owned()),
        ("a list", "[]".to_owned()),
        (
            "wrong entry shape",
            text.replacen("\"drvPath\"", "\"drv\"", 1),
        ),
        (
            "drvPath not a store path",
            text.replacen("/nix/store/", "/tmp/", 1),
        ),
    ];
    for (what, body) in bad_maps {
        let parent = depot.out("bad-parent.json");
        std::fs::write(&parent, body).unwrap();
        let out = depot.out("pipeline");
        let res = drvkite()
            .args([
                "pipeline",
                "--parent-map",
                parent.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--depot",
            ])
            .arg(&depot.root)
            .output()
            .unwrap();
        assert!(res.status.success(), "{what}");
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(
            stderr.contains("warning: ignoring the parent map"),
            "{what}: {stderr}"
        );
        let build = phases(&out).remove(0).1;
        assert!(
            build.iter().all(|s| s["skip"] == false),
            "{what}: a step was skipped"
        );
        assert_eq!(
            read_json(&out.join("summary.json"))["parentMap"]["status"],
            "invalid"
        );
    }
}

#[test]
fn settings_come_from_the_depot_and_flags_win() {
    let depot = Depot::new();
    let root = std::fs::read_to_string(depot.path("default.nix")).unwrap();
    depot.write(
        "default.nix",
        &root.replace(
            "readTree.fix (\n  self:\n  readTree {",
            "readTree.fix (\n  self:\n  { ci.drvkite = { chunkSize = 3; bootstrapKey = \"bootstrap\"; defaultStepOverrides = { priority = 5; }; additionalSteps = [ { label = \"lint all\"; command = \"true\"; } ]; postBuildSteps = [ { label = \":anchor:\"; command = \"true\"; branches = \"main\"; } ]; }; } // readTree {",
        ),
    );
    let out = pipeline(&depot, &[]);
    validate_chunks_with(&out, &["bootstrap"]);
    let manifest = read_json(&out.join("manifest.json"));
    let build_chunks = manifest["phases"][0]["chunks"].as_array().unwrap();
    assert!(build_chunks.len() >= 5);
    for c in build_chunks {
        assert!(
            read_json(&out.join(c.as_str().unwrap()))["steps"]
                .as_array()
                .unwrap()
                .len()
                <= 3
        );
    }
    let p = phases(&out);
    let build = &p[0].1;
    assert_eq!(build.last().unwrap()["label"], "lint all");
    assert_eq!(build_step(build, "docs")["priority"], 5);
    assert_eq!(
        build_step(build, "docs")["depends_on"],
        json!(["bootstrap"])
    );
    assert_eq!(p[1].1.last().unwrap()["label"], ":anchor:");

    // A flag beats the depot's attribute.
    let out = pipeline(&depot, &["--chunk-size", "500"]);
    let manifest = read_json(&out.join("manifest.json"));
    assert_eq!(manifest["phases"][0]["chunks"].as_array().unwrap().len(), 1);
}

fn validate_chunks_with(out: &Path, external: &[&str]) {
    for (_, steps) in phases(out) {
        validate_pipeline(&json!({ "steps": steps }));
    }
    check_references(&all_steps(out), external);
}

#[test]
fn release_only_pipeline_has_no_build_steps() {
    let depot = Depot::new();
    let out = pipeline(&depot, &["--active-phases", "release"]);
    let p = phases(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, "release");
    validate_chunks_with(&out, &[]);
    assert!(!out.join("build-chunk-001.json").exists());
    // The summary counts only the extra steps generated: the release ones.
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["extraSteps"], json!(p[0].1.len()));
    assert!(!p[0].1.is_empty());
}

#[test]
fn bad_settings_are_one_line_errors_and_keep_the_old_output() {
    let depot = Depot::new();
    let out = pipeline(&depot, &[]);
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    for (args, needle) in [
        (
            vec!["--active-phases", "build,deploy"],
            "\"deploy\" is not a known phase",
        ),
        (
            vec!["--chunk-size", "501"],
            "chunk size 501 is out of range",
        ),
        (
            vec!["--default-step-overrides", "[1]"],
            "--default-step-overrides is not valid JSON",
        ),
    ] {
        let res = fails(
            drvkite()
                .args(["pipeline", "--out", out.to_str().unwrap(), "--depot"])
                .arg(&depot.root)
                .args(&args),
        );
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    }
}

#[test]
fn chunk_files_are_named_in_upload_order() {
    let depot = Depot::new();
    let out = pipeline(&depot, &["--chunk-size", "2"]);
    let manifest = read_json(&out.join("manifest.json"));
    let chunks: Vec<String> = manifest["phases"][0]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let mut sorted = chunks.clone();
    sorted.sort();
    assert_eq!(chunks, sorted);
    assert_eq!(chunks[0], "build-chunk-001.json");
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("build-chunk-"))
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, chunks);
    validate_chunks(&out);
}

/// Fixed-output, structured-attrs and multi-output derivations all parse,
/// and dependencies are found through them.
#[test]
fn every_derivation_shape_parses_and_is_looked_through() {
    let depot = Depot::with_git();
    depot.write(
        "tools/shapes.nix",
        r#"{ depot, ... }:
let
  system = builtins.currentSystem;
  salt = builtins.readFile ../nix/salt;
  fod = derivation {
    name = "fod"; inherit system salt; builder = "/bin/sh";
    args = [ "-c" "printf fixed > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513";
  };
  structured = derivation {
    name = "structured"; inherit system salt; builder = "/bin/bash";
    __structuredAttrs = true;
    args = [ "-c" "source ./.attrs.sh; echo ${fod} > \"\${outputs[out]}\"" ];
    extra = { nested = [ 1 2 ]; };
  };
  multi = derivation {
    name = "multi"; inherit system salt; builder = "/bin/sh";
    outputs = [ "bin" "dev" ];
    args = [ "-c" "echo ${structured} ${depot.lib.greeting} > $bin; echo dev > $dev" ];
  };
in
depot.nix.readTree.drvTargets {
  inherit multi;
  top = depot.nix.build.mkTarget { name = "top"; deps = [ multi.dev ]; };
}
"#,
    );
    depot.commit("shapes");
    let out = pipeline(&depot, &[]);
    validate_chunks(&out);
    let build = phases(&out).remove(0).1;
    assert_eq!(
        build_step(&build, "tools/shapes:top")["depends_on"],
        json!([":init:", key_of(&build, "tools/shapes:multi")])
    );
    // Through the structured-attrs and fixed-output derivations to greeting.
    assert_eq!(
        build_step(&build, "tools/shapes:multi")["depends_on"],
        json!([":init:", key_of(&build, "lib/greeting")])
    );
    let res = run_step(
        &depot.root,
        build_step(&build, "tools/shapes:multi")["command"]
            .as_str()
            .unwrap(),
        &[],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8(res.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.trim_end().ends_with("-multi-bin"), "{stdout}");
    assert_eq!(depot.git(&["status", "--porcelain"]), "");
}
