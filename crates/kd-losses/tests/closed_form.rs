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
    let plain = cross_entropy(&logits, &labels, 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((plain + lp[1]).abs() < 1e-6);
    // torch.nn.functional.cross_entropy(x, y, label_smoothing=0.1)
    let smooth = cross_entropy(&logits, &labels, 0.1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let expect = 0.9 * -lp[1] + 0.1 * -(lp.iter().sum::<f64>() / 3.0);
    assert!((smooth - expect).abs() < 1e-6);
    let mixed = mixed_cross_entropy(
        &logits,
        &labels,
        &Tensor::new(&[2u32], &Device::Cpu).unwrap(),
        0.7,
        0.0,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    assert!((mixed - (0.7 * -lp[1] + 0.3 * -lp[2])).abs() < 1e-6);
}

#[test]
fn kd_loss_direction_temperature_and_identity() {
    // Identical logits → 0.
    let a = t(&[0.3, -1.0, 2.0]);
    assert!(
        kd_loss(&a, &a, 4.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .abs()
            < 1e-6
    );
    // Hand-computed 3-class example at T = 4: T² · Σ p_t (log p_t − log p_s).
    let (s, te) = ([1.0, 2.0, 3.0], [3.0, 1.0, 0.0]);
    let lt = log_softmax(&te.map(|x: f64| x / 4.0));
    let ls = log_softmax(&s.map(|x: f64| x / 4.0));
    let kl: f64 = (0..3).map(|k| lt[k].exp() * (lt[k] - ls[k])).sum();
    let got = kd_loss(&t(&[1.0, 2.0, 3.0]), &t(&[3.0, 1.0, 0.0]), 4.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((got - 16.0 * kl).abs() < 1e-5, "{got} vs {}", 16.0 * kl);
    // The reverse direction KL(student ‖ teacher) is a different number: the order matters.
    let reverse: f64 = (0..3).map(|k| ls[k].exp() * (ls[k] - lt[k])).sum();
    assert!((16.0 * reverse - got).abs() > 1e-3);
    // No gradient reaches the teacher.
    let teacher = Var::new(&[[3.0f32, 1.0, 0.0]], &Device::Cpu).unwrap();
    let student = Var::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
    let g = kd_loss(student.as_tensor(), teacher.as_tensor(), 4.0)
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(teacher.as_tensor()).is_none());
    assert!(g.get(student.as_tensor()).is_some());
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() < tol, "{a} vs {b}");
}

fn scalar(t: Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn attention_map_is_normalised_and_loss_by_hand() {
    // One sample, 2 channels, 1×2 map: f² mean over channels = [(1+9)/2, (4+16)/2] = [5, 10];
    // normalised: [5, 10]/√125 = [0.4472136, 0.8944272].
    let f = Tensor::new(&[[[[1.0f32, 2.0]], [[3.0, 4.0]]]], &Device::Cpu).unwrap();
    let a: Vec<f32> = kd_losses::attention_map(&f)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    close(a[0] as f64, 0.4472136, 1e-6);
    close(a[1] as f64, 0.8944272, 1e-6);
    // Against a uniform map [1/√2, 1/√2]: mean of squared differences.
    let g = Tensor::new(&[[[[1.0f32, 1.0]]]], &Device::Cpu).unwrap();
    let u = 1.0 / 2f64.sqrt();
    let expect = ((0.4472136 - u).powi(2) + (0.8944272 - u).powi(2)) / 2.0;
    close(
        scalar(kd_losses::attention_loss(&f, &g).unwrap()),
        expect,
        1e-6,
    );
    // Maps of different resolution are average-pooled to the smaller one: a 2×4 map vs 1×2.
    let big = Tensor::new(
        &[[[[1.0f32, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let small = Tensor::new(&[[[[1.0f32, 2.0]]]], &Device::Cpu).unwrap();
    close(
        scalar(kd_losses::attention_loss(&big, &small).unwrap()),
        0.0,
        1e-7,
    );
}

#[test]
fn rkd_terms_by_hand() {
    // Equilateral triangle vs the same triangle scaled ×3: distance term is scale-invariant → 0;
    // angles are identical → 0.
    let s = Tensor::new(&[[0.0f32, 0.0], [1.0, 0.0], [0.5, 0.8660254]], &Device::Cpu).unwrap();
    let t = (&s * 3.0).unwrap();
    close(
        scalar(kd_losses::rkd_distance_loss(&s, &t).unwrap()),
        0.0,
        1e-6,
    );
    close(
        scalar(kd_losses::rkd_angle_loss(&s, &t).unwrap()),
        0.0,
        1e-6,
    );
    // Student: points 0, 1, 2 on a line (distances 1, 2, 1 → mean 4/3); teacher: equilateral, side 1.
    // Normalised student distances: d01 = d12 = 0.75, d02 = 1.5; teacher all 1.
    // Off-diagonal differences: four of 0.25 and two of 0.5 → smooth-L1 = ½·d² each:
    // (4·0.03125 + 2·0.125) / 9 elements (diagonal zeros included) = 0.375 / 9.
    let line = Tensor::new(&[[0.0f32, 0.0], [1.0, 0.0], [2.0, 0.0]], &Device::Cpu).unwrap();
    close(
        scalar(kd_losses::rkd_distance_loss(&line, &s).unwrap()),
        0.375 / 9.0,
        1e-6,
    );
}

#[test]
fn sp_loss_by_hand() {
    // Orthogonal features: G = I after row normalisation. Identical features: G = all-ones/√2 rows.
    let orth = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
    let same = Tensor::new(&[[1.0f32, 0.0], [1.0, 0.0]], &Device::Cpu).unwrap();
    let r = 1.0 / 2f64.sqrt();
    // ‖I − [[r, r], [r, r]]‖² / 4 = (2(1−r)² + 2r²) / 4
    let expect = (2.0 * (1.0 - r).powi(2) + 2.0 * r * r) / 4.0;
    close(
        scalar(kd_losses::sp_loss(&orth, &same).unwrap()),
        expect,
        1e-6,
    );
    close(scalar(kd_losses::sp_loss(&orth, &orth).unwrap()), 0.0, 1e-7);
}

#[test]
fn gradients_stay_finite_on_degenerate_batches() {
    // Duplicate embeddings (zero distances, zero difference vectors) and all-zero feature maps:
    // every relation and attention loss must give finite gradients, not NaN.
    let e = Var::new(&[[1.0f32, 2.0], [1.0, 2.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[0.5f32, 0.1], [0.2, 0.9], [0.3, 0.3]], &Device::Cpu).unwrap();
    let f = Var::zeros((2, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let ft = Tensor::ones((2, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let losses = [
        kd_losses::rkd_distance_loss(e.as_tensor(), &t).unwrap(),
        kd_losses::rkd_angle_loss(e.as_tensor(), &t).unwrap(),
        kd_losses::sp_loss(f.as_tensor(), &ft).unwrap(),
        kd_losses::attention_loss(f.as_tensor(), &ft).unwrap(),
    ];
    for (i, l) in losses.iter().enumerate() {
        let g = l.backward().unwrap();
        for v in [e.as_tensor(), f.as_tensor()] {
            if let Some(g) = g.get(v) {
                let s = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s.is_finite(), "loss {i}: gradient {s}");
            }
        }
    }
}
