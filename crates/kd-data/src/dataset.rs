//! In-memory image storage: `u8` pixels in N×C×H×W order, the layout CIFAR ships in,
//! so a whole data set costs 3 KB per image and augmentation reads it directly.
use crate::{DataError, Result};

/// One split (train or test) of an image data set.
#[derive(Clone, Debug)]
pub struct Split {
    /// Pixels, `len × channels × height × width`, row-major planes.
    pub images: Vec<u8>,
    /// Class index of each image.
    pub labels: Vec<u32>,
    /// Coarse (superclass) label of each image, when the data set has one (CIFAR-100).
    pub coarse_labels: Option<Vec<u32>>,
    /// Channels per image (3).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
}

impl Split {
    /// An empty split of the given geometry.
    pub fn empty(channels: usize, height: usize, width: usize) -> Self {
        Split {
            images: Vec::new(),
            labels: Vec::new(),
            coarse_labels: None,
            channels,
            height,
            width,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i` (C×H×W).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Number of images per class, for `num_classes` classes.
    pub fn class_counts(&self, num_classes: usize) -> Vec<usize> {
        count(&self.labels, num_classes)
    }

    /// Number of images per coarse class, if the split has coarse labels.
    pub fn coarse_counts(&self, num_coarse: usize) -> Option<Vec<usize>> {
        self.coarse_labels.as_ref().map(|c| count(c, num_coarse))
    }

    /// The images at `indices`, in that order, as a new split.
    pub fn select(&self, indices: &[usize]) -> Split {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Split {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            coarse_labels: self
                .coarse_labels
                .as_ref()
                .map(|c| indices.iter().map(|&i| c[i]).collect()),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1]
    /// (population statistics over every pixel of every image, as torchvision recipes compute them).
    pub fn channel_stats(&self) -> Result<([f64; 3], [f64; 3])> {
        if self.channels != 3 || self.is_empty() {
            return Err(DataError::Invalid {
                field: "split",
                message: format!("channel statistics need a non-empty 3-channel split, got {} images of {} channels", self.len(), self.channels),
            });
        }
        let plane = self.height * self.width;
        let mut sum = [0u64; 3];
        let mut sq = [0u64; 3];
        for img in self.images.chunks_exact(3 * plane) {
            for c in 0..3 {
                for &p in &img[c * plane..(c + 1) * plane] {
                    sum[c] += p as u64;
                    sq[c] += (p as u64) * (p as u64);
                }
            }
        }
        let n = (self.len() * plane) as f64;
        let mut mean = [0.0; 3];
        let mut std = [0.0; 3];
        for c in 0..3 {
            let m = sum[c] as f64 / n;
            let var = sq[c] as f64 / n - m * m;
            mean[c] = m / 255.0;
            std[c] = var.max(0.0).sqrt() / 255.0;
        }
        Ok((mean, std))
    }
}

fn count(labels: &[u32], n: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts
}

/// A data set: train and test splits with class names.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Short name ("cifar10", "cifar100", or the folder's name).
    pub name: String,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Coarse class names (CIFAR-100 superclasses), when present.
    pub coarse_classes: Option<Vec<String>>,
    /// Training split.
    pub train: Split,
    /// Test split.
    pub test: Split,
}

impl Dataset {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}
