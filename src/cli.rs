//! Command-line interface: argument definitions and the glue that runs each
//! command through the stages.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use camino::Utf8PathBuf;
use clap::{Parser, Subcommand};

use crate::drvmap::{self, DrvMap};
use crate::eval::{Evaluator, Nix};
use crate::pipeline::ParentMap;
use crate::pipeline::checkout::{self, Checked};
use crate::pipeline::settings::{Overrides, Settings};
use crate::pipeline::text::printable;
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

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Evaluate the depot and write the Buildkite pipeline: chunk files, a
    /// manifest, a summary and the derivation map. Exits with status 3 when
    /// it wrote the pipeline but some targets failed to evaluate (their
    /// steps fail the build).
    Pipeline(PipelineArgs),
    /// Compare two derivation maps: added, removed and changed labels.
    Diff {
        /// The older derivation map (e.g. the parent build's drvmap.json).
        old: Utf8PathBuf,
        /// The newer derivation map.
        new: Utf8PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Explain why a target changed since the parent map, and whether a
    /// binary cache has it (with --skip-cached or the depot's skipCached).
    Explain {
        /// The target's label, e.g. tools/foo or tools/foo:sub.
        label: String,
        /// The derivation map to compare against.
        #[arg(long)]
        parent_map: Utf8PathBuf,
        /// Root folder of the depot (holding its default.nix).
        #[arg(long, env = "DRVKITE_DEPOT", default_value = ".")]
        depot: Utf8PathBuf,
        /// How many levels of changed input derivations to follow.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        /// Attribute path of the depot's pipeline settings (dot-separated).
        #[arg(long, env = "DRVKITE_SETTINGS_ATTR", default_value = "ci.drvkite")]
        settings_attr: String,
        #[command(flatten)]
        cache: crate::substitute::CacheArgs,
    },
    /// Upload a phase's pipeline chunks with buildkite-agent, in the order
    /// Buildkite shows them, and the pipeline folder as artifacts.
    Upload(crate::buildkite::upload::UploadArgs),
    /// The parent derivation map, from an earlier Buildkite build.
    ParentMap {
        #[command(subcommand)]
        command: crate::buildkite::parent_map::ParentMapCommand,
    },
    /// Put a summary of the generated pipeline on the Buildkite build page.
    Annotate(crate::buildkite::annotate::AnnotateArgs),
    /// Persist and restore caches between builds, safely (see docs/ephemera.md).
    Ephemera(crate::ephemera::EphemeraArgs),
    /// Make a depot's git checkout ready for drvkite in CI: write the
    /// bootstrap pipeline (.buildkite/drvkite.yml) and the .gitignore lines
    /// for the steps' out-links, and check for readTree. Never replaces a
    /// file; a second run changes nothing.
    Init(crate::init::InitArgs),
}

