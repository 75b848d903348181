//! ResNet (He et al. 2016) for 32×32 inputs, torchvision layout and parameter names, returning
//! the stem's and every stage's features so feature and relation distillation need no hooks.
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use kd_kernels::{to_channels_last, Conv2dGeometry, MemoryFormat};

use crate::batch_norm::{batch_norm2d, BatchNorm2d};
use crate::max_pool::MaxPool2d;
use crate::registry::{BlockKind, ResNetConfig, Stem};

/// Channels and total stride of one feature map in [`ModelOutput::feats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    /// Channels.
    pub channels: usize,
    /// Input size divided by this map's size.
    pub reduction: usize,
}

/// An auxiliary head's output (self-distillation), or an extra branch's (ONE, CL-ILR, OKDDip).
#[derive(Clone, Debug)]
pub struct AuxOutput {
    /// Logits of the head.
    pub logits: Tensor,
    /// The head's pooled feature, same width as the backbone's `pooled`.
    pub pooled: Tensor,
}

/// Everything a forward pass yields.
#[derive(Clone, Debug)]
pub struct ModelOutput {
    /// Class logits `(N, classes)`.
    pub logits: Tensor,
    /// Stem output, then the output of each of the four stages, in f32; empty when the forward
    /// was not asked for them ([`ResNet::set_keep_features`], [`ForwardParts`]): under bf16
    /// their f32 copies are five casts and, for a ResNet50 teacher at batch 256, about 0.6 GB
    /// that the logit-only methods never read.
    pub feats: Vec<Tensor>,
    /// Globally average-pooled last stage `(N, C)`, the input of `fc`.
    pub pooled: Tensor,
    /// Each stage's output before its last ReLU (stages 1–4), in the network's compute dtype,
    /// when the forward was asked for them ([`ResNet::set_keep_preact`]); empty otherwise. The
    /// margin-aware feature distillers (OFD, AB) compare these. One extra element-wise add and
    /// tensor per stage (the block's output comes from the fused add + ReLU), which the other
    /// methods, the teacher of plain KD and evaluation do not pay.
    pub preact: Vec<Tensor>,
    /// Auxiliary heads after stages 1–3, when the model has them.
    pub aux: Vec<AuxOutput>,
    /// The extra branches ([`ResNetConfig::branches`]), when the model has them: the first
    /// branch is the network's own `logits` and `pooled`.
    pub branches: Vec<AuxOutput>,
    /// With a gate ([`ResNetConfig::gate`]): the gated ensemble of all branches' logits (ONE's
    /// teacher; at test time its ONE-E).
    pub gated: Option<Tensor>,
}

impl AuxOutput {
    /// A copy cut from the graph.
    pub fn detach(&self) -> AuxOutput {
        AuxOutput {
            logits: self.logits.detach(),
            pooled: self.pooled.detach(),
        }
    }
}

impl ModelOutput {
    /// A copy of every output cut from the graph: what another network may learn from without
    /// its gradient reaching this one (a frozen teacher's, a peer's).
    pub fn detach(&self) -> ModelOutput {
        ModelOutput {
            logits: self.logits.detach(),
            feats: self.feats.iter().map(Tensor::detach).collect(),
            pooled: self.pooled.detach(),
            preact: self.preact.iter().map(Tensor::detach).collect(),
            aux: self.aux.iter().map(AuxOutput::detach).collect(),
            branches: self.branches.iter().map(AuxOutput::detach).collect(),
            gated: self.gated.as_ref().map(Tensor::detach),
        }
    }
}

/// Which optional outputs a forward pass returns ([`ResNet::forward_parts`]); the logits, the
/// pooled embedding and the auxiliary heads' and extra branches' outputs always come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardParts {
    /// The stem's and stages' features ([`ModelOutput::feats`]).
    pub features: bool,
    /// The stages' pre-ReLU outputs ([`ModelOutput::preact`]).
    pub preact: bool,
}

impl ForwardParts {
    /// The logits alone (with the pooled embedding and any auxiliary heads or extra branches):
    /// what evaluation reads.
    pub const LOGITS: ForwardParts = ForwardParts {
        features: false,
        preact: false,
    };
}

/// Multiply-accumulates of one image's forward pass ([`ResNet::macs`]), counted as fvcore and
/// PyTorch's `FlopCounterMode` count them (one per weight per output position of each
/// convolution and linear layer; BatchNorm, which folds into the convolution for inference,
/// ReLU, pooling and the residual adds are not counted). The cost a researcher compares
/// beside the parameters: a forward pass of the deployed network costs `backbone`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Macs {
    /// Stem, stages and classifier: the deployed network.
    pub backbone: u64,
    /// The auxiliary heads (self-distillation; training only).
    pub aux_heads: u64,
    /// The extra branches and ONE's gate (ONE, CL-ILR, OKDDip; training only).
    pub branches: u64,
}

