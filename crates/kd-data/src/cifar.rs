//! Readers for the official CIFAR binary layouts (Krizhevsky 2009):
//! `cifar-10-batches-bin` (1 label byte + 3072 pixel bytes per record) and
//! `cifar-100-binary` (coarse byte + fine byte + 3072 pixel bytes).
use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, Result, Split};

/// Pixel bytes of one 32×32 RGB record: 1024 red, 1024 green, 1024 blue, each row-major.
pub const PIXELS: usize = 3 * 32 * 32;
/// CIFAR-10 record size.
pub const CIFAR10_RECORD: usize = 1 + PIXELS;
/// CIFAR-100 record size.
pub const CIFAR100_RECORD: usize = 2 + PIXELS;
/// CIFAR-10 class names, index = label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// Folder name inside the official CIFAR-10 archive.
pub const CIFAR10_DIR: &str = "cifar-10-batches-bin";
/// Folder name inside the official CIFAR-100 archive.
pub const CIFAR100_DIR: &str = "cifar-100-binary";
/// CIFAR-10 training files.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// CIFAR-10 test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// Accepts either the folder that holds the `.bin` files or its parent.
fn resolve(dir: &Path, sub: &str) -> PathBuf {
    let inner = dir.join(sub);
    if inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

fn read_records(path: &Path, record: usize, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                what: "CIFAR batch file",
                path: path.into(),
                expected: what.into(),
            }
        } else {
            DataError::Io {
                path: path.into(),
                source: e,
            }
        }
    })?;
    if meta.len() == 0 || meta.len() % record as u64 != 0 {
        return Err(DataError::BadFileSize {
            path: path.into(),
            actual: meta.len(),
            record,
            expected: what.into(),
        });
    }
    std::fs::read(path).map_err(DataError::io(path))
}

/// Splits raw records into a [`Split`], checking every label byte.
fn parse(
    path: &Path,
    raw: &[u8],
    label_bytes: usize,
    fine_classes: usize,
    coarse_classes: usize,
    split: &mut Split,
) -> Result<()> {
    let record = label_bytes + PIXELS;
    for (r, rec) in raw.chunks_exact(record).enumerate() {
        let fine = rec[label_bytes - 1] as u32;
        if fine as usize >= fine_classes {
            let kind = if label_bytes == 2 { "fine" } else { "class" };
            return Err(DataError::LabelOutOfRange {
                path: path.into(),
                record: r,
                kind,
                label: fine,
                num_classes: fine_classes,
            });
        }
        if label_bytes == 2 {
            let coarse = rec[0] as u32;
            if coarse as usize >= coarse_classes {
                return Err(DataError::LabelOutOfRange {
                    path: path.into(),
                    record: r,
                    kind: "coarse",
                    label: coarse,
                    num_classes: coarse_classes,
                });
            }
            split
                .coarse_labels
                .get_or_insert_with(Vec::new)
                .push(coarse);
        }
        split.labels.push(fine);
        split.images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok(())
}

fn read_names(path: &Path, expected: usize) -> Result<Option<Vec<String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DataError::Io {
                path: path.into(),
                source: e,
            })
        }
    };
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != expected {
        return Err(DataError::Invalid {
            field: "class names",
            message: format!(
                "{} lists {} names, expected {expected}",
                path.display(),
                names.len()
            ),
        });
    }
    Ok(Some(names))
}

/// Loads CIFAR-10 from `dir` (the `cifar-10-batches-bin` folder or its parent).
pub fn load_cifar10(dir: &Path) -> Result<Dataset> {
    let dir = resolve(dir, CIFAR10_DIR);
    let what = "CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (10,000 records = 30,730,000 bytes)";
    let mut train = Split::empty(3, 32, 32);
    for f in CIFAR10_TRAIN_FILES {
        let p = dir.join(f);
        let raw = read_records(&p, CIFAR10_RECORD, what)?;
        parse(&p, &raw, 1, 10, 0, &mut train)?;
    }
    let mut test = Split::empty(3, 32, 32);
    let p = dir.join(CIFAR10_TEST_FILE);
    let raw = read_records(&p, CIFAR10_RECORD, what)?;
    parse(&p, &raw, 1, 10, 0, &mut test)?;
    let classes = read_names(&dir.join("batches.meta.txt"), 10)?
        .unwrap_or_else(|| CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect());
    Ok(Dataset {
        name: "cifar10".into(),
        classes,
        coarse_classes: None,
        train,
        test,
    })
}

/// Loads CIFAR-100 from `dir` (the `cifar-100-binary` folder or its parent), fine and coarse labels.
pub fn load_cifar100(dir: &Path) -> Result<Dataset> {
    let dir = resolve(dir, CIFAR100_DIR);
    let what = "CIFAR-100 binary file: records of 1 coarse byte + 1 fine byte + 3072 pixel bytes";
    let mut splits = Vec::new();
    for f in ["train.bin", "test.bin"] {
        let p = dir.join(f);
        let raw = read_records(&p, CIFAR100_RECORD, what)?;
        let mut s = Split::empty(3, 32, 32);
        parse(&p, &raw, 2, 100, 20, &mut s)?;
        splits.push(s);
    }
    let test = splits.pop().expect("two splits");
    let train = splits.pop().expect("two splits");
    let classes = read_names(&dir.join("fine_label_names.txt"), 100)?
        .unwrap_or_else(|| (0..100).map(|i| format!("class_{i}")).collect());
    let coarse = read_names(&dir.join("coarse_label_names.txt"), 20)?
        .unwrap_or_else(|| (0..20).map(|i| format!("superclass_{i}")).collect());
    Ok(Dataset {
        name: "cifar100".into(),
        classes,
        coarse_classes: Some(coarse),
        train,
        test,
    })
}

/// Serialises a split in the CIFAR-10 record layout (used to write fixtures and mirrors).
pub fn encode_cifar10(split: &Split) -> Vec<u8> {
    let mut out = Vec::with_capacity(split.len() * CIFAR10_RECORD);
    for i in 0..split.len() {
        out.push(split.labels[i] as u8);
        out.extend_from_slice(split.image(i));
    }
    out
}

/// Serialises a split in the CIFAR-100 record layout; coarse labels default to 0.
pub fn encode_cifar100(split: &Split) -> Vec<u8> {
    let mut out = Vec::with_capacity(split.len() * CIFAR100_RECORD);
    for i in 0..split.len() {
        out.push(split.coarse_labels.as_ref().map_or(0, |c| c[i]) as u8);
        out.push(split.labels[i] as u8);
        out.extend_from_slice(split.image(i));
    }
    out
}
