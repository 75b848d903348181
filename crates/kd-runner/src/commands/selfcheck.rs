//! `kd-runner selfcheck --device cuda`: every custom op and kernel on the device against the
//! CPU path, forward and backward, at each precision, then one whole ResNet training step, then
//! every distillation method's first step (loss and all gradients).
//! Prints one row per check (max relative error and its bound) and fails if any is out of
//! bounds. The device script runs it before any timing; on the CPU it compares the CPU with
//! itself (a smoke run of the command, nothing more).
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use kd_data::{Loader, LoaderConfig, Mix, Normalize, Split};
use kd_kernels::{
    augment_batch, batch_norm_train_add_relu, batch_norm_train_add_relu_nhwc,
    batch_norm_train_nhwc, batch_norm_train_update, to_channels_last, AugmentPlan, Conv2dGeometry,
    ConvAlgoSearch, MaxPool2d, MemoryFormat, Normalisation, Precision,
};
use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

/// Arguments of `selfcheck`.
#[derive(Clone, Debug, clap::Args)]
pub struct SelfcheckArgs {
    /// The device to check against the CPU: cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

/// `t` (N, C, H, W) in `format`: contiguous (N, H, W, C) for channels-last.
fn laid_out(t: &Tensor, format: MemoryFormat) -> candle_core::Result<Tensor> {
    match format {
        MemoryFormat::ChannelsFirst => Ok(t.clone()),
        MemoryFormat::ChannelsLast => to_channels_last(t)?.contiguous(),
    }
}

/// ", channels-last" for row names (nothing for channels-first, as rows were named before).
fn format_tag(format: MemoryFormat) -> &'static str {
    match format {
        MemoryFormat::ChannelsFirst => "",
        MemoryFormat::ChannelsLast => ", channels-last",
    }
}

/// max |a − b| / max |b|, both compared in f32 on the CPU.
fn rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-12);
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? / scale)
}

/// ‖a − b‖₂ / ‖b‖₂: for whole-network outputs, where single elements may legitimately move
/// (a bf16 tie in a max-pool routes a gradient elsewhere).
fn rel_l2(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let d = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(d / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-12))
}

struct Checks {
    rows: Vec<(String, f32, f32)>,
}

impl Checks {
    fn add(&mut self, name: String, err: f32, bound: f32) {
        let ok = if err <= bound { "ok" } else { "FAIL" };
        println!("| {name} | {err:.2e} | {bound:.0e} | {ok} |");
        self.rows.push((name, err, bound));
    }

    /// How many rows are out of bounds (a NaN is).
    fn failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.1.is_nan() || r.1 > r.2)
            .count()
    }

    /// Runs `body`, a group of checks that adds its own rows. An error in it (a shape or
    /// algorithm the device refuses, a failed launch) does not end selfcheck: it becomes a
    /// failing row, `{name}: error: {message}`, and the groups after it still run, so the device
    /// script's fallbacks see which family failed and the rest is still checked.
    fn guard(&mut self, name: &str, body: impl FnOnce(&mut Checks) -> anyhow::Result<()>) {
        if let Err(e) = body(self) {
            let message = format!("{e:#}").replace(['|', '\n'], " ");
            self.add(format!("{name}: error: {message}"), f32::NAN, 0.0);
        }
    }
}

fn bound(p: Precision) -> f32 {
    match p {
        Precision::F32 => 1e-4,
        Precision::Tf32 => 1e-2,
        Precision::Bf16 => 5e-2,
    }
}

/// Values in [-1, 1) from the tests' seeded generator ([`kd_testkit::seeded`]), copied to `dev`.
fn rand(shape: &[usize], seed: u64, dev: &Device) -> anyhow::Result<Tensor> {
    Ok(kd_testkit::seeded(shape, seed).to_device(dev)?)
}

