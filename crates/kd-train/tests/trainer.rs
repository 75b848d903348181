//! The trainer on a tiny synthetic task: it learns, resuming after k epochs ends bit-identical to
//! an uninterrupted run, and a non-finite loss stops it with the epoch and step.
use std::sync::Arc;

use candle_core::Device;
use kd_data::{Augment, Loader, LoaderConfig, Normalize, Split};
use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem, TeacherMeta};
use kd_schedulers::{OptimizerConfig, Schedule, SgdConfig};
use kd_train::{train, RunOptions, Student, TrainConfig, TrainError};

/// Four classes: the image is bright in one quadrant, plus noise.
fn quadrants(n: usize, seed: u64) -> Split {
    let mut s = Split::empty(3, 32, 32);
    let mut x = seed
        .wrapping_mul(2862933555777941757)
        .wrapping_add(3037000493);
    for i in 0..n {
        let class = i % 4;
        for c in 0..3 {
            for y in 0..32 {
                for xx in 0..32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let q = (y / 16) * 2 + xx / 16;
                    let base = if q == class { 200 } else { 40 };
                    s.images
                        .push((base + (x % 40) as i32 - 20).clamp(0, 255) as u8 + (c as u8));
                }
            }
        }
        s.labels.push(class as u32);
    }
    s
}

/// A tiny model, its variables and sidecar, and the training and test loaders.
type Setup = (
    kd_models::ResNet,
    candle_nn::VarMap,
    TeacherMeta,
    Loader,
    Loader,
);

fn setup(seed: u64) -> Setup {
    setup_with(seed, seed)
}

/// `init_seed` initialises the model, `data_seed` drives order and augmentation.
fn setup_with(init_seed: u64, data_seed: u64) -> Setup {
    setup_paired(init_seed, data_seed, None)
}

/// [`setup_with`], the training batches bringing the images `pair` names.
fn setup_paired(init_seed: u64, data_seed: u64, pair: Option<kd_data::Pairing>) -> Setup {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 4)
    };
    let (model, vm) = trainable_resnet(&cfg, &Device::Cpu, init_seed).unwrap();
    let norm = Normalize {
        mean: [0.4; 3],
        std: [0.3; 3],
    };
    let tcfg = LoaderConfig {
        augment: Augment {
            crop_padding: 2,
            hflip: false,
        },
        pair,
        ..LoaderConfig::train(16, norm, data_seed)
    };
    let train_l = Loader::new(Arc::new(quadrants(64, 1)), tcfg, Device::Cpu).unwrap();
    let test_l = Loader::new(
        Arc::new(quadrants(32, 2)),
        LoaderConfig::eval(32, norm),
        Device::Cpu,
    )
    .unwrap();
    let meta = TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: 4,
        base_width: 4,
        mean: norm.mean,
        std: norm.std,
        source: "test".into(),
        source_sha256: String::new(),
    };
    (model, vm, meta, train_l, test_l)
}

fn baseline() -> Box<dyn kd_train::Distiller> {
    Box::new(kd_train::CrossEntropy { smoothing: 0.0 })
}

fn config(epochs: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        lr,
        schedule: Schedule::WarmupCosine {
            warmup_steps: 2,
            final_lr: 0.0,
        },
        optimizer: OptimizerConfig::Sgd(SgdConfig::default()),
        label_smoothing: 0.0,
        clip_grad: None,
        keep_last: 2,
    }
}

/// The student alone, without peers.
fn solo<'a>(
    model: &'a kd_models::ResNet,
    vars: &'a candle_nn::VarMap,
    meta: &'a TeacherMeta,
) -> Student<'a> {
    Student {
        model,
        vars,
        meta,
        peers: &[],
    }
}

fn weights(vm: &candle_nn::VarMap) -> Vec<(String, Vec<f32>)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn learns_the_synthetic_task() {
    let (model, vm, meta, tr, te) = setup(0);
    let dir = tempfile::tempdir().unwrap();
    let s = train(
        solo(&model, &vm, &meta),
        &*baseline(),
        None,
        &tr,
        &te,
        &config(6, 0.05),
        dir.path(),
        RunOptions::default(),
    )
    .unwrap()
    .unwrap();
    let rows = kd_train::read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 6);
    assert!(
        rows.last().unwrap().train_loss < rows[0].train_loss,
        "{rows:?}"
    );
    assert!(
        s.best_top1 >= 75.0,
        "test top-1 {} on a 4-class task",
        s.best_top1
    );
    // Calibration at every epoch; no teacher, so no fidelity.
    assert!(rows.iter().all(|r| r.test_ece.is_some()), "{rows:?}");
    assert!(
        rows.iter().all(|r| r.teacher_agreement.is_none()),
        "{rows:?}"
    );
    assert_eq!(s.last_ece, rows.last().unwrap().test_ece);
    assert_eq!((s.teacher_top1, s.last_teacher_agreement), (None, None));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        7
    );
    for f in [
        "summary.json",
        "model.safetensors",
        "model.json",
        "best.safetensors",
        "checkpoint.latest",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // keep_last = 2: the two newest checkpoint folders remain, the pointer names the newest.
    let mut kept: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["checkpoint-0005", "checkpoint-0006"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("checkpoint.latest")).unwrap(),
        "checkpoint-0006"
    );
    // The exported model evaluates through the teacher loader.
    let t = kd_models::Teacher::load(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t.model().num_backbone_params(), s.deploy_params);
}

