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
      # drvkite exports the parent's output path; ./result is TVL's way.
      command = writeScript "lint-inspect-output" ''
        echo "parent output: $(cat "$DRVKITE_PARENT_OUTPUT")"
        if [ -n "''${EXTRA_STEP_LOG:-}" ]; then
          echo "lint-inspect-output $DRVKITE_PARENT_OUTPUT $(readlink result || echo no-result)" >> "$EXTRA_STEP_LOG"
        fi
      '';
    };
  };
}
