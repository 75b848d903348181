//! CIFAR binary and image-folder readers against fixtures written here in the official layouts.
use std::path::Path;

use kd_data::cifar::{
    encode_cifar10, encode_cifar100, CIFAR100_DIR, CIFAR10_DIR, CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
};
use kd_data::{load_cifar10, load_cifar100, load_image_folder, DataError, Split};

/// A split whose pixel (c, y, x) of image i is a known function of all four.
fn patterned(n: usize, classes: u32) -> Split {
    let mut s = Split::empty(3, 32, 32);
    for i in 0..n {
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    s.images.push(pixel(i, c, y, x));
                }
            }
        }
        s.labels.push(i as u32 % classes);
    }
    s
}

fn pixel(i: usize, c: usize, y: usize, x: usize) -> u8 {
    ((i * 7 + c * 50 + y * 3 + x * 5) % 256) as u8
}

fn write_cifar10(root: &Path, per_file: usize) {
    let dir = root.join(CIFAR10_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    for (k, f) in CIFAR10_TRAIN_FILES.iter().enumerate() {
        let mut s = patterned(per_file, 10);
        s.labels.iter_mut().for_each(|l| *l = (*l + k as u32) % 10);
        std::fs::write(dir.join(f), encode_cifar10(&s)).unwrap();
    }
    std::fs::write(
        dir.join(CIFAR10_TEST_FILE),
        encode_cifar10(&patterned(per_file, 10)),
    )
    .unwrap();
}

#[test]
fn cifar10_pixel_order_and_labels() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 20);
    // Raw record check: label byte, then the red plane row-major.
    let raw = std::fs::read(tmp.path().join(CIFAR10_DIR).join(CIFAR10_TEST_FILE)).unwrap();
    assert_eq!(raw.len(), 20 * 3073);
    assert_eq!(raw[3073 * 3], 3); // label of record 3
    assert_eq!(raw[3073 * 3 + 1 + 1024 + 32 * 5 + 7], pixel(3, 1, 5, 7)); // green, row 5, col 7
    for root in [tmp.path().to_path_buf(), tmp.path().join(CIFAR10_DIR)] {
        let ds = load_cifar10(&root).unwrap();
        assert_eq!(ds.train.len(), 100);
        assert_eq!(ds.test.len(), 20);
        assert_eq!(ds.classes[0], "airplane");
        assert_eq!(ds.classes[9], "truck");
        let img = ds.test.image(3);
        assert_eq!(img[(32 + 5) * 32 + 7], pixel(3, 1, 5, 7));
        assert_eq!(img[(2 * 32 + 31) * 32], pixel(3, 2, 31, 0));
        assert_eq!(ds.test.labels[3], 3);
        // Second training file shifts labels by one.
        assert_eq!(ds.train.labels[20], 1);
    }
}

#[test]
fn cifar10_wrong_size_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 4);
    let f = tmp.path().join(CIFAR10_DIR).join("data_batch_3.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.pop();
    std::fs::write(&f, &bytes).unwrap();
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(
        matches!(err, DataError::BadFileSize { actual, .. } if actual == 4 * 3073 - 1),
        "{err}"
    );
    assert!(err.to_string().contains("data_batch_3.bin"), "{err}");
}

#[test]
fn cifar10_label_out_of_range_and_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 4);
    let f = tmp.path().join(CIFAR10_DIR).join(CIFAR10_TEST_FILE);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[2 * 3073] = 10;
    std::fs::write(&f, &bytes).unwrap();
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                record: 2,
                label: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("test_batch.bin"));
    std::fs::remove_file(tmp.path().join(CIFAR10_DIR).join("data_batch_5.bin")).unwrap();
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(
        matches!(err, DataError::Missing { .. }) && err.to_string().contains("data_batch_5.bin"),
        "{err}"
    );
}

#[test]
fn cifar100_fine_and_coarse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(CIFAR100_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = patterned(200, 100);
    s.coarse_labels = Some(s.labels.iter().map(|l| l / 5).collect());
    std::fs::write(dir.join("train.bin"), encode_cifar100(&s)).unwrap();
    std::fs::write(
        dir.join("test.bin"),
        encode_cifar100(&s.select(&[0, 1, 2, 99])),
    )
    .unwrap();
    let names: Vec<String> = (0..100).map(|i| format!("fine{i}")).collect();
    std::fs::write(dir.join("fine_label_names.txt"), names.join("\n")).unwrap();
    let raw = std::fs::read(dir.join("test.bin")).unwrap();
    assert_eq!(&raw[3 * 3074..3 * 3074 + 2], &[19, 99]); // coarse byte first, then fine
    let ds = load_cifar100(tmp.path()).unwrap();
    assert_eq!(ds.num_classes(), 100);
    assert_eq!(ds.classes[42], "fine42");
    assert_eq!(ds.coarse_classes.as_ref().unwrap().len(), 20);
    assert_eq!(ds.test.labels, vec![0, 1, 2, 99]);
    assert_eq!(ds.test.coarse_labels.as_ref().unwrap(), &vec![0, 0, 0, 19]);
    assert_eq!(ds.train.class_counts(100), vec![2; 100]);
    assert_eq!(ds.train.coarse_counts(20).unwrap(), vec![10; 20]);
    assert_eq!(ds.test.image(3)[(2 * 32 + 4) * 32 + 9], pixel(99, 2, 4, 9));
    // A coarse label of 20 is out of range.
    let mut bad = raw.clone();
    bad[3074] = 20;
    std::fs::write(dir.join("test.bin"), bad).unwrap();
    let err = load_cifar100(tmp.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                kind: "coarse",
                record: 1,
                ..
            }
        ),
        "{err}"
    );
}

fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    img.save(path).unwrap();
}

fn image_folder(root: &Path) {
    for split in ["train", "test"] {
        for (k, class) in ["zebra", "ant", "moth"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..3 {
                write_png(&d.join(format!("{i}.png")), 32, 32, |x, y| {
                    [x as u8, y as u8, (k * 10 + i) as u8]
                });
            }
        }
    }
}

#[test]
fn image_folder_sorted_classes_and_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    std::fs::write(tmp.path().join("train/ant/.DS_Store"), b"junk").unwrap(); // hidden files are skipped
    let ds = load_image_folder(tmp.path(), 32, 32).unwrap();
    assert_eq!(ds.classes, vec!["ant", "moth", "zebra"]);
    assert_eq!(ds.train.len(), 9);
    assert_eq!(ds.test.class_counts(3), vec![3, 3, 3]);
    // First image: class "ant" (k = 1 in the writer), file 0.png.
    let img = ds.train.image(0);
    assert_eq!(ds.train.labels[0], 0);
    assert_eq!(img[5 * 32 + 7], 7); // red = x
    assert_eq!(img[1024 + 5 * 32 + 7], 5); // green = y
    assert_eq!(img[2048], 10); // blue = k*10 + i
}

#[test]
fn image_folder_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    write_png(&tmp.path().join("train/moth/big.png"), 33, 32, |_, _| {
        [0, 0, 0]
    });
    let err = load_image_folder(tmp.path(), 32, 32).unwrap_err();
    assert!(
        matches!(err, DataError::WrongImageSize { width: 33, .. })
            && err.to_string().contains("big.png"),
        "{err}"
    );
    std::fs::remove_file(tmp.path().join("train/moth/big.png")).unwrap();

    std::fs::write(tmp.path().join("train/moth/notes.txt"), b"hello").unwrap();
    let err = load_image_folder(tmp.path(), 32, 32).unwrap_err();
    assert!(
        matches!(err, DataError::BadImage { .. }) && err.to_string().contains("notes.txt"),
        "{err}"
    );
    std::fs::remove_file(tmp.path().join("train/moth/notes.txt")).unwrap();

    std::fs::write(tmp.path().join("train/moth/broken.jpg"), b"not a jpeg").unwrap();
    let err = load_image_folder(tmp.path(), 32, 32).unwrap_err();
    assert!(
        matches!(err, DataError::BadImage { .. }) && err.to_string().contains("broken.jpg"),
        "{err}"
    );
    std::fs::remove_file(tmp.path().join("train/moth/broken.jpg")).unwrap();

    std::fs::create_dir(tmp.path().join("train/wasp")).unwrap();
    std::fs::create_dir(tmp.path().join("test/wasp")).unwrap();
    let err = load_image_folder(tmp.path(), 32, 32).unwrap_err();
    assert!(
        matches!(err, DataError::EmptyClass { .. }) && err.to_string().contains("wasp"),
        "{err}"
    );
    std::fs::remove_dir(tmp.path().join("test/wasp")).unwrap();
    write_png(&tmp.path().join("train/wasp/0.png"), 32, 32, |_, _| {
        [1, 2, 3]
    });
    let err = load_image_folder(tmp.path(), 32, 32).unwrap_err();
    assert!(matches!(err, DataError::ClassMismatch { .. }), "{err}");
}

#[test]
fn channel_stats_closed_form() {
    // Two images: all-0 and all-255 → mean 0.5, std 0.5 in every channel.
    let mut s = Split::empty(3, 2, 2);
    s.images = [vec![0u8; 12], vec![255u8; 12]].concat();
    s.labels = vec![0, 1];
    let (m, sd) = s.channel_stats().unwrap();
    for c in 0..3 {
        assert!((m[c] - 0.5).abs() < 1e-12 && (sd[c] - 0.5).abs() < 1e-12);
    }
}
