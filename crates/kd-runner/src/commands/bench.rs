//! `kd-runner bench`: images per second of the three workloads of the study — a training step
//! (forward, cross-entropy, backward, SGD), inference, and a KD step (frozen teacher forward +
//! student training step with the Hinton loss) — and of any method's whole step
//! (`method:NAME`), on synthetic batches, warm-up excluded, the device synchronised before each
//! clock reading, at each `--precision` and cuDNN `--conv-algo` search; on CUDA also the memory
//! pool's peak. Prints one table, and one `BENCH workload=… precision=… images_per_s=…
//! conv_algo=… [peak_used_mib=…]` line per row for scripts (`tools/gpu/ratio.py` divides them
//! by PyTorch's figures measured on the same card). A benchmark that fails (a setting the
//! device refuses, a method that does not fit the networks) prints a `BENCH_FAILED` line and
//! the others still run; `bench` then exits non-zero, listing the failures.
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
    /// Workloads: train, infer, kd, and `method:NAME` for one whole training step of any
    /// offline or self method from `kd-runner list` (its teacher forward, its extra forwards,
    /// its parts and loss, backward, SGD), comma-separated. CRD scores against banks of
    /// `--train-size` images.
    #[arg(long, default_value = "train,infer,kd", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Training images a method's per-image state covers (CRD's banks, PS-KD's memory).
    #[arg(long, default_value_t = 50_000)]
    pub train_size: usize,
    /// Precisions to time: f32, tf32, bf16 (comma-separated).
    #[arg(long, default_value = "f32", value_delimiter = ',')]
    pub precision: Vec<kd_kernels::Precision>,
    /// cuDNN algorithm searches to time at each precision: heuristic, benchmark
    /// (comma-separated; CUDA only, the CPU runs the same code for both).
    #[arg(long, default_value = "heuristic", value_delimiter = ',')]
    pub conv_algo: Vec<kd_kernels::ConvAlgoSearch>,
    /// Memory formats to time at each of those: channels-first, channels-last
    /// (comma-separated; `train.memory_format`).
    #[arg(long, default_value = "channels-first", value_delimiter = ',')]
    pub memory_format: Vec<kd_kernels::MemoryFormat>,
    /// Only deterministic cuDNN algorithms (`train.deterministic`), to time what they cost.
    #[arg(long)]
    pub deterministic: bool,
    /// Also time the train step's phases (forward + loss, backward, optimizer), the device
    /// synchronised between them (which itself costs a little), and the host's time to issue
    /// them; one `PHASES` line per precision.
    #[arg(long)]
    pub phases: bool,
}

/// One training step of `method` (offline or self) on a synthetic batch, ready to time: the
/// paired images are the batch itself, CRD's negatives random positions of `train_size` images.
struct MethodStep {
    student: kd_train::BuiltStudent,
    opt: Sgd,
    batch: kd_data::Batch,
    method: kd_train::MethodConfig,
}

impl MethodStep {
    fn new(
        method: kd_train::MethodConfig,
        cfg: &ResNetConfig,
        teacher: &kd_models::Teacher,
        x: &Tensor,
        y: &Tensor,
        train_size: usize,
        (dtype, format): (DType, kd_kernels::MemoryFormat),
    ) -> anyhow::Result<Self> {
        let device = x.device();
        let b = x.dim(0)?;
        if b > train_size {
            anyhow::bail!("--train-size {train_size} is smaller than the batch ({b})");
        }
        let contrast = match method.negatives() {
            Some(k) => {
                let mut z = 0x2545_F491_4F6C_DD1Du64;
                let rows: Vec<u32> = (0..b * (1 + k))
                    .map(|i| {
                        if i % (1 + k) == 0 {
                            (i / (1 + k)) as u32
                        } else {
                            z ^= z << 13;
                            z ^= z >> 7;
                            z ^= z << 17;
                            (z % train_size as u64) as u32
                        }
                    })
                    .collect();
                Some(Tensor::from_vec(rows, (b, 1 + k), device)?)
            }
            None => None,
        };
        let batch = kd_data::Batch {
            images: x.clone(),
            labels: y.clone(),
            mix: None,
            indices: (0..b).collect(),
            paired: method.pairing().map(|_| x.clone()),
            contrast,
        };
        let teacher = method.needs_teacher().then_some(teacher);
        let mut student = kd_train::build_student(cfg, &method, teacher, device, 0, 0.0)?;
        student.model.set_compute_dtype(dtype)?;
        student.model.set_memory_format(format)?;
        student.distiller.prepare(&kd_train::RunInfo {
            train_size,
            num_classes: cfg.num_classes,
            seed: 0,
            device: device.clone(),
        })?;
        // As the trainer: the parts a two-stage method froze after its init phase do not step.
        let named = kd_train::trainable_vars_except(&student.vars, &student.distiller.frozen());
        let opt = Sgd::new(named, SgdConfig::default());
        Ok(MethodStep {
            student,
            opt,
            batch,
            method,
        })
    }

