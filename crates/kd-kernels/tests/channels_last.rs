//! The channels-last ops against the channels-first ones on the same values: the convolution
//! (forward, input and kernel gradients), the training-mode BatchNorm (output, statistics,
//! running statistics, gradients), the residual tail, eval mode, and the max-pool. On the CPU the
//! channels-last ops run the channels-first bodies between transposes, so this checks their
//! wiring (dimensions, shapes, which operand is transposed, the backward's outputs); the CUDA
//! kernels are checked against these paths in the emulator (`emulated_kernels.rs`) and on a GPU
//! (`kd-runner selfcheck`).
use candle_core::{DType, Device, Tensor, Var};
use kd_kernels::{
    batch_norm_eval, batch_norm_eval_add_relu, batch_norm_eval_add_relu_nhwc, batch_norm_eval_nhwc,
    batch_norm_train_add_relu, batch_norm_train_add_relu_nhwc, batch_norm_train_nhwc,
    batch_norm_train_update, conv2d_custom, conv2d_nhwc, to_channels_first, to_channels_last,
    Conv2dGeometry, MaxPool2d, MemoryFormat, RunningStats,
};
use kd_testkit::max_abs_diff;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A channels-first tensor's channels-last twin, contiguous, as a variable.
fn last_var(t: &Tensor) -> Var {
    Var::from_tensor(&to_channels_last(t).unwrap().contiguous().unwrap()).unwrap()
}

/// Largest |a − b| with `a` channels-last and `b` channels-first.
fn diff_last(a: &Tensor, b: &Tensor) -> f64 {
    let a = to_channels_first(a).unwrap();
    assert_eq!(a.dims(), b.dims());
    max_abs_diff(&a, b)
}

/// Σ y·r, the scalar whose gradients the tests compare (r channels-first; for a channels-last
/// y, permuted to match).
fn weighted_sum(y: &Tensor, r: &Tensor, format: MemoryFormat) -> Tensor {
    let r = match format {
        MemoryFormat::ChannelsFirst => r.clone(),
        MemoryFormat::ChannelsLast => to_channels_last(r).unwrap(),
    };
    (y.to_dtype(DType::F32).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn memory_formats_name_their_dimensions() {
    let last = MemoryFormat::ChannelsLast;
    assert_eq!(last.nchw(&[2, 5, 7, 3]).unwrap(), [2, 3, 5, 7]);
    assert_eq!(last.dims_of([2, 3, 5, 7]), [2, 5, 7, 3]);
    assert_eq!(last.n_c_hw(&[2, 5, 7, 3]).unwrap(), (2, 3, 35));
    assert_eq!(last.channel_axis(), 3);
    let first = MemoryFormat::ChannelsFirst;
    assert_eq!(first.nchw(&[2, 3, 5, 7]).unwrap(), [2, 3, 5, 7]);
    assert_eq!(MemoryFormat::default(), first);
    for f in MemoryFormat::ALL {
        assert_eq!(f.as_str().parse::<MemoryFormat>().unwrap(), f);
    }
    let err = "nhwc".parse::<MemoryFormat>().unwrap_err();
    assert!(
        err.contains("\"nhwc\"") && err.contains("channels-last"),
        "{err}"
    );
    let err = last.nchw(&[2, 3, 5]).unwrap_err().to_string();
    assert!(
        err.contains("ChannelsLast") && err.contains("[2, 3, 5]"),
        "{err}"
    );
}

#[test]
fn channels_last_convolution_matches_channels_first_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // (N, C, H, W, K, kernel, stride, padding): a 3×3 stem, a strided 3×3, a 1×1 shortcut.
    for (n, c, h, w, k, ks, stride, padding) in [
        (2, 3, 8, 8, 4, 3, 1, 1),
        (2, 5, 9, 7, 6, 3, 2, 1),
        (3, 4, 6, 6, 8, 1, 2, 0),
    ] {
        let g = Conv2dGeometry { stride, padding };
        let x = Var::from_tensor(&randn(&mut rng, &[n, c, h, w], -1.0, 1.0)).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[k, c, ks, ks], -1.0, 1.0)).unwrap();
        let y = conv2d_custom(&x, &wt, g).unwrap();
        let r = randn(&mut rng, y.dims(), -1.0, 1.0);
        let grads = weighted_sum(&y, &r, MemoryFormat::ChannelsFirst)
            .backward()
            .unwrap();

        let (xl, wl) = (last_var(&x), last_var(&wt));
        let what = format!("{:?}", (n, c, h, w, k, ks, stride, padding));
        // The op itself, and the public function (on the CPU the channels-first op between
        // permutes).
        for yl in [
            kd_kernels::conv::conv2d_custom_in(&xl, &wl, g, MemoryFormat::ChannelsLast).unwrap(),
            conv2d_nhwc(&xl, &wl, g).unwrap(),
        ] {
            assert_eq!(
                yl.dims(),
                MemoryFormat::ChannelsLast.dims_of(y.dims4().unwrap().into()),
                "{what}"
            );
            assert!(diff_last(&yl, &y) < 1e-6, "y {what}");
            let gl = weighted_sum(&yl, &r, MemoryFormat::ChannelsLast)
                .backward()
                .unwrap();
            let dx = diff_last(gl.get(&xl).unwrap(), grads.get(&x).unwrap());
            let dw = diff_last(gl.get(&wl).unwrap(), grads.get(&wt).unwrap());
            assert!(dx < 1e-5 && dw < 1e-5, "{what}: dx {dx}, dw {dw}");
        }
    }
}

