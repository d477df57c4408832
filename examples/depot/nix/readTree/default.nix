# The depot's readTree is drvkite's own (//nix/readTree at the repository
# root). A real depot vendors it or takes it from drvkite's flake `lib`.
import ../../../../nix/readTree
