# A target with extra steps: a plain check and one that needs the output.
{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "lint";
  deps = [ depot.lib.strings ];
  meta.ci.extraSteps = {
    check = {
      label = "lint check";
      command = writeScript "lint-check" ''
        echo "lint check ran in $PWD"
        if [ -n "''${EXTRA_STEP_LOG:-}" ]; then echo "lint-check" >> "$EXTRA_STEP_LOG"; fi
      '';
    };
    inspect-output = {
      needsOutput = true;
      command = writeScript "lint-inspect-output" ''
        echo "parent output: $(cat result)"
        if [ -n "''${EXTRA_STEP_LOG:-}" ]; then echo "lint-inspect-output" >> "$EXTRA_STEP_LOG"; fi
      '';
    };
  };
}
