//! Registry-wide checks: every architecture × stem, with auxiliary heads — shapes,
//! `feature_info` against the real feature maps, the pre-ReLU stage outputs, gradients on every trainable variable and
//! none on BN running statistics.
use candle_core::{DType, Device, Tensor};
use kd_models::{
    load_frozen, save_varmap, trainable_resnet, Arch, ForwardParts, ResNetConfig, Stem,
};
use kd_testkit::bits;

#[test]
fn shapes_feature_info_and_gradients() {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    for arch in Arch::ALL {
        for stem in Stem::ALL {
            let cfg = ResNetConfig {
                base_width: 4,
                aux_heads: true,
                ..ResNetConfig::new(arch, stem, 7)
            };
            let (mut model, vm) = trainable_resnet(&cfg, &Device::Cpu, 1).unwrap();
            // Pre-ReLU stage outputs only when asked for.
            assert!(model.forward_t(&x, false).unwrap().preact.is_empty());
            model.set_keep_preact(true);
            let out = model.forward_t(&x, true).unwrap();
            let tag = format!("{} {}", arch.name(), stem.name());
            assert_eq!(out.logits.dims(), &[2, 7], "{tag}");
            let info = model.feature_info();
            assert_eq!(info.len(), out.feats.len());
            for (f, i) in out.feats.iter().zip(info) {
                assert_eq!(
                    f.dims(),
                    &[2, i.channels, 32 / i.reduction, 32 / i.reduction],
                    "{tag}"
                );
            }
            assert_eq!(out.pooled.dims(), &[2, info[4].channels]);
            // Each stage's pre-ReLU output: the stage's output is its ReLU, and the BN before
            // it has one (γ, β) per channel.
            assert_eq!(out.preact.len(), 4, "{tag}");
            let bns = model.preact_bn_params();
            assert_eq!(bns.len(), 4, "{tag}");
            for ((pre, post), (gamma, beta)) in out.preact.iter().zip(&out.feats[1..]).zip(&bns) {
                assert_eq!(pre.dims(), post.dims(), "{tag}");
                let diff = (pre.relu().unwrap() - post)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(
                    diff, 0.0,
                    "{tag}: a stage's output is the ReLU of its pre-activation"
                );
                assert!(
                    pre.min_all().unwrap().to_scalar::<f32>().unwrap() < 0.0,
                    "{tag}"
                );
                assert_eq!(gamma.dims(), &[pre.dim(1).unwrap()], "{tag}");
                assert_eq!(beta.dims(), &[pre.dim(1).unwrap()], "{tag}");
            }
            assert_eq!(out.aux.len(), 3);
            for a in &out.aux {
                assert_eq!(a.logits.dims(), &[2, 7]);
                assert_eq!(a.pooled.dims(), out.pooled.dims());
            }
            let mut loss = out.logits.sqr().unwrap().mean_all().unwrap();
            for a in &out.aux {
                loss = (loss + a.logits.sqr().unwrap().mean_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            let mut trainable = 0;
            for (name, var) in data.iter() {
                let g = grads.get(var.as_tensor());
                if name.contains("running_") {
                    assert!(g.is_none(), "{tag}: gradient reached {name}");
                } else {
                    let g = g.unwrap_or_else(|| panic!("{tag}: no gradient for {name}"));
                    assert_eq!(g.dims(), var.dims());
                    trainable += var.elem_count();
                }
            }
            assert_eq!(
                trainable,
                model.num_params(),
                "{tag}: num_params counts every trainable variable"
            );
            assert!(model.num_backbone_params() < model.num_params());
            assert!(data.keys().filter(|k| k.starts_with("aux_heads.")).count() > 0);
        }
    }
}

#[test]
fn features_only_when_asked_for_and_the_rest_unchanged() {
    // Without the features (or the pre-activations) the logits, the pooled embedding and the
    // auxiliary heads are the same bits, in f32 and under bf16 (whose f32 feature copies are
    // what skipping them saves).
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let cfg = ResNetConfig {
        base_width: 4,
        aux_heads: true,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 5)
    };
    for dtype in [DType::F32, DType::BF16] {
        let (mut model, _) = trainable_resnet(&cfg, &Device::Cpu, 2).unwrap();
        model.set_compute_dtype(dtype).unwrap();
        let full = model.forward_t(&x, false).unwrap();
        assert_eq!(full.feats.len(), 5);
        assert!(full.feats.iter().all(|f| f.dtype() == DType::F32));
        let bare = ForwardParts::LOGITS;
        let parts = model.forward_parts(&x, false, bare).unwrap();
        model.set_keep_features(false);
        let setting = model.forward_t(&x, false).unwrap();
        for out in [&parts, &setting] {
            assert!(out.feats.is_empty() && out.preact.is_empty(), "{dtype:?}");
            assert_eq!(bits(&out.logits), bits(&full.logits), "{dtype:?}");
            assert_eq!(bits(&out.pooled), bits(&full.pooled), "{dtype:?}");
            assert_eq!(out.aux.len(), 3);
            for (a, b) in out.aux.iter().zip(&full.aux) {
                assert_eq!(bits(&a.logits), bits(&b.logits), "{dtype:?}");
            }
        }
        // The pre-activations alone.
        let preact = ForwardParts {
            features: false,
            preact: true,
        };
        let out = model.forward_parts(&x, false, preact).unwrap();
        assert!(out.feats.is_empty());
        assert_eq!(out.preact.len(), 4);
    }
}

#[test]
fn a_frozen_network_casts_its_weights_once_with_the_same_results() {
    // A frozen (constant-weight) network keeps its convolution weights cast to bf16 from
    // set_compute_dtype on (that the casts are kept: resnet.rs's unit test); its outputs are
    // the bits of the same weights cast per op (a trainable copy), for both architectures'
    // blocks and the auxiliary heads, in bf16 and back in f32.
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Resnet18, Arch::Resnet50] {
        let cfg = ResNetConfig {
            base_width: 4,
            aux_heads: true,
            ..ResNetConfig::new(arch, Stem::CifarMaxpool, 5)
        };
        let (mut trainable, vm) = trainable_resnet(&cfg, &Device::Cpu, 3).unwrap();
        let path = dir.path().join(format!("{arch:?}.safetensors"));
        save_varmap(&vm, &path).unwrap();
        let mut frozen = load_frozen(&cfg, &path, &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            trainable.set_compute_dtype(dtype).unwrap();
            frozen.set_compute_dtype(dtype).unwrap();
            let (a, b) = (
                trainable.forward_t(&x, false).unwrap(),
                frozen.forward_t(&x, false).unwrap(),
            );
            assert_eq!(bits(&a.logits), bits(&b.logits), "{arch:?} {dtype:?}");
            for (fa, fb) in a.feats.iter().zip(&b.feats) {
                assert_eq!(bits(fa), bits(fb), "{arch:?} {dtype:?}");
            }
            for (ha, hb) in a.aux.iter().zip(&b.aux) {
                assert_eq!(bits(&ha.logits), bits(&hb.logits), "{arch:?} {dtype:?}");
            }
        }
    }
}