/// Trains 3 epochs straight, and 2 + a resumed 1 in a fresh "process" (a differently initialised
/// model, a fresh method): weights and metrics must match bit for bit. `stateful`: the method
/// keeps state between steps, which the checkpoint must hold.
fn check_resume_is_bit_identical(
    stateful: bool,
    pair: Option<kd_data::Pairing>,
    method: impl Fn(&kd_models::ResNet, &candle_nn::VarMap) -> Box<dyn kd_train::Distiller>,
) {
    let (model, vm, meta, tr, te) = setup_paired(3, 3, pair);
    let full = tempfile::tempdir().unwrap();
    train(
        solo(&model, &vm, &meta),
        &*method(&model, &vm),
        None,
        &tr,
        &te,
        &config(3, 0.05),
        full.path(),
        RunOptions::default(),
    )
    .unwrap();
    let uninterrupted = weights(&vm);

    let (model, vm, meta, tr, te) = setup_paired(3, 3, pair);
    let dir = tempfile::tempdir().unwrap();
    let stopped = train(
        solo(&model, &vm, &meta),
        &*method(&model, &vm),
        None,
        &tr,
        &te,
        &config(3, 0.05),
        dir.path(),
        RunOptions {
            resume: false,
            stop_after: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(stopped.is_none());
    let ckpt = kd_train::latest_checkpoint(dir.path()).unwrap();
    assert_eq!(ckpt.join("method.safetensors").exists(), stateful);
    // A fresh process: a differently initialised model, everything restored from the checkpoint.
    let (model, vm, meta, tr, te) = setup_paired(99, 3, pair);
    train(
        solo(&model, &vm, &meta),
        &*method(&model, &vm),
        None,
        &tr,
        &te,
        &config(3, 0.05),
        dir.path(),
        RunOptions {
            resume: true,
            stop_after: None,
            ..Default::default()
        },
    )
    .unwrap();
    let resumed = weights(&vm);
    let differing: Vec<&String> = resumed
        .iter()
        .zip(&uninterrupted)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| &a.0)
        .collect();
    assert!(
        differing.is_empty(),
        "weights differ after resume: {differing:?}"
    );
    let a = std::fs::read_to_string(full.path().join("metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let strip = |s: &str| {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["seconds"] = 0.into();
                v["images_per_sec"] = 0.into();
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&a),
        strip(&b),
        "metrics other than timings are identical"
    );
}

#[test]
fn resume_is_bit_identical() {
    check_resume_is_bit_identical(false, None, |_, _| baseline());
}

/// PS-KD's per-image memory of predictions, and DLB's batch carried to the next step (an
/// epoch's first step replays the last batch of the one before), are checkpointed and restored.
#[test]
fn resume_restores_a_methods_state() {
    for (name, pair) in [("pskd", None), ("dlb", Some(kd_data::Pairing::SecondView))] {
        check_resume_is_bit_identical(true, pair, |model, vm| {
            let vb = candle_nn::VarBuilder::from_varmap(vm, candle_core::DType::F32, &Device::Cpu);
            kd_train::MethodConfig::preset(name)
                .unwrap()
                .build(model, None, vb, 0.0)
                .unwrap()
        });
    }
}

#[test]
fn non_finite_loss_stops_with_epoch_and_step() {
    let (model, vm, meta, tr, te) = setup(1);
    let dir = tempfile::tempdir().unwrap();
    let err = train(
        solo(&model, &vm, &meta),
        &*baseline(),
        None,
        &tr,
        &te,
        &config(3, 1e30),
        dir.path(),
        RunOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("epoch") && err.to_string().contains("step"));
}

/// Online method `name` (dml, switokd) with a ResNet18 student and a tiny ResNet50 peer, built
/// from `init_seed`.
fn online(name: &str, init_seed: u64) -> kd_train::BuiltStudent {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 4)
    };
    let mut method = kd_train::MethodConfig::preset(name).unwrap();
    *method.peers_mut().unwrap() = vec![kd_train::PeerSpec::new(Arch::Resnet50, Stem::Cifar, 4)];
    kd_train::build_student(&cfg, &method, None, &Device::Cpu, init_seed, 0.0).unwrap()
}

