//! The multi-branch network of ONE, CL-ILR and OKDDip (`ResNetConfig::branches`): each extra
//! branch is a copy of the last stage and classifier on the trunk's output — its names, its
//! parameters and MACs in closed form, and its outputs equal to a plain network holding its
//! weights; CL-ILR's trunk-gradient rescaling and ONE's gate.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kd_kernels::MemoryFormat;
use kd_models::{trainable_resnet, Arch, ResNet, ResNetConfig, Stem};
use kd_testkit::bits;

fn config(arch: Arch, branches: usize) -> ResNetConfig {
    ResNetConfig {
        base_width: 4,
        branches,
        ..ResNetConfig::new(arch, Stem::Cifar, 5)
    }
}

/// Branch `i` (2 and 3) holds exactly the keys and shapes of the backbone's `layer4.*` and
/// `fc.*` under `branch{i-1}.`; everything else is the plain network's.
#[test]
fn extra_branches_copy_the_last_stage_and_classifier() {
    for arch in [Arch::Resnet18, Arch::Resnet50] {
        let (plain, pv) = trainable_resnet(&config(arch, 1), &Device::Cpu, 0).unwrap();
        let (multi, mv) = trainable_resnet(&config(arch, 3), &Device::Cpu, 0).unwrap();
        let shapes = |vm: &candle_nn::VarMap| -> HashMap<String, Vec<usize>> {
            let data = vm.data().lock().unwrap();
            data.iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect()
        };
        let (p, m) = (shapes(&pv), shapes(&mv));
        let copied: Vec<(&String, &Vec<usize>)> = p
            .iter()
            .filter(|(k, _)| k.starts_with("layer4.") || k.starts_with("fc."))
            .collect();
        let mut want = p.clone();
        for i in 1..3 {
            for (k, dims) in &copied {
                want.insert(format!("branch{i}.{k}"), dims.to_vec());
            }
        }
        assert_eq!(m, want, "{arch:?}");
        assert_eq!((plain.num_branches(), multi.num_branches()), (1, 3));
        let copy: usize = copied
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        // Trainable tensors only: the copied BN running statistics do not count.
        let stats: usize = copied
            .iter()
            .filter(|(k, _)| k.contains("running_"))
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        assert_eq!(
            multi.num_params(),
            plain.num_params() + 2 * (copy - stats),
            "{arch:?}"
        );
        assert_eq!(multi.num_backbone_params(), plain.num_backbone_params());
    }
}

/// A branch gives the bits of a plain network whose last stage and classifier are that
/// branch's weights, in train and eval mode, channels-first and channels-last; the network's
/// own logits do not change with the branches beside them.
#[test]
fn a_branch_is_the_network_with_its_weights() {
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    for arch in [Arch::Resnet18, Arch::Resnet50] {
        let (mut multi, mv) = trainable_resnet(&config(arch, 3), &Device::Cpu, 4).unwrap();
        let data: HashMap<String, Tensor> = mv
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        let plain_with = |prefix: &str| -> ResNet {
            let tensors: HashMap<String, Tensor> = data
                .iter()
                .filter(|(k, _)| !k.starts_with("branch"))
                .map(|(k, _)| {
                    let own = k.starts_with("layer4.") || k.starts_with("fc.");
                    let src = if own {
                        format!("{prefix}{k}")
                    } else {
                        k.clone()
                    };
                    (k.clone(), data[&src].clone())
                })
                .collect();
            // Variables, so that batch statistics train the running ones as the branch's do.
            let vm = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let net = ResNet::new(&config(arch, 1), vb).unwrap();
            for (k, v) in vm.data().lock().unwrap().iter() {
                v.set(&tensors[k]).unwrap();
            }
            net
        };
        let mut nets = [
            plain_with(""),
            plain_with("branch1."),
            plain_with("branch2."),
        ];
        for format in [MemoryFormat::ChannelsFirst, MemoryFormat::ChannelsLast] {
            multi.set_memory_format(format).unwrap();
            for n in nets.iter_mut() {
                n.set_memory_format(format).unwrap();
            }
            for train in [false, true] {
                let out = multi.forward_t(&x, train).unwrap();
                assert_eq!(out.branches.len(), 2);
                let tag = format!("{arch:?} {format:?} train {train}");
                let own = nets[0].forward_t(&x, train).unwrap();
                assert_eq!(bits(&out.logits), bits(&own.logits), "{tag}");
                for (b, net) in out.branches.iter().zip(&nets[1..]) {
                    let want = net.forward_t(&x, train).unwrap();
                    assert_eq!(bits(&b.logits), bits(&want.logits), "{tag}");
                    assert_eq!(bits(&b.pooled), bits(&want.pooled), "{tag}");
                }
            }
        }
    }
}

/// Each extra branch of a CIFAR ResNet18 costs its last stage on a 4×4 map plus the classifier,
/// in closed form; the backbone's count does not change.
#[test]
fn branch_macs_in_closed_form() {
    let build = |branches| {
        let cfg = ResNetConfig {
            branches,
            ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10)
        };
        ResNet::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))
            .unwrap()
            .macs(32, 32)
    };
    // layer4 on the 8×8, 256-channel trunk: a strided 3×3 256→512 and a 1×1 shortcut to 4×4,
    // then three 3×3 512→512 at 4×4; the classifier 512 → 10.
    let stage: u64 = 16 * (256 * 512 * 9 + 256 * 512 + 3 * 512 * 512 * 9);
    let branch = stage + 512 * 10;
    assert_eq!(branch, 134_222_848);
    let (plain, multi) = (build(1), build(3));
    assert_eq!(plain.branches, 0);
    assert_eq!(multi.backbone, plain.backbone);
    assert_eq!(multi.branches, 2 * branch);
}

