throw "tools/hello/unused.nix must never be read: tools/hello has a default.nix"
