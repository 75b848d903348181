//! NKD and USKD against the authors' losses as PyTorch computes them
//! (`tests/fixtures/nkd.safetensors`, made by `tools/fixtures/make_nkd_fixtures.py`): each term,
//! USKD's Zipf labels, and the gradients with respect to the logits (and USKD's weak head's), in
//! f64 and f32. And the terms in closed form where they have one.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use kd_losses::{nkd_terms, uskd_terms, zipf_labels};
use kd_testkit::{max_abs_diff, values};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/nkd.safetensors"
    );
    kd_testkit::load_fixture(Path::new(path), "tools/fixtures/make_nkd_fixtures.py")
}

fn scalar(t: &Tensor) -> f64 {
    values(t)[0]
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn nkd_matches_the_authors_loss_in_pytorch() {
    let f = fixtures();
    let mut cases = 0;
    for i in 0.. {
        let p = |k: &str| f.get(&format!("nkd.{i}.{k}")).cloned();
        let Some(student) = p("student") else { break };
        cases += 1;
        let get = |k: &str| p(k).unwrap();
        let labels = get("labels").to_dtype(DType::U32).unwrap();
        let params = values(&get("params"));
        let (t, gamma) = (params[0], params[1]);
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
            let s = Var::from_tensor(&student.to_dtype(dtype).unwrap()).unwrap();
            let teacher = get("teacher").to_dtype(dtype).unwrap();
            let terms = nkd_terms(s.as_tensor(), &teacher, &labels, t).unwrap();
            let what = format!("nkd case {i} {dtype:?}");
            assert_close(scalar(&terms.target), scalar(&get("target")), tol, &what);
            let non = (terms.non_target * gamma).unwrap();
            assert_close(scalar(&non), scalar(&get("non")), tol, &what);
            let grads = (terms.target + non).unwrap().backward().unwrap();
            let e = max_abs_diff(grads.get(s.as_tensor()).unwrap(), &get("grad"));
            assert!(e < tol, "{what}: gradient off by {e:.2e}");
        }
    }
    assert_eq!(cases, 3);
}

#[test]
fn uskd_matches_the_authors_loss_in_pytorch() {
    let f = fixtures();
    let mut cases = 0;
    for i in 0.. {
        let p = |k: &str| f.get(&format!("uskd.{i}.{k}")).cloned();
        let Some(logits) = p("logits") else { break };
        cases += 1;
        let get = |k: &str| p(k).unwrap();
        let labels = get("labels").to_dtype(DType::U32).unwrap();
        let params = values(&get("params"));
        let (alpha, beta, mu) = (params[0], params[1], params[2]);
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
            let z = Var::from_tensor(&logits.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&get("weak").to_dtype(dtype).unwrap()).unwrap();
            let terms = uskd_terms(z.as_tensor(), w.as_tensor(), &labels).unwrap();
            let what = format!("uskd case {i} {dtype:?}");
            assert_close(scalar(&terms.target), scalar(&get("target")), tol, &what);
            assert_close(scalar(&terms.non_target), scalar(&get("non")), tol, &what);
            let weak = (terms.weak * mu).unwrap();
            assert_close(scalar(&weak), scalar(&get("weak_loss")), tol, &what);
            let total =
                ((terms.target * alpha).unwrap() + (terms.non_target * beta).unwrap() + weak)
                    .unwrap();
            let grads = total.backward().unwrap();
            let e = max_abs_diff(grads.get(z.as_tensor()).unwrap(), &get("grad"));
            assert!(e < tol, "{what}: gradient off by {e:.2e}");
            let e = max_abs_diff(grads.get(w.as_tensor()).unwrap(), &get("grad_weak"));
            assert!(e < tol, "{what}: weak head's gradient off by {e:.2e}");
        }
    }
    assert_eq!(cases, 3);
}

