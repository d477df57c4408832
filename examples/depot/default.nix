# The example depot: a small readTree monorepo that drvkite's demo and tests
# run on. It has no `ci.targets`, so drvkite gathers every eligible
# derivation itself. It needs nothing outside this folder (nix/readTree is a
# copy of drvkite's), so a copy of it is a depot to start from.
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
