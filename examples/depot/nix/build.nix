# Tiny stand-ins for nixpkgs builders: everything here builds with /bin/sh
# and nothing else, so the example needs no nixpkgs.
{ ... }:

let
  system = builtins.currentSystem;
  # drvkite's tests write a salt file here so every run gets store paths no
  # earlier run has built.
  salt = if builtins.pathExists ./salt then builtins.readFile ./salt else "";
in
rec {
  # A derivation whose output is a text file. `deps` become input
  # derivations because their paths appear in the build script.
  mkTarget =
    {
      name,
      text ? name,
      deps ? [ ],
      meta ? { },
    }:
    (derivation {
      inherit name system salt;
      builder = "/bin/sh";
      args = [
        "-c"
        ''
          {
            echo ${builtins.toJSON text}
            ${builtins.concatStringsSep "\n" (map (d: "echo ${d}") deps)}
          } > "$out"
        ''
      ];
    })
    // {
      inherit meta;
    };

  # An executable script, as an extra step's `command` wants.
  # The text travels in an environment variable: spliced into the build
  # command it would need shell quoting.
  writeScript =
    name: text:
    derivation {
      inherit name system salt;
      text = "#!/bin/sh\n" + text;
      builder = "/bin/sh";
      args = [
        "-c"
        ''
          printf '%s' "$text" > "$out"
          /bin/chmod +x "$out"
        ''
      ];
    };
}
