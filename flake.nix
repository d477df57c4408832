{
  description = "drvkite: turn a Nix depot into a Buildkite pipeline that builds only what changed";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system nixpkgs.legacyPackages.${system};
          }) systems
        );
    in
    {
      # readTree, ciEligible, mkCiTargets, ciTargets, mkLabel: pure Nix, the
      # same on every system (see nix/lib.nix).
      lib = import ./nix/lib.nix { };

      overlays.default = final: _prev: { drvkite = final.callPackage ./nix/package.nix { }; };

      packages = forAllSystems (
        _system: pkgs: rec {
          drvkite = pkgs.callPackage ./nix/package.nix { };
          default = drvkite;
        }
      );

      # `nix run <this flake> -- pipeline …`
      apps = forAllSystems (
        system: _pkgs:
        let
          drvkite = self.packages.${system}.drvkite;
        in
        {
          default = {
            type = "app";
            program = "${drvkite}/bin/${drvkite.meta.mainProgram}";
            meta.description = drvkite.meta.description;
          };
        }
      );

      devShells = forAllSystems (_system: pkgs: { default = import ./shell.nix { inherit pkgs; }; });
    };
}