#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// Root folder of the depot (holding its default.nix).
    #[arg(long, env = "DRVKITE_DEPOT", default_value = ".")]
    pub depot: Utf8PathBuf,
    /// Folder to write the pipeline into (replaced as a whole).
    #[arg(long, env = "DRVKITE_OUT", default_value = "pipeline")]
    pub out: Utf8PathBuf,
    /// The parent build's drvmap.json; targets whose drvPath is unchanged are
    /// skipped. Missing or invalid: every target is built.
    #[arg(long, env = "DRVKITE_PARENT_MAP")]
    pub parent_map: Option<Utf8PathBuf>,
    /// Strict mode for CI: a missing or unusable parent map fails the run
    /// (status 1, nothing written) instead of building every target.
    #[arg(long, env = "DRVKITE_REQUIRE_PARENT_MAP")]
    pub require_parent_map: bool,
    /// Attribute path of the depot's pipeline settings (dot-separated).
    #[arg(long, env = "DRVKITE_SETTINGS_ATTR", default_value = "ci.drvkite")]
    pub settings_attr: String,
    /// The depot attribute that lists the targets, e.g. ci.fastTargets for
    /// a second, fast pipeline (default: the depot's targetsAttr setting,
    /// else ci.targets, else drvkite's own gather).
    #[arg(long, env = "DRVKITE_TARGETS_ATTR", value_parser = parse_attr_path)]
    pub targets_attr: Option<AttrNames>,
    /// Known phases, in order (default: build,release).
    #[arg(long, env = "DRVKITE_PHASES", value_delimiter = ',')]
    pub phases: Option<Vec<String>>,
    /// Phases to generate steps for (default: all phases).
    #[arg(long, env = "DRVKITE_ACTIVE_PHASES", value_delimiter = ',')]
    pub active_phases: Option<Vec<String>>,
    /// Set cancel_on_build_failing on build steps (needs Buildkite's "Fail Fast").
    #[arg(long, env = "DRVKITE_CANCEL_ON_BUILD_FAILING")]
    pub cancel_on_build_failing: Option<bool>,
    /// JSON object merged into every build and extra step.
    #[arg(long, env = "DRVKITE_DEFAULT_STEP_OVERRIDES")]
    pub default_step_overrides: Option<String>,
    /// JSON list of steps appended to the build phase, verbatim.
    #[arg(long, env = "DRVKITE_ADDITIONAL_STEPS")]
    pub additional_steps: Option<String>,
    /// JSON list of steps appended to the release phase, verbatim.
    #[arg(long, env = "DRVKITE_POST_BUILD_STEPS")]
    pub post_build_steps: Option<String>,
    /// Most jobs per chunk file (1-500; default 192).
    #[arg(long, env = "DRVKITE_CHUNK_SIZE")]
    pub chunk_size: Option<usize>,
    /// Key of the static step every build step depends on (default :init:).
    #[arg(long, env = "DRVKITE_BOOTSTRAP_KEY")]
    pub bootstrap_key: Option<String>,
    /// Folder for the out-links (GC roots) that build and extra steps
    /// create, relative to the depot root or absolute; e.g.
    /// .git/drvkite-roots. Default: the depot root with TVL's names, which
    /// the depot's .gitignore must then ignore (checked with git).
    #[arg(long, env = "DRVKITE_OUT_LINK_DIR")]
    pub out_link_dir: Option<String>,
    /// Fail when any target fails to evaluate, instead of turning it into a
    /// failing step.
    #[arg(long, env = "DRVKITE_FAIL_ON_EVAL_ERROR")]
    pub fail_on_eval_error: bool,
    /// Number of nix-instantiate processes evaluating slices of the target
    /// list at once (default 1: each more costs about as much memory again).
    #[arg(long, env = "DRVKITE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Most memory each nix-instantiate process may use, e.g. 2G or 500M; a
    /// slice that needs more is split and evaluated again (default: no bound).
    #[arg(long, env = "DRVKITE_MAX_MEMORY", value_parser = crate::eval::ByteSize::parse)]
    pub max_memory: Option<crate::eval::ByteSize>,
    /// Folder holding a GC root (one link, replaced on each run) for every
    /// .drv the evaluation wrote, so a garbage collection before the build
    /// steps does not delete them.
    #[arg(long, env = "DRVKITE_GC_ROOTS_DIR")]
    pub gc_roots_dir: Option<Utf8PathBuf>,
    /// Show evaluation progress on stderr even when it is not a terminal.
    #[arg(long, env = "DRVKITE_PROGRESS")]
    pub progress: bool,
    #[command(flatten)]
    pub cache: crate::substitute::CacheArgs,
}

/// An attribute path given as `a.b.c`.
#[derive(Debug, Clone)]
pub struct AttrNames(pub Vec<String>);

/// `a.b.c` as attribute names; every name non-empty.
fn parse_attr_path(s: &str) -> Result<AttrNames, String> {
    let names: Vec<String> = s.split('.').map(str::to_owned).collect();
    if names.iter().any(String::is_empty) {
        return Err(format!(
            "{s:?} is not an attribute path: give dot-separated names, e.g. ci.fastTargets"
        ));
    }
    Ok(AttrNames(names))
}

fn parse_json_flag<T: serde::de::DeserializeOwned>(
    flag: &str,
    value: &Option<String>,
) -> Result<Option<T>> {
    value
        .as_deref()
        .map(|v| {
            serde_json::from_str(v)
                .with_context(|| format!("--{flag} is not valid JSON of the expected shape: {v}"))
        })
        .transpose()
}

impl PipelineArgs {
    fn overrides(&self) -> Result<Overrides> {
        Ok(Overrides {
            phases: self.phases.clone(),
            active_phases: self.active_phases.clone(),
            cancel_on_build_failing: self.cancel_on_build_failing,
            default_step_overrides: parse_json_flag(
                "default-step-overrides",
                &self.default_step_overrides,
            )?,
            additional_steps: parse_json_flag("additional-steps", &self.additional_steps)?,
            post_build_steps: parse_json_flag("post-build-steps", &self.post_build_steps)?,
            chunk_size: self.chunk_size,
            bootstrap_key: self.bootstrap_key.clone(),
            out_link_dir: self.out_link_dir.clone(),
            // The evaluation applies it (Evaluator::with_targets_attr).
            targets_attr: self.targets_attr.as_ref().map(|a| a.0.join(".")),
            skip_cached: self.cache.skip_cached,
        })
    }
}

/// `drvkite pipeline`'s exit status when it wrote the pipeline but some
/// targets failed to evaluate: the generating step can soft-fail on it
/// while the broken targets' own steps fail the build.
pub const EXIT_BROKEN_TARGETS: u8 = 3;

