//! PyTorch fixtures for the methods' unit tests (`tests/fixtures/*.safetensors`, made by
//! `tools/fixtures/make_loss_fixtures.py`), the comparisons they share, and a toy step for
//! logit-based methods.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use kd_data::Batch;
use kd_models::ModelOutput;

use super::{Distiller, LossTerms, Outputs, StepContext};

/// A fixture file's tensors by key.
pub type Fixture = HashMap<String, Tensor>;

/// `tests/fixtures/{name}.safetensors`.
pub fn load(name: &str) -> Fixture {
    let path = format!(
        "{}/tests/fixtures/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The tensor at `key`, or a panic naming it.
pub fn get(f: &Fixture, key: &str) -> Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture has no {key}"))
        .clone()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A batch of `labels` (B,) over B blank 2×2 images at positions 0..B, nothing mixed, paired
/// or contrasted: what a loss test needs besides its logits (override fields as needed).
pub fn labelled_batch(labels: Tensor) -> Batch {
    let b = labels.dim(0).unwrap();
    Batch {
        images: Tensor::zeros((b, 3, 2, 2), DType::F32, labels.device()).unwrap(),
        labels,
        mix: None,
        indices: (0..b).collect(),
        paired: None,
        contrast: None,
    }
}

/// A network's output of `logits` alone (its pooled embedding the logits too, no stage
/// features): what a logit-based loss reads.
pub fn logits_only(logits: Tensor) -> ModelOutput {
    ModelOutput {
        pooled: logits.clone(),
        logits,
        feats: vec![],
        preact: vec![],
        aux: vec![],
        branches: vec![],
        gated: None,
    }
}

/// A multi-branch network's output of no stage features: `logits[0]` and `pooled[0]` its own
/// branch, the rest its extra branches (override `feats` as needed).
pub fn with_branches(logits: Vec<Tensor>, pooled: Vec<Tensor>) -> ModelOutput {
    assert_eq!(logits.len(), pooled.len());
    let mut each = logits.into_iter().zip(pooled);
    let (own, own_pooled) = each.next().expect("at least the network's own branch");
    ModelOutput {
        logits: own,
        feats: vec![],
        pooled: own_pooled,
        preact: vec![],
        aux: vec![],
        branches: each
            .map(|(logits, pooled)| kd_models::AuxOutput { logits, pooled })
            .collect(),
        gated: None,
    }
}

/// `method`'s terms for `student` alone on a batch of `labels` at `epoch` (0-based, of a long
/// run): what a loss fixture's case computes.
pub fn terms_at(
    method: &dyn Distiller,
    epoch: usize,
    labels: Tensor,
    student: &ModelOutput,
) -> LossTerms {
    let ctx = StepContext {
        epoch,
        step: 0,
        total_steps: 1,
        epochs: 1000,
    };
    method
        .loss(&ctx, &labelled_batch(labels), &Outputs::student(student))
        .unwrap()
}

/// The error `method` gives for `student` alone on a batch of two images (labels 0 and 1).
pub fn refusal(method: &dyn Distiller, student: &ModelOutput) -> String {
    let batch = labelled_batch(Tensor::new(&[0u32, 1], student.logits.device()).unwrap());
    method
        .loss(&StepContext::one_step(), &batch, &Outputs::student(student))
        .expect_err("the method refuses this student")
        .to_string()
}

/// Asserts `terms` are named `names`, in order, and each equals the fixture's value `want(name)`
/// within 2e-5 of it (+ 1e-7): an f32 loss against PyTorch's f64.
pub fn assert_terms(terms: &LossTerms, names: &[&str], want: impl Fn(&str) -> Tensor, case: &str) {
    let got: Vec<&str> = terms.terms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, names, "{case}");
    for (name, value) in &terms.terms {
        let (got, want) = (scalar(value), scalar(&want(name)));
        assert!(
            (got - want).abs() <= 2e-5 * want.abs() + 1e-7,
            "{case} {name}: {got} vs {want}"
        );
    }
}

/// The first element, as f64.
pub fn scalar(t: &Tensor) -> f64 {
    flat(t)[0]
}

/// Largest |a − b| over the largest |b|; `a` must be finite (`f64::max` would skip a NaN).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite values: {a:?}");
    let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The distillation terms (every term but `loss_ce`), summed, of `method`'s step on two images
/// whose student logits are the teacher's scaled by 10 and shifted by 3: the teacher's
/// relations at another scale.
pub fn distillation_of_a_scaled_copy(method: &dyn Distiller) -> f32 {
    let dev = Device::Cpu;
    let t = Tensor::new(&[[1f32, -0.5, 2.0, 0.0], [0.3, 0.1, -1.0, 1.5]], &dev).unwrap();
    let s = ((&t * 10.0).unwrap() + 3.0).unwrap();
    let (student, teacher) = (logits_only(s), logits_only(t));
    let batch = labelled_batch(Tensor::new(&[2u32, 3], &dev).unwrap());
    let ctx = StepContext::one_step();
    let out = Outputs {
        student: &student,
        teacher: Some(&teacher),
        peers: &[],
        paired: None,
        member: 0,
    };
    method
        .loss(&ctx, &batch, &out)
        .unwrap()
        .terms
        .iter()
        .filter(|(name, _)| name != "loss_ce")
        .map(|(_, v)| v.to_scalar::<f32>().unwrap())
        .sum()
}
