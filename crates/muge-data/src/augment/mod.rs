//! cn_clip's training augmentation (`--use-augment`), reproducible per sample.
//!
//! cn_clip 1.6.0 builds its training transform with timm 1.0.31's `create_transform(S,
//! scale=(0.9, 1.0), auto_augment='original', interpolation='bicubic', ...)` and inserts
//! `convert('RGB')` after the flip:
//!
//! ```text
//! RandomResizedCropAndInterpolation(S, scale=(0.9,1), ratio=(3/4,4/3), BICUBIC)
//!   -> RandomHorizontalFlip(0.5) -> convert('RGB') -> AutoAugment('original')
//!   -> ToTensor -> Normalize(CLIP mean, std)
//! ```
//!
//! [`TrainTransform`] computes the same pixels. The crop and its resize run in the image's own
//! Pillow mode (through [`DecodedImage::crop`] and [`DecodedImage::resize_rgb`], the Pillow-exact
//! resampler of `cnclip-model`), the AutoAugment ops are ports of Pillow 13.0.0 ([`ops`]), and
//! normalisation is `cnclip-model`'s ([`RgbImage::normalize_into`]), applied by the loader.
//!
//! # Randomness
//!
//! cn_clip draws from Python's global `random` and torch's RNG, so its augmentation is not
//! reproducible. Here every random decision of one sample is drawn up front into a plain
//! [`AugmentDraws`] from a ChaCha8 stream keyed by (run seed, epoch, sample index, transform
//! stream), so a sample gets the same pixels whatever the thread count or order. The *values*
//! differ from Python's stream, but the distribution is the same: each draw is used exactly as
//! timm uses its counterpart (`random.uniform`, `random.randint`, `random.choice`,
//! `random.random() > p`, `torch.rand(1) < 0.5`), and for the same draws the output equals
//! timm's (tested against fixtures recorded by replaying the draws into timm).

mod crop;
pub mod offline;
pub mod ops;
pub mod policy;

use cnclip_model::preprocess::{DecodedImage, PreprocessError, RgbImage};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

pub use crop::{CropBox, random_resized_crop_box};
pub use offline::{
    AugmentedImages, OfflineError, OfflineImage, OfflinePolicy, OfflineSummary, QueryImages,
    multiply_rare_images, multiply_rare_images_in_files,
};
pub use policy::{ORIGINAL_POLICY, OpName, PolicyOp};

use crate::loader::{ImageTransform, SampleKey};

/// timm's RandomResizedCrop scale range, as cn_clip sets it.
pub const CROP_SCALE: (f64, f64) = (0.9, 1.0);
/// timm's RandomResizedCrop aspect-ratio range (its default).
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// RandomResizedCrop's number of attempts before the centre-crop fallback.
pub const CROP_ATTEMPTS: usize = 10;

/// Why an image could not be augmented.
#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    #[error("invalid augmentation output size {0}: it must be at least 1")]
    InvalidSize(u32),
    #[error("image is empty ({width}x{height}): nothing to crop")]
    EmptyImage { width: usize, height: usize },
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error("image {id}: encoding the augmented copy as JPEG failed: {reason}")]
    Encode { id: i64, reason: String },
    #[error("image {id} cannot be decoded: {error}")]
    Decode {
        id: i64,
        #[source]
        error: PreprocessError,
    },
}

/// One RandomResizedCrop attempt: the two `random.uniform` draws, as unit uniforms `u` in
/// `[0, 1)` (timm's value is `lo + (hi - lo) * u`, which is how Python's `uniform` computes it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CropAttempt {
    /// Area fraction draw: `target_area = (0.9 + 0.1 * u) * w * h`.
    pub scale_u: f64,
    /// Log aspect ratio draw: `ratio = exp(ln(3/4) + (ln(4/3) - ln(3/4)) * u)`.
    pub log_ratio_u: f64,
}

