# drvkite's Nix library, for depots that adopt drvkite. It needs no nixpkgs,
# so a depot can use it however it gets drvkite's source (flake input,
# fetchTarball, a copy of this file and ./readTree in the depot):
#
#   drvkiteLib = import "${drvkite}/nix/lib.nix" { };
#
# It is a function of `{ ... }`, like readTree, so a copy inside the depot's
# tree is a valid readTree node. The flake exposes the same set as
# `drvkite.lib`.
{ ... }:
let
  readTree = import ./readTree { };

  # The rule drvkite applies to a depot without `ci.targets` (see
  # nix/eval.nix), TVL's: anything with an outPath, unless skipped, or
  # marked broken (`meta.ci.skip = false` keeps a broken-marked target).
  ciEligible = t: (t ? outPath) && !(t.meta.ci.skip or (t.meta.broken or false));

  # A depot's CI targets: every readTree node (and `meta.ci.targets`
  # subtarget) that `eligible` accepts, in readTree order.
  mkCiTargets =
    {
      depot,
      eligible ? ciEligible,
    }:
    readTree.gather eligible depot;
in
{
  inherit readTree ciEligible mkCiTargets;

  # `ci.targets = drvkiteLib.ciTargets self;` gives a depot the targets
  # drvkite would find on its own, for tools that read `ci.targets`.
  ciTargets = depot: mkCiTargets { inherit depot; };

  # A target's label as drvkite prints it: "tools/foo" or "tools/foo:sub".
  inherit (readTree) mkLabel;
}