#[test]
fn online_peers_are_logged_checkpointed_and_resumed_exactly() {
    for (name, term) in [("dml", "loss_dml"), ("switokd", "loss_switokd")] {
        online_peers_resume_exactly(name, term);
    }
}

/// DML's or SwitOKD's (`name`) peer is evaluated, logged (with the loss term `term`) and
/// exported, and stopping after one epoch and resuming ends bit for bit as the uninterrupted
/// run.
fn online_peers_resume_exactly(name: &str, term: &str) {
    let (_, _, meta, tr, te) = setup(5);
    let full = tempfile::tempdir().unwrap();
    let a = online(name, 5);
    let s = train(
        Student {
            model: &a.model,
            vars: &a.vars,
            meta: &meta,
            peers: &a.peers,
        },
        &*a.distiller,
        None,
        &tr,
        &te,
        &config(2, 0.05),
        full.path(),
        RunOptions::default(),
    )
    .unwrap()
    .unwrap();
    // Every peer is evaluated, logged and exported; trainable parameters count both networks.
    assert_eq!(s.peers.len(), 1);
    assert_eq!(s.peers[0].model, "resnet50");
    assert_eq!(
        s.trainable_params,
        a.model.num_params() + a.peers[0].model.num_params()
    );
    assert_eq!(s.deploy_params, a.model.num_backbone_params());
    let rows = kd_train::read_metrics(&full.path().join("metrics.jsonl")).unwrap();
    assert!(rows.iter().all(|r| r.peers.contains_key("peer1")
        && r.losses.contains_key(term)
        && r.peers["peer1"].losses.contains_key(term)));
    if name == "switokd" {
        // The share of steps the teacher sat out, a fraction.
        assert!(rows
            .iter()
            .all(|r| (0.0..=1.0).contains(&r.values["switokd_expert"])));
    }
    assert!(
        std::fs::read_to_string(full.path().join("metrics.csv"))
            .unwrap()
            .starts_with("epoch,")
            && std::fs::read_to_string(full.path().join("metrics.csv"))
                .unwrap()
                .contains("peer1_test_top1")
    );
    let peer_model = full.path().join("peer1/model.safetensors");
    assert_eq!(
        kd_models::Teacher::load(&peer_model, &Device::Cpu)
            .unwrap()
            .meta()
            .arch,
        Arch::Resnet50
    );
    peer_fidelity_is_the_exported_models(full.path(), &s, &te);
    let uninterrupted = (weights(&a.vars), weights(&a.peers[0].vars));

    // Stop after one epoch, resume in a "new process" built from another seed.
    let dir = tempfile::tempdir().unwrap();
    let b = online(name, 5);
    assert!(train(
        Student {
            model: &b.model,
            vars: &b.vars,
            meta: &meta,
            peers: &b.peers
        },
        &*b.distiller,
        None,
        &tr,
        &te,
        &config(2, 0.05),
        dir.path(),
        RunOptions {
            resume: false,
            stop_after: Some(1),
            ..Default::default()
        }
    )
    .unwrap()
    .is_none());
    let c = online(name, 77);
    train(
        Student {
            model: &c.model,
            vars: &c.vars,
            meta: &meta,
            peers: &c.peers,
        },
        &*c.distiller,
        None,
        &tr,
        &te,
        &config(2, 0.05),
        dir.path(),
        RunOptions {
            resume: true,
            stop_after: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        uninterrupted == (weights(&c.vars), weights(&c.peers[0].vars)),
        "{name}: student or peer differs after resume"
    );
}

/// DML, except that the networks `paused` names (0 the student, k its k-th peer) sit every
/// step out.
struct Pausing {
    dml: Box<dyn kd_train::Distiller>,
    paused: fn(usize) -> bool,
}

impl kd_train::Distiller for Pausing {
    fn name(&self) -> &'static str {
        "dml"
    }
    fn loss(
        &self,
        ctx: &kd_train::StepContext,
        batch: &kd_data::Batch,
        out: &kd_train::Outputs,
    ) -> candle_core::Result<kd_train::LossTerms> {
        let mut terms = self.dml.loss(ctx, batch, out)?;
        terms.paused = (self.paused)(out.member);
        Ok(terms)
    }
}

