//! Each op's CPU path against an independent computation: candle's own conv and autograd,
//! BatchNorm composed from candle ops, hand-computed augmentations.
use candle_core::{DType, Device, Tensor, Var};
use kd_kernels::{
    augment_batch, batch_norm_train, conv2d_custom, AugmentPlan, BatchMix, Conv2dGeometry,
    Normalisation,
};
use kd_testkit::max_rel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn conv_custom_op_matches_candle_conv_and_its_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // (N, C, H, W, O, K, stride, padding): ResNet shapes, odd sizes, 1×1 strided shortcuts.
    let cases = [
        (2, 3, 8, 8, 4, 3, 1, 1),
        (3, 4, 9, 7, 5, 3, 2, 1),
        (2, 6, 8, 8, 8, 1, 2, 0),
        (1, 2, 5, 5, 3, 3, 1, 0),
        (2, 3, 10, 10, 2, 7, 2, 3),
        // Stride 1 takes the flipped-kernel convolution on the CPU: 1×1 (bottleneck), 5×5,
        // non-square images.
        (2, 8, 6, 5, 4, 1, 1, 0),
        (2, 3, 7, 9, 4, 5, 1, 2),
        (1, 4, 6, 9, 3, 3, 1, 2),
    ];
    for dtype in [DType::F32, DType::F64] {
        for &(n, c, h, w, o, k, stride, padding) in &cases {
            let g = Conv2dGeometry { stride, padding };
            let x = Var::from_tensor(&randn(&mut rng, &[n, c, h, w], dtype)).unwrap();
            let wt = Var::from_tensor(&randn(&mut rng, &[o, c, k, k], dtype)).unwrap();
            let y_ref = x.conv2d(&wt, padding, stride, 1, 1).unwrap();
            let y = conv2d_custom(&x, &wt, g).unwrap();
            assert_eq!(
                y.dims(),
                y_ref.dims(),
                "case {:?}",
                (n, c, h, w, o, k, stride, padding)
            );
            assert!(max_rel(&y, &y_ref, 1e-12) < 1e-6);
            // A random linear functional of the output, so every output gradient differs.
            let r = randn(&mut rng, y.dims(), dtype);
            let gr = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gr_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                let (a, b) = (gr.get(v).unwrap(), gr_ref.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                let e = max_rel(a, b, 1e-12);
                assert!(
                    e < 1e-5,
                    "gradient error {e} for {:?} in case {:?}",
                    v.dims(),
                    (n, c, h, w, o, k, stride, padding)
                );
            }
        }
    }
}

#[test]
fn conv_input_gradient_is_skipped_where_nothing_wants_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let g = Conv2dGeometry {
        stride: 1,
        padding: 1,
    };
    // The images: a plain tensor. The kernel: a variable.
    let x = randn(&mut rng, &[2, 3, 6, 6], DType::F32);
    let w = Var::from_tensor(&randn(&mut rng, &[4, 3, 3, 3], DType::F32)).unwrap();
    let y = kd_kernels::conv2d(&x, &w, g).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let w_ref = Var::from_tensor(w.as_tensor()).unwrap();
    let y_ref = x.conv2d(&w_ref, 1, 1, 1, 1).unwrap();
    let g_ref = y_ref.sum_all().unwrap().backward().unwrap();
    assert!(max_rel(grads.get(&w).unwrap(), g_ref.get(&w_ref).unwrap(), 1e-12) < 1e-5);
}

#[test]
fn add_relu_matches_candle_add_and_relu_with_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for dtype in [DType::F32, DType::BF16] {
        let a = Var::from_tensor(&randn(&mut rng, &[3, 4, 5, 6], dtype)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[3, 4, 5, 6], dtype)).unwrap();
        let r = randn(&mut rng, &[3, 4, 5, 6], dtype);
        let y = kd_kernels::add_relu(&a, &b).unwrap();
        let y_ref = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(y.dtype(), dtype);
        assert_eq!(max_rel(&y, &y_ref, 1e-12), 0.0, "{dtype:?}");
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            assert_eq!(
                max_rel(g.get(v).unwrap(), g_ref.get(v).unwrap(), 1e-12),
                0.0
            );
        }
    }
    let e = kd_kernels::add_relu(
        &Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap(),
        &Tensor::zeros((3, 2), DType::F32, &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
}

/// BatchNorm in eval mode element by element in f64: (x − μ)/√(σ² + ε)·γ + β, then max(·, 0).
fn eval_bn_by_definition(x: &Tensor, p: [&Tensor; 4], eps: f64, relu: bool) -> Vec<f64> {
    let (_, c, h, w) = x.dims4().unwrap();
    let f64s = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let [g, b, m, v] = p.map(f64s);
    f64s(x)
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let ch = i / (h * w) % c;
            let y = (e - m[ch]) / (v[ch] + eps).sqrt() * g[ch] + b[ch];
            if relu {
                y.max(0.0)
            } else {
                y
            }
        })
        .collect()
}