/// A bias-free convolution with "same" padding. Runs through kd-kernels (cuDNN forward and
/// backward on CUDA, candle's conv on the CPU); the f32 master weight is cast to the input's
/// dtype, so bf16 activations train f32 weights. Channels-last, the (K, C, R, S) weight is
/// permuted to (K, R, S, C) in the same pass (its gradient flows back through the permute), so
/// checkpoints keep PyTorch's layout.
#[derive(Clone, Debug)]
struct Conv2d {
    weight: Tensor,
    geometry: Conv2dGeometry,
    format: MemoryFormat,
    /// A constant weight (a frozen network's) cast once to the compute dtype (and permuted for
    /// channels-last): the cast of a weight that never changes would otherwise be a launch and a
    /// pass over it per forward (53 for a ResNet50 teacher's step). `None` for a variable, whose
    /// value changes each step.
    cast: Option<Tensor>,
}

impl Conv2d {
    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.cast {
            Some(w) if w.dtype() == x.dtype() => w.clone(),
            _ => self.weight_as(x.dtype())?,
        };
        match self.format {
            MemoryFormat::ChannelsFirst => kd_kernels::conv2d(x, &w, self.geometry),
            MemoryFormat::ChannelsLast => kd_kernels::conv2d_nhwc(x, &w, self.geometry),
        }
    }

    /// The weight in `dtype` and the layout's order ((K, R, S, C) channels-last, contiguous).
    fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        match self.format {
            MemoryFormat::ChannelsFirst => self.weight.to_dtype(dtype),
            MemoryFormat::ChannelsLast => to_channels_last(&self.weight)?
                .to_dtype(dtype)?
                .contiguous(),
        }
    }

    /// Multiply-accumulates of this convolution on one (h, w) input plane set, and the size
    /// of its output.
    fn macs(&self, (h, w): (usize, usize)) -> (u64, (usize, usize)) {
        let (k, c, r, s) = match self.weight.dims() {
            &[k, c, r, s] => (k, c, r, s),
            other => unreachable!("a convolution's weight is (K, C, R, S), not {other:?}"),
        };
        let Conv2dGeometry { stride, padding } = self.geometry;
        // Saturating: a plane smaller than the kernel (no valid network input) counts one
        // position rather than wrapping around.
        let out = (
            (h + 2 * padding).saturating_sub(r) / stride + 1,
            (w + 2 * padding).saturating_sub(s) / stride + 1,
        );
        ((k * c * r * s * out.0 * out.1) as u64, out)
    }

    /// Keeps the weight cast to `dtype` (and permuted for channels-last) when it is a constant
    /// and either changes it.
    fn cache_cast(&mut self, dtype: DType) -> Result<()> {
        let changed = self.weight.dtype() != dtype || self.format == MemoryFormat::ChannelsLast;
        let constant = !self.weight.is_variable() && changed;
        self.cast = constant.then(|| self.weight_as(dtype)).transpose()?;
        Ok(())
    }
}

fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    // The same variable and initialisation hint as candle_nn::conv2d_no_bias.
    let weight = vb.get_with_hints(
        (c_out, c_in, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Conv2d {
        weight,
        geometry: Conv2dGeometry {
            stride,
            padding: k / 2,
        },
        format: MemoryFormat::ChannelsFirst,
        cast: None,
    })
}

#[derive(Clone, Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    fn params<'a>(ds: &'a Option<Self>, out: &mut Vec<&'a Tensor>) {
        if let Some(d) = ds {
            out.push(d.conv.weight());
            out.extend(d.bn.params());
        }
    }

    fn new(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder) -> Result<Option<Self>> {
        if stride == 1 && c_in == c_out {
            return Ok(None);
        }
        Ok(Some(Downsample {
            conv: conv(c_in, c_out, 1, stride, vb.pp("0"))?,
            bn: batch_norm2d(c_out, vb.pp("1"))?,
        }))
    }

    fn forward_t(ds: &Option<Self>, x: &Tensor, train: bool) -> Result<Tensor> {
        match ds {
            Some(d) => d.bn.forward_t(&d.conv.forward(x)?, train),
            None => Ok(x.clone()),
        }
    }
}

/// Two 3×3 convolutions with a residual connection.
#[derive(Clone, Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<Downsample>,
}

