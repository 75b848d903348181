//! Correlation congruence, CC (Peng et al. 2019, "Correlation Congruence for Knowledge
//! Distillation"): beyond matching each image's embedding, the student should relate images to
//! one another as the teacher does.
//!
//! As RepDistiller, whose CC benchmark numbers this reproduces: the student's and the teacher's
//! pooled embeddings, each through its own linear projection to `feature_dim` (both trained with
//! the student, not exported), compared by RepDistiller's `Correlation` ([`kd_losses::cc_loss`],
//! the code the authors shared with it); CE + weight·CC with weight 0.02.
use candle_core::{Module, Result};
use candle_nn::{Linear, VarBuilder};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// CC on the pooled embeddings.
#[derive(Debug)]
pub struct Cc {
    ce: CrossEntropy,
    weight: f64,
    embed_student: Linear,
    embed_teacher: Linear,
}

impl Cc {
    /// The projections from the student's and the teacher's pooled widths to `feature_dim`,
    /// under `vb` (`student.fc`, `teacher.fc`; PyTorch's `Linear` initialisation).
    pub fn new(
        ce: CrossEntropy,
        student_width: usize,
        teacher_width: usize,
        feature_dim: usize,
        weight: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Cc {
            ce,
            weight,
            embed_student: candle_nn::linear(
                student_width,
                feature_dim,
                vb.pp("student").pp("fc"),
            )?,
            embed_teacher: candle_nn::linear(
                teacher_width,
                feature_dim,
                vb.pp("teacher").pp("fc"),
            )?,
        })
    }
}

impl Distiller for Cc {
    fn name(&self) -> &'static str {
        "cc"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let s = self.embed_student.forward(&student.pooled)?;
        let t = self.embed_teacher.forward(&teacher.pooled)?;
        let mut terms = LossTerms::default();
        terms.push("loss_ce", self.ce.of(&student.logits, batch)?);
        terms.push("loss_cc", (kd_losses::cc_loss(&s, &t)? * self.weight)?);
        Ok(terms)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
