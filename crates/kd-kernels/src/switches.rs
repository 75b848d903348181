//! Run-time switches for kd's own paths, from the environment:
//! `KD_DISABLE=conv,bn,bnrunning,bneval,evaltail,traintail,taps,avx,pool,sgd,augment,addrelu,losses,mempool,events`
//! (or `all`) sends the named parts back to candle's own ops (or, for `taps`, to kd's other CPU
//! convolution; for `avx`, to the plain tiles of the CPU layout transposes;
//! for `mempool` and `events`, to the CUDA driver's and cudarc's allocation defaults), without a
//! rebuild. For bisecting a kernel on a GPU whose time is short, and for measuring what each part
//! buys.
use std::sync::OnceLock;

/// A part with a CUDA path of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// cuDNN convolution (forward and backward).
    Conv,
    /// Fused BatchNorm(+ReLU) in training mode.
    BatchNorm,
    /// The running statistics updated by the training-mode BatchNorm's statistics launch
    /// (otherwise by two launches of their own).
    BatchNormRunning,
    /// The max-pool kernels.
    MaxPool,
    /// The fused SGD update.
    Sgd,
    /// On-device augmentation of a resident data set.
    Augment,
    /// The residual blocks' fused add + ReLU.
    AddRelu,
    /// Softmax cross-entropy and Hinton's KD loss as one op each.
    SoftmaxLosses,
    /// BatchNorm(+ReLU) in eval mode as one pass (CPU).
    BatchNormEval,
    /// A residual block's tail in eval mode (BatchNorm, add, ReLU) as one pass (CPU).
    EvalTail,
    /// A residual block's tail in training mode (BatchNorm, add, ReLU) as one op.
    TrainTail,
    /// Stride-1 convolutions as one shifted product per kernel tap, without patch rows (CPU).
    ConvTaps,
    /// The CPU layout transposes as 8×8 blocks in AVX registers, where the CPU has AVX.
    AvxTranspose,
    /// The CUDA memory pool keeping freed memory across synchronisations
    /// ([`crate::device_memory`]).
    MemPool,
    /// cudarc's per-allocation stream events turned off ([`crate::device_memory`]).
    AllocationEvents,
}

impl Kernel {
    /// Every part.
    pub const ALL: [Kernel; 15] = [
        Kernel::Conv,
        Kernel::BatchNorm,
        Kernel::BatchNormRunning,
        Kernel::MaxPool,
        Kernel::Sgd,
        Kernel::Augment,
        Kernel::AddRelu,
        Kernel::SoftmaxLosses,
        Kernel::BatchNormEval,
        Kernel::EvalTail,
        Kernel::TrainTail,
        Kernel::ConvTaps,
        Kernel::AvxTranspose,
        Kernel::MemPool,
        Kernel::AllocationEvents,
    ];

    /// The name in `KD_DISABLE`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Conv => "conv",
            Kernel::BatchNorm => "bn",
            Kernel::BatchNormRunning => "bnrunning",
            Kernel::MaxPool => "pool",
            Kernel::Sgd => "sgd",
            Kernel::Augment => "augment",
            Kernel::AddRelu => "addrelu",
            Kernel::SoftmaxLosses => "losses",
            Kernel::BatchNormEval => "bneval",
            Kernel::EvalTail => "evaltail",
            Kernel::TrainTail => "traintail",
            Kernel::ConvTaps => "taps",
            Kernel::AvxTranspose => "avx",
            Kernel::MemPool => "mempool",
            Kernel::AllocationEvents => "events",
        }
    }
}

/// The parts disabled by `KD_DISABLE`, read once. Unknown names are reported on stderr, once.
fn disabled() -> &'static [Kernel] {
    static DISABLED: OnceLock<Vec<Kernel>> = OnceLock::new();
    DISABLED.get_or_init(|| parse(&std::env::var("KD_DISABLE").unwrap_or_default()))
}

fn parse(spec: &str) -> Vec<Kernel> {
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            return Kernel::ALL.to_vec();
        }
        match Kernel::ALL.iter().find(|k| k.name() == name) {
            Some(k) => out.push(*k),
            None => eprintln!(
                "warning: KD_DISABLE: unknown part {name:?} (expected {} or all); ignored",
                Kernel::ALL.map(Kernel::name).join(", ")
            ),
        }
    }
    out
}

/// Whether `kernel`'s own path may be used (it is unless `KD_DISABLE` names it).
pub fn enabled(kernel: Kernel) -> bool {
    !disabled().contains(&kernel)
}

/// The disabled parts, for logs (`none` when all are on).
pub fn describe_disabled() -> String {
    let d = disabled();
    if d.is_empty() {
        "none".into()
    } else {
        d.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_all() {
        assert_eq!(parse("conv, sgd"), vec![Kernel::Conv, Kernel::Sgd]);
        assert_eq!(parse("all"), Kernel::ALL.to_vec());
        assert_eq!(parse(""), vec![]);
        assert_eq!(parse("bogus,pool"), vec![Kernel::MaxPool]);
    }
}