/// Every random decision of one sample's training transform, drawn before any pixel work.
///
/// All fields are consumed as timm consumes its draws, so tests can fix them and replay them into
/// timm. Unit uniforms are in `[0, 1)`.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentDraws {
    /// The 10 crop attempts (used in order until one fits).
    pub crop_attempts: [CropAttempt; CROP_ATTEMPTS],
    /// `random.randint(0, h - th)` as `floor(u * (h - th + 1))`.
    pub crop_top_u: f64,
    /// `random.randint(0, w - tw)` as `floor(u * (w - tw + 1))`.
    pub crop_left_u: f64,
    /// `torch.rand(1) < 0.5`.
    pub flip: bool,
    /// `random.choice(policy)`: index into [`ORIGINAL_POLICY`] (taken modulo 25).
    pub sub_policy: usize,
    /// Per op of the sub-policy: applied unless `prob < 1 and u > prob`.
    pub op_apply_u: [f64; 2],
    /// Per op (Rotate, ShearX only): the argument is negated when `u > 0.5`.
    pub op_negate_u: [f64; 2],
}

/// A unit uniform with 53 random bits, as Python's `random.random()` builds it.
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

impl AugmentDraws {
    /// Draws from `rng` in a fixed order and a fixed count (23 words), whatever the image, so
    /// that a key always maps to the same draws.
    pub fn sample(rng: &mut ChaCha8Rng) -> AugmentDraws {
        let mut crop_attempts = [CropAttempt::default(); CROP_ATTEMPTS];
        for a in &mut crop_attempts {
            a.scale_u = unit(rng);
            a.log_ratio_u = unit(rng);
        }
        let crop_top_u = unit(rng);
        let crop_left_u = unit(rng);
        let flip = unit(rng) < 0.5;
        let sub_policy =
            ((unit(rng) * ORIGINAL_POLICY.len() as f64) as usize).min(ORIGINAL_POLICY.len() - 1);
        let op_apply_u = [unit(rng), unit(rng)];
        let op_negate_u = [unit(rng), unit(rng)];
        AugmentDraws {
            crop_attempts,
            crop_top_u,
            crop_left_u,
            flip,
            sub_policy,
            op_apply_u,
            op_negate_u,
        }
    }

    /// The draws of one sample: a ChaCha8 stream whose 256-bit key is the four words
    /// `(key.seed, key.epoch, key.index, stream)`, so distinct keys never share a stream and no
    /// state is carried between samples.
    pub fn for_key(key: SampleKey, stream: u64) -> AugmentDraws {
        let mut seed = [0u8; 32];
        for (chunk, word) in seed
            .chunks_exact_mut(8)
            .zip([key.seed, key.epoch, key.index, stream])
        {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        AugmentDraws::sample(&mut ChaCha8Rng::from_seed(seed))
    }
}

/// AutoAugment `'original'` on an RGB image with the given draws (sub-policy, then its two ops
/// in order, each gated by its probability).
pub fn auto_augment(img: &RgbImage, draws: &AugmentDraws) -> RgbImage {
    let sub = &ORIGINAL_POLICY[draws.sub_policy % ORIGINAL_POLICY.len()];
    let mut out = img.clone();
    for (k, op) in sub.iter().enumerate() {
        if !policy::op_applies(op.prob, draws.op_apply_u[k]) {
            continue;
        }
        let negate = op.name.has_sign() && policy::negates(draws.op_negate_u[k]);
        out = policy::apply_op(&out, op.name, f64::from(op.magnitude), negate);
    }
    out
}

/// The whole pixel pipeline for fixed draws: crop box, crop + bicubic resize to `size`×`size` in
/// the image's mode, `convert('RGB')`, flip, AutoAugment. (The flip is done after the RGB
/// conversion here; both are per-pixel/per-position, so the order does not change the result.)
pub fn augment_with_draws(
    image: &DecodedImage,
    size: u32,
    draws: &AugmentDraws,
) -> Result<RgbImage, AugmentError> {
    if size == 0 {
        return Err(AugmentError::InvalidSize(size));
    }
    let (w, h) = (image.width(), image.height());
    let b = random_resized_crop_box(w, h, draws).ok_or(AugmentError::EmptyImage {
        width: w,
        height: h,
    })?;
    let s = size as usize;
    let cropped = image
        .crop(b.left, b.top, b.width, b.height)
        .ok_or(AugmentError::EmptyImage {
            width: w,
            height: h,
        })?;
    let mut rgb = cropped.resize_rgb(s, s)?;
    if draws.flip {
        rgb = ops::hflip(&rgb);
    }
    Ok(auto_augment(&rgb, draws))
}

/// cn_clip's training transform with `--use-augment`, returning the `size`×`size` RGB image
/// before ToTensor/Normalize (the loader normalises).
///
/// `seed` selects an augmentation stream on top of the [`SampleKey`]'s run seed: 0 for the
/// online transform; [`offline`] uses its own so that offline copies never repeat the online
/// draws of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainTransform {
    pub size: u32,
    pub seed: u64,
}