#[test]
fn batch_norm_eval_matches_its_definition_and_candles_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let eps = 1e-5;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 8e-3)] {
        for relu in [false, true] {
            // A transposed view as input: the op must read it in its logical order.
            let x = Var::from_tensor(
                &randn(&mut rng, &[3, 6, 5, 4], dtype)
                    .transpose(2, 3)
                    .unwrap(),
            )
            .unwrap();
            let gamma = Var::from_tensor(&randn(&mut rng, &[6], DType::F32)).unwrap();
            let beta = Var::from_tensor(&randn(&mut rng, &[6], DType::F32)).unwrap();
            let mean = randn(&mut rng, &[6], DType::F32);
            let var = (randn(&mut rng, &[6], DType::F32).abs().unwrap() + 0.2).unwrap();
            let y = kd_kernels::batch_norm_eval(&x, &gamma, &beta, &mean, &var, eps, relu).unwrap();
            assert_eq!((y.dims(), y.dtype()), (x.dims(), dtype));
            let want =
                eval_bn_by_definition(x.as_tensor(), [&gamma, &beta, &mean, &var], eps, relu);
            let want = Tensor::from_vec(want, x.dims(), &Device::Cpu).unwrap();
            let err = max_rel(&y, &want, 1e-12);
            assert!(err <= tol, "{dtype:?} relu {relu}: forward off by {err}");

            // Gradients against candle's autograd of the formula, in f32.
            let r = randn(&mut rng, x.dims(), DType::F32);
            let per_channel = |t: &Tensor| t.reshape((1, 6, 1, 1)).unwrap();
            let xf = x.as_tensor().to_dtype(DType::F32).unwrap();
            let y_ref = xf
                .broadcast_sub(&per_channel(&mean))
                .unwrap()
                .broadcast_div(&per_channel(&(&var + eps).unwrap().sqrt().unwrap()))
                .unwrap()
                .broadcast_mul(&per_channel(&gamma))
                .unwrap()
                .broadcast_add(&per_channel(&beta))
                .unwrap();
            let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
            let g = (y.to_dtype(DType::F32).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_ref = (&y_ref * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
                let err = max_rel(g.get(v).unwrap(), g_ref.get(v).unwrap(), 1e-12);
                assert!(err <= tol, "{dtype:?} relu {relu}: d{name} off by {err}");
            }
        }
    }
    let e = kd_kernels::batch_norm_eval(
        &Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        &Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        &Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        1e-5,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("3 channels") && e.contains("running mean is [4]"),
        "{e}"
    );
}

