//! drvkite: turn a Nix monorepo ("depot") into a Buildkite pipeline that
//! builds only what changed.
//!
//! The data path, one module per stage: [`eval`] (nix-instantiate) →
//! [`drvmap`] (derivation map and diff) → [`graph`] (.drv analysis) →
//! pipeline rendering, with [`substitute`] to skip what a binary cache has.
//! [`explain`] answers why a target changed.

pub mod atomic;
pub mod buildkite;
pub mod cli;
pub mod drvmap;
pub mod ephemera;
pub mod eval;
pub mod explain;
pub mod graph;
pub mod init;
pub mod pipeline;
pub mod substitute;
pub mod types;
