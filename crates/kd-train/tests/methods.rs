//! Every distillation method end to end on a tiny synthetic task: a finite loss with its named
//! terms, the loss falls over 20 steps, no gradient reaches the teacher, and the method's own
//! parts (FitNets regressor, auxiliary heads) receive gradients.
use std::sync::Arc;

use candle_core::{DType, Device, Var};
use kd_data::{Loader, LoaderConfig, Normalize, Split};
use kd_models::{Arch, ResNetConfig, Stem, Teacher, TeacherMeta};
use kd_schedulers::{Sgd, SgdConfig};
use kd_train::{build_student, MethodConfig, StepContext};

fn synthetic(n: usize) -> Split {
    let mut s = Split::empty(3, 32, 32);
    for i in 0..n {
        let class = i % 4;
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let q = (y / 16) * 2 + x / 16;
                    s.images.push(if q == class { 220 } else { 30 } + ((i * 7 + c * 3 + x + y) % 20) as u8);
                }
            }
        }
        s.labels.push(class as u32);
    }
    s
}

/// A frozen tiny ResNet50 with the max-pool stem (stages at half the student's resolution).
fn teacher(dir: &std::path::Path) -> Teacher {
    let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::new(Arch::Resnet50, Stem::CifarMaxpool, 4) };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &Device::Cpu, 7).unwrap();
    let meta = TeacherMeta { arch: cfg.arch, stem: cfg.stem, num_classes: 4, base_width: 4, mean: [0.5; 3], std: [0.25; 3], source: "test".into(), source_sha256: String::new() };
    let path = dir.join("teacher.safetensors");
    kd_train::export(&vm, &meta, &path).unwrap();
    Teacher::load(&path, &Device::Cpu).unwrap()
}

#[test]
fn every_method_trains_and_keeps_the_teacher_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher(tmp.path());
    let norm = Normalize { mean: [0.4; 3], std: [0.3; 3] };
    let loader = Loader::new(Arc::new(synthetic(16)), LoaderConfig { prefetch: 0, ..LoaderConfig::eval(16, norm) }, Device::Cpu).unwrap();
    let batch = loader.epoch(0, 0).next().unwrap().unwrap();
    let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4) };
    for name in MethodConfig::NAMES {
        let method = MethodConfig::preset(name).unwrap();
        let teacher = method.needs_teacher().then_some(&t);
        let (model, vars, distiller) = build_student(&cfg, &method, teacher, &Device::Cpu, 0, 0.0).unwrap();
        assert_eq!(distiller.name(), name);
        let named: Vec<(String, Var)> = vars.data().lock().unwrap().iter().filter(|(k, _)| !k.contains("running_")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut opt = Sgd::new(named.clone(), SgdConfig { weight_decay: 0.0, ..SgdConfig::default() });
        let t_out = teacher.map(|t| t.forward(&batch.images).unwrap());
        let mut first = None;
        let mut last = 0.0;
        for step in 0..20 {
            let out = model.forward_t(&batch.images, true).unwrap();
            let terms = distiller.loss(&StepContext { epoch: 0, step, total_steps: 20 }, &batch, &out, t_out.as_ref()).unwrap();
            assert!(terms.terms.iter().any(|(n, _)| n == "loss_ce"), "{name}: {:?}", terms.terms.iter().map(|t| &t.0).collect::<Vec<_>>());
            let loss = terms.total().unwrap();
            let v = loss.to_scalar::<f32>().unwrap();
            assert!(v.is_finite(), "{name} step {step}: {v}");
            let mut grads = loss.backward().unwrap();
            if step == 0 {
                // Every trainable variable the method uses gets a gradient; the teacher has none to get.
                for (k, var) in &named {
                    let used = !k.starts_with("aux_heads.") || method.needs_aux_heads();
                    if used {
                        assert!(grads.get(var.as_tensor()).is_some(), "{name}: no gradient for {k}");
                    }
                }
                if let Some(t) = teacher {
                    // The teacher's weights are constants behind detached outputs: backward never visits them.
                    assert!(t.model().backbone_params().iter().all(|p| !p.is_variable() && grads.get(p).is_none()), "{name}: gradient reached the teacher");
                }
            }
            // Clipped as the trainer's --clip-grad does: RKD's scale-invariant terms give huge
            // gradients when a random tiny net maps the batch to nearly one point.
            let gn = kd_schedulers::clip_grad_norm(&mut grads, &named, 2.0).unwrap();
            assert!(gn.is_finite(), "{name} step {step}: gradient norm {gn}");
            opt.step(&grads, 0.02).unwrap();
            first.get_or_insert(v);
            last = v;
        }
        assert!(last < first.unwrap(), "{name}: loss {} → {last} did not fall", first.unwrap());
        if name == "fitnet" {
            assert!(vars.data().lock().unwrap().keys().any(|k| k.starts_with("distill.fitnet.conv")));
        }
    }
    let _ = DType::F32;
}

#[test]
fn methods_that_need_a_teacher_say_so() {
    let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4) };
    let err = build_student(&cfg, &MethodConfig::preset("kd").unwrap(), None, &Device::Cpu, 0, 0.0).err().unwrap().to_string();
    assert!(err.contains("needs a teacher"), "{err}");
}
