//! Golden tests against PyTorch outputs committed in `fixtures/` (made by
//! `tools/fixtures/make_model_fixtures.py`): every architecture × stem, eval and train mode,
//! BN running statistics, the import path (DataParallel `module.` keys, nested `state_dict`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use kd_models::{
    import_checkpoint, load_frozen, load_into, trainable_resnet, Arch, MaxPool2d, ModelError,
    ResNetConfig, Stem,
};
use kd_testkit::{max_abs_diff, max_rel};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tiny(arch: Arch, stem: Stem) -> ResNetConfig {
    let base_width = if arch == Arch::Resnet18 { 8 } else { 4 };
    ResNetConfig {
        base_width,
        ..ResNetConfig::new(arch, stem, 10)
    }
}

fn reference(arch: Arch, stem: Stem) -> HashMap<String, Tensor> {
    let name = format!("{}_{}.safetensors", arch.name(), stem.name());
    kd_testkit::load_fixture(&fixture(&name), "tools/fixtures/make_model_fixtures.py")
}

#[test]
fn every_architecture_matches_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in Arch::ALL {
        for stem in Stem::ALL {
            let cfg = tiny(arch, stem);
            let tag = format!("{}_{}", arch.name(), stem.name());
            let refs = reference(arch, stem);
            let st = tmp.path().join(format!("{tag}.safetensors"));
            let meta = import_checkpoint(
                &fixture(&format!("{tag}.pt")),
                &st,
                &cfg,
                [0.5; 3],
                [0.25; 3],
            )
            .unwrap();
            assert_eq!(meta.config(), cfg);
            let x = &refs["x"];

            // Frozen (constants) and trainable (variables) paths give the same eval outputs.
            let frozen = load_frozen(&cfg, &st, &Device::Cpu).unwrap();
            let (model, vm) = trainable_resnet(&cfg, &Device::Cpu, 0).unwrap();
            load_into(&vm, &st).unwrap();
            for m in [&frozen, &model] {
                let out = m.forward_t(x, false).unwrap();
                let d = max_abs_diff(&out.logits, &refs["eval.logits"]);
                assert!(d <= 1e-4, "{tag} eval logits differ by {d}");
                assert!(max_abs_diff(&out.pooled, &refs["eval.pooled"]) <= 1e-4);
                for (i, f) in out.feats.iter().enumerate() {
                    let d = max_abs_diff(f, &refs[&format!("eval.feat{i}")]);
                    assert!(d <= 1e-4, "{tag} eval feat{i} differs by {d}");
                }
            }

            // Train mode: batch statistics, and the running statistics move as PyTorch's do.
            let out = model.forward_t(x, true).unwrap();
            let d = max_abs_diff(&out.logits, &refs["train.logits"]);
            assert!(d <= 1e-4, "{tag} train logits differ by {d}");
            for (i, f) in out.feats.iter().enumerate() {
                // Train-mode features of the deep nets reach |x| ≈ 14 after 16 batch-normalised
                // blocks; f32 rounding then scales with the magnitude, so the bound does too.
                let r = &refs[&format!("train.feat{i}")];
                // Relative to max(max |reference|, 1).
                let d = max_rel(f, r, 1.0);
                assert!(d <= 1e-4, "{tag} train feat{i} differs by {d} of its scale");
            }
            let data = vm.data().lock().unwrap();
            let mut checked = 0;
            for (k, v) in data.iter().filter(|(k, _)| k.contains("running_")) {
                let r = &refs[&format!("after.{k}")];
                // Relative to max(max |reference|, 1).
                let d = max_rel(v.as_tensor(), r, 1.0);
                // kd's training BN sums its statistics in f64 (the fused op's CPU path), PyTorch
                // in f32: a deep layer's few values per channel differ by up to ~15 f32 ulps.
                assert!(
                    d <= 2e-6,
                    "{tag} {k} differs by {d} of its scale after one train step"
                );
                checked += 1;
            }
            assert!(checked > 10);
            // A frozen model refuses to train (its statistics are constants).
            assert!(frozen.forward_t(x, true).is_err());
        }
    }
}

