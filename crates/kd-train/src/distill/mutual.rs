//! Online distillation, Deep Mutual Learning (Zhang et al. 2018): two or more peers learn
//! together; each minimises its CE plus `weight·T²·KL(peer ‖ self)` averaged over the other
//! peers' detached predictions. The trainer calls this once per peer with that peer's outputs
//! in `out.student` and the others in `out.peers`, and steps each peer's own optimizer with
//! its own loss, so no peer receives gradients from another's.
//!
//! All peers predict from the same forward pass of the step (the simultaneous variant most
//! reimplementations use), not the paper's alternating one.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// DML, as seen by one peer.
#[derive(Clone, Copy, Debug)]
pub struct Mutual {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the mimicry term (1 in the paper).
    pub weight: f64,
    /// Temperature (1 in the paper).
    pub temperature: f64,
}

impl Distiller for Mutual {
    fn name(&self) -> &'static str {
        "dml"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        if out.peers.is_empty() {
            candle_core::bail!("dml needs the outputs of at least one other peer");
        }
        let mut mimicry = None;
        for peer in out.peers {
            // The peer's output is a constant here: its own loss trains it.
            let kl =
                kd_losses::kd_loss(&out.student.logits, &peer.logits.detach(), self.temperature)?;
            mimicry = Some(match mimicry {
                None => kl,
                Some(acc) => (acc + kl)?,
            });
        }
        let mimicry =
            (mimicry.expect("at least one peer") * (self.weight / out.peers.len() as f64))?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&out.student.logits, batch)?);
        t.push("loss_dml", mimicry);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
