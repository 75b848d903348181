#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// The values of `t` as f64, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .expect("a tensor convertible to f64")
}

/// `result`'s and `reference`'s values, of equal shapes, `result` finite.
fn pair(result: &Tensor, reference: &Tensor) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(
        result.dims(),
        reference.dims(),
        "result and reference differ in shape"
    );
    let (a, b) = (values(result), values(reference));
    // f64::max skips NaN: a non-finite result must fail here, not vanish in a fold.
    if let Some(bad) = a.iter().position(|x| !x.is_finite()) {
        panic!(
            "the result holds a non-finite value ({}) at flat index {bad}",
            a[bad]
        );
    }
    (a, b)
}

/// The bits of an f32 tensor's values, flattened: for comparisons that must be exact (two paths
/// that must compute the same floats, not merely close ones).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("an f32 tensor")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// max |result − reference| over the elements (of equal shapes; `result` must be finite).
pub fn max_abs_diff(result: &Tensor, reference: &Tensor) -> f64 {
    let (a, b) = pair(result, reference);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// max |result − reference| / max(max |reference|, `floor`): the worst element against the
/// reference's scale; `floor` compares near-zero references absolutely.
pub fn max_rel(result: &Tensor, reference: &Tensor, floor: f64) -> f64 {
    let scale = values(reference).iter().fold(floor, |m, x| m.max(x.abs()));
    max_abs_diff(result, reference) / scale
}

/// ‖result − reference‖ / (‖reference‖ + `floor`), Euclidean norms over all elements: the
/// error of a whole tensor (a gradient, a parameter's change), which one tiny element does not
/// dominate.
pub fn norm_rel(result: &Tensor, reference: &Tensor, floor: f64) -> f64 {
    let (a, b) = pair(result, reference);
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / (norm + floor).max(1e-30)
}

/// An f32 tensor of `shape` on the CPU, values in [−1, 1) from a xorshift stream seeded by
/// `seed`: the same values on every machine and run.
pub fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the values")
}

/// The tensors of the safetensors fixture at `path`, on the CPU; a missing or unreadable file
/// panics with its path and `script`, the tool that writes it.
pub fn load_fixture(path: &Path, script: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "fixture {}: {e} (written by {script}, committed with the tests)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn comparisons_measure_what_they_say() {
        let reference = t(&[3.0, -4.0, 0.0]);
        let result = t(&[3.0, -4.5, 0.25]);
        assert_eq!(max_abs_diff(&result, &reference), 0.5);
        assert_eq!(max_rel(&result, &reference, 1e-12), 0.5 / 4.0);
        // A reference below the floor is compared absolutely.
        assert_eq!(max_rel(&t(&[0.25]), &t(&[0.0]), 1.0), 0.25);
        let want = (0.25f64 + 0.0625).sqrt() / 5.0;
        assert!((norm_rel(&result, &reference, 0.0) - want).abs() < 1e-12);
        assert_eq!(norm_rel(&reference, &reference, 0.0), 0.0);
    }

    #[test]
    #[should_panic(expected = "non-finite value (NaN) at flat index 1")]
    fn a_non_finite_result_fails() {
        max_abs_diff(&t(&[1.0, f32::NAN]), &t(&[1.0, 1.0]));
    }

    #[test]
    #[should_panic(expected = "differ in shape")]
    fn shapes_must_agree() {
        max_abs_diff(&t(&[1.0, 2.0]), &t(&[1.0, 2.0, 3.0]));
    }

    #[test]
    fn seeded_values_are_fixed_and_in_range() {
        let a: Vec<f32> = seeded(&[2, 50], 7)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = seeded(&[2, 50], 7)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let c: Vec<f32> = seeded(&[2, 50], 8)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }

    #[test]
    #[should_panic(expected = "no_such.safetensors")]
    fn a_missing_fixture_is_named() {
        load_fixture(Path::new("no_such.safetensors"), "tools/fixtures/x.py");
    }
}
