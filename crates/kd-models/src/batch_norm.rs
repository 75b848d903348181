//! BatchNorm2d that trains like PyTorch's: batch statistics in training mode, running mean and
//! *unbiased* running variance updated with momentum 0.1; running statistics in eval mode.
//! The running statistics never enter the autograd graph.
//!
//! Training mode runs kd-kernels' fused BatchNorm (on CUDA two kernels forward, two backward,
//! the ReLU after it folded in; on the CPU the op's reference implementation) for f32 and bf16;
//! otherwise (f64, or `KD_DISABLE=bn`) it is composed from candle ops.
use candle_core::{DType, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use kd_kernels::MemoryFormat;

/// Batch normalisation over (N, H, W) per channel.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
    /// The layout of its input and output ([`BatchNorm2d::set_memory_format`]).
    format: MemoryFormat,
}

/// Builds a BatchNorm2d over `channels` from `vb` (`weight`, `bias`, `running_mean`, `running_var`).
pub fn batch_norm2d(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    let ones = candle_nn::Init::Const(1.0);
    let zeros = candle_nn::Init::Const(0.0);
    Ok(BatchNorm2d {
        weight: vb.get_with_hints(channels, "weight", ones)?,
        bias: vb.get_with_hints(channels, "bias", zeros)?,
        running_mean: vb.get_with_hints(channels, "running_mean", zeros)?,
        running_var: vb.get_with_hints(channels, "running_var", ones)?,
        eps: 1e-5,
        momentum: 0.1,
        format: MemoryFormat::ChannelsFirst,
    })
}

impl BatchNorm2d {
    /// Takes and gives (N, H, W, C) tensors with [`MemoryFormat::ChannelsLast`] (kd-kernels'
    /// channels-last ops), (N, C, H, W) with the default [`MemoryFormat::ChannelsFirst`].
    pub fn set_memory_format(&mut self, format: MemoryFormat) {
        self.format = format;
    }

    /// The layout it takes and gives.
    pub fn memory_format(&self) -> MemoryFormat {
        self.format
    }

