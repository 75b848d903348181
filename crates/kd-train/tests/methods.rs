//! Every distillation method end to end on a tiny synthetic task: a finite loss with its named
//! terms, the loss falls over 20 steps, no gradient reaches the teacher, and the method's own
//! parts (FitNets regressor, auxiliary heads) receive gradients.
use std::sync::Arc;

use candle_core::{Device, Var};
use kd_data::{Loader, LoaderConfig, Normalize, Split};
use kd_models::{Arch, ResNetConfig, Stem, Teacher, TeacherMeta};
use kd_models::{ForwardParts, ModelOutput};
use kd_schedulers::{Sgd, SgdConfig};
use kd_train::{build_student, MethodConfig, Outputs, PeerSpec, RunInfo, StepContext};

fn synthetic(n: usize) -> Split {
    let mut s = Split::empty(3, 32, 32);
    for i in 0..n {
        let class = i % 4;
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let q = (y / 16) * 2 + x / 16;
                    s.images.push(
                        if q == class { 220 } else { 30 } + ((i * 7 + c * 3 + x + y) % 20) as u8,
                    );
                }
            }
        }
        s.labels.push(class as u32);
    }
    s
}

/// A frozen tiny ResNet50 with the max-pool stem (stages at half the student's resolution).
fn teacher(dir: &std::path::Path) -> Teacher {
    teacher_with(dir, Arch::Resnet50, false)
}

/// The teacher `method` is tested with: [`teacher`], or for FSP, which needs the student's widths
/// at every level, a tiny ResNet34 (`fsp` subfolder of `dir`).
fn teacher_for(dir: &std::path::Path, method: &MethodConfig, zero_init_residual: bool) -> Teacher {
    match method {
        MethodConfig::Fsp { .. } => {
            let sub = dir.join("fsp");
            std::fs::create_dir_all(&sub).unwrap();
            teacher_with(&sub, Arch::Resnet34, zero_init_residual)
        }
        _ => teacher_with(dir, Arch::Resnet50, zero_init_residual),
    }
}

/// [`teacher`], with each residual branch's last BN at 0 when `zero_init_residual`: features
/// of a trained network's scale (mean square about 1, not a random deep stack's hundreds).
fn teacher_with(dir: &std::path::Path, arch: Arch, zero_init_residual: bool) -> Teacher {
    let cfg = ResNetConfig {
        base_width: 4,
        zero_init_residual,
        ..ResNetConfig::new(arch, Stem::CifarMaxpool, 4)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &Device::Cpu, 7).unwrap();
    let meta = TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: 4,
        base_width: 4,
        mean: [0.5; 3],
        std: [0.25; 3],
        source: "test".into(),
        source_sha256: String::new(),
    };
    let path = dir.join("teacher.safetensors");
    kd_train::export(&vm, &meta, &path).unwrap();
    Teacher::load(&path, &Device::Cpu).unwrap()
}