impl BasicBlock {
    fn params<'a>(&'a self, out: &mut Vec<&'a Tensor>) {
        out.extend([self.conv1.weight(), self.conv2.weight()]);
        out.extend(self.bn1.params());
        out.extend(self.bn2.params());
        Downsample::params(&self.downsample, out);
    }

    fn new(c_in: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BasicBlock {
            conv1: conv(c_in, planes, 3, stride, vb.pp("conv1"))?,
            bn1: batch_norm2d(planes, vb.pp("bn1"))?,
            conv2: conv(planes, planes, 3, 1, vb.pp("conv2"))?,
            bn2: batch_norm2d(planes, vb.pp("bn2"))?,
            downsample: Downsample::new(c_in, planes, stride, vb.pp("downsample"))?,
        })
    }

    /// The residual branch up to its last BatchNorm (`bn2`'s input), and the shortcut.
    fn forward_before_tail(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.conv2.forward(&y)?;
        Ok((y, Downsample::forward_t(&self.downsample, x, train)?))
    }
}

/// 1×1 → 3×3 (strided) → 1×1 with expansion 4.
#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    downsample: Option<Downsample>,
}

impl Bottleneck {
    fn params<'a>(&'a self, out: &mut Vec<&'a Tensor>) {
        out.extend([
            self.conv1.weight(),
            self.conv2.weight(),
            self.conv3.weight(),
        ]);
        for bn in [&self.bn1, &self.bn2, &self.bn3] {
            out.extend(bn.params());
        }
        Downsample::params(&self.downsample, out);
    }

    fn new(c_in: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = planes * 4;
        Ok(Bottleneck {
            conv1: conv(c_in, planes, 1, 1, vb.pp("conv1"))?,
            bn1: batch_norm2d(planes, vb.pp("bn1"))?,
            conv2: conv(planes, planes, 3, stride, vb.pp("conv2"))?,
            bn2: batch_norm2d(planes, vb.pp("bn2"))?,
            conv3: conv(planes, out, 1, 1, vb.pp("conv3"))?,
            bn3: batch_norm2d(out, vb.pp("bn3"))?,
            downsample: Downsample::new(c_in, out, stride, vb.pp("downsample"))?,
        })
    }

    /// The residual branch up to its last BatchNorm (`bn3`'s input), and the shortcut.
    fn forward_before_tail(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward_relu_t(&self.conv2.forward(&y)?, train)?;
        let y = self.conv3.forward(&y)?;
        Ok((y, Downsample::forward_t(&self.downsample, x, train)?))
    }
}

#[derive(Clone, Debug)]
enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn params<'a>(&'a self, out: &mut Vec<&'a Tensor>) {
        match self {
            Block::Basic(b) => b.params(out),
            Block::Bottleneck(b) => b.params(out),
        }
    }

    /// The residual branch up to its last BatchNorm, and the shortcut.
    fn forward_before_tail(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        match self {
            Block::Basic(b) => b.forward_before_tail(x, train),
            Block::Bottleneck(b) => b.forward_before_tail(x, train),
        }
    }

    /// The residual branch and the shortcut (the block's output is the ReLU of their sum).
    fn forward_parts_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (y, shortcut) = self.forward_before_tail(x, train)?;
        Ok((self.last_bn().forward_t(&y, train)?, shortcut))
    }

    /// The block's output in training mode, its tail (last BatchNorm, residual add, ReLU) as
    /// one op where the fused BatchNorm runs.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (y, shortcut) = self.forward_before_tail(x, true)?;
        self.last_bn().forward_train_add_relu(&y, &shortcut)
    }

    /// The block's output in eval mode, its tail (last BatchNorm, residual add, ReLU) through
    /// kd-kernels' one-pass op where nothing needs a gradient.
    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let (y, shortcut) = self.forward_before_tail(x, false)?;
        self.last_bn().forward_eval_add_relu(&y, &shortcut)
    }

    /// Multiply-accumulates of the block's convolutions on an (h, w) input (the residual
    /// branch in order, then the shortcut), and the size of its output.
    fn macs(&self, hw: (usize, usize)) -> (u64, (usize, usize)) {
        let (branch, downsample): (Vec<&Conv2d>, _) = match self {
            Block::Basic(b) => (vec![&b.conv1, &b.conv2], &b.downsample),
            Block::Bottleneck(b) => (vec![&b.conv1, &b.conv2, &b.conv3], &b.downsample),
        };
        let (mut total, mut out) = (0, hw);
        for conv in branch {
            let (m, next) = conv.macs(out);
            total += m;
            out = next;
        }
        let shortcut = downsample.as_ref().map_or(0, |d| d.conv.macs(hw).0);
        (total + shortcut, out)
    }

    /// Every convolution of the block, the shortcut's included.
    fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let (mut convs, downsample) = match self {
            Block::Basic(b) => (vec![&mut b.conv1, &mut b.conv2], &mut b.downsample),
            Block::Bottleneck(b) => (
                vec![&mut b.conv1, &mut b.conv2, &mut b.conv3],
                &mut b.downsample,
            ),
        };
        convs.extend(downsample.as_mut().map(|d| &mut d.conv));
        convs
    }

    /// Every BatchNorm of the block, the shortcut's included.
    fn bns_mut(&mut self) -> Vec<&mut BatchNorm2d> {
        let (mut bns, downsample) = match self {
            Block::Basic(b) => (vec![&mut b.bn1, &mut b.bn2], &mut b.downsample),
            Block::Bottleneck(b) => (vec![&mut b.bn1, &mut b.bn2, &mut b.bn3], &mut b.downsample),
        };
        bns.extend(downsample.as_mut().map(|d| &mut d.bn));
        bns
    }

    /// The BatchNorm whose output, plus the shortcut, is the block's pre-ReLU output.
    fn last_bn(&self) -> &BatchNorm2d {
        match self {
            Block::Basic(b) => &b.bn2,
            Block::Bottleneck(b) => &b.bn3,
        }
    }
}

