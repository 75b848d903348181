//! Property-based fuzzing of the CIFAR readers: one file of a valid CIFAR-10 / CIFAR-100 install
//! (written by the encoders) is mutated — truncated, extended, bytes flipped, labels out of
//! range — and loading must succeed with consistent sizes or fail with an error naming the
//! file, never panic. `PROPTEST_CASES=N` sets the executions per target.
use proptest::prelude::*;

use kd_data::cifar::*;

#[path = "../../../tools/fuzz/mutate.rs"]
mod mutate;

fn split(n: usize, coarse: bool) -> kd_data::Split {
    let mut s = kd_data::Split::empty(3, 32, 32);
    s.images = (0..n * 3072).map(|i| (i * 7 % 256) as u8).collect();
    s.labels = (0..n as u32).map(|i| i % 10).collect();
    if coarse {
        s.coarse_labels = Some((0..n as u32).map(|i| i % 20).collect());
    }
    s
}

fn check(result: kd_data::Result<kd_data::Dataset>, file: &str) -> Result<(), TestCaseError> {
    match result {
        Ok(ds) => {
            for s in [&ds.train, &ds.test] {
                prop_assert_eq!(s.images.len(), s.len() * 3072);
                prop_assert!(s.labels.iter().all(|&l| (l as usize) < ds.num_classes()));
            }
        }
        Err(e) => prop_assert!(
            e.to_string().contains(file),
            "error does not name {}: {}",
            file,
            e
        ),
    }
    Ok(())
}

proptest! {
    #[test]
    fn cifar10_reader_never_panics(file in 0usize..6, muts in mutate::mutations(3)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(CIFAR10_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let seed = encode_cifar10(&split(4, false));
        let names: Vec<&str> = CIFAR10_TRAIN_FILES.iter().copied().chain([CIFAR10_TEST_FILE]).collect();
        for (i, f) in names.iter().enumerate() {
            std::fs::write(dir.join(f), if i == file { mutate::apply(&seed, &muts) } else { seed.clone() }).unwrap();
        }
        check(load_cifar10(tmp.path()), names[file])?;
    }

    #[test]
    fn cifar100_reader_never_panics(test_file in any::<bool>(), muts in mutate::mutations(3)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(CIFAR100_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let seed = encode_cifar100(&split(4, true));
        let (bad, good) = if test_file { ("test.bin", "train.bin") } else { ("train.bin", "test.bin") };
        std::fs::write(dir.join(bad), mutate::apply(&seed, &muts)).unwrap();
        std::fs::write(dir.join(good), &seed).unwrap();
        check(load_cifar100(tmp.path()), bad)?;
    }
}
