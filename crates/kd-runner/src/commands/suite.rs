//! `kd-runner suite FILE`: a matrix of experiments (configs × variants × sweeps × seeds) run one
//! after another into one folder, then the report over it. Resumable: finished runs are skipped
//! and an interrupted run continues from its last checkpoint with the configuration it started
//! with.
//!
//! ```toml
//! name = "cifar10"                        # runs go to runs/<name>/ unless `out` is set
//! seeds = [0, 1, 2]
//! set = ["train.epochs=200"]              # applied to every run, before each variant's
//! configs = ["baseline.toml", "kd.toml"]  # relative to this file; run in this order
//! [[variant]]                             # optional; none = one unnamed variant
//! name = "subset10-noaug"
//! set = ["data.subset=0.1", "data.augment=false"]
//! [[sweep]]                               # optional; one run per value (× other sweeps)
//! key = "method.temperature"              # runs named kd-temperature1, kd-temperature2, …
//! values = [1, 2, 4, 8]
//! configs = ["kd.toml"]                   # the configs it varies (default: all)
//! ```
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::ExperimentConfig;
use crate::experiment::{self, RunInfo, SweptValue, CONFIG_FILE};

/// Arguments of `suite`.
#[derive(Clone, Debug, clap::Args)]
pub struct SuiteArgs {
    /// The suite file (TOML: name, seeds, set, configs, [[variant]], [[sweep]]).
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
    /// Sweeps of one key each; a config they apply to runs once per combination of their
    /// values (within each variant).
    #[serde(default)]
    pub sweep: Vec<Sweep>,
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
    /// The sweeps' values among them (added by [`with_sweeps`], not read from a file).
    #[serde(skip)]
    pub swept: Vec<SweptValue>,
}

/// One config key over a list of values: the ablation a researcher runs most (KD's temperature,
/// a loss weight), without a variant written out per value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// The key, as `--set` takes it (`method.temperature`).
    pub key: String,
    /// Its values, each run in turn (numbers, booleans or strings, of the key's type).
    pub values: Vec<toml::Value>,
    /// The configs it applies to, as `configs` lists them; every config when empty (a
    /// baseline listed beside them runs once, unswept).
    #[serde(default)]
    pub configs: Vec<PathBuf>,
}

impl Sweep {
    /// Each value: the key, the value as `--set` takes it, and the part of a variant's name
    /// it makes (the key's last segment and the value: `temperature4`). A name is part of a
    /// folder's, so a character other than a letter, digit, `.`, `+` or `-` becomes `_` (a
    /// swept teacher path `runs/t1` names `pathruns_t1`).
    fn runs(&self) -> Vec<SweptValue> {
        let last = self.key.rsplit('.').next().unwrap_or(&self.key);
        self.values
            .iter()
            .map(|v| {
                let value = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let safe: String = value
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                SweptValue {
                    key: self.key.clone(),
                    name: format!("{last}{safe}"),
                    value,
                }
            })
            .collect()
    }
}

/// The variants a config runs under: each of `variants` combined with every combination of the
/// values of `sweeps` (those that apply to the config), the sweeps' names and overrides after
/// the variant's own.
fn with_sweeps(variants: &[Variant], sweeps: &[&Sweep]) -> Vec<Variant> {
    let mut out = variants.to_vec();
    for sweep in sweeps {
        out = out
            .iter()
            .flat_map(|v| {
                sweep.runs().into_iter().map(move |s| Variant {
                    name: if v.name.is_empty() {
                        s.name.clone()
                    } else {
                        format!("{}-{}", v.name, s.name)
                    },
                    set: v
                        .set
                        .iter()
                        .cloned()
                        .chain([format!("{}={}", s.key, s.value)])
                        .collect(),
                    swept: v.swept.iter().cloned().chain([s]).collect(),
                })
            })
            .collect();
    }
    out
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
    /// The suite's `[[variant]]` it runs under (its name; empty without variants), before the
    /// sweeps' names that [`RunInfo::variant`] adds.
    pub suite_variant: String,
    /// The earlier runs of the plan whose models teach this one (`teacher.run`, then
    /// `teacher.member_runs`), by index.
    pub teachers: Vec<usize>,
}

