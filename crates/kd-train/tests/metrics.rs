//! Accuracy counting against hand-computed values.
use candle_core::{Device, Tensor};
use kd_train::Accuracy;

#[test]
fn top1_top5_and_per_class_by_hand() {
    // 3 samples, 6 classes. Sample 0: label 2 is the max → top-1. Sample 1: label 0 ranks 3rd →
    // top-5 only. Sample 2: label 5 ranks 6th → neither.
    let logits = Tensor::new(
        &[
            [0.1f32, 0.2, 0.9, 0.3, 0.0, 0.0],
            [0.5, 0.9, 0.8, 0.1, 0.0, 0.2],
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let labels = Tensor::new(&[2u32, 0, 5], &Device::Cpu).unwrap();
    let mut a = Accuracy::new(6);
    a.update(&logits, &labels, Some(2.0)).unwrap();
    assert_eq!((a.total, a.top1, a.top5), (3, 1, 2));
    assert!((a.top1_pct() - 100.0 / 3.0).abs() < 1e-9);
    assert_eq!(a.per_class[2], (1, 1));
    assert_eq!(a.per_class[0], (0, 1));
    assert_eq!(a.per_class_pct()[5], 0.0);
    assert!((a.mean_loss() - 2.0).abs() < 1e-12);
}
