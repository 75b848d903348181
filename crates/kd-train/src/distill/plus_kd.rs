//! Hinton KD added to another offline method: `loss(method) + α·T²·KL(softmax(t/T) ‖
//! softmax(s/T))`, the method's own terms (its cross-entropy included) unchanged. This is
//! RepDistiller's `-a` beside a method's `-b` (`loss = γ·CE + α·KD + β·other`, γ = 1), as in its
//! CRD+KD row; everything else (state, init phase, frozen parts) is the method's.
use std::collections::HashMap;

use candle_core::{Result, Tensor};
use kd_data::Batch;
use kd_models::ModelOutput;
use serde::{Deserialize, Serialize};

use super::{Distiller, InitPhase, LossTerms, MethodConfig, Outputs, RunInfo, StepContext};

/// The added KD term's settings; `alpha = 0` adds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlusKd {
    /// Weight α of the KD term (RepDistiller's `-a`; 1 in its CRD+KD).
    pub alpha: f64,
    /// Temperature T (4).
    pub temperature: f64,
}

impl Default for PlusKd {
    /// Off: α = 0, T = 4.
    fn default() -> Self {
        PlusKd {
            alpha: 0.0,
            temperature: 4.0,
        }
    }
}

impl PlusKd {
    /// Whether this term can be added to `method`: always when off (α = 0); else α and T must
    /// be positive and finite, and the method offline (learning from a frozen teacher) without
    /// a KD term of its own ([`MethodConfig::has_kd_term`]). The error says why not.
    pub fn check(&self, method: &MethodConfig) -> std::result::Result<(), String> {
        if self.alpha == 0.0 {
            return Ok(());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "plus_kd.alpha = {} and plus_kd.temperature = {}: expected α ≥ 0 (0 = off) and T > 0",
                self.alpha, self.temperature
            ));
        }
        let needs_teacher = method.needs_teacher();
        if !needs_teacher || method.has_kd_term() {
            return Err(format!(
                "plus_kd adds a frozen teacher's KD term to another offline method; method {} {}: set plus_kd.alpha = 0",
                method.name(),
                if needs_teacher {
                    "already has a KD term"
                } else {
                    "has no frozen teacher"
                }
            ));
        }
        Ok(())
    }

    /// `method`, built from `config`, with this KD term added (`method` itself when α = 0), if
    /// [`Self::check`] allows.
    pub fn wrap(
        self,
        method: Box<dyn Distiller>,
        config: &MethodConfig,
    ) -> Result<Box<dyn Distiller>> {
        if method.name() != config.name() {
            candle_core::bail!(
                "plus_kd: the method {} was built from another config ({})",
                method.name(),
                config.name()
            );
        }
        self.check(config).map_err(candle_core::Error::Msg)?;
        if self.alpha == 0.0 {
            return Ok(method);
        }
        Ok(Box::new(WithKd {
            inner: method,
            kd: self,
        }))
    }
}

/// A method with [`PlusKd`]'s term.
struct WithKd {
    inner: Box<dyn Distiller>,
    kd: PlusKd,
}