#[test]
fn init_is_seeded_and_torchvision_like() {
    let cfg = ResNetConfig {
        base_width: 8,
        zero_init_residual: true,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10)
    };
    let (_, a) = trainable_resnet(&cfg, &Device::Cpu, 5).unwrap();
    let (_, b) = trainable_resnet(&cfg, &Device::Cpu, 5).unwrap();
    let (_, c) = trainable_resnet(&cfg, &Device::Cpu, 6).unwrap();
    let get = |vm: &candle_nn::VarMap, k: &str| {
        vm.data().lock().unwrap()[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(
        get(&a, "layer2.0.conv1.weight"),
        get(&b, "layer2.0.conv1.weight")
    );
    assert_ne!(
        get(&a, "layer2.0.conv1.weight"),
        get(&c, "layer2.0.conv1.weight")
    );
    // Kaiming normal, fan-out: std = sqrt(2 / (out·k·k)).
    let w = get(&a, "layer4.0.conv2.weight"); // 64 out, 3×3 → std 0.0589
    let n = w.len() as f32;
    let std = (w.iter().map(|v| v * v).sum::<f32>() / n).sqrt();
    assert!(
        (std - (2.0f32 / (64.0 * 9.0)).sqrt()).abs() < 0.004,
        "std {std}"
    );
    assert!(
        get(&a, "layer1.0.bn2.weight").iter().all(|&v| v == 0.0),
        "zero-init residual"
    );
    assert!(get(&a, "layer1.0.bn1.weight").iter().all(|&v| v == 1.0));
    assert!(get(&a, "bn1.running_var").iter().all(|&v| v == 1.0));
    let bound = 1.0 / 64f32.sqrt();
    assert!(get(&a, "fc.weight")
        .iter()
        .chain(get(&a, "fc.bias").iter())
        .all(|v| v.abs() <= bound));
    let _ = DType::F32;
}
