//! Times an evaluation forward (`forward_t(x, false)`) of a trainable ResNet18 on the CPU, batch
//! 128, at the widths the CPU runs use: `cargo run --release -p kd-models --example eval_timing`
//! (add `KD_DISABLE=conv` to compare with candle's convolution throughout).
use std::time::Instant;

use candle_core::{Device, Tensor};
use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for (stem, width) in [(Stem::CifarMaxpool, 16), (Stem::Cifar, 64)] {
        let cfg = ResNetConfig {
            base_width: width,
            ..ResNetConfig::new(Arch::Resnet18, stem, 10)
        };
        let (model, _vars) = trainable_resnet(&cfg, &Device::Cpu, 0)?;
        let x = Tensor::randn(0f32, 1., (128, 3, 32, 32), &Device::Cpu)?;
        model.forward_t(&x, false)?; // warms the allocator
        let runs = 3;
        let t = Instant::now();
        for _ in 0..runs {
            model.forward_t(&x, false)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / runs as f64;
        println!("ResNet18 {stem:?} width {width}: {ms:.1} ms per eval batch of 128");
    }
    Ok(())
}
