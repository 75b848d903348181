//! The baseline trainer: epochs × steps of train-mode forward, cross-entropy (mixed when the
//! loader mixes), backward and an SGD step at the schedule's rate; evaluation after each epoch;
//! metrics, checkpoints and the exported model in a run directory.
//!
//! Resuming is exact at epoch boundaries: every random stream is keyed by (seed, epoch), the
//! schedule is a pure function of the step, and the checkpoint holds weights, BN statistics and
//! momentum buffers.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use kd_data::Loader;
use kd_kernels::device_clock::SpanClock;
use kd_models::{save_varmap, ForwardParts, ResNet, Teacher, TeacherMeta};

use crate::distill::{Distiller, InitPhase, Peer, RunInfo, StepContext};
use crate::step::{step_losses, teacher_forward, teacher_forward_parts};
use kd_schedulers::{Optimizer, OptimizerConfig, Schedule};
use serde::{Deserialize, Serialize};

use crate::calibration::Calibration;
use crate::ensemble::Combine;
use crate::evaluate::{evaluate_ensemble, EvalReport, Reference};
use crate::metrics::Accuracy;
use crate::{Result, TrainError};

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs.
    pub epochs: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Schedule over all steps.
    pub schedule: Schedule,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Label smoothing ε of the cross-entropy.
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value (none by default).
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// Checkpoint folders kept (the newest; at least 1).
    #[serde(default = "one")]
    pub keep_last: usize,
}

fn one() -> usize {
    1
}

/// One row of `metrics.jsonl` / `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training top-1 (%) against the first label of each (possibly mixed) sample.
    pub train_acc: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Test top-1 (%).
    pub test_top1: f64,
    /// Test top-5 (%).
    pub test_top5: f64,
    /// Training wall time of the epoch (s), evaluation excluded.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_sec: f64,
    /// Seconds of the epoch spent in the teacher's forward pass (0 without a teacher).
    pub teacher_seconds: f64,
    /// Expected calibration error on the test split (%, 15 bins: [`crate::Calibration`]).
    /// Absent in rows written before kd recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_ece: Option<f64>,
    /// With a teacher: test images on which the student's top-1 is the teacher's (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_agreement: Option<f64>,
    /// With a teacher: mean KL(teacher ‖ student) at T = 1 on the test split (nats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_kl: Option<f64>,
    /// With auxiliary heads (BYOT): each head's test top-1 (%), shallowest first. The deployed
    /// model is the final classifier (`test_top1`); the heads are exits a shallower network
    /// could take.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head_top1: Vec<f64>,
    /// With auxiliary heads: the test top-1 (%) of their ensemble with the final classifier
    /// (softmax averaged: [`crate::ensemble`]), BYOT's "ensemble".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_ensemble_top1: Option<f64>,
    /// With peers (online methods): the test top-1 (%) of the cohort's ensemble, the student
    /// and its peers with their softmax averaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort_ensemble_top1: Option<f64>,
    /// Mean of each named loss term over the epoch (`loss_ce`, `loss_kd`, …).
    pub losses: BTreeMap<String, f64>,
    /// Mean of each value the method reports beside its losses (CTKD's `temperature`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
    /// The same figures for each peer trained beside the student (online methods).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<String, PeerEpoch>,
}

/// A peer's figures for one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerEpoch {
    /// Mean training loss.
    pub train_loss: f64,
    /// Training top-1 (%).
    pub train_acc: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Test top-1 (%).
    pub test_top1: f64,
    /// Test top-5 (%).
    pub test_top5: f64,
    /// Expected calibration error on the test split (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_ece: Option<f64>,
    /// Top-1 agreement with the student on the test split (%): how far the cohort agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_agreement: Option<f64>,
    /// Mean KL(student ‖ peer) on the test split at T = 1 (nats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_kl: Option<f64>,
    /// Mean of each named loss term.
    pub losses: BTreeMap<String, f64>,
}

/// What a finished run reports in `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Trainable parameters during training (every peer, auxiliary heads and method parts
    /// included, those only an init phase trained too).
    pub trainable_params: usize,
    /// Parameters of the deployed model.
    pub deploy_params: usize,
    /// Multiply-accumulates of one test image's forward pass through the deployed model
    /// (convolutions and linear layers: [`kd_models::Macs`]); none in summaries of older kd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_macs: Option<u64>,
    /// Best test top-1 (%).
    pub best_top1: f64,
    /// Epoch of the best test top-1.
    pub best_epoch: usize,
    /// Last test top-1 (%).
    pub last_top1: f64,
    /// Last epoch's expected calibration error on the test split (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ece: Option<f64>,
    /// Last epoch's confidence bins on the test split, whose |accuracy − confidence| gaps
    /// make `last_ece`: the data of a reliability diagram (the report draws one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_calibration: Option<Calibration>,
    /// The frozen teacher's own test top-1 on the same test images (%; none without a teacher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_top1: Option<f64>,
    /// The teacher's expected calibration error on them (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_ece: Option<f64>,
    /// Last epoch's top-1 agreement of the student with the teacher on the test split (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_teacher_agreement: Option<f64>,
    /// Last epoch's mean KL(teacher ‖ student) on the test split (nats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_teacher_kl: Option<f64>,
    /// With auxiliary heads: the last epoch's test top-1 of each head (%), shallowest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_head_top1: Vec<f64>,
    /// With auxiliary heads: the last epoch's test top-1 of their ensemble with the final
    /// classifier (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_head_ensemble_top1: Option<f64>,
    /// With peers: the last epoch's test top-1 of the cohort's ensemble (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cohort_ensemble_top1: Option<f64>,
    /// Training time summed over epochs, a method's init phase included (s).
    pub train_seconds: f64,
    /// Of which in the teacher's forward pass (s).
    pub teacher_seconds: f64,
    /// Of which in the method's init phase (s; 0 for one-stage methods).
    #[serde(default)]
    pub init_seconds: f64,
    /// Parameters of the frozen teacher (0 without one).
    pub teacher_params: usize,
    /// Multiply-accumulates of one test image's forward pass through the frozen teacher (none
    /// without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_macs: Option<u64>,
    /// The method's name.
    pub method: String,
    /// The peers trained beside the student (online methods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerSummary>,
    /// On CUDA, the most device memory the run's tensors held at once in this process (MiB;
    /// the memory pool's high-water mark, so a resumed run counts from its resumption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_peak_mib: Option<f64>,
}

