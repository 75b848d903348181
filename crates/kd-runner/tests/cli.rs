//! The binary as a person meets it: data summary, eval errors that name keys, fetch hints.
use std::process::Command;

use kd_data::cifar::{encode_cifar10, CIFAR10_DIR, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES};

fn kd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kd-runner"))
}

fn write_cifar10(root: &std::path::Path) {
    let dir = root.join("cifar10").join(CIFAR10_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = kd_data::Split::empty(3, 32, 32);
    s.images = (0..20 * 3072).map(|i| (i % 256) as u8).collect();
    s.labels = (0..20).map(|i| i % 10).collect();
    for f in CIFAR10_TRAIN_FILES.iter().chain([&CIFAR10_TEST_FILE]) {
        std::fs::write(dir.join(f), encode_cifar10(&s)).unwrap();
    }
}

#[test]
fn data_prints_counts_and_stats() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let out = kd()
        .args(["data", "--dataset", "cifar10", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("train: 100 images, test: 20 images"),
        "{text}"
    );
    assert!(
        text.contains("airplane") && text.contains("train mean (R, G, B)"),
        "{text}"
    );
}

#[test]
fn missing_data_says_how_to_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kd()
        .args(["data", "--dataset", "cifar100", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo xtask fetch cifar100") && err.contains("--from DIR"),
        "{err}"
    );
}

#[test]
fn eval_names_the_missing_keys_of_a_fake_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = kd_models::ResNetConfig {
        base_width: 4,
        ..kd_models::ResNetConfig::new(kd_models::Arch::Resnet18, kd_models::Stem::Cifar, 10)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let full = tmp.path().join("full.safetensors");
    kd_models::save_varmap(&vm, &full).unwrap();
    let mut t = candle_core::safetensors::load(&full, &candle_core::Device::Cpu).unwrap();
    t.retain(|k, _| !k.starts_with("layer3."));
    let fake = tmp.path().join("fake.safetensors");
    candle_core::safetensors::save(&t, &fake).unwrap();
    let meta = kd_models::TeacherMeta {
        arch: cfg.arch,
        stem: cfg.stem,
        num_classes: 10,
        base_width: 4,
        mean: [0.5; 3],
        std: [0.25; 3],
        source: "test".into(),
        source_sha256: String::new(),
    };
    std::fs::write(
        tmp.path().join("fake.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    let out = kd()
        .args(["eval", "--weights"])
        .arg(&fake)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing key(s)") && err.contains("layer3.0.conv1.weight"),
        "{err}"
    );

    // The complete weights evaluate on a data set with the right class count.
    std::fs::write(
        tmp.path().join("full.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    write_cifar10(tmp.path());
    let out = kd()
        .args(["eval", "--weights"])
        .arg(&full)
        .arg("--data-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("top-1") && text.contains("(20 images"),
        "{text}"
    );
}

#[test]
fn cuda_in_a_cpu_build_says_how_to_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = kd()
        .args(["eval", "--device", "cuda", "--weights"])
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn train_refuses_to_overwrite_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    let run = tmp.path().join("run");
    let base = |epochs: &str| {
        let mut c = kd();
        c.args([
            "train",
            "--dataset",
            "cifar10",
            "--width",
            "4",
            "--stem",
            "cifar-maxpool",
            "--batch-size",
            "25",
            "--lr",
            "0.01",
            "--epochs",
            epochs,
            "--data-dir",
        ])
        .arg(tmp.path());
        c
    };
    let out = base("1").arg("--run-dir").arg(&run).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("best test top-1"));
    for f in [
        "run.json",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "model.safetensors",
        "model.json",
    ] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let again = base("1").arg("--run-dir").arg(&run).output().unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--resume"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let resumed = base("2").arg("--resume").arg(&run).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // A method that needs a teacher says how to get one.
    let no_teacher = base("1")
        .args(["--method", "kd"])
        .arg("--run-dir")
        .arg(tmp.path().join("kd"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no_teacher.stderr).contains("--teacher FILE"));
}