async fn pipeline(args: PipelineArgs) -> Result<ExitCode> {
    let flags = args.overrides()?;
    crate::pipeline::check_output(&args.out)?;
    let settings_attr: Vec<String> = args.settings_attr.split('.').map(str::to_owned).collect();
    let tuning = crate::eval::Tuning {
        workers: args
            .workers
            .map_or_else(crate::eval::default_workers, usize::from),
        max_memory: args.max_memory.clone(),
        progress: args.progress || std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let evaluator = Evaluator::new(Nix::locate()?, &args.depot, settings_attr)?
        .with_tuning(&tuning)
        .with_targets_attr(args.targets_attr.clone().map(|a| a.0));
    let (parent, mut warning) = ParentMap::load(args.parent_map.as_deref());
    crate::pipeline::require_parent_map(
        args.require_parent_map,
        args.parent_map.is_some(),
        &warning,
    )?;
    // Read the .drv files of the targets that may be built while Nix goes
    // on with the others.
    let prefetch = crate::graph::Prefetch::start();
    // So are binary caches asked, when the flag says so.
    let checker = args.cache.early_checker();
    let parent = Arc::new(parent);
    let hook: crate::eval::TargetHook = {
        let (parent, roots) = (Arc::clone(&parent), prefetch.sender());
        let cache = checker.as_ref().map(crate::substitute::Checker::sender);
        Arc::new(move |t| {
            if !parent.unchanged(&t.label, &t.drv_path) {
                let _ = roots.send(t.drv_path.clone());
                if let Some(c) = &cache {
                    let _ = c.send(t.drv_path.clone());
                }
            }
        })
    };
    let eval = evaluator
        .evaluate_into(args.fail_on_eval_error, Some(hook))
        .await;
    // On error the reader is left to stop by itself.
    let mut eval = eval?;
    crate::pipeline::set_aside_unuploadable(&mut eval);
    let graph = prefetch.finish();
    let mut parent = Arc::unwrap_or_clone(parent);
    if eval.targets.is_empty() && eval.broken.is_empty() {
        bail!(
            "depot {} has no CI targets (its ci.targets is missing or empty and readTree found no derivation to gather): check --depot, or give the depot targets; nothing was written",
            args.depot
        );
    }
    let evaluated = std::time::Instant::now();
    if let Some(dir) = &args.gc_roots_dir {
        evaluator.register_gc_roots(&eval, dir).await?;
    }
    let rooting = evaluated.elapsed();
    let mut settings = Settings::default();
    if let Some(depot_settings) = &eval.settings {
        settings = settings.apply(Overrides::from_depot(depot_settings, &args.settings_attr)?);
    }
    let settings = settings.apply(flags);
    settings.validate()?;
    if let (None, Some(path)) = (&warning, &args.parent_map) {
        warning = parent.check_against(path, &eval);
        crate::pipeline::require_parent_map(
            args.require_parent_map,
            args.parent_map.is_some(),
            &warning,
        )?;
    }
    let detail = match (&warning, &args.parent_map) {
        (Some(w), _) => {
            eprintln!("drvkite: warning: {}", printable(w));
            w.clone()
        }
        (None, Some(p)) => format!("{p}"),
        (None, None) => "no parent map given: building every target".to_owned(),
    };
    let cached = crate::substitute::finish(
        checker,
        settings.skip_cached,
        &args.cache.options(),
        eval.targets
            .iter()
            .filter(|t| !parent.unchanged(&t.label, &t.drv_path))
            .map(|t| t.drv_path.clone()),
    );
    if let Some(w) = cached.as_ref().and_then(crate::substitute::Report::warning) {
        eprintln!("drvkite: warning: {}", printable(&w));
    }
    // Asking git whether the out-links are ignored is mostly waiting for
    // git: done while the pipeline renders, and so is the derivation map.
    let (generated, checked) = std::thread::scope(|scope| {
        let check = scope.spawn(|| {
            let links = checkout::out_links(&eval, &settings);
            let checked = checkout::ensure_ignored(&args.depot, &links, &settings);
            (checked, links, eval.drvmap().to_tvl_json())
        });
        let generated = crate::pipeline::generate_with(
            &eval,
            &parent,
            &detail,
            &settings,
            graph,
            cached.as_ref(),
        );
        (generated, check.join())
    });
    let generated = generated?;
    let generated_at = std::time::Instant::now();
    let (checked, links, drvmap_json) = checked.expect("the out-link check panicked");
    if let Checked::Skipped(why) = checked? {
        eprintln!(
            "drvkite: note: {why}: not checking that the steps' out-links ({}) are ignored",
            links.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let write_started = std::time::Instant::now();
    let files =
        crate::pipeline::write_with(&generated, &drvmap_json, &args.out, settings.chunk_size)?;
    let writing = write_started.elapsed();
    eprintln!(
        "wrote {}: {}",
        args.out,
        generated.summary.counts(files.len())
    );
    for b in &eval.broken {
        eprintln!(
            "drvkite: warning: {} {}: {}",
            printable(b.label.as_str()),
            crate::pipeline::broken_what(b.kind),
            printable(&b.error)
        );
    }
    // The cache check overlaps the evaluation: what counts is the wait
    // after it.
    let cache_wait = cached
        .as_ref()
        .and_then(|r| r.finished)
        .map_or(std::time::Duration::ZERO, |f| {
            f.saturating_duration_since(evaluated + rooting)
        });
    let rendering =
        (generated_at - evaluated).saturating_sub(rooting + cache_wait + generated.graph_duration);
    let cache_stage = match cached.as_ref().map(|r| r.summary()) {
        Some(c) => format!(
            ", binary cache check {:.2}s ({:.3}s after evaluation)",
            c.seconds,
            cache_wait.as_secs_f64()
        ),
        None => String::new(),
    };
    eprintln!(
        "drvkite: stage times: evaluation {:.2}s, GC roots {:.2}s{cache_stage}, graph analysis {:.2}s, rendering {:.2}s, writing {:.2}s",
        eval.duration.as_secs_f64(),
        rooting.as_secs_f64(),
        generated.graph_duration.as_secs_f64(),
        rendering.as_secs_f64(),
        writing.as_secs_f64()
    );
    for w in &eval.warnings {
        eprintln!("drvkite: warning: {}", printable(w));
    }
    let status = if eval.broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        let nodes = eval
            .broken
            .iter()
            .filter(|b| b.kind == crate::eval::BrokenKind::Node)
            .count();
        let targets = eval.broken.len() - nodes;
        let mut what = Vec::new();
        if targets > 0 || nodes == 0 {
            what.push(format!(
                "{targets} of {} targets",
                targets + eval.targets.len()
            ));
        }
        match nodes {
            0 => {}
            1 => what.push("1 readTree file".to_owned()),
            n => what.push(format!("{n} readTree files")),
        }
        eprintln!(
            "drvkite: {} failed to evaluate or cannot be uploaded: each has a failing step in the pipeline; exiting with status {EXIT_BROKEN_TARGETS}",
            what.join(" and ")
        );
        ExitCode::from(EXIT_BROKEN_TARGETS)
    };
    // The process ends here: freeing the evaluation and the steps one
    // allocation at a time (some 100,000 on 4,000 targets) would cost
    // milliseconds the exit does not need.
    std::mem::forget((eval, generated));
    Ok(status)
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
        Command::Pipeline(args) => pipeline(args).await,
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
            settings_attr,
            cache,
        } => {
            let label = Label::new(label);
            let parent = DrvMap::load(&parent_map)?;
            let attr = settings_attr.split('.').map(str::to_owned).collect();
            let evaluator = Evaluator::new(Nix::locate()?, &depot, attr)?;
            let (new, depot_settings) = evaluator.evaluate_one_with_settings(&label).await?;
            match parent.get(&label) {
                None => println!("{label} is new: {parent_map} has no entry for it"),
                Some(old) if old.drv_path == new.drv_path => {
                    // Skipped as unchanged, whatever the caches hold.
                    println!("{label} has not changed: {}", new.drv_path);
                    return Ok(ExitCode::SUCCESS);
                }
                Some(old) => {
                    println!("{label} changed: {} -> {}", old.drv_path, new.drv_path);
                    let diffs = crate::explain::explain(&old.drv_path, &new.drv_path, depth)?;
                    print!("{}", crate::explain::render(&diffs));
                }
            }
            let depot_skip_cached = match &depot_settings {
                Some(v) => Overrides::from_depot(v, &settings_attr)?.skip_cached,
                None => None,
            };
            if cache.skip_cached.or(depot_skip_cached).unwrap_or(false) {
                let (caches, checks, notes) =
                    crate::substitute::explain(&cache.options(), &new.drv_path)?;
                print!(
                    "{}",
                    crate::substitute::render_explain(&label, &caches, &checks, &notes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Upload(args) => {
            crate::buildkite::upload::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ParentMap { command } => {
            crate::buildkite::parent_map::run(&command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Annotate(args) => {
            crate::buildkite::annotate::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ephemera(args) => crate::ephemera::run(args).await,
        Command::Init(args) => crate::init::run(&args),
    }
}

fn default_settings_attr() -> Vec<String> {
    vec!["ci".into(), "drvkite".into()]
}
