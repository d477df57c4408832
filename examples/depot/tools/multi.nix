# Two subtargets, tools/multi:client and tools/multi:server; `notes` is not
# a derivation and is left out.
{ depot, ... }:
depot.nix.readTree.drvTargets {
  client = depot.nix.build.mkTarget { name = "multi-client"; };
  server = depot.nix.build.mkTarget {
    name = "multi-server";
    deps = [ depot.lib.greeting ];
  };
  notes = "not a derivation";
}
