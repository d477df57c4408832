# A target with a release-phase step that runs only on the main branch.
{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "changelog";
  deps = [ depot.apps.web ];
  meta.ci.extraSteps.publish = {
    phase = "release";
    branches = [ "refs/heads/main" ];
    command = writeScript "changelog-publish" ''
      echo "publishing the changelog"
      if [ -n "''${EXTRA_STEP_LOG:-}" ]; then echo "changelog-publish" >> "$EXTRA_STEP_LOG"; fi
    '';
  };
}