/// A peer's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// `peer1`, …
    pub name: String,
    /// Its architecture.
    pub model: String,
    /// Its parameters.
    pub params: usize,
    /// Best test top-1 (%).
    pub best_top1: f64,
    /// Last test top-1 (%).
    pub last_top1: f64,
    /// Last epoch's expected calibration error on the test split (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ece: Option<f64>,
    /// Last epoch's top-1 agreement with the student on the test split (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_student_agreement: Option<f64>,
    /// Last epoch's mean KL(student ‖ peer) on the test split (nats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_student_kl: Option<f64>,
}

/// Where a run is and what it needs to continue.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    epochs_done: usize,
    step: usize,
    best_top1: f64,
    best_epoch: usize,
    train_seconds: f64,
    #[serde(default)]
    teacher_seconds: f64,
    /// Best test top-1 and its epoch of each peer.
    #[serde(default)]
    peer_best: Vec<(f64, usize)>,
    /// The last epoch's test top-1 of the student, then of each peer.
    #[serde(default)]
    last_top1: Vec<f64>,
    /// Whether the method's init phase has run (two-stage methods).
    #[serde(default)]
    init_done: bool,
    /// Its seconds (also counted in `train_seconds`).
    #[serde(default)]
    init_seconds: f64,
    /// The student's last evaluated epoch, for the summary of a run resumed after it.
    #[serde(default)]
    last_row: Option<EpochMetrics>,
    /// Its confidence bins on the test split (the summary's reliability diagram).
    #[serde(default)]
    last_calibration: Option<Calibration>,
}

/// The best top-1 before any epoch: below every real one, and finite so that a checkpoint
/// written before the first epoch (after an init phase) reads back (JSON has no −∞).
const NO_BEST: f64 = -1.0;

const CKPT_WEIGHTS: &str = "weights.safetensors";
const CKPT_OPTIM: &str = "optimizer.safetensors";
const CKPT_STATE: &str = "state.json";
/// What a stateful method carries between steps ([`Distiller::state`]); absent for the others.
const CKPT_METHOD: &str = "method.safetensors";
/// Names the complete checkpoint folder; replaced atomically after the folder is written.
const LATEST: &str = "checkpoint.latest";

/// Writes weights, momentum and progress into a fresh `checkpoint-<epoch>/` folder, then points
/// `checkpoint.latest` at it with an atomic rename, then removes folders beyond the newest
/// `keep_last`. A crash at
/// any moment leaves `checkpoint.latest` naming a complete checkpoint.
fn save_checkpoint(
    run_dir: &Path,
    members: &[Member],
    method: &dyn Distiller,
    progress: &Progress,
    keep_last: usize,
) -> Result<()> {
    let name = format!("checkpoint-{:04}", progress.epochs_done);
    let dir = run_dir.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    for m in members {
        save_varmap(m.vars, &dir.join(m.file(CKPT_WEIGHTS)))?;
        fault_delay();
        kd_models::checkpoint::save_tensors(&m.opt.state()?, &dir.join(m.file(CKPT_OPTIM)))?;
    }
    let method_state = method.state()?;
    if !method_state.is_empty() {
        kd_models::checkpoint::save_tensors(&method_state, &dir.join(CKPT_METHOD))?;
    }
    fault_delay();
    write_atomic(
        &dir.join(CKPT_STATE),
        serde_json::to_string_pretty(progress)
            .expect("state serialises")
            .as_bytes(),
    )?;
    write_atomic(&run_dir.join(LATEST), name.as_bytes())?;
    // Older folders beyond the newest `keep_last` go; the one just written always stays.
    let mut folders: Vec<String> = std::fs::read_dir(run_dir)
        .map_err(io(run_dir))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("checkpoint-") && *n <= name)
        .collect();
    folders.sort();
    let excess = folders.len().saturating_sub(keep_last.max(1));
    for old in &folders[..excess] {
        let _ = std::fs::remove_dir_all(run_dir.join(old));
    }
    Ok(())
}

