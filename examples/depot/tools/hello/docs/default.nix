{ depot, ... }:
depot.nix.build.mkTarget {
  name = "hello-docs";
  deps = [ depot.tools.hello ];
}
