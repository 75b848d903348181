//! The one-op cross-entropy and KD loss (`kd_kernels::softmax_loss`, what `cross_entropy`,
//! `mixed_cross_entropy` and `kd_loss` run on f32 logits) against the same losses composed from
//! candle ops: values and gradients, across batch and class counts around a warp's 32 lanes,
//! label smoothing, mixup weights, temperatures and logits large enough that an unshifted
//! exponential would overflow.
use candle_core::{DType, Device, Tensor, Var};
use kd_losses::{cross_entropy, cross_entropy_composed, kd_loss, kd_loss_composed};
use kd_testkit::max_rel;

/// Deterministic values in [-scale, scale) (xorshift).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

fn logits(b: usize, k: usize, seed: u64, scale: f32) -> Var {
    Var::from_vec(values(b * k, seed, scale), (b, k), &Device::Cpu).unwrap()
}

fn labels(b: usize, k: usize, seed: u64) -> Tensor {
    let v: Vec<u32> = (0..b as u64)
        .map(|i| ((i * 7 + seed * 3) % k as u64) as u32)
        .collect();
    Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
}

const SHAPES: [(usize, usize); 5] = [(1, 1), (4, 10), (16, 33), (3, 100), (40, 7)];

#[test]
fn cross_entropy_matches_the_composed_loss_and_its_gradient() {
    for (b, k) in SHAPES {
        for (scale, smoothing, mix) in [
            (3.0, 0.0, None),
            (3.0, 0.1, None),
            (60.0, 0.0, None),
            (3.0, 0.1, Some(0.3)),
            (3.0, 0.0, Some(1.0)),
        ] {
            let what = format!("B {b} K {k} scale {scale} ε {smoothing} λ {mix:?}");
            let z = logits(b, k, 1, scale);
            let (ya, yb) = (labels(b, k, 1), labels(b, k, 2));
            let (one, composed) = match mix {
                None => (
                    cross_entropy(&z, &ya, smoothing).unwrap(),
                    cross_entropy_composed(&z, &ya, smoothing).unwrap(),
                ),
                Some(l) => (
                    kd_losses::mixed_cross_entropy(&z, &ya, &yb, l, smoothing).unwrap(),
                    ((cross_entropy_composed(&z, &ya, smoothing).unwrap() * l).unwrap()
                        + (cross_entropy_composed(&z, &yb, smoothing).unwrap() * (1.0 - l))
                            .unwrap())
                    .unwrap(),
                ),
            };
            assert_eq!(one.dims(), composed.dims(), "{what}");
            assert!(max_rel(&one, &composed, 1e-12) < 1e-6, "loss, {what}");
            // An upstream gradient other than 1, as a weighted loss term gets.
            let g1 = (one * 0.7).unwrap().backward().unwrap();
            let g2 = (composed * 0.7).unwrap().backward().unwrap();
            let e = max_rel(g1.get(&z).unwrap(), g2.get(&z).unwrap(), 1e-12);
            assert!(e < 1e-5, "gradient {e}, {what}");
        }
    }
}

#[test]
fn kd_loss_matches_the_composed_loss_and_its_gradient() {
    for (b, k) in SHAPES {
        for (scale, t) in [(3.0, 1.0), (3.0, 4.0), (60.0, 4.0), (60.0, 0.5)] {
            let what = format!("B {b} K {k} scale {scale} T {t}");
            let s = logits(b, k, 3, scale);
            let teacher = Var::from_tensor(logits(b, k, 4, scale).as_tensor()).unwrap();
            let one = kd_loss(&s, &teacher, t).unwrap();
            let composed = kd_loss_composed(&s, &teacher, t).unwrap();
            assert_eq!(one.dims(), composed.dims(), "{what}");
            // KL is a difference of nearly equal sums where the two distributions are close:
            // compare against the loss's scale.
            let tol = 1e-6 * (1.0 + composed.to_scalar::<f32>().unwrap().abs());
            let d = (one.to_scalar::<f32>().unwrap() - composed.to_scalar::<f32>().unwrap()).abs();
            assert!(d < tol.max(2e-6 * t as f32 * t as f32), "loss {d}, {what}");
            let g1 = (one * 1.3).unwrap().backward().unwrap();
            let g2 = (composed * 1.3).unwrap().backward().unwrap();
            let e = max_rel(g1.get(&s).unwrap(), g2.get(&s).unwrap(), 1e-12);
            assert!(e < 1e-5, "gradient {e}, {what}");
            // The teacher is detached on both paths.
            assert!(g1.get(&teacher).is_none(), "{what}");
        }
    }
}

#[test]
fn bad_labels_and_logits_are_refused_by_name() {
    let z = logits(2, 3, 5, 1.0);
    let out_of_range = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    let e = cross_entropy(&z, &out_of_range, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 3") && e.contains("3 classes"), "{e}");
    let short = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let e = cross_entropy(&z, &short, 0.0).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("[1]"), "{e}");
    let other = logits(2, 4, 6, 1.0);
    let e = kd_loss(&z, &other, 2.0).unwrap_err().to_string();
    assert!(e.contains("teacher logits") && e.contains("[2, 4]"), "{e}");
    let e = kd_loss(&z, &z, 0.0).unwrap_err().to_string();
    assert!(e.contains("temperature"), "{e}");
    // Other dtypes take the composed path.
    let z64 = z.to_dtype(DType::F64).unwrap();
    let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    assert_eq!(cross_entropy(&z64, &y, 0.0).unwrap().dtype(), DType::F64);
}
