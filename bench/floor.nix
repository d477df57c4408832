# The benchmark's floor: the least any tool must do to know a depot's
# pipeline. It gathers the CI targets the way drvkite does (same readTree,
# same eligibility rule), instantiates every target and every extra-step
# command, and returns their .drv paths; nothing else.
#
#   nix-instantiate --eval --strict --json --read-write-mode bench/floor.nix \
#     --argstr depotPathStr /abs/depot
{ depotPathStr }:
let
  readTree = import ../nix/readTree { };
  imported = import (/. + depotPathStr);
  depot = if builtins.isFunction imported then imported { } else imported;
  eligible =
    t:
    builtins.isAttrs t
    && (t.type or null) == "derivation"
    && !(t.meta.ci.skip or false)
    && !(t.meta.broken or false);
  drv = d: builtins.unsafeDiscardStringContext d.drvPath;
in
builtins.concatMap (
  t: [ (drv t) ] ++ map (s: drv s.command) (builtins.attrValues (t.meta.ci.extraSteps or { }))
) (readTree.gather eligible depot)
