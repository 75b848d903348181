//! `kd-runner train`: train a student, without distillation (`--method none`, the baseline) or
//! with one of the methods and a frozen teacher.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use kd_data::{balanced_subset, Augment, DatasetSpec, Loader, LoaderConfig, Mix, SubsetSpec};
use kd_models::{Arch, ResNetConfig, Stem, Teacher, TeacherMeta};
use kd_schedulers::{OptimizerConfig, Schedule, SgdConfig};
use kd_train::{build_student, MethodConfig, RunOptions, Student, TrainConfig};

/// Arguments of `train`.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    /// cifar10, cifar100 or folder:PATH.
    #[arg(long, default_value = "cifar10")]
    pub dataset: DatasetSpec,
    /// Data root (default: $KD_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Distillation method (papers' default weights; `kd-runner list` describes each).
    #[arg(long, default_value = "none", value_parser = clap::builder::PossibleValuesParser::new(MethodConfig::NAMES))]
    pub method: String,
    /// Frozen teacher: safetensors with its JSON sidecar (`cargo xtask fetch teacher-cifar10`, or a run's model.safetensors).
    #[arg(long, value_name = "FILE")]
    pub teacher: Option<PathBuf>,
    /// KD weight α (kd, kd_byot).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Temperature T (kd, kd_byot, dml, two_view, cs_kd).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// A peer trained beside the student (dml), ARCH[:STEM[:WIDTH]]; repeat for more peers
    /// (default: one resnet50 with the cifar stem, width 64).
    #[arg(long = "peer", value_name = "ARCH[:STEM[:WIDTH]]")]
    pub peers: Vec<kd_train::PeerSpec>,
    /// Student architecture.
    #[arg(long, value_enum, default_value = "resnet18")]
    pub model: Arch,
    /// Stem.
    #[arg(long, value_enum, default_value = "cifar")]
    pub stem: Stem,
    /// Channels of the first stage (64 = the standard network).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Epochs.
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Warm-up epochs of the warm-up + cosine schedule.
    #[arg(long, default_value_t = 1)]
    pub warmup_epochs: usize,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Label smoothing.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Seed of initialisation, data order and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Train on a class-balanced fraction of the training split (0, 1].
    #[arg(long)]
    pub subset: Option<f64>,
    /// Crop + flip augmentation (false: normalisation only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub augment: bool,
    /// Mixup with this Beta concentration α.
    #[arg(long)]
    pub mixup: Option<f32>,
    /// Run directory (default: runs/<dataset>-<model>-<stem>-s<seed>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint (same settings as when it started).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
}