#[test]
fn channels_last_max_pool_matches_channels_first_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let stem = MaxPool2d::RESNET_STEM;
    let unpadded = MaxPool2d {
        kernel: 2,
        stride: 2,
        padding: 0,
    };
    for (pool, (n, c, h, w)) in [
        (stem, (2, 3, 8, 8)),
        (stem, (1, 5, 7, 6)),
        (unpadded, (2, 4, 6, 6)),
    ] {
        // Ties (a ReLU's zeros) make the first-maximum rule matter for the gradient.
        let v: Vec<f32> = (0..n * c * h * w)
            .map(|_| rng.gen_range(0..3) as f32 * 0.5)
            .collect();
        let x = Var::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
        let y = pool.forward(&x).unwrap();
        let r = randn(&mut rng, y.dims(), -1.0, 1.0);
        let grads = weighted_sum(&y, &r, MemoryFormat::ChannelsFirst)
            .backward()
            .unwrap();
        let xl = last_var(&x);
        let yl = pool.forward_nhwc(&xl).unwrap();
        let what = format!("{pool:?} {:?}", (n, c, h, w));
        assert_eq!(
            yl.dims(),
            MemoryFormat::ChannelsLast.dims_of(y.dims4().unwrap().into()),
            "{what}"
        );
        assert_eq!(diff_last(&yl, &y), 0.0, "y {what}");
        let gl = weighted_sum(&yl, &r, MemoryFormat::ChannelsLast)
            .backward()
            .unwrap();
        let dx = diff_last(gl.get(&xl).unwrap(), grads.get(&x).unwrap());
        assert_eq!(dx, 0.0, "dx {what}");
    }
}

/// A layer's γ, β and running statistics (all (C,), the running ones variables).
fn bn_params(rng: &mut ChaCha8Rng, c: usize) -> (Var, Var, Var, Var) {
    (
        Var::from_tensor(&randn(rng, &[c], 0.5, 1.5)).unwrap(),
        Var::from_tensor(&randn(rng, &[c], -0.5, 0.5)).unwrap(),
        Var::from_tensor(&randn(rng, &[c], -0.2, 0.2)).unwrap(),
        Var::from_tensor(&randn(rng, &[c], 0.8, 1.2)).unwrap(),
    )
}

