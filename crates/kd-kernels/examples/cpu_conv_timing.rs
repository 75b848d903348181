//! Times, on the CPU, a ResNet18 convolution's forward pass and the ways its gradients can be
//! computed: `cargo run --release -p kd-kernels --example cpu_conv_timing`. Batch 32; each
//! figure is the fastest of three runs after an untimed one that warms the allocator.
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};
use kd_kernels::conv::{
    backward_data_col2im, backward_data_cpu, backward_data_reference, backward_filter_cpu,
    backward_filter_reference, conv2d_cpu,
};
use kd_kernels::Conv2dGeometry;

/// The fastest of three runs, after an untimed one.
fn timed<T>(f: impl Fn() -> Result<T>) -> Result<Duration> {
    f()?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let d = Device::Cpu;
    println!(
        "| x | w | stride | forward: candle | forward: kd | dx: candle (transposed conv) | dx: col2im | dx: kd | \
         dw: candle | dw: kd |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, c, hw, o, k, s) in [
        (32, 3, 32, 64, 3, 1),
        (32, 64, 32, 64, 3, 1),
        (32, 64, 32, 128, 3, 2),
        (32, 64, 32, 128, 1, 2),
        (32, 128, 16, 128, 3, 1),
        (32, 256, 8, 256, 3, 1),
        (32, 512, 4, 512, 3, 1),
    ] {
        let g = Conv2dGeometry {
            stride: s,
            padding: k / 2,
        };
        let x = Tensor::randn(0f32, 1., (n, c, hw, hw), &d)?;
        let w = Tensor::randn(0f32, 1., (o, c, k, k), &d)?;
        let y = x.conv2d(&w, g.padding, g.stride, 1, 1)?;
        let (xd, wd) = ([n, c, hw, hw], [o, c, k, k]);
        let ms = |t: Duration| format!("{:.1} ms", t.as_secs_f64() * 1e3);
        println!(
            "| {:?} | {:?} | {s} | {} | {} | {} | {} | {} | {} | {} |",
            x.dims(),
            w.dims(),
            ms(timed(|| x.conv2d(&w, g.padding, g.stride, 1, 1))?),
            ms(timed(|| conv2d_cpu(&x, &w, g))?),
            ms(timed(|| backward_data_reference(&y, &w, g, xd))?),
            ms(timed(|| backward_data_col2im(&y, &w, g, xd))?),
            ms(timed(|| backward_data_cpu(&y, &w, g, xd))?),
            ms(timed(|| backward_filter_reference(&x, &y, g, wd))?),
            ms(timed(|| backward_filter_cpu(&x, &y, g, wd))?),
        );
    }
    Ok(())
}