/// Trains `built` (DML, its networks paused as `paused` says) for one epoch at `lr`.
fn train_pausing(
    built: kd_train::BuiltStudent,
    paused: fn(usize) -> bool,
    lr: f64,
) -> kd_train::BuiltStudent {
    let (_, _, meta, tr, te) = setup(5);
    let dir = tempfile::tempdir().unwrap();
    let kd_train::BuiltStudent {
        model,
        vars,
        distiller,
        peers,
    } = built;
    let method = Pausing {
        dml: distiller,
        paused,
    };
    train(
        Student {
            model: &model,
            vars: &vars,
            meta: &meta,
            peers: &peers,
        },
        &method,
        None,
        &tr,
        &te,
        &config(1, lr),
        dir.path(),
        RunOptions::default(),
    )
    .unwrap()
    .unwrap();
    let rows = kd_train::read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert!(
        rows[0].peers["peer1"].losses["loss_dml"] > 0.0,
        "a paused network's loss is logged"
    );
    kd_train::BuiltStudent {
        model,
        vars,
        distiller: method.dml,
        peers,
    }
}

/// A network whose loss says it sits the step out is logged but not trained: a DML whose peer
/// pauses at every step ends with the peer's parameters bit for bit as they started (its
/// BatchNorm statistics moved with its train-mode forwards) and its losses logged, while the
/// student trains.
#[test]
fn a_paused_network_is_logged_but_not_trained() {
    let a = online("dml", 5);
    let start = (weights(&a.vars), weights(&a.peers[0].vars));
    let a = train_pausing(a, |member| member > 0, 0.05);
    let (student, peer) = (weights(&a.vars), weights(&a.peers[0].vars));
    assert!(student != start.0, "the student trains");
    for ((name, before), (_, after)) in start.1.iter().zip(&peer) {
        if name.contains("running_") {
            assert!(
                before != after,
                "{name}: the peer's BatchNorm statistics move"
            );
        } else {
            assert!(before == after, "{name}: a paused peer's parameter moved");
        }
    }
}

/// A peer's `lr_scale` multiplies the run's learning rate for it alone: with the student held
/// still (so the peer learns from the same targets in every run), a peer at twice half the
/// rate ends bit for bit as one at the full rate, and unlike one at half of it; the student's
/// parameters do not move in any of them.
#[test]
fn a_peers_learning_rate_is_the_runs_times_its_scale() {
    let peer_after = |lr: f64, lr_scale: f64| {
        let mut built = online("dml", 5);
        built.peers[0].lr_scale = lr_scale;
        let start = weights(&built.vars);
        let built = train_pausing(built, |member| member == 0, lr);
        let student: Vec<_> = weights(&built.vars)
            .into_iter()
            .zip(start)
            .filter(|((name, _), _)| !name.contains("running_"))
            .map(|((_, after), (_, before))| after == before)
            .collect();
        assert!(student.iter().all(|same| *same), "a paused student moved");
        weights(&built.peers[0].vars)
    };
    let full = peer_after(0.1, 1.0);
    assert!(peer_after(0.05, 2.0) == full, "lr 0.05 × 2 is not lr 0.1");
    assert!(peer_after(0.05, 1.0) != full, "the scale changed nothing");
}

/// The student of an online branch method (`method`'s preset, ramp-up off) built from
/// `init_seed`.
fn branched(method: &str, init_seed: u64) -> kd_train::BuiltStudent {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 4)
    };
    let mut method = kd_train::MethodConfig::preset(method).unwrap();
    match &mut method {
        kd_train::MethodConfig::One { rampup_epochs, .. }
        | kd_train::MethodConfig::Okddip { rampup_epochs, .. }
        | kd_train::MethodConfig::ClIlr { rampup_epochs, .. } => *rampup_epochs = 0.0,
        other => panic!("{} is not a branch method", other.name()),
    }
    kd_train::build_student(&cfg, &method, None, &Device::Cpu, init_seed, 0.0).unwrap()
}

