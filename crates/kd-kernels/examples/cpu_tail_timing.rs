//! Times, on the CPU, a residual block's tail in training mode (last BatchNorm, shortcut add,
//! ReLU), forward and backward, as one op (`batch_norm_train_add_relu`) and as the two it
//! replaces (`batch_norm_train`, then `add_relu`), at ResNet18's block-end shapes:
//! `cargo run --release -p kd-kernels --example cpu_tail_timing`. Batch 32 unless a batch size
//! is given as the argument; each figure is the fastest of five runs after an untimed one.
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
    println!("| x | two ops: forward | one op: forward | two ops: fwd + bwd | one op: fwd + bwd |");
    println!("|---|---|---|---|---|");
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
        let with_backward = |f: &dyn Fn() -> Result<Tensor>| (f()? * &dy)?.sum_all()?.backward();
        let ms = |t: Duration| format!("{:.2} ms", t.as_secs_f64() * 1e3);
        println!(
            "| {:?} | {} | {} | {} | {} |",
            x.dims(),
            ms(timed(split)?),
            ms(timed(fused)?),
            ms(timed(|| with_backward(&split))?),
            ms(timed(|| with_backward(&fused))?),
        );
    }
    Ok(())
}
