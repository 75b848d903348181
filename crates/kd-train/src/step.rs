//! The forward passes and loss terms of one training step, wired once: the trainer, `kd-runner
//! bench` (which times a step) and `kd-runner selfcheck` (which compares a step on the device
//! with the CPU) all call these, so that what is timed and checked is what trains.
use candle_core::{Result, Tensor};
use kd_data::{Batch, Normalize};
use kd_models::{ModelOutput, ResNet, Teacher};

use crate::distill::{Distiller, LossTerms, Outputs, StepContext};

/// The teacher's outputs on a batch normalised for the student: the images are renormalised
/// from the student's statistics to the teacher's (they may differ, e.g. an ImageNet-normalised
/// teacher), then go through the frozen teacher; with its pre-ReLU stage outputs when the method
/// compares them ([`Distiller::needs_preact`]). For a method whose teacher also sees the paired
/// images ([`Distiller::teacher_sees_paired`]) they go through in the same pass, stacked after
/// the batch's own (a frozen teacher's BatchNorm uses its running statistics, so each image's
/// output is what it would be alone).
pub fn teacher_forward(
    teacher: &Teacher,
    batch: &Batch,
    student: &Normalize,
    method: &dyn Distiller,
) -> Result<ModelOutput> {
    let parts = kd_models::ForwardParts {
        features: method.needs_features(),
        preact: method.needs_preact(),
    };
    if !method.teacher_sees_paired() {
        return teacher_forward_parts(teacher, &batch.images, student, parts);
    }
    let Some(paired) = &batch.paired else {
        candle_core::bail!(
            "{}: the teacher sees the paired images, but the batch has none",
            method.name()
        );
    };
    let both = Tensor::cat(&[&batch.images, paired], 0)?;
    teacher_forward_parts(teacher, &both, student, parts)
}

/// [`teacher_forward`] with the parts named ([`kd_models::ForwardParts::LOGITS`] for evaluation).
pub fn teacher_forward_parts(
    teacher: &Teacher,
    images: &Tensor,
    student: &Normalize,
    parts: kd_models::ForwardParts,
) -> Result<ModelOutput> {
    // The methods an ensemble teaches read its logits alone (`build_student` refuses others),
    // whatever they ask of a single teacher's forward.
    let parts = if teacher.len() > 1 {
        kd_models::ForwardParts::LOGITS
    } else {
        parts
    };
    let x = renormalize(
        images,
        student,
        &Normalize {
            mean: teacher.meta().mean,
            std: teacher.meta().std,
        },
    )?;
    teacher.forward_parts(&x, parts)
}

/// `x` normalised by `from` re-expressed as normalised by `to`: undo one, apply the other
/// ([`kd_models::renormalize`]).
pub fn renormalize(x: &Tensor, from: &Normalize, to: &Normalize) -> Result<Tensor> {
    kd_models::renormalize(x, (from.mean, from.std), (to.mean, to.std))
}

/// What one step computed for each network it trains.
pub struct StepLosses {
    /// Each network's train-mode outputs on the batch (the student first, then the peers), with
    /// their graphs.
    pub outputs: Vec<ModelOutput>,
    /// Each network's loss terms, in the same order.
    pub terms: Vec<LossTerms>,
}

/// Runs the train-mode forward passes of one step and the method's loss for each network:
/// `models[0]` is the student, the others are the peers of an online method. The student sees
/// `teacher` (already computed, detached) and its own outputs on the batch's paired images; each
/// network sees the others' outputs detached.
pub fn step_losses(
    models: &[&ResNet],
    method: &dyn Distiller,
    ctx: &StepContext,
    batch: &Batch,
    teacher: Option<&ModelOutput>,
) -> Result<StepLosses> {
    let outputs: Vec<ModelOutput> = models
        .iter()
        .map(|m| m.forward_t(&batch.images, true))
        .collect::<Result<_>>()?;
    // The paired images (second view, same-class partner) go through the student only.
    let paired = match (&batch.paired, models.first()) {
        (Some(x), Some(m)) => Some(m.forward_t(x, true)?),
        _ => None,
    };
    let mut terms = Vec::with_capacity(models.len());
    for k in 0..outputs.len() {
        let others: Vec<ModelOutput> = outputs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(_, o)| o.detach())
            .collect();
        let out = Outputs {
            student: &outputs[k],
            teacher: if k == 0 { teacher } else { None },
            peers: &others,
            paired: if k == 0 { paired.as_ref() } else { None },
            member: k,
        };
        terms.push(method.loss(ctx, batch, &out)?);
    }
    Ok(StepLosses { outputs, terms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn renormalize_maps_one_normalisation_onto_the_other() -> Result<()> {
        let from = Normalize {
            mean: [0.4, 0.5, 0.6],
            std: [0.2, 0.25, 0.3],
        };
        let to = Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        // Raw pixel values p, normalised both ways by hand.
        let p = [0.0f32, 0.3, 1.0];
        let by = |n: &Normalize| -> Vec<f32> {
            (0..3)
                .flat_map(|c| p.iter().map(move |v| (v - n.mean[c]) / n.std[c]))
                .collect()
        };
        let x = Tensor::from_vec(by(&from), (1, 3, 1, 3), &Device::Cpu)?;
        let got: Vec<f32> = renormalize(&x, &from, &to)?.flatten_all()?.to_vec1()?;
        for (g, w) in got.iter().zip(by(&to)) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {:?}", by(&to));
        }
        Ok(())
    }
}
