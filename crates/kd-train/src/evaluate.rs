//! Evaluation of a model on a split: accuracy, per-class accuracy, loss and throughput.
use std::time::Instant;

use candle_core::Tensor;
use kd_data::Loader;
use kd_models::ModelOutput;

use crate::metrics::Accuracy;
use crate::Result;

/// What an evaluation measured.
#[derive(Clone, Debug)]
pub struct EvalReport {
    /// Accuracy counts and loss.
    pub acc: Accuracy,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl EvalReport {
    /// Images per second.
    pub fn images_per_sec(&self) -> f64 {
        self.acc.total as f64 / self.seconds.max(1e-9)
    }
}

/// Runs `forward` over every batch of `loader` (epoch 0, in order) and accumulates accuracy and
/// cross-entropy.
pub fn evaluate(
    loader: &Loader,
    num_classes: usize,
    forward: impl Fn(&Tensor) -> candle_core::Result<ModelOutput>,
) -> Result<EvalReport> {
    let t = Instant::now();
    let mut acc = Accuracy::new(num_classes);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let out = forward(&batch.images)?;
        let loss =
            candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?.to_scalar::<f32>()? as f64;
        acc.update(&out.logits, &batch.labels, Some(loss))?;
    }
    Ok(EvalReport {
        acc,
        seconds: t.elapsed().as_secs_f64(),
    })
}
