//! PyTorch fixtures for the methods' unit tests (`tests/fixtures/*.safetensors`, made by
//! `tools/fixtures/make_loss_fixtures.py`) and the comparisons they share.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// A fixture file's tensors by key.
pub type Fixture = HashMap<String, Tensor>;

/// `tests/fixtures/{name}.safetensors`.
pub fn load(name: &str) -> Fixture {
    let path = format!(
        "{}/tests/fixtures/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The tensor at `key`, or a panic naming it.
pub fn get(f: &Fixture, key: &str) -> Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture has no {key}"))
        .clone()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The first element, as f64.
pub fn scalar(t: &Tensor) -> f64 {
    flat(t)[0]
}

/// Largest |a − b| over the largest |b|; `a` must be finite (`f64::max` would skip a NaN).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite values: {a:?}");
    let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}
