//! The main job (`kd-runner` with no arguments): the headline comparison on CIFAR-10 —
//! pretrained ResNet50 teacher → ResNet18 student; baseline, offline KD, self KD (BYOT) and
//! offline + self — from `configs/cifar10/suite-headline.toml`, fetching data and teacher when
//! missing, then the report.
//!
//! Scale follows the device found: on a GPU the configs' full schedule; on a CPU a short,
//! clearly labelled one (5% of the training images, 10% of the test images, 1 epoch) whose
//! duration is estimated from a timed step before it starts. Resumable like any suite.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use kd_fetch::{fetch, Artifact, FetchOptions};
use kd_models::Teacher;

use super::suite::{run_planned, SuiteFile};
use crate::config::ExperimentConfig;

const SUITE: &str = include_str!("../../../../configs/cifar10/suite-headline.toml");
const CONFIGS: [(&str, &str); 4] = [
    (
        "baseline.toml",
        include_str!("../../../../configs/cifar10/baseline.toml"),
    ),
    (
        "kd.toml",
        include_str!("../../../../configs/cifar10/kd.toml"),
    ),
    (
        "byot.toml",
        include_str!("../../../../configs/cifar10/byot.toml"),
    ),
    (
        "kd_byot.toml",
        include_str!("../../../../configs/cifar10/kd_byot.toml"),
    ),
];

/// The GPU scale's speed settings (the schedule stays the configs').
const GPU_FAST: &[&str] = &["train.precision=bf16", "data.resident=true"];

/// The short CPU scale, applied to every run: 40 steps of 64 images at a learning rate that
/// learns within them (16 steps of a 2% subset at the configs' 0.1 stayed at chance).
const CPU_SHORT: [&str; 6] = [
    "data.subset=0.05",
    "data.test_subset=0.1",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "data.batch_size=64",
    "train.lr=0.05",
];

/// The device the main job trains on: the first CUDA GPU when built with CUDA and one is present.
fn pick_device() -> String {
    if cfg!(feature = "cuda") && Device::new_cuda(0).is_ok() {
        return "cuda".into();
    }
    "cpu".into()
}

/// Runs the main job.
pub fn run() -> anyhow::Result<()> {
    let opts = FetchOptions::from_env(None);
    for a in [Artifact::Cifar10, Artifact::TeacherCifar10] {
        let done = fetch(a, &opts).with_context(|| {
            format!(
                "the main job needs {a}. Offline, install it from a downloaded copy with `kd-runner fetch {} --from DIR`, or point KD_MIRROR at a mirror",
                a.name()
            )
        })?;
        println!(
            "{a}: {}",
            if done.already {
                "already installed"
            } else {
                "installed"
            }
        );
    }
    let device_name = pick_device();
    let gpu = device_name != "cpu";
    let suite: SuiteFile = toml::from_str(SUITE).expect("the bundled suite parses");
    let data_dir = opts.data_dir.display().to_string();
    let teacher_path = opts
        .data_dir
        .join(Artifact::TeacherCifar10.install_dir())
        .join(kd_fetch::TEACHER_WEIGHTS);
    let mut sets: Vec<String> = vec![
        format!("train.device={device_name}"),
        format!("data.data_dir={data_dir}"),
    ];
    if gpu {
        // PyTorch's fast recipe on the same card: bf16 with f32 master weights, data on the GPU.
        sets.extend(GPU_FAST.iter().map(|s| s.to_string()));
    } else {
        sets.extend(CPU_SHORT.iter().map(|s| s.to_string()));
    }
    let out = PathBuf::from("runs").join(if gpu { "main-gpu" } else { "main-cpu-short" });
    let mut runs = Vec::new();
    for (name, text) in CONFIGS {
        let mut cfg = ExperimentConfig::from_toml(&text.replace(
            "data/teachers/cifar10-resnet50/teacher.safetensors",
            &teacher_path.display().to_string(),
        ))
        .with_context(|| format!("bundled config {name}"))?;
        for s in &sets {
            cfg.set(s)?;
        }
        let label = cfg.label();
        runs.push(super::suite::PlannedRun {
            info: crate::experiment::RunInfo {
                label: label.clone(),
                seed: cfg.train.seed,
                ..Default::default()
            },
            dir: out.join(format!("{label}-s{}", cfg.train.seed)),
            config: cfg,
            suite_variant: String::new(),
            teachers: Vec::new(),
        });
    }
    if gpu {
        println!(
            "GPU found: the full schedule ({} epochs per run, {} runs) → {}",
            runs[0].config.train.epochs,
            runs.len(),
            out.display()
        );
    } else {
        let (train_images, test_images) = short_scale_images(&runs[0].config)?;
        let est = estimate_cpu_seconds(&runs, &teacher_path, train_images, test_images)?;
        println!(
            "No GPU: running a SHORT CPU comparison — {:.0}% of the CIFAR-10 training images ({}), {} epoch, test top-1 on {} test images. \
             Its accuracies show the pipeline works, not what the methods achieve; run it on a GPU build (`--features cuda,cudnn`) for the full schedule. \
             Expected time: about {:.0} min → {}",
            runs[0].config.data.subset * 100.0,
            super::report::count(train_images),
            runs[0].config.train.epochs,
            super::report::count(test_images),
            est / 60.0,
            out.display()
        );
    }
    run_planned(&suite.name, &runs, &out, false)?;
    let report = super::report::build(std::slice::from_ref(&out))?;
    super::report::write(&report, &out)?;
    println!("{}", report.markdown());
    println!("Results: {0}/report.md, {0}/report.csv and plots {0}/accuracy_*.png|svg; each run's metrics, checkpoints and model in {0}/<run>/", out.display());
    Ok(())
}

