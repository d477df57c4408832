{ depot, ... }:
depot.nix.build.mkTarget {
  name = "cli";
  deps = [ depot.tools.multi.client ];
}