/// ONE, OKDDip and CL-ILR keep their extra branches, ONE's gate (its BatchNorm's running
/// statistics included) and OKDDip's projections in the checkpoint: stopped after one epoch and
/// resumed in a "new process" built from another seed, every variable ends as the
/// uninterrupted run's, bit for bit; the summary counts the branches as trainable, not deployed.
#[test]
fn branch_methods_resume_exactly() {
    let (_, _, meta, tr, te) = setup(5);
    for method in ["one", "okddip", "cl_ilr"] {
        let run = |built: &kd_train::BuiltStudent, dir: &std::path::Path, options: RunOptions| {
            train(
                solo(&built.model, &built.vars, &meta),
                &*built.distiller,
                None,
                &tr,
                &te,
                &config(2, 0.05),
                dir,
                options,
            )
            .unwrap()
        };
        let full = tempfile::tempdir().unwrap();
        let a = branched(method, 5);
        let s = run(&a, full.path(), RunOptions::default()).unwrap();
        // The network's (branches and gate included) and the method's parts (OKDDip's).
        let trainable: usize = kd_train::trainable_vars(&a.vars)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        assert!(trainable >= a.model.num_params(), "{method}");
        assert_eq!(s.trainable_params, trainable, "{method}");
        assert_eq!(s.deploy_params, a.model.num_backbone_params(), "{method}");
        assert!(s.trainable_params > s.deploy_params, "{method}");
        let dir = tempfile::tempdir().unwrap();
        let stop = RunOptions {
            resume: false,
            stop_after: Some(1),
            ..Default::default()
        };
        assert!(run(&branched(method, 5), dir.path(), stop).is_none());
        let c = branched(method, 77);
        let resume = RunOptions {
            resume: true,
            stop_after: None,
            ..Default::default()
        };
        run(&c, dir.path(), resume);
        let (want, got) = (weights(&a.vars), weights(&c.vars));
        assert!(
            want.iter().any(|(k, _)| k.starts_with("branch1.")),
            "{method}"
        );
        let differing: Vec<&String> = got
            .iter()
            .zip(&want)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| &x.0)
            .collect();
        assert!(
            differing.is_empty(),
            "{method}: differ after resume: {differing:?}"
        );
    }
}

/// A finished DML run's last figures for its peer, recomputed from the exported student and
/// peer over the test loader: top-1 agreement and KL(student ‖ peer) at T = 1 in the summary and
/// in `metrics.csv`, and an ECE.
fn peer_fidelity_is_the_exported_models(run: &std::path::Path, s: &kd_train::Summary, te: &Loader) {
    let load = |p: &str| kd_models::Teacher::load(&run.join(p), &Device::Cpu).unwrap();
    let (student, peer) = (load("model.safetensors"), load("peer1/model.safetensors"));
    let (mut agree, mut kl, mut total, mut ensemble_hits) = (0usize, 0f64, 0usize, 0usize);
    for batch in te.epoch(0, 0) {
        let batch = batch.unwrap();
        let rows = |t: &kd_models::Teacher| -> Vec<Vec<f32>> {
            t.forward(&batch.images).unwrap().logits.to_vec2().unwrap()
        };
        let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
        for ((a, b), label) in rows(&student).iter().zip(rows(&peer)).zip(labels) {
            let log_softmax = |z: &[f32]| -> Vec<f64> {
                let m = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                z.iter().map(|&v| v as f64 - lse).collect()
            };
            let (la, lb) = (log_softmax(a), log_softmax(&b));
            let argmax = |l: &[f64]| (0..l.len()).max_by(|&i, &j| l[i].total_cmp(&l[j]));
            agree += usize::from(argmax(&la) == argmax(&lb));
            // The cohort ensemble: the two softmax averaged.
            let mean: Vec<f64> = la.iter().zip(&lb).map(|(p, q)| p.exp() + q.exp()).collect();
            ensemble_hits += usize::from(argmax(&mean) == Some(label as usize));
            kl += la
                .iter()
                .zip(&lb)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>();
            total += 1;
        }
    }
    let (agreement, kl) = (100.0 * agree as f64 / total as f64, kl / total as f64);
    let p = &s.peers[0];
    assert_eq!(p.last_student_agreement, Some(agreement));
    let got = p.last_student_kl.unwrap();
    assert!((got - kl).abs() < 1e-4 * (1.0 + kl), "KL {got} vs {kl}");
    assert!((0.0..=100.0).contains(&p.last_ece.unwrap()));
    let ensemble = 100.0 * ensemble_hits as f64 / total as f64;
    assert_eq!(s.last_cohort_ensemble_top1, Some(ensemble));
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let col = |name: &str| lines[0].iter().position(|c| *c == name).expect(name);
    let last: f64 = lines.last().unwrap()[col("peer1_student_agreement")]
        .parse()
        .unwrap();
    assert!((last - agreement).abs() < 1e-4, "{csv}");
    assert!(
        !lines.last().unwrap()[col("peer1_test_ece")].is_empty(),
        "{csv}"
    );
    assert_eq!(
        lines.last().unwrap()[col("cohort_ensemble_top1")],
        format!("{ensemble:.4}"),
        "{csv}"
    );
}