#[test]
fn conv_custom_op_rejects_mismatched_operands() {
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let g = Conv2dGeometry {
        stride: 1,
        padding: 1,
    };
    let e = conv2d_custom(&x, &w, g).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let w = Tensor::zeros((4, 3, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let e = conv2d_custom(&x, &w, g).unwrap_err().to_string();
    assert!(e.contains("F64"), "{e}");
}

/// BatchNorm in training mode composed from candle ops (autograd differentiates through the
/// batch statistics), then ReLU.
fn bn_reference(x: &Tensor, wt: &Tensor, b: &Tensor, eps: f64, relu: bool) -> Tensor {
    let c = wt.dim(0).unwrap();
    let mean = x
        .mean_keepdim(0)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(3)
        .unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc
        .sqr()
        .unwrap()
        .mean_keepdim(0)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(3)
        .unwrap();
    let y = xc
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&wt.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
        .unwrap();
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

#[test]
fn fused_batch_norm_matches_composed_ops_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(n, c, h, w) in &[(4, 3, 5, 5), (2, 8, 4, 4), (8, 2, 1, 1), (3, 5, 7, 3)] {
        for relu in [false, true] {
            // Shifted and scaled input: the statistics must not be near 0 / 1 by accident.
            let x = ((randn(&mut rng, &[n, c, h, w], DType::F32) * 3.0).unwrap() + 1.5).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let wt = Var::from_tensor(&randn(&mut rng, &[c], DType::F32)).unwrap();
            let b = Var::from_tensor(&randn(&mut rng, &[c], DType::F32)).unwrap();
            let out = batch_norm_train(&x, &wt, &b, 1e-5, relu).unwrap();
            let y_ref = bn_reference(&x, &wt, &b, 1e-5, relu);
            assert!(
                max_rel(&out.y, &y_ref, 1e-12) < 1e-5,
                "forward, relu {relu}"
            );
            // Statistics: closed form per channel.
            let xv = x
                .as_tensor()
                .transpose(0, 1)
                .unwrap()
                .flatten_from(1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let mean = xv.mean(1).unwrap();
            let var = xv
                .broadcast_sub(&mean.unsqueeze(1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean(1)
                .unwrap();
            assert!(max_rel(&out.mean, &mean, 1e-12) < 1e-6);
            assert!(max_rel(&out.var, &var, 1e-12) < 1e-6);
            let r = randn(&mut rng, &[n, c, h, w], DType::F32);
            let g = (out.y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &wt), ("bias", &b)] {
                let e = max_rel(g.get(v).unwrap(), g_ref.get(v).unwrap(), 1e-12);
                assert!(
                    e < 1e-4,
                    "gradient of {name}: error {e}, relu {relu}, shape {:?}",
                    (n, c, h, w)
                );
            }
        }
    }
}

#[test]
fn training_tail_matches_composed_ops_forward_and_backward() {
    // relu(bn(x) + r) as one op against candle's composed BatchNorm, add and ReLU: the output,
    // the gradients of x, the shortcut r, γ and β, and the running statistics. Shortcuts large
    // enough that the sum is negative in places where bn(x) alone is not, and the other way.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for &(n, c, h, w) in &[(4, 3, 5, 5), (2, 8, 4, 4), (8, 2, 1, 1), (3, 5, 7, 3)] {
        let x = ((randn(&mut rng, &[n, c, h, w], DType::F32) * 3.0).unwrap() + 1.5).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let r =
            Var::from_tensor(&(randn(&mut rng, &[n, c, h, w], DType::F32) * 2.0).unwrap()).unwrap();
        let wt = Var::from_tensor(&randn(&mut rng, &[c], DType::F32)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[c], DType::F32)).unwrap();
        let zeros = || Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
        let (rm, rv) = (zeros(), (zeros() + 1.0).unwrap());
        let running = kd_kernels::RunningStats {
            mean: &rm,
            var: &rv,
            momentum: 0.1,
        };
        let out =
            kd_kernels::batch_norm_train_add_relu(&x, &wt, &b, &r, 1e-5, Some(running)).unwrap();
        let y_ref = (bn_reference(&x, &wt, &b, 1e-5, false) + r.as_tensor())
            .unwrap()
            .relu()
            .unwrap();
        let what = format!("{:?}", (n, c, h, w));
        assert!(max_rel(&out.y, &y_ref, 1e-12) < 1e-5, "forward {what}");
        // The running statistics as the plain layer's update leaves them.
        let (pm, pv) = (zeros(), (zeros() + 1.0).unwrap());
        let plain_running = kd_kernels::RunningStats {
            mean: &pm,
            var: &pv,
            momentum: 0.1,
        };
        kd_kernels::batch_norm_train_update(&x, &wt, &b, 1e-5, false, plain_running).unwrap();
        assert_eq!(max_rel(&rm, &pm, 1e-12), 0.0, "running mean {what}");
        assert_eq!(max_rel(&rv, &pv, 1e-12), 0.0, "running variance {what}");
        let dy = randn(&mut rng, &[n, c, h, w], DType::F32);
        let g = (out.y * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (y_ref * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("shortcut", &r), ("weight", &wt), ("bias", &b)] {
            let e = max_rel(g.get(v).unwrap(), g_ref.get(v).unwrap(), 1e-12);
            assert!(e < 1e-4, "gradient of {name}: error {e}, shape {what}");
        }
    }
}

#[test]
fn training_tail_refuses_a_residual_of_another_shape() {
    let x = Tensor::ones((2, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let r = Tensor::ones((2, 3, 2, 1), DType::F32, &Device::Cpu).unwrap();
    let e = kd_kernels::batch_norm_train_add_relu(&x, &w, &w, &r, 1e-5, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("residual") && e.contains("[2, 3, 2, 1]"), "{e}");
}

#[test]
fn fused_batch_norm_in_bf16_keeps_f32_statistics() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = ((randn(&mut rng, &[4, 3, 6, 6], DType::F32) * 2.0).unwrap() + 4.0).unwrap();
    let wt = randn(&mut rng, &[3], DType::F32);
    let b = randn(&mut rng, &[3], DType::F32);
    let xb = x.to_dtype(DType::BF16).unwrap();
    let out = batch_norm_train(&xb, &wt, &b, 1e-5, true).unwrap();
    assert_eq!(out.y.dtype(), DType::BF16);
    assert_eq!(out.mean.dtype(), DType::F32);
    // Statistics of the bf16 values, exact in f32; the output within bf16 rounding.
    let reference = bn_reference(&xb.to_dtype(DType::F32).unwrap(), &wt, &b, 1e-5, true);
    assert!(max_rel(&out.y, &reference, 1e-12) < 1e-2);
}

#[test]
fn batch_norm_with_running_update_follows_pytorchs_formula() {
    // r ← 0.9·r + 0.1·s per channel, with the batch mean and the *unbiased* batch variance,
    // both computed here in f64 from the values; y as batch_norm_train's.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (n, c, h, w) = (3, 4, 5, 2);
    let x = ((randn(&mut rng, &[n, c, h, w], DType::F32) * 3.0).unwrap() + 1.0).unwrap();
    let (wt, b) = (
        randn(&mut rng, &[c], DType::F32),
        randn(&mut rng, &[c], DType::F32),
    );
    let mean0: Vec<f32> = (0..c).map(|k| k as f32 * 0.5 - 1.0).collect();
    let var0: Vec<f32> = (0..c).map(|k| 1.0 + k as f32 * 0.25).collect();
    let rm = Tensor::new(mean0.as_slice(), &Device::Cpu).unwrap();
    let rv = Tensor::new(var0.as_slice(), &Device::Cpu).unwrap();
    let running = kd_kernels::RunningStats {
        mean: &rm,
        var: &rv,
        momentum: 0.1,
    };
    let out = kd_kernels::batch_norm_train_update(&x, &wt, &b, 1e-5, true, running).unwrap();
    let plain = batch_norm_train(&x, &wt, &b, 1e-5, true).unwrap();
    assert_eq!(max_rel(&out.y, &plain.y, 1e-12), 0.0);

    let v: Vec<f64> = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = (n * h * w) as f64;
    let (got_mean, got_var) = (rm.to_vec1::<f32>().unwrap(), rv.to_vec1::<f32>().unwrap());
    for ch in 0..c {
        let values: Vec<f64> = (0..n)
            .flat_map(|i| v[(i * c + ch) * h * w..][..h * w].to_vec())
            .collect();
        let mean = values.iter().sum::<f64>() / m;
        let unbiased = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0);
        let want_mean = 0.9 * mean0[ch] as f64 + 0.1 * mean;
        let want_var = 0.9 * var0[ch] as f64 + 0.1 * unbiased;
        assert!(
            (got_mean[ch] as f64 - want_mean).abs() < 1e-5,
            "channel {ch}: running mean {} want {want_mean}",
            got_mean[ch]
        );
        assert!(
            (got_var[ch] as f64 - want_var).abs() < 1e-5 * want_var,
            "channel {ch}: running variance {} want {want_var}",
            got_var[ch]
        );
    }

    // Running statistics of the wrong size are refused by name, and left as they were.
    let short = Tensor::zeros(c - 1, DType::F32, &Device::Cpu).unwrap();
    let before = rm.to_vec1::<f32>().unwrap();
    let bad = kd_kernels::RunningStats {
        mean: &rm,
        var: &short,
        momentum: 0.1,
    };
    let e = kd_kernels::batch_norm_train_update(&x, &wt, &b, 1e-5, true, bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("running variance") && e.contains("(4,)"), "{e}");
    assert_eq!(rm.to_vec1::<f32>().unwrap(), before);
}

#[test]
fn batch_norm_rejects_bad_shapes() {
    let x = Tensor::zeros((1, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let e = batch_norm_train(&x, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than one value"), "{e}");
    let x = Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let e = batch_norm_train(&x, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 channels"), "{e}");
}

#[test]
fn augment_crops_flips_and_normalises_like_the_definition() {
    // Two 1-channel 3×3 images with pixels 0..=8 and 9..=17.
    let px: Vec<u8> = (0..18).collect();
    let images = Tensor::from_vec(px, (2, 1, 3, 3), &Device::Cpu).unwrap();
    let norm = Normalisation::from_mean_std(&[0.0], &[1.0 / 255.0]);
    // scale = 1, shift = 0: outputs are raw pixels.
    let plans = [
        AugmentPlan {
            index: 1,
            oy: 1,
            ox: 1,
            flip: false,
        }, // centre crop = identity
        AugmentPlan {
            index: 0,
            oy: 0,
            ox: 2,
            flip: false,
        }, // shift down 1, left 1
        AugmentPlan {
            index: 0,
            oy: 1,
            ox: 1,
            flip: true,
        }, // mirror
    ];
    let out = augment_batch(&images, &plans, None, 1, &norm, DType::F32).unwrap();
    let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expect: Vec<f32> = [
        [9, 10, 11, 12, 13, 14, 15, 16, 17],
        [0, 0, 0, 1, 2, 0, 4, 5, 0],
        [2, 1, 0, 5, 4, 3, 8, 7, 6],
    ]
    .concat()
    .into_iter()
    .map(|p| p as f32)
    .collect();
    assert_eq!(v, expect);
    // CIFAR normalisation and bf16 output.
    let norm = Normalisation::from_mean_std(&[0.5], &[0.25]);
    let out = augment_batch(&images, &plans[..1], None, 1, &norm, DType::BF16).unwrap();
    let v = out
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, x) in v.iter().enumerate() {
        let want = ((9 + i) as f32 / 255.0 - 0.5) / 0.25;
        assert!((x - want).abs() < 0.02, "{x} vs {want}");
    }
}

#[test]
fn augment_mixes_the_augmented_images_like_the_definition() {
    // The three augmented images of the test above, as raw pixels (scale 1, shift 0).
    let px: Vec<u8> = (0..18).collect();
    let images = Tensor::from_vec(px, (2, 1, 3, 3), &Device::Cpu).unwrap();
    let norm = Normalisation::from_mean_std(&[0.0], &[1.0 / 255.0]);
    let plan = |index, oy, ox, flip| AugmentPlan {
        index,
        oy,
        ox,
        flip,
    };
    let plans = [
        plan(1, 1, 1, false),
        plan(0, 0, 2, false),
        plan(0, 1, 1, true),
    ];
    let augmented: [[f32; 9]; 3] = [
        [9., 10., 11., 12., 13., 14., 15., 16., 17.],
        [0., 0., 0., 1., 2., 0., 4., 5., 0.],
        [2., 1., 0., 5., 4., 3., 8., 7., 6.],
    ];
    let run = |mix: &BatchMix| {
        augment_batch(&images, &plans, Some(mix), 1, &norm, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // Mixup: λ·own + (1 − λ)·partner, the partner's own crop and flip.
    let partner = [2u32, 0, 0];
    let got = run(&BatchMix {
        partner: partner.to_vec(),
        lambda: 0.25,
        cut: None,
    });
    let want: Vec<f32> = (0..3)
        .flat_map(|i| {
            let j = partner[i] as usize;
            (0..9).map(move |k| 0.25 * augmented[i][k] + 0.75 * augmented[j][k])
        })
        .collect();
    assert_eq!(got, want);
    // CutMix: rows 0..2, columns 1..3 from the partner; λ weighs only the labels.
    let partner = [1u32, 2, 2];
    let got = run(&BatchMix {
        partner: partner.to_vec(),
        lambda: 0.5,
        cut: Some([0, 2, 1, 3]),
    });
    let want: Vec<f32> = (0..3)
        .flat_map(|i| {
            (0..9).map(move |k| {
                let (y, x) = (k / 3, k % 3);
                let from = if y < 2 && x >= 1 {
                    partner[i] as usize
                } else {
                    i
                };
                augmented[from][k]
            })
        })
        .collect();
    assert_eq!(got, want);
    // Bad mixes are refused, naming what is wrong.
    let err = |mix: BatchMix| {
        augment_batch(&images, &plans, Some(&mix), 1, &norm, DType::F32)
            .unwrap_err()
            .to_string()
    };
    let e = err(BatchMix {
        partner: vec![0, 1],
        lambda: 0.5,
        cut: None,
    });
    assert!(e.contains("3 plans but the mix has 2 partners"), "{e}");
    let e = err(BatchMix {
        partner: vec![0, 1, 3],
        lambda: 0.5,
        cut: None,
    });
    assert!(e.contains("partner 3 is outside the batch of 3"), "{e}");
    let e = err(BatchMix {
        partner: vec![0, 1, 2],
        lambda: 0.5,
        cut: Some([0, 4, 0, 1]),
    });
    assert!(
        e.contains("rows 0..4, columns 0..1 is not inside 3×3"),
        "{e}"
    );
}

#[test]
fn augment_rejects_plans_outside_the_data() {
    let images = Tensor::zeros((2, 3, 4, 4), DType::U8, &Device::Cpu).unwrap();
    let norm = Normalisation::from_mean_std(&[0.0; 3], &[1.0; 3]);
    let bad = [AugmentPlan {
        index: 2,
        oy: 0,
        ox: 0,
        flip: false,
    }];
    let e = augment_batch(&images, &bad, None, 1, &norm, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside 2 images"), "{e}");
    let bad = [AugmentPlan {
        index: 0,
        oy: 3,
        ox: 0,
        flip: false,
    }];
    assert!(augment_batch(&images, &bad, None, 1, &norm, DType::F32).is_err());
}

#[test]
fn precision_parses_and_names_itself() {
    use kd_kernels::Precision;
    for p in Precision::ALL {
        assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
    }
    assert_eq!(Precision::Bf16.activation_dtype(), DType::BF16);
    let e = "fp16".parse::<Precision>().unwrap_err();
    assert!(e.contains("f32, tf32, bf16"), "{e}");
}

#[test]
fn bf16_conv_accumulates_in_f32_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let g = Conv2dGeometry {
        stride: 2,
        padding: 1,
    };
    let x = randn(&mut rng, &[2, 4, 8, 8], DType::BF16);
    let w = randn(&mut rng, &[3, 4, 3, 3], DType::BF16);
    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
    let y = conv2d_custom(&xv, &wv, g).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // Reference: the same bf16 operands in f32, the result rounded once.
    let (xf, wf) = (
        Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&w.to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let yf = xf.conv2d(&wf, 1, 2, 1, 1).unwrap();
    assert!(max_rel(&y, &yf, 1e-12) < 1e-2);
    let r = randn(&mut rng, y.dims(), DType::F32);
    let gb = (y.to_dtype(DType::F32).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_rel(gb.get(&xv).unwrap(), gf.get(&xf).unwrap(), 1e-12) < 2e-2);
    assert!(max_rel(gb.get(&wv).unwrap(), gf.get(&wf).unwrap(), 1e-12) < 2e-2);
}

/// dx by its definition, scattering every dy·w product: dx[n, c, u·s − p + a, v·s − p + b] +=
/// dy[n, o, u, v]·w[o, c, a, b].
fn input_gradient_by_definition(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    x: [usize; 4],
) -> Tensor {
    let [n, c, h, wd] = x;
    let (o, kh, kw) = (w.dim(0).unwrap(), w.dim(2).unwrap(), w.dim(3).unwrap());
    let (ho, wo) = (dy.dim(2).unwrap(), dy.dim(3).unwrap());
    let dyv: Vec<f64> = dy.flatten_all().unwrap().to_vec1().unwrap();
    let wv: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
    let mut dx = vec![0f64; n * c * h * wd];
    for ni in 0..n {
        for oi in 0..o {
            for u in 0..ho {
                for v in 0..wo {
                    let d = dyv[((ni * o + oi) * ho + u) * wo + v];
                    for ci in 0..c {
                        for a in 0..kh {
                            for b in 0..kw {
                                let i = (u * g.stride + a) as isize - g.padding as isize;
                                let j = (v * g.stride + b) as isize - g.padding as isize;
                                if (0..h as isize).contains(&i) && (0..wd as isize).contains(&j) {
                                    dx[((ni * c + ci) * h + i as usize) * wd + j as usize] +=
                                        d * wv[((oi * c + ci) * kh + a) * kw + b];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(dx, (n, c, h, wd), &Device::Cpu).unwrap()
}

/// A convolution geometry of the sweeps below, with its kernel size and input plane.
#[derive(Clone, Copy, Debug)]
struct Case {
    g: Conv2dGeometry,
    k: usize,
    h: usize,
    w: usize,
}

impl Case {
    fn out(&self) -> (usize, usize) {
        (
            self.g.out_size(self.h, self.k),
            self.g.out_size(self.w, self.k),
        )
    }
}

/// Strides 1–3, kernels 1–5, every padding up to k; planes even and odd, non-square, that the
/// stride does not divide, of more than one 64-pixel block, and barely the kernel's size.
fn every_geometry() -> Vec<Case> {
    let mut cases = Vec::new();
    for stride in 1..=3 {
        for k in 1..=5 {
            for padding in 0..=k {
                for (h, w) in [(8, 8), (7, 9), (11, 13), (k, k + 1)] {
                    if h + 2 * padding >= k && w + 2 * padding >= k {
                        let g = Conv2dGeometry { stride, padding };
                        cases.push(Case { g, k, h, w });
                    }
                }
            }
        }
    }
    assert_eq!(
        cases.len(),
        240,
        "3 strides × 20 (kernel, padding) pairs × 4 planes"
    );
    cases
}

#[test]
fn cpu_input_gradients_match_their_definition_at_every_stride_and_padding() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for c in every_geometry() {
        let dims = [2, 3, c.h, c.w];
        let (ho, wo) = c.out();
        let w = randn(&mut rng, &[4, 3, c.k, c.k], DType::F64);
        let dy = randn(&mut rng, &[2, 4, ho, wo], DType::F64);
        let want = input_gradient_by_definition(&dy, &w, c.g, dims);
        for dx in [
            kd_kernels::conv::backward_data_cpu(&dy, &w, c.g, dims).unwrap(),
            kd_kernels::conv::backward_data_col2im(&dy, &w, c.g, dims).unwrap(),
        ] {
            assert_eq!(dx.dims(), &dims, "{c:?}");
            let e = max_rel(&dx, &want, 1e-12);
            assert!(e < 1e-12, "error {e} at {c:?}");
        }
    }
}

/// dw by its definition: dw[o, c, a, b] = Σ dy[n, o, u, v]·x[n, c, u·s − p + a, v·s − p + b].
fn kernel_gradient_by_definition(x: &Tensor, dy: &Tensor, g: Conv2dGeometry, k: usize) -> Tensor {
    let (n, c, h, wd) = x.dims4().unwrap();
    let (_, o, ho, wo) = dy.dims4().unwrap();
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let dyv: Vec<f64> = dy.flatten_all().unwrap().to_vec1().unwrap();
    let mut dw = vec![0f64; o * c * k * k];
    for ni in 0..n {
        for oi in 0..o {
            for ci in 0..c {
                for a in 0..k {
                    for b in 0..k {
                        let mut acc = 0.0;
                        for u in 0..ho {
                            for v in 0..wo {
                                let i = (u * g.stride + a) as isize - g.padding as isize;
                                let j = (v * g.stride + b) as isize - g.padding as isize;
                                if (0..h as isize).contains(&i) && (0..wd as isize).contains(&j) {
                                    acc += dyv[((ni * o + oi) * ho + u) * wo + v]
                                        * xv[((ni * c + ci) * h + i as usize) * wd + j as usize];
                                }
                            }
                        }
                        dw[((oi * c + ci) * k + a) * k + b] += acc;
                    }
                }
            }
        }
    }
    Tensor::from_vec(dw, (o, c, k, k), &Device::Cpu).unwrap()
}

#[test]
fn cpu_kernel_gradient_matches_its_definition_at_every_stride_and_padding() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for c in every_geometry() {
        let (ho, wo) = c.out();
        let x = randn(&mut rng, &[2, 3, c.h, c.w], DType::F64);
        let dy = randn(&mut rng, &[2, 4, ho, wo], DType::F64);
        let want = kernel_gradient_by_definition(&x, &dy, c.g, c.k);
        let kernel = [4, 3, c.k, c.k];
        let dw = kd_kernels::conv::backward_filter_cpu(&x, &dy, c.g, kernel).unwrap();
        let e = max_rel(&dw, &want, 1e-12);
        assert!(e < 1e-12, "error {e} at {c:?}");
    }
    // Batches whose patch rows exceed the 8 MB budget: the product accumulates chunk by chunk
    // (f32: 3, 3, 3 and 1 images; f64: one at a time), against candle's formula.
    for dtype in [DType::F32, DType::F64] {
        let x = randn(&mut rng, &[10, 64, 32, 32], dtype);
        for (g, o) in
            [(1, 8), (2, 16)].map(|(stride, o)| (Conv2dGeometry { stride, padding: 1 }, o))
        {
            let ho = g.out_size(32, 3);
            let dy = randn(&mut rng, &[10, o, ho, ho], dtype);
            let kernel = [o, 64, 3, 3];
            let dw = kd_kernels::conv::backward_filter_cpu(&x, &dy, g, kernel).unwrap();
            let want = kd_kernels::conv::backward_filter_reference(&x, &dy, g, kernel).unwrap();
            let e = max_rel(&dw, &want, 1e-12);
            assert!(
                e < if dtype == DType::F32 { 1e-5 } else { 1e-12 },
                "error {e} at {g:?} {dtype:?}"
            );
        }
    }
}

#[test]
fn cpu_conv_dispatch_keeps_gradients_where_they_can_flow() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let g = Conv2dGeometry {
        stride: 2,
        padding: 1,
    };
    let xt = randn(&mut rng, &[2, 3, 7, 7], DType::F32);
    let wt = randn(&mut rng, &[4, 3, 3, 3], DType::F32);
    let want = xt.conv2d(&wt, 1, 2, 1, 1).unwrap();
    // Nothing tracked (a frozen teacher): kd's plain convolution.
    assert!(max_rel(&kd_kernels::conv2d(&xt, &wt, g).unwrap(), &want, 1e-12) < 1e-6);
    // Variables: kd's op, whose gradients equal candle's autograd; in f64, candle's conv.
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&xt.to_dtype(dtype).unwrap()).unwrap();
        let w = Var::from_tensor(&wt.to_dtype(dtype).unwrap()).unwrap();
        let y = kd_kernels::conv2d(&x, &w, g).unwrap();
        let y_ref = x.conv2d(&w, 1, 2, 1, 1).unwrap();
        assert!(max_rel(&y, &y_ref, 1e-12) < 1e-6);
        let r = randn(&mut rng, y.dims(), dtype);
        let gr = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_rel(gr.get(v).unwrap(), gr_ref.get(v).unwrap(), 1e-12) < 1e-5);
        }
    }
}

#[test]
fn cpu_forward_convolution_matches_candles() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for c in every_geometry() {
        let x = randn(&mut rng, &[3, 5, c.h, c.w], DType::F64);
        let w = randn(&mut rng, &[4, 5, c.k, c.k], DType::F64);
        let y = kd_kernels::conv::conv2d_cpu(&x, &w, c.g).unwrap();
        let want = x.conv2d(&w, c.g.padding, c.g.stride, 1, 1).unwrap();
        assert_eq!(y.dims(), want.dims());
        let e = max_rel(&y, &want, 1e-12);
        assert!(e < 1e-12, "error {e} at {c:?}");
    }
    // Batches whose patch rows exceed the 8 MB budget go in chunks of images (f32: 3, 3, 3, 1).
    for dtype in [DType::F32, DType::F64] {
        let x = randn(&mut rng, &[10, 64, 32, 32], dtype);
        let w = randn(&mut rng, &[8, 64, 3, 3], dtype);
        let g = Conv2dGeometry {
            stride: 1,
            padding: 1,
        };
        let y = kd_kernels::conv::conv2d_cpu(&x, &w, g).unwrap();
        assert!(max_rel(&y, &x.conv2d(&w, 1, 1, 1, 1).unwrap(), 1e-12) < 1e-5);
    }
    // A non-contiguous input is read through a copy.
    let x = randn(&mut rng, &[2, 3, 6, 7], DType::F64)
        .transpose(2, 3)
        .unwrap();
    let w = randn(&mut rng, &[4, 3, 3, 3], DType::F64);
    let g = Conv2dGeometry {
        stride: 1,
        padding: 1,
    };
    let y = kd_kernels::conv::conv2d_cpu(&x, &w, g).unwrap();
    assert!(max_rel(&y, &x.conv2d(&w, 1, 1, 1, 1).unwrap(), 1e-12) < 1e-12);
}
