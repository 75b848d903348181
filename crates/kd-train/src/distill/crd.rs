//! Contrastive representation distillation, CRD (Tian et al. 2020): the student's pooled
//! embedding, projected and L2-normalised, must pick its own image out of K images of other
//! classes in a memory bank of the teacher's embeddings (NCE), and the teacher's projected
//! embedding likewise in a bank of the student's. Both projections are trained with the student;
//! the teacher itself stays frozen.
//!
//! As RepDistiller: two (training images × feature_dim) banks, started uniform in ±1/√(D/3),
//! updated after each step by momentum and renormalised; the normalisation constant Z of each
//! side set once, from the first step's mean score times the number of images; the negatives
//! drawn by the loader from other classes ([`kd_data::LoaderConfig::negatives`]). The banks and
//! the constants are part of the checkpoint, so a resumed run continues bit for bit.
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use kd_data::Batch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, RunInfo, StepContext};

/// Checkpoint keys of the state.
const MEMORY_STUDENT: &str = "crd.memory_student";
const MEMORY_TEACHER: &str = "crd.memory_teacher";
const NORMALISERS: &str = "crd.z";

/// The banks and constants carried from step to step.
#[derive(Debug)]
struct Banks {
    /// The student's embeddings of every training image, (N, D) f32.
    student: Tensor,
    /// The teacher's, (N, D) f32.
    teacher: Tensor,
    /// Z of the student's and the teacher's scores, once the first step has set them.
    z: Option<[f64; 2]>,
}

/// CRD's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrdParams {
    /// Weight β of the two NCE terms (0.8 in RepDistiller's runs).
    pub weight: f64,
    /// Width of the shared embedding space (128).
    pub feature_dim: usize,
    /// Temperature of the scores (0.07).
    pub temperature: f64,
    /// Momentum of the bank update (0.5).
    pub momentum: f64,
}

/// CRD.
#[derive(Debug)]
pub struct Crd {
    ce: CrossEntropy,
    params: CrdParams,
    embed_student: Linear,
    embed_teacher: Linear,
    banks: Mutex<Option<Banks>>,
}

impl Crd {
    /// The projections from the student's and the teacher's pooled widths to `feature_dim`,
    /// created under `vb` (`student.fc`, `teacher.fc`: initialised as PyTorch's `Linear`).
    pub fn new(
        ce: CrossEntropy,
        student_width: usize,
        teacher_width: usize,
        params: CrdParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = params.feature_dim;
        Ok(Crd {
            ce,
            params,
            embed_student: candle_nn::linear(student_width, d, vb.pp("student").pp("fc"))?,
            embed_teacher: candle_nn::linear(teacher_width, d, vb.pp("teacher").pp("fc"))?,
            banks: Mutex::new(None),
        })
    }
}

