//! Loader throughput on the CPU: images/s with crop + flip + normalise, prefetch on, alone and
//! with MLKD's RandAugment strong view beside each image; and the cost of drawing CRD's
//! negatives (K = 16384 other-class images per image) on the host.
#![allow(missing_docs)] // criterion_group! generates an undocumented function
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kd_data::{Loader, LoaderConfig, Normalize, Split};

fn synthetic(n: usize) -> Split {
    let mut s = Split::empty(3, 32, 32);
    s.images = (0..n * 3072).map(|i| (i * 31 % 251) as u8).collect();
    s.labels = (0..n).map(|i| (i % 10) as u32).collect();
    s
}

/// Images served per epoch by a loader over `split` with `cfg`, each epoch a new one (the
/// evaluation order is the same every epoch anyway).
fn images_per_epoch(split: &Arc<Split>, cfg: LoaderConfig) -> impl FnMut() -> usize {
    let loader = Loader::new(split.clone(), cfg, candle_core::Device::Cpu).unwrap();
    let mut e = 0;
    move || {
        e += 1;
        loader
            .epoch(e, 0)
            .map(|b| b.unwrap().labels.dims()[0])
            .sum::<usize>()
    }
}

fn bench(c: &mut Criterion) {
    let n = 10_000;
    let split = Arc::new(synthetic(n));
    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    let train = LoaderConfig::train(128, Normalize::CIFAR10, 0);
    let strong = LoaderConfig {
        pair: Some(kd_data::Pairing::StrongView),
        ..train.clone()
    };
    let cases = [
        ("epoch_crop_flip_normalise_b128", train),
        ("epoch_crop_flip_normalise_strong_view_b128", strong),
        (
            "epoch_normalise_only_b128",
            LoaderConfig::eval(128, Normalize::CIFAR10),
        ),
    ];
    for (name, cfg) in cases {
        let mut epoch = images_per_epoch(&split, cfg);
        g.bench_function(name, |b| b.iter(&mut epoch));
    }
    g.finish();
}

/// CRD's negatives at RepDistiller's K = 16384 over a CIFAR-sized split (50,000 images, 10
/// classes), batch 256: 20 batches with and without them, so the difference is the sampling.
fn negatives(c: &mut Criterion) {
    let (n, batch, batches) = (50_000, 256, 20);
    let split = Arc::new(synthetic(n));
    let mut g = c.benchmark_group("loader_crd");
    g.throughput(Throughput::Elements((batch * batches) as u64));
    g.sample_size(10);
    for k in [None, Some(16_384)] {
        let loader = Loader::new(
            split.clone(),
            LoaderConfig {
                negatives: k,
                ..LoaderConfig::train(batch, Normalize::CIFAR10, 0)
            },
            candle_core::Device::Cpu,
        )
        .unwrap();
        let name = match k {
            Some(k) => format!("b{batch}_negatives_{k}"),
            None => format!("b{batch}_no_negatives"),
        };
        g.bench_function(name, |b| {
            let mut e = 0;
            b.iter(|| {
                e += 1;
                loader
                    .epoch(e, 0)
                    .take(batches)
                    .map(|b| b.unwrap().labels.dims()[0])
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, negatives);
criterion_main!(benches);
