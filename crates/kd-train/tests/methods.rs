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
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    exported_teacher(dir, arch, zero_init_residual, norm, 7, 4)
}

/// A tiny (width 4) max-pool-stem teacher of `classes` classes, initialised with `seed`, trained
/// (so to speak) on inputs normalised by `norm`, exported to `dir` and loaded frozen.
fn exported_teacher(
    dir: &std::path::Path,
    arch: Arch,
    zero_init_residual: bool,
    norm: Normalize,
    seed: u64,
    classes: usize,
) -> Teacher {
    let cfg = ResNetConfig {
        base_width: 4,
        zero_init_residual,
        ..ResNetConfig::new(arch, Stem::CifarMaxpool, classes)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &Device::Cpu, seed).unwrap();
    let meta = TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: classes,
        base_width: 4,
        mean: norm.mean,
        std: norm.std,
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

/// The presets, scaled to the test: DML and SwitOKD pair the student with one tiny ResNet50 peer, CRD
/// draws 8 negatives (the split has 12 images of other classes per image).
fn preset(name: &str) -> MethodConfig {
    let mut method = MethodConfig::preset(name).unwrap();
    if let MethodConfig::Crd { negatives, .. } = &mut method {
        *negatives = 8;
    }
    if let Some(peers) = method.peers_mut() {
        *peers = vec![PeerSpec::new(Arch::Resnet50, Stem::CifarMaxpool, 4)]
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
                    member: k,
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

/// An online branch method built on a student without its shape (branches, ONE's gate,
/// CL-ILR's rescaling) says what it needs; `build_student` builds that shape, and bad settings
/// are refused by name.
#[test]
fn branch_methods_say_what_student_they_need() {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    for (name, needs) in [
        ("one", "3 branches and its gate"),
        ("okddip", "4 branches, not 1"),
        ("cl_ilr", "4 branches and its trunk's gradient rescaled"),
    ] {
        let method = MethodConfig::preset(name).unwrap();
        let vars = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vars, candle_core::DType::F32, &Device::Cpu);
        let plain = kd_models::ResNet::new(&cfg, vb.clone()).unwrap();
        let err = method
            .build(&plain, None, vb, 0.0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(needs), "{name}: {err}");
        assert!(build_student(&cfg, &method, None, &Device::Cpu, 0, 0.0).is_ok());
    }
    let mut one = MethodConfig::preset("one").unwrap();
    if let MethodConfig::One { temperature, .. } = &mut one {
        *temperature = 0.0;
    }
    let err = build_student(&cfg, &one, None, &Device::Cpu, 0, 0.0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("method one: branches must be at least 2, temperature positive"),
        "{err}"
    );
}

#[test]
fn peer_specs_parse_and_refuse_clearly() {
    let p: PeerSpec = "resnet50:cifar-maxpool:32".parse().unwrap();
    assert_eq!(p, PeerSpec::new(Arch::Resnet50, Stem::CifarMaxpool, 32));
    assert_eq!(
        "resnet34".parse::<PeerSpec>().unwrap(),
        PeerSpec::new(Arch::Resnet34, Stem::Cifar, 64)
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
    // A learning-rate multiple, fourth; positive.
    let p: PeerSpec = "resnet50:cifar-maxpool:64:10".parse().unwrap();
    assert_eq!(p.lr_scale, 10.0);
    assert_eq!("resnet34".parse::<PeerSpec>().unwrap().lr_scale, 1.0);
    for bad in [
        "resnet18:cifar:8:0",
        "resnet18:cifar:8:-1",
        "resnet18:cifar:8:inf",
    ] {
        assert!(
            bad.parse::<PeerSpec>().unwrap_err().contains("LR_SCALE"),
            "{bad}"
        );
    }
    assert!("resnet18:cifar:8:fast"
        .parse::<PeerSpec>()
        .unwrap_err()
        .contains("learning-rate multiple"));
    // In a config it is optional, and a bad one is refused when the networks are built.
    let spec: PeerSpec =
        serde_json::from_str(r#"{"model": "resnet18", "stem": "cifar", "width": 4}"#).unwrap();
    assert_eq!(spec.lr_scale, 1.0);
    let method = MethodConfig::Dml {
        weight: 1.0,
        temperature: 1.0,
        peers: vec![PeerSpec {
            lr_scale: 0.0,
            ..spec
        }],
    };
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10)
    };
    let err = kd_train::build_student(&cfg, &method, None, &Device::Cpu, 0, 0.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("method.peers[0].lr_scale"), "{err}");
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
        peers: vec![PeerSpec::new(Arch::Resnet18, Stem::Cifar, 4)],
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

/// Two teachers of different architectures, weights and input normalisations, each in its own
/// folder under `dir`.
fn two_teachers(dir: &std::path::Path) -> (Teacher, Teacher) {
    let sub = |name: &str| {
        let p = dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let a = exported_teacher(
        &sub("a"),
        Arch::Resnet50,
        true,
        Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
        7,
        4,
    );
    let b = exported_teacher(
        &sub("b"),
        Arch::Resnet18,
        true,
        Normalize {
            mean: [0.45, 0.48, 0.41],
            std: [0.27, 0.26, 0.28],
        },
        3,
        4,
    );
    (a, b)
}

/// An ensemble teacher's logits, through the trainer's teacher forward, are the mean of its
/// members' logits, each member fed the images normalised its own way (computed here member by
/// member from the raw pixels); its parameters and MACs are the members' sums, and it has no
/// features to give.
#[test]
fn an_ensemble_teaches_its_members_mean_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_teachers(tmp.path());
    let student = Normalize {
        mean: [0.4; 3],
        std: [0.3; 3],
    };
    let raw = kd_testkit::seeded(&[6, 3, 32, 32], 11)
        .affine(0.5, 0.5)
        .unwrap();
    let normalised = |n: &Normalize| {
        let c = |v: [f32; 3]| {
            candle_core::Tensor::new(&v, &Device::Cpu)
                .unwrap()
                .reshape((1, 3, 1, 1))
                .unwrap()
        };
        raw.broadcast_sub(&c(n.mean))
            .unwrap()
            .broadcast_div(&c(n.std))
            .unwrap()
    };
    let own = |t: &Teacher| {
        let n = Normalize {
            mean: t.meta().mean,
            std: t.meta().std,
        };
        t.forward_parts(&normalised(&n), ForwardParts::LOGITS)
            .unwrap()
            .logits
    };
    let expected = ((own(&a) + own(&b)).unwrap() / 2.0).unwrap();
    let (params, macs) = (
        a.num_params() + b.num_params(),
        a.macs(32, 32) + b.macs(32, 32),
    );
    assert!(a.num_params() != b.num_params());
    let ens = Teacher::ensemble(vec![a, b]).unwrap();
    assert_eq!(ens.len(), 2);
    let got = kd_train::teacher_forward_parts(
        &ens,
        &normalised(&student),
        &student,
        ForwardParts::LOGITS,
    )
    .unwrap();
    let err = kd_testkit::max_rel(&got.logits, &expected, 1e-3);
    assert!(err < 1e-4, "ensemble logits off by {err}");
    assert_eq!((ens.num_params(), ens.macs(32, 32)), (params, macs));
    assert_eq!(got.pooled.dims(), &[6, 0]);
    let e = ens
        .forward_parts(
            &normalised(&student),
            ForwardParts {
                features: true,
                preact: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("mean logits only"), "{e}");
}

/// Members must agree on the classes: the odd one is named.
#[test]
fn an_ensemble_of_different_class_counts_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = two_teachers(tmp.path());
    std::fs::create_dir_all(tmp.path().join("c")).unwrap();
    let c = exported_teacher(
        &tmp.path().join("c"),
        Arch::Resnet18,
        false,
        Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
        1,
        10,
    );
    let e = Teacher::ensemble(vec![a, c]).unwrap_err().to_string();
    assert!(
        e.contains("member 2") && e.contains("10 classes") && e.contains("has 4"),
        "{e}"
    );
}

/// Every method that reads only its teacher's logits learns from an ensemble: a finite loss
/// with the same terms as from one teacher, and from an ensemble of one teacher twice exactly the
/// loss that teacher alone gives. Every other teacher method is refused, naming the ones that
/// can.
#[test]
fn logit_methods_learn_from_an_ensemble_and_the_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_teachers(tmp.path());
    let norm = Normalize {
        mean: [0.4; 3],
        std: [0.3; 3],
    };
    let pair = Teacher::ensemble(vec![a.clone(), b]).unwrap();
    let twice = Teacher::ensemble(vec![a.clone(), a.clone()]).unwrap();
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 4)
    };
    let mut taught = Vec::new();
    for name in MethodConfig::NAMES {
        let method = preset(name);
        if !method.needs_teacher() {
            continue;
        }
        if !method.teacher_logits_only() {
            let e = build_student(&cfg, &method, Some(&pair), &Device::Cpu, 0, 0.0)
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("ensemble") && e.contains("kd, ctkd, dkd"),
                "{name}: {e}"
            );
            continue;
        }
        let lcfg = LoaderConfig {
            prefetch: 0,
            pair: method.pairing(),
            ..LoaderConfig::eval(16, norm)
        };
        let loader = Loader::new(Arc::new(synthetic(16)), lcfg, Device::Cpu).unwrap();
        let batch = loader.epoch(0, 0).next().unwrap().unwrap();
        let terms = |t: &Teacher| {
            let built = build_student(&cfg, &method, Some(t), &Device::Cpu, 0, 0.0).unwrap();
            built.distiller.prepare(&RunInfo::cpu(16, 4)).unwrap();
            let t_out =
                kd_train::teacher_forward(t, &batch, &norm, built.distiller.as_ref()).unwrap();
            let out = built.model.forward_t(&batch.images, true).unwrap();
            let paired = batch
                .paired
                .as_ref()
                .map(|x| built.model.forward_t(x, true).unwrap());
            let o = Outputs {
                student: &out,
                teacher: Some(&t_out),
                peers: &[],
                paired: paired.as_ref(),
                member: 0,
            };
            built
                .distiller
                .loss(&StepContext::one_step(), &batch, &o)
                .unwrap()
                .terms
                .iter()
                .map(|(n, v)| (n.clone(), v.to_scalar::<f32>().unwrap()))
                .collect::<Vec<_>>()
        };
        let alone = terms(&a);
        assert_eq!(terms(&twice), alone, "{name}");
        let from_pair = terms(&pair);
        assert_eq!(
            from_pair.iter().map(|t| &t.0).collect::<Vec<_>>(),
            alone.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{name}"
        );
        assert!(
            from_pair.iter().all(|(_, v)| v.is_finite()),
            "{name}: {from_pair:?}"
        );
        assert_ne!(
            from_pair, alone,
            "{name}: the second member changed nothing"
        );
        taught.push(name);
    }
    assert_eq!(taught, MethodConfig::TEACHER_LOGITS_ONLY.to_vec());
}
