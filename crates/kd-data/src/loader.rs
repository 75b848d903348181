//! The batch loader: a seeded per-epoch shuffle, optional drop-last, and a background thread
//! that augments the next batches (in parallel with rayon) while the model trains on this one.
//! Batches arrive as candle tensors on the chosen device. With [`LoaderConfig::resident`] the
//! pixels live on the device and only per-image plans are prepared on the host.
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use kd_kernels::{augment_batch, AugmentPlan, BatchMix, Normalisation};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::{sample_rng, Augment, CropFlip, Mix, MixInfo, MixPlan, Normalize, Stream};
use crate::randaugment::RandAugment;
use crate::{DataError, Result, Split};

/// How batches are drawn and prepared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle the order every epoch (training) or keep it (evaluation).
    pub shuffle: bool,
    /// Drop the last, incomplete batch.
    pub drop_last: bool,
    /// Per-image augmentation.
    pub augment: Augment,
    /// Normalisation applied after augmentation.
    pub normalize: Normalize,
    /// Batch mixing (mixup / CutMix), if any.
    pub mix: Option<Mix>,
    /// Seed of the order, augmentation and mixing streams.
    pub seed: u64,
    /// Batches prepared ahead in the background; 0 prepares each batch on demand.
    pub prefetch: usize,
    /// A second image per sample, for methods that compare two inputs (none by default).
    #[serde(default)]
    pub pair: Option<Pairing>,
    /// Keep the split's uint8 pixels on the loader's device and augment there (kd-kernels'
    /// augmentation kernel on CUDA: crop, flip, normalisation and mixup or CutMix in one
    /// launch): per batch only the plan (20 bytes an image, and the batch's λ and CutMix box)
    /// crosses from the host. Same plans, same streams, so the same batches as on the host.
    #[serde(default)]
    pub resident: bool,
    /// For contrastive methods (CRD): this many images of other classes per sample, drawn
    /// without replacement each epoch ([`Batch::contrast`]; none by default).
    #[serde(default)]
    pub negatives: Option<usize>,
}

/// Which second image a sample brings along ([`Batch::paired`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// The same image under an independently drawn augmentation (two-view self-distillation).
    SecondView,
    /// Another image of the same class, drawn at random each epoch (CS-KD); itself alone
    /// when its class has no other image.
    SameClass,
    /// The same image under the crop and flip then RandAugment and Cutout
    /// ([`crate::randaugment::RandAugment::FIXMATCH`]): MLKD's strong view. Made on the host
    /// even for a resident data set (the operations are Pillow's, not the kernel's).
    StrongView,
}

impl LoaderConfig {
    /// Training defaults: shuffled, standard augmentation, 2 batches ahead.
    pub fn train(batch_size: usize, normalize: Normalize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            augment: Augment::STANDARD,
            normalize,
            mix: None,
            seed,
            prefetch: 2,
            pair: None,
            resident: false,
            negatives: None,
        }
    }

    /// Evaluation defaults: in order, no augmentation.
    pub fn eval(batch_size: usize, normalize: Normalize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            augment: Augment::NONE,
            normalize,
            mix: None,
            seed: 0,
            prefetch: 2,
            pair: None,
            resident: false,
            negatives: None,
        }
    }
}

/// A prepared batch in host memory.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// Normalised images, B×C×H×W.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Mixing partners and λ, when mixing is on.
    pub mix: Option<MixInfo>,
    /// Positions of the images in the split.
    pub indices: Vec<usize>,
    /// The paired images, B×C×H×W, when pairing is on.
    pub paired: Option<Vec<f32>>,
    /// For a resident data set: how to make each image on the device (`images` is then empty).
    pub plans: Option<Vec<AugmentPlan>>,
    /// For a resident data set: how to make each paired image on the device (`None` for a
    /// strong view, which comes made in `paired`).
    pub paired_plans: Option<Vec<AugmentPlan>>,
    /// For a resident data set: the batch's mixing, applied on the device.
    pub mix_plan: Option<MixPlan>,
    /// Each sample's own position then its negatives, B×(1+K), when negatives are on.
    pub contrast: Option<Vec<u32>>,
}

