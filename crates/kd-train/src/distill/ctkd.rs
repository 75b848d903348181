//! CTKD, curriculum temperature for KD (Li et al. 2023, "Curriculum Temperature for Knowledge
//! Distillation"): Hinton KD whose temperature is learned adversarially — the student minimises
//! the KD loss while the temperature, behind a gradient reversal, maximises it, so the task gets
//! harder as training goes; the reversal's strength λ grows from 0 to its maximum over the first
//! epochs by a cosine curriculum.
//!
//! As the authors' global-temperature code (zhengli97/CTKD, `Global_T`, `--t_start 1 --t_end 20
//! --decay_max 0 --decay_min -1 --decay_loops 10`): one learnable scalar g (initialised to 1,
//! trained by the run's optimizer with the student, weight decay included), τ = t_start +
//! t_range·sigmoid(GRL(g)), where GRL is the identity forward and multiplies the gradient by
//! −λ backward, λ = λ_max·(1 − cos(π·e/E))/2 at epoch e (1-based, capped at E = `curriculum_epochs`);
//! loss (1 − α)·CE + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) with α = 0.9. g lives in the student's
//! variable map (`distill.ctkd.global_t.weight`) and is checkpointed with it, not exported.
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// What CTKD (`Ctkd`) is built with.
#[derive(Clone, Copy, Debug)]
pub struct CtkdParams {
    /// Weight α of the KD term (the CE's is 1 − α).
    pub alpha: f64,
    /// The lowest temperature, t_start (1).
    pub min_temperature: f64,
    /// The temperature's range above it, t_range (the authors' `t_end`, 20).
    pub temperature_range: f64,
    /// The reversal's final strength λ_max (1).
    pub max_lambda: f64,
    /// Epochs of the cosine curriculum, E (10).
    pub curriculum_epochs: usize,
}

/// CTKD with one global temperature.
#[derive(Debug)]
pub struct Ctkd {
    ce: CrossEntropy,
    params: CtkdParams,
    /// The raw temperature parameter g (the student's map's variable).
    global_t: Tensor,
}

impl Ctkd {
    /// The method with its temperature parameter under `vb` (`global_t.weight`: kd's seeded
    /// initialisation gives a one-dimensional `weight` the value 1, the authors' `torch.ones(1)`).
    pub fn new(ce: CrossEntropy, params: CtkdParams, vb: VarBuilder) -> Result<Self> {
        let p = params;
        if !(p.min_temperature > 0.0 && p.temperature_range >= 0.0 && p.max_lambda >= 0.0) {
            bail!(
                "method ctkd: min_temperature must be positive, temperature_range and max_lambda at least 0; got {}, {} and {}",
                p.min_temperature,
                p.temperature_range,
                p.max_lambda
            );
        }
        // The map's own variable (a clone of its tensor shares it): trained and checkpointed.
        let global_t = vb.get_with_hints(1, "global_t.weight", candle_nn::Init::Const(1.0))?;
        Ok(Ctkd {
            ce,
            params,
            global_t,
        })
    }

    /// λ at `epoch` (0-based): the authors' `CosineDecay(0, −λ_max, E).get_value(epoch + 1)`,
    /// negated.
    pub fn lambda(&self, epoch: usize) -> f64 {
        let e = self.params.curriculum_epochs;
        if e == 0 {
            return self.params.max_lambda;
        }
        let i = (epoch + 1).min(e) as f64;
        self.params.max_lambda * (1.0 - (i * std::f64::consts::PI / e as f64).cos()) / 2.0
    }

    /// τ at `epoch`: t_start + t_range·sigmoid(g), with the gradient reaching g multiplied by −λ.
    pub fn temperature(&self, epoch: usize) -> Result<Tensor> {
        let reversed = gradient_scaled(&self.global_t, -self.lambda(epoch))?;
        candle_nn::ops::sigmoid(&reversed)?
            .affine(self.params.temperature_range, self.params.min_temperature)
    }
}

