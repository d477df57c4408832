//! Command-line interface: argument definitions and the glue that runs each
//! command through the stages.

use std::process::ExitCode;

use anyhow::{Context, Result};
use camino::Utf8PathBuf;
use clap::{Parser, Subcommand};

use crate::drvmap::{self, DrvMap};
use crate::eval::{Evaluator, Nix};
use crate::types::Label;

#[derive(Debug, Parser)]
#[command(
    name = "drvkite",
    version,
    about = "Turn a Nix depot into a Buildkite pipeline that builds only what changed"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate the depot and write its derivation map (TVL's drvmap.json format).
    Drvmap {
        /// Root folder of the depot (holding its default.nix).
        #[arg(long, env = "DRVKITE_DEPOT", default_value = ".")]
        depot: Utf8PathBuf,
        /// Where to write the map.
        #[arg(long, default_value = "drvmap.json")]
        out: Utf8PathBuf,
    },
    /// Compare two derivation maps: added, removed and changed labels.
    Diff {
        old: Utf8PathBuf,
        new: Utf8PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Explain why a target changed since the parent map.
    Explain {
        /// The target's label, e.g. tools/foo or tools/foo:sub.
        label: String,
        /// The derivation map to compare against.
        #[arg(long)]
        parent_map: Utf8PathBuf,
        #[arg(long, env = "DRVKITE_DEPOT", default_value = ".")]
        depot: Utf8PathBuf,
        /// How many levels of changed input derivations to follow.
        #[arg(long, default_value_t = 8)]
        depth: usize,
    },
    /// Persist and restore caches between builds, safely (see README: Ephemera).
    Ephemera(crate::ephemera::EphemeraArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Drvmap { depot, out } => {
            let evaluator = Evaluator::new(Nix::locate()?, &depot, default_settings_attr())?;
            let eval = evaluator.evaluate(true).await?;
            let map = eval.drvmap();
            map.write(&out)?;
            eprintln!(
                "wrote {out}: {} targets in {:.1}s",
                map.len(),
                eval.duration.as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { old, new, json } => {
            let d = drvmap::diff(&DrvMap::load(&old)?, &DrvMap::load(&new)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", d.render_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            label,
            parent_map,
            depot,
            depth,
        } => {
            let label = Label::new(label);
            let parent = DrvMap::load(&parent_map)?;
            let evaluator = Evaluator::new(Nix::locate()?, &depot, default_settings_attr())?;
            let new = evaluator.evaluate_one(&label).await?;
            let Some(old) = parent.get(&label) else {
                println!("{label} is new: {parent_map} has no entry for it");
                return Ok(ExitCode::SUCCESS);
            };
            if old.drv_path == new.drv_path {
                println!("{label} has not changed: {}", new.drv_path);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{label} changed: {} -> {}", old.drv_path, new.drv_path);
            let diffs = crate::explain::explain(&old.drv_path, &new.drv_path, depth)?;
            print!("{}", crate::explain::render(&diffs));
            Ok(ExitCode::SUCCESS)
        }
        Command::Ephemera(args) => crate::ephemera::run(args).await,
    }
}

fn default_settings_attr() -> Vec<String> {
    vec!["ci".into(), "drvkite".into()]
}
