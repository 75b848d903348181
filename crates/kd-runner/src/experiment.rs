//! One experiment from its resolved configuration to a finished run directory: the shared path
//! of `train`, `suite` and the main job.
//!
//! A run directory holds `config.toml` (the resolved configuration, read back on resume),
//! `run.json` (label, seed, variant, data sizes), and what the trainer writes (metrics,
//! checkpoints, `summary.json`, the exported model).
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use kd_data::{balanced_subset, Loader, LoaderConfig, SubsetSpec};
use kd_models::{Teacher, TeacherMeta};
use kd_train::{build_student, RunOptions, Student, Summary};
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;

/// What identifies a run in reports, beside its configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunInfo {
    /// The row label in reports (`kd`, `kd-subset10-noaug`, …).
    pub label: String,
    /// The variant of a suite, if any.
    #[serde(default)]
    pub variant: String,
    /// Seed.
    pub seed: u64,
    /// The method's short name.
    pub method: String,
    /// Training images.
    #[serde(default)]
    pub train_images: usize,
    /// Test images evaluated (fewer than the split with `data.test_subset`).
    #[serde(default)]
    pub test_images: usize,
    /// The device it ran on.
    #[serde(default)]
    pub device: String,
    /// The values a suite's sweeps gave this run, in the sweeps' order (none outside a sweep).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swept: Vec<SweptValue>,
    /// Who taught it, one name per network of the teacher ([`teacher_name`]; empty without
    /// a teacher).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teacher: Vec<TeacherName>,
}

