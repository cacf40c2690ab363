//! timm's AutoAugment `'original'` policy (`auto_augment_policy_original`, timm 1.0.31) and its
//! magnitude-to-argument rules, with the hyper-parameters `create_transform` gives it in cn_clip:
//! no magnitude noise, magnitudes clamped to `[0, 10]`, BICUBIC, fill `(123, 117, 104)`.

use cnclip_model::preprocess::RgbImage;

use super::ops;

/// One AutoAugment operation, named as in timm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpName {
    PosterizeOriginal,
    Rotate,
    Solarize,
    AutoContrast,
    Equalize,
    Invert,
    Color,
    Contrast,
    Sharpness,
    ShearX,
}

impl OpName {
    /// Whether timm draws a random sign for the argument (`_randomly_negate`).
    pub fn has_sign(self) -> bool {
        matches!(self, OpName::Rotate | OpName::ShearX)
    }
}

/// `(op, probability, magnitude)` as written in timm's policy table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyOp {
    pub name: OpName,
    pub prob: f64,
    pub magnitude: u8,
}

const fn op(name: OpName, prob: f64, magnitude: u8) -> PolicyOp {
    PolicyOp {
        name,
        prob,
        magnitude,
    }
}

use OpName::{
    AutoContrast, Color, Contrast, Equalize, Invert, PosterizeOriginal, Rotate, Sharpness, ShearX,
    Solarize,
};

/// The 25 sub-policies of timm's `'original'` ImageNet policy, in timm's order (the order matters:
/// the sub-policy is `random.choice(policy)`, i.e. an index).
pub const ORIGINAL_POLICY: [[PolicyOp; 2]; 25] = [
    [op(PosterizeOriginal, 0.4, 8), op(Rotate, 0.6, 9)],
    [op(Solarize, 0.6, 5), op(AutoContrast, 0.6, 5)],
    [op(Equalize, 0.8, 8), op(Equalize, 0.6, 3)],
    [op(PosterizeOriginal, 0.6, 7), op(PosterizeOriginal, 0.6, 6)],
    [op(Equalize, 0.4, 7), op(Solarize, 0.2, 4)],
    [op(Equalize, 0.4, 4), op(Rotate, 0.8, 8)],
    [op(Solarize, 0.6, 3), op(Equalize, 0.6, 7)],
    [op(PosterizeOriginal, 0.8, 5), op(Equalize, 1.0, 2)],
    [op(Rotate, 0.2, 3), op(Solarize, 0.6, 8)],
    [op(Equalize, 0.6, 8), op(PosterizeOriginal, 0.4, 6)],
    [op(Rotate, 0.8, 8), op(Color, 0.4, 0)],
    [op(Rotate, 0.4, 9), op(Equalize, 0.6, 2)],
    [op(Equalize, 0.0, 7), op(Equalize, 0.8, 8)],
    [op(Invert, 0.6, 4), op(Equalize, 1.0, 8)],
    [op(Color, 0.6, 4), op(Contrast, 1.0, 8)],
    [op(Rotate, 0.8, 8), op(Color, 1.0, 2)],
    [op(Color, 0.8, 8), op(Solarize, 0.8, 7)],
    [op(Sharpness, 0.4, 7), op(Invert, 0.6, 8)],
    [op(ShearX, 0.6, 5), op(Equalize, 1.0, 9)],
    [op(Color, 0.4, 0), op(Equalize, 0.6, 3)],
    [op(Equalize, 0.4, 7), op(Solarize, 0.2, 4)],
    [op(Solarize, 0.6, 5), op(AutoContrast, 0.6, 5)],
    [op(Invert, 0.6, 4), op(Equalize, 1.0, 8)],
    [op(Color, 0.6, 4), op(Contrast, 1.0, 8)],
    [op(Equalize, 0.8, 8), op(Equalize, 0.6, 3)],
];

/// `AugmentOp.__call__`'s gate: the op is skipped when `prob < 1 and random() > prob`.
pub fn op_applies(prob: f64, u: f64) -> bool {
    !(prob < 1.0 && u > prob)
}

/// `_randomly_negate`: the argument is negated when `random() > 0.5`.
pub fn negates(u: f64) -> bool {
    u > 0.5
}

/// Applies one op at `magnitude` (clamped to `[0, 10]` as timm does) with the given sign,
/// converting the magnitude to the op's argument with timm's `LEVEL_TO_ARG` rule.
pub fn apply_op(img: &RgbImage, name: OpName, magnitude: f64, negate: bool) -> RgbImage {
    let level = magnitude.clamp(0.0, 10.0) / 10.0;
    let signed = |v: f64| if negate { -v } else { v };
    let enhance = level * 1.8 + 0.1;
    match name {
        OpName::PosterizeOriginal => {
            let bits = (level * 4.0) as u8 + 4;
            // timm's `posterize` returns the image untouched for 8 bits or more.
            if bits >= 8 {
                img.clone()
            } else {
                ops::posterize(img, bits)
            }
        }
        OpName::Rotate => ops::rotate(img, signed(level * 30.0), ops::FILL_COLOR),
        OpName::Solarize => ops::solarize(img, ((level * 256.0) as u32).min(256)),
        OpName::AutoContrast => ops::autocontrast(img),
        OpName::Equalize => ops::equalize(img),
        OpName::Invert => ops::invert(img),
        OpName::Color => ops::color(img, enhance),
        OpName::Contrast => ops::contrast(img, enhance),
        OpName::Sharpness => ops::sharpness(img, enhance),
        OpName::ShearX => ops::shear_x(img, signed(level * 0.3), ops::FILL_COLOR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_rules_match_timm_arithmetic() {
        // int(m/10*4)+4 for the magnitudes of the policy.
        for (m, bits) in [(5u8, 6u8), (6, 6), (7, 6), (8, 7)] {
            assert_eq!((f64::from(m) / 10.0 * 4.0) as u8 + 4, bits, "m={m}");
        }
        // min(256, int(m/10*256)).
        for (m, t) in [(3u8, 76u32), (4, 102), (5, 128), (7, 179), (8, 204)] {
            assert_eq!(((f64::from(m) / 10.0) * 256.0) as u32, t, "m={m}");
        }
        assert!(op_applies(1.0, 0.999));
        assert!(op_applies(0.6, 0.6));
        assert!(!op_applies(0.6, 0.6000001));
        assert!(!op_applies(0.0, 0.0000001));
        assert!(!negates(0.5));
        assert!(negates(0.5000001));
    }
}