/// A batch on the device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Normalised images, `(B, C, H, W)` f32.
    pub images: Tensor,
    /// Labels, `(B,)` u32.
    pub labels: Tensor,
    /// Mixed-in labels `(B,)` u32 and λ, when mixing is on.
    pub mix: Option<(Tensor, f32)>,
    /// Positions of the images in the split.
    pub indices: Vec<usize>,
    /// The paired images `(B, C, H, W)` ([`LoaderConfig::pair`]): a second view of each image,
    /// or a same-class partner, normalised like `images`.
    pub paired: Option<Tensor>,
    /// `(B, 1 + K)` u32 positions in the split ([`LoaderConfig::negatives`]): each sample's
    /// own, then K images of other classes (RepDistiller's "exact" CRD sampling).
    pub contrast: Option<Tensor>,
}

/// Every position of a split, grouped by class: the images of other classes than `c` are
/// `positions[..bounds[c].0]` and `positions[bounds[c].1..]`.
#[derive(Debug, Default)]
struct ClassGroups {
    positions: Vec<u32>,
    bounds: Vec<(usize, usize)>,
}

/// Serves batches of one split.
#[derive(Clone, Debug)]
pub struct Loader {
    split: Arc<Split>,
    cfg: LoaderConfig,
    device: Device,
    /// Positions of each class's images (for same-class pairing).
    by_class: Arc<Vec<Vec<usize>>>,
    /// The split's positions grouped by class (for negatives).
    grouped: Arc<ClassGroups>,
    /// The split's pixels on the device, when [`LoaderConfig::resident`].
    resident: Option<Arc<Resident>>,
}

/// A split's pixels kept on the device, and the normalisation the kernel applies.
#[derive(Debug)]
struct Resident {
    images: Tensor,
    norm: Normalisation,
}

