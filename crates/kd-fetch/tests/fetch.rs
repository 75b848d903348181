//! Fetching against a loopback server and from a folder: fresh download, resume, checksum
//! rejection, idempotence, `--from`, path traversal, preservation of an earlier install, the Hub.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kd_fetch::{fetch, install_path, Artifact, Expected, FetchError, FetchOptions, Verify};

fn opts(data: &Path, mirror: Option<&str>, verify: Verify) -> FetchOptions {
    FetchOptions {
        data_dir: data.to_path_buf(),
        mirror: mirror.map(String::from),
        from: None,
        verify,
        hub_endpoint: None,
        hub_offline: false,
        read_timeout: Duration::from_secs(5),
        force: false,
        quiet: true,
    }
}

fn pinned(bytes: &[u8]) -> Verify {
    Verify::Pinned(Expected::Md5(md5_hex(bytes)))
}

/// Nothing but the finished install, the download cache and the data root itself.
fn assert_no_leftovers(data: &Path) {
    for e in walk(data) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".staging") && !name.starts_with(".old") && !name.starts_with(".tmp"),
            "left behind: {}",
            e.display()
        );
    }
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

#[test]
fn fresh_download_installs_and_rerun_is_idempotent() {
    let archive = cifar10_archive(10);
    let srv = Server::start(vec![(
        "/cifar-10-binary.tar.gz",
        Route::Ok(archive.clone()),
    )]);
    let data = tempfile::tempdir().unwrap();
    let o = opts(data.path(), Some(&srv.url), pinned(&archive));
    let done = fetch(Artifact::Cifar10, &o).unwrap();
    assert!(!done.already);
    assert_eq!(done.marker.md5, md5_hex(&archive));
    assert_eq!(
        done.marker.source,
        format!("{}/cifar-10-binary.tar.gz", srv.url)
    );
    let ds = kd_data::load_cifar10(&install_path(Artifact::Cifar10, data.path())).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (50, 10));
    assert!(data
        .path()
        .join("downloads/cifar-10-binary.tar.gz")
        .is_file());
    assert!(!data
        .path()
        .join("downloads/cifar-10-binary.tar.gz.part")
        .exists());
    assert_no_leftovers(data.path());

    let before = srv.requests().len();
    let t = Instant::now();
    let again = fetch(Artifact::Cifar10, &o).unwrap();
    assert!(again.already);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(
        srv.requests().len(),
        before,
        "a verified install makes no request"
    );
}

#[test]
fn interrupted_download_resumes_with_range() {
    let archive = cifar100_archive(120);
    let cut = archive.len() / 3;
    let srv = Server::start(vec![(
        "/cifar-100-binary.tar.gz",
        Route::CutOnce {
            body: archive.clone(),
            after: cut,
            times: 1,
        },
    )]);
    let data = tempfile::tempdir().unwrap();
    let o = opts(data.path(), Some(&srv.url), pinned(&archive));
    let err = fetch(Artifact::Cifar100, &o).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("after {cut} of {} bytes", archive.len())),
        "{err}"
    );
    let part = data.path().join("downloads/cifar-100-binary.tar.gz.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);
    assert!(!install_path(Artifact::Cifar100, data.path()).exists());

    let done = fetch(Artifact::Cifar100, &o).unwrap();
    assert_eq!(done.marker.size, archive.len() as u64);
    let reqs = srv.requests();
    assert_eq!(
        reqs.last().unwrap().range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    let ds = kd_data::load_cifar100(&install_path(Artifact::Cifar100, data.path())).unwrap();
    assert_eq!(ds.train.len(), 120);
    assert_no_leftovers(data.path());
}

#[test]
fn server_ignoring_range_restarts_the_file() {
    let archive = cifar10_archive(4);
    let srv = Server::start(vec![(
        "/cifar-10-binary.tar.gz",
        Route::IgnoreRange(archive.clone()),
    )]);
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("downloads")).unwrap();
    // A stale partial file with wrong bytes: the 200 answer must overwrite it, not append.
    std::fs::write(
        data.path().join("downloads/cifar-10-binary.tar.gz.part"),
        vec![0xAB; 100],
    )
    .unwrap();
    fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&srv.url), pinned(&archive)),
    )
    .unwrap();
    assert_eq!(srv.requests()[0].range.as_deref(), Some("bytes=100-"));
}