/// Fault injection for the kill-anywhere test: `KD_FAULT_CHECKPOINT_DELAY_MS` sleeps inside
/// each checkpoint write (between its files and before the pointer is renamed) so that a
/// randomly timed SIGKILL often lands mid-write. Unset, it costs one environment lookup per run.
fn fault_delay() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *DELAY.get_or_init(|| {
        std::env::var("KD_FAULT_CHECKPOINT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The folder of the latest complete checkpoint of a run.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let p = run_dir.join(LATEST);
    let name = std::fs::read_to_string(&p).map_err(io(&p))?;
    Ok(run_dir.join(name.trim()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(kd_models::write_atomic(path, bytes)?)
}

/// How a call to [`train`] runs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Stop (with a checkpoint) once this many epochs are done, before `epochs`.
    pub stop_after: Option<usize>,
    /// Draw the run's bars (epochs, steps) under these (a suite's); `None`: on stderr.
    pub progress: Option<indicatif::MultiProgress>,
}

/// The student, its variables (including a method's trainable parts) and its export metadata.
pub struct Student<'a> {
    /// The network.
    pub model: &'a ResNet,
    /// Its variables (backbone, auxiliary heads, `distill.*` parts of the method).
    pub vars: &'a VarMap,
    /// What the exported weights' sidecar says (architecture, normalisation).
    pub meta: &'a TeacherMeta,
    /// Networks trained beside it, each with its own optimizer (online methods; else empty).
    pub peers: &'a [Peer],
}

/// One network being trained: the student (index 0) or a peer.
struct Member<'a> {
    /// Empty for the student, `peer1`, … for peers (prefixes their files).
    name: String,
    model: &'a ResNet,
    vars: &'a VarMap,
    meta: TeacherMeta,
    named: Vec<(String, Var)>,
    opt: Optimizer,
    /// Its learning rate as a multiple of the run's (a peer's [`crate::Peer::lr_scale`]).
    lr_scale: f64,
}

impl<'a> Member<'a> {
    /// A member with its own optimizer over its trainable variables, those named under a
    /// `frozen` prefix left out.
    fn new(
        name: String,
        model: &'a ResNet,
        vars: &'a VarMap,
        meta: TeacherMeta,
        cfg: &TrainConfig,
        frozen: &[String],
    ) -> Self {
        let named = trainable_vars_except(vars, frozen);
        let opt = Optimizer::new(&cfg.optimizer, named.clone());
        Member {
            name,
            model,
            vars,
            meta,
            named,
            opt,
            lr_scale: 1.0,
        }
    }

    /// A checkpoint file of this member.
    fn file(&self, base: &str) -> String {
        if self.name.is_empty() {
            base.to_string()
        } else {
            format!("{}.{base}", self.name)
        }
    }
}

/// The trainable variables of a map (BN running statistics excluded), sorted by name: what an
/// optimizer steps and what counts as trainable parameters.
pub fn trainable_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("var map lock");
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// [`trainable_vars`] but those named under a `frozen` prefix ([`Distiller::frozen`]: what a
/// two-stage method fitted in its init phase and the main run leaves alone).
pub fn trainable_vars_except(vars: &VarMap, frozen: &[String]) -> Vec<(String, Var)> {
    trainable_vars(vars)
        .into_iter()
        .filter(|(k, _)| !frozen.iter().any(|f| k.starts_with(f.as_str())))
        .collect()
}

/// Per-epoch running sums of one member.
struct EpochSums {
    acc: Accuracy,
    terms: BTreeMap<String, f64>,
    values: BTreeMap<String, f64>,
}

/// Steps between reads of the on-device sums on an accelerator (every step on the CPU, where a
/// read costs nothing): each read waits for the device, and a wait per step would leave the GPU
/// idle while the next step's work is queued.
const DEVICE_READ_EVERY: usize = 25;

/// One member's training sums since the last read, kept on the device as tensors.
#[derive(Default)]
struct PendingSums {
    /// Σ batch loss × batch size.
    loss: Option<Tensor>,
    /// Σ top-1 hits.
    top1: Option<Tensor>,
    /// Σ each loss term.
    terms: BTreeMap<String, Tensor>,
    /// Σ each reported value.
    values: BTreeMap<String, Tensor>,
    /// Images since the last read.
    images: usize,
}

fn add_to(acc: &mut Option<Tensor>, t: Tensor) -> candle_core::Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + t)?,
        None => t,
    });
    Ok(())
}

impl PendingSums {
    /// Adds one step: its loss terms, total loss, logits and labels (all detached).
    fn add(
        &mut self,
        terms: &crate::distill::LossTerms,
        loss: &Tensor,
        logits: &Tensor,
        labels: &Tensor,
    ) -> candle_core::Result<()> {
        let b = labels.dim(0)?;
        let f32 = candle_core::DType::F32;
        add_to(&mut self.loss, (loss.detach().to_dtype(f32)? * b as f64)?)?;
        for (sums, named) in [
            (&mut self.terms, &terms.terms),
            (&mut self.values, &terms.values),
        ] {
            for (name, t) in named {
                let t = t.detach().to_dtype(f32)?.sum_all()?;
                match sums.remove(name) {
                    Some(a) => sums.insert(name.clone(), (a + t)?),
                    None => sums.insert(name.clone(), t),
                };
            }
        }
        // A hit: no class scores strictly higher than the true one (as Accuracy counts it).
        let rank = crate::metrics::true_class_rank(&logits.detach(), labels)?;
        add_to(&mut self.top1, rank.eq(0f64)?.to_dtype(f32)?.sum_all()?)?;
        self.images += b;
        Ok(())
    }

    /// Reads the sums into `sums` (one wait for the device) and starts again; a non-finite loss
    /// is an error naming the epoch and the step.
    fn read_into(&mut self, sums: &mut EpochSums, epoch: usize, step: usize) -> Result<()> {
        let Some(loss) = self.loss.take() else {
            return Ok(());
        };
        let loss_sum = loss.to_scalar::<f32>()? as f64;
        if !loss_sum.is_finite() {
            return Err(TrainError::NonFinite {
                epoch,
                step,
                value: loss_sum as f32,
            });
        }
        sums.acc.loss_sum += loss_sum;
        sums.acc.total += self.images;
        if let Some(t) = self.top1.take() {
            sums.acc.top1 += t.to_scalar::<f32>()? as usize;
        }
        for (name, t) in std::mem::take(&mut self.terms) {
            *sums.terms.entry(name).or_default() += t.to_scalar::<f32>()? as f64;
        }
        for (name, t) in std::mem::take(&mut self.values) {
            *sums.values.entry(name).or_default() += t.to_scalar::<f32>()? as f64;
        }
        self.images = 0;
        Ok(())
    }
}

