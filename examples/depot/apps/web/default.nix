{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget writeScript;
in
mkTarget {
  name = "web";
  deps = [
    depot.tools.hello
    depot.lib.strings
  ];
  meta.ci = {
    buildkiteExtraDeps = [ ];
    extraSteps.deploy = {
      phase = "release";
      prompt = "Deploy the web app?";
      branches = [ "refs/heads/main" ];
      command = writeScript "web-deploy" ''
        echo "deploying web"
        if [ -n "''${EXTRA_STEP_LOG:-}" ]; then echo "web-deploy" >> "$EXTRA_STEP_LOG"; fi
      '';
    };
  };
}
