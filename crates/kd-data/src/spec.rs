//! Naming a data set on the command line or in a config: `cifar10`, `cifar100` or `folder:PATH`.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::augment::Normalize;
use crate::{load_cifar10, load_cifar100, load_image_folder, DataError, Dataset, Result};

/// A data set kd knows how to load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DatasetSpec {
    /// CIFAR-10 under `<data-dir>/cifar10`.
    Cifar10,
    /// CIFAR-100 under `<data-dir>/cifar100`.
    Cifar100,
    /// An image folder `PATH/{train,test}/<class>/*` of 32×32 images.
    Folder(PathBuf),
}

impl DatasetSpec {
    /// Where the data set lives under `data_dir` (the folder itself for `folder:`).
    pub fn path(&self, data_dir: &Path) -> PathBuf {
        match self {
            DatasetSpec::Cifar10 => data_dir.join("cifar10"),
            DatasetSpec::Cifar100 => data_dir.join("cifar100"),
            DatasetSpec::Folder(p) => p.clone(),
        }
    }

    /// Loads it from `data_dir`.
    pub fn load(&self, data_dir: &Path) -> Result<Dataset> {
        let p = self.path(data_dir);
        match self {
            DatasetSpec::Cifar10 => load_cifar10(&p),
            DatasetSpec::Cifar100 => load_cifar100(&p),
            DatasetSpec::Folder(_) => load_image_folder(&p, 32, 32),
        }
    }

    /// The usual normalisation for it (per-dataset constants; folders use CIFAR-10's).
    pub fn default_normalize(&self) -> Normalize {
        match self {
            DatasetSpec::Cifar100 => Normalize::CIFAR100,
            _ => Normalize::CIFAR10,
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Cifar10 => f.write_str("cifar10"),
            DatasetSpec::Cifar100 => f.write_str("cifar100"),
            DatasetSpec::Folder(p) => write!(f, "folder:{}", p.display()),
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cifar10" => Ok(DatasetSpec::Cifar10),
            "cifar100" => Ok(DatasetSpec::Cifar100),
            _ => match s.strip_prefix("folder:") {
                Some(p) if !p.is_empty() => Ok(DatasetSpec::Folder(PathBuf::from(p))),
                _ => Err(DataError::Invalid {
                    field: "dataset",
                    message: format!("{s:?}; expected cifar10, cifar100 or folder:PATH"),
                }),
            },
        }
    }
}

impl TryFrom<String> for DatasetSpec {
    type Error = DataError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DatasetSpec> for String {
    fn from(d: DatasetSpec) -> String {
        d.to_string()
    }
}
