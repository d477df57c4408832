# docs/ has .skip-subtree: this file is read, docs/internal is not.
{ depot, ... }:
depot.nix.build.mkTarget { name = "docs"; }