/// Runs the baseline training.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if args.epochs == 0 || args.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    let device = crate::device::open(&args.device)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(kd_fetch::default_data_dir);
    let ds = super::data::load(&args.dataset, &data_dir)?;
    let num_classes = ds.num_classes();
    let mut train_split = ds.train;
    if let Some(f) = args.subset {
        let idx = balanced_subset(
            &train_split,
            num_classes,
            SubsetSpec::Fraction(f),
            args.seed,
        )?;
        train_split = train_split.select(&idx);
    }
    let norm = args.dataset.default_normalize();
    let loader_cfg = LoaderConfig {
        augment: if args.augment {
            Augment::STANDARD
        } else {
            Augment::NONE
        },
        mix: args.mixup.map(|alpha| Mix::Mixup { alpha }),
        ..LoaderConfig::train(args.batch_size, norm, args.seed)
    };
    let n_train = train_split.len();
    let method_pairing = MethodConfig::preset(&args.method).and_then(|m| m.pairing());
    if method_pairing.is_some() && args.mixup.is_some() {
        bail!(
            "--method {} compares two images per sample and cannot be combined with --mixup",
            args.method
        );
    }
    let loader_cfg = LoaderConfig {
        pair: method_pairing,
        ..loader_cfg
    };
    let train = Loader::new(Arc::new(train_split), loader_cfg, device.clone())?;
    let test = Loader::new(
        Arc::new(ds.test),
        LoaderConfig::eval(256, norm),
        device.clone(),
    )?;
    let mcfg = ResNetConfig {
        base_width: args.width,
        ..ResNetConfig::new(args.model, args.stem, num_classes)
    };
    let mut method = MethodConfig::preset(&args.method).expect("clap checked the name");
    match &mut method {
        MethodConfig::Kd { alpha, temperature }
        | MethodConfig::KdByot {
            alpha, temperature, ..
        } => {
            *alpha = args.alpha.unwrap_or(*alpha);
            *temperature = args.temperature.unwrap_or(*temperature);
        }
        MethodConfig::Dml { temperature, .. }
        | MethodConfig::TwoView { temperature, .. }
        | MethodConfig::CsKd { temperature, .. }
            if args.alpha.is_none() =>
        {
            *temperature = args.temperature.unwrap_or(*temperature);
        }
        _ if args.alpha.is_some() || args.temperature.is_some() => {
            bail!("--alpha applies to kd and kd_byot, --temperature to kd, kd_byot, dml, two_view and cs_kd; not to {}", args.method)
        }
        _ => {}
    }
    if let MethodConfig::Dml { peers, .. } = &mut method {
        if !args.peers.is_empty() {
            *peers = args.peers.clone();
        }
    } else if !args.peers.is_empty() {
        bail!("--peer applies to dml, not {}", args.method);
    }
    let teacher = match (&args.teacher, method.needs_teacher()) {
        (Some(p), true) => {
            let t = Teacher::load(p, &device).with_context(|| format!("loading the teacher {}", p.display()))?;
            if t.meta().num_classes != num_classes {
                bail!("the teacher {} has {} classes, {} has {}", p.display(), t.meta().num_classes, ds.name, num_classes);
            }
            Some(t)
        }
        (None, true) => bail!(
            "--method {} needs --teacher FILE: fetch one with `cargo xtask fetch teacher-cifar10` (data/teachers/cifar10-resnet50/teacher.safetensors) or train one with `kd-runner train`",
            args.method
        ),
        (Some(_), false) => bail!("--method {} uses no teacher; drop --teacher", args.method),
        (None, false) => None,
    };
    let built = build_student(
        &mcfg,
        &method,
        teacher.as_ref(),
        &device,
        args.seed,
        args.label_smoothing,
    )?;
    let (model, vars, distiller) = (&built.model, &built.vars, &built.distiller);
    let resume = args.resume.is_some();
    let run_dir = args
        .resume
        .clone()
        .or_else(|| args.run_dir.clone())
        .unwrap_or_else(|| {
            PathBuf::from("runs").join(format!(
                "{}-{}-{}-{}-s{}",
                ds.name,
                args.method,
                args.model.name(),
                args.stem.name(),
                args.seed
            ))
        });
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
    let meta = TeacherMeta {
        arch: args.model,
        stem: args.stem,
        num_classes,
        base_width: args.width,
        mean: norm.mean,
        std: norm.std,
        source: format!("kd-runner train ({})", run_dir.display()),
        source_sha256: String::new(),
    };
    let cfg = TrainConfig {
        epochs: args.epochs,
        lr: args.lr,
        schedule: Schedule::WarmupCosine {
            warmup_steps: args.warmup_epochs * train.num_batches(),
            final_lr: 0.0,
        },
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            weight_decay: args.weight_decay,
            ..SgdConfig::default()
        }),
        label_smoothing: args.label_smoothing,
        clip_grad: args.clip_grad,
        keep_last: 2,
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    // The resolved run, every default filled in, beside the results.
    let resolved = serde_json::json!({
        "dataset": args.dataset.to_string(),
        "subset": args.subset,
        "seed": args.seed,
        "device": args.device,
        "model": model.config(),
        "method": &method,
        "teacher": args.teacher.as_ref().map(|p| p.display().to_string()),
        "loader": train.config(),
        "train": &cfg,
    });
    std::fs::write(
        run_dir.join("run.json"),
        serde_json::to_string_pretty(&resolved)?,
    )
    .with_context(|| format!("writing into {}", run_dir.display()))?;
    eprintln!(
        "training {} with method {} ({} stem, width {}, {} model params) on {} ({} train images, {} steps/epoch) for {} epochs on {:?} → {}",
        args.model.name(),
        args.method,
        args.stem.name(),
        args.width,
        model.num_params(),
        ds.name,
        n_train,
        train.num_batches(),
        args.epochs,
        device,
        run_dir.display()
    );
    let student = Student {
        model,
        vars,
        meta: &meta,
        peers: &built.peers,
    };
    let summary = kd_train::train(
        student,
        &**distiller,
        teacher.as_ref(),
        &train,
        &test,
        &cfg,
        &run_dir,
        RunOptions {
            resume,
            stop_after: None,
        },
    )?
    .expect("runs to the end without stop_after");
    println!(
        "{}: best test top-1 {:.2}% (epoch {}), last {:.2}%, {} trainable / {} deployed params, {:.1} s of training ({:.1} s teacher); results in {}",
        summary.method,
        summary.best_top1,
        summary.best_epoch,
        summary.last_top1,
        summary.trainable_params,
        summary.deploy_params,
        summary.train_seconds,
        summary.teacher_seconds,
        run_dir.display()
    );
    for p in &summary.peers {
        println!(
            "  {} ({}, {} params): best test top-1 {:.2}%, last {:.2}%",
            p.name, p.model, p.params, p.best_top1, p.last_top1
        );
    }
    Ok(())
}