/// A frozen tiny ResNet50 teacher of the quadrant task, with the student's normalisation.
fn quadrant_teacher(dir: &std::path::Path, meta: &TeacherMeta) -> kd_models::Teacher {
    let cfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet50, Stem::CifarMaxpool, 4)
    };
    let (_, vm) = trainable_resnet(&cfg, &Device::Cpu, 11).unwrap();
    let meta = TeacherMeta {
        arch: cfg.arch,
        ..meta.clone()
    };
    let path = dir.join("teacher.safetensors");
    kd_train::export(&vm, &meta, &path).unwrap();
    kd_models::Teacher::load(&path, &Device::Cpu).unwrap()
}

/// The quadrant task with a frozen tiny ResNet50 teacher, and ResNet18 students for it.
struct TeacherTask {
    meta: TeacherMeta,
    train: kd_data::Loader,
    test: kd_data::Loader,
    teacher: kd_models::Teacher,
}

impl TeacherTask {
    /// The task of [`setup`]`(seed)`, its teacher written into `dir`.
    fn new(seed: u64, dir: &std::path::Path) -> Self {
        let (_, _, meta, train, test) = setup(seed);
        let teacher = quadrant_teacher(dir, &meta);
        TeacherTask {
            meta,
            train,
            test,
            teacher,
        }
    }

    /// A ResNet18 student (max-pool stem, width 4) for `method`, initialised from `seed`.
    fn student(&self, method: &kd_train::MethodConfig, seed: u64) -> kd_train::BuiltStudent {
        let scfg = ResNetConfig {
            base_width: 4,
            ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 4)
        };
        kd_train::build_student(&scfg, method, Some(&self.teacher), &Device::Cpu, seed, 0.0)
            .unwrap()
    }

    /// Trains `b` for `epochs` into `dir`.
    fn run(
        &self,
        b: &kd_train::BuiltStudent,
        epochs: usize,
        dir: &std::path::Path,
        opts: RunOptions,
    ) -> Option<kd_train::Summary> {
        train(
            solo(&b.model, &b.vars, &self.meta),
            b.distiller.as_ref(),
            Some(&self.teacher),
            &self.train,
            &self.test,
            &config(epochs, 0.05),
            dir,
            opts,
        )
        .unwrap()
    }
}

/// AB (two-stage): the init phase runs once, before epoch 1, and is checkpointed; it trains the
/// connectors and the body but not the classifier; the main run leaves the connectors as the
/// phase left them; and a run stopped right after the phase then resumed ends bit-identical to
/// an uninterrupted one.
#[test]
fn a_two_stage_method_runs_its_init_phase_once_and_resumes_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let task = TeacherTask::new(5, tmp.path());
    let method = kd_train::MethodConfig::Ab {
        weight: 3e-3,
        margin: 1.0,
        init_epochs: 2,
        init_lr: 0.05,
    };
    let build = || task.student(&method, 5);
    let pick = |w: &[(String, Vec<f32>)], prefix: &str| -> Vec<(String, Vec<f32>)> {
        w.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .cloned()
            .collect()
    };
    let run = |b: &kd_train::BuiltStudent, dir: &std::path::Path, opts: RunOptions| {
        task.run(b, 2, dir, opts)
    };

    let fresh = weights(&build().vars);
    let full = tmp.path().join("full");
    let b = build();
    let summary = run(&b, &full, RunOptions::default()).unwrap();
    assert!(summary.init_seconds > 0.0 && summary.train_seconds > summary.init_seconds);
    let rows: Vec<kd_train::InitEpoch> = std::fs::read_to_string(full.join("init_metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.loss.is_finite() && r.loss > 0.0),
        "{rows:?}"
    );
    let uninterrupted = weights(&b.vars);
    // The phase trained the connectors (the main run does not: checked below).
    let connectors = pick(&uninterrupted, "distill.ab.");
    assert!(!connectors.is_empty() && connectors != pick(&fresh, "distill.ab."));
    // Every variable was trained, the connectors in the phase only: all count as trainable.
    let trainable: usize = kd_train::trainable_vars(&b.vars)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(summary.trainable_params, trainable);

    let dir = tmp.path().join("resumed");
    let b = build();
    assert!(run(
        &b,
        &dir,
        RunOptions {
            stop_after: Some(0),
            ..Default::default()
        }
    )
    .is_none());
    let after_init = weights(&b.vars);
    // The phase trained the connectors and the body, not the classifier.
    assert_eq!(pick(&after_init, "fc."), pick(&fresh, "fc."));
    assert_ne!(pick(&after_init, "layer1."), pick(&fresh, "layer1."));
    assert_eq!(
        pick(&after_init, "distill.ab."),
        connectors,
        "the main run moved the connectors"
    );
    let ckpt = kd_train::latest_checkpoint(&dir).unwrap();
    assert!(ckpt.ends_with("checkpoint-0000"), "{}", ckpt.display());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    let init_seconds = state["init_seconds"].as_f64().unwrap();
    // A fresh process resumes after the phase: it does not run it again.
    std::fs::write(dir.join("init_metrics.jsonl"), "marker\n").unwrap();
    let b = build();
    let resumed = run(
        &b,
        &dir,
        RunOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("init_metrics.jsonl")).unwrap(),
        "marker\n"
    );
    assert_eq!(resumed.init_seconds, init_seconds);
    let differing: Vec<String> = weights(&b.vars)
        .iter()
        .zip(&uninterrupted)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.clone())
        .collect();
    assert!(
        differing.is_empty(),
        "weights differ after resume: {differing:?}"
    );
}

