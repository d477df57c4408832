# Placeholder until packaging lands: exposes drvkite's Nix library.
{ ... }:
{
  lib.readTree = import ./nix/readTree { };
}
