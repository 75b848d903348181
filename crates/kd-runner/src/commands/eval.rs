//! `kd-runner eval`: test accuracy (top-1, top-5, per class), loss, calibration (ECE) and
//! throughput of saved weights, fed the normalisation stored with them; with `--against`, their
//! fidelity to another model (a teacher, or the ensemble teacher of several): top-1 agreement and
//! KL(teacher ‖ model); with
//! `--ensemble-with`, the accuracy of their ensemble with other models (softmax averaged).
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use kd_data::{DatasetSpec, Loader, LoaderConfig, Normalize};
use kd_models::Teacher;
use kd_train::ensemble::Combine;

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
    /// Also compare with these weights (a teacher; same forms as --weights): how often the two
    /// agree on the top-1 class, and KL(these ‖ evaluated) at temperature 1. Repeated: against
    /// the ensemble teacher of them all (their mean logits, as `--teacher` repeated trains).
    #[arg(long, value_name = "FILE|RUN")]
    pub against: Vec<PathBuf>,
    /// Also evaluate the ensemble of these weights with others (repeatable; same forms as
    /// --weights, each fed its own normalisation): their softmax averaged image by image, as
    /// an online cohort (a run and its `peer1/`) or models of several seeds; and their mean
    /// logits, the ensemble teacher that `--teacher` repeated trains from.
    #[arg(long, value_name = "FILE|RUN")]
    pub ensemble_with: Vec<PathBuf>,
}

/// Loads the weights at `path` (a file or a run folder) on `device`, for comparison with a
/// model of `num_classes` classes loaded from `evaluated`.
fn load_other(
    path: &std::path::Path,
    device: &candle_core::Device,
    num_classes: usize,
    evaluated: &std::path::Path,
) -> anyhow::Result<(PathBuf, Teacher)> {
    let file = super::weights_file(path)?;
    let other =
        Teacher::load(&file, device).with_context(|| format!("loading {}", file.display()))?;
    if other.meta().num_classes != num_classes {
        bail!(
            "{} has {} classes but {} has {}",
            file.display(),
            other.meta().num_classes,
            evaluated.display(),
            num_classes
        );
    }
    Ok((file, other))
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
    // Another model's predictions on the loader's batches: fed the evaluated model's
    // normalisation, renormalised to its own.
    let predictions = |other: &Teacher| {
        kd_train::Reference::new(&loader, meta.num_classes, |x| {
            kd_train::teacher_forward_parts(other, x, &norm, kd_models::ForwardParts::LOGITS)
        })
    };
    let against = if args.against.is_empty() {
        None
    } else {
        let mut names = Vec::with_capacity(args.against.len());
        let mut nets = Vec::with_capacity(args.against.len());
        for path in &args.against {
            let (file, other) = load_other(path, &loader.device(), meta.num_classes, &weights)?;
            names.push(file.display().to_string());
            nets.push(other);
        }
        // One network is an ensemble of one: itself.
        Some((names.join(" + "), predictions(&Teacher::ensemble(nets)?)?))
    };
    let mut members = Vec::with_capacity(args.ensemble_with.len());
    for path in &args.ensemble_with {
        let (file, other) = load_other(path, &loader.device(), meta.num_classes, &weights)?;
        members.push((file, predictions(&other)?));
    }
    // The evaluated model's own predictions are kept for an ensemble.
    let evaluated = kd_train::Reference::new_against(
        &loader,
        meta.num_classes,
        |x| teacher.forward(x),
        against.as_ref().map(|(_, r)| r),
    )?;
    let report = &evaluated.report;
    let a = &report.acc;
    println!(
        "{} ({} {}, {} params, {} MACs/image) on {} test: top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ECE {:.2}%  ({} images, {:.0} images/s)",
        weights.display(),
        meta.arch.name(),
        meta.stem.name(),
        teacher.model().num_backbone_params(),
        super::report::macs(
            teacher
                .model()
                .macs(loader.split().height, loader.split().width)
                .backbone
        ),
        ds.name,
        a.top1_pct(),
        a.top5_pct(),
        a.mean_loss(),
        report.calibration.ece_pct(),
        a.total,
        report.images_per_sec()
    );
    if let (Some((file, reference)), Some(f)) = (&against, &report.fidelity) {
        println!(
            "against {} (top-1 {:.2}%, ECE {:.2}%): top-1 agreement {:.2}%, KL(it ‖ evaluated) {:.4} nats",
            file,
            reference.report.acc.top1_pct(),
            reference.report.calibration.ece_pct(),
            f.agreement_pct(),
            f.mean_kl()
        );
    }
    if !members.is_empty() {
        let all: Vec<&kd_train::Reference> = std::iter::once(&evaluated)
            .chain(members.iter().map(|(_, r)| r))
            .collect();
        let e = kd_train::evaluate_ensemble(meta.num_classes, &all, Combine::Probabilities)?;
        // The same networks as one ensemble teacher (`--teacher` repeated), from the logits
        // already computed.
        let m = kd_train::evaluate_ensemble(meta.num_classes, &all, Combine::Logits)?;
        for (file, r) in &members {
            println!(
                "with {}: top-1 {:.2}%",
                file.display(),
                r.report.acc.top1_pct()
            );
        }
        println!(
            "ensemble of {} models (softmax averaged): top-1 {:.2}%  top-5 {:.2}%  NLL {:.4}",
            all.len(),
            e.top1_pct(),
            e.top5_pct(),
            e.mean_loss()
        );
        println!(
            "ensemble of {} models (logits averaged, as an ensemble teacher): top-1 {:.2}%  top-5 {:.2}%  NLL {:.4}",
            all.len(),
            m.top1_pct(),
            m.top5_pct(),
            m.mean_loss()
        );
    }
    println!("per-class top-1:");
    for (name, p) in ds.classes.iter().zip(a.per_class_pct()) {
        println!("  {name:<20} {p:6.2}%");
    }
    Ok(())
}
