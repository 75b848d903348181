//! Installing an artifact: obtain the archive (cache, `--from DIR`, or each URL in turn),
//! verify it, unpack into a staging folder beside the target, check that it loads, then swap it
//! into place. An earlier good install is only removed once the new one is complete.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checksum::{digest_file, Digests, Verify};
use crate::extract::{extract_tar_gz, extract_zip_member};
use crate::http::Http;
use crate::hub::{hub_get, HubOptions};
use crate::progress::Progress;
use crate::sources::{ArchiveKind, ArchiveSource, Artifact, HubSource, Source};
use crate::{ChecksumMismatch, FetchError, Result};

/// Name of the marker written into every completed install.
pub const MARKER: &str = "kd-install.json";

/// How and where to fetch.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Data root (`KD_DATA_DIR`, `--data-dir`; default `data`).
    pub data_dir: PathBuf,
    /// Base URL replacing each archive's official location (`KD_MIRROR`, `--mirror`).
    pub mirror: Option<String>,
    /// Install from archives already on disk in this folder (`--from`).
    pub from: Option<PathBuf>,
    /// Checksum policy.
    pub verify: Verify,
    /// Hub endpoint (`HF_ENDPOINT`); defaults to the mirror, then to the Hub itself.
    pub hub_endpoint: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use the Hub cache only.
    pub hub_offline: bool,
    /// Seconds without data before a transfer is abandoned.
    pub read_timeout: Duration,
    /// Reinstall even when a verified install exists.
    pub force: bool,
    /// No progress bars.
    pub quiet: bool,
}

impl FetchOptions {
    /// Options from the environment (`KD_DATA_DIR`, `KD_MIRROR`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`),
    /// with `data_dir` overriding `KD_DATA_DIR` when given.
    pub fn from_env(data_dir: Option<PathBuf>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        FetchOptions {
            data_dir: data_dir.unwrap_or_else(default_data_dir),
            mirror: var("KD_MIRROR"),
            from: None,
            verify: Verify::Official,
            hub_endpoint: var("HF_ENDPOINT"),
            hub_offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false")),
            read_timeout: Duration::from_secs(60),
            force: false,
            quiet: false,
        }
    }
}

/// `KD_DATA_DIR`, or `data` in the working directory.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("KD_DATA_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// What a completed install records about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstallMarker {
    /// Artifact name.
    pub artifact: String,
    /// URL or path the bytes came from.
    pub source: String,
    /// How the source was checked ("official md5", "pinned sha256", "unverified", …).
    pub verified: String,
    /// MD5 of the source file.
    pub md5: String,
    /// SHA-256 of the source file.
    pub sha256: String,
    /// Size of the source file.
    pub size: u64,
    /// Installed files (relative path, size), checked on every later fetch.
    pub files: Vec<(String, u64)>,
}

/// The outcome of [`fetch`].
#[derive(Clone, Debug)]
pub struct Installed {
    /// Install folder.
    pub path: PathBuf,
    /// True when a verified install was already there and nothing was done.
    pub already: bool,
    /// The marker.
    pub marker: InstallMarker,
}

/// Folder where `artifact` is installed under `data_dir`.
pub fn install_path(artifact: Artifact, data_dir: &Path) -> PathBuf {
    data_dir.join(artifact.install_dir())
}

/// The marker of a complete install whose files are all present with their recorded sizes.
pub fn installed(artifact: Artifact, data_dir: &Path) -> Option<InstallMarker> {
    let dir = install_path(artifact, data_dir);
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    let m: InstallMarker = serde_json::from_str(&text).ok()?;
    let complete = m
        .files
        .iter()
        .all(|(f, size)| std::fs::metadata(dir.join(f)).is_ok_and(|md| md.len() == *size));
    complete.then_some(m)
}

