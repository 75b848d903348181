//! Relational knowledge distillation (Park et al. 2019, "Relational Knowledge Distillation"):
//! distance and angle structure of the batch's pooled embeddings.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// RKD-DA.
#[derive(Clone, Copy, Debug)]
pub struct Rkd {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the distance term.
    pub distance_weight: f64,
    /// Weight of the angle term.
    pub angle_weight: f64,
}

impl Distiller for Rkd {
    fn name(&self) -> &'static str {
        "rkd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = out.teacher;
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_rkd_distance",
            (kd_losses::rkd_distance_loss(&student.pooled, &teacher.pooled)?
                * self.distance_weight)?,
        );
        t.push(
            "loss_rkd_angle",
            (kd_losses::rkd_angle_loss(&student.pooled, &teacher.pooled)? * self.angle_weight)?,
        );
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
