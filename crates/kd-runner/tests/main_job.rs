//! The README's first command, `kd-runner` with no arguments, end to end on the CPU: data and
//! teacher installed the documented offline way (`kd-runner fetch … --from DIR`), then the short
//! CPU comparison of the four headline runs and its report.
//!
//! The archives are made here: a small CIFAR-10 in the official binary layout (the reader
//! accepts any record count) and the pretrained teacher's zip holding a width-4 ResNet50 saved
//! by PyTorch (`kd-models/tests/fixtures`). The student is the configs' full ResNet18.
mod common;

use std::io::Write;
use std::path::Path;

use common::{kd, succeeded};

/// Records per batch file: 5 × 200 training images, 200 test images. The main job's CPU scale
/// keeps 5% of the training images (50, one step) and 10% of the test images (20).
const PER_FILE: usize = 200;

fn cifar10_archive(path: &Path) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), bytes)
            .unwrap();
    };
    // Each class has its own mean brightness, so there is something to learn.
    let batch = |k: usize| -> Vec<u8> {
        (0..PER_FILE)
            .flat_map(|i| {
                let label = (i + k) % 10;
                let mut r = vec![label as u8];
                r.extend((0..3072).map(|p| (label * 25 + (p * 7 + i) % 16) as u8));
                r
            })
            .collect()
    };
    for k in 1..=5 {
        add(&format!("data_batch_{k}.bin"), &batch(k));
    }
    add("test_batch.bin", &batch(0));
    add(
        "batches.meta.txt",
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n",
    );
    tar.into_inner().unwrap().finish().unwrap();
}

fn teacher_zip(path: &Path) {
    let pt = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kd-models/tests/fixtures/resnet50_cifar-maxpool.pt"),
    )
    .unwrap();
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    w.start_file(
        "state_dicts/resnet50.pt",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    w.write_all(&pt).unwrap();
    w.finish().unwrap();
}

fn md5_hex(path: &Path) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(std::fs::read(path).unwrap()))
}

#[test]
fn main_job_runs_the_short_cpu_comparison_offline() {
    let work = tempfile::tempdir().unwrap();
    let downloads = work.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let archive = downloads.join("cifar-10-binary.tar.gz");
    cifar10_archive(&archive);
    teacher_zip(&downloads.join("state_dicts.zip"));

    // Offline, without a pinned checksum: refused, and the error says what to pin.
    let data = work.path().join("data");
    let out = kd()
        .current_dir(work.path())
        .env("KD_DATA_DIR", &data)
        .env_remove("KD_MIRROR")
        .args(["fetch", "cifar10", "-q", "--from"])
        .arg(&downloads)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&md5_hex(&archive)), "{err}");

    for what in [
        vec!["cifar10".to_string(), "--md5".into(), md5_hex(&archive)],
        vec!["teacher-cifar10".to_string()],
    ] {
        succeeded(
            &kd()
                .current_dir(work.path())
                .env("KD_DATA_DIR", &data)
                .env_remove("KD_MIRROR")
                .arg("fetch")
                .args(&what)
                .args(["-q", "--from"])
                .arg(&downloads)
                .output()
                .unwrap(),
        );
    }

    // The main job: no arguments, everything it needs already installed.
    let out = kd()
        .current_dir(work.path())
        .env("KD_DATA_DIR", &data)
        .env_remove("KD_MIRROR")
        .output()
        .unwrap();
    let text = succeeded(&out);
    assert!(text.contains("already installed"), "{text}");
    // The scale is stated with the counts of the installed copy.
    assert!(
        text.contains("SHORT CPU comparison — 5% of the CIFAR-10 training images (50), 1 epoch, test top-1 on 20 test images"),
        "{text}"
    );
    let runs = work.path().join("runs/main-cpu-short");
    let report = std::fs::read_to_string(runs.join("report.md")).unwrap();
    for label in ["baseline", "kd", "byot", "kd-byot"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("| {label} "))),
            "no row for {label}:\n{report}"
        );
    }
    // Each run trained on the short scale and the distilling ones used the installed teacher.
    let dirs: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    for dir in &dirs {
        let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        assert!(config.contains("subset = 0.05"), "{config}");
        assert!(config.contains("epochs = 1"), "{config}");
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("kd") {
            assert!(
                config.contains(&data.join("teachers").display().to_string()),
                "{config}"
            );
        }
    }

    // A second call finds every run finished and only reprints the report.
    let again = succeeded(
        &kd()
            .current_dir(work.path())
            .env("KD_DATA_DIR", &data)
            .env_remove("KD_MIRROR")
            .output()
            .unwrap(),
    );
    assert!(again.contains("| kd-byot "), "{again}");
    assert_eq!(
        std::fs::read_to_string(runs.join("report.md")).unwrap(),
        report,
        "the report of the resumed suite is the same"
    );
}
