//! A resident data set (pixels on the device, augmented by kd-kernels' op) yields the batches
//! the host path yields: same order, crops, flips, mixing, pairs and labels. Run on the CPU,
//! where the op runs its reference implementation; the device script repeats it on CUDA.
use std::sync::Arc;

use candle_core::{DType, Device};
use kd_data::{Loader, LoaderConfig, Mix, Normalize, Pairing, Split};
use kd_testkit::max_abs_diff;

fn split(n: usize, classes: u32) -> Arc<Split> {
    let mut s = Split::empty(3, 32, 32);
    // Varied, non-zero pixels: a wrong crop, flip or padding shows.
    s.images = (0..n * 3072)
        .map(|i| ((i * 7919) % 251 + 1) as u8)
        .collect();
    s.labels = (0..n).map(|i| i as u32 % classes).collect();
    Arc::new(s)
}

fn same_batches(cfg: LoaderConfig) {
    let data = split(70, 5);
    let host = Loader::new(data.clone(), cfg.clone(), Device::Cpu).unwrap();
    let resident = Loader::new(
        data,
        LoaderConfig {
            resident: true,
            ..cfg.clone()
        },
        Device::Cpu,
    )
    .unwrap();
    for epoch in [0, 3] {
        let (a, b): (Vec<_>, Vec<_>) = (
            host.epoch(epoch, 0).collect(),
            resident.epoch(epoch, 0).collect(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.into_iter().zip(b) {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert_eq!(x.indices, y.indices);
            assert_eq!(y.images.dtype(), DType::F32);
            assert_eq!(x.images.dims(), y.images.dims());
            // Same arithmetic, up to the rounding of a fused multiply-add.
            let d = max_abs_diff(&x.images, &y.images);
            assert!(d < 1e-5, "{cfg:?}: images differ by {d}");
            assert_eq!(
                x.labels.to_vec1::<u32>().unwrap(),
                y.labels.to_vec1::<u32>().unwrap()
            );
            match (&x.mix, &y.mix) {
                (None, None) => {}
                (Some((la, lx)), Some((lb, ly))) => {
                    assert_eq!(lx, ly);
                    assert_eq!(la.to_vec1::<u32>().unwrap(), lb.to_vec1::<u32>().unwrap());
                }
                _ => panic!("{cfg:?}: mixing differs"),
            }
            match (&x.paired, &y.paired) {
                (None, None) => {}
                (Some(p), Some(q)) => assert!(max_abs_diff(p, q) < 1e-5),
                _ => panic!("{cfg:?}: pairing differs"),
            }
            assert_eq!(
                x.contrast.map(|c| c.to_vec2::<u32>().unwrap()),
                y.contrast.map(|c| c.to_vec2::<u32>().unwrap())
            );
        }
    }
}

#[test]
fn resident_batches_equal_host_batches() {
    let base = LoaderConfig::train(16, Normalize::CIFAR10, 7);
    same_batches(base.clone());
    same_batches(LoaderConfig {
        mix: Some(Mix::Mixup { alpha: 1.0 }),
        ..base.clone()
    });
    same_batches(LoaderConfig {
        mix: Some(Mix::Cutmix { alpha: 1.0 }),
        ..base.clone()
    });
    same_batches(LoaderConfig {
        pair: Some(Pairing::SecondView),
        ..base.clone()
    });
    same_batches(LoaderConfig {
        pair: Some(Pairing::StrongView),
        ..base.clone()
    });
    same_batches(LoaderConfig {
        pair: Some(Pairing::SameClass),
        prefetch: 0,
        ..base.clone()
    });
    same_batches(LoaderConfig {
        negatives: Some(20),
        ..base.clone()
    });
    same_batches(LoaderConfig::eval(32, Normalize::CIFAR100));
}
