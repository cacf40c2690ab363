//! The pixel operations of timm's AutoAugment, as Pillow 13.0.0 computes them on 8-bit RGB.
//!
//! Each function is pure (input image in, new image out) and follows the Pillow code path that
//! timm 1.0.31 calls, including its integer/float types, its rounding (mostly truncation) and its
//! clamping, because a rounding difference here shifts a whole histogram bin or blend level.
//! Where Pillow computes in C `float`, so do we (`f32`); where it computes in C `double` or Python
//! `float`, we use `f64`, in the same order of operations.

use cnclip_model::preprocess::RgbImage;

/// The fill colour timm passes to rotate/shear: `round(255 * CLIP_MEAN)`.
pub const FILL_COLOR: [u8; 3] = [123, 117, 104];

/// Builds an image of the same size from `data` (same length by construction).
fn same_size(img: &RgbImage, data: Vec<u8>) -> RgbImage {
    match RgbImage::from_raw(img.width(), img.height(), data) {
        Some(out) => out,
        // Unreachable: every caller produces exactly width * height * 3 bytes.
        None => img.clone(),
    }
}

/// `image.point(lut)` with one 256-entry table per channel (Pillow's `_lut` for RGB).
fn apply_lut(img: &RgbImage, lut: &[[u8; 256]; 3]) -> RgbImage {
    let mut data = img.as_raw().to_vec();
    for px in data.chunks_exact_mut(3) {
        for (c, v) in px.iter_mut().enumerate() {
            *v = lut[c][usize::from(*v)];
        }
    }
    same_size(img, data)
}

/// `image.histogram()` of an RGB image: 256 counts per channel.
fn histogram(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in img.as_raw().chunks_exact(3) {
        for c in 0..3 {
            h[c][usize::from(px[c])] += 1;
        }
    }
    h
}

/// Pillow's `CLIP8` for lookup-table entries computed as Python ints.
fn clip8_int(v: i64) -> u8 {
    v.clamp(0, 255) as u8
}

/// `ImageOps.posterize(img, bits)`: keep the `bits` most significant bits.
///
/// Pillow refuses `bits` outside `1..=8`; here such values are clamped into that range so that a
/// bad argument cannot panic (timm's `PosterizeOriginal` only produces 4..=8, and skips 8).
pub fn posterize(img: &RgbImage, bits: u8) -> RgbImage {
    let bits = bits.clamp(1, 8);
    let mask = !((1u16 << (8 - bits)) - 1) as u8;
    let mut lut = [0u8; 256];
    for (i, v) in lut.iter_mut().enumerate() {
        *v = i as u8 & mask;
    }
    apply_lut(img, &[lut; 3])
}

/// `ImageOps.solarize(img, threshold)`: values `>= threshold` become `255 - v`.
pub fn solarize(img: &RgbImage, threshold: u32) -> RgbImage {
    let mut lut = [0u8; 256];
    for (i, v) in lut.iter_mut().enumerate() {
        *v = if (i as u32) < threshold {
            i as u8
        } else {
            255 - i as u8
        };
    }
    apply_lut(img, &[lut; 3])
}

/// `ImageOps.invert(img)`: `255 - v`.
pub fn invert(img: &RgbImage) -> RgbImage {
    let data = img.as_raw().iter().map(|&v| 255 - v).collect();
    same_size(img, data)
}

/// `ImageOps.autocontrast(img)` with its defaults (cutoff 0, no ignore, no mask): each channel
/// is stretched so its lowest used value maps to 0 and its highest to 255.
///
/// The table is `int(ix * scale + offset)` in Python floats (truncation), clamped to 0..=255.
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let h = histogram(img);
    let mut lut = [[0u8; 256]; 3];
    for c in 0..3 {
        let lo = h[c].iter().position(|&n| n != 0);
        let hi = h[c].iter().rposition(|&n| n != 0);
        // An empty channel: Python's loops end with lo = 255, hi = 0, i.e. "don't bother".
        let (lo, hi) = match (lo, hi) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => (255, 0),
        };
        if hi <= lo {
            for (i, v) in lut[c].iter_mut().enumerate() {
                *v = i as u8;
            }
        } else {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            for (i, v) in lut[c].iter_mut().enumerate() {
                // Python's int() truncates toward zero; `as i64` does too.
                *v = clip8_int((i as f64 * scale + offset) as i64);
            }
        }
    }
    apply_lut(img, &lut)
}