impl TrainTransform {
    /// A transform to `size`×`size` on stream `seed`; `size` must be at least 1.
    pub fn new(size: u32, seed: u64) -> Result<TrainTransform, AugmentError> {
        if size == 0 {
            return Err(AugmentError::InvalidSize(size));
        }
        Ok(TrainTransform { size, seed })
    }

    /// The draws this transform uses for `key`.
    pub fn draws(&self, key: SampleKey) -> AugmentDraws {
        AugmentDraws::for_key(key, self.seed)
    }

    /// The augmented `size`×`size` RGB image of `image` for `key`; the same key always gives the
    /// same pixels.
    pub fn apply(&self, image: &DecodedImage, key: SampleKey) -> Result<RgbImage, AugmentError> {
        augment_with_draws(image, self.size, &self.draws(key))
    }

    /// [`Self::apply`], then ToTensor + Normalize: the `[3, S, S]` float32 tensor cn_clip's
    /// training transform returns.
    pub fn apply_normalized(
        &self,
        image: &DecodedImage,
        key: SampleKey,
    ) -> Result<tch::Tensor, AugmentError> {
        Ok(self.apply(image, key)?.to_normalized_tensor()?)
    }
}

impl ImageTransform for TrainTransform {
    type Error = AugmentError;

    fn output_size(&self) -> (usize, usize) {
        (self.size as usize, self.size as usize)
    }

    fn apply(&self, image: &DecodedImage, sample: SampleKey) -> Result<RgbImage, AugmentError> {
        TrainTransform::apply(self, image, sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u64, epoch: u64, index: u64) -> SampleKey {
        SampleKey { seed, epoch, index }
    }

    #[test]
    fn draws_depend_only_on_the_key() {
        let a = AugmentDraws::for_key(key(1, 2, 3), 0);
        assert_eq!(a, AugmentDraws::for_key(key(1, 2, 3), 0));
        for other in [key(2, 2, 3), key(1, 3, 3), key(1, 2, 4)] {
            assert_ne!(a, AugmentDraws::for_key(other, 0));
        }
        assert_ne!(a, AugmentDraws::for_key(key(1, 2, 3), 1));
    }

    #[test]
    fn draws_have_timm_distribution() {
        // Frequencies over many keys: flip ~ 1/2, every sub-policy ~ 1/25, uniforms in [0, 1).
        let n = 20_000u64;
        let mut flips = 0;
        let mut subs = [0u32; 25];
        let mut mean = 0.0;
        for i in 0..n {
            let d = AugmentDraws::for_key(key(7, 0, i), 0);
            flips += u32::from(d.flip);
            subs[d.sub_policy] += 1;
            for a in d.crop_attempts {
                assert!((0.0..1.0).contains(&a.scale_u) && (0.0..1.0).contains(&a.log_ratio_u));
                mean += a.scale_u;
            }
        }
        let mean = mean / (n as f64 * CROP_ATTEMPTS as f64);
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((f64::from(flips) / n as f64 - 0.5).abs() < 0.02, "{flips}");
        for (i, &c) in subs.iter().enumerate() {
            let p = f64::from(c) / n as f64;
            assert!((p - 0.04).abs() < 0.01, "sub-policy {i}: {p}");
        }
    }
}
