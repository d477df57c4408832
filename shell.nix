# `nix-shell` in this folder: the tools to build, lint and test drvkite.
# The tests run real Nix, hence `nix` here too.
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.mkShell {
  packages = [
    pkgs.cargo
    pkgs.rustc
    pkgs.clippy
    pkgs.rustfmt
    pkgs.nix
    pkgs.git
  ];
}
