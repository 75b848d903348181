//! `kd-runner train [CONFIG]`: one experiment. Settings come from the TOML file (or the
//! defaults), then the flags below, then each `--set key.path=value`, in that order.
use std::path::PathBuf;

use anyhow::bail;
use kd_models::{Arch, Stem};
use kd_train::MethodConfig;

use crate::config::ExperimentConfig;
use crate::experiment::{self, RunInfo, CONFIG_FILE};

/// Arguments of `train`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct TrainArgs {
    /// Experiment config (TOML), e.g. configs/cifar10/kd.toml; defaults otherwise.
    #[arg(value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one config field, e.g. `--set train.lr=0.05` (repeatable; the key must exist and keep its type; `kd-runner list` shows the keys).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// data.dataset: cifar10, cifar100 or folder:PATH.
    #[arg(long)]
    pub dataset: Option<String>,
    /// data.data_dir (default: $KD_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// method.name, with the paper's weights (`kd-runner list` describes each).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(MethodConfig::NAMES))]
    pub method: Option<String>,
    /// teacher.path: safetensors with its JSON sidecar (`cargo xtask fetch teacher-cifar10`, or a run's model.safetensors), or a finished run's folder; replaces a config's teacher.run. Repeat it for an ensemble teacher (its mean logits; the second and later go to teacher.members).
    #[arg(long, value_name = "FILE|RUN")]
    pub teacher: Vec<PathBuf>,
    /// method.alpha (kd, kd_byot, dkd, wsld, ctkd, pskd, tf_kd_reg, uskd, okddip, cl_ilr, dlb).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// method.temperature (kd, kd_byot, dkd, nkd, wsld, dist, dml, switokd, one, okddip, cl_ilr, dlb, two_view, cs_kd, tf_kd_reg; mlkd's first).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// A peer trained beside the student (dml; switokd's teacher), ARCH[:STEM[:WIDTH[:LR_SCALE]]]
    /// (LR_SCALE multiplies the run's learning rate for it); repeat for more peers (dml).
    #[arg(long = "peer", value_name = "ARCH[:STEM[:WIDTH[:LR_SCALE]]]")]
    pub peers: Vec<kd_train::PeerSpec>,
    /// model.arch: the student.
    #[arg(long, value_enum)]
    pub model: Option<Arch>,
    /// model.stem.
    #[arg(long, value_enum)]
    pub stem: Option<Stem>,
    /// model.width: channels of the first stage (64 = the standard network).
    #[arg(long)]
    pub width: Option<usize>,
    /// train.epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// data.batch_size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// train.lr.
    #[arg(long)]
    pub lr: Option<f64>,
    /// train.warmup_epochs of the warm-up + cosine schedule.
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// train.weight_decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// train.clip_grad: clip the global gradient norm to this value.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// train.label_smoothing.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// train.seed: initialisation, data order and augmentation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// train.device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// train.precision: f32, tf32 (TF32 tensor cores for f32 convolutions and matmuls) or bf16
    /// (bf16 activations, f32 master weights).
    #[arg(long)]
    pub precision: Option<kd_kernels::Precision>,
    /// train.conv_algo: how cuDNN picks a convolution's algorithm, heuristic or benchmark (every
    /// algorithm timed once per shape, as PyTorch's cudnn.benchmark); CUDA only.
    #[arg(long)]
    pub conv_algo: Option<kd_kernels::ConvAlgoSearch>,
    /// train.memory_format: channels-first or channels-last activations inside the networks
    /// (the layout cuDNN's tensor-core convolutions read natively; for CUDA, slower on the CPU).
    #[arg(long)]
    pub memory_format: Option<kd_kernels::MemoryFormat>,
    /// train.deterministic = true: only deterministic cuDNN algorithms, so that the seed fixes a
    /// GPU run's numbers too (may cost speed; the CPU is deterministic anyway).
    #[arg(long)]
    pub deterministic: bool,
    /// data.subset: train on a class-balanced fraction of the training split, in (0, 1].
    #[arg(long)]
    pub subset: Option<f64>,
    /// data.augment: crop + flip (false: normalisation only).
    #[arg(long, action = clap::ArgAction::Set)]
    pub augment: Option<bool>,
    /// data.mixup: mixup with this Beta concentration α (0 = off).
    #[arg(long)]
    pub mixup: Option<f64>,
    /// Run directory (default: runs/<dataset>-<label>-<model>-<stem>-s<seed>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint with the config saved there (changed only by --set, e.g. --set train.epochs=300, and --device).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["run_dir", "config"])]
    pub resume: Option<PathBuf>,
}