/// Installs `artifact` (or confirms it is installed).
pub fn fetch(artifact: Artifact, opts: &FetchOptions) -> Result<Installed> {
    let dest = install_path(artifact, &opts.data_dir);
    if !opts.force {
        if let Some(marker) = installed(artifact, &opts.data_dir) {
            return Ok(Installed {
                path: dest,
                already: true,
                marker,
            });
        }
    }
    std::fs::create_dir_all(&opts.data_dir).map_err(FetchError::io(&opts.data_dir))?;
    let parent = dest
        .parent()
        .expect("install dirs have a parent")
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(FetchError::io(&parent))?;
    // Staging beside the destination, so the final step is a same-filesystem rename.
    let staging = tempfile::Builder::new()
        .prefix(&format!(".staging-{}-", artifact.name()))
        .tempdir_in(&parent)
        .map_err(FetchError::io(&parent))?;
    let content = staging.path().join("content");
    std::fs::create_dir(&content).map_err(FetchError::io(&content))?;
    let mut marker = match artifact.source() {
        Source::Archive(src) => install_archive(artifact, &src, opts, &content)?,
        Source::Hub(src) => install_hub(&src, opts, &content)?,
    };
    marker.artifact = artifact.name().into();
    validate(artifact, &content)?;
    marker.files = list_files(&content)?;
    write_atomic(
        &content.join(MARKER),
        serde_json::to_string_pretty(&marker)
            .expect("marker serialises")
            .as_bytes(),
    )?;
    swap_into_place(&content, &dest)?;
    Ok(Installed {
        path: dest,
        already: false,
        marker,
    })
}

/// Checks the unpacked files before they replace anything: data sets must load, teachers are
/// converted to safetensors (with their JSON sidecar) and must fit their architecture.
fn validate(artifact: Artifact, content: &Path) -> Result<()> {
    use kd_models::{import_teacher, Arch, Stem};
    let n10 = kd_data::Normalize::CIFAR10;
    let n100 = kd_data::Normalize::CIFAR100;
    match artifact {
        Artifact::Cifar10 => {
            kd_data::load_cifar10(content)?;
        }
        Artifact::Cifar100 => {
            kd_data::load_cifar100(content)?;
        }
        Artifact::TeacherCifar10 => {
            let dst = content.join(TEACHER_WEIGHTS);
            import_teacher(
                &content.join("resnet50.pt"),
                &dst,
                Arch::Resnet50,
                Stem::CifarMaxpool,
                10,
                n10.mean,
                n10.std,
            )?;
        }
        Artifact::TeacherCifar100 => {
            let dst = content.join(TEACHER_WEIGHTS);
            import_teacher(
                &content.join("model.safetensors"),
                &dst,
                Arch::Resnet50,
                Stem::Cifar,
                100,
                n100.mean,
                n100.std,
            )?;
        }
    }
    Ok(())
}

/// File name of a converted teacher inside its install folder (sidecar: `teacher.json`).
pub const TEACHER_WEIGHTS: &str = "teacher.safetensors";

/// The converted weights of an installed teacher.
pub fn teacher_weights(artifact: Artifact, data_dir: &Path) -> PathBuf {
    install_path(artifact, data_dir).join(TEACHER_WEIGHTS)
}

fn verify(
    d: &Digests,
    src_desc: &str,
    file: &str,
    official: &Option<crate::checksum::Expected>,
    size: Option<u64>,
    policy: &Verify,
) -> Result<String> {
    match policy {
        Verify::Skip => Ok("unverified (--no-verify)".into()),
        Verify::Pinned(e) => {
            e.check(d, src_desc, file, false)?;
            Ok(format!("pinned {e}"))
        }
        Verify::Official => match official {
            Some(e) => {
                e.check(d, src_desc, file, true)?;
                if let Some(s) = size.filter(|s| *s != d.size) {
                    return Err(FetchError::Checksum(Box::new(ChecksumMismatch {
                        source_desc: src_desc.into(),
                        file: file.into(),
                        algo: "size",
                        expected: s.to_string(),
                        actual: d.size.to_string(),
                        hint: String::new(),
                    })));
                }
                Ok(format!("official {e}"))
            }
            None => {
                tracing::warn!("{file}: no official checksum is published; recorded sha256 {} (pin it with --sha256)", d.sha256);
                Ok("no published checksum; sha256 recorded".into())
            }
        },
    }
}

