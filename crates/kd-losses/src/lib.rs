//! Losses for classification and knowledge distillation on candle: cross-entropy (label
//! smoothing, mixup), Hinton KD (optionally on standardised logits), decoupled KD (DKD), DIST's correlation terms, FitNets hints,
//! attention transfer, RKD, similarity-preserving KD, probabilistic knowledge transfer (PKT),
//! correlation congruence (CC), contrastive representation distillation (CRD), neuron
//! selectivity transfer (NST), variational information distillation (VID), the overhaul of
//! feature distillation (OFD), activation boundaries (AB), factor transfer (FT), the FSP matrices and ReviewKD's
//! hierarchical context loss (HCL), Tf-KD's virtual teacher, MLKD's class- and batch-level
//! alignments, NKD's and USKD's normalised target and non-target terms, WSLD's weighted soft
//! labels and (W)TTM's power-transformed teacher.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let student = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu)?;
//! let teacher = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu)?;
//! let kd = kd_losses::kd_loss(&student, &teacher, 4.0)?.to_scalar::<f32>()?;
//! assert!(kd.abs() < 1e-6); // identical distributions
//! # Ok::<(), candle_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod classification;
pub mod contrastive;
pub mod correlation;
pub mod decoupled;
pub mod feature;
pub mod hinton;
pub mod multi_level;
pub mod normalized;
pub mod relation;
pub mod virtual_teacher;
pub mod weighted;

pub use classification::{cross_entropy, cross_entropy_composed, mixed_cross_entropy, one_hot};
pub use contrastive::{contrast_scores, l2_normalize, momentum_update, nce_loss};
pub use correlation::{dist_terms, pearson_rows};
pub use decoupled::{dkd_loss, dkd_terms, DecoupledTerms};
pub use feature::{
    ab_loss, align_spatial, attention_loss, attention_map, factor_transfer_loss, fsp_loss,
    fsp_matrix, generation_loss, hcl_loss, hint_loss, nst_loss, ofd_loss, ofd_margins, vid_loss,
    vid_variance,
};
pub use hinton::{kd_loss, kd_loss_at, kd_loss_composed, standardize_logits};
pub use multi_level::{
    batch_correlation_loss, class_correlation_loss, fraction_at_or_below_median,
};
pub use normalized::{nkd_terms, uskd_terms, zipf_labels, NormalizedTerms, UniversalSelfTerms};
pub use relation::{
    cc_loss, pkt_loss, pkt_probabilities, rkd_angle_loss, rkd_distance_loss, similarity_matrix,
    smooth_l1, sp_loss,
};

pub use virtual_teacher::{check_virtual_teacher, virtual_teacher_loss, virtual_teacher_probs};
pub use weighted::{ttm_loss, wsld_loss};

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
