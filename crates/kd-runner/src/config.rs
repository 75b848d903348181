//! Experiment configuration: one TOML file per experiment (`configs/cifar10/kd.toml`, …), read
//! with `deny_unknown_fields`, every field defaulted, and changed one field at a time with
//! `--set key.path=value`, which must name an existing field and keep its type. The resolved
//! configuration is written into the run directory as `config.toml`, and a resumed run reads it
//! back from there.
//!
//! Optional settings have an explicit "off" value (`subset = 1.0`, `mixup = 0.0`,
//! `clip_grad = 0.0`, `teacher.path = ""`, `teacher.run = ""`) so that every key exists and can
//! be overridden.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kd_data::{Augment, DatasetSpec, LoaderConfig, Mix};
use kd_models::{Arch, ResNetConfig, Stem};
use kd_schedulers::{OptimizerConfig, Schedule, SgdConfig};
use kd_train::{MethodConfig, PlusKd, TrainConfig};
use serde::{Deserialize, Serialize};

/// One experiment: data, student, method, teacher and schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Label in reports (default: the method's name).
    #[serde(default)]
    pub name: String,
    /// The data and how it is served.
    #[serde(default)]
    pub data: DataSection,
    /// The student.
    #[serde(default)]
    pub model: ModelSection,
    /// The distillation method and its weights (`name = "kd"`, `alpha`, `temperature`, …).
    #[serde(default = "baseline")]
    pub method: MethodConfig,
    /// Hinton KD added to an offline method (`alpha = 0`: off): RepDistiller's `-a` beside the
    /// method's weight, as in its CRD+KD.
    #[serde(default)]
    pub plus_kd: PlusKd,
    /// The frozen teacher of offline methods.
    #[serde(default)]
    pub teacher: TeacherSection,
    /// Optimisation and run settings.
    #[serde(default)]
    pub train: TrainSection,
}

fn baseline() -> MethodConfig {
    MethodConfig::None
}

/// The config `text` with its `[method]` table completed by the named method's paper defaults
/// ([`MethodConfig::preset`]); `None` when there is nothing to complete (no such table, an
/// unknown method, or every key given), so that the caller reports its own parse error.
fn with_method_defaults(text: &str) -> Option<anyhow::Result<ExperimentConfig>> {
    let mut doc: toml::Table = toml::from_str(text).ok()?;
    let method = doc.get_mut("method")?.as_table_mut()?;
    let preset = MethodConfig::preset(method.get("name")?.as_str()?)?;
    let toml::Value::Table(defaults) = toml::Value::try_from(&preset).ok()? else {
        return None;
    };
    let mut completed = false;
    for (key, value) in defaults {
        if !method.contains_key(&key) {
            method.insert(key, value);
            completed = true;
        }
    }
    completed.then(|| {
        toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", e.to_string().trim_end()))
    })
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// `cifar10`, `cifar100` or `folder:PATH`.
    pub dataset: String,
    /// Data root; empty: `$KD_DATA_DIR` or `./data`.
    pub data_dir: String,
    /// Class-balanced fraction of the training split, in (0, 1]; 1 = all of it.
    pub subset: f64,
    /// Random crop (4 px padding) and horizontal flip; false: normalisation only.
    pub augment: bool,
    /// Mixup Beta concentration α; 0 = off.
    pub mixup: f64,
    /// Training batch size.
    pub batch_size: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// Class-balanced fraction of the test split evaluated each epoch, in (0, 1]; below 1 only
    /// for short CPU runs, and reports say so.
    pub test_subset: f64,
    /// Keep the uint8 data set on the training device and augment there (for GPUs: no host
    /// work or copy per batch beyond a 16-byte plan per image). The batches are the same.
    pub resident: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            dataset: "cifar10".into(),
            data_dir: String::new(),
            subset: 1.0,
            augment: true,
            mixup: 0.0,
            batch_size: 128,
            eval_batch_size: 256,
            test_subset: 1.0,
            resident: false,
        }
    }
}

/// `[model]`: the student.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `resnet18`, `resnet34` or `resnet50`.
    pub arch: Arch,
    /// `cifar` or `cifar-maxpool`.
    pub stem: Stem,
    /// Channels of the first stage (64 = the standard network).
    pub width: usize,
    /// Start each residual branch's last BN at γ = 0.
    pub zero_init_residual: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            arch: Arch::Resnet18,
            stem: Stem::Cifar,
            width: 64,
            zero_init_residual: false,
        }
    }
}

