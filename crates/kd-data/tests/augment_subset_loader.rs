//! Augmentation invariants, balanced subsets and the batch loader.
use std::collections::HashSet;
use std::sync::Arc;

use kd_data::augment::{sample_rng, Stream};
use kd_data::{
    balanced_subset, Augment, CropFlip, Loader, LoaderConfig, Mix, Normalize, Split, SubsetSpec,
};

fn ramp(n: usize, classes: u32) -> Split {
    let mut s = Split::empty(3, 32, 32);
    s.images = (0..n * 3072).map(|i| (i % 251) as u8).collect();
    s.labels = (0..n).map(|i| i as u32 % classes).collect();
    s
}

fn one_image() -> Vec<u8> {
    (0..3 * 32 * 32).map(|i| (i % 255 + 1) as u8).collect() // no zero pixels: zeros mark padding
}

#[test]
fn crop_shifts_and_pads_with_zero() {
    let img = one_image();
    // Window at offset (0, 8) in the 4-padded image: rows shift down by 4, columns left by 4.
    let t = CropFlip {
        pad: 4,
        oy: 0,
        ox: 8,
        flip: false,
    };
    let out = t.apply_u8(&img, 3, 32, 32);
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                let v = out[(c * 32 + y) * 32 + x];
                if y < 4 || x >= 28 {
                    assert_eq!(v, 0, "padding at ({c},{y},{x})");
                } else {
                    assert_eq!(v, img[(c * 32 + y - 4) * 32 + x + 4]);
                }
            }
        }
    }
    // The centred window is the identity.
    assert_eq!(
        CropFlip {
            pad: 4,
            oy: 4,
            ox: 4,
            flip: false
        }
        .apply_u8(&img, 3, 32, 32),
        img
    );
}

#[test]
fn sampled_crops_stay_in_bounds() {
    let mut rng = sample_rng(7, Stream::Augment, 0, 0);
    let mut seen = HashSet::new();
    for _ in 0..2000 {
        let t = Augment::STANDARD.sample(&mut rng);
        assert!(t.oy <= 8 && t.ox <= 8);
        seen.insert((t.oy, t.ox, t.flip));
        let out = t.apply_u8(&one_image(), 3, 32, 32);
        // At most 4 rows and 4 columns of padding are visible.
        let zeros = out.iter().filter(|&&v| v == 0).count();
        assert!(zeros <= 3 * (4 * 32 + 4 * 32));
    }
    assert_eq!(seen.len(), 9 * 9 * 2, "every offset and flip occurs");
}

#[test]
fn flip_twice_is_identity_and_mirrors() {
    let img = one_image();
    let f = CropFlip {
        pad: 0,
        oy: 0,
        ox: 0,
        flip: true,
    };
    let once = f.apply_u8(&img, 3, 32, 32);
    assert_eq!(once[5 * 32], img[5 * 32 + 31]);
    assert_eq!(f.apply_u8(&once, 3, 32, 32), img);
}

#[test]
fn normalisation_matches_formula() {
    let img = one_image();
    let mut out = vec![0f32; 3072];
    let n = Normalize::CIFAR10;
    CropFlip::IDENTITY.apply_normalized(&img, 32, 32, &n, &mut out);
    for &(c, i) in &[(0usize, 0usize), (1, 100), (2, 1023)] {
        let expect = (img[c * 1024 + i] as f32 / 255.0 - n.mean[c]) / n.std[c];
        assert!((out[c * 1024 + i] - expect).abs() < 1e-5);
    }
    // A padded pixel is black before normalisation.
    CropFlip {
        pad: 4,
        oy: 0,
        ox: 0,
        flip: false,
    }
    .apply_normalized(&img, 32, 32, &n, &mut out);
    assert!((out[0] - (-n.mean[0] / n.std[0])).abs() < 1e-6);
}

#[test]
fn mixup_mixes_images_and_labels() {
    let b = 8;
    let (c, h, w) = (3, 4, 4);
    let n = c * h * w;
    let images: Vec<f32> = (0..b * n).map(|i| (i / n) as f32).collect(); // image k is constant k
    let labels: Vec<u32> = (0..b as u32).collect();
    for seed in 0..20 {
        let mut x = images.clone();
        let info = Mix::Mixup { alpha: 1.0 }
            .apply(
                &mut x,
                &labels,
                c,
                h,
                w,
                &mut sample_rng(seed, Stream::Mix, 0, 0),
            )
            .unwrap();
        assert!((0.0..=1.0).contains(&info.lambda));
        let mut partners: Vec<u32> = info.labels_b.clone();
        partners.sort();
        assert_eq!(partners, labels, "partners are a permutation");
        for i in 0..b {
            let expect = info.lambda * i as f32 + (1.0 - info.lambda) * info.labels_b[i] as f32;
            assert!(x[i * n..(i + 1) * n]
                .iter()
                .all(|v| (v - expect).abs() < 1e-5));
        }
    }
}

