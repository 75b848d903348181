//! `kd-runner eval`: test accuracy (top-1, top-5, per class) and throughput of saved weights,
//! fed the normalisation stored with them.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use kd_data::{DatasetSpec, Loader, LoaderConfig, Normalize};
use kd_models::Teacher;

/// Arguments of `eval`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// Weights as safetensors with a JSON sidecar beside them (`X.json`): a converted teacher or
    /// an exported run; or a run's folder (its `model.safetensors`).
    #[arg(long, value_name = "FILE|RUN")]
    pub weights: PathBuf,
    /// cifar10, cifar100 or folder:PATH.
    #[arg(long, default_value = "cifar10")]
    pub dataset: DatasetSpec,
    /// Data root (default: $KD_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs the evaluation and prints the report.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let device = crate::device::open(&args.device)?;
    let weights = super::weights_file(&args.weights)?;
    let teacher = Teacher::load(&weights, &device)
        .with_context(|| format!("loading {}", weights.display()))?;
    let meta = teacher.meta().clone();
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(kd_fetch::default_data_dir);
    let ds = super::data::load(&args.dataset, &data_dir)?;
    if ds.num_classes() != meta.num_classes {
        bail!(
            "{} has {} classes but {} has {}",
            weights.display(),
            meta.num_classes,
            ds.name,
            ds.num_classes()
        );
    }
    let norm = Normalize {
        mean: meta.mean,
        std: meta.std,
    };
    let loader = Loader::new(
        Arc::new(ds.test),
        LoaderConfig::eval(args.batch_size, norm),
        device,
    )?;
    let report = kd_train::evaluate(&loader, meta.num_classes, |x| teacher.forward(x))?;
    let a = &report.acc;
    println!(
        "{} ({} {}, {} params) on {} test: top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({} images, {:.0} images/s)",
        weights.display(),
        meta.arch.name(),
        meta.stem.name(),
        teacher.model().num_backbone_params(),
        ds.name,
        a.top1_pct(),
        a.top5_pct(),
        a.mean_loss(),
        a.total,
        report.images_per_sec()
    );
    println!("per-class top-1:");
    for (name, p) in ds.classes.iter().zip(a.per_class_pct()) {
        println!("  {name:<20} {p:6.2}%");
    }
    Ok(())
}