/// `[teacher]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherSection {
    /// safetensors with its JSON sidecar, or a finished run's folder; empty = no teacher.
    pub path: String,
    /// In a suite: the label of an earlier run of the same suite (its config's `name`) whose
    /// exported model teaches this one, trained with the same seed and variant. `kd-runner
    /// suite` sets `path` to that run's folder; chains of such runs make teacher-assistant KD
    /// and born-again generations. Empty = none.
    pub run: String,
    /// Further teachers (files or run folders) whose logits are averaged with `path`'s: an
    /// ensemble teaching as one, for the methods that read only the teacher's logits
    /// (`MethodConfig::TEACHER_LOGITS_ONLY`). Empty = `path` alone.
    pub members: Vec<String>,
    /// In a suite: earlier runs whose models join the ensemble (as `members`), named as
    /// `run` names its run, or `LABEL@SEED` for another seed's run (`["baseline@1",
    /// "baseline@2"]` beside `run = "baseline@0"`: an ensemble of a config's seeds).
    pub member_runs: Vec<String>,
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Epochs.
    pub epochs: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Linear warm-up epochs before the cosine decay.
    pub warmup_epochs: usize,
    /// Learning rate at the end of the cosine.
    pub final_lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// Label smoothing ε.
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value; 0 = off.
    pub clip_grad: f64,
    /// Seed of initialisation, data order and augmentation.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Checkpoint folders kept.
    pub keep_last: usize,
    /// `f32`, `tf32` (f32 tensors, TF32 tensor-core convolutions and matmuls on CUDA) or `bf16`
    /// (bf16 activations, f32 master weights, BN statistics and loss).
    pub precision: kd_kernels::Precision,
    /// How the cuDNN convolution picks its algorithm for a new shape: `heuristic` (cuDNN's
    /// ranking, free) or `benchmark` (every algorithm timed once, as PyTorch's
    /// `cudnn.benchmark`). CUDA only; ignored on the CPU.
    pub conv_algo: kd_kernels::ConvAlgoSearch,
    /// Only deterministic cuDNN algorithms, so that a seed fixes a GPU run's numbers too (as
    /// PyTorch's `cudnn.deterministic`); may cost speed. The CPU is deterministic anyway.
    pub deterministic: bool,
    /// `channels-first` (N, C, H, W) or `channels-last` (N, H, W, C) activations inside the
    /// networks (student, teacher, peers): the layout cuDNN's tensor-core convolutions read
    /// natively. Outputs, weights and checkpoints are the same either way. On the CPU each op
    /// then runs between transposes, so it is slower there: it is for CUDA.
    pub memory_format: kd_kernels::MemoryFormat,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 200,
            lr: 0.1,
            warmup_epochs: 1,
            final_lr: 0.0,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            label_smoothing: 0.0,
            clip_grad: 0.0,
            seed: 0,
            device: "cpu".into(),
            keep_last: 2,
            precision: kd_kernels::Precision::F32,
            conv_algo: kd_kernels::ConvAlgoSearch::Heuristic,
            deterministic: false,
            memory_format: kd_kernels::MemoryFormat::ChannelsFirst,
        }
    }
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            name: String::new(),
            data: DataSection::default(),
            model: ModelSection::default(),
            method: baseline(),
            plus_kd: PlusKd::default(),
            teacher: TeacherSection::default(),
            train: TrainSection::default(),
        }
    }
}

