//! Schedules and SGD against values computed independently (closed form and PyTorch by hand).
use candle_core::{Device, Tensor, Var};
use kd_schedulers::{Schedule, Sgd, SgdConfig};

#[test]
fn warmup_cosine_closed_form() {
    let s = Schedule::WarmupCosine {
        warmup_steps: 4,
        final_lr: 0.001,
    };
    assert!((s.lr(0.1, 0, 20) - 0.025).abs() < 1e-12);
    assert!((s.lr(0.1, 3, 20) - 0.1).abs() < 1e-12);
    // Halfway through the cosine part (step 4 + 8 of 16): (base + final) / 2.
    assert!((s.lr(0.1, 12, 20) - 0.0505).abs() < 1e-12);
    assert!((s.lr(0.1, 20, 20) - 0.001).abs() < 1e-12);
    // No warm-up equals torch's CosineAnnealingLR(T_max=total, eta_min=final).
    let c = Schedule::WarmupCosine {
        warmup_steps: 0,
        final_lr: 0.0,
    };
    for step in [0, 7, 33, 50] {
        let expect = 0.05 * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / 50.0).cos());
        assert!((c.lr(0.05, step, 50) - expect).abs() < 1e-12);
    }
}

#[test]
fn multistep_matches_torch() {
    // torch MultiStepLR(milestones=[3, 6], gamma=0.1): 0.1 ×3, 0.01 ×3, 0.001 after.
    let s = Schedule::MultiStep {
        milestones: vec![3, 6],
        gamma: 0.1,
    };
    let lrs: Vec<f64> = (0..8).map(|i| s.lr(0.1, i, 8)).collect();
    for (got, want) in lrs
        .iter()
        .zip([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    {
        assert!((got - want).abs() < 1e-12);
    }
}

fn run_sgd(cfg: SgdConfig, steps: usize) -> Vec<f32> {
    // Loss = sum(p²)/2 · [1, 2] weighting → grad = w ⊙ p.
    let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(vec![("p".into(), p.clone())], cfg);
    for _ in 0..steps {
        let loss = ((p.as_tensor().sqr().unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            * 0.5)
            .unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
    }
    p.as_tensor().to_vec1().unwrap()
}

#[test]
fn sgd_nesterov_weight_decay_by_hand() {
    let cfg = SgdConfig {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
        weight_decay: 0.1,
        no_decay_1d: false,
    };
    // Hand computation of torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    // for p0 = 1, grad = p (weight 1):
    // step 1: g = 1 + 0.1 = 1.1; b = 1.1; g' = 1.1 + 0.99 = 2.09; p = 1 − 0.209 = 0.791
    // step 2: g = 0.791 + 0.0791 = 0.8701; b = 0.99 + 0.8701 = 1.8601; g' = 0.8701 + 1.67409 = 2.54419;
    //         p = 0.791 − 0.254419 = 0.536581
    let p = run_sgd(cfg.clone(), 2);
    assert!((p[0] - 0.536581).abs() < 1e-6, "{p:?}");
    // Plain momentum (no Nesterov), no decay, p0 = −2, grad = 2p:
    // step 1: g = −4; b = −4; p = −2 + 0.4 = −1.6
    // step 2: g = −3.2; b = −3.6 − 3.2 = −6.8; p = −1.6 + 0.68 = −0.92
    let p = run_sgd(
        SgdConfig {
            nesterov: false,
            weight_decay: 0.0,
            ..cfg
        },
        2,
    );
    assert!((p[1] + 0.92).abs() < 1e-6, "{p:?}");
}

#[test]
fn sgd_skips_variables_without_gradient_and_restores_state() {
    let used = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let unused = Var::new(&[5.0f32], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(
        vec![("a".into(), used.clone()), ("b".into(), unused.clone())],
        SgdConfig::default(),
    );
    let grads = used
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.step(&grads, 0.1).unwrap();
    assert_eq!(unused.as_tensor().to_vec1::<f32>().unwrap(), vec![5.0]);
    assert!(opt.state().contains_key("a") && !opt.state().contains_key("b"));
    // Two optimizers, one restored from the other's state, take identical next steps.
    let other = Var::from_tensor(&used.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = Sgd::new(vec![("a".into(), other.clone())], SgdConfig::default());
    opt2.load_state(opt.state().clone()).unwrap();
    let g1 = used
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = other
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.step(&g1, 0.1).unwrap();
    opt2.step(&g2, 0.1).unwrap();
    assert_eq!(
        used.as_tensor().to_vec1::<f32>().unwrap(),
        other.as_tensor().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn adamw_by_hand() {
    use kd_schedulers::{AdamW, AdamWConfig};
    // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), p0 = 1, grad = p.
    // step 1: p ← 1·(1 − 0.01) = 0.99; m = 0.1, v = 0.001; m̂ = 1, v̂ = 1; p ← 0.99 − 0.1 = 0.89
    // step 2: p ← 0.89·0.99 = 0.8811; g = 0.89; m = 0.09 + 0.089 = 0.179; v = 0.000999 + 0.00079210 = 0.00179110;
    //         m̂ = 0.179/0.19 = 0.942105; v̂ = 0.0017911/0.001999 = 0.895998; √v̂ = 0.946572;
    //         p ← 0.8811 − 0.1·0.995289 = 0.781571
    let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![("p".into(), p.clone())],
        AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
    );
    for _ in 0..2 {
        let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
    }
    let v = p.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((v - 0.781571).abs() < 1e-5, "{v}");
    // State round trip: a restored optimizer takes the same next step.
    let q = Var::from_tensor(&p.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = AdamW::new(
        vec![("p".into(), q.clone())],
        AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
    );
    opt2.load_state(opt.state().unwrap()).unwrap();
    for (o, var) in [(&mut opt, &p), (&mut opt2, &q)] {
        let loss = (var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        o.step(&loss.backward().unwrap(), 0.1).unwrap();
    }
    assert_eq!(
        p.as_tensor().to_vec1::<f32>().unwrap(),
        q.as_tensor().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let a = Var::new(&[3.0f32], &Device::Cpu).unwrap();
    let b = Var::new(&[4.0f32], &Device::Cpu).unwrap();
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    // loss = 3a + 4b → gradients (3, 4), norm 5.
    let loss = ((a.as_tensor() * 3.0).unwrap() + (b.as_tensor() * 4.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let mut g = loss.backward().unwrap();
    let norm = kd_schedulers::clip_grad_norm(&mut g, &vars, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    let gb = g.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (ga - 0.6).abs() < 1e-5 && (gb - 0.8).abs() < 1e-5,
        "{ga} {gb}"
    );
}

/// Several steps of a small network-like problem, fused (in-place kernels, forced on the CPU)
/// against the composed update: the same arithmetic in the same order, so bit-identical.
#[test]
fn fused_sgd_equals_the_composed_update() {
    for (nesterov, weight_decay, no_decay_1d, dampening) in [
        (true, 5e-4, false, 0.0),
        (false, 1e-2, true, 0.0),
        (true, 0.0, false, 0.1),
    ] {
        let cfg = SgdConfig {
            momentum: 0.9,
            dampening,
            nesterov,
            weight_decay,
            no_decay_1d,
        };
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let w = Var::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &Device::Cpu).unwrap();
            let a = Var::new(&[0.3f32, -0.2], &Device::Cpu).unwrap();
            let b = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
            let x = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
            // Larger than several of the update's parallel chunks, and not a multiple of one.
            let values: Vec<f32> = (0..100_003).map(|i| (i as f32 * 1e-3).sin()).collect();
            let big = Var::from_vec(values, 100_003, &Device::Cpu).unwrap();
            let vars = vec![
                ("w".into(), w.clone()),
                ("a".into(), a.clone()),
                ("b".into(), b.clone()),
                ("big".into(), big.clone()),
            ];
            let mut opt = Sgd::new(vars, cfg.clone()).with_fused(fused);
            for step in 0..5 {
                // y = W x + a + b: a and b receive the same gradient tensor.
                let y = ((w
                    .as_tensor()
                    .matmul(&x.unsqueeze(1).unwrap())
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
                    + a.as_tensor())
                .unwrap()
                    + b.as_tensor())
                .unwrap();
                let loss = (y.sqr().unwrap().sum_all().unwrap()
                    + (big.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.01).unwrap())
                .unwrap();
                opt.step(&loss.backward().unwrap(), 0.1 / (step + 1) as f64)
                    .unwrap();
            }
            [&w, &a, &b, &big]
                .iter()
                .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        assert_eq!(
            run(true),
            run(false),
            "nesterov {nesterov}, wd {weight_decay}, τ {dampening}"
        );
    }
}

#[test]
fn fused_sgd_after_a_shared_state_load_keeps_optimizers_apart() {
    let p1 = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let p2 = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let mut o1 = Sgd::new(vec![("p".into(), p1.clone())], SgdConfig::default()).with_fused(true);
    let g = p1
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    o1.step(&g, 0.1).unwrap();
    p2.set(p1.as_tensor()).unwrap();
    let mut o2 = Sgd::new(vec![("p".into(), p2.clone())], SgdConfig::default()).with_fused(true);
    o2.load_state(o1.state().clone()).unwrap();
    for (o, p) in [(&mut o1, &p1), (&mut o2, &p2)] {
        let g = p
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        o.step(&g, 0.1).unwrap();
    }
    // Had the two shared a buffer, the second step would have used the first's update.
    assert_eq!(
        p1.as_tensor().to_vec1::<f32>().unwrap(),
        p2.as_tensor().to_vec1::<f32>().unwrap()
    );
}
