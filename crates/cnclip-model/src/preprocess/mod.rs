//! Image preprocessing that reproduces cn_clip 1.6.0's `image_transform(S)` pixel for pixel.
//!
//! ```text
//! Resize((S, S), BICUBIC)  ->  convert('RGB')  ->  ToTensor  ->  Normalize(CLIP mean, std)
//! ```
//!
//! * [`decode`] opens a file the way Pillow does and keeps Pillow's *mode* (`L`, `LA`, `RGB`,
//!   `RGBA`, `P`, `1`, `CMYK`, `I;16`), because Pillow's resize depends on it: `P` and `1` are
//!   resized with NEAREST, `RGBA`/`LA` are premultiplied around the resize, `L` is resized as one
//!   channel, and the conversion to RGB happens after the resize.
//! * [`resize_bicubic`] / [`resize_nearest`] are exact ports of Pillow's 8-bit resamplers (any
//!   size to any size), reused by augmentation.
//! * [`Preprocessor`] turns bytes or files into the `[3,S,S]` float tensor (or `[N,3,S,S]` for a
//!   batch, decoded in parallel), and exposes the `u8` RGB image before normalisation.
//!
//! Exactness per format and mode is documented in `docs/PREPROCESSING.md`.

mod decode;
mod jpeg_simd;
mod resample;

use std::path::Path;

use rayon::prelude::*;
use tch::Tensor;

pub use decode::{Format, MAX_PIXELS, decode_named, tiff_dimensions};
pub use jpeg_simd::jpeg_simd_enabled;
pub use resample::{pillow_horizontal_first, resize_bicubic, resize_bicubic_u16, resize_nearest};

/// CLIP's per-channel mean (RGB), as cn_clip writes it in Python (exported model configs record
/// these decimals).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN_F64: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel standard deviation (RGB), as cn_clip writes it.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD_F64: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// [`CLIP_MEAN_F64`] rounded to float32, as torch rounds the Python floats `Normalize` gets.
pub const CLIP_MEAN: [f32; 3] = [
    CLIP_MEAN_F64[0] as f32,
    CLIP_MEAN_F64[1] as f32,
    CLIP_MEAN_F64[2] as f32,
];
/// [`CLIP_STD_F64`] rounded to float32.
pub const CLIP_STD: [f32; 3] = [
    CLIP_STD_F64[0] as f32,
    CLIP_STD_F64[1] as f32,
    CLIP_STD_F64[2] as f32,
];

/// Why an image could not be preprocessed. `id` is the path or the caller-given id.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("image {id} cannot be read: {error}")]
    Read {
        id: String,
        #[source]
        error: std::io::Error,
    },
    #[error("image {id} is empty (0 bytes)")]
    Empty { id: String },
    #[error("image {id} is not a JPEG, PNG, WebP, GIF or BMP file (it starts with bytes {magic})")]
    UnknownFormat { id: String, magic: String },
    #[error("image {id} does not decode as {format}: {reason}")]
    Decode {
        id: String,
        format: &'static str,
        reason: String,
    },
    #[error("image {id} is truncated: its {format} data ends before the image is complete")]
    Truncated { id: String, format: &'static str },
    #[error("image {id} is an unsupported kind of {format}: {reason}")]
    Unsupported {
        id: String,
        format: &'static str,
        reason: String,
    },
    #[error("image {id} is too large: {width}x{height} exceeds {limit} pixels")]
    TooLarge {
        id: String,
        width: u64,
        height: u64,
        limit: u64,
    },
    #[error("invalid target size {width}x{height}: both sides must be at least 1")]
    InvalidSize { width: usize, height: usize },
    #[error("building the image tensor failed: {0}")]
    Tensor(#[from] tch::TchError),
}

/// The Pillow mode an image opens as; it decides how Pillow resizes and converts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Bilevel (1-bit PNG, black/white BMP): stored as 0/255 bytes, resized with NEAREST.
    One,
    /// 8-bit grayscale.
    L,
    /// Grayscale with alpha: premultiplied around the resize.
    La,
    /// Palette (PNG-8, GIF, palette BMP): stored palette-expanded as RGB, resized with NEAREST
    /// (which only selects pixels, so expanding first is the same as Pillow's expand after).
    P,
    /// 8-bit RGB.
    Rgb,
    /// RGB with alpha: premultiplied around the resize; alpha is dropped, not composited.
    Rgba,
    /// 4-layer JPEG: resized in CMYK, then Pillow's `cmyk2rgb`.
    Cmyk,
    /// 16-bit grayscale PNG (`I;16`): 16-bit resize, then Pillow clips values above 255.
    I16,
}