#[test]
fn wrong_bytes_are_rejected_and_removed() {
    let archive = cifar10_archive(4);
    let srv = Server::start(vec![(
        "/cifar-10-binary.tar.gz",
        Route::Ok(archive.clone()),
    )]);
    let data = tempfile::tempdir().unwrap();
    let wrong = "00000000000000000000000000000000";
    let o = opts(
        data.path(),
        Some(&srv.url),
        Verify::Pinned(Expected::Md5(wrong.into())),
    );
    let err = fetch(Artifact::Cifar10, &o).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, FetchError::Checksum(m) if m.algo == "md5"),
        "{msg}"
    );
    assert!(
        msg.contains(wrong) && msg.contains(&md5_hex(&archive)) && msg.contains(&srv.url),
        "{msg}"
    );
    assert!(!data
        .path()
        .join("downloads/cifar-10-binary.tar.gz.part")
        .exists());
    assert!(!data
        .path()
        .join("downloads/cifar-10-binary.tar.gz")
        .exists());
    assert!(!install_path(Artifact::Cifar10, data.path()).exists());
    // Against the official checksum the error says how to accept a copy deliberately.
    let err = fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&srv.url), Verify::Official),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("c32a1d4ab5d03f1284b67883e8d87530")
            && err.contains("--md5")
            && err.contains("--no-verify"),
        "{err}"
    );
    assert_no_leftovers(data.path());
}

#[test]
fn http_errors_and_stalls_are_clear() {
    let srv = Server::start(vec![
        ("/cifar-10-binary.tar.gz", Route::Status(404)),
        (
            "/cifar-100-binary.tar.gz",
            Route::Stall(Duration::from_secs(4)),
        ),
    ]);
    let data = tempfile::tempdir().unwrap();
    let err = fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&srv.url), Verify::Skip),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 404") && err.contains("cifar-10-binary.tar.gz"),
        "{err}"
    );
    let mut o = opts(data.path(), Some(&srv.url), Verify::Skip);
    o.read_timeout = Duration::from_secs(1);
    let t = Instant::now();
    let err = fetch(Artifact::Cifar100, &o).unwrap_err().to_string();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the read timeout ends a stalled transfer"
    );
    assert!(err.contains("cifar-100-binary.tar.gz"), "{err}");
    assert!(!install_path(Artifact::Cifar10, data.path()).exists());
    // A server error is named with its status and the file, and leaves nothing behind.
    let srv500 = Server::start(vec![("/cifar-10-binary.tar.gz", Route::Status(500))]);
    let err = fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&srv500.url), Verify::Skip),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 500") && err.contains("cifar-10-binary.tar.gz"),
        "{err}"
    );
    assert!(!install_path(Artifact::Cifar10, data.path()).exists());
    // A refused connection names the URL once (the HTTP client's message starts with it too).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&closed), Verify::Skip),
    )
    .unwrap_err()
    .to_string();
    let url = format!("{closed}/cifar-10-binary.tar.gz");
    assert_eq!(err.matches(&url).count(), 1, "{err}");
}