impl ExperimentConfig {
    /// Reads a TOML file; an unknown key, a wrong type or a bad value is an error naming the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in the config {}", path.display()))
    }

    /// Parses TOML text. A `[method]` table may give only some of its method's keys (`name`
    /// at least): the others take the method's paper defaults, as `--set method.name=X` does.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: ExperimentConfig = match toml::from_str(text) {
            Ok(cfg) => cfg,
            Err(e) => match with_method_defaults(text) {
                Some(completed) => completed?,
                None => bail!("{}", e.to_string().trim_end()),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The TOML form (what goes into the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// The label in reports: `name`, else the method's (`crd+kd` with `plus_kd` on).
    pub fn label(&self) -> String {
        if !self.name.is_empty() {
            self.name.clone()
        } else if self.plus_kd.alpha != 0.0 {
            format!("{}+kd", self.method.name())
        } else {
            self.method.name().to_string()
        }
    }

    /// Applies `key.path=value`. The key must exist and the value keep its type; `method.name=X`
    /// switches to method X with its paper defaults (set its weights after it).
    pub fn set(&mut self, assignment: &str) -> anyhow::Result<()> {
        let Some((key, raw)) = assignment.split_once('=') else {
            bail!("--set {assignment}: expected key.path=value, e.g. train.lr=0.05");
        };
        let (key, raw) = (key.trim(), raw.trim());
        if key == "method.name" {
            let name = raw.trim_matches('"');
            let mut cfg = self.clone();
            cfg.method = MethodConfig::preset(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "--set method.name={name}: unknown method; valid: {}",
                    MethodConfig::NAMES.join(", ")
                )
            })?;
            cfg.validate()
                .with_context(|| format!("after --set method.name={name}"))?;
            *self = cfg;
            return Ok(());
        }
        let mut doc = toml::Value::try_from(&*self).expect("the config serialises");
        let mut cur = &mut doc;
        let mut walked = String::new();
        for part in key.split('.') {
            let here = if walked.is_empty() {
                "the top level".to_string()
            } else {
                format!("[{walked}]")
            };
            let Some(table) = cur.as_table_mut() else {
                bail!("--set {key}: `{walked}` is a value, not a section");
            };
            if !table.contains_key(part) {
                let valid: Vec<String> = table
                    .keys()
                    .map(|k| {
                        if walked.is_empty() {
                            k.clone()
                        } else {
                            format!("{walked}.{k}")
                        }
                    })
                    .collect();
                bail!(
                    "--set {key}: unknown key `{part}` in {here}; valid keys: {}",
                    valid.join(", ")
                );
            }
            cur = table.get_mut(part).expect("checked");
            walked = if walked.is_empty() {
                part.to_string()
            } else {
                format!("{walked}.{part}")
            };
        }
        *cur = typed_value(key, raw, cur)?;
        let cfg: ExperimentConfig = doc
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("--set {key}={raw}: {}", e.message()))?;
        cfg.validate()
            .with_context(|| format!("after --set {key}={raw}"))?;
        *self = cfg;
        Ok(())
    }

    /// Every settable key with its current value, `key = value` per line (for `kd-runner list`).
    pub fn keys(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        walk(
            "",
            &toml::Value::try_from(self).expect("the config serialises"),
            &mut out,
        );
        out
    }

    /// Checks values the types alone do not.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.dataset()?;
        let d = &self.data;
        if !(d.subset > 0.0 && d.subset <= 1.0) {
            bail!("data.subset = {}: expected a fraction in (0, 1]", d.subset);
        }
        if !(d.test_subset > 0.0 && d.test_subset <= 1.0) {
            bail!(
                "data.test_subset = {}: expected a fraction in (0, 1]",
                d.test_subset
            );
        }
        if d.mixup < 0.0 || !d.mixup.is_finite() {
            bail!("data.mixup = {}: expected α ≥ 0 (0 = off)", d.mixup);
        }
        if d.batch_size == 0 || d.eval_batch_size == 0 {
            bail!("data.batch_size and data.eval_batch_size must be at least 1");
        }
        if self.model.width == 0 {
            bail!("model.width must be at least 1");
        }
        let t = &self.train;
        if t.epochs == 0 {
            bail!("train.epochs must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr = {}: expected a positive learning rate", t.lr);
        }
        if t.clip_grad < 0.0 || t.label_smoothing < 0.0 || t.label_smoothing >= 1.0 {
            bail!("train.clip_grad must be ≥ 0 and train.label_smoothing in [0, 1)");
        }
        if let MethodConfig::Pskd { .. } = self.method {
            if d.mixup > 0.0 {
                bail!("method pskd keeps one prediction per image and cannot follow mixed images; set data.mixup = 0");
            }
            if t.label_smoothing > 0.0 {
                bail!("method pskd makes its own soft targets; set train.label_smoothing = 0");
            }
        }
        if self.method.negatives().is_some() && d.mixup > 0.0 {
            bail!(
                "method {} keeps one embedding per image and cannot follow mixed images; set data.mixup = 0",
                self.method.name()
            );
        }
        if self.method.pairing().is_some() && d.mixup > 0.0 {
            bail!(
                "method {} compares two images per sample; set data.mixup = 0",
                self.method.name()
            );
        }
        if let Err(e) = self.plus_kd.check(&self.method) {
            bail!("{e}");
        }
        // A teacher.path on a method without a teacher is left unused (a suite may set one for
        // all its runs); `kd-runner train --teacher` with such a method is refused by the CLI.
        // teacher.run is resolved by a suite ([`Self::unresolved_teacher_run`] refuses it
        // elsewhere).
        let ensemble = !self.teacher.members.is_empty() || !self.teacher.member_runs.is_empty();
        if self.method.needs_teacher() && ensemble {
            if !self.method.teacher_logits_only() {
                bail!(
                    "teacher.members (or member_runs) makes an ensemble teacher, which has logits only: method {} reads more of its teacher; ensembles teach {}",
                    self.method.name(),
                    MethodConfig::TEACHER_LOGITS_ONLY.join(", ")
                );
            }
            if let Some(i) = self.teacher.members.iter().position(String::is_empty) {
                bail!(
                    "teacher.members[{i}] is empty: each member is a weights file or a run folder"
                );
            }
        }
        if self.method.needs_teacher()
            && self.teacher.path.is_empty()
            && self.teacher.run.is_empty()
        {
            bail!(
                "method {} needs a teacher (--teacher FILE, or teacher.path in the config): fetch one with `cargo xtask fetch teacher-cifar10` (then data/teachers/cifar10-resnet50/teacher.safetensors), or train one with `kd-runner train` and give its run folder (in a suite, teacher.run names an earlier run of it)",
                self.method.name()
            );
        }
        Ok(())
    }

    /// An error when `teacher.run` is still set: only a suite resolves it (to
    /// `teacher.path`), so a run started any other way has no teacher to load.
    pub fn unresolved_teacher_run(&self) -> anyhow::Result<()> {
        if self.method.needs_teacher() && !self.teacher.member_runs.is_empty() {
            bail!(
                "teacher.member_runs = {:?} names runs of a suite, which only `kd-runner suite` resolves: outside a suite, list their folders in teacher.members (and set teacher.member_runs = [])",
                self.teacher.member_runs
            );
        }
        if self.method.needs_teacher() && !self.teacher.run.is_empty() {
            bail!(
                "teacher.run = {:?} names a run of a suite, which only `kd-runner suite` resolves: list this config in a suite after the config named {:?}, or set teacher.path to that run's folder (and teacher.run = \"\")",
                self.teacher.run,
                self.teacher.run
            );
        }
        Ok(())
    }

    /// The data set named by `data.dataset`.
    pub fn dataset(&self) -> anyhow::Result<DatasetSpec> {
        self.data
            .dataset
            .parse::<DatasetSpec>()
            .map_err(|e| anyhow::anyhow!("data.dataset = {:?}: {e}", self.data.dataset))
    }

    /// The data root.
    pub fn data_dir(&self) -> PathBuf {
        if self.data.data_dir.is_empty() {
            kd_fetch::default_data_dir()
        } else {
            PathBuf::from(&self.data.data_dir)
        }
    }

    /// The student's network for `num_classes` classes.
    pub fn resnet(&self, num_classes: usize) -> ResNetConfig {
        ResNetConfig {
            base_width: self.model.width,
            zero_init_residual: self.model.zero_init_residual,
            ..ResNetConfig::new(self.model.arch, self.model.stem, num_classes)
        }
    }

    /// The training loader's settings.
    pub fn loader(&self, normalize: kd_data::Normalize) -> LoaderConfig {
        LoaderConfig {
            augment: if self.data.augment {
                Augment::STANDARD
            } else {
                Augment::NONE
            },
            mix: (self.data.mixup > 0.0).then_some(Mix::Mixup {
                alpha: self.data.mixup as f32,
            }),
            pair: self.method.pairing(),
            negatives: self.method.negatives(),
            resident: self.data.resident,
            ..LoaderConfig::train(self.data.batch_size, normalize, self.train.seed)
        }
    }

    /// The trainer's settings, for `steps_per_epoch` steps per epoch.
    pub fn trainer(&self, steps_per_epoch: usize) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            epochs: t.epochs,
            lr: t.lr,
            schedule: Schedule::WarmupCosine {
                warmup_steps: t.warmup_epochs * steps_per_epoch,
                final_lr: t.final_lr,
            },
            optimizer: OptimizerConfig::Sgd(SgdConfig {
                momentum: t.momentum,
                nesterov: t.nesterov,
                weight_decay: t.weight_decay,
                ..SgdConfig::default()
            }),
            label_smoothing: t.label_smoothing,
            clip_grad: (t.clip_grad > 0.0).then_some(t.clip_grad),
            keep_last: t.keep_last.max(1),
        }
    }
}

