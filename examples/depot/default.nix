# The example depot: a small readTree monorepo that drvkite's demo and tests
# run on. It has no `ci.targets`, so drvkite gathers every eligible
# derivation itself.
{ ... }@args:

let
  readTree = import ./nix/readTree { };
in
readTree.fix (
  self:
  readTree {
    path = ./.;
    args = {
      depot = self;
      externalArgs = args;
    };
  }
)