/// An auxiliary classifier (Be Your Own Teacher): 1×1 conv to the last stage's width, BN, ReLU,
/// global average pool, linear. Named `aux_heads.{i}.*`, never colliding with backbone keys.
#[derive(Clone, Debug)]
struct AuxHead {
    conv: Conv2d,
    bn: BatchNorm2d,
    fc: Linear,
}

impl AuxHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<AuxOutput> {
        let y = self.bn.forward_relu_t(&self.conv.forward(x)?, train)?;
        let pooled = global_average(&y, self.bn.memory_format())?;
        Ok(AuxOutput {
            logits: self.fc.forward(&pooled)?,
            pooled,
        })
    }
}

/// A copy of the last stage and the classifier (the branches of ONE, CL-ILR and OKDDip), fed
/// the input of the last stage. Named `branch{i}.layer4.*` and `branch{i}.fc.*`, never
/// colliding with backbone keys.
#[derive(Clone, Debug)]
struct Branch {
    blocks: Vec<Block>,
    fc: Linear,
}

/// ONE's gate (Lan, Zhu & Gong 2018): the trunk's pooled output through a linear layer to one
/// score per branch, a BatchNorm (PyTorch's `BatchNorm1d`: batch statistics in training,
/// running ones in eval), a ReLU and a softmax over the branches; those weights mix the
/// branches' logits, image by image. Named `gate.fc.*` and `gate.bn.*`.
#[derive(Clone, Debug)]
pub struct BranchGate {
    fc: Linear,
    bn: BatchNorm2d,
}

impl BranchGate {
    /// A gate from `channels` (the trunk's) to `branches` weights, its variables under `vb`.
    pub fn new(channels: usize, branches: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BranchGate {
            fc: candle_nn::linear(channels, branches, vb.pp("fc"))?,
            bn: batch_norm2d(branches, vb.pp("bn"))?,
        })
    }

    /// The (B, m) branch weights of the trunk's (B, C) pooled output, each row summing to 1;
    /// `train` selects batch statistics (and updates the running ones).
    pub fn weights(&self, pooled_trunk: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.fc.forward(pooled_trunk)?;
        let (b, m) = z.dims2()?;
        // BatchNorm1d over (B, m) is BatchNorm2d over (B, m, 1, 1): the same statistics.
        let y = self
            .bn
            .forward_relu_t(&z.reshape((b, m, 1, 1))?, train)?
            .reshape((b, m))?;
        candle_nn::ops::softmax(&y, D::Minus1)
    }

    /// The gated ensemble Σᵢ gᵢ·zᵢ of `logits` (each (B, K), one per branch, the network's own
    /// first) under [`BranchGate::weights`].
    pub fn forward_t(
        &self,
        pooled_trunk: &Tensor,
        logits: &[&Tensor],
        train: bool,
    ) -> Result<Tensor> {
        let g = self.weights(pooled_trunk, train)?;
        // (B, 1, m) · (B, m, K).
        g.unsqueeze(1)?
            .matmul(&Tensor::stack(logits, 1)?)?
            .squeeze(1)
    }

    fn params(&self) -> Vec<&Tensor> {
        let mut out = vec![self.fc.weight()];
        out.extend(self.fc.bias());
        out.extend(self.bn.params());
        out
    }
}

/// The blocks of one stage: `n` blocks of `kind` from `c_in` channels, the first with
/// `stride`, named `{vb}.{b}.*`; and the stage's output channels.
fn stage_blocks(
    kind: BlockKind,
    c_in: usize,
    planes: usize,
    n: usize,
    stride: usize,
    vb: &VarBuilder,
) -> Result<(Vec<Block>, usize)> {
    let expansion = if kind == BlockKind::Bottleneck { 4 } else { 1 };
    let mut c_in = c_in;
    let mut blocks = Vec::with_capacity(n);
    for b in 0..n {
        let st = if b == 0 { stride } else { 1 };
        let vbb = vb.pp(b.to_string());
        blocks.push(match kind {
            BlockKind::Basic => Block::Basic(BasicBlock::new(c_in, planes, st, vbb)?),
            BlockKind::Bottleneck => Block::Bottleneck(Bottleneck::new(c_in, planes, st, vbb)?),
        });
        c_in = planes * expansion;
    }
    Ok((blocks, c_in))
}