#[test]
fn channels_last_batch_norm_trains_like_channels_first() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let eps = 1e-5;
    for (n, c, h, w) in [(3, 5, 4, 6), (2, 40, 3, 3), (4, 2, 1, 1)] {
        for (relu, tail) in [(false, false), (true, false), (true, true)] {
            // Channel means and spreads apart, as a network's.
            let x = randn(&mut rng, &[n, c, h, w], -1.0, 1.0)
                .broadcast_mul(&randn(&mut rng, &[1, c, 1, 1], 0.5, 3.0))
                .unwrap()
                .broadcast_add(&randn(&mut rng, &[1, c, 1, 1], -2.0, 2.0))
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let res = Var::from_tensor(&randn(&mut rng, &[n, c, h, w], -1.5, 1.5)).unwrap();
            let (gamma, beta, mean, var) = bn_params(&mut rng, c);
            let (mean_l, var_l) = (
                Var::from_tensor(&mean.copy().unwrap()).unwrap(),
                Var::from_tensor(&var.copy().unwrap()).unwrap(),
            );
            let running = |m, v| RunningStats {
                mean: m,
                var: v,
                momentum: 0.1,
            };
            let r = randn(&mut rng, &[n, c, h, w], -1.0, 1.0);
            let first = match tail {
                false => {
                    batch_norm_train_update(&x, &gamma, &beta, eps, relu, running(&mean, &var))
                }
                true => batch_norm_train_add_relu(
                    &x,
                    &gamma,
                    &beta,
                    &res,
                    eps,
                    Some(running(&mean, &var)),
                ),
            }
            .unwrap();
            let grads = weighted_sum(&first.y, &r, MemoryFormat::ChannelsFirst)
                .backward()
                .unwrap();

            let (xl, rl) = (last_var(&x), last_var(&res));
            let last = match tail {
                false => batch_norm_train_nhwc(
                    &xl,
                    &gamma,
                    &beta,
                    eps,
                    relu,
                    Some(running(&mean_l, &var_l)),
                ),
                true => batch_norm_train_add_relu_nhwc(
                    &xl,
                    &gamma,
                    &beta,
                    &rl,
                    eps,
                    Some(running(&mean_l, &var_l)),
                ),
            }
            .unwrap();
            let what = format!("{:?} relu={relu} tail={tail}", (n, c, h, w));
            assert_eq!(last.y.dims(), [n, h, w, c], "{what}");
            assert!(diff_last(&last.y, &first.y) < 1e-6, "y {what}");
            assert!(
                max_abs_diff(&last.stats, &first.stats) < 1e-6,
                "stats {what}"
            );
            assert!(
                max_abs_diff(&mean_l, &mean) < 1e-7 && max_abs_diff(&var_l, &var) < 1e-6,
                "running {what}"
            );
            let gl = weighted_sum(&last.y, &r, MemoryFormat::ChannelsLast)
                .backward()
                .unwrap();
            let dx = diff_last(gl.get(&xl).unwrap(), grads.get(&x).unwrap());
            assert!(dx < 1e-5, "dx {what}: {dx}");
            for (name, p) in [("γ", &gamma), ("β", &beta)] {
                let d = max_abs_diff(gl.get(p).unwrap(), grads.get(p).unwrap());
                assert!(d < 1e-4, "d{name} {what}: {d}");
            }
            if tail {
                let dr = diff_last(gl.get(&rl).unwrap(), grads.get(&res).unwrap());
                assert!(dr < 1e-6, "shortcut gradient {what}: {dr}");
            }
        }
    }
}

#[test]
fn channels_last_batch_norm_evaluates_like_channels_first() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let eps = 1e-5;
    let (n, c, h, w) = (3, 6, 4, 5);
    let (gamma, beta, mean, var) = bn_params(&mut rng, c);
    let x = randn(&mut rng, &[n, c, h, w], -2.0, 2.0);
    let res = randn(&mut rng, &[n, c, h, w], -1.0, 1.0);
    let (xl, rl) = (
        to_channels_last(&x).unwrap(),
        to_channels_last(&res).unwrap(),
    );
    // Constants (a frozen teacher) and variables γ, β (a trainable network evaluated).
    let constants = [gamma.detach(), beta.detach()];
    for (name, [g, b]) in [
        ("frozen", constants),
        (
            "trainable",
            [gamma.as_tensor().clone(), beta.as_tensor().clone()],
        ),
    ] {
        for relu in [false, true] {
            let want = batch_norm_eval(&x, &g, &b, &mean, &var, eps, relu).unwrap();
            let got = batch_norm_eval_nhwc(&xl, &g, &b, &mean, &var, eps, relu).unwrap();
            assert_eq!(got.dims(), [n, h, w, c]);
            assert!(diff_last(&got, &want) < 1e-6, "{name} relu={relu}");
        }
        let want = batch_norm_eval_add_relu(&x, &g, &b, &mean, &var, eps, &res).unwrap();
        let got = batch_norm_eval_add_relu_nhwc(&xl, &g, &b, &mean, &var, eps, &rl).unwrap();
        assert!(diff_last(&got, &want) < 1e-6, "{name} tail");
    }
}

#[test]
fn channels_last_ops_refuse_channels_first_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (gamma, beta, _, _) = bn_params(&mut rng, 3);
    // A (2, 3, 4, 4) tensor read as channels-last has 4 channels, not γ's 3.
    let x = randn(&mut rng, &[2, 3, 4, 4], -1.0, 1.0);
    let err = batch_norm_train_nhwc(&x, &gamma, &beta, 1e-5, false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 channels"), "{err}");
    let w = randn(&mut rng, &[5, 3, 3, 3], -1.0, 1.0);
    let g = Conv2dGeometry {
        stride: 1,
        padding: 1,
    };
    let err = kd_kernels::conv::conv2d_custom_in(&x, &w, g, MemoryFormat::ChannelsLast)
        .unwrap_err()
        .to_string();
    assert!(err.contains("channels"), "{err}");
}