#[test]
fn cutmix_lambda_is_the_kept_area() {
    let (c, h, w) = (3, 32, 32);
    let n = c * h * w;
    let b = 4;
    let images: Vec<f32> = (0..b * n).map(|i| (i / n) as f32).collect();
    let labels: Vec<u32> = (0..b as u32).collect();
    for seed in 0..20 {
        let mut x = images.clone();
        let info = Mix::Cutmix { alpha: 1.0 }
            .apply(
                &mut x,
                &labels,
                c,
                h,
                w,
                &mut sample_rng(seed, Stream::Mix, 0, 0),
            )
            .unwrap();
        for i in 0..b {
            if info.labels_b[i] as usize == i {
                continue;
            }
            let kept = x[i * n..(i + 1) * n]
                .iter()
                .filter(|&&v| v == i as f32)
                .count();
            assert!((kept as f32 / n as f32 - info.lambda).abs() < 1e-6);
        }
    }
    let err = Mix::Mixup { alpha: 0.0 }.apply(
        &mut images.clone(),
        &labels,
        c,
        h,
        w,
        &mut sample_rng(0, Stream::Mix, 0, 0),
    );
    assert!(err.unwrap_err().to_string().contains("mix.alpha"));
}

#[test]
fn balanced_subset_is_balanced_and_seeded() {
    let mut s = ramp(1000, 10);
    s.labels[0] = 1; // class 0 now has 99 images, class 1 has 101
    let a = balanced_subset(&s, 10, SubsetSpec::PerClass(50), 3).unwrap();
    assert_eq!(s.select(&a).class_counts(10), vec![50; 10]);
    assert_eq!(
        a,
        balanced_subset(&s, 10, SubsetSpec::PerClass(50), 3).unwrap()
    );
    assert_ne!(
        a,
        balanced_subset(&s, 10, SubsetSpec::PerClass(50), 4).unwrap()
    );
    let f = balanced_subset(&s, 10, SubsetSpec::Fraction(0.1), 0).unwrap();
    assert_eq!(s.select(&f).class_counts(10), vec![9; 10]); // 10% of the smallest class (99)
    assert!(balanced_subset(&s, 10, SubsetSpec::PerClass(100), 0)
        .unwrap_err()
        .to_string()
        .contains("smallest class has 99"));
    assert!(balanced_subset(&s, 10, SubsetSpec::Fraction(1.5), 0).is_err());
}

fn collect(loader: &Loader, epoch: u64) -> Vec<(Vec<f32>, Vec<u32>, Vec<usize>)> {
    loader
        .epoch(epoch, 0)
        .map(|b| {
            let b = b.unwrap();
            (
                b.images.flatten_all().unwrap().to_vec1().unwrap(),
                b.labels.to_vec1().unwrap(),
                b.indices,
            )
        })
        .collect()
}