impl Distiller for Crd {
    fn name(&self) -> &'static str {
        "crd"
    }

    fn prepare(&self, run: &RunInfo) -> Result<()> {
        let d = self.params.feature_dim;
        let stdv = 1.0 / (d as f64 / 3.0).sqrt();
        let bank = |which: u64| -> Result<Tensor> {
            let mut rng = ChaCha8Rng::seed_from_u64(run.seed ^ 0xC4D_0000 ^ which);
            let v: Vec<f32> = (0..run.train_size * d)
                .map(|_| rng.gen_range(-stdv..stdv) as f32)
                .collect();
            Tensor::from_vec(v, (run.train_size, d), &run.device)
        };
        *self.banks.lock().expect("crd banks lock") = Some(Banks {
            student: bank(1)?,
            teacher: bank(2)?,
            z: None,
        });
        Ok(())
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let guard = self.banks.lock().expect("crd banks lock");
        let mut state = HashMap::new();
        if let Some(b) = &*guard {
            state.insert(MEMORY_STUDENT.to_string(), b.student.copy()?);
            state.insert(MEMORY_TEACHER.to_string(), b.teacher.copy()?);
            if let Some(z) = b.z {
                state.insert(
                    NORMALISERS.to_string(),
                    Tensor::new(&z, b.student.device())?,
                );
            }
        }
        Ok(state)
    }

    fn load_state(&self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let mut guard = self.banks.lock().expect("crd banks lock");
        let Some(banks) = guard.as_mut() else {
            bail!("crd: load_state before prepare");
        };
        for (key, bank) in [
            (MEMORY_STUDENT, &mut banks.student),
            (MEMORY_TEACHER, &mut banks.teacher),
        ] {
            let Some(saved) = state.remove(key) else {
                bail!("crd: the checkpoint has no {key}");
            };
            if saved.dims() != bank.dims() || saved.dtype() != DType::F32 {
                bail!(
                    "crd: the checkpoint's {key} is {:?} {:?}, expected {:?} F32 (training images × feature_dim)",
                    saved.dims(),
                    saved.dtype(),
                    bank.dims()
                );
            }
            *bank = saved.to_device(bank.device())?;
        }
        banks.z = match state.remove(NORMALISERS) {
            None => None,
            Some(z) => match z.to_dtype(DType::F64)?.to_vec1::<f64>()?.as_slice() {
                &[zs, zt] => Some([zs, zt]),
                other => bail!(
                    "crd: the checkpoint's {NORMALISERS} holds {} values, expected 2",
                    other.len()
                ),
            },
        };
        Ok(())
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        if batch.mix.is_some() {
            bail!(
                "crd keeps one embedding per image and cannot follow mixed images: turn mixup off"
            );
        }
        let Some(contrast) = &batch.contrast else {
            bail!("crd needs negatives: build its loader with LoaderConfig::negatives = MethodConfig::negatives()");
        };
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let student = out.student;
        let mut guard = self.banks.lock().expect("crd banks lock");
        let Some(banks) = guard.as_mut() else {
            bail!("crd: prepare(run) must be called before training");
        };
        let n = banks.student.dim(0)?;
        if let Some(&bad) = batch.indices.iter().find(|&&i| i >= n) {
            bail!("crd: image index {bad} outside the {n} training images given to prepare");
        }
        let p = &self.params;
        let embed = |fc: &Linear, f: &Tensor| -> Result<Tensor> {
            kd_losses::l2_normalize(&fc.forward(&f.flatten_from(1)?.to_dtype(DType::F32)?)?)
        };
        let v_s = embed(&self.embed_student, &student.pooled)?;
        let v_t = embed(&self.embed_teacher, &teacher.pooled.detach())?;
        let contrast = contrast.to_device(v_s.device())?;
        // Each embedding against the other network's bank.
        let scores_s = kd_losses::contrast_scores(&banks.teacher, &contrast, &v_s, p.temperature)?;
        let scores_t = kd_losses::contrast_scores(&banks.student, &contrast, &v_t, p.temperature)?;
        let z = match banks.z {
            Some(z) => z,
            None => {
                let mean = |s: &Tensor| -> Result<f64> {
                    Ok(s.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64)
                };
                let z = [mean(&scores_s)?, mean(&scores_t)?];
                banks.z = Some(z);
                z
            }
        };
        let loss_s = kd_losses::nce_loss(&(scores_s / z[0])?, n)?;
        let loss_t = kd_losses::nce_loss(&(scores_t / z[1])?, n)?;
        let rows = contrast.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        kd_losses::momentum_update(&banks.student, &rows, &v_s, p.momentum)?;
        kd_losses::momentum_update(&banks.teacher, &rows, &v_t, p.momentum)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_crd_student", (loss_s * p.weight)?);
        t.push("loss_crd_teacher", (loss_t * p.weight)?);
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
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use kd_models::ModelOutput;

    use crate::distill::fixtures::{get, rel_err, scalar, Fixture};

    /// Two steps of RepDistiller's CRDLoss computed by PyTorch in f64
    /// (`tools/fixtures/make_loss_fixtures.py`).
    fn fixture() -> Fixture {
        crate::distill::fixtures::load("crd")
    }

    fn f32(t: Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// A CRD with the fixture's sizes (12 → 8 ← 20, 30 images, 3 classes) and its variables.
    fn crd(f: &Fixture) -> (Crd, VarMap) {
        let p = get(f, "params").to_vec1::<f64>().unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let params = CrdParams {
            weight: 1.0,
            feature_dim: 8,
            temperature: p[0],
            momentum: p[1],
        };
        let crd = Crd::new(CrossEntropy { smoothing: 0.0 }, 12, 20, params, vb).unwrap();
        crd.prepare(&RunInfo::cpu(p[2] as usize, 3)).unwrap();
        (crd, vars)
    }

    fn set(vars: &VarMap, name: &str, value: Tensor) {
        let data = vars.data().lock().unwrap();
        data.get(name)
            .unwrap_or_else(|| panic!("no variable {name}"))
            .set(&f32(value))
            .unwrap();
    }

    /// Step `j` of the fixture: its batch, the student's and teacher's pooled features.
    fn step_inputs(f: &Fixture, j: usize) -> (Batch, Var, Tensor) {
        let p = |k: &str| get(f, &format!("step{j}.{k}"));
        let contrast = p("contrast").to_dtype(DType::U32).unwrap();
        let rows = contrast.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let b = rows.dim(0).unwrap();
        let batch = Batch {
            images: Tensor::zeros((b, 3, 2, 2), DType::F32, &Device::Cpu).unwrap(),
            labels: get(f, "labels")
                .to_dtype(DType::U32)
                .unwrap()
                .index_select(&rows, 0)
                .unwrap(),
            mix: None,
            indices: rows
                .to_vec1::<u32>()
                .unwrap()
                .iter()
                .map(|&i| i as usize)
                .collect(),
            paired: None,
            contrast: Some(contrast),
        };
        let feat_s = Var::from_tensor(&f32(p("feat_s"))).unwrap();
        (batch, feat_s, f32(p("feat_t")))
    }

    fn output(pooled: &Tensor) -> ModelOutput {
        let b = pooled.dim(0).unwrap();
        ModelOutput {
            logits: Tensor::zeros((b, 3), DType::F32, &Device::Cpu).unwrap(),
            feats: Vec::new(),
            pooled: pooled.clone(),
            preact: Vec::new(),
            aux: Vec::new(),
            branches: Vec::new(),
            gated: None,
        }
    }

    /// Runs fixture step `j` on `crd`, checking the loss, every gradient, the banks and Z.
    fn check_step(f: &Fixture, crd: &Crd, vars: &VarMap, j: usize) {
        let p = |k: &str| get(f, &format!("step{j}.{k}"));
        for (leaf, name) in [
            ("ws", "student.fc.weight"),
            ("bs", "student.fc.bias"),
            ("wt", "teacher.fc.weight"),
            ("bt", "teacher.fc.bias"),
        ] {
            set(vars, name, p(&format!("w.{leaf}")));
        }
        let (batch, feat_s, feat_t) = step_inputs(f, j);
        let (s_out, t_out) = (output(feat_s.as_tensor()), output(&feat_t));
        let ctx = StepContext {
            epoch: 0,
            step: j,
            total_steps: 2,
            epochs: 1,
        };
        let out = Outputs {
            teacher: Some(&t_out),
            ..Outputs::student(&s_out)
        };
        let terms = crd.loss(&ctx, &batch, &out).unwrap();
        let term = |name: &str| {
            terms
                .terms
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| panic!("no term {name}"))
        };
        for (name, want) in [
            ("loss_crd_student", "loss_s"),
            ("loss_crd_teacher", "loss_t"),
        ] {
            let (g, w) = (scalar(&term(name)), scalar(&p(want)));
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "step {j} {name}: {g} vs PyTorch {w}"
            );
        }
        let total = (term("loss_crd_student") + term("loss_crd_teacher")).unwrap();
        let grads = total.backward().unwrap();
        let e = rel_err(grads.get(feat_s.as_tensor()).unwrap(), &p("grad.feat_s"));
        assert!(
            e < 1e-4,
            "step {j} gradient of the student's features: {e:e}"
        );
        let data = vars.data().lock().unwrap();
        for (leaf, name) in [
            ("ws", "student.fc.weight"),
            ("bs", "student.fc.bias"),
            ("wt", "teacher.fc.weight"),
            ("bt", "teacher.fc.bias"),
        ] {
            let g = grads.get(data[name].as_tensor()).unwrap();
            let e = rel_err(g, &p(&format!("grad.{leaf}")));
            assert!(e < 1e-4, "step {j} gradient of {name}: {e:e}");
        }
        let state = crd.state().unwrap();
        for (key, want) in [
            (MEMORY_STUDENT, "memory_s"),
            (MEMORY_TEACHER, "memory_t"),
            (NORMALISERS, "z"),
        ] {
            let e = rel_err(&state[key], &p(want));
            assert!(e < 1e-5, "step {j} {key}: {e:e}");
        }
    }

    fn start_from_fixture(f: &Fixture, crd: &Crd) {
        crd.load_state(HashMap::from([
            (MEMORY_STUDENT.to_string(), f32(get(f, "init.memory_s"))),
            (MEMORY_TEACHER.to_string(), f32(get(f, "init.memory_t"))),
        ]))
        .unwrap();
    }

    #[test]
    fn two_steps_match_pytorch() {
        let f = fixture();
        let (crd, vars) = crd(&f);
        start_from_fixture(&f, &crd);
        check_step(&f, &crd, &vars, 0);
        check_step(&f, &crd, &vars, 1);
    }

    /// The second step from a saved state in a fresh method, as a resumed run takes it.
    #[test]
    fn the_state_carries_banks_and_constants() {
        let f = fixture();
        let (first, vars) = crd(&f);
        start_from_fixture(&f, &first);
        check_step(&f, &first, &vars, 0);
        let (second, vars2) = crd(&f);
        second.load_state(first.state().unwrap()).unwrap();
        check_step(&f, &second, &vars2, 1);
        // A state without banks, or with a bank of the wrong size, is refused by name.
        let err = second.load_state(HashMap::new()).unwrap_err().to_string();
        assert!(err.contains(MEMORY_STUDENT), "{err}");
        let mut wrong = first.state().unwrap();
        wrong.insert(
            MEMORY_TEACHER.into(),
            Tensor::zeros((29, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = second.load_state(wrong).unwrap_err().to_string();
        assert!(err.contains(MEMORY_TEACHER) && err.contains("29"), "{err}");
    }

    #[test]
    fn refuses_batches_it_cannot_use() {
        let f = fixture();
        let (crd, _) = crd(&f);
        let (mut batch, feat_s, feat_t) = step_inputs(&f, 0);
        let (s_out, t_out) = (output(feat_s.as_tensor()), output(&feat_t));
        let ctx = StepContext::one_step();
        let with_teacher = Outputs {
            teacher: Some(&t_out),
            ..Outputs::student(&s_out)
        };
        let err = crd
            .loss(&ctx, &batch, &Outputs::student(&s_out))
            .unwrap_err();
        assert!(err.to_string().contains("teacher"), "{err}");
        batch.indices[0] = 30;
        let err = crd.loss(&ctx, &batch, &with_teacher).unwrap_err();
        assert!(err.to_string().contains("index 30"), "{err}");
        batch.contrast = None;
        let err = crd.loss(&ctx, &batch, &with_teacher).unwrap_err();
        assert!(err.to_string().contains("negatives"), "{err}");
        batch.mix = Some((batch.labels.clone(), 0.5));
        let err = crd.loss(&ctx, &batch, &with_teacher).unwrap_err();
        assert!(err.to_string().contains("mix"), "{err}");
    }
}
