# The depot's root, as `drvkite init --vendor-readtree` writes it: readTree
# (nix/readTree/default.nix) turns every folder and .nix file into an
# attribute, and drvkite builds every derivation it finds there. Each file
# is called with `depot` (this whole tree) and `externalArgs`.
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
