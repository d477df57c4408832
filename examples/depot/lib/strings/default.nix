{ depot, ... }:
depot.nix.build.mkTarget {
  name = "strings";
  deps = [ depot.lib.greeting ];
}
