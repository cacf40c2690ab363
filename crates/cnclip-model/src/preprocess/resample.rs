//! Pillow's resampling, ported operation for operation so that the output bytes are identical.
//!
//! * [`resize_bicubic`]: `Image.resize(size, BICUBIC)` on 8-bit images (`ImagingResample` in
//!   Pillow 13.0's `Resample.c`, the 8-bits-per-channel path): separable, pass order as in
//!   [`pillow_horizontal_first`] (horizontal first over only the source rows the vertical pass
//!   reads, unless the height shrinks much more than the width), 22-bit
//!   fixed-point coefficients rounded away from zero, intermediate clipped to `u8`, antialiasing
//!   support `2 * max(in/out, 1)`. A pass is skipped when its dimension is unchanged, and an
//!   unchanged size is a plain copy.
//! * [`resize_bicubic_u16`]: the same for Pillow's `I;16` mode (16-bit grayscale PNG), which uses
//!   unquantised `f64` coefficients, round-half-away and a clip to `0..=65535`.
//! * [`resize_nearest`]: `Image.resize(size, NEAREST)` (what Pillow forces for modes `1` and `P`),
//!   i.e. `ImagingScaleAffine` with its running `f64` source coordinate.
//!
//! Pixel buffers are row-major and interleaved, `channels` bytes per pixel, no row padding.

/// Fixed-point precision of Pillow's 8-bit resampler (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel with `a = -0.5`, evaluated in the same operation order as the C code.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-index filter taps: first source index and tap count, plus `ksize` weights each.
struct Coeffs {
    ksize: usize,
    /// `(xmin, xmax)` per output index: the taps read `xmin .. xmin + xmax`.
    bounds: Vec<(usize, usize)>,
    /// Normalised `f64` weights, `ksize` per output index (unused tail is zero).
    weights: Vec<f64>,
}

/// `precompute_coeffs` of `Resample.c` for the bicubic filter (support 2).
///
/// `in0`/`in1` are the source box edges as Pillow stores them (`f32`); `in1 - in0` is computed in
/// `f32` and only then widened, as in C.
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = 2.0 * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0.0f64; out_size * ksize];
    let in_size_i = i64::try_from(in_size).unwrap_or(i64::MAX);
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C `(int)` casts truncate toward zero, as Rust's `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size_i) - xmin;
        let xmax = xmax.max(0);
        let k = &mut weights[xx * ksize..(xx + 1) * ksize];
        let mut ww = 0.0f64;
        for x in 0..xmax {
            let w = bicubic_filter((((x + xmin) as f64) - center + 0.5) * inv_filterscale);
            k[x as usize] = w;
            ww += w;
        }
        if ww != 0.0 {
            for w in k.iter_mut().take(xmax as usize) {
                *w /= ww;
            }
        }
        bounds.push((xmin as usize, xmax as usize));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// `normalize_coeffs_8bpc`: `(int)(k * 2^22 ± 0.5)`, rounding away from zero.
fn fixed_point(weights: &[f64]) -> Vec<i32> {
    let one = f64::from(1u32 << PRECISION_BITS);
    weights
        .iter()
        .map(|&k| {
            if k < 0.0 {
                (-0.5 + k * one) as i32
            } else {
                (0.5 + k * one) as i32
            }
        })
        .collect()
}

/// `clip8`: arithmetic shift by the precision, clamped to a byte.
#[inline(always)]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn horizontal_8bpc<const C: usize>(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    out_w: usize,
    co: &Coeffs,
    kk: &[i32],
) -> Vec<u8> {
    let mut out = vec![0u8; rows.len() * out_w * C];
    for (oy, y) in rows.enumerate() {
        let line_in = &src[y * src_w * C..(y + 1) * src_w * C];
        let line_out = &mut out[oy * out_w * C..(oy + 1) * out_w * C];
        for (xx, px) in line_out.chunks_exact_mut(C).enumerate() {
            let (xmin, xmax) = co.bounds[xx];
            let k = &kk[xx * co.ksize..xx * co.ksize + xmax];
            let taps = &line_in[xmin * C..(xmin + xmax) * C];
            let mut ss = [HALF; C];
            for (tap, &kx) in taps.chunks_exact(C).zip(k) {
                for c in 0..C {
                    ss[c] += i32::from(tap[c]) * kx;
                }
            }
            for c in 0..C {
                px[c] = clip8(ss[c]);
            }
        }
    }
    out
}