    fn affine(&self, xhat: &Tensor) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        xhat.broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }

    /// Normalises `x` ((N, C, H, W), or (N, H, W, C) channels-last). In training mode also
    /// updates the running statistics, which requires them to be variables (a frozen, loaded
    /// model refuses to train).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, false)
    }

    /// `relu(self.forward_t(x, train))`, fused into the normalisation where a kernel exists.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, true)
    }

    /// Whether training mode takes kd-kernels' fused op for `x`: on CUDA, and on the CPU too
    /// (its reference implementation there, one pass per statistic and one backward op instead
    /// of candle's composed graph, cut a CPU ResNet18 step's backward by a third:
    /// docs/performance.md, "On the CPU"), unless `KD_DISABLE=bn`.
    fn fused_for(x: &Tensor) -> bool {
        let here = (kd_kernels::HAS_CUDA_KERNELS && x.device().is_cuda())
            || (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16));
        here && kd_kernels::enabled(kd_kernels::Kernel::BatchNorm)
    }

    fn forward_impl(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train && Self::fused_for(x) {
            return self.forward_train_fused(x, relu);
        }
        if !train {
            return self.forward_eval(x, relu);
        }
        // The composed path has no channels-last form of its own.
        let y = self
            .format
            .via_nchw(x, |x| self.forward_train_composed(x))?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// `relu(self.forward_t(x, false) + residual)`, a residual block's tail in eval mode:
    /// kd-kernels' one-pass op where nothing needs a gradient (its docs say where).
    pub fn forward_eval_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let f = match self.format {
            MemoryFormat::ChannelsFirst => kd_kernels::batch_norm_eval_add_relu,
            MemoryFormat::ChannelsLast => kd_kernels::batch_norm_eval_add_relu_nhwc,
        };
        f(
            x,
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            self.eps,
            residual,
        )
    }

    /// `relu(self.forward_t(x, true) + residual)`, a residual block's tail in training mode:
    /// kd-kernels' one op where the fused BatchNorm runs (its docs say how; `KD_DISABLE=traintail`
    /// splits it in two), else the composed BatchNorm and the add + ReLU.
    pub fn forward_train_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !Self::fused_for(x) {
            return kd_kernels::add_relu(&self.forward_t(x, true)?, residual);
        }
        let f = match self.format {
            MemoryFormat::ChannelsFirst => kd_kernels::batch_norm_train_add_relu,
            MemoryFormat::ChannelsLast => kd_kernels::batch_norm_train_add_relu_nhwc,
        };
        let out = f(
            x,
            &self.weight,
            &self.bias,
            residual,
            self.eps,
            Some(self.running()?),
        )?;
        Ok(out.y)
    }

    /// The running statistics, for kd-kernels' ops to update in place (the variables' own
    /// storage; on CUDA the statistics' last launch writes them).
    fn running(&self) -> Result<kd_kernels::RunningStats<'_>> {
        self.check_trainable()?;
        Ok(kd_kernels::RunningStats {
            mean: &self.running_mean,
            var: &self.running_var,
            momentum: self.momentum,
        })
    }

    /// Eval mode, with the running statistics: kd-kernels' one-pass op (its docs say where it
    /// runs which way).
    fn forward_eval(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let f = match self.format {
            MemoryFormat::ChannelsFirst => kd_kernels::batch_norm_eval,
            MemoryFormat::ChannelsLast => kd_kernels::batch_norm_eval_nhwc,
        };
        f(
            x,
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            self.eps,
            relu,
        )
    }

    /// Training mode through kd-kernels' fused op (on the CPU it runs the op's reference
    /// implementation, which the tests compare with the composed path).
    pub fn forward_train_fused(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (w, b, running) = (&self.weight, &self.bias, self.running()?);
        let out = match self.format {
            MemoryFormat::ChannelsFirst => {
                kd_kernels::batch_norm_train_update(x, w, b, self.eps, relu, running)?
            }
            MemoryFormat::ChannelsLast => {
                kd_kernels::batch_norm_train_nhwc(x, w, b, self.eps, relu, Some(running))?
            }
        };
        Ok(out.y)
    }

    /// Training mode composed from candle ops (f32 statistics) on an (N, C, H, W) `x`, whatever
    /// the layout set: the path for other dtypes and with `KD_DISABLE=bn` (between permutes
    /// for channels-last), and what the tests check the fused op against.
    pub fn forward_train_composed(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let (n, _, h, w) = x.dims4()?;
        let count = n * h * w;
        if count < 2 {
            candle_core::bail!("BatchNorm2d in training mode needs more than one value per channel, got input {:?}", x.dims());
        }
        // Statistics in f32 even for reduced-precision activations.
        let xf = x.to_dtype(DType::F32)?;
        let flat = xf.transpose(0, 1)?.reshape((c, count))?;
        let mean = flat.mean(D::Minus1)?;
        let centred = flat.broadcast_sub(&mean.unsqueeze(1)?)?;
        let var = centred.sqr()?.mean(D::Minus1)?;
        self.update_running(&mean.detach(), &var.detach(), count)?;
        let xhat = xf
            .broadcast_sub(&mean.reshape((1, c, 1, 1))?)?
            .broadcast_div(&(var + self.eps)?.sqrt()?.reshape((1, c, 1, 1))?)?;
        self.affine(&xhat)?.to_dtype(x.dtype())
    }

    /// Training mode updates the running statistics, so they must be variables.
    fn check_trainable(&self) -> Result<()> {
        if !self.running_mean.is_variable() || !self.running_var.is_variable() {
            candle_core::bail!("BatchNorm2d: running statistics are constants (a frozen model); it cannot run in training mode");
        }
        Ok(())
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        self.check_trainable()?;
        let m = self.momentum;
        let unbiased = (var * (count as f64 / (count as f64 - 1.0)))?;
        let rm = ((self.running_mean.detach() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.detach() * (1.0 - m))? + (unbiased * m)?)?;
        Var::from_tensor(&self.running_mean)?.set(&rm.to_dtype(self.running_mean.dtype())?)?;
        Var::from_tensor(&self.running_var)?.set(&rv.to_dtype(self.running_var.dtype())?)?;
        Ok(())
    }

    /// The learnable scale (γ) and shift (β).
    pub fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }
}