impl Mode {
    /// Pillow's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            Mode::One => "1",
            Mode::L => "L",
            Mode::La => "LA",
            Mode::P => "P",
            Mode::Rgb => "RGB",
            Mode::Rgba => "RGBA",
            Mode::Cmyk => "CMYK",
            Mode::I16 => "I;16",
        }
    }

    /// Interleaved samples per pixel in [`DecodedImage`]'s storage.
    pub fn channels(self) -> usize {
        match self {
            Mode::One | Mode::L | Mode::I16 => 1,
            Mode::La => 2,
            Mode::P | Mode::Rgb => 3,
            Mode::Rgba | Mode::Cmyk => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pixels {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

/// A decoded image: Pillow mode, size and interleaved pixels (see [`Mode`] for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    mode: Mode,
    width: usize,
    height: usize,
    pixels: Pixels,
}

/// Decodes an in-memory image file (format sniffed from its bytes, as Pillow does).
pub fn decode(bytes: &[u8]) -> Result<DecodedImage, PreprocessError> {
    decode_named(bytes, "<bytes>")
}

/// Reads and decodes an image file; errors name the path.
pub fn decode_file(path: impl AsRef<Path>) -> Result<DecodedImage, PreprocessError> {
    let path = path.as_ref();
    let id = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| PreprocessError::Read {
        id: id.clone(),
        error,
    })?;
    decode_named(&bytes, &id)
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, without a division.
#[inline(always)]
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// `RGBA -> RGBa` / `LA -> La`: colour channels multiplied by alpha (the last channel).
fn premultiply(px: &[u8], channels: usize) -> Vec<u8> {
    let mut out = px.to_vec();
    for p in out.chunks_exact_mut(channels) {
        let a = p[channels - 1];
        for v in &mut p[..channels - 1] {
            *v = muldiv255(*v, a);
        }
    }
    out
}

/// `RGBa -> RGBA` / `La -> LA`: divide by alpha unless alpha is 0 or 255.
fn unpremultiply(px: &mut [u8], channels: usize) {
    for p in px.chunks_exact_mut(channels) {
        let a = u32::from(p[channels - 1]);
        if a == 0 || a == 255 {
            continue;
        }
        for v in &mut p[..channels - 1] {
            *v = ((255 * u32::from(*v)) / a).min(255) as u8;
        }
    }
}

/// Pillow's `convert('RGB')` of interleaved 8-bit pixels in `mode`.
fn to_rgb(mode: Mode, px: &[u8]) -> Vec<u8> {
    match mode {
        Mode::One | Mode::L | Mode::I16 => px.iter().flat_map(|&v| [v, v, v]).collect(),
        Mode::La => px
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        Mode::P | Mode::Rgb => px.to_vec(),
        Mode::Rgba => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        Mode::Cmyk => px
            .chunks_exact(4)
            .flat_map(|p| {
                let nk = 255 - p[3];
                [
                    nk.saturating_sub(muldiv255(p[0], nk)),
                    nk.saturating_sub(muldiv255(p[1], nk)),
                    nk.saturating_sub(muldiv255(p[2], nk)),
                ]
            })
            .collect(),
    }
}

impl DecodedImage {
    fn new(mode: Mode, width: usize, height: usize, pixels: Pixels) -> Self {
        DecodedImage {
            mode,
            width,
            height,
            pixels,
        }
    }

    /// The Pillow mode the file opens as.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Interleaved 8-bit samples ([`Mode::channels`] per pixel); `None` for [`Mode::I16`].
    pub fn samples_u8(&self) -> Option<&[u8]> {
        match &self.pixels {
            Pixels::U8(v) => Some(v),
            Pixels::U16(_) => None,
        }
    }

    /// 16-bit samples of an [`Mode::I16`] image.
    pub fn samples_u16(&self) -> Option<&[u16]> {
        match &self.pixels {
            Pixels::U16(v) => Some(v),
            Pixels::U8(_) => None,
        }
    }

    /// Pillow's `convert('RGB')` without resizing.
    pub fn to_rgb(&self) -> RgbImage {
        let data = match &self.pixels {
            Pixels::U8(px) => to_rgb(self.mode, px),
            Pixels::U16(px) => to_rgb(Mode::I16, &i16_to_u8(px)),
        };
        RgbImage {
            width: self.width,
            height: self.height,
            data,
        }
    }

    /// `self.crop((x, y, x + w, y + h))` (same mode); `None` if the box leaves the image or is
    /// empty.
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> Option<DecodedImage> {
        if w == 0 || h == 0 || x.checked_add(w)? > self.width || y.checked_add(h)? > self.height {
            return None;
        }
        fn rows<T: Copy>(
            src: &[T],
            stride: usize,
            c: usize,
            x: usize,
            y: usize,
            w: usize,
            h: usize,
        ) -> Vec<T> {
            let mut out = Vec::with_capacity(w * h * c);
            for r in y..y + h {
                out.extend_from_slice(&src[(r * stride + x) * c..(r * stride + x + w) * c]);
            }
            out
        }
        let c = self.mode.channels();
        let pixels = match &self.pixels {
            Pixels::U8(p) => Pixels::U8(rows(p, self.width, c, x, y, w, h)),
            Pixels::U16(p) => Pixels::U16(rows(p, self.width, 1, x, y, w, h)),
        };
        Some(DecodedImage::new(self.mode, w, h, pixels))
    }

    /// `self.resize((width, height), BICUBIC).convert('RGB')` exactly as Pillow computes it.
    pub fn resize_rgb(&self, width: usize, height: usize) -> Result<RgbImage, PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::InvalidSize { width, height });
        }
        let same = width == self.width && height == self.height;
        let (w0, h0) = (self.width, self.height);
        let data = match &self.pixels {
            Pixels::U16(px) => {
                let resized = if same {
                    std::borrow::Cow::Borrowed(px.as_slice())
                } else {
                    std::borrow::Cow::Owned(resize_bicubic_u16(px, w0, h0, width, height))
                };
                to_rgb(Mode::I16, &i16_to_u8(&resized))
            }
            Pixels::U8(px) => {
                let c = self.mode.channels();
                // An unchanged size is `Image.copy()` in Pillow: no premultiplication round trip.
                let resized = if same {
                    std::borrow::Cow::Borrowed(px.as_slice())
                } else {
                    std::borrow::Cow::Owned(match self.mode {
                        Mode::One | Mode::P => resize_nearest(px, w0, h0, c, width, height),
                        Mode::La | Mode::Rgba => {
                            let pre = premultiply(px, c);
                            let mut out = resize_bicubic(&pre, w0, h0, c, width, height);
                            unpremultiply(&mut out, c);
                            out
                        }
                        _ => resize_bicubic(px, w0, h0, c, width, height),
                    })
                };
                to_rgb(self.mode, &resized)
            }
        };
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Pillow's `I;16 -> L` step of `convert('RGB')`: values above 255 become 255 (no scaling).
fn i16_to_u8(px: &[u16]) -> Vec<u8> {
    px.iter()
        .map(|&v| if v > 255 { 255 } else { v as u8 })
        .collect()
}

/// An 8-bit RGB image, row-major `HWC` (what `np.asarray(img)` gives for a Pillow RGB image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `HWC` RGB bytes; `None` if the length is not `width * height * 3`.
    pub fn from_raw(width: usize, height: usize, data: Vec<u8>) -> Option<RgbImage> {
        (width.checked_mul(height)?.checked_mul(3)? == data.len()).then_some(RgbImage {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// `HWC` RGB bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    /// ToTensor + Normalize into `out` (`CHW`, length `3 * height * width`).
    ///
    /// Same float32 operations as torchvision: `x / 255` (true division), then
    /// `(x - mean[c]) / std[c]`.
    pub fn normalize_into(&self, out: &mut [f32]) {
        let hw = self.width * self.height;
        assert_eq!(
            out.len(),
            3 * hw,
            "output buffer must hold 3 * height * width floats"
        );
        let (r, rest) = out.split_at_mut(hw);
        let (g, b) = rest.split_at_mut(hw);
        for (i, p) in self.data.chunks_exact(3).enumerate() {
            r[i] = (f32::from(p[0]) / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0];
            g[i] = (f32::from(p[1]) / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1];
            b[i] = (f32::from(p[2]) / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2];
        }
    }

    /// The normalised `[3, height, width]` float32 tensor (CPU).
    pub fn to_normalized_tensor(&self) -> Result<Tensor, PreprocessError> {
        let mut buf = vec![0f32; 3 * self.width * self.height];
        self.normalize_into(&mut buf);
        Ok(Tensor::f_from_slice(&buf)?.f_view([3, self.height as i64, self.width as i64])?)
    }
}

/// cn_clip's eval/inference transform for one resolution `S` (the vision config's
/// `image_resolution`, e.g. 224 or 336): square bicubic resize, RGB, ToTensor, Normalize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocessor {
    size: u32,
}

impl Preprocessor {
    /// A preprocessor for `size`×`size` outputs; `size` must be at least 1.
    pub fn new(size: u32) -> Result<Self, PreprocessError> {
        if size == 0 {
            return Err(PreprocessError::InvalidSize {
                width: 0,
                height: 0,
            });
        }
        Ok(Preprocessor { size })
    }

    /// `S`, the output side.
    pub fn size(&self) -> u32 {
        self.size
    }

    fn side(&self) -> usize {
        self.size as usize
    }

    /// The `S×S` RGB image after `Resize((S,S), BICUBIC)` and `convert('RGB')`, before ToTensor.
    pub fn rgb_from_bytes(&self, bytes: &[u8], id: &str) -> Result<RgbImage, PreprocessError> {
        decode_named(bytes, id)?.resize_rgb(self.side(), self.side())
    }

    /// [`Self::rgb_from_bytes`] for a file; errors name the path.
    pub fn rgb_from_file(&self, path: impl AsRef<Path>) -> Result<RgbImage, PreprocessError> {
        decode_file(path)?.resize_rgb(self.side(), self.side())
    }

    /// The normalised `[3,S,S]` float32 tensor for an image file's bytes; `id` names it in errors.
    pub fn preprocess_bytes(&self, bytes: &[u8], id: &str) -> Result<Tensor, PreprocessError> {
        self.rgb_from_bytes(bytes, id)?.to_normalized_tensor()
    }

    /// The normalised `[3,S,S]` float32 tensor for an image file.
    pub fn preprocess_file(&self, path: impl AsRef<Path>) -> Result<Tensor, PreprocessError> {
        self.rgb_from_file(path)?.to_normalized_tensor()
    }

    fn batch<T: Sync>(
        &self,
        items: &[T],
        one: impl Fn(&T) -> Result<RgbImage, PreprocessError> + Sync,
    ) -> Result<Tensor, PreprocessError> {
        let s = self.side();
        let per = 3 * s * s;
        let mut buf = vec![0f32; items.len() * per];
        let first_error = buf
            .par_chunks_mut(per.max(1))
            .zip(items.par_iter())
            .map(|(out, item)| one(item).map(|rgb| rgb.normalize_into(out)).err())
            .collect::<Vec<_>>()
            .into_iter()
            .flatten()
            .next();
        if let Some(e) = first_error {
            return Err(e);
        }
        let n = items.len() as i64;
        let s = s as i64;
        Ok(Tensor::f_from_slice(&buf)?.f_view([n, 3, s, s])?)
    }

    /// `[N,3,S,S]` for `(id, bytes)` pairs, decoded and resized on rayon's thread pool. The error
    /// of the first failing item (in input order) is returned.
    pub fn preprocess_batch<I, B>(&self, items: &[(I, B)]) -> Result<Tensor, PreprocessError>
    where
        I: AsRef<str> + Sync,
        B: AsRef<[u8]> + Sync,
    {
        self.batch(items, |(id, bytes)| {
            self.rgb_from_bytes(bytes.as_ref(), id.as_ref())
        })
    }

    /// `[N,3,S,S]` for image files, read, decoded and resized on rayon's thread pool.
    pub fn preprocess_files<P>(&self, paths: &[P]) -> Result<Tensor, PreprocessError>
    where
        P: AsRef<Path> + Sync,
    {
        self.batch(paths, |p| self.rgb_from_file(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muldiv255_matches_rounded_division() {
        for a in 0..=255u32 {
            for b in 0..=255u32 {
                let exact = ((a * b) as f64 / 255.0).round() as u32;
                assert_eq!(u32::from(muldiv255(a as u8, b as u8)), exact, "{a}*{b}");
            }
        }
    }

    #[test]
    fn errors_name_the_source() {
        let p = Preprocessor::new(32).unwrap();
        let e = p.rgb_from_bytes(b"", "products/1.jpg").unwrap_err();
        assert_eq!(e.to_string(), "image products/1.jpg is empty (0 bytes)");
        let e = p.rgb_from_bytes(b"hello world", "x").unwrap_err();
        assert!(e.to_string().contains("68 65 6c 6c 6f 20 77 6f"), "{e}");
        assert!(Preprocessor::new(0).is_err());
    }

    #[test]
    fn normalisation_matches_formula() {
        let rgb = RgbImage::from_raw(1, 1, vec![0, 128, 255]).unwrap();
        let mut out = [0f32; 3];
        rgb.normalize_into(&mut out);
        assert_eq!(out[0], (0.0f32 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(out[1], (128.0f32 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
        assert_eq!(out[2], (1.0f32 - CLIP_MEAN[2]) / CLIP_STD[2]);
    }

    #[test]
    fn cmyk_white_and_black() {
        assert_eq!(to_rgb(Mode::Cmyk, &[0, 0, 0, 0]), vec![255, 255, 255]);
        assert_eq!(to_rgb(Mode::Cmyk, &[0, 0, 0, 255]), vec![0, 0, 0]);
        assert_eq!(to_rgb(Mode::Cmyk, &[255, 0, 0, 0]), vec![0, 255, 255]);
    }
}
