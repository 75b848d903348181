//! Image-folder data sets: `root/<split>/<class>/*.png|jpg`, class index = position of the
//! folder name in sorted order (torchvision's `ImageFolder` convention), so people can bring
//! their own data and the JPEG copy of CIFAR-10 loads directly.
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{DataError, Dataset, Result, Split};

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                what: "split folder",
                path: dir.into(),
                expected: "a folder with one sub-folder per class".into(),
            }
        } else {
            DataError::Io {
                path: dir.into(),
                source: e,
            }
        }
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(DataError::io(dir))?;
        // Hidden files (.DS_Store, editor droppings) are not data.
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

fn class_dirs(split_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dirs: Vec<(String, PathBuf)> = sorted_entries(split_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| {
            (
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                p,
            )
        })
        .collect();
    if dirs.is_empty() {
        return Err(DataError::Missing {
            what: "class folders",
            path: split_dir.into(),
            expected: "one sub-folder per class".into(),
        });
    }
    Ok(dirs)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes one image into C×H×W `u8` planes, checking its size.
fn decode(path: &Path, height: usize, width: usize) -> Result<Vec<u8>> {
    let img = image::open(path).map_err(|e| DataError::BadImage {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if img.width() as usize != width || img.height() as usize != height {
        return Err(DataError::WrongImageSize {
            path: path.into(),
            width: img.width(),
            height: img.height(),
            expected_w: width as u32,
            expected_h: height as u32,
        });
    }
    let rgb = img.to_rgb8();
    let plane = height * width;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in rgb.pixels().enumerate() {
        out[i] = px[0];
        out[plane + i] = px[1];
        out[2 * plane + i] = px[2];
    }
    Ok(out)
}

fn load_split(classes: &[(String, PathBuf)], height: usize, width: usize) -> Result<Split> {
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    for (label, (_, dir)) in classes.iter().enumerate() {
        let mut n = 0;
        for p in sorted_entries(dir)? {
            if p.is_dir() {
                continue;
            }
            if !is_image(&p) {
                return Err(DataError::BadImage {
                    path: p,
                    reason: "not an image file (expected extension .png, .jpg or .jpeg)".into(),
                });
            }
            files.push((p, label as u32));
            n += 1;
        }
        if n == 0 {
            return Err(DataError::EmptyClass { path: dir.clone() });
        }
    }
    let decoded: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(p, _)| decode(p, height, width))
        .collect::<Result<_>>()?;
    let mut split = Split::empty(3, height, width);
    split.images = decoded.concat();
    split.labels = files.iter().map(|(_, l)| *l).collect();
    Ok(split)
}

/// Loads `root/train/<class>/*` and `root/test/<class>/*`; every image must be `height`×`width`.
pub fn load_image_folder(root: &Path, height: usize, width: usize) -> Result<Dataset> {
    let train_dir = root.join("train");
    let test_dir = root.join("test");
    let classes = class_dirs(&train_dir)?;
    let test_classes = class_dirs(&test_dir)?;
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let test_names: Vec<String> = test_classes.iter().map(|(n, _)| n.clone()).collect();
    if names != test_names {
        return Err(DataError::ClassMismatch {
            path: test_dir,
            found: test_names,
            expected: names,
        });
    }
    let train = load_split(&classes, height, width)?;
    let test = load_split(&test_classes, height, width)?;
    let name = root
        .file_name()
        .map_or_else(|| "folder".into(), |n| n.to_string_lossy().into_owned());
    Ok(Dataset {
        name,
        classes: names,
        coarse_classes: None,
        train,
        test,
    })
}