    /// Whether a step of the main run runs the teacher (not for AB's and FSP's, whose teacher
    /// serves their init phase only).
    fn runs_teacher(&self) -> bool {
        self.method.needs_teacher() && self.student.distiller.teacher_each_step()
    }

    fn step(&mut self, teacher: &kd_models::Teacher) -> anyhow::Result<()> {
        let t_out = if self.runs_teacher() {
            // The images are taken as CIFAR-10-normalised, as a CIFAR-10 run's loader gives them.
            Some(kd_train::teacher_forward(
                teacher,
                &self.batch,
                &kd_data::Normalize::CIFAR10,
                self.student.distiller.as_ref(),
            )?)
        } else {
            None
        };
        let ctx = kd_train::StepContext::one_step();
        // As the trainer: the method may rewrite the batch (DLB replays the previous step's from
        // its second step on, which the warm-up covers).
        let batch = self.student.distiller.prepare_batch(self.batch.clone())?;
        let step = kd_train::step_losses(
            &[&self.student.model],
            self.student.distiller.as_ref(),
            &ctx,
            &batch,
            t_out.as_ref(),
        )?;
        self.opt.step(&step.terms[0].total()?.backward()?, 0.01)?;
        Ok(())
    }
}

/// One `--workloads` entry.
enum Workload {
    Train,
    Infer,
    Kd,
    /// A method's whole step, by its preset name.
    Method(String, kd_train::MethodConfig),
}

/// The `--workloads` entries, checked before anything runs: `train`, `infer`, `kd`, or
/// `method:NAME` with an offline or self method.
fn parse_workloads(names: &[String]) -> anyhow::Result<Vec<Workload>> {
    names
        .iter()
        .map(|w| match w.as_str() {
            "train" => Ok(Workload::Train),
            "infer" => Ok(Workload::Infer),
            "kd" => Ok(Workload::Kd),
            other if other.starts_with("method:") => {
                let name = &other["method:".len()..];
                let method = kd_train::MethodConfig::preset(name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--workloads method:{name}: unknown method; expected one of {}",
                        kd_train::MethodConfig::NAMES.join(", ")
                    )
                })?;
                if !method.peers().is_empty() {
                    anyhow::bail!("--workloads method:{name}: an online method trains several networks; time it with a `kd-runner train` run");
                }
                Ok(Workload::Method(name.to_string(), method))
            }
            other => anyhow::bail!(
                "--workloads: unknown workload {other:?}; expected train, infer, kd or method:NAME"
            ),
        })
        .collect()
}

/// A benchmark that failed: which one (the `BENCH` line's keys) and the error's first line.
/// The others still run; `bench` lists the failures and exits non-zero at the end.
fn failed(failures: &mut Vec<String>, what: String, e: &anyhow::Error) {
    let first = format!("{e:#}");
    let first = first.lines().next().unwrap_or("").trim().to_string();
    println!("BENCH_FAILED {what} error={first:?}");
    eprintln!("bench {what}: {e:?}");
    failures.push(format!("{what}: {first}"));
}

/// What one workload measured: images per second, and on CUDA the memory pool's high-water
/// marks over its warm-up and timed steps (what the model, the optimizer and the batch already
/// held included, as PyTorch's `max_memory_allocated` after `reset_peak_memory_stats`).
struct Timing {
    images_per_s: f64,
    peaks: Option<kd_kernels::device_memory::PoolPeaks>,
}

/// Times `steps` calls of `f` after `warmup` untimed ones.
fn time(
    device: &Device,
    batch: usize,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Timing> {
    device.synchronize()?;
    // Memory figures are a by-product: a driver that refuses them leaves the column empty.
    let tracked = kd_kernels::device_memory::reset_pool_peaks(device).is_ok();
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        f()?;
    }
    device.synchronize()?;
    let images_per_s = (batch * steps) as f64 / t.elapsed().as_secs_f64();
    let peaks = tracked
        .then(|| kd_kernels::device_memory::pool_peaks(device).ok().flatten())
        .flatten();
    Ok(Timing {
        images_per_s,
        peaks,
    })
}

