# drvkite built with nixpkgs' Rust tooling. Used by default.nix, the flake's
# packages and its overlay (as `pkgs.callPackage ./nix/package.nix { }`).
{
  lib,
  rustPlatform,
  makeWrapper,
  # The Nix whose tools (nix-instantiate, nix-store, nix-build) drvkite runs.
  # Override it to match the Nix daemon of your CI machines if needed.
  nix,
}:

let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  root = toString ../.;

  # Only what `cargo build` reads: the manifest, the lock file, the Rust
  # sources and the two Nix files compiled into the binary. Everything else
  # (target/, .git, result links, tests, examples, docs) is left out, so it
  # neither reaches the store nor changes the build's hash.
  wanted = [
    "Cargo.toml"
    "Cargo.lock"
    "src"
    "nix/eval.nix"
    "nix/readTree"
  ];
  startsWith = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  relativePath = path: builtins.substring (builtins.stringLength root + 1) (-1) (toString path);
  sourceFilter =
    path: _type:
    let
      rel = relativePath path;
    in
    builtins.any (
      w:
      rel == w
      # inside a wanted folder
      || startsWith (w + "/") rel
      # a folder on the way to a wanted entry (e.g. nix/ for nix/eval.nix)
      || startsWith (rel + "/") w
    ) wanted;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  src = lib.cleanSourceWith {
    src = ../.;
    filter = sourceFilter;
    name = "drvkite-source";
  };

  # Dependency hashes come from Cargo.lock itself: nothing to update by hand
  # when dependencies change.
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ makeWrapper ];

  # The integration tests (tests/, not part of the source above) run real
  # Nix against a writable store and git; the build sandbox has neither.
  # The unit tests in src/ are pure and still run.
  cargoTestFlags = [
    "--lib"
    "--bins"
  ];

  # drvkite finds Nix on PATH at run time; the wrapper makes sure there is
  # one, ahead of whatever else PATH holds, so evaluation uses a known Nix.
  postInstall = ''
    wrapProgram $out/bin/drvkite --prefix PATH : ${lib.makeBinPath [ nix ]}
  '';

  meta = {
    description = "Turn a Nix depot into a Buildkite pipeline that builds only what changed";
    mainProgram = "drvkite";
    # No license has been chosen for drvkite yet; add `license` here when
    # one is.
  };
}
