//! Property-based fuzzing of what kd-models reads from outside: PyTorch `.pt` checkpoints and
//! safetensors files, mutated from the seeds in `tools/fuzz-corpus/`. Each must load or fail
//! with an error naming the file — never panic. `PROPTEST_CASES=N` sets the executions per target.
use std::path::Path;

use proptest::prelude::*;

#[path = "../../../tools/fuzz/mutate.rs"]
mod mutate;

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tools/fuzz-corpus")
            .join(name),
    )
    .unwrap()
}

proptest! {
    #[test]
    fn pt_import_never_panics(which in 0usize..2, muts in mutate::mutations(4)) {
        let seed = corpus(["bare.pt", "nested.pt"][which]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fuzzed.pt");
        std::fs::write(&path, mutate::apply(&seed, &muts)).unwrap();
        match kd_models::import::read_pt(&path) {
            Ok(tensors) => {
                for (_, t) in tensors {
                    let _ = t.dims();
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzzed.pt"), "{e}"),
        }
    }

    #[test]
    fn safetensors_loader_never_panics(muts in mutate::mutations(4)) {
        let seed = corpus("tiny.safetensors");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fuzzed.safetensors");
        std::fs::write(&path, mutate::apply(&seed, &muts)).unwrap();
        match kd_models::checkpoint::read_safetensors(&path, &candle_core::Device::Cpu) {
            Ok(tensors) => {
                for t in tensors.values() {
                    let _ = t.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F32)).map(|t| t.to_vec1::<f32>());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzzed.safetensors"), "{e}"),
        }
    }
}

/// The input the fuzzer found in CI (session 9): one byte of `bare.pt` XORed with 12 made
/// candle's pickle reader index past its stack (`rebuild_args`) and panic. It is an error now.
#[test]
fn a_pickle_that_crashed_candles_reader_is_an_error() {
    let mut bytes = corpus("bare.pt");
    // proptest's `Index(3294318890850044975)` over 2559 bytes: ⌊i·n / 2⁶⁴⌋.
    let k = ((3294318890850044975u128 * bytes.len() as u128) >> 64) as usize;
    assert_eq!(k, 457);
    bytes[k] ^= 12;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("crashed.pt");
    std::fs::write(&path, &bytes).unwrap();
    let e = kd_models::import::read_pt(&path).unwrap_err().to_string();
    assert!(
        e.contains("crashed.pt") && e.contains("malformed pickle"),
        "{e}"
    );
}

/// The unmutated seeds load (so the fuzz targets start from valid inputs).
#[test]
fn corpus_seeds_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/fuzz-corpus");
    assert_eq!(
        kd_models::import::read_pt(&dir.join("bare.pt"))
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        kd_models::import::read_pt(&dir.join("nested.pt"))
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        kd_models::checkpoint::read_safetensors(
            &dir.join("tiny.safetensors"),
            &candle_core::Device::Cpu
        )
        .unwrap()
        .len(),
        3
    );
}