fn vertical_8bpc(
    src: &[u8],
    row_len: usize,
    out_h: usize,
    co: &Coeffs,
    kk: &[i32],
    row_offset: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_h * row_len];
    let mut acc = vec![0i32; row_len];
    for yy in 0..out_h {
        let (ymin, ymax) = co.bounds[yy];
        let ymin = ymin - row_offset;
        let k = &kk[yy * co.ksize..yy * co.ksize + ymax];
        acc.fill(HALF);
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(ymin + y) * row_len..(ymin + y + 1) * row_len];
            // Integer addition is associative, so summing row by row gives C's per-pixel sums.
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * ky;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow 13's pass order (`ImagingResampleInner`): the vertical pass runs first when the height
/// shrinks by more than twice as many pixels as the width does; otherwise horizontal first, over
/// only the source rows the vertical pass reads. (Pillow 12 and older always went horizontal
/// first; the order changes results through the intermediate `u8` clip.)
pub fn pillow_horizontal_first(width: usize, height: usize, out_w: usize, out_h: usize) -> bool {
    let dh = height as i64 - out_h as i64;
    let dw = width as i64 - out_w as i64;
    !(dh > 0 && dh > dw * 2)
}

fn resize_8bpc<const C: usize>(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let need_horizontal = out_w != width;
    let need_vertical = out_h != height;
    if !need_horizontal && !need_vertical {
        return src[..width * height * C].to_vec();
    }
    let vert = precompute_coeffs(height, 0.0, height as f32, out_h);
    let kkv = fixed_point(&vert.weights);
    let horizontal = |img: &[u8], rows: std::ops::Range<usize>| {
        let horiz = precompute_coeffs(width, 0.0, width as f32, out_w);
        let kkh = fixed_point(&horiz.weights);
        horizontal_8bpc::<C>(img, width, rows, out_w, &horiz, &kkh)
    };
    if pillow_horizontal_first(width, height, out_w, out_h) {
        let ybox_first = vert.bounds[0].0;
        let (last_min, last_len) = vert.bounds[out_h - 1];
        let ybox_last = last_min + last_len;
        if !need_vertical {
            return horizontal(src, 0..height);
        }
        if need_horizontal {
            let tmp = horizontal(src, ybox_first..ybox_last);
            vertical_8bpc(&tmp, out_w * C, out_h, &vert, &kkv, ybox_first)
        } else {
            vertical_8bpc(src, width * C, out_h, &vert, &kkv, 0)
        }
    } else {
        // Vertical first over the whole width, then horizontal over all output rows.
        let tmp = vertical_8bpc(src, width * C, out_h, &vert, &kkv, 0);
        if need_horizontal {
            horizontal(&tmp, 0..out_h)
        } else {
            tmp
        }
    }
}

/// The caller-bug checks every resize makes (the public resizes document that they panic on them):
/// no empty source or target, and a buffer holding `width * height * channels` samples.
fn assert_resize_args(
    len: usize,
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) {
    assert!(
        width > 0 && height > 0 && out_w > 0 && out_h > 0,
        "empty image in resize"
    );
    assert!(len >= width * height * channels, "pixel buffer too short");
}

/// Pillow's 8-bit `BICUBIC` resize of an interleaved image with 1 to 4 channels.
///
/// Channels are resampled independently (Pillow's premultiplication for `RGBA`/`LA` is the
/// caller's job: see [`super::DecodedImage::resize_rgb`]). Panics only on caller bugs: zero
/// dimensions, `channels` outside `1..=4`, or a buffer shorter than `width * height * channels`.
pub fn resize_bicubic(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_resize_args(src.len(), width, height, channels, out_w, out_h);
    match channels {
        1 => resize_8bpc::<1>(src, width, height, out_w, out_h),
        2 => resize_8bpc::<2>(src, width, height, out_w, out_h),
        3 => resize_8bpc::<3>(src, width, height, out_w, out_h),
        4 => resize_8bpc::<4>(src, width, height, out_w, out_h),
        _ => panic!("resize_bicubic supports 1 to 4 channels, got {channels}"),
    }
}

/// `ROUND_UP` then `CLIP16` of the 16-bit path.
#[inline(always)]
fn round_clip16(ss: f64) -> u16 {
    // `0.5F` is a float literal in C, exactly 0.5 in double.
    let v = if ss >= 0.0 { ss + 0.5 } else { ss - 0.5 } as i32;
    v.clamp(0, 65535) as u16
}

fn horizontal_16bpc(
    src: &[u16],
    width: usize,
    rows: std::ops::Range<usize>,
    out_w: usize,
    co: &Coeffs,
) -> Vec<u16> {
    let mut out = vec![0u16; rows.len() * out_w];
    for (oy, y) in rows.enumerate() {
        let line_in = &src[y * width..(y + 1) * width];
        for xx in 0..out_w {
            let (xmin, xmax) = co.bounds[xx];
            let k = &co.weights[xx * co.ksize..xx * co.ksize + xmax];
            let mut ss = 0.0f64;
            for (&p, &kx) in line_in[xmin..xmin + xmax].iter().zip(k) {
                ss += f64::from(p) * kx;
            }
            out[oy * out_w + xx] = round_clip16(ss);
        }
    }
    out
}

