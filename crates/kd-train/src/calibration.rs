//! Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
//! how far a model's confidence is from its accuracy. Distillation changes calibration as well as
//! accuracy (a teacher's soft targets act like label smoothing), so every evaluation reports it.
//!
//! The top-1 confidence (the largest softmax probability) of each image falls into one of
//! [`Calibration::BINS`] equal-width bins, `(k/15, (k+1)/15]`; ECE is the bins' |accuracy −
//! mean confidence| weighted by their share of the images — the definition of Guo et al. and of
//! torchmetrics' `MulticlassCalibrationError(n_bins=15, norm="l1")`.
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// One confidence bin's running sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    /// Images whose confidence fell in the bin.
    pub count: usize,
    /// Sum of their confidences.
    pub confidence_sum: f64,
    /// Of them, those whose top prediction is the label.
    pub correct: usize,
}

impl CalibrationBin {
    /// Mean top-1 confidence of its images, in percent (0 for an empty bin).
    pub fn mean_confidence_pct(&self) -> f64 {
        match self.count {
            0 => 0.0,
            n => 100.0 * self.confidence_sum / n as f64,
        }
    }

    /// Top-1 accuracy of its images, in percent (0 for an empty bin).
    pub fn accuracy_pct(&self) -> f64 {
        crate::metrics::pct(self.correct, self.count)
    }
}

/// Running confidence bins of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The [`Calibration::BINS`] bins, lowest confidence first.
    pub bins: Vec<CalibrationBin>,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            bins: vec![CalibrationBin::default(); Self::BINS],
        }
    }
}

impl Calibration {
    /// Equal-width confidence bins, as in Guo et al. and most papers since.
    pub const BINS: usize = 15;

    /// Empty bins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one image: its top-1 `confidence` in [0, 1] and whether the top prediction is right.
    pub fn add(&mut self, confidence: f64, correct: bool) {
        // Bin k holds (k/B, (k+1)/B]; a confidence of 0 (impossible for a softmax) goes to bin 0.
        let k = ((confidence * Self::BINS as f64).ceil() as usize).clamp(1, Self::BINS) - 1;
        let bin = &mut self.bins[k];
        bin.count += 1;
        bin.confidence_sum += confidence;
        bin.correct += usize::from(correct);
    }

    /// Adds a batch: `logits` (B, K), `labels` (B,) u32. The prediction is the arg-max.
    pub fn update(&mut self, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?;
        let confidence: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits)?
            .max(D::Minus1)?
            .to_vec1()?;
        let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let labels: Vec<u32> = labels.to_vec1()?;
        for ((&c, &p), &l) in confidence.iter().zip(&predicted).zip(&labels) {
            self.add(c as f64, p == l);
        }
        Ok(())
    }

    /// Adds `other`'s images (another evaluation, another seed): the bins of both together.
    pub fn merge(&mut self, other: &Calibration) {
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            a.count += b.count;
            a.confidence_sum += b.confidence_sum;
            a.correct += b.correct;
        }
    }

    /// Images seen.
    pub fn total(&self) -> usize {
        self.bins.iter().map(|b| b.count).sum()
    }

    /// Expected calibration error in percent (0 when nothing was seen).
    pub fn ece_pct(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let gap: f64 = self
            .bins
            .iter()
            .map(|b| (b.correct as f64 - b.confidence_sum).abs())
            .sum();
        100.0 * gap / total as f64
    }

    /// Mean top-1 confidence in percent: above the accuracy for an over-confident model.
    pub fn mean_confidence_pct(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        100.0 * self.bins.iter().map(|b| b.confidence_sum).sum::<f64>() / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Worked by hand: four images in two bins.
    /// - bin (0.6, 0.667]: confidences 0.62 (right) and 0.66 (wrong): |1 − 1.28| = 0.28;
    /// - bin (0.933, 1]: 0.95 (right) and 0.99 (right): |2 − 1.94| = 0.06.
    ///
    /// ECE = (0.28 + 0.06) / 4 = 0.085, i.e. 8.5%.
    #[test]
    fn ece_of_a_hand_worked_example() {
        let mut c = Calibration::new();
        c.add(0.62, true);
        c.add(0.66, false);
        c.add(0.95, true);
        c.add(0.99, true);
        assert_eq!(c.bins[9].count, 2);
        assert_eq!(c.bins[14].count, 2);
        assert!((c.ece_pct() - 8.5).abs() < 1e-9, "{}", c.ece_pct());
        assert!((c.mean_confidence_pct() - 80.5).abs() < 1e-9);
        assert!((c.bins[9].mean_confidence_pct() - 64.0).abs() < 1e-9);
        assert_eq!(
            (c.bins[9].accuracy_pct(), c.bins[14].accuracy_pct()),
            (50.0, 100.0)
        );
        assert_eq!(
            (c.bins[0].mean_confidence_pct(), c.bins[0].accuracy_pct()),
            (0.0, 0.0)
        );
    }

    /// Merging two halves of the hand-worked example gives the whole.
    #[test]
    fn merged_halves_are_the_whole() {
        let (mut a, mut b, mut whole) =
            (Calibration::new(), Calibration::new(), Calibration::new());
        for (i, &(p, right)) in [(0.62, true), (0.66, false), (0.95, true), (0.99, true)]
            .iter()
            .enumerate()
        {
            whole.add(p, right);
            if i % 2 == 0 {
                a.add(p, right)
            } else {
                b.add(p, right)
            }
        }
        a.merge(&b);
        assert_eq!(a, whole);
        assert!((a.ece_pct() - 8.5).abs() < 1e-9);
    }

    /// A bin holds its upper edge: 0.2 = 3/15 is in bin 2, 1.0 in the last one.
    #[test]
    fn bin_edges_are_closed_above() {
        let mut c = Calibration::new();
        c.add(0.2, true);
        c.add(0.2 + 1e-9, true);
        c.add(1.0, false);
        assert_eq!(c.bins[2].count, 1);
        assert_eq!(c.bins[3].count, 1);
        assert_eq!(c.bins[14].count, 1);
    }

    /// From logits: softmax([ln 2.5, 0, 0]) = (5/9, 2/9, 2/9), so confidence 5/9 in bin 8
    /// ((8/15, 9/15]); a right and a wrong such image give |1 − 10/9| / 2 = 1/18, 5.56%.
    #[test]
    fn update_takes_the_softmax_maximum_and_the_arg_max() -> Result<()> {
        let l = 2.5f32.ln();
        let logits = Tensor::new(&[[l, 0.0, 0.0], [0.0, l, 0.0]], &Device::Cpu)?;
        let labels = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let mut c = Calibration::new();
        c.update(&logits, &labels)?;
        assert_eq!(c.bins[8].count, 2);
        assert_eq!(c.bins[8].correct, 1);
        assert!((c.ece_pct() - 100.0 / 18.0).abs() < 1e-4, "{}", c.ece_pct());
        Ok(())
    }

    #[test]
    fn nothing_seen_is_zero() {
        assert_eq!(Calibration::new().ece_pct(), 0.0);
    }
}