/// Trains the student with `method` (and the frozen `teacher`, if any; and the student's peers,
/// if any) and writes the run into `run_dir`. Returns `None` when stopped early by
/// [`RunOptions::stop_after`].
#[allow(clippy::too_many_arguments)]
pub fn train(
    student: Student,
    method: &dyn Distiller,
    teacher: Option<&Teacher>,
    train: &Loader,
    test: &Loader,
    cfg: &TrainConfig,
    run_dir: &Path,
    run: RunOptions,
) -> Result<Option<Summary>> {
    let student_norm = train.config().normalize;
    let resume = run.resume;
    let num_classes = student.model.config().num_classes;
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    let mut members: Vec<Member> = Vec::with_capacity(1 + student.peers.len());
    members.push(Member::new(
        String::new(),
        student.model,
        student.vars,
        student.meta.clone(),
        cfg,
        &method.frozen(),
    ));
    for p in student.peers {
        let meta = TeacherMeta {
            arch: p.config.arch,
            stem: p.config.stem,
            base_width: p.config.base_width,
            source: format!("{} ({})", p.name, student.meta.source),
            ..student.meta.clone()
        };
        members.push(Member {
            lr_scale: p.lr_scale,
            ..Member::new(p.name.clone(), &p.model, &p.vars, meta, cfg, &[])
        });
    }
    let mut progress = Progress {
        epochs_done: 0,
        step: 0,
        best_top1: NO_BEST,
        best_epoch: 0,
        train_seconds: 0.0,
        teacher_seconds: 0.0,
        peer_best: vec![(NO_BEST, 0); student.peers.len()],
        last_top1: Vec::new(),
        init_done: false,
        init_seconds: 0.0,
        last_row: None,
        last_calibration: None,
    };
    method.prepare(&RunInfo {
        train_size: train.split().len(),
        num_classes,
        seed: train.config().seed,
        device: train.device(),
    })?;
    if resume {
        let ckpt = latest_checkpoint(run_dir)?;
        let state = ckpt.join(CKPT_STATE);
        let text = std::fs::read_to_string(&state).map_err(io(&state))?;
        progress = serde_json::from_str(&text)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", state.display())))?;
        progress.peer_best.resize(student.peers.len(), (NO_BEST, 0));
        for m in &mut members {
            kd_models::load_into(m.vars, &ckpt.join(m.file(CKPT_WEIGHTS)))?;
            let momentum = kd_models::checkpoint::read_safetensors(
                &ckpt.join(m.file(CKPT_OPTIM)),
                &train.device(),
            )?;
            m.opt.load_state(momentum)?;
        }
        // Absent for a stateless method; a stateful one refuses the empty state.
        let method_file = ckpt.join(CKPT_METHOD);
        let method_state = if method_file.exists() {
            kd_models::checkpoint::read_safetensors(&method_file, &train.device())?
        } else {
            HashMap::new()
        };
        method.load_state(method_state).map_err(|e| {
            TrainError::Invalid(format!(
                "{}: method {}: {e}",
                method_file.display(),
                method.name()
            ))
        })?;
    }
    let steps_per_epoch = train.num_batches();
    let total = cfg.epochs * steps_per_epoch;
    let jsonl = run_dir.join("metrics.jsonl");
    let csv = run_dir.join("metrics.csv");
    let columns = CsvColumns {
        teacher: teacher.is_some(),
        heads: members[0].model.num_aux_heads() + members[0].model.num_branches() - 1,
        cohort: members.len() > 1,
    };
    if !resume {
        std::fs::write(&jsonl, "").map_err(io(&jsonl))?;
        std::fs::write(&csv, "").map_err(io(&csv))?;
    }
    if resume {
        // Rows written after the checkpoint (a crash between the two) are dropped; the CSV is
        // written again from the rows kept, in this version's columns.
        truncate_lines(&jsonl, progress.epochs_done)?;
        rewrite_csv(&csv, &read_metrics(&jsonl)?, columns)?;
    }
    if let Some(phase) = method.init_phase().filter(|_| !progress.init_done) {
        let teacher = teacher.ok_or_else(|| {
            TrainError::Invalid(format!(
                "method {} fits its parts to a teacher's features before training: give it a teacher",
                method.name()
            ))
        })?;
        let (seconds, teacher_seconds) = init_phase(
            &phase,
            method,
            &members[0],
            teacher,
            train,
            cfg,
            run_dir,
            &run,
        )?;
        progress.init_done = true;
        progress.init_seconds = seconds;
        progress.train_seconds += seconds;
        progress.teacher_seconds += teacher_seconds;
        // Resuming after this point does not repeat the phase.
        save_checkpoint(run_dir, &members, method, &progress, cfg.keep_last)?;
    }
    // The teacher's predictions on the test split, once: the student's fidelity to it is
    // measured against them at each evaluation.
    let test_norm = test.config().normalize;
    let reference = teacher
        .map(|t| {
            Reference::new(test, num_classes, |x| {
                teacher_forward_parts(t, x, &test_norm, ForwardParts::LOGITS)
            })
        })
        .transpose()?;
    if let Some(r) = &reference {
        tracing::info!(
            "teacher on the test split: top-1 {:.2}% top-5 {:.2}% ECE {:.2}%",
            r.report.acc.top1_pct(),
            r.report.acc.top5_pct(),
            r.report.calibration.ece_pct()
        );
    }
    let mut last_top1 = progress.last_top1.clone();
    last_top1.resize(members.len(), 0.0);
    let run_bar = bar(
        &run.progress,
        cfg.epochs,
        "run   [{bar:30}] {pos}/{len} epochs {msg} ETA {eta}",
    );
    run_bar.set_position(progress.epochs_done as u64);
    for epoch in progress.epochs_done..cfg.epochs {
        if run.stop_after.is_some_and(|k| epoch >= k) {
            return Ok(None);
        }
        let t = Instant::now();
        let mut sums: Vec<EpochSums> = members
            .iter()
            .map(|_| EpochSums {
                acc: Accuracy::new(num_classes),
                terms: BTreeMap::new(),
                values: BTreeMap::new(),
            })
            .collect();
        let mut pending: Vec<PendingSums> =
            members.iter().map(|_| PendingSums::default()).collect();
        let on_cpu = train.device().is_cpu();
        let mut lr = cfg.lr;
        // The teacher's time from device events, read at the epoch's end (no wait per step).
        let mut teacher_clock = SpanClock::new(&train.device());
        let mut steps = 0usize;
        let bar = bar(
            &run.progress,
            steps_per_epoch,
            "epoch [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
        );
        for (i, batch) in train.epoch(epoch as u64, 0).enumerate() {
            let batch = method.prepare_batch(batch?)?;
            lr = cfg.schedule.lr(cfg.lr, progress.step, total);
            let teacher_out = match teacher.filter(|_| method.teacher_each_step()) {
                Some(t) => {
                    Some(teacher_clock.time(|| teacher_forward(t, &batch, &student_norm, method))?)
                }
                None => None,
            };
            let ctx = StepContext {
                epoch,
                step: progress.step,
                total_steps: total,
                epochs: cfg.epochs,
            };
            let models: Vec<&ResNet> = members.iter().map(|m| m.model).collect();
            let step = step_losses(&models, method, &ctx, &batch, teacher_out.as_ref())?;
            for (k, (m, terms)) in members.iter_mut().zip(&step.terms).enumerate() {
                let loss = terms.total()?;
                pending[k].add(terms, &loss, &step.outputs[k].logits, &batch.labels)?;
                if terms.paused {
                    // The network sits this step out (SwitOKD's paused teacher): logged, not
                    // trained; its optimizer's momentum and weight decay wait with it.
                    continue;
                }
                if on_cpu {
                    // Free on the CPU: stop before a non-finite loss reaches the weights.
                    let value = loss.to_scalar::<f32>()?;
                    if !value.is_finite() {
                        return Err(TrainError::NonFinite {
                            epoch,
                            step: i,
                            value,
                        });
                    }
                }
                let mut grads = loss.backward()?;
                if let Some(max) = cfg.clip_grad {
                    let norm = kd_schedulers::clip_grad_norm(&mut grads, &m.named, max)?;
                    if !norm.is_finite() {
                        return Err(TrainError::NonFinite {
                            epoch,
                            step: i,
                            value: norm as f32,
                        });
                    }
                }
                m.opt.step(&grads, lr * m.lr_scale)?;
            }
            if on_cpu || (i + 1) % DEVICE_READ_EVERY == 0 {
                for (p, s) in pending.iter_mut().zip(sums.iter_mut()) {
                    p.read_into(s, epoch, i)?;
                }
                bar.set_message(format!("loss {:.4} lr {lr:.4}", sums[0].acc.mean_loss()));
            }
            steps += 1;
            progress.step += 1;
            bar.set_message(format!("loss {:.4} lr {lr:.4}", sums[0].acc.mean_loss()));
            bar.inc(1);
        }
        for (p, s) in pending.iter_mut().zip(sums.iter_mut()) {
            p.read_into(s, epoch, steps.saturating_sub(1))?;
        }
        bar.finish_and_clear();
        let teacher_seconds = teacher_clock.seconds()?;
        let seconds = t.elapsed().as_secs_f64();
        progress.train_seconds += seconds;
        progress.teacher_seconds += teacher_seconds;
        // Evaluation reads only the logits. The student is compared with the teacher, and each
        // peer with the student (its test predictions are kept for that: 4 MB at most).
        let student = Reference::new_against(
            test,
            num_classes,
            logits_forward(members[0].model),
            reference.as_ref(),
        )?;
        let mut peers = Vec::with_capacity(members.len() - 1);
        for m in &members[1..] {
            peers.push(Reference::new_against(
                test,
                num_classes,
                logits_forward(m.model),
                Some(&student),
            )?);
        }
        let cohort = if peers.is_empty() {
            None
        } else {
            let all: Vec<&Reference> = std::iter::once(&student).chain(&peers).collect();
            Some(evaluate_ensemble(
                num_classes,
                &all,
                Combine::Probabilities,
            )?)
        };
        let evals: Vec<EvalReport> = std::iter::once(student.report.clone())
            .chain(peers.into_iter().map(|p| p.report))
            .collect();
        let per_step = |sums: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
            sums.iter()
                .map(|(k, v)| (k.clone(), v / steps.max(1) as f64))
                .collect()
        };
        let peers: BTreeMap<String, PeerEpoch> = members
            .iter()
            .enumerate()
            .skip(1)
            .map(|(k, m)| {
                let peer = PeerEpoch {
                    train_loss: sums[k].acc.mean_loss(),
                    train_acc: sums[k].acc.top1_pct(),
                    test_loss: evals[k].acc.mean_loss(),
                    test_top1: evals[k].acc.top1_pct(),
                    test_top5: evals[k].acc.top5_pct(),
                    test_ece: Some(evals[k].calibration.ece_pct()),
                    student_agreement: evals[k].fidelity.as_ref().map(|f| f.agreement_pct()),
                    student_kl: evals[k].fidelity.as_ref().map(|f| f.mean_kl()),
                    losses: per_step(&sums[k].terms),
                };
                (m.name.clone(), peer)
            })
            .collect();
        let row = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: sums[0].acc.mean_loss(),
            train_acc: sums[0].acc.top1_pct(),
            test_loss: evals[0].acc.mean_loss(),
            test_top1: evals[0].acc.top1_pct(),
            test_top5: evals[0].acc.top5_pct(),
            seconds,
            images_per_sec: sums[0].acc.total as f64 / seconds.max(1e-9),
            teacher_seconds,
            test_ece: Some(evals[0].calibration.ece_pct()),
            teacher_agreement: evals[0].fidelity.as_ref().map(|f| f.agreement_pct()),
            teacher_kl: evals[0].fidelity.as_ref().map(|f| f.mean_kl()),
            head_top1: evals[0].heads.iter().map(|h| h.top1_pct()).collect(),
            head_ensemble_top1: evals[0].head_ensemble.as_ref().map(|a| a.top1_pct()),
            cohort_ensemble_top1: cohort.as_ref().map(|a| a.top1_pct()),
            losses: per_step(&sums[0].terms),
            values: per_step(&sums[0].values),
            peers,
        };
        for (k, e) in evals.iter().enumerate() {
            last_top1[k] = e.acc.top1_pct();
        }
        append(
            &jsonl,
            &format!("{}\n", serde_json::to_string(&row).expect("row serialises")),
        )?;
        write_csv_row(&csv, &row, columns)?;
        let mut extras = match (row.teacher_agreement, row.teacher_kl) {
            (Some(a), Some(kl)) => format!(" | agrees with the teacher {a:.2}%, KL {kl:.4}"),
            _ => String::new(),
        };
        // ONE's and OKDDip's extra classifiers are branches, BYOT's are heads.
        let model = &members[0].model;
        let (heads_are, with_final) = match (model.num_branches(), model.config().gate) {
            (1, _) => ("heads", "heads + final classifier"),
            (_, true) => ("branches", "gated ensemble"),
            _ => ("branches", "all branches"),
        };
        if !row.head_top1.is_empty() {
            let heads: Vec<String> = row.head_top1.iter().map(|a| format!("{a:.2}%")).collect();
            extras += &format!(" | {heads_are} {}", heads.join(" / "));
        }
        if let Some(a) = row.head_ensemble_top1 {
            extras += &format!(" | {with_final} {a:.2}%");
        }
        if let Some(a) = row.cohort_ensemble_top1 {
            extras += &format!(" | cohort ensemble {a:.2}%");
        }
        tracing::info!(
            "epoch {}/{}: lr {:.4} train loss {:.4} acc {:.2}% | test loss {:.4} top-1 {:.2}% top-5 {:.2}% ECE {:.2}%{extras} | {:.1} s, {:.0} img/s",
            row.epoch, cfg.epochs, row.lr, row.train_loss, row.train_acc, row.test_loss, row.test_top1, row.test_top5, row.test_ece.unwrap_or(0.0), row.seconds, row.images_per_sec
        );
        for (name, p) in &row.peers {
            tracing::info!(
                "  {name}: train loss {:.4} acc {:.2}% | test top-1 {:.2}% top-5 {:.2}% ECE {:.2}% | agrees with the student {:.2}%, KL {:.4}",
                p.train_loss,
                p.train_acc,
                p.test_top1,
                p.test_top5,
                p.test_ece.unwrap_or(0.0),
                p.student_agreement.unwrap_or(0.0),
                p.student_kl.unwrap_or(0.0)
            );
        }
        progress.epochs_done = epoch + 1;
        progress.last_top1 = last_top1.clone();
        progress.last_row = Some(row.clone());
        progress.last_calibration = Some(evals[0].calibration.clone());
        if row.test_top1 > progress.best_top1 {
            progress.best_top1 = row.test_top1;
            progress.best_epoch = epoch + 1;
            export(
                members[0].vars,
                &members[0].meta,
                &run_dir.join("best.safetensors"),
            )?;
        }
        for (k, best) in progress.peer_best.iter_mut().enumerate() {
            if last_top1[k + 1] > best.0 {
                *best = (last_top1[k + 1], epoch + 1);
            }
        }
        save_checkpoint(run_dir, &members, method, &progress, cfg.keep_last)?;
        run_bar.set_message(format!("top-1 {:.2}%", row.test_top1));
        run_bar.inc(1);
    }
    run_bar.finish_and_clear();
    export(
        members[0].vars,
        &members[0].meta,
        &run_dir.join("model.safetensors"),
    )?;
    let mut peer_summaries = Vec::new();
    for (k, m) in members.iter().enumerate().skip(1) {
        let dir = run_dir.join(&m.name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        export(m.vars, &m.meta, &dir.join("model.safetensors"))?;
        let last = progress
            .last_row
            .as_ref()
            .and_then(|r| r.peers.get(&m.name));
        peer_summaries.push(PeerSummary {
            name: m.name.clone(),
            model: m.meta.arch.name().to_string(),
            params: m.model.num_backbone_params(),
            best_top1: progress.peer_best[k - 1].0,
            last_top1: last_top1[k],
            last_ece: last.and_then(|p| p.test_ece),
            last_student_agreement: last.and_then(|p| p.student_agreement),
            last_student_kl: last.and_then(|p| p.student_kl),
        });
    }
    let (image_h, image_w) = (test.split().height, test.split().width);
    // Parts only an init phase trained (AB's connectors, FT's paraphraser) were optimised too.
    let init_only: usize = method.init_phase().map_or(0, |phase| {
        trainable_vars(members[0].vars)
            .iter()
            .filter(|(k, _)| phase.trains(k) && !members[0].named.iter().any(|(n, _)| n == k))
            .map(|(_, v)| v.elem_count())
            .sum()
    });
    let summary = Summary {
        trainable_params: init_only
            + members
                .iter()
                .flat_map(|m| m.named.iter())
                .map(|(_, v)| v.elem_count())
                .sum::<usize>(),
        deploy_params: members[0].model.num_backbone_params(),
        deploy_macs: Some(members[0].model.macs(image_h, image_w).backbone),
        best_top1: progress.best_top1,
        best_epoch: progress.best_epoch,
        last_top1: last_top1[0],
        last_ece: progress.last_row.as_ref().and_then(|r| r.test_ece),
        last_calibration: progress.last_calibration.clone(),
        teacher_top1: reference.as_ref().map(|r| r.report.acc.top1_pct()),
        teacher_ece: reference.as_ref().map(|r| r.report.calibration.ece_pct()),
        last_teacher_agreement: progress.last_row.as_ref().and_then(|r| r.teacher_agreement),
        last_teacher_kl: progress.last_row.as_ref().and_then(|r| r.teacher_kl),
        last_head_top1: progress
            .last_row
            .as_ref()
            .map(|r| r.head_top1.clone())
            .unwrap_or_default(),
        last_head_ensemble_top1: progress
            .last_row
            .as_ref()
            .and_then(|r| r.head_ensemble_top1),
        last_cohort_ensemble_top1: progress
            .last_row
            .as_ref()
            .and_then(|r| r.cohort_ensemble_top1),
        train_seconds: progress.train_seconds,
        teacher_seconds: progress.teacher_seconds,
        init_seconds: progress.init_seconds,
        teacher_params: teacher.map_or(0, Teacher::num_params),
        teacher_macs: teacher.map(|t| t.macs(image_h, image_w)),
        method: method.name().to_string(),
        peers: peer_summaries,
        // A by-product: where the driver refuses the figure, the summary goes without it.
        gpu_peak_mib: kd_kernels::device_memory::pool_peaks(&train.device())
            .ok()
            .flatten()
            .map(|p| p.used_mib()),
    };
    write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)
            .expect("summary serialises")
            .as_bytes(),
    )?;
    Ok(Some(summary))
}