/// `ImageOps.equalize(img)`: per channel, Pillow's cumulative-histogram table
/// (`step = (total - count of the last used value) // 255`, entries `n // step` from `step // 2`),
/// clipped to 255 as `Image.point` does.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let h = histogram(img);
    let mut lut = [[0u8; 256]; 3];
    for c in 0..3 {
        let used: Vec<u64> = h[c].iter().copied().filter(|&n| n != 0).collect();
        let step = match used.last() {
            Some(&last) if used.len() > 1 => (used.iter().sum::<u64>() - last) / 255,
            _ => 0,
        };
        if step == 0 {
            for (i, v) in lut[c].iter_mut().enumerate() {
                *v = i as u8;
            }
        } else {
            let mut n = step / 2;
            for i in 0..256 {
                lut[c][i] = (n / step).min(255) as u8;
                n += h[c][i];
            }
        }
    }
    apply_lut(img, &lut)
}

/// `Image.blend(degenerate, image, factor)` (Pillow's `ImagingBlend`): `alpha` is a C `float`;
/// inside `[0, 1]` the result is truncated, outside it is clamped then truncated.
fn blend(degenerate: &[u8], image: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    if alpha == 0.0 {
        return same_size(image, degenerate.to_vec());
    }
    if alpha == 1.0 {
        return image.clone();
    }
    let interpolate = (0.0..=1.0).contains(&alpha);
    let data = degenerate
        .iter()
        .zip(image.as_raw())
        .map(|(&d, &s)| {
            let v = f32::from(d) + alpha * (i32::from(s) - i32::from(d)) as f32;
            if interpolate {
                v as u8
            } else if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            }
        })
        .collect();
    same_size(image, data)
}

