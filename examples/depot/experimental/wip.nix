# Work in progress: CI leaves it alone.
{ depot, ... }:
depot.nix.build.mkTarget {
  name = "wip";
  meta.ci.skip = true;
}