fn install_archive(
    artifact: Artifact,
    src: &ArchiveSource,
    opts: &FetchOptions,
    content: &Path,
) -> Result<InstallMarker> {
    let (archive, desc, digests, verified) = obtain_archive(artifact, src, opts)?;
    match src.kind {
        ArchiveKind::TarGz => {
            extract_tar_gz(&archive, content)?;
        }
        ArchiveKind::ZipMember { member, out } => {
            extract_zip_member(&archive, member, &content.join(out))?;
        }
    }
    Ok(InstallMarker {
        artifact: String::new(),
        source: desc,
        verified,
        md5: digests.md5,
        sha256: digests.sha256,
        size: digests.size,
        files: vec![],
    })
}

/// Finds or downloads the archive and verifies it. Returns (path, source, digests, how verified).
fn obtain_archive(
    artifact: Artifact,
    src: &ArchiveSource,
    opts: &FetchOptions,
) -> Result<(PathBuf, String, Digests, String)> {
    if let Some(dir) = &opts.from {
        let p = dir.join(src.file);
        if !p.is_file() {
            return Err(FetchError::NotInFolder {
                dir: dir.clone(),
                expected: vec![src.file.into()],
            });
        }
        let d = digest_file(&p)?;
        let desc = p.display().to_string();
        let v = verify(&d, &desc, src.file, &src.checksum, src.size, &opts.verify)?;
        return Ok((p, desc, d, v));
    }
    let downloads = opts.data_dir.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(FetchError::io(&downloads))?;
    let cached = downloads.join(src.file);
    let part = downloads.join(format!("{}.part", src.file));
    let urls: Vec<String> = match &opts.mirror {
        Some(m) => vec![format!("{}/{}", m.trim_end_matches('/'), src.file)],
        None => src.urls.iter().map(|u| u.to_string()).collect(),
    };
    if cached.is_file() {
        let d = digest_file(&cached)?;
        let desc = cached.display().to_string();
        match verify(&d, &desc, src.file, &src.checksum, src.size, &opts.verify)
            .and_then(|v| check_signature(&cached, &src.kind, &desc).map(|()| v))
        {
            Ok(v) => return Ok((cached.clone(), desc, d, v)),
            Err(e) => {
                tracing::warn!("cached download rejected, fetching again: {e}");
                std::fs::remove_file(&cached).map_err(FetchError::io(&cached))?;
            }
        }
    }
    let http = Http::new(opts.read_timeout);
    let mut errors = Vec::new();
    for url in &urls {
        let progress = Progress::new(&format!("{artifact} ({})", src.file), opts.quiet);
        let size = match &opts.verify {
            Verify::Official => src.size,
            _ => None,
        };
        if let Err(e) = http.download(url, &part, size, &progress) {
            errors.push(e.to_string());
            continue;
        }
        // The signature first: without a published checksum it is what tells an archive from
        // an error page.
        let checked = match check_signature(&part, &src.kind, url) {
            Ok(()) => {
                let d = digest_file(&part)?;
                verify(&d, url, src.file, &src.checksum, src.size, &opts.verify).map(|v| (d, v))
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok((d, v)) => {
                std::fs::rename(&part, &cached).map_err(FetchError::io(&cached))?;
                return Ok((cached, url.clone(), d, v));
            }
            Err(e) => {
                // Wrong bytes cannot be resumed: drop them.
                let _ = std::fs::remove_file(&part);
                if urls.len() == 1 {
                    return Err(e);
                }
                errors.push(e.to_string());
            }
        }
    }
    if urls.len() == 1 {
        if let Some(e) = errors.pop() {
            return Err(FetchError::AllSourcesFailed {
                artifact: artifact.name().into(),
                errors: vec![e],
            });
        }
    }
    Err(FetchError::AllSourcesFailed {
        artifact: artifact.name().into(),
        errors,
    })
}

/// Refuses a file that does not start as an archive of `kind` does.
fn check_signature(path: &Path, kind: &ArchiveKind, source_desc: &str) -> Result<()> {
    let (name, magic) = kind.signature();
    let mut head = Vec::with_capacity(16);
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(FetchError::io(path))?;
        f.take(16)
            .read_to_end(&mut head)
            .map_err(FetchError::io(path))?;
    }
    if head.starts_with(magic) {
        return Ok(());
    }
    Err(FetchError::NotAnArchive {
        source_desc: source_desc.into(),
        kind: name,
        head: if head.is_empty() {
            "nothing (an empty file)".into()
        } else {
            format!(
                "{} ({:?})",
                hex::encode(&head),
                String::from_utf8_lossy(&head)
            )
        },
    })
}

