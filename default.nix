# drvkite, built with nixpkgs: `nix-build` in this folder leaves it in
# ./result/bin/drvkite. Pass your own package set with
# `nix-build --arg pkgs 'import <your-nixpkgs> { }'`.
#
# A depot that only wants drvkite's Nix library (readTree, ciTargets) should
# use `import ./nix/lib.nix { }` instead: that needs no nixpkgs.
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./nix/package.nix { }