/// Zero-init-residual reaches the branches' blocks too, and a branch starts from its own draw,
/// not the backbone's weights.
#[test]
fn branches_are_initialised_like_the_stage_they_copy() {
    let cfg = ResNetConfig {
        zero_init_residual: true,
        ..config(Arch::Resnet18, 2)
    };
    let (_, vm) = trainable_resnet(&cfg, &Device::Cpu, 9).unwrap();
    let data = vm.data().lock().unwrap();
    let get = |k: &str| {
        data[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(get("branch1.layer4.1.bn2.weight").iter().all(|v| *v == 0.0));
    assert!(get("branch1.layer4.1.bn1.weight").iter().all(|v| *v == 1.0));
    assert_ne!(
        get("branch1.layer4.0.conv1.weight"),
        get("layer4.0.conv1.weight")
    );
}

#[test]
fn no_branches_is_an_error() {
    let err = ResNet::new(
        &config(Arch::Resnet18, 0),
        VarBuilder::zeros(DType::F32, &Device::Cpu),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("branches > 0"), "{err}");
}

/// ILR (`rescale_trunk_grad`) leaves the forward pass's bits as they are, divides the gradient
/// that reaches the trunk by the number of branches, and leaves the branches' own gradients
/// alone.
#[test]
fn ilr_divides_the_trunks_gradient_by_the_branches() {
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let run = |ilr: bool| {
        let cfg = ResNetConfig {
            rescale_trunk_grad: ilr,
            ..config(Arch::Resnet18, 3)
        };
        let (model, vm) = trainable_resnet(&cfg, &Device::Cpu, 5).unwrap();
        let out = model.forward_t(&x, true).unwrap();
        let mut loss = out.logits.sqr().unwrap().sum_all().unwrap();
        for b in &out.branches {
            loss = (loss + b.logits.sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let grad = |k: &str| {
            grads
                .get(data[k].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let keys = [
            "layer3.1.conv2.weight",
            "conv1.weight",
            "layer4.0.conv1.weight",
            "branch2.fc.weight",
        ];
        (bits(&out.logits), keys.map(grad))
    };
    let (plain_logits, plain) = run(false);
    let (ilr_logits, ilr) = run(true);
    assert_eq!(plain_logits, ilr_logits);
    for (k, (a, b)) in plain.iter().zip(&ilr).enumerate() {
        let scale = if k < 2 { 1.0 / 3.0 } else { 1.0 };
        let worst = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p * scale - q).abs())
            .fold(0f32, f32::max);
        let norm = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * norm, "gradient {k}: {worst} against {norm}");
    }
}

/// ONE's gate (`gate`): its keys, its parameters counted with the branches, and its ensemble a
/// convex combination of the branches' logits, class by class, in train and eval mode; a
/// training pass moves its running statistics.
#[test]
fn the_gate_mixes_the_branches() {
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let cfg = ResNetConfig {
        gate: true,
        ..config(Arch::Resnet18, 3)
    };
    let (model, vm) = trainable_resnet(&cfg, &Device::Cpu, 2).unwrap();
    let (plain, _) = trainable_resnet(&config(Arch::Resnet18, 3), &Device::Cpu, 2).unwrap();
    let trunk = plain.feature_info()[3].channels;
    {
        let data = vm.data().lock().unwrap();
        let gate: Vec<&str> = {
            let mut k: Vec<&str> = data
                .keys()
                .filter(|k| k.starts_with("gate."))
                .map(|k| k.as_str())
                .collect();
            k.sort();
            k
        };
        assert_eq!(
            gate,
            [
                "gate.bn.bias",
                "gate.bn.running_mean",
                "gate.bn.running_var",
                "gate.bn.weight",
                "gate.fc.bias",
                "gate.fc.weight"
            ]
        );
    }
    assert_eq!(
        model.num_params(),
        plain.num_params() + trunk * 3 + 3 + 2 * 3
    );
    assert_eq!(model.num_backbone_params(), plain.num_backbone_params());
    let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
    let running_mean = || {
        let data = vm.data().lock().unwrap();
        bits(data["gate.bn.running_mean"].as_tensor())
    };
    let before = running_mean();
    for train in [true, false] {
        let out = model.forward_t(&x, train).unwrap();
        let gated = rows(out.gated.as_ref().unwrap());
        let each: Vec<Vec<Vec<f32>>> = std::iter::once(&out.logits)
            .chain(out.branches.iter().map(|b| &b.logits))
            .map(rows)
            .collect();
        for (i, row) in gated.iter().enumerate() {
            for (k, v) in row.iter().enumerate() {
                let (lo, hi) = each.iter().fold((f32::MAX, f32::MIN), |(lo, hi), z| {
                    (lo.min(z[i][k]), hi.max(z[i][k]))
                });
                assert!(
                    *v >= lo - 1e-5 && *v <= hi + 1e-5,
                    "{v} outside [{lo}, {hi}]"
                );
            }
        }
    }
    // The training pass above moved the gate's running statistics (eval mode reads them).
    assert_ne!(running_mean(), before);
    let err = ResNet::new(
        &ResNetConfig {
            gate: true,
            ..config(Arch::Resnet18, 1)
        },
        VarBuilder::zeros(DType::F32, &Device::Cpu),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("branches ≥ 2"), "{err}");
}