/// Keys of the init phase's epochs in the loader's random streams, apart from the main run's.
const INIT_EPOCH_KEY: u64 = 1 << 40;

/// One row of `init_metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitEpoch {
    /// Epoch of the init phase (1-based).
    pub epoch: usize,
    /// Mean init loss.
    pub loss: f64,
    /// Wall time (s).
    pub seconds: f64,
}

/// Runs a method's init phase on the student `m` (RepDistiller's `init`): its own optimizer
/// (the run's kind, at the phase's constant rate) over the variables the phase trains, the
/// teacher frozen, the student's body in training mode when trained. Writes one row per epoch to
/// `init_metrics.jsonl`; returns the phase's seconds and, of them, the teacher's.
#[allow(clippy::too_many_arguments)]
fn init_phase(
    phase: &InitPhase,
    method: &dyn Distiller,
    m: &Member,
    teacher: &Teacher,
    train: &Loader,
    cfg: &TrainConfig,
    run_dir: &Path,
    run: &RunOptions,
) -> Result<(f64, f64)> {
    let named: Vec<(String, Var)> = trainable_vars(m.vars)
        .into_iter()
        .filter(|(k, _)| phase.trains(k))
        .collect();
    if named.is_empty() {
        return Err(TrainError::Invalid(format!(
            "method {}: its init phase trains no variable (prefix {})",
            method.name(),
            phase.parts
        )));
    }
    let mut opt = Optimizer::new(&cfg.optimizer, named.clone());
    let student_norm = train.config().normalize;
    let log = run_dir.join("init_metrics.jsonl");
    std::fs::write(&log, "").map_err(io(&log))?;
    let on_cpu = train.device().is_cpu();
    let mut seconds = 0.0;
    let mut teacher_clock = SpanClock::new(&train.device());
    let bar = bar(
        &run.progress,
        phase.epochs * train.num_batches(),
        "init  [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
    );
    for epoch in 0..phase.epochs {
        let t = Instant::now();
        let mut sum: Option<Tensor> = None;
        let mut images = 0usize;
        let mut steps = 0usize;
        for batch in train.epoch(INIT_EPOCH_KEY + epoch as u64, 0) {
            let batch = batch?;
            let t_out =
                teacher_clock.time(|| teacher_forward(teacher, &batch, &student_norm, method))?;
            let s_out = match phase.student_body {
                true => Some(m.model.forward_t(&batch.images, true)?),
                false => None,
            };
            let loss = method.init_loss(s_out.as_ref(), &t_out)?.total()?;
            if on_cpu {
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(TrainError::NonFiniteInit {
                        method: method.name().into(),
                        epoch,
                        step: steps,
                        value,
                    });
                }
            }
            let mut grads = loss.backward()?;
            if let Some(max) = cfg.clip_grad {
                kd_schedulers::clip_grad_norm(&mut grads, &named, max)?;
            }
            opt.step(&grads, phase.lr)?;
            let b = batch.labels.dim(0)?;
            add_to(
                &mut sum,
                (loss.detach().to_dtype(candle_core::DType::F32)? * b as f64)?,
            )?;
            images += b;
            steps += 1;
            bar.inc(1);
        }
        let mean = match sum {
            Some(s) => s.to_scalar::<f32>()? as f64 / images.max(1) as f64,
            None => 0.0,
        };
        if !mean.is_finite() {
            return Err(TrainError::NonFiniteInit {
                method: method.name().into(),
                epoch,
                step: steps.saturating_sub(1),
                value: mean as f32,
            });
        }
        let row = InitEpoch {
            epoch: epoch + 1,
            loss: mean,
            seconds: t.elapsed().as_secs_f64(),
        };
        seconds += row.seconds;
        append(
            &log,
            &format!("{}\n", serde_json::to_string(&row).expect("row serialises")),
        )?;
        bar.set_message(format!("loss {mean:.4}"));
        tracing::info!(
            "init epoch {}/{} ({}): loss {:.4} | {:.1} s",
            row.epoch,
            phase.epochs,
            method.name(),
            row.loss,
            row.seconds
        );
    }
    bar.finish_and_clear();
    Ok((seconds, teacher_clock.seconds()?))
}