fn check_conv(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    // ResNet18/50 shapes at CIFAR sizes: 3×3 stride 1 and 2, 1×1 shortcuts and bottlenecks.
    let cases = [
        (64, 3, 32, 64, 3, 1),
        (64, 64, 32, 128, 3, 2),
        (64, 64, 32, 128, 1, 2),
        (64, 256, 8, 64, 1, 1),
        (64, 512, 4, 512, 3, 1),
    ];
    // On CUDA each precision runs under both algorithm searches, and the heuristics' choice
    // among deterministic algorithms only: a benchmark may pick algorithms (FFT, Winograd) the
    // heuristics do not, and `train.deterministic` others again. The CPU path has no search.
    let searches: &[(ConvAlgoSearch, bool)] = if dev.is_cuda() {
        &[
            (ConvAlgoSearch::Heuristic, false),
            (ConvAlgoSearch::Benchmark, false),
            (ConvAlgoSearch::Heuristic, true),
        ]
    } else {
        &[(ConvAlgoSearch::Heuristic, false)]
    };
    for p in Precision::ALL {
        p.apply();
        for (i, &(n, ci, hw, co, k, s)) in cases.iter().enumerate() {
            let g = Conv2dGeometry {
                stride: s,
                padding: k / 2,
            };
            let x = rand(&[n, ci, hw, hw], 10 + i as u64, &Device::Cpu)?;
            let w = (rand(&[co, ci, k, k], 20 + i as u64, &Device::Cpu)? * 0.1)?;
            let r = rand(
                &[
                    n,
                    co,
                    (hw + 2 * (k / 2) - k) / s + 1,
                    (hw + 2 * (k / 2) - k) / s + 1,
                ],
                30,
                &Device::Cpu,
            )?;
            // CPU reference in f32 on the same (bf16-rounded, for bf16) operands, once for
            // every search.
            let dt = p.activation_dtype();
            let (xr, wr) = (
                x.to_dtype(dt)?.to_dtype(DType::F32)?,
                w.to_dtype(dt)?.to_dtype(DType::F32)?,
            );
            let (xv, wv) = (Var::from_tensor(&xr)?, Var::from_tensor(&wr)?);
            let y_ref = xv.conv2d(&wv, g.padding, g.stride, 1, 1)?;
            let gr = (&y_ref * &r)?.sum_all()?.backward()?;
            // Each search in both layouts (channels-last: cuDNN's NHWC descriptors, the kernel
            // as (K, R, S, C)), against the one channels-first reference.
            let settings = searches
                .iter()
                .flat_map(|&s| MemoryFormat::ALL.into_iter().map(move |f| (s, f)));
            for ((search, deterministic), format) in settings {
                search.apply();
                kd_kernels::conv_algo::require_deterministic(deterministic);
                let choice = match (search, deterministic) {
                    (_, true) => ", deterministic algorithm",
                    (ConvAlgoSearch::Heuristic, _) => "",
                    (ConvAlgoSearch::Benchmark, _) => ", benchmarked algorithm",
                };
                let layout = format_tag(format);
                let tag = format!("conv {n}×{ci}×{hw}² → {co}, {k}×{k}/s{s}, {p}{choice}{layout}");
                c.guard(&tag, |c| {
                    let (xd, wd) = (
                        Var::from_tensor(&laid_out(&x.to_dtype(dt)?.to_device(dev)?, format)?)?,
                        Var::from_tensor(&laid_out(&w.to_dtype(dt)?.to_device(dev)?, format)?)?,
                    );
                    let y = format
                        .nchw_view(&kd_kernels::conv::conv2d_custom_in(&xd, &wd, g, format)?)?;
                    let gd = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?
                        .sum_all()?
                        .backward()?;
                    c.add(format!("{tag}: forward"), rel(&y, &y_ref)?, bound(p));
                    let gx = gd
                        .get(&xd)
                        .ok_or_else(|| anyhow::anyhow!("no input gradient"))?;
                    let gw = gd
                        .get(&wd)
                        .ok_or_else(|| anyhow::anyhow!("no kernel gradient"))?;
                    c.add(
                        format!("{tag}: backward data"),
                        rel(&format.nchw_view(gx)?, gr.get(&xv).unwrap())?,
                        bound(p),
                    );
                    c.add(
                        format!("{tag}: backward filter"),
                        rel(&format.nchw_view(gw)?, gr.get(&wv).unwrap())?,
                        bound(p),
                    );
                    Ok(())
                });
            }
        }
    }
    Precision::F32.apply();
    ConvAlgoSearch::Heuristic.apply();
    kd_kernels::conv_algo::require_deterministic(false);
    Ok(())
}

