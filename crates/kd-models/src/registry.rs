//! The models kd knows, as enums usable from clap and serde.
use serde::{Deserialize, Serialize};

/// A ResNet depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// BasicBlock ×[2, 2, 2, 2].
    Resnet18,
    /// BasicBlock ×[3, 4, 6, 3].
    Resnet34,
    /// Bottleneck ×[3, 4, 6, 3].
    Resnet50,
}

/// The residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// Two 3×3 convolutions (expansion 1).
    Basic,
    /// 1×1 → 3×3 → 1×1 (expansion 4), stride on the 3×3 as torchvision does.
    Bottleneck,
}

impl Arch {
    /// Every architecture.
    pub const ALL: [Arch; 3] = [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50];

    /// Block type and blocks per stage.
    pub fn blocks(self) -> (BlockKind, [usize; 4]) {
        match self {
            Arch::Resnet18 => (BlockKind::Basic, [2, 2, 2, 2]),
            Arch::Resnet34 => (BlockKind::Basic, [3, 4, 6, 3]),
            Arch::Resnet50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
        }
    }

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
        }
    }
}

/// The stem in front of the four stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stem {
    /// 3×3 stride-1 conv, BN, ReLU (the usual CIFAR ResNet; stages at 32/16/8/4 px).
    Cifar,
    /// The same followed by a 3×3 stride-2 max-pool with padding 1 (huyvnphan; 16/8/4/2 px).
    CifarMaxpool,
}

impl Stem {
    /// Every stem.
    pub const ALL: [Stem; 2] = [Stem::Cifar, Stem::CifarMaxpool];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Stem::Cifar => "cifar",
            Stem::CifarMaxpool => "cifar-maxpool",
        }
    }
}

/// Everything that determines a ResNet's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Depth.
    pub arch: Arch,
    /// Stem.
    pub stem: Stem,
    /// Output classes.
    pub num_classes: usize,
    /// Channels of the first stage's blocks (64 in the standard nets; small values for tests).
    #[serde(default = "default_width")]
    pub base_width: usize,
    /// Auxiliary classifier heads after stages 1–3 (self-distillation), off by default.
    #[serde(default)]
    pub aux_heads: bool,
    /// Copies of the last stage and classifier, side by side on the third stage's output (the
    /// multi-branch network of ONE, CL-ILR and OKDDip): 1, the plain network, by default. The
    /// network's own `layer4` and `fc` are the first branch; the others, named
    /// `branch{i}.layer4.*` and `branch{i}.fc.*`, train only.
    #[serde(default = "one_branch")]
    pub branches: usize,
    /// With branches: divide the gradient that reaches the trunk (the last stage's input) by
    /// their number, so that the trunk learns at the rate of one branch (intermediate-level
    /// representation sharing with backprop rescaling, ILR: Song & Chai 2018). The forward pass
    /// is unchanged. Off by default.
    #[serde(default)]
    pub rescale_trunk_grad: bool,
    /// With branches: ONE's gate (Lan et al. 2018), which weighs the branches' logits image by
    /// image into the gated ensemble ([`crate::ModelOutput::gated`]); named `gate.fc.*` and
    /// `gate.bn.*`, training-only. Off by default.
    #[serde(default)]
    pub gate: bool,
    /// Zero-initialise the last BN of every block (Goyal et al. 2017).
    #[serde(default)]
    pub zero_init_residual: bool,
}

fn default_width() -> usize {
    64
}

fn one_branch() -> usize {
    1
}

impl ResNetConfig {
    /// A standard-width network with no auxiliary heads.
    pub fn new(arch: Arch, stem: Stem, num_classes: usize) -> Self {
        ResNetConfig {
            arch,
            stem,
            num_classes,
            base_width: 64,
            aux_heads: false,
            branches: 1,
            rescale_trunk_grad: false,
            gate: false,
            zero_init_residual: false,
        }
    }
}