fn install_hub(src: &HubSource, opts: &FetchOptions, content: &Path) -> Result<InstallMarker> {
    let (path, d) = if let Some(dir) = &opts.from {
        let p = dir.join(src.file);
        if !p.is_file() {
            return Err(FetchError::NotInFolder {
                dir: dir.clone(),
                expected: vec![src.file.into()],
            });
        }
        let d = digest_file(&p)?;
        (p, d)
    } else {
        let hub = HubOptions {
            cache_dir: opts.data_dir.join("hf-cache"),
            endpoint: opts.hub_endpoint.clone().or_else(|| opts.mirror.clone()),
            offline: opts.hub_offline,
            progress: !opts.quiet,
        };
        hub_get(src.repo, src.file, &hub)?
    };
    let verified = match &opts.verify {
        Verify::Pinned(e) => {
            e.check(&d, &path.display().to_string(), src.file, false)?;
            format!("pinned {e}")
        }
        Verify::Skip => "unverified (--no-verify)".into(),
        Verify::Official => "sha256 matches the Hub's blob name".into(),
    };
    let out = content.join(src.file);
    std::fs::copy(&path, &out).map_err(FetchError::io(&out))?;
    Ok(InstallMarker {
        artifact: String::new(),
        source: format!("hf://{}/{}", src.repo, src.file),
        verified,
        md5: d.md5,
        sha256: d.sha256,
        size: d.size,
        files: vec![],
    })
}

fn list_files(root: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(FetchError::io(dir))? {
            let e = e.map_err(FetchError::io(dir))?;
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else {
                let len = e.metadata().map_err(FetchError::io(&p))?.len();
                out.push((
                    p.strip_prefix(root)
                        .expect("walk stays under root")
                        .to_string_lossy()
                        .into_owned(),
                    len,
                ));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes `bytes` to `path` atomically ([`kd_models::write_atomic`]), as a fetch error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    kd_models::write_atomic(path, bytes).map_err(|e| match e {
        kd_models::ModelError::Io { path, source } => FetchError::Io { path, source },
        other => FetchError::Model(other),
    })
}

/// Moves `new` to `dest`; an existing `dest` is moved aside first and deleted only afterwards.
fn swap_into_place(new: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".old-{}-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(dest, &old).map_err(FetchError::io(dest))?;
        if let Err(e) = std::fs::rename(new, dest) {
            let _ = std::fs::rename(&old, dest);
            return Err(FetchError::Io {
                path: dest.into(),
                source: e,
            });
        }
        std::fs::remove_dir_all(&old).map_err(FetchError::io(&old))?;
    } else {
        std::fs::rename(new, dest).map_err(FetchError::io(dest))?;
    }
    Ok(())
}