/// The run of `runs` that the config key `key` (`teacher.run`, `teacher.member_runs[1]`) names
/// with `reference` for a run of the suite variant `variant`, the sweep values `swept` and
/// `seed`. `reference` is a label, `LABEL@SEED` for the run of another seed (an ensemble of a
/// config's seeds). The run is the one whose config is named `LABEL`, trained with that seed
/// (the student's by default) under the same variant, and with the student's value of each key
/// both are swept over (a teacher config that no sweep varies serves every swept student; one
/// varied by a sweep that leaves the student alone is ambiguous). Only earlier runs count, so a
/// chain runs in the order of `configs`.
fn teacher_run(
    runs: &[PlannedRun],
    key: &str,
    reference: &str,
    variant: &str,
    swept: &[SweptValue],
    seed: u64,
) -> anyhow::Result<usize> {
    let (label, seed) = match reference.rsplit_once('@') {
        None => (reference, seed),
        Some((label, s)) => match s.parse::<u64>() {
            Ok(s) => (label, s),
            Err(_) => {
                bail!("{key} = {reference:?}: after `@` comes a seed (`baseline@1`), not {s:?}")
            }
        },
    };
    let named: Vec<usize> = (0..runs.len())
        .filter(|&i| runs[i].config.label() == label)
        .collect();
    if named.is_empty() {
        let mut labels: Vec<String> = runs.iter().map(|r| r.config.label()).collect();
        labels.dedup();
        bail!(
            "{key} = {reference:?}: no earlier run of the suite is named {label:?} (a teacher's config comes before its students' in `configs`); earlier configs: {}",
            if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
        );
    }
    let fits: Vec<usize> = named
        .into_iter()
        .filter(|&i| {
            let r = &runs[i];
            r.info.seed == seed
                && r.suite_variant == variant
                && r.info
                    .swept
                    .iter()
                    .all(|t| swept.iter().all(|s| s.key != t.key || s.value == t.value))
        })
        .collect();
    match fits.as_slice() {
        [one] => Ok(*one),
        [] => bail!(
            "{key} = {reference:?}: the suite has runs of the config {label:?}, but none with seed {seed}, variant {variant:?} and this run's sweep values (a seed after `@` must be one of the suite's seeds)"
        ),
        many => bail!(
            "{key} = {reference:?} is ambiguous: the runs {} all fit (a sweep varies the teacher's config but not this one: list the configs each sweep varies in its `configs`)",
            many.iter()
                .map(|&i| runs[i].dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Resolves `cfg`'s `teacher.run` and `teacher.member_runs` against the earlier `runs` of the
/// plan ([`teacher_run`]) for a run of the suite variant `variant` and the sweep values
/// `swept`: the first becomes `teacher.path`, the others join `teacher.members`, and both keys
/// are cleared. Returns the teachers' indices in `runs`; none for a method without a teacher.
fn resolve_teachers(
    runs: &[PlannedRun],
    cfg: &mut ExperimentConfig,
    variant: &str,
    swept: &[SweptValue],
) -> anyhow::Result<Vec<usize>> {
    let run = std::mem::take(&mut cfg.teacher.run);
    let member_runs = std::mem::take(&mut cfg.teacher.member_runs);
    if !cfg.method.needs_teacher() {
        return Ok(Vec::new());
    }
    let mut teachers = Vec::new();
    if !run.is_empty() {
        let t = teacher_run(runs, "teacher.run", &run, variant, swept, cfg.train.seed)?;
        cfg.teacher.path = runs[t].dir.display().to_string();
        teachers.push(t);
    }
    for (i, reference) in member_runs.iter().enumerate() {
        let key = format!("teacher.member_runs[{i}]");
        let t = teacher_run(runs, &key, reference, variant, swept, cfg.train.seed)?;
        cfg.teacher.members.push(runs[t].dir.display().to_string());
        teachers.push(t);
    }
    Ok(teachers)
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
        for sweep in &s.sweep {
            if sweep.values.is_empty() {
                bail!(
                    "in the suite {}: the sweep of {} has no values",
                    path.display(),
                    sweep.key
                );
            }
            if let Some(c) = sweep.configs.iter().find(|c| !s.configs.contains(c)) {
                bail!(
                    "in the suite {}: the sweep of {} names the config {}, which `configs` does not list",
                    path.display(),
                    sweep.key,
                    c.display()
                );
            }
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
                swept: Vec::new(),
            }]
        } else {
            self.variant.clone()
        };
        let mut runs = Vec::new();
        for c in &self.configs {
            let path = base.join(c);
            let cfg = ExperimentConfig::from_file(&path)?;
            let sweeps: Vec<&Sweep> = self
                .sweep
                .iter()
                .filter(|s| s.configs.is_empty() || s.configs.contains(c))
                .collect();
            for suite_variant in &variants {
                for v in &with_sweeps(std::slice::from_ref(suite_variant), &sweeps) {
                    for &seed in &self.seeds {
                        let mut cfg = cfg.clone();
                        for s in self.set.iter().chain(&v.set).chain(extra) {
                            cfg.set(s).with_context(|| {
                                let swept = sweeps.iter().find(|sw| {
                                    s.strip_prefix(&sw.key).is_some_and(|r| r.starts_with('='))
                                });
                                let hint = match swept {
                                    Some(sw) => format!(" (the sweep of {} reaches this config: list the configs it varies in its `configs`)", sw.key),
                                    None => String::new(),
                                };
                                format!(
                                    "suite {}, config {}, variant {:?}{hint}",
                                    file.display(),
                                    path.display(),
                                    v.name
                                )
                            })?;
                        }
                        cfg.train.seed = seed;
                        let teachers =
                            resolve_teachers(&runs, &mut cfg, &suite_variant.name, &v.swept)
                                .with_context(|| {
                                    format!(
                                        "suite {}, config {}, variant {:?}, seed {seed}",
                                        file.display(),
                                        path.display(),
                                        v.name
                                    )
                                })?;
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
                                swept: v.swept.clone(),
                                ..Default::default()
                            },
                            config: cfg,
                            dir,
                            suite_variant: suite_variant.name.clone(),
                            teachers,
                        });
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in &runs {
            if !seen.insert(r.dir.clone()) {
                bail!(
                    "two runs of the suite share the folder {}: give the configs distinct `name`s, and each sweep values that differ in their letters, digits, `.`, `+` or `-` (the characters a run's name keeps)",
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

/// The teachers that runs still to do would load but that are not there: each missing file or
/// folder once, with the first run that needs it. A run of the plan that another run learns
/// from (`teacher.run`, `member_runs`) counts as there: the suite trains it first.
pub fn missing_teachers(runs: &[PlannedRun]) -> Vec<(PathBuf, PathBuf)> {
    let mut missing: Vec<(PathBuf, PathBuf)> = Vec::new();
    for r in runs {
        if !r.config.method.needs_teacher() || state(&r.dir) == RunState::Done {
            continue;
        }
        let planned: Vec<&PathBuf> = r.teachers.iter().map(|&t| &runs[t].dir).collect();
        for p in std::iter::once(&r.config.teacher.path).chain(&r.config.teacher.members) {
            let p = PathBuf::from(p);
            if !planned.contains(&&p) && !p.exists() && !missing.iter().any(|(m, _)| *m == p) {
                missing.push((p, r.dir.clone()));
            }
        }
    }
    missing
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
    // Before hours of training, not when the first run that needs it comes.
    let missing = missing_teachers(&runs);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(p, r)| format!("{} (first needed by {})", p.display(), r.display()))
            .collect();
        let text = format!(
            "the suite's teachers are not all there: {}. Fetch the pretrained ones with `cargo xtask fetch teacher-cifar10` / `teacher-cifar100` (offline: `kd-runner fetch … --from DIR`), or point teacher.path (`--set teacher.path=…`) at a trained run",
            list.join("; ")
        );
        if !args.dry_run {
            bail!("{text}");
        }
        println!("warning: {text}");
    }
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
            let taught = if r.teachers.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = r
                    .teachers
                    .iter()
                    .map(|&t| {
                        runs[t]
                            .dir
                            .file_name()
                            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                    })
                    .collect();
                format!("  (taught by {})", names.join(" + "))
            };
            println!(
                "{:>3}. {:<40} {:?}  {}{taught}",
                i + 1,
                r.info.label,
                st,
                r.dir.display()
            );
            continue;
        }
        for &t in &r.teachers {
            // Runs go in order, so a teacher finished unless its folder was changed since.
            if st != RunState::Done && !experiment::is_finished(&runs[t].dir) {
                bail!(
                    "suite {name}: {} is taught by the run {}, which has not finished",
                    r.dir.display(),
                    runs[t].dir.display()
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A suite folder with a baseline and a KD config, and `suite` as its suite file.
    fn suite_dir(suite: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("baseline.toml"), "name = \"baseline\"\n").unwrap();
        std::fs::write(
            dir.path().join("kd.toml"),
            "name = \"kd\"\n[teacher]\npath = \"teacher.safetensors\"\n[method]\nname = \"kd\"\nalpha = 0.9\ntemperature = 4.0\n",
        )
        .unwrap();
        let file = dir.path().join("suite.toml");
        std::fs::write(&file, suite).unwrap();
        (dir, file)
    }

    fn plan(suite: &str) -> anyhow::Result<Vec<PlannedRun>> {
        let (dir, file) = suite_dir(suite);
        let runs = SuiteFile::from_file(&file)?.plan(&file, &[], &dir.path().join("out"));
        drop(dir);
        runs
    }

    fn kd_settings(r: &PlannedRun) -> (f64, f64) {
        match r.config.method {
            kd_train::MethodConfig::Kd {
                alpha, temperature, ..
            } => (alpha, temperature),
            ref other => panic!("not kd: {other:?}"),
        }
    }

    /// Two sweeps over the KD config make one run per pair of values and seed, named by key
    /// and value; the baseline, not named by the sweeps, runs once per seed.
    #[test]
    fn sweeps_make_one_run_per_combination_of_values() {
        let runs = plan(
            "name = \"t\"\nseeds = [0, 1]\nconfigs = [\"baseline.toml\", \"kd.toml\"]\n\
             [[sweep]]\nkey = \"method.temperature\"\nvalues = [1, 8]\nconfigs = [\"kd.toml\"]\n\
             [[sweep]]\nkey = \"method.alpha\"\nvalues = [0.5, 0.9]\nconfigs = [\"kd.toml\"]\n",
        )
        .unwrap();
        let labels: Vec<(&str, u64)> = runs
            .iter()
            .map(|r| (r.info.label.as_str(), r.info.seed))
            .collect();
        assert_eq!(
            labels,
            [
                ("baseline", 0),
                ("baseline", 1),
                ("kd-temperature1-alpha0.5", 0),
                ("kd-temperature1-alpha0.5", 1),
                ("kd-temperature1-alpha0.9", 0),
                ("kd-temperature1-alpha0.9", 1),
                ("kd-temperature8-alpha0.5", 0),
                ("kd-temperature8-alpha0.5", 1),
                ("kd-temperature8-alpha0.9", 0),
                ("kd-temperature8-alpha0.9", 1),
            ]
        );
        let kd: Vec<(f64, f64)> = runs[2..].iter().step_by(2).map(kd_settings).collect();
        assert_eq!(kd, [(0.5, 1.0), (0.9, 1.0), (0.5, 8.0), (0.9, 8.0)]);
        assert_eq!(runs[2].info.variant, "temperature1-alpha0.5");
        let swept: Vec<(&str, &str, &str)> = runs[2]
            .info
            .swept
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(
            swept,
            [
                ("method.temperature", "1", "temperature1"),
                ("method.alpha", "0.5", "alpha0.5")
            ]
        );
        assert!(runs[0].info.swept.is_empty());
        assert!(runs[2].dir.ends_with("out/kd-temperature1-alpha0.5-s0"));
    }

    /// A suite whose `born1.toml` learns from the run named `baseline` and `born2.toml` from
    /// `born1` (born-again generations), planned into `out/`.
    fn plan_chain(suite: &str) -> anyhow::Result<Vec<PlannedRun>> {
        let (dir, file) = suite_dir(suite);
        for (n, teacher) in [(1, "baseline"), (2, "born1")] {
            std::fs::write(
                dir.path().join(format!("born{n}.toml")),
                format!(
                    "name = \"born{n}\"\n[teacher]\nrun = \"{teacher}\"\n[method]\nname = \"kd\"\n"
                ),
            )
            .unwrap();
        }
        let runs = SuiteFile::from_file(&file)?.plan(&file, &[], Path::new("out"));
        drop(dir);
        runs
    }

    /// Each generation's teacher is the previous generation's run of the same seed and variant:
    /// its folder is the teacher's path, and `teacher.run` is resolved away.
    #[test]
    fn teacher_runs_chain_by_seed_and_variant() {
        let runs = plan_chain(
            "name = \"t\"\nseeds = [0, 1]\nconfigs = [\"baseline.toml\", \"born1.toml\", \"born2.toml\"]\n\
             [[variant]]\nname = \"full\"\n\
             [[variant]]\nname = \"sub\"\nset = [\"data.subset=0.1\"]\n",
        )
        .unwrap();
        let taught: Vec<(&str, u64, &str)> = runs
            .iter()
            .map(|r| {
                (
                    r.info.label.as_str(),
                    r.info.seed,
                    r.config.teacher.path.as_str(),
                )
            })
            .collect();
        assert_eq!(
            taught,
            [
                ("baseline-full", 0, ""),
                ("baseline-full", 1, ""),
                ("baseline-sub", 0, ""),
                ("baseline-sub", 1, ""),
                ("born1-full", 0, "out/baseline-full-s0"),
                ("born1-full", 1, "out/baseline-full-s1"),
                ("born1-sub", 0, "out/baseline-sub-s0"),
                ("born1-sub", 1, "out/baseline-sub-s1"),
                ("born2-full", 0, "out/born1-full-s0"),
                ("born2-full", 1, "out/born1-full-s1"),
                ("born2-sub", 0, "out/born1-sub-s0"),
                ("born2-sub", 1, "out/born1-sub-s1"),
            ]
        );
        let teachers: Vec<&[usize]> = runs.iter().map(|r| r.teachers.as_slice()).collect();
        assert_eq!(
            teachers,
            [
                &[][..],
                &[],
                &[],
                &[],
                &[0],
                &[1],
                &[2],
                &[3],
                &[4],
                &[5],
                &[6],
                &[7]
            ]
        );
        assert!(runs.iter().all(|r| r.config.teacher.run.is_empty()));
        // Resolved, the config is what a run folder keeps and reads back.
        let back = ExperimentConfig::from_toml(&runs[4].config.to_toml()).unwrap();
        back.unresolved_teacher_run().unwrap();
        assert_eq!(back, runs[4].config);
    }

    /// A sweep of the students reuses the one unswept teacher; a sweep of the teacher alone
    /// leaves its students more than one teacher, and is refused by name.
    #[test]
    fn swept_teacher_runs_must_be_unambiguous() {
        let runs = plan_chain(
            "name = \"t\"\nconfigs = [\"baseline.toml\", \"born1.toml\"]\n\
             [[sweep]]\nkey = \"method.temperature\"\nvalues = [2, 8]\nconfigs = [\"born1.toml\"]\n",
        )
        .unwrap();
        assert_eq!(runs.len(), 3);
        assert!(runs[1..]
            .iter()
            .all(|r| r.config.teacher.path == "out/baseline-s0" && r.teachers == [0]));
        // A sweep of teacher and student alike pairs equal values.
        let runs = plan_chain(
            "name = \"t\"\nconfigs = [\"baseline.toml\", \"born1.toml\", \"born2.toml\"]\n\
             [[sweep]]\nkey = \"method.temperature\"\nvalues = [2, 8]\nconfigs = [\"born1.toml\", \"born2.toml\"]\n",
        )
        .unwrap();
        let taught: Vec<(&str, &str)> = runs[3..]
            .iter()
            .map(|r| (r.info.label.as_str(), r.config.teacher.path.as_str()))
            .collect();
        assert_eq!(
            taught,
            [
                ("born2-temperature2", "out/born1-temperature2-s0"),
                ("born2-temperature8", "out/born1-temperature8-s0")
            ]
        );
        let e = plan_chain(
            "name = \"t\"\nconfigs = [\"baseline.toml\", \"born1.toml\", \"born2.toml\"]\n\
             [[sweep]]\nkey = \"method.temperature\"\nvalues = [2, 8]\nconfigs = [\"born1.toml\"]\n",
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("\"born1\" is ambiguous")
                && e.contains("born1-temperature2-s0")
                && e.contains("born1-temperature8-s0")
                && e.contains("born2.toml"),
            "{e}"
        );
    }

    /// A teacher named before its config runs, or not at all, is refused with the configs that
    /// do come earlier; a method without a teacher ignores a suite-wide `teacher.run`.
    #[test]
    fn teacher_runs_must_come_earlier() {
        let e = format!(
            "{:#}",
            plan_chain("name = \"t\"\nconfigs = [\"born1.toml\", \"baseline.toml\"]\n")
                .unwrap_err()
        );
        assert!(
            e.contains("teacher.run = \"baseline\"") && e.contains("earlier configs: none"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            plan_chain("name = \"t\"\nconfigs = [\"baseline.toml\", \"born2.toml\"]\n")
                .unwrap_err()
        );
        assert!(
            e.contains("\"born1\"") && e.contains("earlier configs: baseline"),
            "{e}"
        );
        let runs = plan_chain(
            "name = \"t\"\nset = [\"teacher.run=born1\"]\nconfigs = [\"baseline.toml\", \"born1.toml\", \"born2.toml\"]\n",
        );
        // born1 now names itself, which is no earlier run.
        let e = format!("{:#}", runs.unwrap_err());
        assert!(e.contains("earlier configs: baseline"), "{e}");
        let runs = plan_chain(
            "name = \"t\"\nset = [\"teacher.run=baseline\"]\nconfigs = [\"baseline.toml\", \"born1.toml\"]\n",
        )
        .unwrap();
        assert!(runs[0].teachers.is_empty());
        assert_eq!(runs[0].config.teacher.run, "");
        assert_eq!(runs[1].teachers, [0]);
    }

    /// An ensemble of a config's seeds teaches every seed of the student: `run = "baseline@0"`
    /// and `member_runs = ["baseline@1", "baseline@2"]` resolve to those runs' folders; a seed
    /// the suite does not run, or a seed that is not a number, is refused by key.
    #[test]
    fn member_runs_make_an_ensemble_of_seeds() {
        let ens = |run: &str, members: &str| {
            let (dir, file) = suite_dir(
                "name = \"t\"\nseeds = [0, 1, 2]\nconfigs = [\"baseline.toml\", \"ens.toml\"]\n",
            );
            std::fs::write(
                dir.path().join("ens.toml"),
                format!("name = \"ens\"\n[teacher]\nrun = \"{run}\"\nmember_runs = {members}\n[method]\nname = \"kd\"\n"),
            )
            .unwrap();
            let runs = SuiteFile::from_file(&file)?.plan(&file, &[], Path::new("out"));
            drop(dir);
            runs
        };
        let runs = ens("baseline@0", "[\"baseline@1\", \"baseline@2\"]").unwrap();
        for r in &runs[3..] {
            assert_eq!(r.config.teacher.path, "out/baseline-s0");
            assert_eq!(
                r.config.teacher.members,
                ["out/baseline-s1", "out/baseline-s2"]
            );
            assert_eq!(r.teachers, [0, 1, 2]);
            assert!(r.config.teacher.member_runs.is_empty());
        }
        // Without `@`, a member is the student's own seed: here the same run twice.
        let runs = ens("baseline", "[\"baseline\"]").unwrap();
        assert_eq!(runs[4].teachers, [1, 1]);
        let e = format!("{:#}", ens("baseline@0", "[\"baseline@7\"]").unwrap_err());
        assert!(
            e.contains("teacher.member_runs[0] = \"baseline@7\"") && e.contains("seed 7"),
            "{e}"
        );
        let e = format!("{:#}", ens("baseline@first", "[]").unwrap_err());
        assert!(
            e.contains("teacher.run = \"baseline@first\"") && e.contains("after `@` comes a seed"),
            "{e}"
        );
    }

    /// Teachers the plan will not make and that are not on disk are listed once each, with the
    /// first run that needs them; a chain's teacher (a run of the plan) is not.
    #[test]
    fn missing_teachers_are_found_before_anything_runs() {
        let runs = plan_chain(
            "name = \"t\"\nseeds = [0, 1]\nconfigs = [\"baseline.toml\", \"kd.toml\", \"born1.toml\"]\n",
        )
        .unwrap();
        let missing = missing_teachers(&runs);
        assert_eq!(
            missing,
            [(
                PathBuf::from("teacher.safetensors"),
                PathBuf::from("out/kd-s0")
            )]
        );
        // A teacher file that is there is not missing.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.safetensors");
        std::fs::write(&file, b"").unwrap();
        let mut runs = runs;
        for r in &mut runs {
            if r.config.teacher.path == "teacher.safetensors" {
                r.config.teacher.path = file.display().to_string();
            }
        }
        assert!(missing_teachers(&runs).is_empty());
    }

    /// A swept path names its runs with a folder-safe name, and is set as it is.
    #[test]
    fn swept_paths_name_folders_safely() {
        let runs = plan(
            "name = \"t\"\nconfigs = [\"kd.toml\"]\n\
             [[sweep]]\nkey = \"teacher.path\"\nvalues = [\"runs/t1\", \"/abs/t 2/model.safetensors\"]\n",
        )
        .unwrap();
        let labels: Vec<&str> = runs.iter().map(|r| r.info.label.as_str()).collect();
        assert_eq!(
            labels,
            ["kd-pathruns_t1", "kd-path_abs_t_2_model.safetensors"]
        );
        assert_eq!(runs[0].config.teacher.path, "runs/t1");
        assert_eq!(runs[1].info.swept[0].value, "/abs/t 2/model.safetensors");
        assert!(runs
            .iter()
            .all(|r| r.dir.parent().unwrap().ends_with("out")));
    }

    /// Within a variant, the variant's overrides come first and its name leads.
    #[test]
    fn sweeps_combine_with_variants() {
        let runs = plan(
            "name = \"t\"\nconfigs = [\"kd.toml\"]\n\
             [[variant]]\nname = \"sub\"\nset = [\"data.subset=0.1\"]\n\
             [[sweep]]\nkey = \"method.temperature\"\nvalues = [2.5]\n",
        )
        .unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].info.label, "kd-sub-temperature2.5");
        assert_eq!(runs[0].config.data.subset, 0.1);
        assert_eq!(kd_settings(&runs[0]).1, 2.5);
    }

    /// A sweep of no values, of a config the suite does not list, or of a key a config lacks
    /// is refused before anything runs, naming the key.
    #[test]
    fn bad_sweeps_are_refused_by_name() {
        let err = |suite: &str| format!("{:#}", plan(suite).unwrap_err());
        let e = err("name = \"t\"\nconfigs = [\"kd.toml\"]\n[[sweep]]\nkey = \"method.alpha\"\nvalues = []\n");
        assert!(e.contains("method.alpha") && e.contains("no values"), "{e}");
        let e = err("name = \"t\"\nconfigs = [\"kd.toml\"]\n[[sweep]]\nkey = \"method.alpha\"\nvalues = [1]\nconfigs = [\"dkd.toml\"]\n");
        assert!(e.contains("dkd.toml") && e.contains("does not list"), "{e}");
        // The baseline has no temperature: a sweep over every config reaches it.
        let e = err("name = \"t\"\nconfigs = [\"baseline.toml\", \"kd.toml\"]\n[[sweep]]\nkey = \"method.temperature\"\nvalues = [2]\n");
        assert!(
            e.contains("temperature") && e.contains("baseline.toml"),
            "{e}"
        );
        let e = err("name = \"t\"\nconfigs = [\"kd.toml\"]\n[[sweep]]\nkey = \"method.temperature\"\nvalues = [\"hot\"]\n");
        assert!(e.contains("temperature"), "{e}");
    }
}