/// The ranking as the code computes it (`make_nkd_fixtures.py`), checked through the Zipf labels
/// PyTorch drew from it: each non-target class gets 1/(1 + its place), normalised.
#[test]
fn uskd_ranks_the_classes_as_the_authors_code() {
    let f = fixtures();
    for i in 0..3 {
        let get = |k: &str| f[&format!("uskd.{i}.{k}")].clone();
        let (z, w) = (get("logits"), get("weak"));
        let labels = get("labels").to_dtype(DType::U32).unwrap();
        let k = z.dim(1).unwrap();
        let mask = kd_losses::one_hot(&labels, k, DType::F64).unwrap();
        let log_s = candle_nn::ops::log_softmax(&z, 1).unwrap();
        let p_w = candle_nn::ops::softmax(&w, 1).unwrap();
        let at = |x: &Tensor| (x * &mask).unwrap().sum_keepdim(1).unwrap();
        let score = (p_w
            .broadcast_div(&((1.0 - at(&p_w)).unwrap() + 1e-6).unwrap())
            .unwrap()
            + log_s
                .broadcast_div(&((1.0 - at(&log_s)).unwrap() + 1e-6).unwrap())
                .unwrap())
        .unwrap();
        let zipf = (zipf_labels(&score).unwrap() * (1.0 - &mask).unwrap()).unwrap();
        let zipf = zipf.broadcast_div(&zipf.sum_keepdim(1).unwrap()).unwrap();
        assert!(max_abs_diff(&zipf, &get("zipf")) < 1e-12, "case {i}");
    }
}

/// Zipf's law over a ranking: the highest score gets 1, the next 1/2, and so on, whatever the
/// columns' order.
#[test]
fn zipf_labels_follow_the_ranking() {
    let scores = Tensor::new(
        &[[0.1f32, 3.0, -2.0, 0.5], [4.0, 3.0, 2.0, 1.0]],
        &Device::Cpu,
    )
    .unwrap();
    let z = zipf_labels(&scores).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(z[0], [1.0 / 3.0, 1.0, 1.0 / 4.0, 1.0 / 2.0]);
    assert_eq!(z[1], [1.0, 1.0 / 2.0, 1.0 / 3.0, 1.0 / 4.0]);
}

/// NKD in closed form: a student equal to its teacher leaves the non-target term at the
/// teacher's own entropy among the other classes, T²·H(q_t); with two classes there is one
/// other class, so it is 0, and the target term is −p·log p of the shared target probability.
#[test]
fn nkd_in_closed_form() {
    let dev = Device::Cpu;
    let z = Tensor::new(&[[2.0f64, -1.0]], &dev).unwrap();
    let labels = Tensor::new(&[0u32], &dev).unwrap();
    let terms = nkd_terms(&z, &z, &labels, 4.0).unwrap();
    let p = 1.0 / (1.0 + (-3.0f64).exp());
    assert!((scalar(&terms.target) + p * p.ln()).abs() < 1e-12);
    assert!(scalar(&terms.non_target).abs() < 1e-9);
    // Three classes, uniform among the two others on both sides: H = ln 2, times T² = 4.
    let z = Tensor::new(&[[1.0f64, 5.0, 5.0]], &dev).unwrap();
    let terms = nkd_terms(&z, &z, &labels, 2.0).unwrap();
    assert!((scalar(&terms.non_target) - 4.0 * 2f64.ln()).abs() < 1e-9);
}

/// USKD's target label in closed form: p̃ = p² + 1 − mean(p²), so over a batch the soft labels
/// average to 1; with every image equally confident each is exactly 1 and the term is the
/// cross-entropy.
#[test]
fn uskd_target_label_averages_to_one() {
    let dev = Device::Cpu;
    let z = Tensor::new(&[[3.0f64, 0.0, 1.0], [0.0, 1.0, 3.0]], &dev).unwrap();
    let labels = Tensor::new(&[0u32, 2], &dev).unwrap();
    let terms = uskd_terms(&z, &z, &labels).unwrap();
    let ce = kd_losses::cross_entropy(&z, &labels, 0.0).unwrap();
    assert!((scalar(&terms.target) - scalar(&ce)).abs() < 1e-12);
}