/// A stage's blocks run in order, each in training or eval form.
fn run_blocks(blocks: &[Block], x: &Tensor, train: bool) -> Result<Tensor> {
    let mut y = x.clone();
    for block in blocks {
        y = match train {
            true => block.forward_train(&y)?,
            false => block.forward_eval(&y)?,
        };
    }
    Ok(y)
}

/// `x` forward, its gradient times `scale` backward: `x̄ + (x − x̄)·scale` with `x̄` cut from
/// the graph, whose value is `x`'s bits (`x − x` is exactly 0).
pub fn scale_gradient(x: &Tensor, scale: f64) -> Result<Tensor> {
    let constant = x.detach();
    &constant + ((x - &constant)? * scale)?
}

/// The (N, C) f32 mean over the spatial axes of a 4-D tensor of `format`.
fn global_average(y: &Tensor, format: MemoryFormat) -> Result<Tensor> {
    let pooled = match format {
        MemoryFormat::ChannelsFirst => y.mean(D::Minus1)?.mean(D::Minus1)?,
        MemoryFormat::ChannelsLast => y.mean(2)?.mean(1)?,
    };
    pooled.to_dtype(DType::F32)
}

/// A CIFAR ResNet.
#[derive(Clone, Debug)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    maxpool: Option<MaxPool2d>,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    aux: Vec<AuxHead>,
    branches: Vec<Branch>,
    gate: Option<BranchGate>,
    info: Vec<FeatureInfo>,
    compute_dtype: DType,
    format: MemoryFormat,
    keep_preact: bool,
    keep_features: bool,
}

