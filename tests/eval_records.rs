//! What drvkite's evaluation forces in a target's user data: exactly what
//! printing it as JSON forces, so a value that printing never reaches
//! cannot mark a target broken.

mod common;

use common::*;

#[test]
fn a_set_with_out_path_in_step_args_is_its_out_path_and_nothing_more_is_forced() {
    let depot = Depot::new();
    depot.write(
        "tools/withsrc.nix",
        r#"{ depot, ... }:
depot.nix.build.mkTarget {
  name = "withsrc";
  meta.ci.buildkiteExtraStepArgs.env = {
    # Like a source filter's result: printed as JSON it is its outPath,
    # and the rest of it is never looked at.
    SRC = {
      outPath = "/some/source";
      passthru.unused = throw "never printed, so never forced";
    };
  };
}
"#,
    );
    let out = pipeline(&depot, &[]);
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["broken"], serde_json::json!([]), "{summary}");
    let steps: Vec<_> = phases(&out).into_iter().flat_map(|(_, s)| s).collect();
    // The step's own env is replaced by the args', so find it by label.
    let step = steps
        .iter()
        .find(|s| s["label"] == ":nix: tools/withsrc")
        .expect("a build step for tools/withsrc");
    assert_eq!(step["env"]["SRC"], "/some/source", "{step}");
}