impl Distiller for WithKd {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let mut terms = self.inner.loss(ctx, batch, out)?;
        let teacher = super::teacher_outputs("plus_kd", out.teacher)?;
        let kd = kd_losses::kd_loss(&out.student.logits, &teacher.logits, self.kd.temperature)?;
        terms.push("loss_kd", (kd * self.kd.alpha)?);
        Ok(terms)
    }

    fn prepare(&self, run: &RunInfo) -> Result<()> {
        self.inner.prepare(run)
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        self.inner.state()
    }

    fn load_state(&self, state: HashMap<String, Tensor>) -> Result<()> {
        self.inner.load_state(state)
    }

    fn init_phase(&self) -> Option<InitPhase> {
        self.inner.init_phase()
    }

    fn init_loss(&self, student: Option<&ModelOutput>, teacher: &ModelOutput) -> Result<LossTerms> {
        self.inner.init_loss(student, teacher)
    }

    fn frozen(&self) -> Vec<String> {
        self.inner.frozen()
    }

    /// Always: the KD term needs the teacher's logits, even after an init-phase method (AB + KD).
    fn teacher_each_step(&self) -> bool {
        true
    }

    fn needs_preact(&self) -> bool {
        self.inner.needs_preact()
    }

    /// KD reads only the logits: the features if the wrapped method reads them.
    fn needs_features(&self) -> bool {
        self.inner.needs_features()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use crate::distill::none::CrossEntropy;
    use crate::MethodConfig;
    use candle_core::{DType, Device};
    use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

    /// The wrapped method's terms are kept as they are and `loss_kd` = α·T²·KL is added; the
    /// wrapper passes the method's init phase, frozen parts and pre-ReLU outputs through but
    /// always needs the teacher; off (α = 0) it is the method itself; it refuses methods without
    /// a frozen teacher and KD itself.
    #[test]
    fn adds_the_kd_term_and_keeps_the_method() {
        let cfg = |arch| ResNetConfig {
            base_width: 4,
            ..ResNetConfig::new(arch, Stem::Cifar, 10)
        };
        let (s, svars) = trainable_resnet(&cfg(Arch::Resnet18), &Device::Cpu, 1).unwrap();
        let (t, _) = trainable_resnet(&cfg(Arch::Resnet50), &Device::Cpu, 2).unwrap();
        let vb = candle_nn::VarBuilder::from_varmap(&svars, DType::F32, &Device::Cpu);
        let ce = CrossEntropy { smoothing: 0.0 };
        let ab = || {
            Box::new(
                super::super::ab::Ab::new(
                    ce,
                    &s,
                    &t,
                    super::super::AbParams {
                        weight: 3e-3,
                        margin: 1.0,
                        init_epochs: 1,
                        init_lr: 0.05,
                    },
                    vb.pp("distill").pp("ab"),
                )
                .unwrap(),
            ) as Box<dyn Distiller>
        };
        let ab_config = MethodConfig::preset("ab").unwrap();
        let kd = PlusKd {
            alpha: 0.7,
            temperature: 3.0,
        };
        let wrapped = kd.wrap(ab(), &ab_config).unwrap();
        assert_eq!(wrapped.name(), "ab");
        assert_eq!(wrapped.init_phase(), ab().init_phase());
        assert_eq!(wrapped.frozen(), ab().frozen());
        assert!(wrapped.needs_preact() && ab().needs_preact());
        assert!(wrapped.teacher_each_step() && !ab().teacher_each_step());
        let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
        let (os, ot) = (
            s.forward_t(&x, true).unwrap(),
            t.forward_t(&x, false).unwrap(),
        );
        let batch = Batch {
            images: x,
            ..labelled_batch(Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap())
        };
        let out = Outputs {
            teacher: Some(&ot),
            ..Outputs::student(&os)
        };
        let ctx = StepContext::one_step();
        let terms = wrapped.loss(&ctx, &batch, &out).unwrap();
        let names: Vec<&str> = terms.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["loss_ce", "loss_kd"]);
        let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let ce_alone = value(&ab().loss(&ctx, &batch, &out).unwrap().total().unwrap());
        assert_eq!(
            value(&terms.terms[0].1),
            ce_alone,
            "the method's terms are unchanged"
        );
        let want = 0.7 * value(&kd_losses::kd_loss(&os.logits, &ot.logits, 3.0).unwrap());
        assert!((value(&terms.terms[1].1) - want).abs() <= 1e-6 * want.abs().max(1.0));
        // Off: the method itself.
        assert!(!PlusKd::default()
            .wrap(ab(), &ab_config)
            .unwrap()
            .teacher_each_step());
        // Refused: no frozen teacher, KD itself, a negative weight.
        let none = MethodConfig::None.build(&s, None, vb.clone(), 0.0).unwrap();
        assert!(kd.wrap(none, &MethodConfig::None).is_err());
        let hinton = Box::new(super::super::hinton::Hinton {
            ce,
            alpha: 0.9,
            temperature: 4.0,
            standardize: false,
        });
        let err = kd
            .wrap(hinton, &MethodConfig::preset("kd").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already has a KD term"), "{err}");
        // A distiller of another method than its config says is refused.
        let err = kd
            .wrap(ab(), &MethodConfig::preset("fitnet").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("another config"), "{err}");
        let negative = PlusKd {
            alpha: -1.0,
            temperature: 4.0,
        };
        assert!(negative.wrap(ab(), &ab_config).is_err());
    }
}