fn trainable(vars: &candle_nn::VarMap) -> Vec<(String, Var)> {
    vars.data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The presets, scaled to the test: DML pairs the student with one tiny ResNet50 peer, CRD
/// draws 8 negatives (the split has 12 images of other classes per image).
fn preset(name: &str) -> MethodConfig {
    let mut method = MethodConfig::preset(name).unwrap();
    match &mut method {
        MethodConfig::Crd { negatives, .. } => *negatives = 8,
        MethodConfig::Dml { peers, .. } => {
            *peers = vec![PeerSpec {
                model: Arch::Resnet50,
                stem: Stem::CifarMaxpool,
                width: 4,
            }]
        }
        _ => {}
    }
    method
}

#[test]
fn every_method_trains_and_keeps_the_teacher_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let norm = Normalize {
        mean: [0.4; 3],
        std: [0.3; 3],
    };
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    for name in MethodConfig::NAMES {
        let method = preset(name);
        // The loader brings the second image the method asks for (two views, a same-class partner).
        let lcfg = LoaderConfig {
            prefetch: 0,
            pair: method.pairing(),
            negatives: method.negatives(),
            augment: kd_data::Augment::STANDARD,
            ..LoaderConfig::eval(16, norm)
        };
        let loader = Loader::new(Arc::new(synthetic(16)), lcfg, Device::Cpu).unwrap();
        let batch = loader.epoch(0, 0).next().unwrap().unwrap();
        assert_eq!(batch.paired.is_some(), method.pairing().is_some());
        assert_eq!(batch.contrast.is_some(), method.negatives().is_some());
        let t = teacher_for(tmp.path(), &method, false);
        let teacher = method.needs_teacher().then_some(&t);
        let built = build_student(&cfg, &method, teacher, &Device::Cpu, 0, 0.0).unwrap();
        // The trainer's first call: methods with a per-image memory size it (PS-KD).
        built.distiller.prepare(&RunInfo::cpu(16, 4)).unwrap();
        assert_eq!(built.distiller.name(), name);
        assert_eq!(built.peers.len(), method.peers().len());
        // The student first, then its peers (online methods), each with its own optimizer.
        // What the main run trains: not the parts a two-stage method fitted and froze.
        let main_vars = kd_train::trainable_vars_except(&built.vars, &built.distiller.frozen());
        let mut members: Vec<(&kd_models::ResNet, Vec<(String, Var)>)> =
            vec![(&built.model, main_vars)];
        members.extend(built.peers.iter().map(|p| (&p.model, trainable(&p.vars))));
        let mut opts: Vec<Sgd> = members
            .iter()
            .map(|(_, named)| {
                Sgd::new(
                    named.clone(),
                    SgdConfig {
                        weight_decay: 0.0,
                        ..SgdConfig::default()
                    },
                )
            })
            .collect();
        // What the trainer's teacher forward returns for this method: the features and the
        // pre-activations only if it says it reads them (a method that reads what it did not ask
        // for finds them missing here).
        // (MLKD's teacher also sees the strong view, stacked after the batch.)
        let t_out = teacher.map(|t| {
            kd_train::teacher_forward(t, &batch, &norm, built.distiller.as_ref()).unwrap()
        });
        let mut first = vec![None; members.len()];
        // Each member's lowest loss over the last five steps.
        let mut last = vec![f32::INFINITY; members.len()];
        for step in 0..20 {
            let outs: Vec<ModelOutput> = members
                .iter()
                .map(|(m, _)| m.forward_t(&batch.images, true).unwrap())
                .collect();
            let paired = batch
                .paired
                .as_ref()
                .map(|x| built.model.forward_t(x, true).unwrap());
            for k in 0..members.len() {
                let others: Vec<ModelOutput> = outs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != k)
                    .map(|(_, o)| o.clone())
                    .collect();
                let out = Outputs {
                    student: &outs[k],
                    teacher: if k == 0 { t_out.as_ref() } else { None },
                    peers: &others,
                    paired: if k == 0 { paired.as_ref() } else { None },
                };
                let terms = built
                    .distiller
                    .loss(
                        &StepContext {
                            epoch: 0,
                            step,
                            total_steps: 20,
                            epochs: 1,
                        },
                        &batch,
                        &out,
                    )
                    .unwrap();
                assert!(
                    terms.terms.iter().any(|(n, _)| n == "loss_ce"),
                    "{name}: {:?}",
                    terms.terms.iter().map(|t| &t.0).collect::<Vec<_>>()
                );
                // AB and FSP distil in their init phase only; their main run is the
                // cross-entropy, without the teacher.
                assert!(
                    terms.terms.len() >= 2
                        || name == "none"
                        || !built.distiller.teacher_each_step(),
                    "{name}: no distillation term"
                );
                let loss = terms.total().unwrap();
                let v = loss.to_scalar::<f32>().unwrap();
                assert!(v.is_finite(), "{name} step {step}: {v}");
                let mut grads = loss.backward().unwrap();
                if step == 0 {
                    // Every trainable variable the method uses gets a gradient; the teacher has none to get.
                    for (key, var) in &members[k].1 {
                        let used = !key.starts_with("aux_heads.") || method.needs_aux_heads();
                        if used {
                            assert!(
                                grads.get(var.as_tensor()).is_some(),
                                "{name} member {k}: no gradient for {key}"
                            );
                        }
                    }
                    // A peer's loss reaches no other peer: the others' outputs enter as constants.
                    for (j, (_, named)) in members.iter().enumerate().filter(|(j, _)| *j != k) {
                        assert!(
                            named
                                .iter()
                                .all(|(_, var)| grads.get(var.as_tensor()).is_none()),
                            "{name}: member {k}'s loss reached member {j}"
                        );
                    }
                    if let Some(t) = teacher {
                        // The teacher's weights are constants behind detached outputs: backward never visits them.
                        assert!(
                            t.model()
                                .backbone_params()
                                .iter()
                                .all(|p| !p.is_variable() && grads.get(p).is_none()),
                            "{name}: gradient reached the teacher"
                        );
                    }
                }
                // Clipped as the trainer's --clip-grad does: RKD's scale-invariant terms give huge
                // gradients when a random tiny net maps the batch to nearly one point.
                let gn = kd_schedulers::clip_grad_norm(&mut grads, &members[k].1, 2.0).unwrap();
                assert!(gn.is_finite(), "{name} step {step}: gradient norm {gn}");
                opts[k].step(&grads, 0.02).unwrap();
                first[k].get_or_insert(v);
                if step >= 15 {
                    last[k] = last[k].min(v);
                }
            }
        }
        // Online peers chase each other's moving predictions, so a peer's loss oscillates from
        // step to step (DML's second member: 1.67 at the first step, between 1.57 and 1.80 over
        // the last five); a member that trains has reached below its first loss by then.
        for k in 0..members.len() {
            assert!(
                last[k] < first[k].unwrap(),
                "{name} member {k}: loss {} → {} (lowest of the last five steps) did not fall",
                first[k].unwrap(),
                last[k]
            );
        }
        if name == "fitnet" {
            assert!(built
                .vars
                .data()
                .lock()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("distill.fitnet.conv")));
        }
    }
}