/// A value a method reports beside its losses (CTKD's temperature) is logged per epoch in
/// `metrics.jsonl` (`values`) and `metrics.csv`, within the temperature's range, and not added
/// to the loss.
#[test]
fn reported_values_are_logged_beside_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let task = TeacherTask::new(6, tmp.path());
    let b = task.student(&kd_train::MethodConfig::preset("ctkd").unwrap(), 6);
    let dir = tmp.path().join("ctkd");
    task.run(&b, 1, &dir, RunOptions::default());
    let row: kd_train::EpochMetrics = serde_json::from_str(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let tau = row.values["temperature"];
    assert!((1.0..21.0).contains(&tau), "{row:?}");
    let total: f64 = row.losses.values().sum();
    assert!((row.train_loss - total).abs() < 1e-3 * total, "{row:?}");
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with("loss_ce,loss_kd,temperature"),
        "{csv}"
    );
}

/// With a teacher, every epoch records the student's calibration and its fidelity to the teacher
/// on the test split, and the summary the teacher's own top-1: checked against the exported
/// student and the teacher run over the test loader here. A run resumed over rows written by an
/// older kd (without those figures) writes `metrics.csv` anew in one set of columns, the old
/// row's new cells empty.
#[test]
fn a_teacher_run_records_calibration_and_fidelity_and_resumes_over_older_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let task = TeacherTask::new(6, tmp.path());
    let method = kd_train::MethodConfig::preset("kd").unwrap();
    let dir = tmp.path().join("run");
    let stop = RunOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    assert!(task.run(&task.student(&method, 6), 2, &dir, stop).is_none());
    // Epoch 1's row as an older kd wrote it: no calibration or fidelity, an older CSV header.
    let jsonl = dir.join("metrics.jsonl");
    let mut row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&jsonl).unwrap().trim()).unwrap();
    for key in ["test_ece", "teacher_agreement", "teacher_kl"] {
        assert!(row[key].as_f64().is_some(), "{key}: {row}");
        row.as_object_mut().unwrap().remove(key);
    }
    std::fs::write(&jsonl, format!("{row}\n")).unwrap();
    std::fs::write(dir.join("metrics.csv"), "epoch,lr\n1,0.05\n").unwrap();
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let s = task
        .run(&task.student(&method, 6), 2, &dir, resume)
        .unwrap();

    let rows: Vec<kd_train::EpochMetrics> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].test_ece, None);
    let last = &rows[1];
    let ece = last.test_ece.unwrap();
    assert!((0.0..=100.0).contains(&ece), "{ece}");
    assert_eq!(s.last_ece, Some(ece));
    // The summary's confidence bins are that evaluation's: every test image, the same ECE.
    let bins = s.last_calibration.as_ref().unwrap();
    assert_eq!(bins.total(), task.test.split().len());
    assert!(
        (bins.ece_pct() - ece).abs() < 1e-9,
        "{} vs {ece}",
        bins.ece_pct()
    );
    assert_eq!(s.last_teacher_agreement, last.teacher_agreement);
    assert_eq!(s.last_teacher_kl, last.teacher_kl);
    assert!(last.teacher_kl.unwrap() >= 0.0);

    // Independently: the teacher and the exported student over the test loader.
    let student = kd_models::Teacher::load(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut agree, mut correct, mut total) = (0usize, 0usize, 0usize);
    for batch in task.test.epoch(0, 0) {
        let batch = batch.unwrap();
        let argmax = |t: &kd_models::Teacher| -> Vec<u32> {
            t.forward(&batch.images)
                .unwrap()
                .logits
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (t, st) = (argmax(&task.teacher), argmax(&student));
        let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
        agree += t.iter().zip(&st).filter(|(a, b)| a == b).count();
        correct += t.iter().zip(&labels).filter(|(a, b)| a == b).count();
        total += labels.len();
    }
    let pct = |n: usize| 100.0 * n as f64 / total as f64;
    assert_eq!(s.teacher_top1, Some(pct(correct)));
    assert_eq!(s.last_teacher_agreement, Some(pct(agree)));

    // metrics.csv: one header, every line as wide, the older row's new cells empty.
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let col = |name: &str| lines[0].iter().position(|c| *c == name).expect(name);
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{csv}");
    for name in ["test_ece", "teacher_agreement", "teacher_kl"] {
        assert_eq!(lines[1][col(name)], "", "{name}: {csv}");
    }
    let agreement: f64 = lines[2][col("teacher_agreement")].parse().unwrap();
    assert!((agreement - pct(agree)).abs() < 1e-4, "{csv}");
    assert!(!lines[2][col("loss_kd")].is_empty(), "{csv}");
}

