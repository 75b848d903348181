//! Transformed teacher matching, TTM, and its weighted form, WTTM (Zheng & Yang 2024,
//! "Knowledge Distillation Based on Transformed Teacher Matching"), as the authors' code
//! (RepDistiller-based: their `TTM`, `WTTMLoss`) computes them: `CE + β·mean KL(q ‖ p_s)`, q the
//! teacher's probabilities raised to the power γ and renormalised (the teacher alone softened, at
//! T = 1/γ; the student at T = 1; no T² factor), each image's KL weighed by U = Σ p_t^γ under
//! WTTM ([`kd_losses::ttm_loss`]). The paper reads dropping the student's temperature as a
//! Rényi-entropy regulariser on the student.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// TTM or WTTM.
#[derive(Clone, Copy, Debug)]
pub struct Ttm {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Power γ of the teacher's probabilities.
    pub gamma: f64,
    /// Weight β of the matching term.
    pub beta: f64,
    /// WTTM: each image's term weighed by U = Σ p_t^γ.
    pub weighted: bool,
}

impl Distiller for Ttm {
    fn name(&self) -> &'static str {
        "ttm"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let matched =
            kd_losses::ttm_loss(&student.logits, &teacher.logits, self.gamma, self.weighted)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_ttm", (matched * self.beta)?);
        Ok(t)
    }

    /// The logits only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