/// Pillow's `RGB -> L`: ITU-R 601-2 luma in 16-bit fixed point, `(19595 R + 38470 G + 7471 B +
/// 0x8000) >> 16`.
fn luma(px: &[u8]) -> u8 {
    ((u32::from(px[0]) * 19595 + u32::from(px[1]) * 38470 + u32::from(px[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend with the grey (`L`, replicated) image.
pub fn color(img: &RgbImage, factor: f64) -> RgbImage {
    let grey: Vec<u8> = img
        .as_raw()
        .chunks_exact(3)
        .flat_map(|px| {
            let l = luma(px);
            [l, l, l]
        })
        .collect();
    blend(&grey, img, factor)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with a flat image of the mean luma,
/// `int(mean + 0.5)` where the mean of the `L` conversion is a Python float division.
pub fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let n = img.as_raw().len() / 3;
    let sum: u64 = img
        .as_raw()
        .chunks_exact(3)
        .map(|px| u64::from(luma(px)))
        .sum();
    let mean = if n == 0 { 0.0 } else { sum as f64 / n as f64 };
    let m = (mean + 0.5) as u8;
    let flat = vec![m; img.as_raw().len()];
    blend(&flat, img, factor)
}

/// `img.filter(ImageFilter.SMOOTH)`: Pillow's 3×3 float kernel `[1 1 1; 1 5 1; 1 1 1] / 13`
/// (weights divided in `float`), accumulated from `0.5` in `float` and truncated; the border
/// rows and columns are copied unchanged, and images smaller than 3×3 are copied whole.
pub fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let src = img.as_raw();
    let mut out = src.to_vec();
    if w < 3 || h < 3 {
        return img.clone();
    }
    let k1 = 1.0f32 / 13.0f32;
    let k5 = 5.0f32 / 13.0f32;
    let row = |y: usize| &src[y * w * 3..(y + 1) * w * 3];
    for y in 1..h - 1 {
        let (up, mid, down) = (row(y - 1), row(y), row(y + 1));
        for x in 1..w - 1 {
            for c in 0..3 {
                let i = x * 3 + c;
                let k3 = |r: &[u8], centre: f32| {
                    f32::from(r[i - 3]) * k1 + f32::from(r[i]) * centre + f32::from(r[i + 3]) * k1
                };
                // Pillow sums the row below first (kernel[0..3]), then the row, then the one above.
                let mut ss = 0.5f32;
                ss += k3(down, k1);
                ss += k3(mid, k5);
                ss += k3(up, k1);
                out[y * w * 3 + i] = ss.clamp(0.0, 255.0) as u8;
            }
        }
    }
    same_size(img, out)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend with [`smooth`]`(img)`.
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let degenerate = smooth(img);
    blend(degenerate.as_raw(), img, factor)
}

/// `img.transpose(FLIP_LEFT_RIGHT)`.
pub fn hflip(img: &RgbImage) -> RgbImage {
    let w = img.width();
    let mut data = Vec::with_capacity(img.as_raw().len());
    if w > 0 {
        for row in img.as_raw().chunks_exact(w * 3) {
            for px in row.chunks_exact(3).rev() {
                data.extend_from_slice(px);
            }
        }
    }
    same_size(img, data)
}

/// Pillow's `FLOOR` macro of the transform filters.
fn floor_i(v: f64) -> i64 {
    v.floor() as i64
}

/// The cubic of Pillow's transform filters (`BICUBIC` in `Geometry.c`, the `a = -1` kernel),
/// with the same association of operations.
#[inline(always)]
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// `img.transform(img.size, AFFINE, a, BICUBIC, fillcolor=fill)` (Pillow's
/// `ImagingGenericTransform` with `bicubic_filter32RGB`).
///
/// For output pixel `(x, y)` the source point is `a0 (x+½) + a1 (y+½) + a2`,
/// `a3 (x+½) + a4 (y+½) + a5`; points outside `[0, w) × [0, h)` (or not finite) keep `fill`.
/// The 4×4 neighbourhood clamps columns at the borders, clamps the first row, and repeats the
/// previous row's value for rows past the bottom, exactly as the C macros do; the result is
/// clamped to 0..=255 and truncated.
pub fn affine_bicubic(img: &RgbImage, a: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let src = img.as_raw();
    let mut out = Vec::with_capacity(src.len());
    let (wf, hf) = (w as f64, h as f64);
    let (wi, hi) = (w as i64, h as i64);
    let xclip = |x: i64| x.clamp(0, wi - 1) as usize;
    for y in 0..h {
        let yin = y as f64 + 0.5;
        for x in 0..w {
            let xin = x as f64 + 0.5;
            let xx = a[0] * xin + a[1] * yin + a[2];
            let yy = a[3] * xin + a[4] * yin + a[5];
            // `!(v >= 0.0)` also sends NaN outside (C's comparisons would let it through).
            if !(xx >= 0.0 && xx < wf && yy >= 0.0 && yy < hf) {
                out.extend_from_slice(&fill);
                continue;
            }
            let (xx, yy) = (xx - 0.5, yy - 0.5);
            let (xf, yf) = (floor_i(xx), floor_i(yy));
            let (dx, dy) = (xx - xf as f64, yy - yf as f64);
            let (x0, y0) = (xf - 1, yf - 1);
            let cols = [xclip(x0), xclip(x0 + 1), xclip(x0 + 2), xclip(x0 + 3)];
            // Rows past the bottom repeat the previous row's value, i.e. reuse its index.
            let mut rows = [y0.clamp(0, hi - 1) as usize; 4];
            for k in 1..4 {
                let r = y0 + k as i64;
                rows[k] = if r >= 0 && r < hi {
                    r as usize
                } else {
                    rows[k - 1]
                };
            }
            let mut v = [[0f64; 3]; 4];
            for (vk, &r) in v.iter_mut().zip(&rows) {
                let row = &src[r * w * 3..(r + 1) * w * 3];
                let p = [
                    &row[cols[0] * 3..cols[0] * 3 + 3],
                    &row[cols[1] * 3..cols[1] * 3 + 3],
                    &row[cols[2] * 3..cols[2] * 3 + 3],
                    &row[cols[3] * 3..cols[3] * 3 + 3],
                ];
                for c in 0..3 {
                    vk[c] = cubic(
                        f64::from(p[0][c]),
                        f64::from(p[1][c]),
                        f64::from(p[2][c]),
                        f64::from(p[3][c]),
                        dx,
                    );
                }
            }
            let [v1, v2, v3, v4] = v;
            for (((&a, &b), &c), &d) in v1.iter().zip(&v2).zip(&v3).zip(&v4) {
                let r = cubic(a, b, c, d, dy);
                out.push(if r <= 0.0 {
                    0
                } else if r >= 255.0 {
                    255
                } else {
                    r as u8
                });
            }
        }
    }
    same_size(img, out)
}

/// Python's `float % float` (the result takes the divisor's sign).
fn py_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && ((r < 0.0) != (b < 0.0)) {
        r + b
    } else if r == 0.0 {
        0.0f64.copysign(b)
    } else {
        r
    }
}

/// Python's `round(v, 15)`: correctly rounded to 15 decimals (decimal string round trip).
fn round15(v: f64) -> f64 {
    format!("{v:.15}").parse().unwrap_or(v)
}

/// `img.transpose(ROTATE_90 / ROTATE_180 / ROTATE_270)`: counter-clockwise quarter turns.
fn quarter_turns(img: &RgbImage, turns: u8) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let src = img.as_raw();
    let (ow, oh) = if turns == 2 { (w, h) } else { (h, w) };
    let mut data = Vec::with_capacity(src.len());
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = match turns {
                1 => (w - 1 - y, x),
                2 => (w - 1 - x, h - 1 - y),
                _ => (y, h - 1 - x),
            };
            let i = (sy * w + sx) * 3;
            data.extend_from_slice(&src[i..i + 3]);
        }
    }
    RgbImage::from_raw(ow, oh, data).unwrap_or_else(|| img.clone())
}