#[test]
fn missing_and_unexpected_keys_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny(Arch::Resnet18, Stem::Cifar);
    let st = tmp.path().join("ok.safetensors");
    import_checkpoint(
        &fixture("resnet18_cifar.pt"),
        &st,
        &cfg,
        [0.5; 3],
        [0.25; 3],
    )
    .unwrap();
    let mut t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let w = t.remove("layer4.1.conv2.weight").unwrap();
    t.insert("head.weight".into(), w);
    t.insert(
        "fc.bias".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&t, &bad).unwrap();
    let err = load_frozen(&cfg, &bad, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::KeyMismatch { .. }), "{msg}");
    assert!(
        msg.contains("missing key(s): layer4.1.conv2.weight"),
        "{msg}"
    );
    assert!(msg.contains("unexpected key(s): head.weight"), "{msg}");
    assert!(msg.contains("fc.bias model [10] vs file [7]"), "{msg}");
    // A trainable model is left untouched by a failed load.
    let (_, vm) = trainable_resnet(&cfg, &Device::Cpu, 0).unwrap();
    let before = vm.data().lock().unwrap()["conv1.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    assert!(load_into(&vm, &bad).is_err());
    assert_eq!(
        max_abs_diff(
            &before,
            vm.data().lock().unwrap()["conv1.weight"].as_tensor()
        ),
        0.0
    );
    // Wrong architecture: a ResNet50 checkpoint for a ResNet18.
    let err = import_checkpoint(
        &fixture("resnet50_cifar.pt"),
        &tmp.path().join("x.safetensors"),
        &cfg,
        [0.5; 3],
        [0.25; 3],
    )
    .unwrap_err();
    assert!(err.to_string().contains("layer1.0.conv3.weight"), "{err}");
    assert!(!tmp.path().join("x.safetensors").exists());
}

