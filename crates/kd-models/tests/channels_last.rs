//! A channels-last network (`ResNet::set_memory_format`) against the same network
//! channels-first, on the CPU: every output (logits, features, pre-activations, auxiliary
//! heads), every parameter's gradient and the running statistics in training mode, and the
//! outputs in eval mode, trainable and frozen.
use candle_core::Device;
use kd_kernels::MemoryFormat;
use kd_models::{
    load_frozen, save_varmap, trainable_resnet, Arch, ModelOutput, ResNetConfig, Stem,
};

use kd_testkit::{max_rel, seeded};

/// Every output of `a` against `b`'s, to `tol`.
fn assert_same_outputs(a: &ModelOutput, b: &ModelOutput, tol: f64, what: &str) {
    let pairs = [(&a.logits, &b.logits), (&a.pooled, &b.pooled)]
        .into_iter()
        .chain(a.feats.iter().zip(&b.feats))
        .chain(a.preact.iter().zip(&b.preact))
        .chain(
            a.aux
                .iter()
                .zip(&b.aux)
                .map(|(x, y)| (&x.logits, &y.logits)),
        );
    let mut n = 0;
    for (i, (x, y)) in pairs.enumerate() {
        let e = max_rel(x, y, 1e-12);
        assert!(e < tol, "{what}: output {i} differs by {e}");
        n += 1;
    }
    assert_eq!(n, 2 + b.feats.len() + b.preact.len() + b.aux.len());
    assert!(!b.feats.is_empty(), "{what}: no features compared");
}

#[test]
fn a_channels_last_network_trains_and_evaluates_like_a_channels_first_one() {
    let dev = Device::Cpu;
    let x = seeded(&[4, 3, 16, 16], 5);
    for (arch, stem, aux) in [
        (Arch::Resnet18, Stem::CifarMaxpool, false),
        (Arch::Resnet50, Stem::Cifar, true),
    ] {
        let cfg = ResNetConfig {
            base_width: 4,
            aux_heads: aux,
            ..ResNetConfig::new(arch, stem, 10)
        };
        let what = format!("{arch:?} {}", stem.name());
        let (mut first, vm_first) = trainable_resnet(&cfg, &dev, 7).unwrap();
        let (mut last, vm_last) = trainable_resnet(&cfg, &dev, 7).unwrap();
        last.set_memory_format(MemoryFormat::ChannelsLast).unwrap();
        assert_eq!(last.memory_format(), MemoryFormat::ChannelsLast);
        first.set_keep_preact(true);
        last.set_keep_preact(true);

        // Training mode: outputs, every gradient, the running statistics after the step.
        let (a, b) = (
            last.forward_t(&x, true).unwrap(),
            first.forward_t(&x, true).unwrap(),
        );
        assert_eq!(
            a.feats[1].dims(),
            b.feats[1].dims(),
            "{what}: NCHW features"
        );
        assert_same_outputs(&a, &b, 1e-5, &format!("{what} train"));
        let loss = |o: &ModelOutput| {
            let mut l = o.logits.sqr().unwrap().mean_all().unwrap();
            for h in &o.aux {
                l = (l + h.logits.sqr().unwrap().mean_all().unwrap()).unwrap();
            }
            for (f, p) in o.feats.iter().zip(&o.preact) {
                l = (l + (f.mean_all().unwrap() + p.sqr().unwrap().mean_all().unwrap()).unwrap())
                    .unwrap();
            }
            l
        };
        let (ga, gb) = (loss(&a).backward().unwrap(), loss(&b).backward().unwrap());
        let (va, vb) = (
            vm_last.data().lock().unwrap(),
            vm_first.data().lock().unwrap(),
        );
        assert_eq!(va.len(), vb.len());
        for (name, var_b) in vb.iter() {
            let var_a = &va[name];
            if name.contains("running_") {
                let e = max_rel(var_a.as_tensor(), var_b.as_tensor(), 1e-12);
                assert!(e < 1e-5, "{what}: {name} differs by {e} after the step");
                continue;
            }
            let (da, db) = (
                ga.get(var_a.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: no gradient for {name}")),
                gb.get(var_b.as_tensor()).unwrap(),
            );
            let e = max_rel(da, db, 1e-12);
            assert!(e < 1e-4, "{what}: the gradient of {name} differs by {e}");
        }
        drop((va, vb));

        // Eval mode, trainable and frozen (the frozen network caches its permuted weights).
        let (a, b) = (
            last.forward_t(&x, false).unwrap(),
            first.forward_t(&x, false).unwrap(),
        );
        assert_same_outputs(&a, &b, 1e-5, &format!("{what} eval"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.safetensors");
        save_varmap(&vm_first, &path).unwrap();
        let mut frozen = load_frozen(&cfg, &path, &dev).unwrap();
        frozen.set_keep_preact(true);
        frozen
            .set_memory_format(MemoryFormat::ChannelsLast)
            .unwrap();
        let c = frozen.forward_t(&x, false).unwrap();
        assert_same_outputs(&c, &b, 1e-5, &format!("{what} frozen eval"));
        // The stem alone keeps its (N, C, H, W) interface.
        let s = last.forward_stem(&x, false).unwrap();
        assert!(
            max_rel(&s, &first.forward_stem(&x, false).unwrap(), 1e-12) < 1e-6,
            "{what}: stem"
        );
    }
}
