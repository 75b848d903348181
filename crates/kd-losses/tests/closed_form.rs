//! Losses against hand-computed values.
use candle_core::{Device, Tensor, Var};
use kd_losses::{cross_entropy, kd_loss, mixed_cross_entropy};

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn log_softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = v.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|x| x - z).collect()
}

#[test]
fn cross_entropy_with_and_without_smoothing() {
    let logits = t(&[1.0, 2.0, 0.5]);
    let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let lp = log_softmax(&[1.0, 2.0, 0.5]);
    let plain = cross_entropy(&logits, &labels, 0.0).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((plain + lp[1]).abs() < 1e-6);
    // torch.nn.functional.cross_entropy(x, y, label_smoothing=0.1)
    let smooth = cross_entropy(&logits, &labels, 0.1).unwrap().to_scalar::<f32>().unwrap() as f64;
    let expect = 0.9 * -lp[1] + 0.1 * -(lp.iter().sum::<f64>() / 3.0);
    assert!((smooth - expect).abs() < 1e-6);
    let mixed = mixed_cross_entropy(&logits, &labels, &Tensor::new(&[2u32], &Device::Cpu).unwrap(), 0.7, 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((mixed - (0.7 * -lp[1] + 0.3 * -lp[2])).abs() < 1e-6);
}

#[test]
fn kd_loss_direction_temperature_and_identity() {
    // Identical logits → 0.
    let a = t(&[0.3, -1.0, 2.0]);
    assert!(kd_loss(&a, &a, 4.0).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6);
    // Hand-computed 3-class example at T = 4: T² · Σ p_t (log p_t − log p_s).
    let (s, te) = ([1.0, 2.0, 3.0], [3.0, 1.0, 0.0]);
    let lt = log_softmax(&te.map(|x: f64| x / 4.0));
    let ls = log_softmax(&s.map(|x: f64| x / 4.0));
    let kl: f64 = (0..3).map(|k| lt[k].exp() * (lt[k] - ls[k])).sum();
    let got = kd_loss(&t(&[1.0, 2.0, 3.0]), &t(&[3.0, 1.0, 0.0]), 4.0).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((got - 16.0 * kl).abs() < 1e-5, "{got} vs {}", 16.0 * kl);
    // The reverse direction KL(student ‖ teacher) is a different number: the order matters.
    let reverse: f64 = (0..3).map(|k| ls[k].exp() * (ls[k] - lt[k])).sum();
    assert!((16.0 * reverse - got).abs() > 1e-3);
    // No gradient reaches the teacher.
    let teacher = Var::new(&[[3.0f32, 1.0, 0.0]], &Device::Cpu).unwrap();
    let student = Var::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
    let g = kd_loss(student.as_tensor(), teacher.as_tensor(), 4.0).unwrap().backward().unwrap();
    assert!(g.get(teacher.as_tensor()).is_none());
    assert!(g.get(student.as_tensor()).is_some());
}