fn vertical_16bpc(
    src: &[u16],
    width: usize,
    out_h: usize,
    co: &Coeffs,
    row_offset: usize,
) -> Vec<u16> {
    let mut out = vec![0u16; out_h * width];
    for yy in 0..out_h {
        let (ymin, ymax) = co.bounds[yy];
        let ymin = ymin - row_offset;
        let k = &co.weights[yy * co.ksize..yy * co.ksize + ymax];
        for xx in 0..width {
            let mut ss = 0.0f64;
            for (y, &ky) in k.iter().enumerate() {
                ss += f64::from(src[(ymin + y) * width + xx]) * ky;
            }
            out[yy * width + xx] = round_clip16(ss);
        }
    }
    out
}

/// Pillow's `BICUBIC` resize of a single-channel 16-bit image (mode `I;16`).
pub fn resize_bicubic_u16(
    src: &[u16],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u16> {
    assert_resize_args(src.len(), width, height, 1, out_w, out_h);
    let need_horizontal = out_w != width;
    let need_vertical = out_h != height;
    if !need_horizontal && !need_vertical {
        return src[..width * height].to_vec();
    }
    let vert = precompute_coeffs(height, 0.0, height as f32, out_h);
    let horiz = precompute_coeffs(width, 0.0, width as f32, out_w);
    if pillow_horizontal_first(width, height, out_w, out_h) {
        if !need_vertical {
            return horizontal_16bpc(src, width, 0..height, out_w, &horiz);
        }
        if need_horizontal {
            let ybox_first = vert.bounds[0].0;
            let (last_min, last_len) = vert.bounds[out_h - 1];
            let tmp = horizontal_16bpc(src, width, ybox_first..last_min + last_len, out_w, &horiz);
            vertical_16bpc(&tmp, out_w, out_h, &vert, ybox_first)
        } else {
            vertical_16bpc(src, width, out_h, &vert, 0)
        }
    } else {
        let tmp = vertical_16bpc(src, width, out_h, &vert, 0);
        if need_horizontal {
            horizontal_16bpc(&tmp, width, 0..out_h, out_w, &horiz)
        } else {
            tmp
        }
    }
}

/// Source index per output index for Pillow's nearest-neighbour scale, `None` where Pillow leaves
/// the zero fill (never happens for a whole-image resize, kept for fidelity).
fn nearest_table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
    // a[0] = (double)(box[2] - box[0]) / xsize, the box edges being floats.
    let a = f64::from(in_size as f32 - 0.0f32) / out_size as f64;
    let mut o = a * 0.5;
    let mut table = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        // COORD(v): -1 for negative values, truncation otherwise.
        let i = if o < 0.0 { -1 } else { o as i64 };
        table.push(usize::try_from(i).ok().filter(|&i| i < in_size));
        o += a;
    }
    table
}

/// Pillow's `NEAREST` resize (`ImagingScaleAffine`), any channel count.
pub fn resize_nearest(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_resize_args(src.len(), width, height, channels, out_w, out_h);
    if width == out_w && height == out_h {
        return src[..width * height * channels].to_vec();
    }
    let xs = nearest_table(width, out_w);
    let ys = nearest_table(height, out_h);
    let c = channels;
    let mut out = vec![0u8; out_w * out_h * c];
    for (yy, sy) in ys.iter().enumerate() {
        let Some(sy) = *sy else { continue };
        let line_in = &src[sy * width * c..(sy + 1) * width * c];
        let line_out = &mut out[yy * out_w * c..(yy + 1) * out_w * c];
        for (xx, sx) in xs.iter().enumerate() {
            if let Some(sx) = *sx {
                line_out[xx * c..(xx + 1) * c].copy_from_slice(&line_in[sx * c..(sx + 1) * c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let src: Vec<u8> = (0..(5 * 4 * 3)).map(|v| (v * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic(&src, 5, 4, 3, 5, 4), src);
        assert_eq!(resize_nearest(&src, 5, 4, 3, 5, 4), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9];
        for (w, h) in [(3, 2), (40, 31), (13, 20), (1, 1)] {
            let out = resize_bicubic(&src, 13, 9, 1, w, h);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(500usize, 224usize), (37, 224), (224, 224), (3, 1)] {
            let co = precompute_coeffs(i, 0.0, i as f32, o);
            let kk = fixed_point(&co.weights);
            for xx in 0..o {
                let s: i64 = kk[xx * co.ksize..(xx + 1) * co.ksize]
                    .iter()
                    .map(|&k| i64::from(k))
                    .sum();
                assert!(
                    (s - (1 << 22)).abs() <= co.ksize as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn nearest_picks_centres() {
        assert_eq!(
            nearest_table(4, 2),
            vec![Some(1), Some(3)],
            "4->2 samples at 1 and 3"
        );
        assert_eq!(
            nearest_table(2, 4),
            vec![Some(0), Some(0), Some(1), Some(1)]
        );
    }
}
