//! Classification metrics accumulated over batches: top-1, top-5, per-class accuracy, mean loss.
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Rank of each sample's true class, (B,) f32 on the logits' device: the number of classes
/// scoring strictly higher (ties favour the true class, matching torch.topk on distinct scores).
/// `logits` (B, K), `labels` (B,) u32.
pub fn true_class_rank(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    let true_score = logits.gather(&labels.unsqueeze(1)?, D::Minus1)?;
    logits
        .broadcast_gt(&true_score)?
        .to_dtype(candle_core::DType::F32)?
        .sum(D::Minus1)
}

/// Running counts for one evaluation or epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Samples seen.
    pub total: usize,
    /// Samples whose label is the top prediction.
    pub top1: usize,
    /// Samples whose label is among the five top predictions.
    pub top5: usize,
    /// Per class: (correct top-1, samples).
    pub per_class: Vec<(usize, usize)>,
    /// Sum of per-sample losses, when given.
    pub loss_sum: f64,
}

impl Accuracy {
    /// An empty accumulator for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Accuracy {
            per_class: vec![(0, 0); num_classes],
            ..Default::default()
        }
    }

    /// Adds a batch: `logits` (B, K), `labels` (B,) u32, and the batch's mean loss if known.
    pub fn update(
        &mut self,
        logits: &Tensor,
        labels: &Tensor,
        mean_loss: Option<f64>,
    ) -> Result<()> {
        let (b, k) = logits.dims2()?;
        let higher: Vec<f32> = true_class_rank(logits, labels)?.to_vec1()?;
        let labels: Vec<u32> = labels.to_vec1()?;
        for (i, &l) in labels.iter().enumerate() {
            let rank = higher[i] as usize;
            let c = &mut self.per_class[l as usize];
            c.1 += 1;
            if rank == 0 {
                self.top1 += 1;
                c.0 += 1;
            }
            if rank < 5.min(k) {
                self.top5 += 1;
            }
        }
        self.total += b;
        if let Some(l) = mean_loss {
            self.loss_sum += l * b as f64;
        }
        Ok(())
    }

    /// Top-1 accuracy in percent.
    pub fn top1_pct(&self) -> f64 {
        pct(self.top1, self.total)
    }

    /// Top-5 accuracy in percent.
    pub fn top5_pct(&self) -> f64 {
        pct(self.top5, self.total)
    }

    /// Mean loss per sample.
    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.loss_sum / self.total as f64
        }
    }

    /// Per-class top-1 accuracy in percent.
    pub fn per_class_pct(&self) -> Vec<f64> {
        self.per_class.iter().map(|&(c, n)| pct(c, n)).collect()
    }
}

/// `100·a/b`, 0 for b = 0.
pub(crate) fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}
