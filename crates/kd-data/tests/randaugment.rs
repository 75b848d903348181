//! RandAugment's operations against Pillow itself (`tests/fixtures/randaugment.safetensors`,
//! made by `tools/fixtures/make_randaugment_fixtures.py`): every operation at magnitudes over
//! its whole range on seven kinds of image, and the authors' Cutout, byte for byte.
use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use kd_data::randaugment::{cutout, RandOp};

fn fixtures() -> (HashMap<String, Tensor>, Vec<String>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/randaugment.safetensors"
    );
    let tensors = kd_testkit::load_fixture(
        Path::new(path),
        "tools/fixtures/make_randaugment_fixtures.py",
    );
    let names: Vec<u8> = tensors["ops"].to_vec1().unwrap();
    let ops = String::from_utf8(names).unwrap();
    let ops = ops.split(',').map(str::to_string).collect();
    (tensors, ops)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_vec1().unwrap()
}

fn floats(t: &Tensor) -> Vec<f64> {
    t.to_vec1().unwrap()
}

fn image(t: &Tensor, i: usize) -> Vec<u8> {
    t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_operation_matches_pillow_byte_for_byte() {
    let (f, names) = fixtures();
    assert_eq!(names.len(), RandOp::ALL.len());
    for (k, name) in names.iter().enumerate() {
        assert_eq!(RandOp::ALL[k].name(), name, "the authors' order");
    }
    let (which, index, v) = (
        ints(&f["op.image"]),
        ints(&f["op.index"]),
        floats(&f["op.v"]),
    );
    let mut failures = Vec::new();
    let mut changed = 0;
    for case in 0..which.len() {
        let op = RandOp::ALL[index[case] as usize];
        let src = image(&f["images"], which[case] as usize);
        let mut img = src.clone();
        op.apply(&mut img, 32, 32, v[case]);
        let want = image(&f["op.out"], case);
        changed += usize::from(want != src);
        if img != want {
            let wrong = img.iter().zip(&want).filter(|(a, b)| a != b).count();
            failures.push(format!(
                "{op:?} at {} on image {}: {wrong} bytes differ",
                v[case], which[case]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The cases are not mostly identities.
    assert!(changed > which.len() / 2, "{changed} of {}", which.len());
}

#[test]
fn cutout_matches_the_authors_rectangle() {
    let (f, _) = fixtures();
    let which = ints(&f["cutout.image"]);
    let (cx, cy, size) = (
        floats(&f["cutout.cx"]),
        floats(&f["cutout.cy"]),
        floats(&f["cutout.size"]),
    );
    for case in 0..which.len() {
        let mut img = image(&f["images"], which[case] as usize);
        cutout(&mut img, 32, 32, cx[case], cy[case], size[case]);
        assert_eq!(
            img,
            image(&f["cutout.out"], case),
            "cutout at ({}, {}) of side {}",
            cx[case],
            cy[case],
            size[case]
        );
    }
}