/// `raw` read as a value of the same TOML type as `old` (an integer is accepted for a float).
fn typed_value(key: &str, raw: &str, old: &toml::Value) -> anyhow::Result<toml::Value> {
    use toml::Value as V;
    let wrong = |what: &str| {
        anyhow::anyhow!("--set {key}={raw}: expected {what} (the current value is {old})")
    };
    Ok(match old {
        V::String(_) => V::String(
            raw.strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(raw)
                .to_string(),
        ),
        V::Integer(_) => V::Integer(raw.parse().map_err(|_| wrong("an integer"))?),
        V::Float(_) => V::Float(raw.parse().map_err(|_| wrong("a number"))?),
        V::Boolean(_) => V::Boolean(raw.parse().map_err(|_| wrong("true or false"))?),
        V::Array(_) => {
            let parsed: toml::Table =
                toml::from_str(&format!("v = {raw}")).map_err(|_| wrong("a TOML array"))?;
            match parsed.get("v") {
                Some(v @ V::Array(_)) => v.clone(),
                _ => return Err(wrong("a TOML array")),
            }
        }
        V::Table(t) => bail!(
            "--set {key}: `{key}` is a section; set one of its keys: {}",
            t.keys()
                .map(|k| format!("{key}.{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        V::Datetime(_) => return Err(wrong("a date")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_changes_one_field_and_keeps_its_type() {
        let mut c = ExperimentConfig::default();
        c.set("train.lr=0.05").unwrap();
        c.set("train.epochs=3").unwrap();
        c.set("data.augment=false").unwrap();
        c.set("model.stem=cifar-maxpool").unwrap();
        c.set("train.weight_decay=0").unwrap(); // an integer is a valid float
        assert_eq!(
            (
                c.train.lr,
                c.train.epochs,
                c.data.augment,
                c.model.stem,
                c.train.weight_decay
            ),
            (0.05, 3, false, Stem::CifarMaxpool, 0.0)
        );
        let err = c
            .set("train.epochs=2.5")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("expected an integer") && err.contains("train.epochs"),
            "{err}"
        );
        let err = c
            .set("data.augment=maybe")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("true or false"), "{err}");
        let err = c
            .set("model.arch=resnet99")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("resnet99") && err.contains("resnet50"),
            "{err}"
        );
        c.set("train.conv_algo=benchmark").unwrap();
        assert_eq!(c.train.conv_algo, kd_kernels::ConvAlgoSearch::Benchmark);
        assert!(!c.train.deterministic);
        c.set("train.deterministic=true").unwrap();
        c.set("train.memory_format=channels-last").unwrap();
        assert_eq!(
            c.train.memory_format,
            kd_kernels::MemoryFormat::ChannelsLast
        );
        assert!(c.set("train.memory_format=nhwc").is_err());
        assert!(c.train.deterministic);
        let err = c
            .set("train.conv_algo=fastest")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("fastest") && err.contains("train.conv_algo"),
            "{err}"
        );
    }

    /// A `[method]` table that gives only some keys takes the method's paper defaults for the
    /// rest; its unknown keys, and mistakes elsewhere in the file, are still errors that name
    /// them.
    #[test]
    fn a_partial_method_table_takes_the_papers_defaults() {
        let teacher = "[teacher]\npath = \"t.safetensors\"\n";
        let c = ExperimentConfig::from_toml(&format!(
            "[method]\nname = \"dkd\"\nbeta = 2.0\n{teacher}"
        ))
        .unwrap();
        assert_eq!(
            c.method,
            MethodConfig::Dkd {
                alpha: 1.0,
                beta: 2.0,
                temperature: 4.0,
                warmup_epochs: 20.0,
                standardize: false,
            }
        );
        let c =
            ExperimentConfig::from_toml(&format!("[method]\nname = \"kd\"\n{teacher}")).unwrap();
        assert_eq!(Some(c.method), MethodConfig::preset("kd"));
        let err = |text: String| {
            ExperimentConfig::from_toml(&text)
                .map_err(|e| format!("{e:#}"))
                .unwrap_err()
        };
        let e = err(format!("[method]\nname = \"kd\"\nalpah = 0.5\n{teacher}"));
        assert!(e.contains("alpah") && e.contains("temperature"), "{e}");
        let e = err(format!(
            "[method]\nname = \"kd\"\n{teacher}[train]\nlr = \"fast\"\n"
        ));
        assert!(e.contains("fast") && e.contains("lr"), "{e}");
        let e = err("[method]\nname = \"kdd\"\n".into());
        assert!(e.contains("kdd") && e.contains("dkd"), "{e}");
        // The teacher check still applies to the completed method.
        let e = err("[method]\nname = \"kd\"\n".into());
        assert!(e.contains("needs a teacher"), "{e}");
    }

    #[test]
    fn unknown_keys_list_the_valid_ones() {
        let mut c = ExperimentConfig::default();
        let err = c
            .set("train.learning_rate=0.1")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("unknown key `learning_rate`")
                && err.contains("train.lr")
                && err.contains("train.epochs"),
            "{err}"
        );
        let err = c
            .set("trian.lr=0.1")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("data") && err.contains("method") && err.contains("train"),
            "{err}"
        );
        let err = c.set("train=1").map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(err.contains("is a section"), "{err}");
        assert!(c
            .set("train.lr")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err()
            .contains("key.path=value"));
        // Read from a file: an unknown key names it and the expected ones.
        let err = ExperimentConfig::from_toml("[train]\nlearning_rate = 0.1\n")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("learning_rate") && err.contains("lr"), "{err}");
    }

    #[test]
    fn method_switch_takes_the_paper_defaults_then_its_fields() {
        let mut c = ExperimentConfig::default();
        c.set("method.name=kd").unwrap_err(); // kd needs a teacher …
        c.set("teacher.path=t.safetensors").unwrap();
        c.set("method.name=kd").unwrap();
        c.set("method.temperature=2").unwrap();
        assert_eq!(
            c.method,
            MethodConfig::Kd {
                alpha: 0.9,
                temperature: 2.0,
                standardize: false
            }
        );
        // A key with a default (absent from the preset's table) is still a typed key.
        c.set("method.standardize=true").unwrap();
        assert!(matches!(
            c.method,
            MethodConfig::Kd {
                standardize: true,
                ..
            }
        ));
        assert!(c.set("method.standardize=yes").is_err());
        let err = c
            .set("method.weight=1")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(
            err.contains("method.alpha") && err.contains("method.temperature"),
            "{err}"
        );
        assert!(c
            .set("method.name=magic")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err()
            .contains("cs_kd"));
    }

    #[test]
    fn values_are_checked_beyond_their_types() {
        let mut c = ExperimentConfig::default();
        assert!(c
            .set("data.subset=1.5")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err()
            .contains("(0, 1]"));
        assert!(c.set("data.dataset=imagenet").is_err());
        c.set("method.name=cs_kd").unwrap();
        assert!(c
            .set("data.mixup=1.0")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err()
            .contains("mixup"));
        // PS-KD keeps one prediction per image: no mixed images, no second softening.
        let mut c = ExperimentConfig::default();
        c.set("method.name=pskd").unwrap();
        c.set("method.alpha=0.5").unwrap();
        for (key, word) in [
            ("data.mixup=1.0", "mixup"),
            ("train.label_smoothing=0.1", "label_smoothing"),
        ] {
            let err = c.set(key).map_err(|e| format!("{e:#}")).unwrap_err();
            assert!(err.contains("pskd") && err.contains(word), "{key}: {err}");
        }
        // CRD keeps one embedding per image in its banks; its loader draws the negatives.
        let mut c = ExperimentConfig::default();
        c.set("teacher.path=t.safetensors").unwrap();
        c.set("method.name=crd").unwrap();
        c.set("method.negatives=4096").unwrap();
        assert_eq!(c.loader(kd_data::Normalize::CIFAR10).negatives, Some(4096));
        let err = c
            .set("data.mixup=1.0")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("crd") && err.contains("mixup"), "{err}");
    }

    #[test]
    fn negative_epochs_and_zero_batch_size_are_refused() {
        let err = format!(
            "{:#}",
            ExperimentConfig::from_toml("[train]\nepochs = -1\n").unwrap_err()
        );
        assert!(err.contains("epochs") || err.contains("-1"), "{err}");
        let err = format!(
            "{:#}",
            ExperimentConfig::from_toml("[train]\nepochs = 0\n").unwrap_err()
        );
        assert!(err.contains("train.epochs must be at least 1"), "{err}");
        let err = format!(
            "{:#}",
            ExperimentConfig::from_toml("[data]\nbatch_size = 0\n").unwrap_err()
        );
        assert!(err.contains("batch_size"), "{err}");
        let err = format!(
            "{:#}",
            ExperimentConfig::from_toml("[train]\nlr = \"fast\"\n").unwrap_err()
        );
        assert!(
            err.contains("lr = \"fast\"") && err.contains("expected f64"),
            "{err}"
        );
    }

    /// `plus_kd` is off by default, turned on by `--set plus_kd.alpha=…` on an offline method,
    /// and refused on KD itself and on methods without a frozen teacher.
    #[test]
    fn plus_kd_adds_kd_to_offline_methods_only() {
        let mut c = ExperimentConfig::default();
        assert_eq!(c.plus_kd.alpha, 0.0);
        c.set("teacher.path=t.safetensors").unwrap();
        c.set("method.name=crd").unwrap();
        c.set("plus_kd.alpha=1").unwrap();
        assert_eq!(
            c.plus_kd,
            PlusKd {
                alpha: 1.0,
                temperature: 4.0
            }
        );
        let err = c
            .set("method.name=kd")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("already has a KD term"), "{err}");
        let mut c = ExperimentConfig::default();
        c.set("teacher.path=t.safetensors").unwrap();
        c.set("method.name=ctkd").unwrap();
        assert!(
            c.set("plus_kd.alpha=1").is_err(),
            "CTKD is KD at a learned temperature"
        );
        let mut c = ExperimentConfig::default();
        c.set("method.name=byot").unwrap();
        let err = c
            .set("plus_kd.alpha=0.5")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("no frozen teacher"), "{err}");
        assert!(c.set("plus_kd.alpha=-1").is_err());
        // Unnamed, a run with KD added is labelled apart from the method alone.
        let mut c = ExperimentConfig::default();
        c.set("teacher.path=t.safetensors").unwrap();
        c.set("method.name=at").unwrap();
        assert_eq!(c.label(), "at");
        c.set("method.stages=[1, 2, 3]").unwrap();
        assert!(matches!(&c.method, MethodConfig::At { stages, .. } if stages == &[1, 2, 3]));
        let err = c
            .set("method.stages=3")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("expected a TOML array"), "{err}");
        c.set("plus_kd.alpha=0.9").unwrap();
        assert_eq!(c.label(), "at+kd");
    }

    #[test]
    fn the_resolved_config_round_trips() {
        let mut c = ExperimentConfig::default();
        c.set("method.name=dml").unwrap();
        assert_eq!(ExperimentConfig::from_toml(&c.to_toml()).unwrap(), c);
    }

    /// A config may name a suite's run as its teacher (`teacher.run`); outside a suite, where
    /// nothing resolves it, the run is refused with what to do instead.
    #[test]
    fn teacher_run_is_resolved_only_by_a_suite() {
        let c =
            ExperimentConfig::from_toml("[method]\nname = \"kd\"\n[teacher]\nrun = \"baseline\"\n")
                .unwrap();
        let e = c.unresolved_teacher_run().unwrap_err().to_string();
        assert!(
            e.contains("teacher.run = \"baseline\"") && e.contains("teacher.path"),
            "{e}"
        );
        let c = ExperimentConfig::from_toml(
            "[method]\nname = \"kd\"\n[teacher]\npath = \"t.safetensors\"\nmember_runs = [\"baseline@1\"]\n",
        )
        .unwrap();
        let e = c.unresolved_teacher_run().unwrap_err().to_string();
        assert!(
            e.contains("teacher.member_runs") && e.contains("teacher.members"),
            "{e}"
        );
        // Without a teacher the key is ignored, as teacher.path is.
        let mut c = ExperimentConfig::default();
        c.set("teacher.run=baseline").unwrap();
        c.unresolved_teacher_run().unwrap();
    }

    /// `teacher.members` takes a list through `--set`; an ensemble is refused for a method that
    /// reads more than its teacher's logits, and an empty member is named by index.
    #[test]
    fn teacher_members_are_checked() {
        let mut c = ExperimentConfig::default();
        c.set("method.name=kd").unwrap_err();
        c.set("teacher.path=a.safetensors").unwrap();
        c.set("method.name=kd").unwrap();
        c.set("teacher.members=[\"b\", \"runs/c\"]").unwrap();
        assert_eq!(c.teacher.members, ["b", "runs/c"]);
        c.validate().unwrap();
        let e = format!("{:#}", c.set("method.name=rkd").unwrap_err());
        assert!(e.contains("teacher.members") && e.contains("rkd"), "{e}");
        let e = format!("{:#}", c.set("teacher.members=[\"b\", \"\"]").unwrap_err());
        assert!(e.contains("teacher.members[1] is empty"), "{e}");
    }

    /// Every shipped experiment config and suite parses, and each suite's runs resolve.
    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for ds in ["cifar10", "cifar100"] {
            let mut methods = std::collections::BTreeSet::new();
            for e in std::fs::read_dir(root.join(ds)).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("suite-") {
                    let s = crate::commands::suite::SuiteFile::from_file(&p).unwrap();
                    let runs = s
                        .plan(&p, &[], Path::new("/nonexistent"))
                        .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                    assert!(!runs.is_empty());
                } else {
                    let c = ExperimentConfig::from_file(&p).unwrap_or_else(|e| panic!("{e:#}"));
                    assert_eq!(c.data.dataset, ds, "{}", p.display());
                    methods.insert(c.method.name());
                    n += 1;
                }
            }
            assert_eq!(
                methods.len(),
                MethodConfig::NAMES.len(),
                "{ds}: every method has a config: {methods:?}"
            );
        }
        assert!(n >= 26);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Keys that exist and keys that nearly do.
        const KEYS: [&str; 16] = [
            "name",
            "dataset",
            "subset",
            "mixup",
            "batch_size",
            "arch",
            "stem",
            "width",
            "epochs",
            "lr",
            "seed",
            "device",
            "path",
            "alpha",
            "temperature",
            "peers",
        ];
        const SECTIONS: [&str; 8] = [
            "[data]",
            "[model]",
            "[method]",
            "[teacher]",
            "[train]",
            "[[method.peers]]",
            "[bogus]",
            "[train.lr]",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<f64>().prop_map(|v| format!("{v:?}")),
                any::<bool>().prop_map(|v| v.to_string()),
                "[a-z0-9:_/.-]{0,12}".prop_map(|v| format!("{v:?}")),
                Just("[1, 2]".to_string()),
                Just("{ model = \"resnet50\" }".to_string()),
                Just("\"kd\"".to_string()),
                Just("nan".to_string()),
                Just("-1".to_string()),
                Just("0".to_string()),
            ]
        }

        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(SECTIONS.to_vec()).prop_map(String::from),
                (prop::sample::select(KEYS.to_vec()), value())
                    .prop_map(|(k, v)| format!("{k} = {v}")),
                "[ -~]{0,20}",
            ]
        }

        proptest! {
            /// Arbitrary TOML-like documents parse into a checked config or an error; no panic.
            #[test]
            fn config_parser_never_panics(lines in prop::collection::vec(line(), 0..12)) {
                if let Ok(c) = ExperimentConfig::from_toml(&lines.join("\n")) {
                    prop_assert!(c.validate().is_ok());
                    prop_assert_eq!(ExperimentConfig::from_toml(&c.to_toml()).unwrap(), c);
                }
            }

            /// Arbitrary `--set` assignments change one field or fail; no panic, and a failed
            /// one leaves the config as it was.
            #[test]
            fn set_never_panics(key in "(data|model|method|train|teacher|bogus)(\\.[a-z_]{1,12}){0,2}", v in value()) {
                let mut c = ExperimentConfig::default();
                let before = c.clone();
                match c.set(&format!("{key}={v}")) {
                    Ok(()) => prop_assert!(c.validate().is_ok()),
                    Err(_) => prop_assert_eq!(c, before),
                }
            }
        }
    }
}
