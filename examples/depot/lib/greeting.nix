{ depot, ... }:
depot.nix.build.mkTarget {
  name = "greeting";
  text = "hello";
}
