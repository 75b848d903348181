//! Times, on the CPU, a residual block's tail in training mode (last BatchNorm, shortcut add,
//! ReLU), forward and backward, as one op (`batch_norm_train_add_relu`) and as the two it
//! replaces (`batch_norm_train`, then `add_relu`), at ResNet18's block-end shapes. Batch 32
//! unless a batch size is given as the argument; each figure is the fastest of five runs after
//! an untimed one. Run it with glibc keeping freed memory, as `kd-runner` does (otherwise every
//! run of a large shape maps and zeroes its tensors anew, and that dominates the figures):
//!
//! ```text
//! GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1 \
//!     cargo run --release -p kd-kernels --example cpu_tail_timing
//! ```
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};
use kd_kernels::{add_relu, batch_norm_train, batch_norm_train_add_relu};

/// The fastest of five runs, after an untimed one.
fn timed<T>(f: impl Fn() -> Result<T>) -> Result<Duration> {
    f()?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| candle_core::Error::Msg(format!("batch {a:?}: {e}")))?,
        None => 32,
    };
    let d = Device::Cpu;
    println!(
        "| x | two ops: forward | one op: forward | two ops: fwd + bwd | one op: fwd + bwd | \
         the loss alone |"
    );
    println!("|---|---|---|---|---|---|");
    for (c, hw) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., (n, c, hw, hw), &d)?)?;
        let r = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, hw, hw), &d)?)?;
        let dy = Tensor::randn(0f32, 1., (n, c, hw, hw), &d)?;
        let (g, b) = (
            Var::from_tensor(&Tensor::ones(c, DType::F32, &d)?)?,
            Var::from_tensor(&Tensor::zeros(c, DType::F32, &d)?)?,
        );
        let split = || add_relu(&batch_norm_train(&x, &g, &b, 1e-5, false)?.y, &r);
        let fused = || Ok(batch_norm_train_add_relu(&x, &g, &b, &r, 1e-5, None)?.y);
        // The loss Σ y·dy as a (1, M) × (M, 1) product, so that the gradient reaching the tail
        // is a contiguous dy as in training (through `sum_all` it would arrive as a broadcast
        // view, whose strided product with dy costs more than the tail itself).
        let dy_col = dy.reshape((dy.elem_count(), 1))?;
        let with_backward = |f: &dyn Fn() -> Result<Tensor>| {
            let y = f()?;
            y.reshape((1, y.elem_count()))?.matmul(&dy_col)?.backward()
        };
        let ms = |t: Duration| format!("{:.2} ms", t.as_secs_f64() * 1e3);
        // What both fwd + bwd columns include besides the tail: the loss and its backward.
        let alone = || Ok(x.as_tensor().clone());
        println!(
            "| {:?} | {} | {} | {} | {} | {} |",
            x.dims(),
            ms(timed(split)?),
            ms(timed(fused)?),
            ms(timed(|| with_backward(&split))?),
            ms(timed(|| with_backward(&fused))?),
            ms(timed(|| with_backward(&alone))?),
        );
    }
    Ok(())
}
