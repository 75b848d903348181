//! Self-distillation, "Be Your Own Teacher" (Zhang et al. 2019): auxiliary heads after stages
//! 1–3 learn from the labels, from the deepest head's softened output and from its features
//! (the seed's "middle output taught by the last"). The heads are training-only.
use candle_core::Result;
use kd_data::Batch;
use kd_models::ModelOutput;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// BYOT.
#[derive(Clone, Copy, Debug)]
pub struct Byot {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the KL term of each head (its CE gets 1 − α).
    pub alpha: f64,
    /// Temperature.
    pub temperature: f64,
    /// Weight of the feature hint of each head.
    pub hint_weight: f64,
}

impl Byot {
    /// The auxiliary heads' terms only (the final head's CE is added by the caller).
    pub fn head_terms(&self, batch: &Batch, student: &ModelOutput) -> Result<LossTerms> {
        if student.aux.is_empty() {
            candle_core::bail!("byot needs a student with auxiliary heads");
        }
        let deep_logits = student.logits.detach();
        let deep_feat = student.pooled.detach();
        let mut ce = None;
        let mut kl = None;
        let mut hint = None;
        let add = |acc: Option<candle_core::Tensor>,
                   t: candle_core::Tensor|
         -> Result<Option<candle_core::Tensor>> {
            Ok(Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            }))
        };
        for head in &student.aux {
            ce = add(ce, self.ce.of(&head.logits, batch)?)?;
            kl = add(
                kl,
                kd_losses::kd_loss(&head.logits, &deep_logits, self.temperature)?,
            )?;
            hint = add(hint, kd_losses::hint_loss(&head.pooled, &deep_feat)?)?;
        }
        let mut t = LossTerms::default();
        t.push("loss_self_ce", (ce.expect("heads") * (1.0 - self.alpha))?);
        t.push("loss_self_kd", (kl.expect("heads") * self.alpha)?);
        t.push("loss_self_hint", (hint.expect("heads") * self.hint_weight)?);
        Ok(t)
    }
}

impl Distiller for Byot {
    fn name(&self) -> &'static str {
        "byot"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.extend(self.head_terms(batch, student)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