/// `img.rotate(degrees, resample=BICUBIC, fillcolor=fill)` (counter-clockwise, about the
/// centre, same size), including Pillow's shortcuts: 0° is a copy, 180° (and 90°/270° on square
/// images) a transpose; otherwise the inverse matrix is built as `Image.rotate` builds it
/// (`-radians`, cos/sin rounded to 15 decimals, centre `(w/2, h/2)`) and applied with
/// [`affine_bicubic`].
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let angle = py_mod(degrees, 360.0);
    let square = img.width() == img.height();
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return quarter_turns(img, 2);
    }
    if square && angle == 90.0 {
        return quarter_turns(img, 1);
    }
    if square && angle == 270.0 {
        return quarter_turns(img, 3);
    }
    let (cx, cy) = (img.width() as f64 / 2.0, img.height() as f64 / 2.0);
    let rad = -angle.to_radians();
    let mut m = [
        round15(rad.cos()),
        round15(rad.sin()),
        0.0,
        round15(-rad.sin()),
        round15(rad.cos()),
        0.0,
    ];
    // Python: `a * x + b * y + c` with c = 0.0; addition commutes exactly.
    m[2] += m[0] * -cx + m[1] * -cy;
    m[5] += m[3] * -cx + m[4] * -cy;
    m[2] += cx;
    m[5] += cy;
    affine_bicubic(img, m, fill)
}

/// timm's `shear_x`: `img.transform(size, AFFINE, (1, factor, 0, 0, 1, 0), BICUBIC, fillcolor)`.
pub fn shear_x(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    affine_bicubic(img, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> u8) -> RgbImage {
        let mut d = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    d.push(f(x, y, c));
                }
            }
        }
        RgbImage::from_raw(w, h, d).unwrap()
    }

    #[test]
    fn python_modulo_and_rounding() {
        assert_eq!(py_mod(-27.0, 360.0), 333.0);
        assert_eq!(py_mod(27.0, 360.0), 27.0);
        assert_eq!(py_mod(-360.0, 360.0), 0.0);
        assert_eq!(round15(0.123_456_789_012_345_6), 0.123456789012346);
    }

    #[test]
    fn quarter_turns_compose_to_identity() {
        let a = img(5, 3, |x, y, c| (x * 31 + y * 7 + c) as u8);
        let r = quarter_turns(&quarter_turns(&a, 1), 3);
        assert_eq!(r, a);
        assert_eq!(quarter_turns(&quarter_turns(&a, 2), 2), a);
        assert_eq!(hflip(&hflip(&a)), a);
        assert_ne!(hflip(&a), a);
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let one = img(1, 1, |_, _, c| 10 * c as u8);
        for f in [
            autocontrast,
            equalize,
            invert,
            smooth,
            hflip,
            |i: &RgbImage| rotate(i, 27.0, FILL_COLOR),
            |i: &RgbImage| shear_x(i, 0.15, FILL_COLOR),
            |i: &RgbImage| contrast(i, 1.54),
            |i: &RgbImage| sharpness(i, 1.36),
        ] {
            assert_eq!(f(&one).as_raw().len(), 3);
        }
        let nan = rotate(&one, f64::NAN, FILL_COLOR);
        assert_eq!(nan.as_raw(), &FILL_COLOR);
        assert_eq!(posterize(&one, 0).as_raw(), posterize(&one, 1).as_raw());
    }
}
