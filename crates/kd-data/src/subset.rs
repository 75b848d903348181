//! Class-balanced subsets: the same number of images from every class, chosen by a seed,
//! for the "train on a subset, with or without augmentation" experiments.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{DataError, Result, Split};

/// How large a balanced subset to take.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubsetSpec {
    /// This fraction (0, 1] of each class, rounded down, at least one image.
    Fraction(f64),
    /// Exactly this many images of each class.
    PerClass(usize),
}

/// Indices (sorted) of a class-balanced subset of `split`, chosen with `seed`.
///
/// Every class contributes the same count; asking for more than the smallest class holds is an error.
pub fn balanced_subset(
    split: &Split,
    num_classes: usize,
    spec: SubsetSpec,
    seed: u64,
) -> Result<Vec<usize>> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in split.labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let smallest = by_class.iter().map(Vec::len).min().unwrap_or(0);
    let per_class = match spec {
        SubsetSpec::Fraction(f) => {
            if !(f > 0.0 && f <= 1.0) {
                return Err(DataError::Invalid {
                    field: "subset.fraction",
                    message: format!("{f} is not in (0, 1]"),
                });
            }
            ((smallest as f64 * f).floor() as usize).max(1)
        }
        SubsetSpec::PerClass(n) => n,
    };
    if per_class == 0 || per_class > smallest {
        return Err(DataError::Invalid {
            field: "subset.per_class",
            message: format!(
                "{per_class} images per class requested, the smallest class has {smallest}"
            ),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(per_class * num_classes);
    for mut idx in by_class {
        idx.shuffle(&mut rng);
        chosen.extend_from_slice(&idx[..per_class]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}