/// One network of a run's teacher, as the report names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherName {
    /// The label of the run that trained it, else its architecture (`resnet50`, `resnet18 w16`).
    pub label: String,
    /// That run's seed (none for a network no run of kd made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl TeacherName {
    /// The names of a teacher for a student of `seed`: each network's label, with `@seed` where
    /// its run's seed is not the student's, joined by ` + `.
    pub fn render(names: &[TeacherName], seed: Option<u64>) -> String {
        names
            .iter()
            .map(|n| match n.seed {
                Some(s) if Some(s) != seed => format!("{}@{s}", n.label),
                _ => n.label.clone(),
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// One sweep's value in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweptValue {
    /// The swept key (`method.temperature`).
    pub key: String,
    /// Its value, as `--set` took it (`4`).
    pub value: String,
    /// Its part of the run's label and variant (`temperature4`).
    pub name: String,
}

/// The configuration file inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Whether `dir` holds a finished run.
pub fn is_finished(dir: &Path) -> bool {
    dir.join("summary.json").is_file()
}

/// Whether `dir` holds a run that can be resumed from a checkpoint.
pub fn is_resumable(dir: &Path) -> bool {
    dir.join("checkpoint.latest").is_file() && dir.join(CONFIG_FILE).is_file()
}

/// Names the teacher network loaded from `path` (with `meta`) as the report shows it: a network
/// from a run folder (the folder, or its `model.safetensors`) by that run's label and seed; any
/// other by its architecture (and width when not 64).
pub fn teacher_name(path: &Path, meta: &TeacherMeta) -> TeacherName {
    let folder = if path.is_dir() {
        Some(path)
    } else {
        path.parent().filter(|d| !d.as_os_str().is_empty())
    };
    match folder
        .and_then(|d| std::fs::read_to_string(d.join("run.json")).ok())
        .and_then(|t| serde_json::from_str::<RunInfo>(&t).ok())
    {
        Some(r) => TeacherName {
            label: r.label,
            seed: Some(r.seed),
        },
        None => TeacherName {
            label: if meta.base_width == 64 {
                meta.arch.name().to_string()
            } else {
                format!("{} w{}", meta.arch.name(), meta.base_width)
            },
            seed: None,
        },
    }
}

/// The teacher at `path` (a weights file or a run folder), named by its config `key` in errors,
/// checked to have the data set's `num_classes`.
fn load_teacher(
    path: &Path,
    key: &str,
    dataset: &str,
    num_classes: usize,
    device: &candle_core::Device,
) -> anyhow::Result<Teacher> {
    if !path.exists() {
        bail!(
            "{key}: teacher {} not found: fetch the pretrained one with `cargo xtask fetch teacher-{dataset}` (offline: `kd-runner fetch teacher-{dataset} --from DIR`), or train one with `kd-runner train` and point {key} at its run folder (or its model.safetensors)",
            path.display()
        );
    }
    let p = &crate::commands::weights_file(path)?;
    let t = Teacher::load(p, device)
        .with_context(|| format!("{key}: loading the teacher {}", p.display()))?;
    if t.meta().num_classes != num_classes {
        bail!(
            "{key}: the teacher {} has {} classes, {dataset} has {num_classes}",
            p.display(),
            t.meta().num_classes
        );
    }
    Ok(t)
}

/// The training and test images a run with `cfg` uses: the class-balanced fractions
/// `data.subset` (drawn with the run's seed) and `data.test_subset` of `ds`'s splits. The test
/// subset does not depend on the run's seed: every run is scored on the same images.
pub(crate) fn run_splits(
    ds: kd_data::Dataset,
    cfg: &ExperimentConfig,
) -> anyhow::Result<(kd_data::Split, kd_data::Split)> {
    let num_classes = ds.num_classes();
    Ok((
        fraction(ds.train, num_classes, cfg.data.subset, cfg.train.seed)?,
        fraction(ds.test, num_classes, cfg.data.test_subset, 0)?,
    ))
}

/// A class-balanced `frac` of `split` (all of it at 1).
fn fraction(
    split: kd_data::Split,
    num_classes: usize,
    frac: f64,
    seed: u64,
) -> anyhow::Result<kd_data::Split> {
    if frac >= 1.0 {
        return Ok(split);
    }
    let idx = balanced_subset(&split, num_classes, SubsetSpec::Fraction(frac), seed)?;
    Ok(split.select(&idx))
}

/// Runs (or, with `resume`, continues) one experiment in `run_dir`.
pub fn run(
    cfg: &ExperimentConfig,
    info: &RunInfo,
    run_dir: &Path,
    resume: bool,
    progress: Option<indicatif::MultiProgress>,
) -> anyhow::Result<Summary> {
    cfg.validate()?;
    cfg.unresolved_teacher_run()?;
    if !resume && run_dir.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a run; continue it with --resume {} or choose another --run-dir",
            run_dir.display(),
            run_dir.display()
        );
    }
    if resume && !run_dir.join("checkpoint.latest").exists() {
        bail!("{} holds no checkpoint to resume from", run_dir.display());
    }
    let device = crate::device::open(&cfg.train.device)?;
    let spec = cfg.dataset()?;
    let ds = crate::commands::data::load(&spec, &cfg.data_dir())?;
    let (num_classes, name) = (ds.num_classes(), ds.name.clone());
    let (train_split, test_split) = run_splits(ds, cfg)?;
    let norm = spec.default_normalize();
    let n_train = train_split.len();
    let train = Loader::new(Arc::new(train_split), cfg.loader(norm), device.clone())?;
    let n_test = test_split.len();
    let test = Loader::new(
        Arc::new(test_split),
        LoaderConfig {
            resident: cfg.data.resident,
            ..LoaderConfig::eval(cfg.data.eval_batch_size, norm)
        },
        device.clone(),
    )?;
    let mut taught_by = Vec::new();
    let teacher = if cfg.teacher.path.is_empty() || !cfg.method.needs_teacher() {
        None
    } else {
        let mut members = Vec::with_capacity(1 + cfg.teacher.members.len());
        for (key, path) in std::iter::once(("teacher.path".to_string(), &cfg.teacher.path)).chain(
            cfg.teacher
                .members
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("teacher.members[{i}]"), p)),
        ) {
            let path = Path::new(path);
            let member = load_teacher(path, &key, &name, num_classes, &device)?;
            taught_by.push(teacher_name(path, member.meta()));
            members.push(member);
        }
        // One teacher is an ensemble of one: the same network, its outputs unchanged.
        let mut t = Teacher::ensemble(members)?;
        t.set_compute_dtype(cfg.train.precision.activation_dtype())?;
        t.set_memory_format(cfg.train.memory_format)?;
        Some(t)
    };
    cfg.train.precision.apply();
    cfg.train.conv_algo.apply();
    kd_kernels::conv_algo::require_deterministic(cfg.train.deterministic);
    let mcfg = cfg.resnet(num_classes);
    let mut built = build_student(
        &mcfg,
        &cfg.method,
        teacher.as_ref(),
        &device,
        cfg.train.seed,
        cfg.train.label_smoothing,
    )?;
    built.distiller = cfg.plus_kd.wrap(built.distiller, &cfg.method)?;
    let dtype = cfg.train.precision.activation_dtype();
    built.model.set_compute_dtype(dtype)?;
    built.model.set_memory_format(cfg.train.memory_format)?;
    for p in &mut built.peers {
        p.model.set_compute_dtype(dtype)?;
        p.model.set_memory_format(cfg.train.memory_format)?;
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    let info = RunInfo {
        method: cfg.method.name().into(),
        train_images: n_train,
        test_images: n_test,
        device: format!("{device:?}"),
        teacher: taught_by,
        ..info.clone()
    };
    kd_models::write_atomic(&run_dir.join(CONFIG_FILE), cfg.to_toml().as_bytes())
        .with_context(|| format!("writing into {}", run_dir.display()))?;
    kd_models::write_atomic(
        &run_dir.join("run.json"),
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    let meta = TeacherMeta {
        arch: cfg.model.arch,
        stem: cfg.model.stem,
        num_classes,
        base_width: cfg.model.width,
        mean: norm.mean,
        std: norm.std,
        source: format!("kd-runner ({})", run_dir.display()),
        source_sha256: String::new(),
    };
    let tcfg = cfg.trainer(train.num_batches());
    tracing::info!(
        "{}: {} {} (stem {}, width {}, {} params, {} MACs/image{}) on {} ({} train images, {} steps/epoch), {} epoch{} on {:?} → {}",
        info.label,
        cfg.method.name(),
        cfg.model.arch.name(),
        cfg.model.stem.name(),
        cfg.model.width,
        built.model.num_params(),
        crate::commands::report::macs(
            built
                .model
                .macs(train.split().height, train.split().width)
                .backbone
        ),
        if built.peers.is_empty() { String::new() } else { format!(", {} peer(s)", built.peers.len()) },
        name,
        n_train,
        train.num_batches(),
        cfg.train.epochs,
        if cfg.train.epochs == 1 { "" } else { "s" },
        device,
        run_dir.display()
    );
    let student = Student {
        model: &built.model,
        vars: &built.vars,
        meta: &meta,
        peers: &built.peers,
    };
    let summary = kd_train::train(
        student,
        &*built.distiller,
        teacher.as_ref(),
        &train,
        &test,
        &tcfg,
        run_dir,
        RunOptions {
            resume,
            stop_after: None,
            progress,
        },
    )?;
    summary.ok_or_else(|| anyhow::anyhow!("the run stopped before its last epoch"))
}
