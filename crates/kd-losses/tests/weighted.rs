//! WSLD, TTM and WTTM against the authors' losses as PyTorch computes them
//! (`tests/fixtures/wsld.safetensors`, made by `tools/fixtures/make_wsld_fixtures.py`): the loss
//! and its gradient in f64 and f32, WSLD with one-hot and λ-mixed labels. And closed forms.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use kd_losses::{ttm_loss, wsld_loss};
use kd_testkit::{max_abs_diff, values};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wsld.safetensors"
    );
    kd_testkit::load_fixture(Path::new(path), "tools/fixtures/make_wsld_fixtures.py")
}

fn scalar(t: &Tensor) -> f64 {
    values(t)[0]
}

/// Every case `{prefix}.{i}.*` of the fixture: `loss(student, get)` against `.loss`, and
/// its gradient with respect to the student's logits against `.grad`, in f64 and f32 (the
/// gradient bound relative to the loss's size). Returns the number of cases.
fn check_cases(prefix: &str, loss: impl Fn(&Tensor, &dyn Fn(&str) -> Tensor) -> Tensor) -> usize {
    let f = fixtures();
    let mut cases = 0;
    for i in 0.. {
        let p = |k: &str| f.get(&format!("{prefix}.{i}.{k}")).cloned();
        let Some(student) = p("student") else { break };
        cases += 1;
        let get = |k: &str| p(k).unwrap();
        let want = scalar(&get("loss"));
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
            let s = Var::from_tensor(&student.to_dtype(dtype).unwrap()).unwrap();
            let value = loss(s.as_tensor(), &|k| get(k).to_dtype(dtype).unwrap());
            let got = scalar(&value);
            let what = format!("{prefix} case {i} {dtype:?}");
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()),
                "{what}: {got} vs {want}"
            );
            let grads = value.backward().unwrap();
            let e = max_abs_diff(grads.get(s.as_tensor()).unwrap(), &get("grad"));
            assert!(
                e < tol * (1.0 + want.abs()),
                "{what}: gradient off by {e:.2e}"
            );
        }
    }
    cases
}

#[test]
fn wsld_matches_the_authors_loss_in_pytorch() {
    let cases = check_cases("wsld", |s, get| {
        let t = values(&get("params"))[0];
        wsld_loss(s, &get("teacher"), &get("target"), t).unwrap()
    });
    assert_eq!(cases, 3);
}

#[test]
fn ttm_and_wttm_match_the_authors_losses_in_pytorch() {
    let cases = check_cases("ttm", |s, get| {
        let params = values(&get("params"));
        ttm_loss(s, &get("teacher"), params[0], params[1] > 0.5).unwrap()
    });
    assert_eq!(cases, 4);
}

/// One image, two classes: the weight is 1 − exp(−CE_s/CE_t) and the loss T² times it times
/// the soft cross-entropy; a student already as sure of the label as the teacher (CE_s = CE_t)
/// weighs 1 − 1/e (but for the code's 1e-7 in the denominator).
#[test]
fn wsld_weight_in_closed_form() {
    let dev = Device::Cpu;
    let z = Tensor::new(&[[2.0f64, 0.0]], &dev).unwrap();
    let y = Tensor::new(&[[1.0f64, 0.0]], &dev).unwrap();
    let t = 3.0;
    let loss = scalar(&wsld_loss(&z, &z, &y, t).unwrap());
    let p = 1.0 / (1.0 + (-2.0f64 / t).exp());
    let soft = -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
    let ce = -(1.0 / (1.0 + (-2.0f64).exp())).ln();
    let want = t * t * (1.0 - (-ce / (ce + 1e-7)).exp()) * soft;
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
    // A student that ranks the label last against a teacher that ranks it first: the ratio
    // CE_s / CE_t is about 95, so the weight is 1 to f64 precision and the loss is the plain
    // soft cross-entropy at T = 1.
    let s = Tensor::new(&[[-6.0f64, 6.0]], &dev).unwrap();
    let loss = scalar(&wsld_loss(&s, &z, &y, 1.0).unwrap());
    let q = 1.0 / (1.0 + (-2.0f64).exp());
    let log_p0 = -(1.0 + 12f64.exp()).ln();
    let log_p1 = -(1.0 + (-12f64).exp()).ln();
    let want = -(q * log_p0 + (1.0 - q) * log_p1);
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
}

/// TTM at γ = 1 is KL(teacher ‖ student) at T = 1; a teacher equal to the student leaves 0 at any
/// γ only when γ = 1; and WTTM's weight U = Σ p^γ is K^(1−γ) for a uniform teacher.
#[test]
fn ttm_in_closed_form() {
    let dev = Device::Cpu;
    let s = Tensor::new(&[[1.0f64, -2.0, 0.5]], &dev).unwrap();
    let t = Tensor::new(&[[0.3f64, 1.0, -1.0]], &dev).unwrap();
    let kd = scalar(&kd_losses::kd_loss(&s, &t, 1.0).unwrap());
    assert!((scalar(&ttm_loss(&s, &t, 1.0, false).unwrap()) - kd).abs() < 1e-12);
    assert!(scalar(&ttm_loss(&s, &s, 1.0, false).unwrap()).abs() < 1e-12);
    assert!(scalar(&ttm_loss(&s, &s, 0.5, false).unwrap()) > 1e-3);
    // A uniform teacher over K = 3: U = 3^(1 − γ), q uniform, so WTTM = U·TTM.
    let flat = Tensor::zeros((1, 3), DType::F64, &dev).unwrap();
    let plain = scalar(&ttm_loss(&s, &flat, 0.25, false).unwrap());
    let weighted = scalar(&ttm_loss(&s, &flat, 0.25, true).unwrap());
    assert!((weighted - 3f64.powf(0.75) * plain).abs() < 1e-12);
}
