//! `kd-runner suite FILE`: a matrix of experiments (configs × variants × seeds) run one after
//! another into one folder, then the report over it. Resumable: finished runs are skipped and an
//! interrupted run continues from its last checkpoint with the configuration it started with.
//!
//! ```toml
//! name = "cifar10"                        # runs go to runs/<name>/ unless `out` is set
//! seeds = [0, 1, 2]
//! set = ["train.epochs=200"]              # applied to every run, before each variant's
//! configs = ["baseline.toml", "kd.toml"]  # relative to this file; run in this order
//! [[variant]]                             # optional; none = one unnamed variant
//! name = "subset10-noaug"
//! set = ["data.subset=0.1", "data.augment=false"]
//! ```
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::ExperimentConfig;
use crate::experiment::{self, RunInfo, CONFIG_FILE};

/// Arguments of `suite`.
#[derive(Clone, Debug, clap::Args)]
pub struct SuiteArgs {
    /// The suite file (TOML: name, seeds, set, configs, [[variant]]).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Override a field of every run's config after the suite's own sets (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output folder (default: the suite's `out`, else runs/<name>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the runs and their state without running anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the report at the end.
    #[arg(long)]
    pub no_report: bool,
}

/// A suite file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// Name; the default output folder is runs/<name>.
    pub name: String,
    /// Output folder, relative to the working directory.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Seeds; every config runs once per seed (train.seed).
    #[serde(default = "seed0")]
    pub seeds: Vec<u64>,
    /// `key=value` overrides applied to every run.
    #[serde(default)]
    pub set: Vec<String>,
    /// Experiment configs, relative to the suite file.
    pub configs: Vec<PathBuf>,
    /// Variants; each config × seed runs once per variant.
    #[serde(default)]
    pub variant: Vec<Variant>,
}

fn seed0() -> Vec<u64> {
    vec![0]
}

/// A named set of overrides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Appended to the label (`kd-<name>`).
    pub name: String,
    /// Its `key=value` overrides.
    #[serde(default)]
    pub set: Vec<String>,
}

/// One planned run.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// Resolved configuration.
    pub config: ExperimentConfig,
    /// Identity in reports.
    pub info: RunInfo,
    /// Its folder.
    pub dir: PathBuf,
}

impl SuiteFile {
    /// Reads a suite file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the suite {}", path.display()))?;
        let s: SuiteFile = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "in the suite {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        if s.configs.is_empty() || s.seeds.is_empty() {
            bail!("the suite {} lists no configs or no seeds", path.display());
        }
        Ok(s)
    }

    /// Every run of the matrix, in order (config, then variant, then seed), with every
    /// override checked before anything runs.
    pub fn plan(
        &self,
        file: &Path,
        extra: &[String],
        out: &Path,
    ) -> anyhow::Result<Vec<PlannedRun>> {
        let base = file.parent().unwrap_or(Path::new("."));
        let variants = if self.variant.is_empty() {
            vec![Variant {
                name: String::new(),
                set: Vec::new(),
            }]
        } else {
            self.variant.clone()
        };
        let mut runs = Vec::new();
        for c in &self.configs {
            let path = base.join(c);
            let cfg = ExperimentConfig::from_file(&path)?;
            for v in &variants {
                for &seed in &self.seeds {
                    let mut cfg = cfg.clone();
                    for s in self.set.iter().chain(&v.set).chain(extra) {
                        cfg.set(s).with_context(|| {
                            format!(
                                "suite {}, config {}, variant {:?}",
                                file.display(),
                                path.display(),
                                v.name
                            )
                        })?;
                    }
                    cfg.train.seed = seed;
                    cfg.validate().with_context(|| {
                        format!("suite {}, config {}", file.display(), path.display())
                    })?;
                    let label = if v.name.is_empty() {
                        cfg.label()
                    } else {
                        format!("{}-{}", cfg.label(), v.name)
                    };
                    let dir = out.join(format!("{label}-s{seed}"));
                    runs.push(PlannedRun {
                        info: RunInfo {
                            label,
                            variant: v.name.clone(),
                            seed,
                            ..Default::default()
                        },
                        config: cfg,
                        dir,
                    });
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in &runs {
            if !seen.insert(r.dir.clone()) {
                bail!(
                    "two runs of the suite share the folder {}: give the configs distinct `name`s",
                    r.dir.display()
                );
            }
        }
        Ok(runs)
    }
}

/// What a planned run needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Finished: skipped.
    Done,
    /// Interrupted after a checkpoint: resumed.
    Resume,
    /// Not started (or interrupted before its first checkpoint): started afresh.
    Start,
}

/// The state of a run folder.
pub fn state(dir: &Path) -> RunState {
    if experiment::is_finished(dir) {
        RunState::Done
    } else if experiment::is_resumable(dir) {
        RunState::Resume
    } else {
        RunState::Start
    }
}

/// Runs a suite; returns its output folder.
pub fn run(args: &SuiteArgs) -> anyhow::Result<PathBuf> {
    let suite = SuiteFile::from_file(&args.file)?;
    let out = args
        .out
        .clone()
        .or_else(|| suite.out.clone())
        .unwrap_or_else(|| PathBuf::from("runs").join(&suite.name));
    let runs = suite.plan(&args.file, &args.set, &out)?;
    run_planned(&suite.name, &runs, &out, args.dry_run)?;
    if !args.dry_run && !args.no_report {
        let report = super::report::build(std::slice::from_ref(&out))?;
        super::report::write(&report, &out)?;
        println!("{}", report.markdown());
        println!("report, CSV and plots in {}", out.display());
    }
    Ok(out)
}

/// Runs planned runs one after another with a suite bar above each run's bars.
pub fn run_planned(
    name: &str,
    runs: &[PlannedRun],
    out: &Path,
    dry_run: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the suite folder {}", out.display()))?;
    let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let bar = multi.add(indicatif::ProgressBar::new(runs.len() as u64));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("suite [{bar:30}] {pos}/{len} runs {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    for (i, r) in runs.iter().enumerate() {
        let st = state(&r.dir);
        if dry_run {
            println!(
                "{:>3}. {:<40} {:?}  {}",
                i + 1,
                r.info.label,
                st,
                r.dir.display()
            );
            continue;
        }
        bar.set_message(format!("{} (seed {})", r.info.label, r.info.seed));
        match st {
            RunState::Done => tracing::info!("{}: finished already, skipped", r.dir.display()),
            RunState::Resume => {
                let saved = ExperimentConfig::from_file(&r.dir.join(CONFIG_FILE))?;
                if saved != r.config {
                    tracing::warn!("{}: the suite's config changed since this run started; resuming with the one it started with", r.dir.display());
                }
                tracing::info!("{}: resuming from its last checkpoint", r.dir.display());
                experiment::run(&saved, &r.info, &r.dir, true, Some(multi.clone()))
                    .with_context(|| format!("suite {name}, run {}", r.dir.display()))?;
            }
            RunState::Start => {
                if r.dir.exists() {
                    // Interrupted before its first checkpoint: nothing finished to keep.
                    std::fs::remove_dir_all(&r.dir)
                        .with_context(|| format!("clearing the unfinished {}", r.dir.display()))?;
                }
                experiment::run(&r.config, &r.info, &r.dir, false, Some(multi.clone()))
                    .with_context(|| format!("suite {name}, run {}", r.dir.display()))?;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