/// The evaluation forward pass of `model`: its logits alone, in eval mode.
fn logits_forward(
    model: &ResNet,
) -> impl Fn(&Tensor) -> candle_core::Result<kd_models::ModelOutput> + '_ {
    move |x| model.forward_parts(x, false, ForwardParts::LOGITS)
}

/// The optional columns of a run's `metrics.csv`, fixed by the run (not by a row), so that rows
/// written by an older kd without those figures line up with the new ones.
#[derive(Clone, Copy)]
struct CsvColumns {
    /// The student's fidelity to its teacher.
    teacher: bool,
    /// Its auxiliary heads' top-1, then their ensemble's with the final classifier.
    heads: usize,
    /// The cohort ensemble's top-1 (online methods), after the peers' columns.
    cohort: bool,
}

/// `metrics.csv`'s header: the student's figures (with its fidelity to the teacher when the run
/// has one), its heads' top-1 and their ensemble's, its loss terms and reported values (named as
/// in `row`), then each peer's top-1, ECE and agreement with the student, and the cohort
/// ensemble's top-1.
fn csv_header(row: &EpochMetrics, columns: CsvColumns) -> String {
    let mut names: Vec<String> = [
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_top1",
        "test_top5",
        "seconds",
        "images_per_sec",
        "teacher_seconds",
        "test_ece",
    ]
    .map(String::from)
    .to_vec();
    if columns.teacher {
        names.extend(["teacher_agreement", "teacher_kl"].map(String::from));
    }
    names.extend((1..=columns.heads).map(|k| format!("head{k}_top1")));
    if columns.heads > 0 {
        names.push("head_ensemble_top1".into());
    }
    names.extend(row.losses.keys().cloned());
    names.extend(row.values.keys().cloned());
    names.extend(
        row.peers.keys().flat_map(|p| {
            ["test_top1", "test_ece", "student_agreement"].map(|c| format!("{p}_{c}"))
        }),
    );
    if columns.cohort {
        names.push("cohort_ensemble_top1".into());
    }
    names.join(",") + "\n"
}

