//! timm's `RandomResizedCropAndInterpolation.get_params`, with the draws given.

use super::{AugmentDraws, CROP_RATIO, CROP_SCALE};

/// A crop box in pixels: `img.crop((left, top, left + width, top + height))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

/// Python's `random.randint(0, n)` fed the unit uniform `u`: `floor(u * (n + 1))`, at most `n`.
fn randint_0(n: usize, u: f64) -> usize {
    ((u * (n as f64 + 1.0)) as usize).min(n)
}

/// Python 3's `int(round(v))` (ties to even), for non-negative `v`.
fn py_round(v: f64) -> usize {
    v.round_ties_even() as usize
}

/// The crop of timm's RandomResizedCrop for a `w`×`h` image (scale `(0.9, 1.0)`, ratio
/// `(3/4, 4/3)`), or `None` for an empty image.
///
/// Up to 10 attempts: target area `uniform(0.9, 1) * w * h`, aspect `exp(uniform(ln 3/4,
/// ln 4/3))`, `tw = round(sqrt(area * aspect))`, `th = round(sqrt(area / aspect))`; the first
/// that fits is placed at `(randint(0, w - tw), randint(0, h - th))`. If none fits: a centre crop
/// of the whole image, narrowed to the nearest allowed aspect ratio when the image's own ratio
/// is outside the range.
pub fn random_resized_crop_box(w: usize, h: usize, draws: &AugmentDraws) -> Option<CropBox> {
    if w == 0 || h == 0 {
        return None;
    }
    let area = (w as f64) * (h as f64);
    let log_ratio = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for a in &draws.crop_attempts {
        let target_area = (CROP_SCALE.0 + (CROP_SCALE.1 - CROP_SCALE.0) * a.scale_u) * area;
        let aspect = (log_ratio.0 + (log_ratio.1 - log_ratio.0) * a.log_ratio_u).exp();
        let tw = py_round((target_area * aspect).sqrt());
        let th = py_round((target_area / aspect).sqrt());
        // timm accepts a zero side only on images it could not crop anyway; keep boxes non-empty.
        if tw <= w && th <= h && tw > 0 && th > 0 {
            return Some(CropBox {
                top: randint_0(h - th, draws.crop_top_u),
                left: randint_0(w - tw, draws.crop_left_u),
                width: tw,
                height: th,
            });
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (tw, th) = if in_ratio < CROP_RATIO.0 {
        (w, py_round(w as f64 / CROP_RATIO.0))
    } else if in_ratio > CROP_RATIO.1 {
        (py_round(h as f64 * CROP_RATIO.1), h)
    } else {
        (w, h)
    };
    let (tw, th) = (tw.clamp(1, w), th.clamp(1, h));
    Some(CropBox {
        top: (h - th) / 2,
        left: (w - tw) / 2,
        width: tw,
        height: th,
    })
}

#[cfg(test)]
mod tests {
    use super::super::CropAttempt;
    use super::*;

    fn draws(scale_u: f64, log_ratio_u: f64) -> AugmentDraws {
        AugmentDraws {
            crop_attempts: [CropAttempt {
                scale_u,
                log_ratio_u,
            }; 10],
            crop_top_u: 0.999,
            crop_left_u: 0.0,
            flip: false,
            sub_policy: 0,
            op_apply_u: [1.0; 2],
            op_negate_u: [0.0; 2],
        }
    }

    #[test]
    fn python_rounding_and_randint() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(3.5), 4);
        assert_eq!(randint_0(4, 0.999_999), 4);
        assert_eq!(randint_0(4, 0.0), 0);
        assert_eq!(randint_0(0, 0.7), 0);
    }

    #[test]
    fn fitting_attempt_and_fallbacks() {
        // Square image, area fraction 0.9 + 0.1*0.5, ratio 1 (u = 0.5 is the log midpoint).
        let b = random_resized_crop_box(100, 100, &draws(0.5, 0.5)).unwrap();
        assert_eq!((b.width, b.height), (97, 97));
        assert_eq!((b.left, b.top), (0, 3));
        // A very wide image never fits a near-full-area crop of ratio <= 4/3: centre fallback.
        let b = random_resized_crop_box(300, 50, &draws(0.5, 0.5)).unwrap();
        assert_eq!(
            b,
            CropBox {
                left: 116,
                top: 0,
                width: 67,
                height: 50
            }
        );
        let b = random_resized_crop_box(40, 200, &draws(0.5, 0.5)).unwrap();
        assert_eq!(
            b,
            CropBox {
                left: 0,
                top: 73,
                width: 40,
                height: 53
            }
        );
        assert!(random_resized_crop_box(0, 5, &draws(0.5, 0.5)).is_none());
        let one = random_resized_crop_box(1, 1, &draws(0.0, 0.0)).unwrap();
        assert_eq!((one.width, one.height), (1, 1));
    }
}
