//! Weights (and BN statistics) as safetensors: atomic save, and a strict load that reports every
//! missing, unexpected or mis-shaped key by name and loads nothing unless all fit.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::init::init_resnet;
use crate::registry::ResNetConfig;
use crate::resnet::ResNet;
use crate::{ModelError, Result};

/// A freshly initialised, trainable ResNet and the variables behind it.
pub fn trainable_resnet(
    cfg: &ResNetConfig,
    device: &Device,
    seed: u64,
) -> Result<(ResNet, VarMap)> {
    let vm = VarMap::new();
    let model = ResNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, device))?;
    init_resnet(&vm, seed, cfg.zero_init_residual)?;
    Ok((model, vm))
}

/// Names and shapes of every tensor a model with `cfg` stores (parameters and BN statistics).
pub fn expected_keys(cfg: &ResNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let vm = VarMap::new();
    ResNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let data = vm.data().lock().expect("var map lock");
    let mut keys: Vec<(String, Vec<usize>)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    keys.sort();
    Ok(keys)
}

/// Compares a file's tensors with the keys a model expects; every difference is reported.
pub fn check_keys(
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (k, shape) in expected {
        match found.get(k) {
            None => missing.push(k.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                mismatched.push((k.clone(), shape.clone(), t.dims().to_vec()))
            }
            _ => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut unexpected: Vec<String> = found
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
        Ok(())
    } else {
        Err(ModelError::KeyMismatch {
            path: path.into(),
            missing,
            unexpected,
            mismatched,
        })
    }
}

/// Reads a safetensors file, naming the file in any error.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ModelError::BadFile {
            path: path.into(),
            message: "no such file".into(),
        });
    }
    candle_core::safetensors::load(path, device).map_err(|e| ModelError::BadFile {
        path: path.into(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// Writes all variables of `vm` to `path` through a temporary file and a rename.
pub fn save_varmap(vm: &VarMap, path: &Path) -> Result<()> {
    let data = vm.data().lock().expect("var map lock");
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    save_tensors(&tensors, path)
}

/// Writes named tensors as safetensors through a temporary file and a rename.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(".safetensors")
        .tempfile_in(dir)
        .map_err(ModelError::io(dir))?;
    // A full disk or a file-size limit surfaces here: name the file being written.
    candle_core::safetensors::save(tensors, tmp.path()).map_err(|e| ModelError::BadFile {
        path: path.into(),
        message: format!("could not be written: {e}"),
    })?;
    tmp.as_file().sync_all().map_err(ModelError::io(path))?;
    tmp.persist(path).map_err(|e| ModelError::Io {
        path: path.into(),
        source: e.error,
    })?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder, synced, then renamed:
/// readers see the old file or the new one, never a partial one. Mode 0644 (a temporary file
/// is created 0600; these are ordinary data files).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(ModelError::io(dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(ModelError::io(path))?;
    tmp.as_file().sync_all().map_err(ModelError::io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(ModelError::io(path))?;
    }
    tmp.persist(path).map_err(|e| ModelError::Io {
        path: path.into(),
        source: e.error,
    })?;
    Ok(())
}

/// Loads `path` into the variables of `vm`, all or nothing.
pub fn load_into(vm: &VarMap, path: &Path) -> Result<()> {
    let data = vm.data().lock().expect("var map lock");
    let mut expected: Vec<(String, Vec<usize>)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    expected.sort();
    let device = data
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let found = read_safetensors(path, &device)?;
    check_keys(&expected, &found, path)?;
    for (k, v) in data.iter() {
        v.set(&found[k].to_dtype(v.dtype())?)?;
    }
    Ok(())
}

/// Builds a model whose weights are constants loaded from `path` (a frozen teacher): no
/// variables, so no gradient can reach it.
pub fn load_frozen(cfg: &ResNetConfig, path: &Path, device: &Device) -> Result<ResNet> {
    let found = read_safetensors(path, device)?;
    check_keys(&expected_keys(cfg)?, &found, path)?;
    let found = found
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(ResNet::new(
        cfg,
        VarBuilder::from_tensors(found, DType::F32, device),
    )?)
}