#[test]
fn non_checkpoints_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny(Arch::Resnet18, Stem::Cifar);
    let legacy = tmp.path().join("legacy.pt");
    std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc]).unwrap();
    let err = import_checkpoint(
        &legacy,
        &tmp.path().join("o.safetensors"),
        &cfg,
        [0.5; 3],
        [0.25; 3],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("legacy") && err.contains("legacy.pt"), "{err}");
    let text = tmp.path().join("notes.pt");
    std::fs::write(&text, "hello").unwrap();
    let err = import_checkpoint(
        &text,
        &tmp.path().join("o.safetensors"),
        &cfg,
        [0.5; 3],
        [0.25; 3],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a PyTorch zip checkpoint"), "{err}");
    let bytes = std::fs::read(fixture("resnet18_cifar.pt")).unwrap();
    let cut = tmp.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_checkpoint(
        &cut,
        &tmp.path().join("o.safetensors"),
        &cfg,
        [0.5; 3],
        [0.25; 3],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cut.pt"), "{err}");
    let st = tmp.path().join("trunc.safetensors");
    std::fs::write(&st, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let err = load_frozen(&cfg, &st, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("trunc.safetensors") && err.contains("safetensors"),
        "{err}"
    );
    assert!(!tmp.path().join("o.safetensors").exists());
}

#[test]
fn max_pool_matches_pytorch_forward_and_backward() {
    let r = kd_testkit::load_fixture(
        &fixture("maxpool.safetensors"),
        "tools/fixtures/make_model_fixtures.py",
    );
    let x = Var::from_tensor(&r["x"]).unwrap();
    let y = MaxPool2d::RESNET_STEM.forward(x.as_tensor()).unwrap();
    assert_eq!(max_abs_diff(&y, &r["y"]), 0.0);
    let loss = (y * &r["gy"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(x.as_tensor()).unwrap();
    assert!(
        max_abs_diff(gx, &r["gx"]) < 1e-6,
        "ties must send the gradient to the first maximum"
    );
}

#[test]
fn max_pool_gradient_matches_finite_differences() {
    // Distinct values (no ties), f64, central differences.
    let (n, c, h, w) = (2, 2, 7, 8);
    let vals: Vec<f64> = (0..n * c * h * w)
        .map(|i| ((i * 7919) % 1009) as f64 / 97.0)
        .collect();
    let x = Var::from_vec(vals.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    let wts = Tensor::arange(0f64, 2.0 * 2.0 * 4.0 * 4.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 2, 4, 4))
        .unwrap()
        .sin()
        .unwrap();
    let f = |t: &Tensor| {
        (MaxPool2d::RESNET_STEM.forward(t).unwrap() * &wts)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (MaxPool2d::RESNET_STEM.forward(x.as_tensor()).unwrap() * &wts)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eps = 1e-4;
    for i in 0..vals.len() {
        let mut p = vals.clone();
        p[i] += eps;
        let mut m = vals.clone();
        m[i] -= eps;
        let tp = Tensor::from_vec(p, (n, c, h, w), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(m, (n, c, h, w), &Device::Cpu).unwrap();
        let fd = (f(&tp) - f(&tm)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() < 1e-6,
            "element {i}: analytic {} vs numeric {fd}",
            g[i]
        );
    }
}

#[test]
fn full_size_parameter_counts_equal_torchvision() {
    let counts: HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    for arch in Arch::ALL {
        for classes in [10, 100] {
            for stem in Stem::ALL {
                let cfg = ResNetConfig::new(arch, stem, classes);
                let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
                let model = kd_models::ResNet::new(&cfg, vb).unwrap();
                assert_eq!(
                    model.num_params(),
                    counts[&format!("{}_{classes}", arch.name())],
                    "{} {} {classes}",
                    arch.name(),
                    stem.name()
                );
            }
        }
    }
}

/// A model's multiply-accumulates equal PyTorch's FLOP counter's on the same network
/// (`mac_counts.json`, made by `tools/fixtures/make_mac_fixtures.py`): every architecture and
/// stem at full width, narrow ones, and inputs that are not 32×32 (odd sides too).
#[test]
fn macs_per_image_equal_pytorchs_flop_counter() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mac_counts.json")).unwrap())
            .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    let arch_of = |name: &str| Arch::ALL.into_iter().find(|a| a.name() == name).unwrap();
    let stem_of = |name: &str| Stem::ALL.into_iter().find(|s| s.name() == name).unwrap();
    for case in cases {
        let field = |k: &str| case[k].as_u64().unwrap() as usize;
        let cfg = ResNetConfig {
            base_width: field("width"),
            ..ResNetConfig::new(
                arch_of(case["arch"].as_str().unwrap()),
                stem_of(case["stem"].as_str().unwrap()),
                field("classes"),
            )
        };
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let model = kd_models::ResNet::new(&cfg, vb).unwrap();
        let macs = model.macs(field("height"), field("width_px"));
        assert_eq!(macs.backbone, case["macs"].as_u64().unwrap(), "{case}");
        assert_eq!(macs.aux_heads, 0, "{case}");
    }
}

/// The auxiliary heads' cost, in closed form: head i is a 1×1 convolution from stage i's
/// channels to the last stage's 512 at stage i's size, then a 512 → 10 linear layer; the
/// backbone's count does not change with them.
#[test]
fn auxiliary_heads_macs_in_closed_form() {
    let plain = ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10);
    let with_heads = ResNetConfig {
        aux_heads: true,
        ..plain.clone()
    };
    let build = |cfg: &ResNetConfig| {
        kd_models::ResNet::new(cfg, candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu))
            .unwrap()
            .macs(32, 32)
    };
    let heads: u64 = [(64, 32), (128, 16), (256, 8)]
        .iter()
        .map(|&(c, side)| c * 512 * side * side + 512 * 10)
        .sum();
    assert_eq!(heads, 58_735_616);
    let (a, b) = (build(&plain), build(&with_heads));
    assert_eq!(b.backbone, a.backbone);
    assert_eq!(b.aux_heads, heads);
}

/// The device-agnostic composed max-pool (used off the CPU) equals the custom op on a ReLU's
/// output, forward and through a ReLU backward, for even and odd sizes.
#[test]
fn composed_max_pool_equals_the_custom_op_after_relu() {
    for (h, w) in [(32, 32), (7, 9), (3, 3)] {
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = x.as_tensor().relu().unwrap();
        let a = MaxPool2d::RESNET_STEM.forward(&y).unwrap();
        let b = MaxPool2d::RESNET_STEM.forward_nonneg_composed(&y).unwrap();
        assert_eq!(a.dims(), b.dims());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "forward {h}x{w}");
        let weights = Tensor::randn(0f32, 1.0, a.dims(), &Device::Cpu).unwrap();
        let ga = (a * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (b * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "gradient {h}x{w}: {d}");
    }
}