/// One row of `metrics.csv`, in [`csv_header`]'s columns; a figure the row lacks (written by an
/// older kd) is an empty cell.
fn csv_line(row: &EpochMetrics, columns: CsvColumns) -> String {
    let opt =
        |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or_default();
    let mut cells = vec![
        row.epoch.to_string(),
        format!("{:.6}", row.lr),
        format!("{:.6}", row.train_loss),
        format!("{:.4}", row.train_acc),
        format!("{:.6}", row.test_loss),
        format!("{:.4}", row.test_top1),
        format!("{:.4}", row.test_top5),
        format!("{:.3}", row.seconds),
        format!("{:.1}", row.images_per_sec),
        format!("{:.3}", row.teacher_seconds),
        opt(row.test_ece, 4),
    ];
    if columns.teacher {
        cells.push(opt(row.teacher_agreement, 4));
        cells.push(opt(row.teacher_kl, 6));
    }
    cells.extend((0..columns.heads).map(|k| opt(row.head_top1.get(k).copied(), 4)));
    if columns.heads > 0 {
        cells.push(opt(row.head_ensemble_top1, 4));
    }
    cells.extend(
        row.losses
            .values()
            .chain(row.values.values())
            .map(|v| format!("{v:.6}")),
    );
    cells.extend(row.peers.values().flat_map(|p| {
        [
            format!("{:.4}", p.test_top1),
            opt(p.test_ece, 4),
            opt(p.student_agreement, 4),
        ]
    }));
    if columns.cohort {
        cells.push(opt(row.cohort_ensemble_top1, 4));
    }
    cells.join(",") + "\n"
}

