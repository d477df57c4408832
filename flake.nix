{
  description = "drvkite: turn a Nix depot into a Buildkite pipeline that builds only what changed";

  # Placeholder until packaging lands: only the Nix library is exposed.
  outputs = { self }: {
    lib.readTree = import ./nix/readTree { };
  };
}