/// Runs `bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let workloads = parse_workloads(&args.workloads)?;
    let device = crate::device::open(&args.device)?;
    kd_kernels::conv_algo::require_deterministic(args.deterministic);
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
        "device {:?}, batch {}, stem {}, width {}; {} timed steps after {} warm-up; custom kernels disabled: {}{}",
        device,
        args.batch,
        args.stem.name(),
        args.width,
        args.steps,
        args.warmup,
        kd_kernels::switches::describe_disabled(),
        if args.deterministic {
            "; deterministic cuDNN algorithms only"
        } else {
            ""
        }
    );
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    // Inference, the KD step and the method workloads run a frozen `Teacher`, as training
    // does (constant weights: the ops that need no gradient take their one-pass paths): made
    // once, cast per precision.
    let frozen_teacher = if workloads.iter().any(|w| !matches!(w, Workload::Train)) {
        Some(super::random_teachers(&cfg(args.teacher), 1, &[&device])?.remove(0))
    } else {
        None
    };
    let settings = args
        .precision
        .iter()
        .flat_map(|&p| args.conv_algo.iter().map(move |&a| (p, a)))
        .flat_map(|(p, a)| args.memory_format.iter().map(move |&f| (p, a, f)));
    for (precision, search, format) in settings {
        let keys = format!("precision={precision} conv_algo={search} memory_format={format}");
        precision.apply();
        search.apply();
        let dtype = precision.activation_dtype();
        // The networks of this setting; if they cannot be made, the next setting still runs.
        let made = (|| -> anyhow::Result<_> {
            let (mut student, svars) = trainable_resnet(&cfg(args.model), &device, 0)?;
            student.set_compute_dtype(dtype)?;
            student.set_memory_format(format)?;
            student.set_keep_features(false);
            let teacher = match &frozen_teacher {
                Some(t) => {
                    let mut t = t.clone();
                    t.set_compute_dtype(dtype)?;
                    t.set_memory_format(format)?;
                    Some(t)
                }
                None => None,
            };
            Ok((student, svars, teacher))
        })();
        let (student, svars, teacher) = match made {
            Ok(m) => m,
            Err(e) => {
                failed(&mut failures, format!("workload=all {keys}"), &e);
                continue;
            }
        };
        let teacher = || teacher.as_ref().expect("made for every workload but train");
        // Model FLOPs per image (two per multiply-accumulate): a forward pass, and three for a
        // training step (forward, input and weight gradients), as the usual model-FLOP
        // utilisation counts them. What the tensor cores could do is the card's datasheet.
        let forward_flops = |m: &kd_models::ResNet| 2.0 * m.macs(32, 32).backbone as f64;
        let train_flops = 3.0 * forward_flops(&student);
        // Logits only, as the trainer's baseline and KD runs (and PyTorch's reference) compute:
        // no stage features, so no f32 copies of them under bf16.
        let logits_only = kd_models::ForwardParts::LOGITS;
        let mut opt = Sgd::new(kd_train::trainable_vars(&svars), SgdConfig::default());
        if args.phases {
            // Each phase's time to the device's last kernel, and the host's time to issue it
            // (before the wait): where `host_ms` comes near the three phases' sum, the step is
            // bound by the host's launches, not by the device.
            let phases = (|| -> anyhow::Result<()> {
                let (mut t, mut host) = ([0f64; 3], 0f64);
                for i in 0..args.warmup + args.steps {
                    let t0 = Instant::now();
                    let out = student.forward_t(&x, true)?;
                    let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
                    let h0 = t0.elapsed();
                    device.synchronize()?;
                    let t1 = Instant::now();
                    let grads = loss.backward()?;
                    let h1 = t1.elapsed();
                    device.synchronize()?;
                    let t2 = Instant::now();
                    opt.step(&grads, 0.01)?;
                    let h2 = t2.elapsed();
                    device.synchronize()?;
                    if i >= args.warmup {
                        t[0] += (t1 - t0).as_secs_f64();
                        t[1] += (t2 - t1).as_secs_f64();
                        t[2] += t2.elapsed().as_secs_f64();
                        host += (h0 + h1 + h2).as_secs_f64();
                    }
                }
                let ms = |v: f64| 1000.0 * v / args.steps as f64;
                println!(
                    "PHASES workload={}-train precision={precision} forward_ms={:.2} backward_ms={:.2} optimizer_ms={:.2} host_ms={:.2} conv_algo={search} memory_format={format}",
                    args.model.name(),
                    ms(t[0]),
                    ms(t[1]),
                    ms(t[2]),
                    ms(host)
                );
                Ok(())
            })();
            if let Err(e) = phases {
                let what = format!("workload={}-train-phases {keys}", args.model.name());
                failed(&mut failures, what, &e);
            }
        }
        for w in &workloads {
            let key = match w {
                Workload::Train => format!("{}-train", args.model.name()),
                Workload::Infer => format!("{}-infer", args.teacher.name()),
                Workload::Kd => "kd-step".to_string(),
                Workload::Method(name, _) => format!("method-{name}"),
            };
            let (student_name, teacher_name) = (args.model.name(), args.teacher.name());
            // (the table's label, the timing)
            let timed = match w {
                Workload::Train => time(&device, args.batch, args.warmup, args.steps, || {
                    let out = student.forward_t(&x, true)?;
                    let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
                    opt.step(&loss.backward()?, 0.01)?;
                    Ok(())
                })
                .map(|t| (format!("{student_name} train step"), t)),
                Workload::Infer => time(&device, args.batch, args.warmup, args.steps, || {
                    let _ = teacher()
                        .forward_parts(&x, logits_only)?
                        .logits
                        .to_dtype(DType::F32)?;
                    Ok(())
                })
                .map(|t| (format!("{teacher_name} inference"), t)),
                Workload::Kd => time(&device, args.batch, args.warmup, args.steps, || {
                    let t = teacher().forward_parts(&x, logits_only)?.logits;
                    let out = student.forward_t(&x, true)?;
                    let loss = ((candle_nn::loss::cross_entropy(&out.logits, &y)? * 0.1)?
                        + (kd_losses::kd_loss(&out.logits, &t, 4.0)? * 0.9)?)?;
                    opt.step(&loss.backward()?, 0.01)?;
                    Ok(())
                })
                .map(|t| (format!("KD step ({teacher_name} → {student_name})"), t)),
                Workload::Method(name, method) => {
                    let t = teacher().clone();
                    MethodStep::new(
                        method.clone(),
                        &cfg(args.model),
                        &t,
                        &x,
                        &y,
                        args.train_size,
                        (dtype, format),
                    )
                    .and_then(|mut m| {
                        let label = if m.runs_teacher() {
                            format!("{name} step ({teacher_name} → {student_name})")
                        } else {
                            format!("{name} step ({student_name})")
                        };
                        let timing =
                            time(&device, args.batch, args.warmup, args.steps, || m.step(&t))?;
                        Ok((label, timing))
                    })
                }
            };
            let flops_per_image = match w {
                Workload::Train => Some(train_flops),
                Workload::Infer => Some(forward_flops(teacher().model())),
                Workload::Kd => Some(forward_flops(teacher().model()) + train_flops),
                // Extra forward passes and the methods' own parts vary: not counted.
                Workload::Method(..) => None,
            };
            let (label, timing) = match timed {
                Ok(t) => t,
                Err(e) => {
                    failed(&mut failures, format!("workload={key} {keys}"), &e);
                    continue;
                }
            };
            let tflops = flops_per_image.map(|f| f * timing.images_per_s / 1e12);
            let peak = match timing.peaks {
                Some(p) => format!(" peak_used_mib={:.0}", p.used_mib()),
                None => String::new(),
            };
            let model_tflops = match tflops {
                Some(t) => format!(" model_tflops={t:.6}"),
                None => String::new(),
            };
            println!(
                "BENCH workload={key} precision={precision} images_per_s={:.1} conv_algo={search} memory_format={format}{peak}{model_tflops}",
                timing.images_per_s
            );
            rows.push((label, precision, search, format, timing, tflops));
        }
    }
    println!(
        "| workload | precision | conv algorithm | memory format | images/s | ms/step | model TFLOP/s | peak GPU memory used / reserved (MiB) |\n|---|---|---|---|---|---|---|---|"
    );
    for (label, precision, search, format, t, tflops) in rows {
        let peak = match t.peaks {
            Some(p) => format!("{:.0} / {:.0}", p.used_mib(), p.reserved_mib()),
            None => "–".into(),
        };
        let tflops = tflops.map_or_else(|| "–".into(), |t| format!("{t:.3}"));
        println!(
            "| {label} | {precision} | {search} | {format} | {:.1} | {:.2} | {tflops} | {peak} |",
            t.images_per_s,
            1000.0 * args.batch as f64 / t.images_per_s
        );
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} benchmark(s) failed (the others ran):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
