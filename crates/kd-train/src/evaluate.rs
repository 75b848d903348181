//! Evaluation of a model on a split: accuracy, per-class accuracy, loss, calibration, throughput,
//! each auxiliary head's (or extra branch's) accuracy and the heads' ensemble with the final
//! classifier, and, against
//! a reference model's predictions (a teacher's), fidelity; the ensemble of several models'
//! predictions ([`evaluate_ensemble`]).
use std::time::Instant;

use candle_core::Tensor;
use kd_data::Loader;
use kd_models::ModelOutput;

use crate::calibration::Calibration;
use crate::ensemble::Combine;
use crate::fidelity::Fidelity;
use crate::metrics::Accuracy;
use crate::{Result, TrainError};

/// What an evaluation measured.
#[derive(Clone, Debug)]
pub struct EvalReport {
    /// Accuracy counts and loss.
    pub acc: Accuracy,
    /// Confidence bins (expected calibration error).
    pub calibration: Calibration,
    /// Agreement with the reference model, when evaluated against one
    /// ([`Reference::new_against`]).
    pub fidelity: Option<Fidelity>,
    /// Each auxiliary head's accuracy, shallowest first, then each extra branch's (ONE's); empty
    /// for a model with neither.
    pub heads: Vec<Accuracy>,
    /// With auxiliary heads or extra branches: the accuracy of their ensemble with the final
    /// classifier, softmax averaged ([`crate::ensemble`]); with a gate over the branches
    /// (ONE's), their gated ensemble, as the gate combines them ([`kd_models::ModelOutput::gated`]).
    pub head_ensemble: Option<Accuracy>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl EvalReport {
    /// Images per second.
    pub fn images_per_sec(&self) -> f64 {
        self.acc.total as f64 / self.seconds.max(1e-9)
    }
}

/// A reference model's logits on every batch of a split, in the loader's evaluation order, and
/// its own report: what students are compared with ([`Reference::new_against`]), and what ensembles
/// are made of ([`evaluate_ensemble`]). Computed once; the logits stay on the loader's device
/// (10,000 images × 100 classes are 4 MB in f32).
#[derive(Clone, Debug)]
pub struct Reference {
    /// The reference model's own evaluation.
    pub report: EvalReport,
    logits: Vec<Tensor>,
    labels: Vec<Tensor>,
}

impl Reference {
    /// Evaluates the reference model `forward` over `loader` and keeps its logits.
    pub fn new(
        loader: &Loader,
        num_classes: usize,
        forward: impl Fn(&Tensor) -> candle_core::Result<ModelOutput>,
    ) -> Result<Self> {
        Self::new_against(loader, num_classes, forward, None)
    }

    /// [`Reference::new`], its report measuring the fidelity to `against` when given: the
    /// student of an online method, compared with its teacher, is its peers' reference.
    pub fn new_against(
        loader: &Loader,
        num_classes: usize,
        forward: impl Fn(&Tensor) -> candle_core::Result<ModelOutput>,
        against: Option<&Reference>,
    ) -> Result<Self> {
        let mut kept = Kept::default();
        let report = run(loader, num_classes, forward, against, Some(&mut kept))?;
        Ok(Reference {
            report,
            logits: kept.logits,
            labels: kept.labels,
        })
    }

    /// Fails unless these predictions cover every batch of `loader`.
    fn check_covers(&self, loader: &Loader) -> Result<()> {
        if self.logits.len() != loader.num_batches() {
            return Err(TrainError::Invalid(format!(
                "the reference predictions cover {} batches but the loader has {}",
                self.logits.len(),
                loader.num_batches()
            )));
        }
        Ok(())
    }
}

/// Runs `forward` over every batch of `loader` (epoch 0, in order) and accumulates accuracy,
/// cross-entropy and calibration.
pub fn evaluate(
    loader: &Loader,
    num_classes: usize,
    forward: impl Fn(&Tensor) -> candle_core::Result<ModelOutput>,
) -> Result<EvalReport> {
    run(loader, num_classes, forward, None, None)
}

/// The accuracy (and mean NLL) of the ensemble of `members`' predictions, combined image by
/// image as `combine` says ([`crate::ensemble`]): their softmax averaged, or their logits (an
/// ensemble teacher's, from logits already computed). The members must have been evaluated on
/// the same loader.
pub fn evaluate_ensemble(
    num_classes: usize,
    members: &[&Reference],
    combine: Combine,
) -> Result<Accuracy> {
    let Some(first) = members.first() else {
        return Err(TrainError::Invalid("an ensemble of no models".into()));
    };
    if let Some(m) = members
        .iter()
        .find(|m| m.logits.len() != first.logits.len())
    {
        return Err(TrainError::Invalid(format!(
            "ensemble members' predictions cover {} and {} batches",
            first.logits.len(),
            m.logits.len()
        )));
    }
    let mut acc = Accuracy::new(num_classes);
    for (i, labels) in first.labels.iter().enumerate() {
        let logits: Vec<&Tensor> = members.iter().map(|m| &m.logits[i]).collect();
        crate::ensemble::update(&mut acc, &logits, labels, combine)?;
    }
    Ok(acc)
}

/// The logits and labels of every batch, kept by [`Reference::new_against`].
#[derive(Default)]
struct Kept {
    logits: Vec<Tensor>,
    labels: Vec<Tensor>,
}

fn run(
    loader: &Loader,
    num_classes: usize,
    forward: impl Fn(&Tensor) -> candle_core::Result<ModelOutput>,
    reference: Option<&Reference>,
    mut keep: Option<&mut Kept>,
) -> Result<EvalReport> {
    if let Some(r) = reference {
        r.check_covers(loader)?;
    }
    let t = Instant::now();
    let mut acc = Accuracy::new(num_classes);
    let mut calibration = Calibration::new();
    let mut fidelity = reference.map(|_| Fidelity::new());
    let mut heads: Vec<Accuracy> = Vec::new();
    let mut head_ensemble: Option<Accuracy> = None;
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let out = forward(&batch.images)?;
        let loss =
            candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?.to_scalar::<f32>()? as f64;
        acc.update(&out.logits, &batch.labels, Some(loss))?;
        calibration.update(&out.logits, &batch.labels)?;
        // The auxiliary heads, then the extra branches: the network's training-only classifiers.
        let extra: Vec<&Tensor> = out
            .aux
            .iter()
            .chain(&out.branches)
            .map(|a| &a.logits)
            .collect();
        heads.resize_with(extra.len(), || Accuracy::new(num_classes));
        for (h, logits) in heads.iter_mut().zip(&extra) {
            h.update(logits, &batch.labels, None)?;
        }
        if !extra.is_empty() {
            let acc = head_ensemble.get_or_insert_with(|| Accuracy::new(num_classes));
            match &out.gated {
                // ONE's branches are scored as their gate combines them (ONE-E).
                Some(gated) => acc.update(gated, &batch.labels, None)?,
                None => {
                    let members: Vec<&Tensor> = std::iter::once(&out.logits).chain(extra).collect();
                    crate::ensemble::update(acc, &members, &batch.labels, Combine::Probabilities)?;
                }
            }
        }
        if let (Some(f), Some(r)) = (fidelity.as_mut(), reference) {
            f.update(&out.logits, &r.logits[i])?;
        }
        if let Some(kept) = keep.as_mut() {
            kept.logits.push(out.logits.detach());
            kept.labels.push(batch.labels.clone());
        }
    }
    Ok(EvalReport {
        acc,
        calibration,
        fidelity,
        heads,
        head_ensemble,
        seconds: t.elapsed().as_secs_f64(),
    })
}
