//! Archive extraction that refuses entries leaving the target folder (absolute paths, `..`,
//! links), reporting the offending name instead of writing anything outside.
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{FetchError, Result};

/// Turns an archive entry name into a relative path that stays inside the target.
pub fn safe_relative(archive: &Path, name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(FetchError::UnsafePath {
                    archive: archive.into(),
                    entry: name.into(),
                })
            }
        }
    }
    Ok(out)
}

fn archive_err(path: &Path, e: impl std::fmt::Display) -> FetchError {
    FetchError::Archive {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Extracts a `.tar.gz` into `dest` (which must exist). Only files and folders are allowed.
pub fn extract_tar_gz(archive: &Path, dest: &Path) -> Result<u64> {
    let f = std::fs::File::open(archive).map_err(FetchError::io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let mut files = 0;
    for entry in tar.entries().map_err(|e| archive_err(archive, e))? {
        let mut entry = entry.map_err(|e| archive_err(archive, e))?;
        let name = entry
            .path()
            .map_err(|e| archive_err(archive, e))?
            .to_string_lossy()
            .into_owned();
        let rel = safe_relative(archive, &name)?;
        let kind = entry.header().entry_type();
        let target = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(FetchError::io(&target))?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(FetchError::io(parent))?;
            }
            let mut out = std::fs::File::create(&target).map_err(FetchError::io(&target))?;
            std::io::copy(&mut entry, &mut out)
                .map_err(|e| archive_err(archive, format!("{name}: {e}")))?;
            files += 1;
        } else if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
        {
            continue;
        } else {
            return Err(FetchError::UnsafePath {
                archive: archive.into(),
                entry: format!("{name} (a {kind:?} entry)"),
            });
        }
    }
    if files == 0 {
        return Err(archive_err(archive, "holds no files"));
    }
    Ok(files)
}

/// Extracts the one entry of a zip whose name ends with `suffix` into the file `dest`.
/// Every entry name is checked first, so a zip with an escaping path is refused as a whole.
pub fn extract_zip_member(archive: &Path, suffix: &str, dest: &Path) -> Result<String> {
    let f = std::fs::File::open(archive).map_err(FetchError::io(archive))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| archive_err(archive, e))?;
    let mut found = None;
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| archive_err(archive, e))?;
        let name = entry.name().to_string();
        safe_relative(archive, &name)?;
        if entry.enclosed_name().is_none() {
            return Err(FetchError::UnsafePath {
                archive: archive.into(),
                entry: name,
            });
        }
        if name == suffix || name.ends_with(&format!("/{suffix}")) {
            found = Some(i);
        }
    }
    let i = found.ok_or_else(|| archive_err(archive, format!("no entry named {suffix}")))?;
    let mut entry = zip.by_index(i).map_err(|e| archive_err(archive, e))?;
    let name = entry.name().to_string();
    let mut out = std::fs::File::create(dest).map_err(FetchError::io(dest))?;
    let mut buf = Vec::new();
    entry
        .read_to_end(&mut buf)
        .map_err(|e| archive_err(archive, format!("{name}: {e}")))?;
    std::io::Write::write_all(&mut out, &buf).map_err(FetchError::io(dest))?;
    out.sync_all().map_err(FetchError::io(dest))?;
    Ok(name)
}