/// Training and test images of the short scale: the same class-balanced subsets the runs take
/// of the installed copy.
fn short_scale_images(cfg: &ExperimentConfig) -> anyhow::Result<(usize, usize)> {
    let ds = super::data::load(&cfg.dataset()?, &cfg.data_dir())?;
    let (train, test) = crate::experiment::run_splits(ds, cfg)?;
    Ok((train.len(), test.len()))
}

/// Seconds the short CPU suite should take: one timed training step of the student and one
/// teacher forward, scaled to the images of every run, plus evaluation (and the teacher's pass
/// over the test split in a run with a teacher).
fn estimate_cpu_seconds(
    runs: &[super::suite::PlannedRun],
    teacher_path: &std::path::Path,
    train_images: usize,
    test_images: usize,
) -> anyhow::Result<f64> {
    let cfg = &runs[0].config;
    let bs = cfg.data.batch_size;
    let x = Tensor::randn(0f32, 1.0, (bs, 3, 32, 32), &Device::Cpu)?;
    let labels = Tensor::zeros(bs, DType::U32, &Device::Cpu)?;
    let (model, _vars) = kd_models::trainable_resnet(&cfg.resnet(10), &Device::Cpu, 0)?;
    let t = Instant::now();
    let out = model.forward_t(&x, true)?;
    candle_nn::loss::cross_entropy(&out.logits, &labels)?.backward()?;
    let step = t.elapsed().as_secs_f64() / bs as f64;
    let t = Instant::now();
    let _ = model.forward_t(&x, false)?;
    let eval = t.elapsed().as_secs_f64() / bs as f64;
    let teacher = Teacher::load(teacher_path, &Device::Cpu)?;
    let t = Instant::now();
    let _ = teacher.forward(&x)?;
    let tfwd = t.elapsed().as_secs_f64() / bs as f64;
    let (train_images, test_images) = (train_images as f64, test_images as f64);
    Ok(runs
        .iter()
        .map(|r| {
            let per =
                step * if r.config.method.needs_aux_heads() {
                    1.2
                } else {
                    1.0
                } + if r.config.method.needs_teacher() {
                    tfwd
                } else {
                    0.0
                };
            // With a teacher, its predictions on the test split once (the student's fidelity).
            let reference = if r.config.method.needs_teacher() {
                test_images * tfwd
            } else {
                0.0
            };
            r.config.train.epochs as f64 * (train_images * per + test_images * eval) + reference
        })
        .sum())
}