fn check_batch_norm(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    for dt in [DType::F32, DType::BF16] {
        for relu in [false, true] {
            let (n, ch, hw) = (64, 128, 16);
            let x = ((rand(&[n, ch, hw, hw], 40, &Device::Cpu)? * 3.0)? + 0.5)?.to_dtype(dt)?;
            let w = rand(&[ch], 41, &Device::Cpu)?;
            let b = rand(&[ch], 42, &Device::Cpu)?;
            let r = rand(&[n, ch, hw, hw], 43, &Device::Cpu)?;
            let running_mean0 = rand(&[ch], 46, &Device::Cpu)?;
            let running_var0 = (rand(&[ch], 47, &Device::Cpu)?.abs()? + 0.5)?;
            let shortcut = rand(&[n, ch, hw, hw], 48, &Device::Cpu)?.to_dtype(dt)?;
            // With `tail`, a residual block's tail in training mode, relu(BN(x) + shortcut).
            // The activations and their gradients in `format`, compared as (N, C, H, W).
            let run = |d: &Device, tail: bool, format| -> anyhow::Result<Vec<Tensor>> {
                let (xv, wv, bv) = (
                    Var::from_tensor(&laid_out(&x.to_device(d)?, format)?)?,
                    Var::from_tensor(&w.to_device(d)?)?,
                    Var::from_tensor(&b.to_device(d)?)?,
                );
                // The running statistics from non-trivial values, updated in place (on CUDA by
                // the statistics' last launch).
                let (rm, rv) = (running_mean0.to_device(d)?, running_var0.to_device(d)?);
                let running = kd_kernels::RunningStats {
                    mean: &rm,
                    var: &rv,
                    momentum: 0.1,
                };
                let sv = Var::from_tensor(&laid_out(&shortcut.to_device(d)?, format)?)?;
                let out = match (tail, format) {
                    (false, MemoryFormat::ChannelsFirst) => {
                        batch_norm_train_update(&xv, &wv, &bv, 1e-5, relu, running)?
                    }
                    (false, MemoryFormat::ChannelsLast) => {
                        batch_norm_train_nhwc(&xv, &wv, &bv, 1e-5, relu, Some(running))?
                    }
                    (true, MemoryFormat::ChannelsFirst) => {
                        batch_norm_train_add_relu(&xv, &wv, &bv, &sv, 1e-5, Some(running))?
                    }
                    (true, MemoryFormat::ChannelsLast) => {
                        batch_norm_train_add_relu_nhwc(&xv, &wv, &bv, &sv, 1e-5, Some(running))?
                    }
                };
                let y = format.nchw_view(&out.y)?;
                let g = (y.to_dtype(DType::F32)? * r.to_device(d)?)?
                    .sum_all()?
                    .backward()?;
                let mut checked = vec![
                    y,
                    out.mean,
                    out.var,
                    format.nchw_view(g.get(&xv).unwrap())?,
                    g.get(&wv).unwrap().clone(),
                    g.get(&bv).unwrap().clone(),
                    rm,
                    rv,
                ];
                checked.extend(g.get(&sv).map(|t| format.nchw_view(t)).transpose()?);
                Ok(checked)
            };
            let tol = if dt == DType::BF16 { 2e-2 } else { 1e-4 };
            let names = [
                "y",
                "mean",
                "var",
                "dx",
                "dγ",
                "dβ",
                "running mean",
                "running var",
                "d shortcut",
            ];
            for tail in [false, true].into_iter().filter(|&t| relu || !t) {
                let e = run(&Device::Cpu, tail, MemoryFormat::ChannelsFirst)?;
                for format in MemoryFormat::ALL {
                    let layout = format_tag(format);
                    let what = match tail {
                        false => format!("batch norm {dt:?} relu={relu}{layout}"),
                        true => format!("batch norm train tail {dt:?}{layout}"),
                    };
                    c.guard(&what, |c| {
                        let a = run(dev, tail, format)?;
                        for (k, name) in names.iter().enumerate().take(a.len()) {
                            c.add(format!("{what}: {name}"), rel(&a[k], &e[k])?, tol);
                        }
                        Ok(())
                    });
                }
            }
            // Eval mode with constants (a frozen teacher's path: on CUDA one kernel reading the
            // running statistics) against the CPU's scale-and-shift pass; with a residual, a
            // block's eval-mode tail relu(BN(x) + residual), on CUDA one kernel too.
            let mean = rand(&[ch], 44, &Device::Cpu)?;
            let var = (rand(&[ch], 45, &Device::Cpu)?.abs()? + 0.5)?;
            let residual = r.to_dtype(dt)?;
            let eval = |d: &Device, tail: bool, format| -> anyhow::Result<Tensor> {
                let on = |t: &Tensor| t.to_device(d);
                let (w, b, m, v) = (on(&w)?, on(&b)?, on(&mean)?, on(&var)?);
                let (x, res) = (
                    laid_out(&on(&x)?, format)?,
                    laid_out(&on(&residual)?, format)?,
                );
                let y = match (tail, format) {
                    (true, MemoryFormat::ChannelsFirst) => {
                        kd_kernels::batch_norm_eval_add_relu(&x, &w, &b, &m, &v, 1e-5, &res)?
                    }
                    (true, MemoryFormat::ChannelsLast) => {
                        kd_kernels::batch_norm_eval_add_relu_nhwc(&x, &w, &b, &m, &v, 1e-5, &res)?
                    }
                    (false, MemoryFormat::ChannelsFirst) => {
                        kd_kernels::batch_norm_eval(&x, &w, &b, &m, &v, 1e-5, relu)?
                    }
                    (false, MemoryFormat::ChannelsLast) => {
                        kd_kernels::batch_norm_eval_nhwc(&x, &w, &b, &m, &v, 1e-5, relu)?
                    }
                };
                Ok(format.nchw_view(&y)?)
            };
            let first = MemoryFormat::ChannelsFirst;
            for format in MemoryFormat::ALL {
                let layout = format_tag(format);
                c.guard(
                    &format!("batch norm eval {dt:?} relu={relu}{layout}"),
                    |c| {
                        c.add(
                            format!("batch norm eval {dt:?} relu={relu}{layout}: y"),
                            rel(
                                &eval(dev, false, format)?,
                                &eval(&Device::Cpu, false, first)?,
                            )?,
                            tol,
                        );
                        if relu {
                            c.add(
                                format!("batch norm eval tail {dt:?}{layout}: y"),
                                rel(&eval(dev, true, format)?, &eval(&Device::Cpu, true, first)?)?,
                                tol,
                            );
                        }
                        Ok(())
                    },
                );
            }
        }
    }
    Ok(())
}