/// BYOT's auxiliary heads are evaluated each epoch: the last row's `head_top1` is each head's
/// accuracy of the trained model on the test loader, computed here from its outputs. Resumed
/// over a row written by an older kd (without them), `metrics.csv` keeps the heads' columns,
/// that row's cells empty.
#[test]
fn each_auxiliary_heads_accuracy_is_logged() {
    let (_, _, meta, tr, te) = setup(7);
    let scfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 4)
    };
    let method = kd_train::MethodConfig::preset("byot").unwrap();
    let b = kd_train::build_student(&scfg, &method, None, &Device::Cpu, 7, 0.0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |opts: RunOptions| {
        train(
            solo(&b.model, &b.vars, &meta),
            b.distiller.as_ref(),
            None,
            &tr,
            &te,
            &config(2, 0.05),
            dir.path(),
            opts,
        )
        .unwrap()
    };
    run(RunOptions {
        stop_after: Some(1),
        ..Default::default()
    });
    let jsonl = dir.path().join("metrics.jsonl");
    let mut first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&jsonl).unwrap().trim()).unwrap();
    assert_eq!(
        first["head_top1"].as_array().map(Vec::len),
        Some(3),
        "{first}"
    );
    let old = first.as_object_mut().unwrap();
    assert!(old.remove("head_top1").is_some() && old.remove("head_ensemble_top1").is_some());
    std::fs::write(&jsonl, format!("{first}\n")).unwrap();
    run(RunOptions {
        resume: true,
        ..Default::default()
    });
    let last: kd_train::EpochMetrics = serde_json::from_str(
        std::fs::read_to_string(&jsonl)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let (mut hits, mut total, mut ensemble_hits) = (vec![0usize; 3], 0usize, 0usize);
    for batch in te.epoch(0, 0) {
        let batch = batch.unwrap();
        let out = b.model.forward_t(&batch.images, false).unwrap();
        let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
        for (h, aux) in hits.iter_mut().zip(&out.aux) {
            let pred: Vec<u32> = aux
                .logits
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap();
            *h += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        // The heads' ensemble with the final classifier: their softmax averaged, in f64.
        let mut mean = vec![vec![0f64; out.logits.dim(1).unwrap()]; labels.len()];
        for logits in std::iter::once(&out.logits).chain(out.aux.iter().map(|a| &a.logits)) {
            let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
            for (m, z) in mean.iter_mut().zip(&rows) {
                let top = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
                let e: Vec<f64> = z.iter().map(|&v| (v as f64 - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (mk, ek) in m.iter_mut().zip(&e) {
                    *mk += ek / sum;
                }
            }
        }
        for (m, &l) in mean.iter().zip(&labels) {
            let pred = (0..m.len()).max_by(|&i, &j| m[i].total_cmp(&m[j])).unwrap();
            ensemble_hits += usize::from(pred == l as usize);
        }
        total += labels.len();
    }
    let want: Vec<f64> = hits
        .iter()
        .map(|&h| 100.0 * h as f64 / total as f64)
        .collect();
    assert_eq!(last.head_top1, want);
    let ensemble = 100.0 * ensemble_hits as f64 / total as f64;
    assert_eq!(last.head_ensemble_top1, Some(ensemble));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{csv}");
    for (k, want) in want.iter().enumerate() {
        let col = lines[0]
            .iter()
            .position(|c| *c == format!("head{}_top1", k + 1))
            .unwrap();
        assert_eq!(lines[1][col], "", "{csv}");
        assert_eq!(lines[2][col], format!("{want:.4}"), "{csv}");
    }
    let col = lines[0]
        .iter()
        .position(|c| *c == "head_ensemble_top1")
        .unwrap();
    assert_eq!(lines[1][col], "", "{csv}");
    assert_eq!(lines[2][col], format!("{ensemble:.4}"), "{csv}");
}