impl Loader {
    /// A loader over `split`; checks the configuration.
    pub fn new(split: Arc<Split>, cfg: LoaderConfig, device: Device) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Invalid {
                field: "batch_size",
                message: "must be at least 1".into(),
            });
        }
        if split.is_empty() {
            return Err(DataError::Invalid {
                field: "split",
                message: "the split holds no images".into(),
            });
        }
        if split.channels != 3 {
            return Err(DataError::Invalid {
                field: "split",
                message: format!("{} channels, the loader normalises 3", split.channels),
            });
        }
        cfg.normalize.validate()?;
        if cfg.pair.is_some() && cfg.mix.is_some() {
            return Err(DataError::Invalid { field: "pair", message: "pairing and mixup/cutmix cannot be combined: the pair would need its own mixing".into() });
        }
        let mut by_class: Vec<Vec<usize>> = Vec::new();
        if cfg.pair == Some(Pairing::SameClass) {
            for (i, &l) in split.labels.iter().enumerate() {
                if by_class.len() <= l as usize {
                    by_class.resize(l as usize + 1, Vec::new());
                }
                by_class[l as usize].push(i);
            }
        }
        let mut grouped = ClassGroups::default();
        if let Some(k) = cfg.negatives {
            let classes = split.labels.iter().max().map_or(0, |&m| m as usize + 1);
            let mut members: Vec<Vec<u32>> = vec![Vec::new(); classes];
            for (i, &l) in split.labels.iter().enumerate() {
                members[l as usize].push(i as u32);
            }
            if k == 0 || members.iter().filter(|m| !m.is_empty()).count() < 2 {
                return Err(DataError::Invalid {
                    field: "negatives",
                    message: format!("{k} negatives over {} classes present: expected at least 1 negative and 2 classes", members.iter().filter(|m| !m.is_empty()).count()),
                });
            }
            for m in members {
                let start = grouped.positions.len();
                grouped.positions.extend(m);
                grouped.bounds.push((start, grouped.positions.len()));
            }
        }
        // KD_DISABLE=augment falls back to host batches (the same batches).
        let resident = if cfg.resident && kd_kernels::enabled(kd_kernels::Kernel::Augment) {
            let (n, h, w) = (split.len(), split.height, split.width);
            let images = Tensor::from_slice(&split.images, (n, 3, h, w), &device)?;
            let norm = Normalisation::from_mean_std(&cfg.normalize.mean, &cfg.normalize.std);
            Some(Arc::new(Resident { images, norm }))
        } else {
            None
        };
        Ok(Loader {
            split,
            cfg,
            device,
            by_class: Arc::new(by_class),
            grouped: Arc::new(grouped),
            resident,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The device batches are placed on.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// The split served.
    pub fn split(&self) -> &Split {
        &self.split
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.split.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// The order in which epoch `epoch` visits the split.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.split.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut sample_rng(self.cfg.seed, Stream::Order, epoch, 0));
        }
        order
    }

    /// Prepares batch `batch` of `epoch` from that epoch's `order`, on this thread.
    pub fn host_batch(&self, epoch: u64, batch: usize, order: &[usize]) -> Result<HostBatch> {
        let bs = self.cfg.batch_size;
        let indices = order[batch * bs..((batch + 1) * bs).min(order.len())].to_vec();
        if self.resident.is_some() {
            return self.plan_batch(epoch, batch, indices);
        }
        let (h, w) = (self.split.height, self.split.width);
        let n = 3 * h * w;
        let mut images = vec![0f32; indices.len() * n];
        let seed = self.cfg.seed;
        let aug = self.cfg.augment;
        let norm = self.cfg.normalize;
        let first = (batch * bs) as u64;
        images
            .par_chunks_mut(n)
            .zip(indices.par_iter())
            .enumerate()
            .for_each(|(k, (out, &i))| {
                let t = aug.sample(&mut sample_rng(
                    seed,
                    Stream::Augment,
                    epoch,
                    first + k as u64,
                ));
                t.apply_normalized(self.split.image(i), h, w, &norm, out);
            });
        let labels: Vec<u32> = indices.iter().map(|&i| self.split.labels[i]).collect();
        let paired = self
            .cfg
            .pair
            .map(|pairing| self.paired_images(pairing, epoch, first, &indices));
        let mix = match &self.cfg.mix {
            Some(m) => Some(m.apply(
                &mut images,
                &labels,
                3,
                h,
                w,
                &mut sample_rng(seed, Stream::Mix, epoch, batch as u64),
            )?),
            None => None,
        };
        let contrast = self.contrast(epoch, first, &indices);
        Ok(HostBatch {
            images,
            labels,
            mix,
            indices,
            paired,
            plans: None,
            paired_plans: None,
            mix_plan: None,
            contrast,
        })
    }

    /// The paired images of the samples at `indices`, the first at position `first` of `epoch`,
    /// normalised on the host.
    fn paired_images(
        &self,
        pairing: Pairing,
        epoch: u64,
        first: u64,
        indices: &[usize],
    ) -> Vec<f32> {
        let (h, w) = (self.split.height, self.split.width);
        let n = 3 * h * w;
        let (seed, aug, norm) = (self.cfg.seed, self.cfg.augment, self.cfg.normalize);
        let mut out = vec![0f32; indices.len() * n];
        out.par_chunks_mut(n)
            .zip(indices.par_iter())
            .enumerate()
            .for_each(|(k, (out, &i))| {
                let pos = first + k as u64;
                let j = self.paired_source(pairing, i, epoch, pos);
                if pairing == Pairing::StrongView {
                    let mut rng = sample_rng(seed, Stream::StrongView, epoch, pos);
                    let mut img = aug.sample(&mut rng).apply_u8(self.split.image(j), 3, h, w);
                    RandAugment::FIXMATCH.apply(&mut img, h, w, &mut rng);
                    CropFlip::IDENTITY.apply_normalized(&img, h, w, &norm, out);
                } else {
                    let t = aug.sample(&mut sample_rng(seed, Stream::SecondView, epoch, pos));
                    t.apply_normalized(self.split.image(j), h, w, &norm, out);
                }
            });
        out
    }

    /// [`Loader::host_batch`] for a resident data set: the same draws from the same streams,
    /// kept as plans for the device.
    fn plan_batch(&self, epoch: u64, batch: usize, indices: Vec<usize>) -> Result<HostBatch> {
        let (seed, aug) = (self.cfg.seed, self.cfg.augment);
        let first = (batch * self.cfg.batch_size) as u64;
        let plan = |j: usize, stream: Stream, pos: u64| {
            let t = aug.sample(&mut sample_rng(seed, stream, epoch, pos));
            AugmentPlan {
                index: j as u32,
                oy: t.oy as u32,
                ox: t.ox as u32,
                flip: t.flip,
            }
        };
        let plans = indices
            .iter()
            .enumerate()
            .map(|(k, &i)| plan(i, Stream::Augment, first + k as u64))
            .collect();
        let paired_plans = self
            .cfg
            .pair
            .filter(|&p| p != Pairing::StrongView)
            .map(|pairing| {
                indices
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| {
                        let pos = first + k as u64;
                        plan(
                            self.paired_source(pairing, i, epoch, pos),
                            Stream::SecondView,
                            pos,
                        )
                    })
                    .collect()
            });
        let labels: Vec<u32> = indices.iter().map(|&i| self.split.labels[i]).collect();
        let (h, w) = (self.split.height, self.split.width);
        let mix_plan = match &self.cfg.mix {
            Some(m) => Some(m.draw(
                indices.len(),
                h,
                w,
                &mut sample_rng(seed, Stream::Mix, epoch, batch as u64),
            )?),
            None => None,
        };
        let contrast = self.contrast(epoch, first, &indices);
        let paired = (self.cfg.pair == Some(Pairing::StrongView))
            .then(|| self.paired_images(Pairing::StrongView, epoch, first, &indices));
        Ok(HostBatch {
            images: Vec::new(),
            contrast,
            mix: mix_plan.as_ref().map(|p| p.info(&labels)),
            labels,
            indices,
            paired,
            plans: Some(plans),
            paired_plans,
            mix_plan,
        })
    }

    /// Makes a resident batch's images on the device from its plans, mixed as its mix plan
    /// says, in one kernel launch.
    fn resident_images(&self, res: &Resident, hb: &HostBatch) -> Result<(Tensor, Option<Tensor>)> {
        let pad = self.cfg.augment.crop_padding;
        let make = |plans: &[AugmentPlan], mix: Option<&BatchMix>| {
            augment_batch(&res.images, plans, mix, pad, &res.norm, DType::F32)
        };
        let Some(plans) = &hb.plans else {
            return Err(DataError::Invalid {
                field: "batch",
                message: "a resident loader got a batch without plans".into(),
            });
        };
        let mix = hb.mix_plan.as_ref().map(MixPlan::batch_mix);
        let images = make(plans, mix.as_ref())?;
        let paired = match (&hb.paired_plans, &hb.paired) {
            (Some(p), _) => Some(make(p, None)?),
            // A strong view is made on the host.
            (None, Some(p)) => {
                let (b, h, w) = (hb.labels.len(), self.split.height, self.split.width);
                Some(Tensor::from_slice(p, (b, 3, h, w), &self.device)?)
            }
            (None, None) => None,
        };
        Ok((images, paired))
    }

    /// Each sample's own position and its negatives ([`LoaderConfig::negatives`]), B×(1+K):
    /// K images of other classes, without replacement unless fewer exist (as RepDistiller's
    /// `CIFAR100InstanceSample`), from a stream keyed by the sample's place in the epoch.
    fn contrast(&self, epoch: u64, first: u64, indices: &[usize]) -> Option<Vec<u32>> {
        let k = self.cfg.negatives?;
        let ClassGroups {
            positions: grouped,
            bounds,
        } = &*self.grouped;
        let mut out = vec![0u32; indices.len() * (1 + k)];
        out.par_chunks_mut(1 + k)
            .zip(indices.par_iter())
            .enumerate()
            .for_each(|(pos, (row, &i))| {
                let (start, end) = bounds[self.split.labels[i] as usize];
                let mut rng =
                    sample_rng(self.cfg.seed, Stream::Negatives, epoch, first + pos as u64);
                row[0] = i as u32;
                let others = grouped.len() - (end - start);
                if others >= k {
                    let mut pool = [&grouped[..start], &grouped[end..]].concat();
                    let (chosen, _) = pool.partial_shuffle(&mut rng, k);
                    row[1..].copy_from_slice(chosen);
                } else {
                    for slot in &mut row[1..] {
                        let j = rand::Rng::gen_range(&mut rng, 0..others);
                        *slot = if j < start {
                            grouped[j]
                        } else {
                            grouped[j + end - start]
                        };
                    }
                }
            });
        Some(out)
    }

    /// Moves a host batch to the device.
    pub fn to_device(&self, hb: HostBatch) -> Result<Batch> {
        let b = hb.labels.len();
        let (h, w) = (self.split.height, self.split.width);
        let contrast = match &hb.contrast {
            Some(c) => Some(Tensor::from_slice(
                c,
                (b, c.len() / b.max(1)),
                &self.device,
            )?),
            None => None,
        };
        if let Some(res) = &self.resident {
            let (images, paired) = self.resident_images(res, &hb)?;
            let mix = match hb.mix {
                Some(m) => Some((Tensor::from_vec(m.labels_b, b, &self.device)?, m.lambda)),
                None => None,
            };
            return Ok(Batch {
                images,
                labels: Tensor::from_vec(hb.labels, b, &self.device)?,
                mix,
                indices: hb.indices,
                paired,
                contrast,
            });
        }
        let images = Tensor::from_vec(hb.images, (b, 3, h, w), &self.device)?;
        let labels = Tensor::from_vec(hb.labels, b, &self.device)?;
        let mix = match hb.mix {
            Some(m) => Some((Tensor::from_vec(m.labels_b, b, &self.device)?, m.lambda)),
            None => None,
        };
        let paired = match hb.paired {
            Some(p) => Some(Tensor::from_vec(p, (b, 3, h, w), &self.device)?),
            None => None,
        };
        Ok(Batch {
            images,
            labels,
            mix,
            indices: hb.indices,
            paired,
            contrast,
        })
    }

    /// The image paired with image `i` at position `pos` of `epoch`: itself (another view of
    /// it) or a same-class partner.
    fn paired_source(&self, pairing: Pairing, i: usize, epoch: u64, pos: u64) -> usize {
        match pairing {
            Pairing::SecondView | Pairing::StrongView => i,
            Pairing::SameClass => self.partner(i, epoch, pos),
        }
    }

    /// A random other image of `i`'s class for the sample at position `pos` of `epoch`.
    fn partner(&self, i: usize, epoch: u64, pos: u64) -> usize {
        let same = &self.by_class[self.split.labels[i] as usize];
        if same.len() < 2 {
            return i;
        }
        let mut rng = sample_rng(self.cfg.seed, Stream::Partner, epoch, pos);
        // Uniform over the class without `i`: draw among len − 1 and skip over `i`.
        let k = rand::Rng::gen_range(&mut rng, 0..same.len() - 1);
        let j = same[k];
        if j == i {
            same[same.len() - 1]
        } else {
            j
        }
    }

    /// Iterates over the batches of `epoch`, starting at batch `start` (for resuming mid-epoch).
    pub fn epoch(&self, epoch: u64, start: usize) -> EpochIter {
        let order = Arc::new(self.epoch_order(epoch));
        let total = self.num_batches();
        if self.cfg.prefetch == 0 {
            return EpochIter {
                loader: self.clone(),
                rx: None,
                handle: None,
                order,
                epoch,
                next: start,
                total,
            };
        }
        let (tx, rx) = bounded(self.cfg.prefetch);
        let me = self.clone();
        let ord = order.clone();
        let handle = std::thread::spawn(move || {
            for b in start..total {
                // A closed channel means the consumer stopped early: stop preparing.
                if tx.send(me.host_batch(epoch, b, &ord)).is_err() {
                    break;
                }
            }
        });
        EpochIter {
            loader: self.clone(),
            rx: Some(rx),
            handle: Some(handle),
            order,
            epoch,
            next: start,
            total,
        }
    }
}

/// The batches of one epoch; dropping it stops the background thread.
pub struct EpochIter {
    loader: Loader,
    rx: Option<Receiver<Result<HostBatch>>>,
    handle: Option<JoinHandle<()>>,
    order: Arc<Vec<usize>>,
    epoch: u64,
    next: usize,
    total: usize,
}

impl EpochIter {
    /// Index of the batch the next call returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let hb = match &self.rx {
            Some(rx) => rx.recv().ok()?,
            None => self.loader.host_batch(self.epoch, self.next, &self.order),
        };
        self.next += 1;
        Some(hb.and_then(|hb| self.loader.to_device(hb)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