fn check_add_relu(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    for dt in [DType::F32, DType::BF16] {
        let a = rand(&[32, 64, 16, 16], 60, &Device::Cpu)?.to_dtype(dt)?;
        let b = rand(&[32, 64, 16, 16], 61, &Device::Cpu)?.to_dtype(dt)?;
        let r = rand(&[32, 64, 16, 16], 62, &Device::Cpu)?.to_dtype(dt)?;
        let run = |d: &Device| -> anyhow::Result<(Tensor, Tensor, Tensor)> {
            let (av, bv) = (
                Var::from_tensor(&a.to_device(d)?)?,
                Var::from_tensor(&b.to_device(d)?)?,
            );
            let y = kd_kernels::add_relu(&av, &bv)?;
            let g = (&y * r.to_device(d)?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            Ok((y, g.get(&av).unwrap().clone(), g.get(&bv).unwrap().clone()))
        };
        let ((y, ga, gb), (ye, gae, gbe)) = (run(dev)?, run(&Device::Cpu)?);
        // Both sides add in f32 and round once: the same values.
        c.add(format!("add + ReLU {dt:?}: forward"), rel(&y, &ye)?, 0.0);
        c.add(
            format!("add + ReLU {dt:?}: gradient of a"),
            rel(&ga, &gae)?,
            0.0,
        );
        c.add(
            format!("add + ReLU {dt:?}: gradient of b"),
            rel(&gb, &gbe)?,
            0.0,
        );
    }
    Ok(())
}

/// The one-op losses on the logits (`kd_kernels::softmax_loss`): cross-entropy with label
/// smoothing and mixup's two label sets, Hinton's KD loss; value and logits' gradient.
fn check_softmax_losses(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    use kd_kernels::softmax_loss::{cross_entropy, kd_loss};
    let (b, k) = (256, 100);
    let z = (rand(&[b, k], 70, &Device::Cpu)? * 6.0)?;
    let t = (rand(&[b, k], 71, &Device::Cpu)? * 6.0)?;
    let labels = |seed: u64| -> anyhow::Result<Tensor> {
        let v: Vec<u32> = (0..b as u64)
            .map(|i| ((i * 37 + seed) % k as u64) as u32)
            .collect();
        Ok(Tensor::new(v.as_slice(), &Device::Cpu)?)
    };
    let (ya, yb) = (labels(3)?, labels(11)?);
    // (name, loss of the logits on a device).
    type Loss<'a> = Box<dyn Fn(&Tensor, &Device) -> anyhow::Result<Tensor> + 'a>;
    let cases: [(&str, Loss); 3] = [
        (
            "cross-entropy, ε 0.1",
            Box::new(|z, d| Ok(cross_entropy(z, &ya.to_device(d)?, None, 0.1)?)),
        ),
        (
            "cross-entropy, mixup λ 0.3",
            Box::new(|z, d| {
                let yb = yb.to_device(d)?;
                Ok(cross_entropy(z, &ya.to_device(d)?, Some((&yb, 0.3)), 0.0)?)
            }),
        ),
        (
            "KD loss, T 4",
            Box::new(|z, d| Ok(kd_loss(z, &t.to_device(d)?, 4.0)?)),
        ),
    ];
    for (name, loss) in cases {
        let run = |d: &Device| -> anyhow::Result<(Tensor, Tensor)> {
            let zv = Var::from_tensor(&z.to_device(d)?)?;
            let l = loss(&zv, d)?;
            let g = (&l * 0.7)?.backward()?;
            Ok((l, g.get(&zv).unwrap().clone()))
        };
        let ((l, g), (le, ge)) = (run(dev)?, run(&Device::Cpu)?);
        c.add(format!("softmax loss {name}: value"), rel(&l, &le)?, 1e-4);
        c.add(
            format!("softmax loss {name}: gradient"),
            rel(&g, &ge)?,
            1e-4,
        );
    }
    Ok(())
}

fn check_max_pool(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    for dt in [DType::F32, DType::BF16] {
        // Ties at 0 after a ReLU, as in the stem.
        let x = rand(&[32, 64, 32, 32], 50, &Device::Cpu)?
            .relu()?
            .to_dtype(dt)?;
        let r = rand(&[32, 64, 16, 16], 51, &Device::Cpu)?.to_dtype(dt)?;
        // The pool on `d` in `format`; its output and input gradient as (N, C, H, W).
        let run = |d: &Device, format: MemoryFormat| -> anyhow::Result<(Tensor, Tensor)> {
            let xv = Var::from_tensor(&laid_out(&x.to_device(d)?, format)?)?;
            let y = match format {
                MemoryFormat::ChannelsFirst => MaxPool2d::RESNET_STEM.forward(&xv)?,
                MemoryFormat::ChannelsLast => MaxPool2d::RESNET_STEM.forward_nhwc(&xv)?,
            };
            let y = format.nchw_view(&y)?;
            let g = (&y * r.to_device(d)?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            Ok((y, format.nchw_view(g.get(&xv).unwrap())?))
        };
        let (ye, ge) = run(&Device::Cpu, MemoryFormat::ChannelsFirst)?;
        for format in MemoryFormat::ALL {
            let tag = format_tag(format);
            c.guard(&format!("max-pool {dt:?}{tag}"), |c| {
                let (y, g) = run(dev, format)?;
                c.add(format!("max-pool {dt:?}{tag}: forward"), rel(&y, &ye)?, 0.0);
                c.add(
                    format!("max-pool {dt:?}{tag}: backward"),
                    rel(&g, &ge)?,
                    if dt == DType::BF16 { 1e-2 } else { 1e-6 },
                );
                Ok(())
            });
        }
    }
    Ok(())
}

fn check_augment(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    let n = 64;
    let px: Vec<u8> = (0..n * 3072)
        .map(|i| ((i * 7919) % 251 + 1) as u8)
        .collect();
    let images = Tensor::from_vec(px.clone(), (n, 3, 32, 32), &Device::Cpu)?;
    let plans: Vec<AugmentPlan> = (0..128u32)
        .map(|i| AugmentPlan {
            index: (i * 37) % n as u32,
            oy: i % 9,
            ox: (i / 9) % 9,
            flip: i % 2 == 1,
        })
        .collect();
    let norm = Normalisation::from_mean_std(&Normalize::CIFAR10.mean, &Normalize::CIFAR10.std);
    for dt in [DType::F32, DType::BF16] {
        let a = augment_batch(&images.to_device(dev)?, &plans, None, 4, &norm, dt)?;
        let e = augment_batch(&images, &plans, None, 4, &norm, dt)?;
        c.add(format!("augment {dt:?}"), rel(&a, &e)?, 1e-5);
    }
    // The resident loader on the device (crop, flip, normalise and mix in one kernel) against
    // the host loader, with mixup and with CutMix.
    let mut split = Split::empty(3, 32, 32);
    split.images = px;
    split.labels = (0..n as u32).map(|i| i % 10).collect();
    let split = Arc::new(split);
    for (name, mix) in [
        ("mixup", Mix::Mixup { alpha: 1.0 }),
        ("CutMix", Mix::Cutmix { alpha: 1.0 }),
    ] {
        let cfg = LoaderConfig {
            mix: Some(mix),
            ..LoaderConfig::train(16, Normalize::CIFAR10, 3)
        };
        let host = Loader::new(split.clone(), cfg.clone(), dev.clone())?;
        let resident = Loader::new(
            split.clone(),
            LoaderConfig {
                resident: true,
                ..cfg
            },
            dev.clone(),
        )?;
        let mut worst = 0f32;
        for (a, b) in host.epoch(1, 0).zip(resident.epoch(1, 0)) {
            worst = worst.max(rel(&b?.images, &a?.images)?);
        }
        c.add(
            format!("resident loader vs host loader ({name})"),
            worst,
            1e-5,
        );
    }
    Ok(())
}

fn check_sgd(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    let step = kd_kernels::SgdStep {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 5e-4,
        nesterov: true,
    };
    let (p, g, b) = (
        rand(&[512, 256, 3, 3], 70, &Device::Cpu)?,
        rand(&[512, 256, 3, 3], 71, &Device::Cpu)?,
        rand(&[512, 256, 3, 3], 72, &Device::Cpu)?,
    );
    let run = |d: &Device| -> anyhow::Result<(Tensor, Tensor)> {
        let (p, g, b) = (p.to_device(d)?, g.to_device(d)?, b.to_device(d)?);
        kd_kernels::sgd_momentum_step(&p, &g, &b, &step)?;
        Ok((p, b))
    };
    let ((p1, b1), (p2, b2)) = (run(dev)?, run(&Device::Cpu)?);
    c.add("fused SGD: momentum buffer".into(), rel(&b1, &b2)?, 1e-6);
    c.add("fused SGD: parameter".into(), rel(&p1, &p2)?, 1e-6);
    check_sgd_list(c, dev, &step)
}

/// A model's worth of parameters in `sgd_momentum_steps` (on CUDA one launch per 64), against
/// the CPU's update of each: 70 of them (two launches), from a 3×3 kernel's 1.2 million values
/// down to one, every other one without weight decay.
fn check_sgd_list(c: &mut Checks, dev: &Device, step: &kd_kernels::SgdStep) -> anyhow::Result<()> {
    let shapes: Vec<Vec<usize>> = std::iter::once(vec![512, 256, 3, 3])
        .chain((1..70).map(|i| vec![(i * 389) % 5000 + 1]))
        .collect();
    let start = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let seed = 80 + 3 * i as u64;
            Ok((
                rand(s, seed, &Device::Cpu)?,
                rand(s, seed + 1, &Device::Cpu)?,
                rand(s, seed + 2, &Device::Cpu)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let run = |d: &Device| -> anyhow::Result<Vec<(Tensor, Tensor)>> {
        let on = start
            .iter()
            .map(|(p, g, b)| Ok((p.to_device(d)?, g.to_device(d)?, b.to_device(d)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let updates: Vec<_> = on
            .iter()
            .enumerate()
            .map(|(i, (param, grad, buf))| kd_kernels::SgdUpdate {
                param,
                grad,
                buf,
                step: kd_kernels::SgdStep {
                    weight_decay: if i % 2 == 0 { step.weight_decay } else { 0.0 },
                    ..*step
                },
            })
            .collect();
        kd_kernels::sgd_momentum_steps(&updates)?;
        Ok(on.into_iter().map(|(p, _, b)| (p, b)).collect())
    };
    let (on_dev, on_cpu) = (run(dev)?, run(&Device::Cpu)?);
    let (mut worst_p, mut worst_b) = (0f32, 0f32);
    for ((p1, b1), (p2, b2)) in on_dev.iter().zip(&on_cpu) {
        worst_p = worst_p.max(rel(p1, p2)?);
        worst_b = worst_b.max(rel(b1, b2)?);
    }
    let n = shapes.len();
    c.add(
        format!("fused SGD, {n} parameters at once: momentum buffers"),
        worst_b,
        1e-6,
    );
    c.add(
        format!("fused SGD, {n} parameters at once: parameters"),
        worst_p,
        1e-6,
    );
    Ok(())
}

fn check_model(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    let cfg = ResNetConfig {
        base_width: 16,
        ..ResNetConfig::new(Arch::Resnet18, Stem::CifarMaxpool, 10)
    };
    let x = rand(&[32, 3, 32, 32], 60, &Device::Cpu)?;
    let y = Tensor::from_vec(
        (0..32u32).map(|i| i % 10).collect::<Vec<_>>(),
        32,
        &Device::Cpu,
    )?;
    let run_in =
        |d: &Device, dtype: DType, x: &Tensor, format| -> anyhow::Result<(Tensor, Tensor)> {
            let (mut m, vars) = trainable_resnet(&cfg, d, 0)?;
            m.set_compute_dtype(dtype)?;
            m.set_memory_format(format)?;
            let out = m.forward_t(&x.to_device(d)?, true)?;
            let loss = candle_nn::loss::cross_entropy(&out.logits, &y.to_device(d)?)?;
            let g = loss.backward()?;
            let w = vars.data().lock().unwrap()["conv1.weight"]
                .as_tensor()
                .clone();
            Ok((out.logits, g.get(&w).unwrap().clone()))
        };
    let run =
        |d: &Device, dtype: DType, x: &Tensor| run_in(d, dtype, x, MemoryFormat::ChannelsFirst);
    // How much the f32 network's own stem gradient moves when the input moves by 0.4% (one
    // bf16 rounding): at initialisation it is ill-conditioned, so this is the scale against
    // which a bf16 gradient can be judged.
    let noisy = (&x + (&x * (rand(&[32, 3, 32, 32], 61, &Device::Cpu)? * 0.004)?)?)?;
    let (_, g_ref) = run(&Device::Cpu, DType::F32, &x)?;
    let (_, g_noisy) = run(&Device::Cpu, DType::F32, &noisy)?;
    let sensitivity = rel_l2(&g_noisy, &g_ref)?;
    println!(
        "| (reference) f32 stem gradient under 0.4% input noise, CPU | {sensitivity:.2e} | – | |"
    );
    for p in [Precision::F32, Precision::Bf16] {
        p.apply();
        let dtype = p.activation_dtype();
        // The CPU runs the same precision (bf16 storage, f32 accumulation), channels-first; the
        // device both layouts.
        let (le, ge) = run(&Device::Cpu, dtype, &x)?;
        let (bl, bg) = if p == Precision::F32 {
            (1e-3, 2e-3)
        } else {
            (2e-2, (2.0 * sensitivity).max(0.05))
        };
        for format in MemoryFormat::ALL {
            let layout = format_tag(format);
            let tag = format!("ResNet18 w16 (max-pool stem) train step {p}{layout}");
            c.guard(&tag, |c| {
                let (l, g) = run_in(dev, dtype, &x, format)?;
                c.add(format!("{tag}: logits (L2)"), rel_l2(&l, &le)?, bl);
                c.add(format!("{tag}: stem gradient (L2)"), rel_l2(&g, &ge)?, bg);
                Ok(())
            });
        }
    }
    Precision::F32.apply();
    Ok(())
}

/// One method's first step from the same weights, batch and state: the total loss, and the
/// gradient of every student variable that gets one (by name).
type StepResult = (Tensor, Vec<(String, Tensor)>);

/// A batch's tensors on `dev`.
fn batch_on(b: &kd_data::Batch, dev: &Device) -> anyhow::Result<kd_data::Batch> {
    let move_opt = |t: &Option<Tensor>| -> anyhow::Result<Option<Tensor>> {
        Ok(match t {
            Some(t) => Some(t.to_device(dev)?),
            None => None,
        })
    };
    Ok(kd_data::Batch {
        images: b.images.to_device(dev)?,
        labels: b.labels.to_device(dev)?,
        mix: None,
        indices: b.indices.clone(),
        paired: move_opt(&b.paired)?,
        contrast: move_opt(&b.contrast)?,
    })
}

/// Every distillation method's first training step on the device against the CPU: a ResNet18
/// (width 8) student and a frozen ResNet50 (width 4, max-pool stem) teacher from the same seeds,
/// the same 16-image batch (second views, same-class partners and negatives as the method asks),
/// the same starting state; the loss and the gradients of all student variables, the method's
/// own parts included, must agree.
fn check_methods(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    use kd_train::{build_student, MethodConfig, RunInfo, StepContext};
    let classes = 4;
    let tcfg = ResNetConfig {
        base_width: 4,
        ..ResNetConfig::new(Arch::Resnet50, Stem::CifarMaxpool, classes)
    };
    let mut teachers = super::random_teachers(&tcfg, 7, &[&Device::Cpu, dev])?;
    let teachers = (teachers.remove(0), teachers.remove(0));
    let scfg = ResNetConfig {
        base_width: 8,
        ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, classes)
    };
    // FSP needs the student's widths at every level: a ResNet34 of its width.
    let mut fsp_teachers = super::random_teachers(
        &ResNetConfig {
            base_width: 8,
            ..ResNetConfig::new(Arch::Resnet34, Stem::CifarMaxpool, classes)
        },
        7,
        &[&Device::Cpu, dev],
    )?;
    let fsp_teachers = (fsp_teachers.remove(0), fsp_teachers.remove(0));
    // An ensemble teacher: the ResNet50 and a ResNet18 of other weights, their mean logits.
    let mut second = super::random_teachers(
        &ResNetConfig {
            base_width: 4,
            ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, classes)
        },
        11,
        &[&Device::Cpu, dev],
    )?;
    let ensembles = (
        kd_models::Teacher::ensemble(vec![teachers.0.clone(), second.remove(0)])?,
        kd_models::Teacher::ensemble(vec![teachers.1.clone(), second.remove(0)])?,
    );
    let mut split = Split::empty(3, 32, 32);
    split.images = (0..16 * 3 * 32 * 32)
        .map(|i| ((i * 7919) % 251) as u8)
        .collect();
    split.labels = (0..16u32).map(|i| i % classes as u32).collect();
    let split = Arc::new(split);
    for name in MethodConfig::NAMES {
        // The presets, scaled to 16 images: 8 negatives, one small peer.
        let mut method = MethodConfig::preset(name).expect("every name has a preset");
        if let MethodConfig::Crd { negatives, .. } = &mut method {
            *negatives = 8;
        }
        if let Some(peers) = method.peers_mut() {
            *peers = vec![kd_train::PeerSpec::new(Arch::Resnet18, Stem::Cifar, 4)]
        }
        let teachers = match method {
            MethodConfig::Fsp { .. } => &fsp_teachers,
            _ => &teachers,
        };
        let lcfg = LoaderConfig {
            prefetch: 0,
            pair: method.pairing(),
            negatives: method.negatives(),
            augment: kd_data::Augment::STANDARD,
            ..LoaderConfig::eval(16, Normalize::CIFAR10)
        };
        let normalize = lcfg.normalize;
        let loader = Loader::new(split.clone(), lcfg, Device::Cpu)?;
        let batch = loader.epoch(0, 0).next().expect("one batch")?;
        // `init`: the method's init-phase loss (two-stage methods) instead of its step's; also
        // says whether the method has such a phase.
        let run = |d: &Device,
                   teacher: &kd_models::Teacher,
                   init: bool|
         -> anyhow::Result<(StepResult, bool)> {
            let batch = batch_on(&batch, d)?;
            let teacher = method.needs_teacher().then_some(teacher);
            let built = build_student(&scfg, &method, teacher, d, 0, 0.0)?;
            built.distiller.prepare(&RunInfo {
                train_size: 16,
                num_classes: classes,
                seed: 0,
                device: d.clone(),
            })?;
            let t_out = match teacher {
                Some(t) => Some(kd_train::teacher_forward(
                    t,
                    &batch,
                    &normalize,
                    built.distiller.as_ref(),
                )?),
                None => None,
            };
            let loss = if init {
                let phase = built.distiller.init_phase().context("an init phase")?;
                let s_out = match phase.student_body {
                    true => Some(built.model.forward_t(&batch.images, true)?),
                    false => None,
                };
                let t_out = t_out.as_ref().context("a teacher for the init phase")?;
                built.distiller.init_loss(s_out.as_ref(), t_out)?.total()?
            } else {
                let ctx = StepContext::one_step();
                let models: Vec<&kd_models::ResNet> = std::iter::once(&built.model)
                    .chain(built.peers.iter().map(|p| &p.model))
                    .collect();
                if method.replays_last_batch() {
                    // A step before, whose batch (DLB: its second views) the checked one replays.
                    let first = built.distiller.prepare_batch(batch.clone())?;
                    kd_train::step_losses(&models, built.distiller.as_ref(), &ctx, &first, None)?;
                }
                let batch = built.distiller.prepare_batch(batch.clone())?;
                let step = kd_train::step_losses(
                    &models,
                    built.distiller.as_ref(),
                    &ctx,
                    &batch,
                    t_out.as_ref(),
                )?;
                step.terms[0].total()?
            };
            let grads = loss.backward()?;
            let data = built.vars.data().lock().expect("var map lock");
            let mut named: Vec<(String, Tensor)> = data
                .iter()
                .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(((loss, named), built.distiller.init_phase().is_some()))
        };
        // The method's step; its init phase's loss where it has one; and, for the methods that
        // read only the teacher's logits, the step from an ensemble of two teachers.
        let mut cases = vec![(name.to_string(), &teachers.0, &teachers.1, false)];
        let mut i = 0;
        while i < cases.len() {
            let (what, cpu_teacher, dev_teacher, init) = cases[i].clone();
            let ((loss, grads), phased) = run(dev, dev_teacher, init)?;
            let ((loss_cpu, grads_cpu), _) = run(&Device::Cpu, cpu_teacher, init)?;
            if i == 0 {
                if phased {
                    cases.push((format!("{name} init phase"), &teachers.0, &teachers.1, true));
                }
                if method.teacher_logits_only() {
                    cases.push((
                        format!("{name} from an ensemble of two teachers"),
                        &ensembles.0,
                        &ensembles.1,
                        false,
                    ));
                }
            }
            i += 1;
            c.add(format!("method {what}: loss"), rel(&loss, &loss_cpu)?, 1e-4);
            let names: Vec<&String> = grads.iter().map(|g| &g.0).collect();
            let names_cpu: Vec<&String> = grads_cpu.iter().map(|g| &g.0).collect();
            if names != names_cpu {
                bail!("method {what}: the device's step reaches other variables than the CPU's");
            }
            let mut worst = (0f32, String::new());
            for ((k, g), (_, g_cpu)) in grads.iter().zip(&grads_cpu) {
                let e = rel_l2(g, g_cpu)?;
                if e.is_nan() || e > worst.0 || worst.1.is_empty() {
                    worst = (e, k.clone());
                }
            }
            c.add(
                format!(
                    "method {what}: gradients of {} variables (L2, worst {})",
                    grads.len(),
                    worst.1
                ),
                worst.0,
                2e-3,
            );
        }
    }
    Ok(())
}

/// The trainer's teacher clock (CUDA events, read later) against the host's clock around a
/// synchronised span, on the same work: a few large matrix products. Only on a GPU: on the CPU
/// the span clock is the host's clock, and the two would differ only by run-to-run noise.
fn check_span_clock(c: &mut Checks, dev: &Device) -> anyhow::Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    let n = 4096;
    let a = rand(&[n, n], 40, dev)?;
    let work = || -> candle_core::Result<Tensor> {
        let mut x = a.clone();
        for _ in 0..10 {
            x = (x.matmul(&a)? * (1.0 / n as f64))?;
        }
        Ok(x)
    };
    work()?;
    dev.synchronize()?;
    let mut clock = kd_kernels::device_clock::SpanClock::new(dev);
    let mut host = 0.0;
    for _ in 0..3 {
        dev.synchronize()?;
        let t = std::time::Instant::now();
        work()?;
        dev.synchronize()?;
        host += t.elapsed().as_secs_f64();
        clock.time(work)?;
    }
    let spans = clock.seconds()?;
    println!(
        "span clock: {spans:.4} s, host clock: {host:.4} s (3 spans of 10 products of {n}×{n})"
    );
    c.add(
        "span clock vs host clock (relative)".into(),
        ((spans - host).abs() / host) as f32,
        0.3,
    );
    Ok(())
}

/// Runs `selfcheck`.
pub fn run(args: &SelfcheckArgs) -> anyhow::Result<()> {
    let dev = crate::device::open(&args.device)?;
    println!("selfcheck: {dev:?} against the CPU");
    if dev.is_cuda() {
        #[cfg(feature = "cuda")]
        for (m, bytes) in kd_kernels::compile_all_kernels()? {
            println!("NVRTC {m}: {bytes} bytes of PTX");
        }
        match kd_kernels::device_memory::release_threshold(&dev)? {
            Some(u64::MAX) => {
                println!("memory pool: freed memory kept (release threshold u64::MAX)")
            }
            Some(v) => println!(
                "memory pool: release threshold {v} B (KD_DISABLE: {})",
                kd_kernels::switches::describe_disabled()
            ),
            None => println!("memory pool: none (cudarc allocates synchronously on this device)"),
        }
        if let Some(on) = kd_kernels::device_memory::allocation_events(&dev) {
            println!(
                "stream events per allocation: {}",
                if on { "on" } else { "off" }
            );
        }
    }
    println!("| check | max rel. error | bound | |\n|---|---|---|---|");
    let mut c = Checks { rows: Vec::new() };
    // Each family under its own guard, named as its rows begin (the device script's fallbacks
    // read the names).
    type Family = fn(&mut Checks, &Device) -> anyhow::Result<()>;
    let families: [(&str, Family); 10] = [
        ("conv", check_conv),
        ("batch norm", check_batch_norm),
        ("max-pool", check_max_pool),
        ("add + ReLU", check_add_relu),
        ("softmax loss", check_softmax_losses),
        ("augment", check_augment),
        ("fused SGD", check_sgd),
        ("ResNet18 train step", check_model),
        ("method", check_methods),
        ("span clock", check_span_clock),
    ];
    for (name, check) in families {
        c.guard(name, |c| check(c, &dev));
        // The process-wide settings a family may have left set when it failed.
        Precision::F32.apply();
        ConvAlgoSearch::Heuristic.apply();
        kd_kernels::conv_algo::require_deterministic(false);
    }
    let failed = c.failures();
    println!("{} checks, {} failed", c.rows.len(), failed);
    if failed > 0 {
        bail!("{} of {} checks out of bounds", failed, c.rows.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Checks;

    #[test]
    fn an_error_in_a_group_is_a_failing_row_and_the_checks_go_on() {
        let mut c = Checks { rows: Vec::new() };
        c.guard("max-pool BF16", |c| {
            c.add("max-pool BF16: forward".into(), 0.0, 0.0);
            anyhow::bail!("launch failed | code 719\nCUDA_ERROR_LAUNCH_FAILED")
        });
        c.guard("add + ReLU", |c| {
            c.add("add + ReLU F32: forward".into(), 0.0, 0.0);
            Ok(())
        });
        let names: Vec<&str> = c.rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "max-pool BF16: forward",
                // One table cell: no '|' and no line break of the message.
                "max-pool BF16: error: launch failed   code 719 CUDA_ERROR_LAUNCH_FAILED",
                "add + ReLU F32: forward",
            ]
        );
        // The error row's NaN is out of every bound.
        assert_eq!(c.failures(), 1);
    }
}