/// `x` forward; backward, the gradient times `scale` (a gradient reversal layer for a negative
/// scale): `scale·x + ((1 − scale)·x)` with the second part cut from the graph.
fn gradient_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    (x * scale)? + (x * (1.0 - scale))?.detach()
}

impl Distiller for Ctkd {
    fn name(&self) -> &'static str {
        "ctkd"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let tau = self.temperature(ctx.epoch)?;
        let kd = kd_losses::kd_loss_at(
            &student.logits.to_dtype(DType::F32)?,
            &teacher.logits.to_dtype(DType::F32)?,
            &tau,
        )?;
        let mut t = LossTerms::default();
        t.push(
            "loss_ce",
            (self.ce.of(&student.logits, batch)? * (1.0 - self.params.alpha))?,
        );
        t.push("loss_kd", (kd * self.params.alpha)?);
        t.note("temperature", &tau);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn ctkd(vars: &VarMap) -> Ctkd {
        let vb = VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu);
        Ctkd::new(
            CrossEntropy { smoothing: 0.0 },
            CtkdParams {
                alpha: 0.9,
                min_temperature: 1.0,
                temperature_range: 20.0,
                max_lambda: 1.0,
                curriculum_epochs: 10,
            },
            vb.pp("distill").pp("ctkd"),
        )
        .unwrap()
    }

    /// λ follows the authors' cosine from 0 towards 1 over ten epochs (their epoch 1 gives
    /// (1 − cos(π/10))/2) and stays at 1; the temperature starts at 1 + 20·sigmoid(1).
    #[test]
    fn curriculum_and_initial_temperature() {
        let vars = VarMap::new();
        let c = ctkd(&vars);
        let want0 = (1.0 - (std::f64::consts::PI / 10.0).cos()) / 2.0;
        assert!((c.lambda(0) - want0).abs() < 1e-12);
        assert!((c.lambda(4) - 0.5).abs() < 1e-12);
        assert_eq!(c.lambda(9), 1.0);
        assert_eq!(c.lambda(50), 1.0);
        let tau = c.temperature(0).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let want = 1.0 + 20.0 / (1.0 + (-1f64).exp());
        assert!((tau - want).abs() < 1e-5, "{tau} vs {want}");
    }

    /// The reversal leaves the value alone and multiplies the gradient by −λ: the parameter's
    /// gradient is −λ times the plain one, so a descent step raises the KD loss; the variable
    /// is the map's own (trained and checkpointed with the student).
    #[test]
    fn the_temperature_ascends_the_kd_loss() {
        let vars = VarMap::new();
        let c = ctkd(&vars);
        let g = vars.data().lock().unwrap()["distill.ctkd.global_t.weight"].clone();
        let s = Tensor::randn(0f32, 3.0, (4, 10), &Device::Cpu).unwrap();
        let t = Tensor::randn(0f32, 3.0, (4, 10), &Device::Cpu).unwrap();
        let epoch = 4; // λ = 0.5
        let loss = kd_losses::kd_loss_at(&s, &t, &c.temperature(epoch).unwrap()).unwrap();
        let reversed = loss.backward().unwrap();
        let reversed = reversed
            .get(g.as_tensor())
            .expect("the map's variable gets the gradient");
        // The plain gradient: the same temperature without the reversal.
        let plain_t = candle_nn::ops::sigmoid(g.as_tensor())
            .unwrap()
            .affine(20.0, 1.0)
            .unwrap();
        let plain_loss = kd_losses::kd_loss_at(&s, &t, &plain_t).unwrap();
        assert_eq!(
            loss.to_scalar::<f32>().unwrap(),
            plain_loss.to_scalar::<f32>().unwrap()
        );
        let plain = plain_loss.backward().unwrap();
        let plain = plain.get(g.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        let got = reversed.to_vec1::<f32>().unwrap()[0];
        assert!(
            (got + 0.5 * plain).abs() <= 1e-6 * plain.abs().max(1e-6),
            "{got} vs −0.5·{plain}"
        );
    }
}
