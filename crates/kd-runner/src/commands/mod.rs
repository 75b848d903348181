//! One module per subcommand.
pub mod bench;
pub mod data;
pub mod eval;
pub mod list;
pub mod main_job;
pub mod report;
pub mod selfcheck;
pub mod suite;
pub mod train;

use std::path::{Path, PathBuf};

use candle_core::Device;
use kd_models::{trainable_resnet, ResNetConfig, Teacher};

/// The weights file `path` names: the file itself, or for a run folder the student it exported
/// (`model.safetensors`, with `model.json` beside it).
pub(crate) fn weights_file(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let model = path.join("model.safetensors");
    if !model.is_file() {
        anyhow::bail!(
            "{} is a folder without model.safetensors: give a weights file (X.safetensors with \
             X.json beside it) or the folder of a finished run",
            path.display()
        );
    }
    Ok(model)
}

/// A teacher with seeded random weights, exported once (weights + sidecar, as `kd-runner train`
/// writes them) and loaded through the real loading path on each of `devices`: what `bench`
/// and `selfcheck` distil from when no trained teacher is at hand.
pub(crate) fn random_teachers(
    cfg: &ResNetConfig,
    seed: u64,
    devices: &[&Device],
) -> anyhow::Result<Vec<Teacher>> {
    let (_, vars) = trainable_resnet(cfg, &Device::Cpu, seed)?;
    let meta = kd_models::TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: cfg.num_classes,
        base_width: cfg.base_width,
        mean: [0.5; 3],
        std: [0.25; 3],
        source: "random weights".into(),
        source_sha256: String::new(),
    };
    let dir = std::env::temp_dir().join(format!("kd-teacher-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("teacher.safetensors");
    let loaded = kd_train::export(&vars, &meta, &path)
        .map_err(anyhow::Error::from)
        .and_then(|_| {
            devices
                .iter()
                .map(|d| Ok(Teacher::load(&path, d)?))
                .collect::<anyhow::Result<Vec<_>>>()
        });
    std::fs::remove_dir_all(&dir)?;
    loaded
}
