//! Helpers shared by the binary's tests.
#![allow(dead_code)]
use std::process::{Command, Output};

use kd_data::cifar::{encode_cifar10, CIFAR10_DIR, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES};

/// The kd-runner binary under test.
pub fn kd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kd-runner"))
}

/// The standard output of a finished command, once it is checked to have succeeded; a failure
/// prints both its output and its errors.
pub fn succeeded(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The standard error of a finished command, once it is checked to have failed; a success
/// prints its output.
pub fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded where it should fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `text` contains every one of `parts`, naming the first missing one.
pub fn assert_contains_all<S: AsRef<str>>(text: &str, parts: impl IntoIterator<Item = S>) {
    for part in parts {
        let part = part.as_ref();
        assert!(text.contains(part), "{part} missing from:\n{text}");
    }
}

/// A tiny CIFAR-10 in the official binary layout under `root/cifar10`: 20 images per file
/// (100 training, 20 test), two of each class.
pub fn write_cifar10(root: &std::path::Path) {
    let dir = root.join("cifar10").join(CIFAR10_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = kd_data::Split::empty(3, 32, 32);
    s.images = (0..20 * 3072).map(|i| (i % 256) as u8).collect();
    s.labels = (0..20).map(|i| i % 10).collect();
    for f in CIFAR10_TRAIN_FILES.iter().chain([&CIFAR10_TEST_FILE]) {
        std::fs::write(dir.join(f), encode_cifar10(&s)).unwrap();
    }
}

/// A randomly initialised tiny teacher (`arch`, width 4, `classes` classes, CIFAR stem) exported
/// as `dir/name`, for runs that only need one to load.
pub fn write_teacher(
    dir: &std::path::Path,
    name: &str,
    arch: kd_models::Arch,
    classes: usize,
) -> std::path::PathBuf {
    let cfg = kd_models::ResNetConfig {
        base_width: 4,
        ..kd_models::ResNetConfig::new(arch, kd_models::Stem::Cifar, classes)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let meta = kd_models::TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: classes,
        base_width: 4,
        mean: [0.5; 3],
        std: [0.25; 3],
        source: "test".into(),
        source_sha256: String::new(),
    };
    let path = dir.join(name);
    kd_train::export(&vm, &meta, &path).unwrap();
    path
}