impl TrainArgs {
    /// The resolved configuration: file (or defaults), then flags, then `--set`s.
    pub fn resolve(&self) -> anyhow::Result<ExperimentConfig> {
        let mut cfg = match &self.config {
            Some(p) => ExperimentConfig::from_file(p)?,
            None => ExperimentConfig::default(),
        };
        let d = &mut cfg.data;
        set(&mut d.dataset, self.dataset.clone());
        set(
            &mut d.data_dir,
            self.data_dir.as_ref().map(|p| p.display().to_string()),
        );
        set(&mut d.batch_size, self.batch_size);
        set(&mut d.subset, self.subset);
        set(&mut d.augment, self.augment);
        set(&mut d.mixup, self.mixup);
        let m = &mut cfg.model;
        set(&mut m.arch, self.model);
        set(&mut m.stem, self.stem);
        set(&mut m.width, self.width);
        let t = &mut cfg.train;
        set(&mut t.epochs, self.epochs);
        set(&mut t.lr, self.lr);
        set(&mut t.warmup_epochs, self.warmup_epochs);
        set(&mut t.weight_decay, self.weight_decay);
        set(&mut t.clip_grad, self.clip_grad);
        set(&mut t.label_smoothing, self.label_smoothing);
        set(&mut t.seed, self.seed);
        set(&mut t.device, self.device.clone());
        set(&mut t.precision, self.precision);
        set(&mut t.conv_algo, self.conv_algo);
        set(&mut t.memory_format, self.memory_format);
        if self.deterministic {
            t.deterministic = true;
        }
        if let Some((first, rest)) = self.teacher.split_first() {
            // Explicit files or folders replace a suite's `teacher.run` (ban1.toml run alone)
            // and the config's members.
            cfg.teacher.path = first.display().to_string();
            cfg.teacher.members = rest.iter().map(|p| p.display().to_string()).collect();
            cfg.teacher.run.clear();
            cfg.teacher.member_runs.clear();
        }
        if let Some(name) = &self.method {
            cfg.method = MethodConfig::preset(name).expect("clap checked the name");
        }
        match &mut cfg.method {
            MethodConfig::Kd {
                alpha, temperature, ..
            }
            | MethodConfig::KdByot {
                alpha, temperature, ..
            }
            | MethodConfig::Dkd {
                alpha, temperature, ..
            }
            | MethodConfig::Wsld { alpha, temperature }
            | MethodConfig::TfKdReg {
                alpha, temperature, ..
            }
            | MethodConfig::Okddip {
                alpha, temperature, ..
            }
            | MethodConfig::ClIlr {
                alpha, temperature, ..
            }
            | MethodConfig::Dlb { alpha, temperature } => {
                set(alpha, self.alpha);
                set(temperature, self.temperature);
            }
            MethodConfig::Pskd { alpha }
            | MethodConfig::Ctkd { alpha, .. }
            | MethodConfig::Uskd { alpha, .. }
                if self.temperature.is_none() =>
            {
                set(alpha, self.alpha)
            }
            MethodConfig::Dml { temperature, .. }
            | MethodConfig::Switokd { temperature, .. }
            | MethodConfig::TwoView { temperature, .. }
            | MethodConfig::One { temperature, .. }
            | MethodConfig::CsKd { temperature, .. }
            | MethodConfig::Dist { temperature, .. }
            | MethodConfig::Nkd { temperature, .. }
            | MethodConfig::Mlkd { temperature, .. }
                if self.alpha.is_none() =>
            {
                set(temperature, self.temperature);
            }
            _ if self.alpha.is_some() || self.temperature.is_some() => {
                bail!("--alpha applies to kd, kd_byot, dkd, wsld, ctkd, pskd, tf_kd_reg, uskd, okddip, cl_ilr and dlb (ctkd learns its temperature), --temperature to kd, kd_byot, dkd, nkd, wsld, dist, dml, switokd, one, okddip, cl_ilr, dlb, two_view, cs_kd, tf_kd_reg and mlkd (its first temperature); not to {}", cfg.method.name())
            }
            _ => {}
        }
        if !self.peers.is_empty() {
            let name = cfg.method.name();
            match cfg.method.peers_mut() {
                Some(peers) => *peers = self.peers.clone(),
                None => bail!("--peer applies to dml and switokd, not {name}"),
            }
        }
        for s in &self.set {
            cfg.set(s)?;
        }
        if !self.teacher.is_empty() && !cfg.method.needs_teacher() {
            bail!(
                "--method {} uses no teacher; drop --teacher",
                cfg.method.name()
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Runs `train`.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let (cfg, run_dir, resume) = match &args.resume {
        Some(dir) => {
            let saved = dir.join(CONFIG_FILE);
            if !saved.exists() {
                bail!(
                    "{} holds no {CONFIG_FILE}: not a kd-runner run directory",
                    dir.display()
                );
            }
            let rest = TrainArgs {
                resume: None,
                device: None,
                set: Vec::new(),
                ..args.clone()
            };
            if rest != TrainArgs::default() {
                bail!("--resume continues with the run's own {}; change a setting with --set key=value (e.g. --set train.epochs=300), not with flags", saved.display());
            }
            let mut cfg = ExperimentConfig::from_file(&saved)?;
            if let Some(d) = &args.device {
                cfg.train.device = d.clone();
            }
            for s in &args.set {
                cfg.set(s)?;
            }
            (cfg, dir.clone(), true)
        }
        None => {
            let cfg = args.resolve()?;
            let dir = args.run_dir.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(format!(
                    "{}-{}-{}-{}-s{}",
                    cfg.data.dataset.replace([':', '/'], "_"),
                    cfg.label(),
                    cfg.model.arch.name(),
                    cfg.model.stem.name(),
                    cfg.train.seed
                ))
            });
            (cfg, dir, false)
        }
    };
    let info = RunInfo {
        label: cfg.label(),
        seed: cfg.train.seed,
        ..Default::default()
    };
    let summary = experiment::run(&cfg, &info, &run_dir, resume, None)?;
    println!(
        "{}: best test top-1 {:.2}% (epoch {}), last {:.2}%, {} trainable / {} deployed params, {} MACs/image, {:.1} s of training ({:.1} s teacher{}); results in {}",
        summary.method,
        summary.best_top1,
        summary.best_epoch,
        summary.last_top1,
        summary.trainable_params,
        summary.deploy_params,
        summary.deploy_macs.map_or_else(|| "–".into(), super::report::macs),
        summary.train_seconds,
        summary.teacher_seconds,
        if summary.init_seconds > 0.0 {
            format!(", {:.1} s init phase", summary.init_seconds)
        } else {
            String::new()
        },
        run_dir.display()
    );
    for p in &summary.peers {
        let agreement = p
            .last_student_agreement
            .map(|a| format!(", agrees with the student on {a:.2}% of the test images"))
            .unwrap_or_default();
        println!(
            "  {} ({}, {} params): best test top-1 {:.2}%, last {:.2}%{agreement}",
            p.name, p.model, p.params, p.best_top1, p.last_top1
        );
    }
    Ok(())
}
