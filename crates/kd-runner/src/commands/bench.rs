//! `kd-runner bench`: images per second of the three workloads of the study — a training step
//! (forward, cross-entropy, backward, SGD), inference, and a KD step (frozen teacher forward +
//! student training step with the Hinton loss) — on synthetic batches, warm-up excluded, the
//! device synchronised before each clock reading, at each `--precision`. Prints one table, and
//! one `BENCH workload=… precision=… images_per_s=…` line per row for scripts
//! (`tools/gpu/ratio.py` divides them by PyTorch's figures measured on the same card).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};
use kd_schedulers::{Sgd, SgdConfig};

/// Arguments of `bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Student architecture.
    #[arg(long, value_enum, default_value = "resnet18")]
    pub model: Arch,
    /// Teacher architecture of the KD step (and the inference row's model).
    #[arg(long, value_enum, default_value = "resnet50")]
    pub teacher: Arch,
    /// Stem of both networks.
    #[arg(long, value_enum, default_value = "cifar")]
    pub stem: Stem,
    /// Channels of the first stage.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Timed steps per workload.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps per workload.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Workloads: train, infer, kd (comma-separated).
    #[arg(long, default_value = "train,infer,kd", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Precisions to time: f32, tf32, bf16 (comma-separated).
    #[arg(long, default_value = "f32", value_delimiter = ',')]
    pub precision: Vec<kd_kernels::Precision>,
    /// Also time the train step's phases (forward + loss, backward, optimizer), the device
    /// synchronised between them (which itself costs a little); one `PHASES` line per precision.
    #[arg(long)]
    pub phases: bool,
}

/// Times `steps` calls of `f` after `warmup` untimed ones; images per second.
fn time(
    device: &Device,
    batch: usize,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        f()?;
    }
    device.synchronize()?;
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

/// Runs `bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let device = crate::device::open(&args.device)?;
    let cfg = |arch| ResNetConfig {
        base_width: args.width,
        ..ResNetConfig::new(arch, args.stem, 10)
    };
    let x = Tensor::randn(0f32, 1.0, (args.batch, 3, 32, 32), &device)?;
    let y = Tensor::from_vec(
        (0..args.batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        args.batch,
        &device,
    )?;
    println!(
        "device {:?}, batch {}, stem {}, width {}; {} timed steps after {} warm-up; custom kernels disabled: {}",
        device,
        args.batch,
        args.stem.name(),
        args.width,
        args.steps,
        args.warmup,
        kd_kernels::switches::describe_disabled()
    );
    let mut rows = Vec::new();
    for &precision in &args.precision {
        precision.apply();
        let dtype = precision.activation_dtype();
        let (mut student, svars) = trainable_resnet(&cfg(args.model), &device, 0)?;
        let (mut teacher, _tvars) = trainable_resnet(&cfg(args.teacher), &device, 1)?;
        student.set_compute_dtype(dtype)?;
        teacher.set_compute_dtype(dtype)?;
        let mut opt = Sgd::new(kd_train::trainable_vars(&svars), SgdConfig::default());
        if args.phases {
            let mut t = [0f64; 3];
            for i in 0..args.warmup + args.steps {
                let t0 = Instant::now();
                let out = student.forward_t(&x, true)?;
                let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
                device.synchronize()?;
                let t1 = Instant::now();
                let grads = loss.backward()?;
                device.synchronize()?;
                let t2 = Instant::now();
                opt.step(&grads, 0.01)?;
                device.synchronize()?;
                if i >= args.warmup {
                    t[0] += (t1 - t0).as_secs_f64();
                    t[1] += (t2 - t1).as_secs_f64();
                    t[2] += t2.elapsed().as_secs_f64();
                }
            }
            let ms = |v: f64| 1000.0 * v / args.steps as f64;
            println!(
                "PHASES workload={}-train precision={precision} forward_ms={:.2} backward_ms={:.2} optimizer_ms={:.2}",
                args.model.name(),
                ms(t[0]),
                ms(t[1]),
                ms(t[2])
            );
        }
        for w in &args.workloads {
            let (key, label, ips) = match w.as_str() {
                "train" => (
                    format!("{}-train", args.model.name()),
                    format!("{} train step", args.model.name()),
                    time(&device, args.batch, args.warmup, args.steps, || {
                        let out = student.forward_t(&x, true)?;
                        let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
                        opt.step(&loss.backward()?, 0.01)?;
                        Ok(())
                    })?,
                ),
                "infer" => (
                    format!("{}-infer", args.teacher.name()),
                    format!("{} inference", args.teacher.name()),
                    time(&device, args.batch, args.warmup, args.steps, || {
                        let _ = teacher.forward_t(&x, false)?.logits.to_dtype(DType::F32)?;
                        Ok(())
                    })?,
                ),
                "kd" => (
                    "kd-step".to_string(),
                    format!("KD step ({} → {})", args.teacher.name(), args.model.name()),
                    time(&device, args.batch, args.warmup, args.steps, || {
                        let t = teacher.forward_t(&x, false)?.logits.detach();
                        let out = student.forward_t(&x, true)?;
                        let loss = ((candle_nn::loss::cross_entropy(&out.logits, &y)? * 0.1)?
                            + (kd_losses::kd_loss(&out.logits, &t, 4.0)? * 0.9)?)?;
                        opt.step(&loss.backward()?, 0.01)?;
                        Ok(())
                    })?,
                ),
                other => anyhow::bail!(
                    "--workloads: unknown workload {other:?}; expected train, infer or kd"
                ),
            };
            println!("BENCH workload={key} precision={precision} images_per_s={ips:.1}");
            rows.push((label, precision, ips));
        }
    }
    println!("| workload | precision | images/s | ms/step |\n|---|---|---|---|");
    for (label, precision, ips) in rows {
        println!(
            "| {label} | {precision} | {ips:.1} | {:.2} |",
            1000.0 * args.batch as f64 / ips
        );
    }
    Ok(())
}
