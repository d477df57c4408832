# A default.nix with a child folder (docs) and a sibling file that readTree
# must not read (unused.nix). It reaches lib/strings through a derivation
# that is not a target itself.
{ depot, ... }:
let
  inherit (depot.nix.build) mkTarget;
  generated = mkTarget {
    name = "hello-generated-sources";
    deps = [ depot.lib.strings ];
  };
in
mkTarget {
  name = "hello";
  deps = [ generated ];
  meta.timeout = 90;
}
