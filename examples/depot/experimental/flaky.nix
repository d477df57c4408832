# Marked broken: not a CI target.
{ depot, ... }:
depot.nix.build.mkTarget {
  name = "flaky";
  meta.broken = true;
}
