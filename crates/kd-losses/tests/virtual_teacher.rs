//! Tf-KD's virtual teacher against the authors' loss as PyTorch computes it
//! (`tests/fixtures/tf_kd_reg.safetensors`, made by `tools/fixtures/make_tf_kd_fixtures.py`):
//! their `nn.KLDivLoss()` averages over the batch and the classes, so kd's per-image KL is K
//! times it; the whole Tf-KD_reg loss `(1 − α)·CE + α·(multiplier/K)·KL` and its gradient too.
//! And the target in closed form.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use kd_losses::{cross_entropy, virtual_teacher_loss, virtual_teacher_probs};
use kd_testkit::{max_abs_diff, values};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tf_kd_reg.safetensors"
    );
    kd_testkit::load_fixture(Path::new(path), "tools/fixtures/make_tf_kd_fixtures.py")
}

#[test]
fn virtual_teacher_matches_the_authors_loss_in_pytorch() {
    let f = fixtures();
    let mut cases = 0;
    for i in 0.. {
        let p = |k: &str| f.get(&format!("tf_kd_reg.{i}.{k}")).cloned();
        let Some(logits) = p("logits") else { break };
        cases += 1;
        let get = |k: &str| p(k).unwrap();
        let labels = get("labels").to_dtype(DType::U32).unwrap();
        let params = values(&get("params"));
        let (a, t, alpha, multiplier) = (params[0], params[1], params[2], params[3]);
        let k = logits.dim(1).unwrap();
        let target = virtual_teacher_probs(&labels, k, a, t, DType::F64).unwrap();
        assert!(max_abs_diff(&target, &get("target")) < 1e-7, "case {i}");
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
            let z = Var::from_tensor(&logits.to_dtype(dtype).unwrap()).unwrap();
            let kl = virtual_teacher_loss(z.as_tensor(), &labels, a, t).unwrap();
            let kldiv = values(&get("kldiv"))[0];
            let ours = values(&kl)[0];
            assert!(
                (ours - k as f64 * kldiv).abs() <= tol * (1.0 + ours.abs()),
                "case {i} {dtype:?}: {ours} vs K · {kldiv}"
            );
            let ce = cross_entropy(z.as_tensor(), &labels, 0.0).unwrap();
            let loss = ((ce * (1.0 - alpha)).unwrap()
                + (kl * (alpha * multiplier / k as f64)).unwrap())
            .unwrap();
            let want = values(&get("loss"))[0];
            let got = values(&loss)[0];
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()),
                "case {i} {dtype:?}: {got} vs {want}"
            );
            let grads = loss.backward().unwrap();
            let grad = grads.get(z.as_tensor()).unwrap();
            assert!(
                max_abs_diff(grad, &get("grad")) < tol,
                "case {i} {dtype:?}: gradient"
            );
        }
    }
    assert_eq!(cases, 3);
}

/// The target in closed form: at a = 0.99, T = 20, K = 10 the softmax of 0.99/20 against nine
/// of (0.01/9)/20; rows sum to 1 and peak at the label. A student that predicts the target
/// exactly has zero loss; one that predicts uniform has KL(target ‖ uniform) = ln K − H(target).
#[test]
fn virtual_teacher_in_closed_form() {
    let labels = Tensor::new(&[3u32, 0], &Device::Cpu).unwrap();
    let target = virtual_teacher_probs(&labels, 10, 0.99, 20.0, DType::F64).unwrap();
    let (hi, lo) = (0.99f64 / 20.0, 0.01f64 / 9.0 / 20.0);
    let top = hi.exp() / (hi.exp() + 9.0 * lo.exp());
    let rest = lo.exp() / (hi.exp() + 9.0 * lo.exp());
    let rows: Vec<Vec<f64>> = target.to_vec2().unwrap();
    for (row, label) in rows.iter().zip([3, 0]) {
        for (c, &v) in row.iter().enumerate() {
            let want = if c == label { top } else { rest };
            assert!((v - want).abs() < 1e-15, "{row:?}");
        }
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let exact = target.log().unwrap();
    let zero = virtual_teacher_loss(&exact, &labels, 0.99, 20.0).unwrap();
    assert!(values(&zero)[0].abs() < 1e-12, "{zero}");
    let uniform = Tensor::zeros((2, 10), DType::F64, &Device::Cpu).unwrap();
    let kl = values(&virtual_teacher_loss(&uniform, &labels, 0.99, 20.0).unwrap())[0];
    let entropy = -(top * top.ln() + 9.0 * rest * rest.ln());
    assert!((kl - (10f64.ln() - entropy)).abs() < 1e-12, "{kl}");
    // Bad settings are named.
    for (a, t, what) in [(0.0, 20.0, "correct_prob"), (0.9, 0.0, "temperature")] {
        let err = virtual_teacher_loss(&uniform, &labels, a, t).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    let one = Tensor::zeros((2, 1), DType::F64, &Device::Cpu).unwrap();
    assert!(virtual_teacher_loss(&one, &labels, 0.9, 2.0).is_err());
}
