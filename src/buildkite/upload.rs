//! `drvkite upload`: hand one phase of a generated pipeline to
//! `buildkite-agent pipeline upload`, and keep the pipeline folder as build
//! artifacts so later steps (and later builds) can use it.

use anyhow::{Result, bail};
use camino::{Utf8Path, Utf8PathBuf};
use clap::Args;
use serde::Deserialize;

use super::{Agent, group, read_pipeline_json};

/// The file `drvkite pipeline` writes to describe its output folder.
pub const MANIFEST: &str = "manifest.json";

/// Phases drvkite generates. One of these missing from a manifest is a phase
/// without steps; any other name is a typo.
const KNOWN_PHASES: &[&str] = &["build", "release"];

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The folder `drvkite pipeline --out` wrote. Give it relative to the
    /// working directory: artifact paths are kept as given (`pipeline/…`).
    #[arg(long, default_value = "pipeline")]
    pub dir: Utf8PathBuf,
    /// Which phase's chunks to upload.
    #[arg(long, default_value = "build")]
    pub phase: String,
    /// Print the buildkite-agent commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not upload the folder's files as artifacts (e.g. from the release
    /// step, which downloaded them).
    #[arg(long)]
    pub no_artifacts: bool,
}

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub drvmap: String,
    pub summary: String,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Deserialize)]
pub struct Phase {
    pub name: String,
    #[serde(default)]
    pub steps: usize,
    pub chunks: Vec<String>,
}

impl Manifest {
    pub fn load(dir: &Utf8Path) -> Result<Self> {
        let m: Manifest = read_pipeline_json(dir, MANIFEST, "manifest")?;
        let path = dir.join(MANIFEST);
        // The names are joined to `dir` and handed to the agent: refuse
        // anything that could point outside the folder.
        let names = [&m.drvmap, &m.summary]
            .into_iter()
            .chain(m.phases.iter().flat_map(|p| &p.chunks));
        for name in names {
            if name.is_empty() || name.contains('/') || name == ".." || name == "." {
                bail!(
                    "{path} names {name:?}, not a file in {dir}: regenerate {dir} with `drvkite pipeline`"
                );
            }
        }
        Ok(m)
    }

    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Every file of the folder worth keeping: the maps, the manifest and
    /// the chunks of all phases (a later step uploads the release phase from
    /// them).
    pub fn files(&self) -> Vec<&str> {
        let mut files = vec![self.drvmap.as_str(), MANIFEST, self.summary.as_str()];
        files.extend(
            self.phases
                .iter()
                .flat_map(|p| p.chunks.iter().map(String::as_str)),
        );
        files
    }
}

/// The agent commands for one phase, in the order to run them.
pub fn plan(dir: &Utf8Path, manifest: &Manifest, phase: &str, artifacts: bool) -> Result<Plan> {
    // Artifact paths are kept as spelled: `./pipeline/` and `pipeline`
    // must both give `pipeline/drvmap.json`.
    let dir: Utf8PathBuf = dir
        .components()
        .filter(|c| *c != camino::Utf8Component::CurDir)
        .collect();
    let dir = dir.as_path();
    let chunks: Vec<Utf8PathBuf> = match manifest.phase(phase) {
        // Each upload lands right after the uploading job, so the last
        // chunk goes first and the first chunk ends up on top.
        Some(p) => p.chunks.iter().rev().map(|c| dir.join(c)).collect(),
        None if KNOWN_PHASES.contains(&phase) => Vec::new(),
        None => {
            let known: Vec<&str> = manifest.phases.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "{} has no phase {phase:?}: pass --phase with one of {}",
                dir.join(MANIFEST),
                known.join(", ")
            );
        }
    };
    let artifact_files: Vec<Utf8PathBuf> = if artifacts {
        manifest.files().iter().map(|f| dir.join(f)).collect()
    } else {
        Vec::new()
    };
    for f in chunks.iter().chain(&artifact_files) {
        if !f.is_file() {
            bail!(
                "{f} is missing although {} lists it: regenerate the folder with `drvkite pipeline`",
                dir.join(MANIFEST)
            );
        }
    }
    // The agent reads artifact arguments as `;`-separated globs.
    if let Some(bad) = artifact_files
        .iter()
        .find(|f| f.as_str().contains([';', '*', '?', '[', ']', '{', '}']))
    {
        bail!(
            "cannot upload {bad} as an artifact: `;` and glob characters are not allowed in --dir"
        );
    }
    Ok(Plan {
        chunks,
        artifacts: artifact_files,
    })
}

pub struct Plan {
    /// Chunk files in upload order (last chunk first).
    pub chunks: Vec<Utf8PathBuf>,
    pub artifacts: Vec<Utf8PathBuf>,
}

pub fn run(args: &UploadArgs) -> Result<()> {
    let manifest = Manifest::load(&args.dir)?;
    let plan = plan(&args.dir, &manifest, &args.phase, !args.no_artifacts)?;
    let agent = Agent::new(args.dry_run)?;
    let phase = &args.phase;
    let steps = manifest.phase(phase).map_or(0, |p| p.steps);
    if plan.chunks.is_empty() {
        group(&format!("phase {phase}: no steps, nothing to upload"));
    } else {
        group(&format!(
            "uploading phase {phase}: {} in {} (last chunk first, so Buildkite lists them in order)",
            crate::pipeline::counted(steps, "step"),
            crate::pipeline::counted(plan.chunks.len(), "chunk")
        ));
        for chunk in &plan.chunks {
            agent.run(&["pipeline", "upload", chunk.as_str()], None)?;
        }
    }
    if !plan.artifacts.is_empty() {
        group(&format!("uploading {} as artifacts", args.dir));
        let paths: Vec<&str> = plan.artifacts.iter().map(|p| p.as_str()).collect();
        agent.run(&["artifact", "upload", &paths.join(";")], None)?;
    }
    Ok(())
}
