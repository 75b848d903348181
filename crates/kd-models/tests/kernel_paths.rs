//! The GPU training paths of the models, run on the CPU: the fused BatchNorm against the
//! composed one (outputs, gradients, running statistics), and bf16 mixed precision against f32.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use kd_models::{batch_norm2d, trainable_resnet, Arch, BatchNorm2d, ResNetConfig, Stem};

use kd_testkit::{max_rel, norm_rel, seeded};

/// A BatchNorm2d over 6 channels with fixed, non-trivial parameters and running statistics.
fn six_channel_bn() -> (VarMap, BatchNorm2d) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = batch_norm2d(6, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let v = match name.as_str() {
            "weight" => Tensor::new(&[0.5f32, 1.5, -1.0, 2.0, 0.1, 1.0], &dev),
            "bias" => Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0], &dev),
            "running_mean" => Tensor::new(&[0.2f32; 6], &dev),
            _ => Tensor::new(&[0.9f32; 6], &dev),
        };
        var.set(&v.unwrap()).unwrap();
    }
    (vm, bn)
}

/// The gradients of `grads` for `vars` against those of `want` (max relative error), and the
/// two layers' running statistics.
fn assert_same_training(
    (grads, vm): (&candle_core::backprop::GradStore, &VarMap),
    (want, vm_want): (&candle_core::backprop::GradStore, &VarMap),
    vars: &[(&str, &Var)],
) {
    for (name, v) in vars {
        let e = max_rel(grads.get(v).unwrap(), want.get(v).unwrap(), 1e-12);
        assert!(e < 1e-4, "gradient of {name}: {e}");
    }
    let (da, db) = (vm.data().lock().unwrap(), vm_want.data().lock().unwrap());
    for name in ["weight", "bias"] {
        let e = max_rel(
            grads.get(da[name].as_tensor()).unwrap(),
            want.get(db[name].as_tensor()).unwrap(),
            1e-12,
        );
        assert!(e < 1e-4, "gradient of {name}: {e}");
    }
    for name in ["running_mean", "running_var"] {
        let e = max_rel(da[name].as_tensor(), db[name].as_tensor(), 1e-12);
        assert!(e < 1e-6, "{name}: {e}");
    }
}

#[test]
fn fused_batch_norm_trains_like_the_composed_one() {
    let x = Var::from_tensor(&((seeded(&[4, 6, 5, 5], 1) * 2.0).unwrap() + 0.7).unwrap()).unwrap();
    let r = seeded(&[4, 6, 5, 5], 2);
    for relu in [false, true] {
        // Two layers with identical, non-trivial parameters.
        let make = six_channel_bn;
        let (vm_a, bn_a) = make();
        let (vm_b, bn_b) = make();
        let ya = bn_a.forward_train_fused(&x, relu).unwrap();
        let yb = bn_b.forward_train_composed(&x).unwrap();
        let yb = if relu { yb.relu().unwrap() } else { yb };
        // The layer's own choice is the fused op on the CPU too.
        let (_vm_c, bn_c) = make();
        let yc = if relu {
            bn_c.forward_relu_t(&x, true).unwrap()
        } else {
            bn_c.forward_t(&x, true).unwrap()
        };
        assert_eq!(
            yc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ya.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(max_rel(&ya, &yb, 1e-12) < 1e-5, "relu {relu}");
        let ga = (ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_same_training((&ga, &vm_a), (&gb, &vm_b), &[("x", &x)]);
    }
}

#[test]
fn residual_tail_trains_like_the_composed_one() {
    // relu(bn(x) + shortcut) as the layer's one op against the composed BatchNorm, add and
    // ReLU: output, the gradients of x, the shortcut, γ and β, and the running statistics.
    let x = Var::from_tensor(&((seeded(&[4, 6, 5, 5], 3) * 2.0).unwrap() + 0.7).unwrap()).unwrap();
    let shortcut = Var::from_tensor(&(seeded(&[4, 6, 5, 5], 4) * 1.5).unwrap()).unwrap();
    let dy = seeded(&[4, 6, 5, 5], 5);
    let ((vm_a, bn_a), (vm_b, bn_b)) = (six_channel_bn(), six_channel_bn());
    let ya = bn_a.forward_train_add_relu(&x, &shortcut).unwrap();
    let yb = (bn_b.forward_train_composed(&x).unwrap() + shortcut.as_tensor())
        .unwrap()
        .relu()
        .unwrap();
    assert!(max_rel(&ya, &yb, 1e-12) < 1e-5);
    let ga = (ya * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (yb * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    assert_same_training(
        (&ga, &vm_a),
        (&gb, &vm_b),
        &[("x", &x), ("shortcut", &shortcut)],
    );
}

#[test]
fn bf16_compute_follows_f32_and_trains_f32_weights() {
    let dev = Device::Cpu;
    let x = seeded(&[16, 3, 32, 32], 3);
    for stem in Stem::ALL {
        let cfg = ResNetConfig {
            base_width: 8,
            ..ResNetConfig::new(Arch::Resnet18, stem, 10)
        };
        let (model, _) = trainable_resnet(&cfg, &dev, 3).unwrap();
        let (mut half, vm) = trainable_resnet(&cfg, &dev, 3).unwrap();
        half.set_compute_dtype(DType::BF16).unwrap();
        for train in [true, false] {
            let full = model.forward_t(&x, train).unwrap();
            let mixed = half.forward_t(&x, train).unwrap();
            assert_eq!(mixed.logits.dtype(), DType::F32);
            assert!(mixed.feats.iter().all(|f| f.dtype() == DType::F32));
            // bf16 keeps 8 bits of mantissa: a few per cent through 18 layers (L2 over the batch;
            // single logits may move more).
            let e = norm_rel(&mixed.logits, &full.logits, 0.0);
            assert!(
                e < 0.05,
                "{}: logits differ by {e} (train {train})",
                stem.name()
            );
        }
        let out = half.forward_t(&x, true).unwrap();
        let grads = out
            .logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.contains("running_") {
                assert_eq!(var.dtype(), DType::F32);
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}");
            assert!(g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite());
        }
    }
    let (mut m, _) =
        trainable_resnet(&ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10), &dev, 0).unwrap();
    assert!(m.set_compute_dtype(DType::F16).is_err());
}
