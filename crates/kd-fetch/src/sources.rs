//! What kd can fetch and from where: the official CIFAR archives (pinned md5 and size), the
//! huyvnphan CIFAR-10 teacher zip (several sources, tried in order) and the CIFAR-100 teacher
//! on the Hugging Face Hub.
use std::fmt;
use std::str::FromStr;

use crate::checksum::Expected;
use crate::FetchError;

/// A thing `fetch` installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Artifact {
    /// CIFAR-10, official binary layout.
    Cifar10,
    /// CIFAR-100, official binary layout.
    Cifar100,
    /// The huyvnphan ResNet50 (max-pool stem) trained on CIFAR-10.
    TeacherCifar10,
    /// `edadaltocg/resnet50_cifar100` from the Hub.
    TeacherCifar100,
}

impl Artifact {
    /// Every artifact, in install order.
    pub const ALL: [Artifact; 4] = [
        Artifact::Cifar10,
        Artifact::Cifar100,
        Artifact::TeacherCifar10,
        Artifact::TeacherCifar100,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Artifact::Cifar10 => "cifar10",
            Artifact::Cifar100 => "cifar100",
            Artifact::TeacherCifar10 => "teacher-cifar10",
            Artifact::TeacherCifar100 => "teacher-cifar100",
        }
    }

    /// Folder under the data root where it is installed.
    pub fn install_dir(self) -> &'static str {
        match self {
            Artifact::Cifar10 => "cifar10",
            Artifact::Cifar100 => "cifar100",
            Artifact::TeacherCifar10 => "teachers/cifar10-resnet50",
            Artifact::TeacherCifar100 => "teachers/cifar100-resnet50",
        }
    }

    /// Where its bytes come from.
    pub fn source(self) -> Source {
        match self {
            Artifact::Cifar10 => Source::Archive(ArchiveSource {
                file: "cifar-10-binary.tar.gz",
                urls: &["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"],
                checksum: Some(Expected::Md5("c32a1d4ab5d03f1284b67883e8d87530".into())),
                size: Some(170_052_171),
                kind: ArchiveKind::TarGz,
            }),
            Artifact::Cifar100 => Source::Archive(ArchiveSource {
                file: "cifar-100-binary.tar.gz",
                urls: &["https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"],
                checksum: Some(Expected::Md5("03b5dce01913d631647c71ecec9e9cb8".into())),
                size: Some(168_513_733),
                kind: ArchiveKind::TarGz,
            }),
            // No checksum of this zip is published; the first install records its sha256 in the
            // install marker and `--sha256` pins it from then on.
            Artifact::TeacherCifar10 => Source::Archive(ArchiveSource {
                file: "state_dicts.zip",
                urls: &[
                    "https://rutgers.box.com/shared/static/gkw08ecs797j2et1ksmbg1w5t3idf5r5.zip",
                    "https://drive.usercontent.google.com/download?id=17fmN8eQdLpq2jIMQ_X0IXDPXfI9oVWgq&export=download&confirm=t",
                ],
                checksum: None,
                size: None,
                kind: ArchiveKind::ZipMember { member: "state_dicts/resnet50.pt", out: "resnet50.pt" },
            }),
            Artifact::TeacherCifar100 => {
                Source::Hub(HubSource { repo: "edadaltocg/resnet50_cifar100", file: "model.safetensors" })
            }
        }
    }
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Artifact {
    type Err = FetchError;
    fn from_str(s: &str) -> Result<Self, FetchError> {
        Artifact::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| FetchError::Invalid {
                field: "artifact",
                message: format!(
                    "{s:?}; expected one of {}",
                    Artifact::ALL.map(|a| a.name()).join(", ")
                ),
            })
    }
}

/// Where an artifact comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A plain download of one archive.
    Archive(ArchiveSource),
    /// A file on the Hugging Face Hub.
    Hub(HubSource),
}

/// An archive with its mirrors in order of preference.
#[derive(Clone, Debug)]
pub struct ArchiveSource {
    /// File name (also the name under `--from DIR` and `--mirror URL/`).
    pub file: &'static str,
    /// URLs tried in order.
    pub urls: &'static [&'static str],
    /// Pinned checksum of the official file, when one is published.
    pub checksum: Option<Expected>,
    /// Official size in bytes, when known.
    pub size: Option<u64>,
    /// How to unpack it.
    pub kind: ArchiveKind,
}

/// How an archive is unpacked.
#[derive(Clone, Copy, Debug)]
pub enum ArchiveKind {
    /// A gzip'd tar extracted whole.
    TarGz,
    /// One member of a zip.
    ZipMember {
        /// Entry name (matched as a suffix, so a top folder is allowed).
        member: &'static str,
        /// File name it is installed as.
        out: &'static str,
    },
}

impl ArchiveKind {
    /// The format's name and the bytes every file of it starts with.
    pub fn signature(&self) -> (&'static str, &'static [u8]) {
        match self {
            ArchiveKind::TarGz => ("gzip", &[0x1f, 0x8b]),
            ArchiveKind::ZipMember { .. } => ("zip", b"PK\x03\x04"),
        }
    }
}

/// A Hub file.
#[derive(Clone, Debug)]
pub struct HubSource {
    /// Repository id.
    pub repo: &'static str,
    /// File in the repository.
    pub file: &'static str,
}