/// Appends the row to `metrics.csv`, with the header first.
fn write_csv_row(csv: &Path, row: &EpochMetrics, columns: CsvColumns) -> Result<()> {
    if std::fs::metadata(csv).map(|m| m.len()).unwrap_or(0) == 0 {
        append(csv, &csv_header(row, columns))?;
    }
    append(csv, &csv_line(row, columns))
}

/// `metrics.csv` written anew from `rows` (empty without rows).
fn rewrite_csv(csv: &Path, rows: &[EpochMetrics], columns: CsvColumns) -> Result<()> {
    let mut text = rows
        .first()
        .map(|r| csv_header(r, columns))
        .unwrap_or_default();
    for r in rows {
        text += &csv_line(r, columns);
    }
    write_atomic(csv, text.as_bytes())
}

/// The rows of a run's `metrics.jsonl`; a line that is not a row is named with the file.
pub fn read_metrics(jsonl: &Path) -> Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(jsonl).map_err(io(jsonl))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                TrainError::Invalid(format!("{} line {}: {e}", jsonl.display(), i + 1))
            })
        })
        .collect()
}

fn truncate_lines(path: &Path, keep: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let kept: String = text.lines().take(keep).map(|l| format!("{l}\n")).collect();
    write_atomic(path, kept.as_bytes())
}

/// A progress bar under `multi`, or on stderr (drawn only when it is a terminal).
fn bar(
    multi: &Option<indicatif::MultiProgress>,
    len: usize,
    template: &str,
) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    match multi {
        Some(m) => m.add(bar),
        None => bar,
    }
}

fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(line.as_bytes()).map_err(io(path))
}

/// Whether the variable `name` of a student's map belongs to the deployed network: not an
/// auxiliary head, an extra branch, the branches' gate or a method's part, which train only.
pub fn is_deployed(name: &str) -> bool {
    !["aux_heads.", "branch", "gate.", "distill."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Writes the deployable weights (backbone and BN statistics; no auxiliary heads, extra branches or method parts) with a sidecar
/// so `kd-runner eval` and the teacher loader read them.
pub fn export(vars: &VarMap, meta: &TeacherMeta, path: &Path) -> Result<PathBuf> {
    let data = vars.data().lock().expect("var map lock");
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .filter(|(k, _)| is_deployed(k))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    kd_models::checkpoint::save_tensors(&tensors, path)?;
    write_atomic(
        &TeacherMeta::sidecar(path),
        serde_json::to_string_pretty(meta)
            .expect("meta serialises")
            .as_bytes(),
    )?;
    Ok(path.into())
}
