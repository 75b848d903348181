//! PyTorch checkpoint import: a zip-format `.pt` (or a `.safetensors`) → our safetensors plus a
//! JSON sidecar. Accepts a bare state dict or one under `state_dict` / `model`, strips
//! `module.` (DataParallel) and `_orig_mod.` (torch.compile), drops `num_batches_tracked`, and
//! checks every key against the architecture before writing anything.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::checkpoint::{check_keys, expected_keys, save_tensors, write_atomic};
use crate::registry::{Arch, ResNetConfig, Stem};
use crate::{ModelError, Result};

/// What a converted teacher carries beside its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherMeta {
    /// Architecture.
    pub arch: Arch,
    /// Stem.
    pub stem: Stem,
    /// Output classes.
    pub num_classes: usize,
    /// Channels of the first stage (64 for the published teachers).
    pub base_width: usize,
    /// Input normalisation the weights were trained with (mean, [0, 1] units).
    pub mean: [f32; 3],
    /// Input normalisation the weights were trained with (std).
    pub std: [f32; 3],
    /// The file converted.
    pub source: String,
    /// SHA-256 of that file.
    pub source_sha256: String,
}

impl TeacherMeta {
    /// The model configuration these weights fit.
    pub fn config(&self) -> ResNetConfig {
        ResNetConfig {
            base_width: self.base_width,
            ..ResNetConfig::new(self.arch, self.stem, self.num_classes)
        }
    }

    /// The sidecar path of a weights file (`X.safetensors` → `X.json`).
    pub fn sidecar(weights: &Path) -> PathBuf {
        weights.with_extension("json")
    }

    /// Reads the sidecar of `weights`.
    pub fn load(weights: &Path) -> Result<Self> {
        let p = Self::sidecar(weights);
        let text = std::fs::read_to_string(&p).map_err(ModelError::io(&p))?;
        serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: p,
            message: format!("bad teacher metadata: {e}"),
        })
    }
}

/// Strips wrapper prefixes and drops bookkeeping keys.
pub fn clean_state_dict(raw: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    raw.into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(mut k, t)| {
            loop {
                if let Some(s) = k.strip_prefix("module.") {
                    k = s.to_string();
                } else if let Some(s) = k.strip_prefix("_orig_mod.") {
                    k = s.to_string();
                } else {
                    break;
                }
            }
            (k, t)
        })
        .collect()
}

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::BadFile {
        path: path.into(),
        message: message.into(),
    }
}

/// Reads a PyTorch checkpoint's tensors: a bare state dict, or one under `state_dict` or `model`.
pub fn read_pt(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(ModelError::io(path))?;
    if n < 4 || head != *b"PK\x03\x04" {
        let legacy = n >= 2 && head[0] == 0x80 && head[1] <= 5;
        return Err(bad(
            path,
            if legacy {
                "a legacy (pre-1.6) PyTorch pickle, which kd cannot read; re-save it with torch>=1.6: \
                 torch.save(torch.load(f, map_location='cpu'), 'new.pt')"
            } else {
                "not a PyTorch zip checkpoint (expected a file written by torch.save, torch>=1.6)"
            },
        ));
    }
    let mut last_err = String::new();
    for key in [None, Some("state_dict"), Some("model")] {
        // candle's pickle reader indexes its stack without checking on some malformed inputs
        // (a fuzzed checkpoint made it panic in `rebuild_args`); a panic there is this file's
        // fault, so it becomes this file's error.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            candle_core::pickle::read_all_with_key(path, key)
        }));
        match read {
            Ok(Ok(v)) if !v.is_empty() => return Ok(v),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => last_err = e.to_string(),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                return Err(bad(
                    path,
                    format!("a malformed pickle: candle's reader failed on it ({why})"),
                ));
            }
        }
    }
    Err(bad(
        path,
        format!("no tensors found at the top level or under `state_dict` / `model` {last_err}"),
    ))
}

fn read_any(src: &Path) -> Result<HashMap<String, Tensor>> {
    let raw: Vec<(String, Tensor)> = if src.extension().is_some_and(|e| e == "safetensors") {
        crate::checkpoint::read_safetensors(src, &Device::Cpu)?
            .into_iter()
            .collect()
    } else {
        read_pt(src)?
    };
    Ok(clean_state_dict(raw))
}

/// Converts `src` (`.pt` or `.safetensors`) for the model `cfg` into `dst` (`.safetensors`) and
/// its JSON sidecar, after checking every key and shape.
pub fn import_checkpoint(
    src: &Path,
    dst: &Path,
    cfg: &ResNetConfig,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<TeacherMeta> {
    convert(read_any(src)?, src, dst, cfg, mean, std)
}

/// Like [`import_checkpoint`] for a published teacher of known architecture and stem: the width
/// is read from `conv1.weight`, and the class count must be `num_classes` (a CIFAR-100 teacher
/// offered for CIFAR-10 is refused by name).
pub fn import_teacher(
    src: &Path,
    dst: &Path,
    arch: Arch,
    stem: Stem,
    num_classes: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<TeacherMeta> {
    let tensors = read_any(src)?;
    let dim0 = |k: &str| tensors.get(k).map(|t| t.dims()[0]);
    let base_width = dim0("conv1.weight").ok_or_else(|| {
        bad(
            src,
            format!("no conv1.weight: not a {} checkpoint", arch.name()),
        )
    })?;
    if let Some(c) = dim0("fc.weight").filter(|&c| c != num_classes) {
        return Err(bad(
            src,
            format!("the checkpoint has {c} classes (fc.weight), expected {num_classes}"),
        ));
    }
    let cfg = ResNetConfig {
        base_width,
        ..ResNetConfig::new(arch, stem, num_classes)
    };
    convert(tensors, src, dst, &cfg, mean, std)
}

fn convert(
    cleaned: HashMap<String, Tensor>,
    src: &Path,
    dst: &Path,
    cfg: &ResNetConfig,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<TeacherMeta> {
    check_keys(&expected_keys(cfg)?, &cleaned, src)?;
    let tensors = cleaned
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let bytes = std::fs::read(src).map_err(ModelError::io(src))?;
    let meta = TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: cfg.num_classes,
        base_width: cfg.base_width,
        mean,
        std,
        source: src
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        source_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
    };
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(ModelError::io(parent))?;
    }
    save_tensors(&tensors, dst)?;
    write_atomic(
        &TeacherMeta::sidecar(dst),
        serde_json::to_string_pretty(&meta)
            .expect("meta serialises")
            .as_bytes(),
    )?;
    Ok(meta)
}
