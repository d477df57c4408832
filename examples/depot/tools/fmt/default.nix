# A formatting check that runs on every build, changed or not.
{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "fmt";
  meta.ci.extraSteps.check = {
    label = "formatting check";
    alwaysRun = true;
    command = writeScript "fmt-check" ''
      if [ -n "$(git status --porcelain)" ]; then
        echo "the checkout is dirty:"; git status --porcelain; exit 1
      fi
      if [ -n "''${EXTRA_STEP_LOG:-}" ]; then echo "fmt-check" >> "$EXTRA_STEP_LOG"; fi
    '';
  };
}