#[test]
fn methods_that_need_a_teacher_say_so() {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let err = build_student(
        &cfg,
        &MethodConfig::preset("kd").unwrap(),
        None,
        &Device::Cpu,
        0,
        0.0,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("needs a teacher"), "{err}");
}

#[test]
fn peer_specs_parse_and_refuse_clearly() {
    let p: PeerSpec = "resnet50:cifar-maxpool:32".parse().unwrap();
    assert_eq!(
        p,
        PeerSpec {
            model: Arch::Resnet50,
            stem: Stem::CifarMaxpool,
            width: 32
        }
    );
    assert_eq!(
        "resnet34".parse::<PeerSpec>().unwrap(),
        PeerSpec {
            model: Arch::Resnet34,
            stem: Stem::Cifar,
            width: 64
        }
    );
    assert!("resnet51"
        .parse::<PeerSpec>()
        .unwrap_err()
        .contains("architecture"));
    assert!("resnet18:big"
        .parse::<PeerSpec>()
        .unwrap_err()
        .contains("stem"));
    assert!("resnet18:cifar:0"
        .parse::<PeerSpec>()
        .unwrap_err()
        .contains("WIDTH"));
}

#[test]
fn peers_start_from_their_own_weights() {
    // A ResNet18 peer of a ResNet18 student must not be a copy of it: DML would then be a no-op.
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let method = MethodConfig::Dml {
        weight: 1.0,
        temperature: 1.0,
        peers: vec![PeerSpec {
            model: Arch::Resnet18,
            stem: Stem::Cifar,
            width: 4,
        }],
    };
    let built = build_student(&cfg, &method, None, &Device::Cpu, 0, 0.0).unwrap();
    let a = built
        .vars
        .get(
            (4, 3, 3, 3),
            "conv1.weight",
            candle_nn::Init::Const(0.0),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let b = built.peers[0]
        .vars
        .get(
            (4, 3, 3, 3),
            "conv1.weight",
            candle_nn::Init::Const(0.0),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.1, "peer and student start equal");
}

/// A method's parts may reuse backbone names (VID's regressors have a `conv3`): the seeded
/// initialisation must still treat a ResNet18 student as basic blocks, zeroing each `bn2` under
/// zero-init-residual, and start VID's variances at their initial value (parameter 0).
#[test]
fn method_parts_do_not_change_the_students_initialisation() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher(tmp.path());
    let cfg = ResNetConfig {
        base_width: 4,
        zero_init_residual: true,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let built = build_student(&cfg, &preset("vid"), Some(&t), &Device::Cpu, 0, 0.0).unwrap();
    let data = built.vars.data().lock().unwrap();
    let values = |k: &str| {
        data.get(k)
            .unwrap_or_else(|| panic!("no {k}"))
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(values("layer1.0.bn2.weight").iter().all(|&v| v == 0.0));
    assert!(values("distill.vid.stage1.conv3.weight")
        .iter()
        .any(|&v| v != 0.0));
    assert!(values("distill.vid.stage4.log_scale")
        .iter()
        .all(|&v| v == 0.0));
}

/// CTKD's temperature parameter starts at the authors' 1 after the seeded initialisation of
/// every variable (its name takes the rule for BN scales), so the first temperature is
/// 1 + 20·sigmoid(1).
#[test]
fn ctkd_starts_its_temperature_parameter_at_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher(tmp.path());
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let built = build_student(&cfg, &preset("ctkd"), Some(&t), &Device::Cpu, 3, 0.0).unwrap();
    let g = built.vars.data().lock().unwrap()["distill.ctkd.global_t.weight"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(g, [1.0]);
}

/// The two-stage methods' init phases (AB, FT, FSP) on the tiny task: the init loss is finite and
/// falls over 20 steps of the phase's own optimizer, its gradients reach exactly the variables
/// the phase trains (AB: the connectors and the student's body; FT: the paraphraser; FSP: the
/// body), and never
/// the teacher.
#[test]
fn init_phases_fit_what_they_train() {
    let tmp = tempfile::tempdir().unwrap();
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let loader = Loader::new(
        Arc::new(synthetic(16)),
        LoaderConfig {
            prefetch: 0,
            ..LoaderConfig::eval(16, norm)
        },
        Device::Cpu,
    )
    .unwrap();
    let batch = loader.epoch(0, 0).next().unwrap().unwrap();
    let mut phased = 0;
    for name in MethodConfig::NAMES {
        let method = preset(name);
        let t = teacher_for(tmp.path(), &method, true);
        let t_out = t.forward(&batch.images).unwrap();
        let scale = t_out.feats[4]
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (0.01..10.0).contains(&scale),
            "{name}: the teacher's last stage has mean square {scale}"
        );
        let teacher = method.needs_teacher().then_some(&t);
        let built = build_student(&cfg, &method, teacher, &Device::Cpu, 0, 0.0).unwrap();
        let Some(phase) = built.distiller.init_phase() else {
            continue;
        };
        // Again, with what the method compares (AB: the pre-ReLU stage outputs).
        let parts = ForwardParts {
            features: built.distiller.needs_features(),
            preact: built.distiller.needs_preact(),
        };
        let t_out = t.forward_parts(&batch.images, parts).unwrap();
        phased += 1;
        assert!(phase.epochs >= 1 && phase.lr > 0.0, "{name}: {phase:?}");
        let all = trainable(&built.vars);
        let named: Vec<(String, Var)> = all
            .iter()
            .filter(|(k, _)| phase.trains(k))
            .cloned()
            .collect();
        assert!(
            phase.student_body || named.iter().any(|(k, _)| k.starts_with(&phase.parts)),
            "{name}: the phase trains nothing"
        );
        let mut opt = Sgd::new(named.clone(), SgdConfig::default());
        let (mut first, mut last) = (None, 0.0);
        for step in 0..20 {
            let s_out = phase
                .student_body
                .then(|| built.model.forward_t(&batch.images, true).unwrap());
            let loss = built
                .distiller
                .init_loss(s_out.as_ref(), &t_out)
                .unwrap()
                .total()
                .unwrap();
            let v = loss.to_scalar::<f32>().unwrap();
            assert!(v.is_finite(), "{name} init step {step}: {v}");
            let grads = loss.backward().unwrap();
            if step == 0 {
                for (k, var) in &all {
                    let reached = grads.get(var.as_tensor()).is_some();
                    // BN running statistics are not trainable; every trained variable is reached.
                    assert_eq!(reached, phase.trains(k), "{name}: gradient of {k}");
                }
                assert!(t
                    .model()
                    .backbone_params()
                    .iter()
                    .all(|p| grads.get(p).is_none()));
            }
            opt.step(&grads, phase.lr).unwrap();
            first.get_or_insert(v);
            last = v;
        }
        assert!(
            last < first.unwrap(),
            "{name}: init loss {} → {last} did not fall",
            first.unwrap()
        );
    }
    assert_eq!(phased, 3, "AB, FT and FSP have init phases");
}