#[test]
fn loader_visits_every_image_once_and_is_deterministic() {
    let split = Arc::new(ramp(103, 10));
    let cfg = LoaderConfig::train(16, Normalize::CIFAR10, 11);
    let loader = Loader::new(split.clone(), cfg.clone(), candle_core::Device::Cpu).unwrap();
    assert_eq!(loader.num_batches(), 7);
    let e0 = collect(&loader, 0);
    assert_eq!(e0.len(), 7);
    assert_eq!(e0.last().unwrap().1.len(), 103 - 96);
    let mut seen: Vec<usize> = e0.iter().flat_map(|b| b.2.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..103).collect::<Vec<_>>());
    for (_, labels, idx) in &e0 {
        assert!(labels.iter().zip(idx).all(|(l, &i)| *l == split.labels[i]));
    }
    // Same seed and epoch → same batches, with or without the background thread.
    assert_eq!(e0, collect(&loader, 0));
    let sync = Loader::new(
        split.clone(),
        LoaderConfig {
            prefetch: 0,
            ..cfg.clone()
        },
        candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(e0, collect(&sync, 0));
    // Another epoch reorders and re-augments.
    assert_ne!(e0[0].2, collect(&loader, 1)[0].2);
    // Resuming mid-epoch yields the remaining batches unchanged.
    let rest: Vec<Vec<usize>> = loader.epoch(0, 3).map(|b| b.unwrap().indices).collect();
    assert_eq!(
        rest,
        e0[3..].iter().map(|b| b.2.clone()).collect::<Vec<_>>()
    );
    // drop_last drops the 7-image tail.
    let dl = Loader::new(
        split,
        LoaderConfig {
            drop_last: true,
            ..cfg
        },
        candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(dl.num_batches(), 6);
    assert!(collect(&dl, 0).iter().all(|b| b.1.len() == 16));
}

#[test]
fn eval_loader_is_in_order_and_unaugmented() {
    let split = Arc::new(ramp(40, 10));
    let loader = Loader::new(
        split.clone(),
        LoaderConfig::eval(32, Normalize::IDENTITY),
        candle_core::Device::Cpu,
    )
    .unwrap();
    let batches = collect(&loader, 5);
    assert_eq!(batches[0].2, (0..32).collect::<Vec<_>>());
    let expect: Vec<f32> = split.image(0).iter().map(|&p| p as f32 / 255.0).collect();
    assert!(batches[0].0[..3072]
        .iter()
        .zip(&expect)
        .all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn loader_with_mixup_returns_partner_labels() {
    let split = Arc::new(ramp(64, 10));
    let cfg = LoaderConfig {
        mix: Some(Mix::Mixup { alpha: 0.4 }),
        ..LoaderConfig::train(32, Normalize::CIFAR10, 0)
    };
    let loader = Loader::new(split, cfg, candle_core::Device::Cpu).unwrap();
    for b in loader.epoch(0, 0) {
        let b = b.unwrap();
        let (lb, lambda) = b.mix.expect("mixup on");
        assert_eq!(lb.dims(), &[32]);
        assert!((0.0..=1.0).contains(&lambda));
    }
}

#[test]
fn loader_rejects_bad_config() {
    let split = Arc::new(ramp(4, 2));
    let cfg = LoaderConfig::train(0, Normalize::CIFAR10, 0);
    assert!(Loader::new(split.clone(), cfg, candle_core::Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("batch_size"));
    let bad = LoaderConfig::train(
        2,
        Normalize {
            mean: [0.0; 3],
            std: [0.0, 1.0, 1.0],
        },
        0,
    );
    assert!(Loader::new(split, bad, candle_core::Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("normalize"));
}

fn paired_batches(cfg: LoaderConfig, split: &Split) -> Vec<(Vec<f32>, Vec<f32>, Vec<usize>)> {
    let loader = Loader::new(Arc::new(split.clone()), cfg, candle_core::Device::Cpu).unwrap();
    loader
        .epoch(0, 0)
        .map(|b| {
            let b = b.unwrap();
            let p = b
                .paired
                .expect("pairing on")
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (
                b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                p,
                b.indices,
            )
        })
        .collect()
}

#[test]
fn second_view_is_the_same_image_augmented_independently() {
    let split = ramp(24, 3);
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    // Without augmentation both views are the image itself.
    let plain = LoaderConfig {
        augment: Augment::NONE,
        pair: Some(kd_data::Pairing::SecondView),
        ..LoaderConfig::train(8, norm, 3)
    };
    for (a, b, _) in paired_batches(plain, &split) {
        assert_eq!(a, b);
    }
    // With crop + flip the views differ (independent draws) and repeat with the seed.
    let aug = LoaderConfig {
        pair: Some(kd_data::Pairing::SecondView),
        ..LoaderConfig::train(8, norm, 3)
    };
    let first = paired_batches(aug.clone(), &split);
    assert!(
        first.iter().any(|(a, b, _)| a != b),
        "the two views were drawn identically"
    );
    assert_eq!(first, paired_batches(aug, &split));
}

/// The strong view is the sample's own image cropped, flipped, RandAugmented and cut out with
/// the draws of its own stream (keyed by its place in the epoch), then normalised; the weak
/// view is unchanged by it.
#[test]
fn strong_view_is_the_image_under_randaugment() {
    let split = ramp(20, 4);
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    let cfg = LoaderConfig {
        pair: Some(kd_data::Pairing::StrongView),
        ..LoaderConfig::train(8, norm, 11)
    };
    let strong = paired_batches(cfg.clone(), &split);
    // The images of a batch do not depend on what is paired with them.
    let weak = paired_batches(
        LoaderConfig {
            pair: Some(kd_data::Pairing::SecondView),
            ..cfg.clone()
        },
        &split,
    );
    let n = 3 * 32 * 32;
    for (batch, ((images, paired, indices), (weak_images, ..))) in
        strong.iter().zip(&weak).enumerate()
    {
        assert_eq!(images, weak_images, "the weak view moved");
        for (k, &i) in indices.iter().enumerate() {
            let pos = (batch * 8 + k) as u64;
            let mut rng = sample_rng(11, Stream::StrongView, 0, pos);
            let mut img = Augment::STANDARD
                .sample(&mut rng)
                .apply_u8(split.image(i), 3, 32, 32);
            kd_data::randaugment::RandAugment::FIXMATCH.apply(&mut img, 32, 32, &mut rng);
            let want: Vec<f32> = img
                .iter()
                .map(|&v| (v as f32 / 255.0 - 0.5) / 0.25)
                .collect();
            let got = &paired[k * n..(k + 1) * n];
            assert!(
                want.iter().zip(got).all(|(a, b)| (a - b).abs() < 1e-5),
                "strong view of sample {pos} (image {i})"
            );
            assert_ne!(
                &images[k * n..(k + 1) * n],
                got,
                "strong view equals the weak one"
            );
        }
    }
    assert_eq!(strong, paired_batches(cfg, &split), "not repeatable");
}

#[test]
fn same_class_partner_is_another_image_of_that_class() {
    let split = ramp(30, 3);
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    let cfg = LoaderConfig {
        augment: Augment::NONE,
        pair: Some(kd_data::Pairing::SameClass),
        ..LoaderConfig::train(10, norm, 5)
    };
    let n = 3 * 32 * 32;
    let normalised = |i: usize| -> Vec<f32> {
        split
            .image(i)
            .iter()
            .map(|&v| (v as f32 / 255.0 - 0.5) / 0.25)
            .collect()
    };
    let mut partners = HashSet::new();
    for (_, paired, indices) in paired_batches(cfg, &split) {
        for (k, &i) in indices.iter().enumerate() {
            let p = &paired[k * n..(k + 1) * n];
            let j = (0..split.len())
                .find(|&j| {
                    normalised(j)
                        .iter()
                        .zip(p)
                        .all(|(a, b)| (a - b).abs() < 1e-4)
                })
                .expect("the partner is an image of the split");
            assert_ne!(j, i, "partner of {i} is itself");
            assert_eq!(
                split.labels[j], split.labels[i],
                "partner of {i} has another class"
            );
            partners.insert((i, j));
        }
    }
    assert_eq!(partners.len(), 30, "every image got one partner");
    let mixed = LoaderConfig {
        pair: Some(kd_data::Pairing::SameClass),
        mix: Some(Mix::Mixup { alpha: 1.0 }),
        ..LoaderConfig::train(10, norm, 5)
    };
    let err = Loader::new(Arc::new(split), mixed, candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pair"), "{err}");
}

/// Every batch's contrast rows, for `negatives` per sample.
fn contrast_rows(split: &Split, negatives: usize, seed: u64, epoch: u64) -> Vec<Vec<u32>> {
    let cfg = LoaderConfig {
        negatives: Some(negatives),
        prefetch: 0,
        ..LoaderConfig::train(8, Normalize::CIFAR10, seed)
    };
    let loader = Loader::new(Arc::new(split.clone()), cfg, candle_core::Device::Cpu).unwrap();
    loader
        .epoch(epoch, 0)
        .flat_map(|b| {
            let b = b.unwrap();
            let rows = b.contrast.expect("negatives on").to_vec2::<u32>().unwrap();
            assert_eq!(
                rows.iter().map(|r| r[0] as usize).collect::<Vec<_>>(),
                b.indices,
                "each row starts with the sample's own position"
            );
            rows
        })
        .collect()
}

#[test]
fn negatives_are_distinct_images_of_other_classes() {
    let split = ramp(40, 4); // 10 images a class: 30 candidates for each sample
    let rows = contrast_rows(&split, 12, 3, 0);
    assert_eq!(rows.len(), 40);
    let mut drawn = HashSet::new();
    for row in &rows {
        assert_eq!(row.len(), 13);
        let own = split.labels[row[0] as usize];
        let negs: HashSet<u32> = row[1..].iter().copied().collect();
        assert_eq!(negs.len(), 12, "drawn without replacement: {row:?}");
        for &j in &negs {
            assert_ne!(
                split.labels[j as usize], own,
                "negative {j} of {} shares its class",
                row[0]
            );
            drawn.insert(j);
        }
    }
    assert_eq!(
        drawn.len(),
        40,
        "every image serves as a negative somewhere"
    );
    // Seeded: the same seed and epoch repeat the draw, another epoch or seed does not.
    assert_eq!(rows, contrast_rows(&split, 12, 3, 0));
    assert_ne!(rows, contrast_rows(&split, 12, 3, 1));
    assert_ne!(rows, contrast_rows(&split, 12, 4, 0));
    // More negatives than other-class images: drawn with replacement, still of other classes.
    for row in contrast_rows(&split, 50, 3, 0) {
        let own = split.labels[row[0] as usize];
        assert_eq!(row.len(), 51);
        assert!(row[1..].iter().all(|&j| split.labels[j as usize] != own));
    }
    // One class: nothing to contrast with.
    let single = ramp(8, 1);
    let cfg = LoaderConfig {
        negatives: Some(4),
        ..LoaderConfig::train(4, Normalize::CIFAR10, 0)
    };
    let err = Loader::new(Arc::new(single), cfg, candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("negatives") && err.contains("2 classes"),
        "{err}"
    );
}