impl ResNet {
    /// Builds the network from `vb` (a `VarMap` for training, loaded tensors for a teacher).
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let (kind, depths) = cfg.arch.blocks();
        let w = cfg.base_width;
        if cfg.gate && cfg.branches < 2 {
            candle_core::bail!(
                "ResNet: a gate weighs branches, so it needs branches ≥ 2, got {}",
                cfg.branches
            );
        }
        if w == 0 || cfg.num_classes == 0 || cfg.branches == 0 {
            candle_core::bail!(
                "ResNet needs base_width > 0, num_classes > 0 and branches > 0, got {}, {} and {}",
                w,
                cfg.num_classes,
                cfg.branches
            );
        }
        let conv1 = conv(3, w, 3, 1, vb.pp("conv1"))?;
        let bn1 = batch_norm2d(w, vb.pp("bn1"))?;
        let maxpool = (cfg.stem == Stem::CifarMaxpool).then_some(MaxPool2d::RESNET_STEM);
        let mut reduction = if maxpool.is_some() { 2 } else { 1 };
        let mut info = vec![FeatureInfo {
            channels: w,
            reduction,
        }];
        let mut c_in = w;
        let mut stages = Vec::new();
        for (s, &n) in depths.iter().enumerate() {
            let planes = w << s;
            let stride = if s == 0 { 1 } else { 2 };
            reduction *= stride;
            let vbs = vb.pp(format!("layer{}", s + 1));
            let (blocks, c_out) = stage_blocks(kind, c_in, planes, n, stride, &vbs)?;
            c_in = c_out;
            stages.push(blocks);
            info.push(FeatureInfo {
                channels: c_in,
                reduction,
            });
        }
        let fc = candle_nn::linear(c_in, cfg.num_classes, vb.pp("fc"))?;
        let mut aux = Vec::new();
        if cfg.aux_heads {
            for i in 0..3 {
                let vba = vb.pp("aux_heads").pp(i.to_string());
                aux.push(AuxHead {
                    conv: conv(info[i + 1].channels, c_in, 1, 1, vba.pp("conv"))?,
                    bn: batch_norm2d(c_in, vba.pp("bn"))?,
                    fc: candle_nn::linear(c_in, cfg.num_classes, vba.pp("fc"))?,
                });
            }
        }
        // The extra branches repeat the last stage on the trunk's output.
        let last = depths.len() - 1;
        let mut branches = Vec::with_capacity(cfg.branches - 1);
        for i in 1..cfg.branches {
            let vbb = vb.pp(format!("branch{i}"));
            let (blocks, c_out) = stage_blocks(
                kind,
                info[last].channels,
                w << last,
                depths[last],
                2,
                &vbb.pp(format!("layer{}", last + 1)),
            )?;
            branches.push(Branch {
                blocks,
                fc: candle_nn::linear(c_out, cfg.num_classes, vbb.pp("fc"))?,
            });
        }
        let gate = cfg
            .gate
            .then(|| BranchGate::new(info[last].channels, cfg.branches, vb.pp("gate")))
            .transpose()?;
        Ok(ResNet {
            cfg: cfg.clone(),
            conv1,
            bn1,
            maxpool,
            stages,
            fc,
            aux,
            branches,
            gate,
            info,
            compute_dtype: DType::F32,
            format: MemoryFormat::ChannelsFirst,
            keep_preact: false,
            keep_features: true,
        })
    }

    /// Runs convolutions, BatchNorm outputs and activations in `dtype` (f32, or bf16 for mixed
    /// precision); weights stay f32 and are cast per op (a frozen network's constant weights
    /// once, here), BN statistics stay f32, and every tensor in [`ModelOutput`] is f32. The
    /// input may have any float dtype.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            candle_core::bail!("ResNet computes in f32 or bf16, not {dtype:?}");
        }
        self.compute_dtype = dtype;
        for conv in self.convs_mut() {
            conv.cache_cast(dtype)?;
        }
        Ok(())
    }

    /// Holds its activations channels-last, (N, H, W, C), with
    /// [`MemoryFormat::ChannelsLast`]: the layout cuDNN's tensor-core convolutions read natively
    /// (kd-kernels' `memory_format`). The input and every tensor in [`ModelOutput`] stay
    /// (N, C, H, W) (the features as permuted views), and the weights and checkpoints keep
    /// PyTorch's layout, so nothing outside the network changes. Off (channels-first) by
    /// default.
    pub fn set_memory_format(&mut self, format: MemoryFormat) -> Result<()> {
        self.format = format;
        let dtype = self.compute_dtype;
        for conv in self.convs_mut() {
            conv.format = format;
            conv.cache_cast(dtype)?;
        }
        let mut bns = vec![&mut self.bn1];
        let branch_blocks = self.branches.iter_mut().flat_map(|b| b.blocks.iter_mut());
        for block in self.stages.iter_mut().flatten().chain(branch_blocks) {
            bns.extend(block.bns_mut());
        }
        bns.extend(self.aux.iter_mut().map(|h| &mut h.bn));
        for bn in bns {
            bn.set_memory_format(format);
        }
        Ok(())
    }

    /// The layout of its activations ([`ResNet::set_memory_format`]).
    pub fn memory_format(&self) -> MemoryFormat {
        self.format
    }

    /// Every convolution: stem, blocks (shortcuts included), auxiliary heads, extra branches.
    fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut convs = vec![&mut self.conv1];
        let branch_blocks = self.branches.iter_mut().flat_map(|b| b.blocks.iter_mut());
        for block in self.stages.iter_mut().flatten().chain(branch_blocks) {
            convs.extend(block.convs_mut());
        }
        convs.extend(self.aux.iter_mut().map(|h| &mut h.conv));
        convs
    }

    /// The dtype activations have inside the network.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Channels and reduction of each entry of [`ModelOutput::feats`] (stem, stages 1–4).
    pub fn feature_info(&self) -> &[FeatureInfo] {
        &self.info
    }

    /// The classifier (`fc`), pooled embedding (N, C) → logits (N, classes): SRRL passes the
    /// student's mapped features through a teacher's.
    pub fn head(&self) -> &Linear {
        &self.fc
    }

    /// The learnable tensors of the backbone (stem, stages, fc) — what a deployed model holds
    /// besides BN running statistics.
    pub fn backbone_params(&self) -> Vec<&Tensor> {
        let mut out = vec![self.conv1.weight()];
        out.extend(self.bn1.params());
        for b in self.stages.iter().flatten() {
            b.params(&mut out);
        }
        out.push(self.fc.weight());
        out.extend(self.fc.bias());
        out
    }

    /// The scale γ and shift β of the BatchNorm before each stage's last ReLU (stages 1–4): the
    /// distribution OFD's margins are computed from.
    pub fn preact_bn_params(&self) -> Vec<(Tensor, Tensor)> {
        self.stages
            .iter()
            .filter_map(|s| s.last())
            .map(|b| {
                let [w, bias] = b.last_bn().params();
                (w.clone(), bias.clone())
            })
            .collect()
    }

    /// How many auxiliary heads the network has (0 or 3).
    pub fn num_aux_heads(&self) -> usize {
        self.aux.len()
    }

    /// The learnable tensors of the auxiliary heads (training-only).
    pub fn aux_params(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for h in &self.aux {
            out.push(h.conv.weight());
            out.extend(h.bn.params());
            out.push(h.fc.weight());
            out.extend(h.fc.bias());
        }
        out
    }

    /// How many branches the network has ([`ResNetConfig::branches`]; 1, itself, by default).
    pub fn num_branches(&self) -> usize {
        self.branches.len() + 1
    }

    /// The learnable tensors of the extra branches and their gate (training-only).
    pub fn branch_params(&self) -> Vec<&Tensor> {
        let mut out = self.gate.as_ref().map_or(Vec::new(), BranchGate::params);
        for b in &self.branches {
            for block in &b.blocks {
                block.params(&mut out);
            }
            out.push(b.fc.weight());
            out.extend(b.fc.bias());
        }
        out
    }

    /// Learnable parameters including auxiliary heads and extra branches (what trains).
    pub fn num_params(&self) -> usize {
        self.backbone_params()
            .iter()
            .chain(self.aux_params().iter())
            .chain(self.branch_params().iter())
            .map(|t| t.elem_count())
            .sum()
    }

    /// Learnable parameters of the backbone alone (what is deployed).
    pub fn num_backbone_params(&self) -> usize {
        self.backbone_params().iter().map(|t| t.elem_count()).sum()
    }

    /// Multiply-accumulates of one (height × width) image's forward pass, walked from the
    /// layers' own weights and strides.
    pub fn macs(&self, height: usize, width: usize) -> Macs {
        let linear = |fc: &Linear| fc.weight().elem_count() as u64;
        let (mut backbone, mut hw) = self.conv1.macs((height, width));
        if let Some(p) = &self.maxpool {
            hw = (p.out_size(hw.0), p.out_size(hw.1));
        }
        // The size of each stage's output, which the auxiliary head after it reads.
        let mut stage_out = Vec::with_capacity(self.stages.len());
        // The size of the last stage's input, which the extra branches read too.
        let mut trunk_hw = hw;
        for stage in &self.stages {
            trunk_hw = hw;
            for block in stage {
                let (m, out) = block.macs(hw);
                backbone += m;
                hw = out;
            }
            stage_out.push(hw);
        }
        backbone += linear(&self.fc);
        let aux_heads = self
            .aux
            .iter()
            .zip(&stage_out)
            .map(|(h, &hw)| h.conv.macs(hw).0 + linear(&h.fc))
            .sum();
        let gate = self.gate.as_ref().map_or(0, |g| linear(&g.fc));
        let branches = gate
            + self
                .branches
                .iter()
                .map(|b| {
                    let mut hw = trunk_hw;
                    let mut total = linear(&b.fc);
                    for block in &b.blocks {
                        let (m, out) = block.macs(hw);
                        total += m;
                        hw = out;
                    }
                    total
                })
                .sum::<u64>();
        Macs {
            backbone,
            aux_heads,
            branches,
        }
    }

    /// The stem: conv, BN, ReLU and, for `cifar-maxpool`, the 3×3/s2/p1 max-pool; `x` and the
    /// result (N, C, H, W).
    pub fn forward_stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.format.nchw_view(&self.stem(x, train)?)
    }

    /// [`ResNet::forward_stem`], the result in the network's layout.
    fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Channels-last: the permute first, so that a cast to the compute dtype also lays the
        // images out (one pass where the cast and the convolution's copy were two).
        let x = match self.format {
            MemoryFormat::ChannelsFirst => x.to_dtype(self.compute_dtype)?,
            MemoryFormat::ChannelsLast => to_channels_last(x)?.to_dtype(self.compute_dtype)?,
        };
        let y = self.bn1.forward_relu_t(&self.conv1.forward(&x)?, train)?;
        let kernel_here = y.device().is_cpu()
            || (kd_kernels::HAS_CUDA_KERNELS
                && y.device().is_cuda()
                && kd_kernels::enabled(kd_kernels::Kernel::MaxPool));
        match (&self.maxpool, self.format) {
            (None, _) => Ok(y),
            // The custom op where it has a kernel, in either layout.
            (Some(p), MemoryFormat::ChannelsFirst) if kernel_here => p.forward(&y),
            (Some(p), MemoryFormat::ChannelsLast) if kernel_here => p.forward_nhwc(&y),
            // Elsewhere the composed form (valid after a ReLU), written for channels-first.
            (Some(p), format) => format.via_nchw(&y, |y| p.forward_nonneg_composed(y)),
        }
    }

    /// Whether [`ResNet::forward_t`] also returns each stage's pre-ReLU output
    /// ([`ModelOutput::preact`]); off by default.
    pub fn set_keep_preact(&mut self, keep: bool) {
        self.keep_preact = keep;
    }

    /// Whether [`ResNet::forward_t`] and [`ResNet::forward_with`] return the stage features
    /// ([`ModelOutput::feats`]); on by default. The distillers that never read them turn it off.
    pub fn set_keep_features(&mut self, keep: bool) {
        self.keep_features = keep;
    }

    /// Full forward pass; `train` selects batch statistics (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        self.forward_with(x, train, self.keep_preact)
    }

    /// [`ResNet::forward_t`], with the pre-ReLU stage outputs or not whatever the setting.
    pub fn forward_with(&self, x: &Tensor, train: bool, preact_too: bool) -> Result<ModelOutput> {
        let parts = ForwardParts {
            features: self.keep_features,
            preact: preact_too,
        };
        self.forward_parts(x, train, parts)
    }

    /// The forward pass with the optional outputs `parts`, whatever the settings.
    pub fn forward_parts(
        &self,
        x: &Tensor,
        train: bool,
        parts: ForwardParts,
    ) -> Result<ModelOutput> {
        let preact_too = parts.preact;
        let mut feats = Vec::with_capacity(5);
        let mut preact = Vec::with_capacity(4);
        let mut y = self.stem(x, train)?;
        feats.push(y.clone());
        // The last stage's input, which the extra branches read too.
        let mut trunk = None;
        for (s, stage) in self.stages.iter().enumerate() {
            if s + 1 == self.stages.len() && !self.branches.is_empty() {
                if self.cfg.rescale_trunk_grad {
                    y = scale_gradient(&y, 1.0 / self.num_branches() as f64)?;
                }
                trunk = Some(y.clone());
            }
            for (i, block) in stage.iter().enumerate() {
                let last = i + 1 == stage.len();
                // Without the pre-activation, the block's tail (BatchNorm, add, ReLU) in one op.
                if !(preact_too && last) {
                    y = match train {
                        true => block.forward_train(&y)?,
                        false => block.forward_eval(&y)?,
                    };
                    continue;
                }
                let (branch, shortcut) = block.forward_parts_t(&y, train)?;
                // The stage's last block also gives its pre-activation (for AB and OFD): the sum
                // again, a branch of the graph of its own that only those methods differentiate.
                if preact_too && last {
                    preact.push(self.format.nchw_view(&(&branch + &shortcut)?)?);
                }
                y = kd_kernels::add_relu(&branch, &shortcut)?;
            }
            feats.push(y.clone());
        }
        // The classifier, the pooled embedding and the features leave the network in f32: the
        // losses and the distillers' own layers are f32.
        let pooled = global_average(&y, self.format)?;
        let logits = self.fc.forward(&pooled)?;
        let aux = self
            .aux
            .iter()
            .enumerate()
            .map(|(i, h)| h.forward_t(&feats[i + 1], train))
            .collect::<Result<Vec<_>>>()?;
        let branches = match &trunk {
            None => Vec::new(),
            Some(trunk) => self
                .branches
                .iter()
                .map(|b| {
                    let pooled =
                        global_average(&run_blocks(&b.blocks, trunk, train)?, self.format)?;
                    Ok(AuxOutput {
                        logits: b.fc.forward(&pooled)?,
                        pooled,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let gated = match (&self.gate, &trunk) {
            (Some(gate), Some(trunk)) => {
                let logits: Vec<&Tensor> = std::iter::once(&logits)
                    .chain(branches.iter().map(|b| &b.logits))
                    .collect();
                Some(gate.forward_t(&global_average(trunk, self.format)?, &logits, train)?)
            }
            _ => None,
        };
        let feats = if parts.features {
            feats
                .iter()
                .map(|f| self.format.nchw_view(f)?.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(ModelOutput {
            logits,
            feats,
            pooled,
            preact,
            aux,
            branches,
            gated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_frozen, save_varmap, trainable_resnet, Arch};
    use candle_core::Device;

    #[test]
    fn only_a_frozen_network_keeps_its_weights_cast() {
        let cfg = ResNetConfig {
            base_width: 4,
            aux_heads: true,
            ..ResNetConfig::new(Arch::Resnet50, Stem::Cifar, 5)
        };
        let (mut trainable, vm) = trainable_resnet(&cfg, &Device::Cpu, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r50.safetensors");
        save_varmap(&vm, &path).unwrap();
        let mut frozen = load_frozen(&cfg, &path, &Device::Cpu).unwrap();
        // Stem 1, 16 blocks × 3, 4 shortcuts, 3 heads.
        assert_eq!(frozen.convs_mut().len(), 56);
        let kept = |m: &mut ResNet| -> Vec<Option<DType>> {
            m.convs_mut()
                .iter()
                .map(|c| c.cast.as_ref().map(Tensor::dtype))
                .collect()
        };
        for (dtype, frozen_casts) in [(DType::BF16, Some(DType::BF16)), (DType::F32, None)] {
            trainable.set_compute_dtype(dtype).unwrap();
            frozen.set_compute_dtype(dtype).unwrap();
            assert!(
                kept(&mut frozen).iter().all(|c| *c == frozen_casts),
                "{dtype:?}"
            );
            assert!(
                kept(&mut trainable).iter().all(Option::is_none),
                "{dtype:?}"
            );
        }
    }
}