#[test]
fn from_folder_installs_with_the_same_checks() {
    let archive = cifar10_archive(3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cifar-10-binary.tar.gz"), &archive).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut o = opts(data.path(), None, Verify::Official);
    o.from = Some(dir.path().to_path_buf());
    let err = fetch(Artifact::Cifar10, &o).unwrap_err().to_string();
    assert!(
        err.contains("not the official file")
            && err.contains(&format!("--md5 {}", md5_hex(&archive))),
        "{err}"
    );
    o.verify = pinned(&archive);
    let done = fetch(Artifact::Cifar10, &o).unwrap();
    assert!(done.marker.verified.starts_with("pinned md5"));
    assert_eq!(kd_data::load_cifar10(&done.path).unwrap().test.len(), 3);
    // --no-verify installs too (after a forced reinstall), recording the digests.
    o.verify = Verify::Skip;
    o.force = true;
    let done = fetch(Artifact::Cifar10, &o).unwrap();
    assert_eq!(done.marker.md5, md5_hex(&archive));
    // A folder without the archive is named in the error.
    let empty = tempfile::tempdir().unwrap();
    o.from = Some(empty.path().to_path_buf());
    let err = fetch(Artifact::Cifar100, &o).unwrap_err().to_string();
    assert!(
        err.contains("cifar-100-binary.tar.gz")
            && err.contains(&empty.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn traversal_paths_are_refused() {
    let archive = traversal_archive();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cifar-10-binary.tar.gz"), &archive).unwrap();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut o = opts(&data, None, Verify::Skip);
    o.from = Some(dir.path().to_path_buf());
    let err = fetch(Artifact::Cifar10, &o).unwrap_err();
    assert!(matches!(err, FetchError::UnsafePath { .. }), "{err}");
    assert!(err.to_string().contains("escaped.bin"));
    assert!(
        walk(root.path())
            .iter()
            .all(|p| !p.ends_with("escaped.bin")),
        "nothing written outside"
    );
    assert!(!install_path(Artifact::Cifar10, &data).exists());
    assert_no_leftovers(&data);

    // The same for a zip.
    let zip = teacher_zip(b"weights", &["../../evil.pt"]);
    std::fs::write(dir.path().join("state_dicts.zip"), &zip).unwrap();
    let err = fetch(Artifact::TeacherCifar10, &o).unwrap_err();
    assert!(
        matches!(err, FetchError::UnsafePath { .. }) && err.to_string().contains("evil.pt"),
        "{err}"
    );
    assert!(!install_path(Artifact::TeacherCifar10, &data).exists());
}

#[test]
fn a_failed_reinstall_keeps_the_earlier_install() {
    let good = cifar10_archive(5);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cifar-10-binary.tar.gz"), &good).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut o = opts(data.path(), None, Verify::Skip);
    o.from = Some(dir.path().to_path_buf());
    let first = fetch(Artifact::Cifar10, &o).unwrap();
    // A truncated archive (cut mid-stream) must fail without touching the installed copy.
    std::fs::write(
        dir.path().join("cifar-10-binary.tar.gz"),
        &good[..good.len() / 2],
    )
    .unwrap();
    o.force = true;
    let err = fetch(Artifact::Cifar10, &o).unwrap_err();
    assert!(matches!(err, FetchError::Archive { .. }), "{err}");
    let after =
        kd_fetch::installed(Artifact::Cifar10, data.path()).expect("earlier install intact");
    assert_eq!(after, first.marker);
    assert_eq!(kd_data::load_cifar10(&first.path).unwrap().train.len(), 25);
    assert_no_leftovers(data.path());
    // An archive that unpacks but does not load (bad label byte) is refused the same way.
    let mut bad = cifar10_archive(5);
    bad.truncate(0);
    std::fs::write(
        dir.path().join("cifar-10-binary.tar.gz"),
        b"not gzip at all",
    )
    .unwrap();
    assert!(fetch(Artifact::Cifar10, &o).is_err());
    assert!(kd_fetch::installed(Artifact::Cifar10, data.path()).is_some());
}

fn model_fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kd-models/tests/fixtures")
            .join(name),
    )
    .unwrap()
}

#[test]
fn teacher_zip_member_is_extracted_and_converted() {
    // A tiny-width ResNet50 with the max-pool stem saved by PyTorch; the width is read from conv1.weight.
    let pt = model_fixture("resnet50_cifar-maxpool.pt");
    let zip = teacher_zip(&pt, &[]);
    let srv = Server::start(vec![("/state_dicts.zip", Route::Ok(zip.clone()))]);
    let data = tempfile::tempdir().unwrap();
    let done = fetch(
        Artifact::TeacherCifar10,
        &opts(data.path(), Some(&srv.url), Verify::Official),
    )
    .unwrap();
    assert_eq!(std::fs::read(done.path.join("resnet50.pt")).unwrap(), pt);
    assert!(
        !done.path.join("resnet18.pt").exists(),
        "only the ResNet50 is installed"
    );
    assert!(done.marker.verified.contains("sha256 recorded"));
    let weights = kd_fetch::teacher_weights(Artifact::TeacherCifar10, data.path());
    assert_eq!(weights, done.path.join("teacher.safetensors"));
    let teacher = kd_models::Teacher::load(&weights, &candle_core::Device::Cpu).unwrap();
    assert_eq!(teacher.meta().stem, kd_models::Stem::CifarMaxpool);
    assert_eq!(teacher.meta().base_width, 4);
    assert_eq!(teacher.meta().mean, kd_data::Normalize::CIFAR10.mean);
    let x = candle_core::Tensor::zeros(
        (1, 3, 32, 32),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(teacher.forward(&x).unwrap().logits.dims(), &[1, 10]);

    // The wrong architecture inside the zip is refused by key name, nothing installed.
    let wrong = teacher_zip(&model_fixture("resnet18_cifar.pt"), &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state_dicts.zip"), &wrong).unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut o = opts(other.path(), None, Verify::Skip);
    o.from = Some(dir.path().to_path_buf());
    let err = fetch(Artifact::TeacherCifar10, &o).unwrap_err().to_string();
    assert!(
        err.contains("conv3.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(!install_path(Artifact::TeacherCifar10, other.path()).exists());
    assert_no_leftovers(other.path());
}

fn tiny_cifar100_teacher(classes: usize) -> Vec<u8> {
    let cfg = kd_models::ResNetConfig {
        base_width: 4,
        ..kd_models::ResNetConfig::new(kd_models::Arch::Resnet50, kd_models::Stem::Cifar, classes)
    };
    let (_, vm) = kd_models::trainable_resnet(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.safetensors");
    kd_models::save_varmap(&vm, &p).unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn hub_download_offline_cache_and_errors() {
    let weights = tiny_cifar100_teacher(100);
    let path = "/edadaltocg/resnet50_cifar100/resolve/main/model.safetensors";
    let srv = Server::start(vec![(path, Route::Ok(weights.clone()))]);
    let data = tempfile::tempdir().unwrap();
    let mut o = opts(data.path(), None, Verify::Official);
    o.hub_endpoint = Some(srv.url.clone());
    let done = fetch(Artifact::TeacherCifar100, &o).unwrap();
    assert_eq!(
        std::fs::read(done.path.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(srv.requests().iter().any(|r| r.path == path));
    let meta = kd_models::TeacherMeta::load(&done.path.join("teacher.safetensors")).unwrap();
    assert_eq!((meta.num_classes, meta.stem), (100, kd_models::Stem::Cifar));

    // Offline: served from the Hub cache, no request.
    let n = srv.requests().len();
    o.hub_offline = true;
    o.force = true;
    fetch(Artifact::TeacherCifar100, &o).unwrap();
    assert_eq!(srv.requests().len(), n);

    // Offline with an empty cache says so.
    let empty = tempfile::tempdir().unwrap();
    let mut o2 = opts(empty.path(), None, Verify::Official);
    o2.hub_offline = true;
    let err = fetch(Artifact::TeacherCifar100, &o2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("resnet50_cifar100"),
        "{err}"
    );

    // A 10-class checkpoint offered as the CIFAR-100 teacher is refused with the class count.
    let ten = tempfile::tempdir().unwrap();
    std::fs::write(
        ten.path().join("model.safetensors"),
        tiny_cifar100_teacher(10),
    )
    .unwrap();
    let mut o3 = opts(empty.path(), None, Verify::Skip);
    o3.from = Some(ten.path().to_path_buf());
    let err = fetch(Artifact::TeacherCifar100, &o3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10 classes") && err.contains("expected 100"),
        "{err}"
    );
}

#[test]
fn a_web_page_instead_of_the_teacher_zip_is_refused_and_not_kept() {
    // What a dead Box link or Google Drive's quota page answers: 200 and HTML. The zip has no
    // published checksum, so only the content type and the file's first bytes can tell.
    let page = b"<!DOCTYPE html><html><body>This shared file or folder link has been removed</body></html>".to_vec();
    let data = tempfile::tempdir().unwrap();
    let downloads = data.path().join("downloads");
    let srv = Server::start(vec![("/state_dicts.zip", Route::Html(page.clone()))]);
    let err = fetch(
        Artifact::TeacherCifar10,
        &opts(data.path(), Some(&srv.url), Verify::Official),
    )
    .unwrap_err();
    assert!(matches!(err, FetchError::AllSourcesFailed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("HTML page") && msg.contains("/state_dicts.zip"),
        "{msg}"
    );
    assert!(!downloads.join("state_dicts.zip").exists());
    assert!(!downloads.join("state_dicts.zip.part").exists());

    // The same page without its content type: refused by its first bytes, nothing kept.
    let srv = Server::start(vec![("/state_dicts.zip", Route::Ok(page))]);
    let err = fetch(
        Artifact::TeacherCifar10,
        &opts(data.path(), Some(&srv.url), Verify::Official),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not a zip archive") && err.contains("<!DOCTYPE"),
        "{err}"
    );
    assert!(!downloads.join("state_dicts.zip").exists());
    assert!(!downloads.join("state_dicts.zip.part").exists());

    // A bad file already in the download cache (left by an earlier version) is fetched again.
    std::fs::write(
        downloads.join("state_dicts.zip"),
        b"<html>old error page</html>",
    )
    .unwrap();
    let pt = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kd-models/tests/fixtures/resnet50_cifar-maxpool.pt"),
    )
    .unwrap();
    let srv = Server::start(vec![("/state_dicts.zip", Route::Ok(teacher_zip(&pt, &[])))]);
    let done = fetch(
        Artifact::TeacherCifar10,
        &opts(data.path(), Some(&srv.url), Verify::Official),
    )
    .unwrap();
    assert_eq!(std::fs::read(done.path.join("resnet50.pt")).unwrap(), pt);
    assert_eq!(
        srv.requests().len(),
        1,
        "the cached page was replaced by a download"
    );
}

#[test]
fn a_cifar_download_that_is_not_gzip_is_refused() {
    // With --no-verify no checksum protects the install; the gzip signature still does.
    let data = tempfile::tempdir().unwrap();
    let srv = Server::start(vec![(
        "/cifar-10-binary.tar.gz",
        Route::Ok(b"PK\x03\x04 a zip, not a tar.gz".to_vec()),
    )]);
    let err = fetch(
        Artifact::Cifar10,
        &opts(data.path(), Some(&srv.url), Verify::Skip),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a gzip archive"), "{err}");
    assert!(kd_fetch::installed(Artifact::Cifar10, data.path()).is_none());
    assert!(!data
        .path()
        .join("downloads/cifar-10-binary.tar.gz")
        .exists());
}
