//! Decoding image files into the pixels and *mode* Pillow would open them as.
//!
//! JPEG goes through libjpeg-turbo (the `mozjpeg` crate, default ISLOW IDCT and fancy upsampling),
//! which is what Pillow bundles, so JPEG pixels are bit-identical to Pillow's. PNG, WebP, GIF and
//! BMP go through the `image`/`gif` crates; the mode Pillow would report is read from the file
//! header, because resizing depends on it (see [`super::DecodedImage::resize_rgb`]). TIFF goes
//! through the `tiff` crate (the one `image` uses), read directly so that Pillow's mode (CMYK,
//! palette, 1-bit, associated alpha) survives.
//!
//! The only size limit is Pillow's pixel limit ([`MAX_PIXELS`], checked from the header before
//! anything is allocated); the decoders' own allocation limits are raised to what an image of that
//! many pixels needs, so nothing Pillow opens is refused for its byte size.

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{DecodedImage, Mode, Pixels, PreprocessError};

/// Pillow refuses images above `2 * Image.MAX_IMAGE_PIXELS` (`DecompressionBombError`); so do we.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Bytes the decoders may allocate: [`MAX_PIXELS`] at 16 bytes a pixel (RGBA with 32-bit
/// samples, the widest layout the `image`/`tiff` decoders produce), so an image within Pillow's
/// pixel limit is never refused for its memory; anything larger was refused by its header first.
const MAX_DECODE_BYTES: u64 = MAX_PIXELS * 16;

/// File formats recognised by their leading bytes (as Pillow does; the file name is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
    Tiff,
}

impl Format {
    /// Name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Gif => "GIF",
            Format::WebP => "WebP",
            Format::Bmp => "BMP",
            Format::Tiff => "TIFF",
        }
    }

    /// Sniffs the format from the first bytes.
    pub fn sniff(bytes: &[u8]) -> Option<Format> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Format::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Format::Png)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(Format::Gif)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(Format::WebP)
        } else if bytes.starts_with(b"BM") {
            Some(Format::Bmp)
        } else if bytes.starts_with(b"II*\0")
            || bytes.starts_with(b"MM\0*")
            || bytes.starts_with(b"II+\0")
            || bytes.starts_with(b"MM\0+")
        {
            Some(Format::Tiff)
        } else {
            None
        }
    }
}

fn magic_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes `bytes`; `id` names the image in errors (a path or a caller-given id).
pub fn decode_named(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty { id: id.to_owned() });
    }
    let Some(format) = Format::sniff(bytes) else {
        return Err(PreprocessError::UnknownFormat {
            id: id.to_owned(),
            magic: magic_hex(bytes),
        });
    };
    // The decoders are third-party code fed untrusted bytes; a panic in one of them (found by
    // fuzzing: png 0.18 indexes past a PLTE chunk whose length is not a multiple of 3) must be
    // this image's error, not the end of a loader worker and of the run.
    let decoded = catch_unwind(AssertUnwindSafe(|| match format {
        Format::Jpeg => decode_jpeg(bytes, id),
        Format::Png => decode_png(bytes, id),
        Format::Gif => decode_gif(bytes, id),
        Format::WebP => decode_webp(bytes, id),
        Format::Bmp => decode_bmp(bytes, id),
        Format::Tiff => decode_tiff(bytes, id),
    }));
    match decoded {
        Ok(result) => result,
        Err(payload) => Err(PreprocessError::Decode {
            id: id.to_owned(),
            format: format.name(),
            reason: format!(
                "the decoder failed on malformed data ({})",
                panic_message(&*payload)
            ),
        }),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "panic".to_owned()
    }
}

fn check_size(id: &str, format: Format, w: u64, h: u64) -> Result<(), PreprocessError> {
    if w == 0 || h == 0 {
        return Err(PreprocessError::Decode {
            id: id.to_owned(),
            format: format.name(),
            reason: format!("image has zero size {w}x{h}"),
        });
    }
    if w.saturating_mul(h) > MAX_PIXELS {
        return Err(PreprocessError::TooLarge {
            id: id.to_owned(),
            width: w,
            height: h,
            limit: MAX_PIXELS,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// A `BufRead` over a byte slice that records whether libjpeg asked for data past the end.
///
/// The `mozjpeg` source manager then fakes an EOI marker and only emits a warning, so the decode
/// "succeeds" with grey rows; Pillow instead raises "image file is truncated". The flag lets us
/// do the same.
struct EofReader<'a> {
    data: &'a [u8],
    pos: usize,
    hit_eof: &'a Cell<bool>,
}

impl Read for EofReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for EofReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        if rest.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(rest)
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.data.len());
    }
}

enum JpegFail {
    Io(io::Error),
    TooLarge(u64, u64),
    Layers(usize),
}

impl From<io::Error> for JpegFail {
    fn from(e: io::Error) -> Self {
        JpegFail::Io(e)
    }
}

fn decode_jpeg(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    let hit_eof = Cell::new(false);
    let run = || -> Result<(Mode, usize, usize, Vec<u8>), JpegFail> {
        let reader = EofReader {
            data: bytes,
            pos: 0,
            hit_eof: &hit_eof,
        };
        let d = mozjpeg::Decompress::new_reader(reader)?;
        let (w, h) = d.size();
        if (w as u64).saturating_mul(h as u64) > MAX_PIXELS {
            return Err(JpegFail::TooLarge(w as u64, h as u64));
        }
        // Pillow's mode comes from the number of components in the frame header.
        let layers = d.components().len();
        let (mode, mut started) = match layers {
            1 => (Mode::L, d.grayscale()?),
            3 => (Mode::Rgb, d.rgb()?),
            4 => (Mode::Cmyk, d.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)?),
            n => return Err(JpegFail::Layers(n)),
        };
        let (w, h) = (started.width(), started.height());
        let mut px: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        if mode == Mode::Cmyk {
            // Pillow decodes 4-layer JPEGs with rawmode "CMYK;I" (Adobe's inverted convention).
            for v in &mut px {
                *v = 255 - *v;
            }
        }
        Ok((mode, w, h, px))
    };
    let outcome = catch_unwind(AssertUnwindSafe(run));
    let truncated = hit_eof.get();
    let err = |reason: String| PreprocessError::Decode {
        id: id.to_owned(),
        format: "JPEG",
        reason,
    };
    match outcome {
        Ok(Ok((mode, w, h, px))) => {
            if truncated {
                return Err(PreprocessError::Truncated {
                    id: id.to_owned(),
                    format: "JPEG",
                });
            }
            check_size(id, Format::Jpeg, w as u64, h as u64)?;
            if px.len() != w * h * mode.channels() {
                return Err(err(format!(
                    "decoder returned {} bytes for {w}x{h} {}",
                    px.len(),
                    mode.name()
                )));
            }
            Ok(DecodedImage::new(mode, w, h, Pixels::U8(px)))
        }
        Ok(Err(JpegFail::TooLarge(w, h))) => Err(PreprocessError::TooLarge {
            id: id.to_owned(),
            width: w,
            height: h,
            limit: MAX_PIXELS,
        }),
        Ok(Err(JpegFail::Layers(n))) => Err(PreprocessError::Unsupported {
            id: id.to_owned(),
            format: "JPEG",
            reason: format!("{n} colour components (Pillow handles 1, 3 or 4)"),
        }),
        Ok(Err(JpegFail::Io(e))) => {
            if truncated || e.kind() == io::ErrorKind::UnexpectedEof {
                Err(PreprocessError::Truncated {
                    id: id.to_owned(),
                    format: "JPEG",
                })
            } else {
                Err(err(e.to_string()))
            }
        }
        Err(payload) => {
            // libjpeg's fatal errors unwind out of the C code (mozjpeg's error manager uses
            // `resume_unwind`, so no panic hook runs).
            let msg = match panic_message(&*payload) {
                m if m == "panic" => "libjpeg fatal error".to_owned(),
                m => m,
            };
            if truncated {
                Err(PreprocessError::Truncated {
                    id: id.to_owned(),
                    format: "JPEG",
                })
            } else {
                Err(err(msg))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PNG, WebP, BMP through `image`

fn image_error(id: &str, format: Format, e: image::ImageError) -> PreprocessError {
    let eof = match &e {
        image::ImageError::IoError(io) => io.kind() == io::ErrorKind::UnexpectedEof,
        other => {
            let s = other.to_string().to_ascii_lowercase();
            s.contains("unexpected end") || s.contains("unexpected eof") || s.contains("truncated")
        }
    };
    if eof {
        PreprocessError::Truncated {
            id: id.to_owned(),
            format: format.name(),
        }
    } else if let image::ImageError::Limits(l) = &e {
        PreprocessError::Decode {
            id: id.to_owned(),
            format: format.name(),
            reason: format!("decoder limit exceeded: {l}"),
        }
    } else {
        PreprocessError::Decode {
            id: id.to_owned(),
            format: format.name(),
            reason: e.to_string(),
        }
    }
}

fn load_with_image(
    bytes: &[u8],
    id: &str,
    format: Format,
) -> Result<image::DynamicImage, PreprocessError> {
    let fmt = match format {
        Format::Png => image::ImageFormat::Png,
        Format::WebP => image::ImageFormat::WebP,
        Format::Bmp => image::ImageFormat::Bmp,
        Format::Gif => image::ImageFormat::Gif,
        Format::Jpeg => image::ImageFormat::Jpeg,
        Format::Tiff => image::ImageFormat::Tiff,
    };
    // The header's size first: a bomb is refused by Pillow's limit (naming its size) before the
    // decoder allocates, instead of surfacing as the `image` crate's generic memory-limit error.
    let (w, h) = image::ImageReader::with_format(io::Cursor::new(bytes), fmt)
        .into_dimensions()
        .map_err(|e| image_error(id, format, e))?;
    check_size(id, format, u64::from(w), u64::from(h))?;
    let mut limits = image::Limits::no_limits();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = image::ImageReader::with_format(io::Cursor::new(bytes), fmt);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| image_error(id, format, e))?;
    check_size(id, format, u64::from(img.width()), u64::from(img.height()))?;
    Ok(img)
}

/// Interleaved 8-bit samples and channel count; 16-bit samples keep their high byte, which is
/// what Pillow's `*;16B` unpackers do for 16-bit RGB(A)/LA PNGs.
fn samples_u8(img: image::DynamicImage) -> (Vec<u8>, usize) {
    use image::DynamicImage as D;
    fn msb(v: Vec<u16>) -> Vec<u8> {
        v.into_iter().map(|s| (s >> 8) as u8).collect()
    }
    match img {
        D::ImageLuma8(b) => (b.into_raw(), 1),
        D::ImageLumaA8(b) => (b.into_raw(), 2),
        D::ImageRgb8(b) => (b.into_raw(), 3),
        D::ImageRgba8(b) => (b.into_raw(), 4),
        D::ImageLuma16(b) => (msb(b.into_raw()), 1),
        D::ImageLumaA16(b) => (msb(b.into_raw()), 2),
        D::ImageRgb16(b) => (msb(b.into_raw()), 3),
        D::ImageRgba16(b) => (msb(b.into_raw()), 4),
        other => (other.to_rgba8().into_raw(), 4),
    }
}

/// Keeps the first `want` channels of each pixel when the decoder gave `want` or `want + 1`
/// (a transparency chunk expanded into an alpha channel that Pillow's mode does not have).
fn take_channels(
    id: &str,
    format: Format,
    mode: Mode,
    samples: Vec<u8>,
    have: usize,
) -> Result<Vec<u8>, PreprocessError> {
    let want = mode.channels();
    if have == want {
        return Ok(samples);
    }
    if have > want && (have == want + 1 || want == 1) {
        return Ok(samples
            .chunks_exact(have)
            .flat_map(|p| p[..want].iter().copied())
            .collect());
    }
    Err(PreprocessError::Unsupported {
        id: id.to_owned(),
        format: format.name(),
        reason: format!(
            "decoder returned {have} channels for a mode {} image",
            mode.name()
        ),
    })
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn decode_png(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    let bad = |reason: &str| PreprocessError::Decode {
        id: id.to_owned(),
        format: "PNG",
        reason: reason.to_owned(),
    };
    // IHDR is the first chunk: length(4) "IHDR"(4) width(4) height(4) depth(1) colour type(1).
    if bytes.len() < 33 {
        return Err(PreprocessError::Truncated {
            id: id.to_owned(),
            format: "PNG",
        });
    }
    if &bytes[12..16] != b"IHDR" {
        return Err(bad("first chunk is not IHDR"));
    }
    let w = be_u32(bytes, 16).ok_or_else(|| bad("short IHDR"))?;
    let h = be_u32(bytes, 20).ok_or_else(|| bad("short IHDR"))?;
    check_size(id, Format::Png, u64::from(w), u64::from(h))?;
    let depth = bytes[24];
    let colour = bytes[25];
    let mode = match (colour, depth) {
        (0, 1) => Mode::One,
        (0, 16) => Mode::I16,
        (0, _) => Mode::L,
        (2, _) => Mode::Rgb,
        (3, _) => Mode::P,
        (4, _) => Mode::La,
        (6, _) => Mode::Rgba,
        _ => return Err(bad(&format!("invalid colour type {colour}"))),
    };
    let img = load_with_image(bytes, id, Format::Png)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if mode == Mode::I16 {
        let px: Vec<u16> = match img {
            image::DynamicImage::ImageLuma16(b) => b.into_raw(),
            image::DynamicImage::ImageLumaA16(b) => {
                b.into_raw().chunks_exact(2).map(|p| p[0]).collect()
            }
            _ => return Err(bad("16-bit grayscale PNG did not decode to 16-bit samples")),
        };
        return Ok(DecodedImage::new(mode, w, h, Pixels::U16(px)));
    }
    let (samples, have) = samples_u8(img);
    let px = take_channels(id, Format::Png, mode, samples, have)?;
    Ok(DecodedImage::new(mode, w, h, Pixels::U8(px)))
}

fn decode_webp(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    let img = load_with_image(bytes, id, Format::WebP)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Pillow opens WebP as RGBA when the file has alpha, RGB otherwise.
    let mode = if img.color().has_alpha() {
        Mode::Rgba
    } else {
        Mode::Rgb
    };
    let (samples, have) = samples_u8(img);
    let px = take_channels(id, Format::WebP, mode, samples, have)?;
    Ok(DecodedImage::new(mode, w, h, Pixels::U8(px)))
}

/// Pillow's mode for a BMP, from its headers (`BmpImagePlugin`): palette files whose palette is a
/// grey ramp open as `L` (or `1` for black/white), other palette files as `P`, 32-bit files with
/// an alpha bit mask as `RGBA`, everything else as `RGB`.
fn bmp_mode(bytes: &[u8]) -> Option<Mode> {
    let header = le_u32(bytes, 14)? as usize;
    if header == 12 {
        // OS/2 core header: 16-bit fields, 3-byte palette entries.
        let bits = le_u16(bytes, 24)?;
        return Some(if bits <= 8 {
            bmp_palette_mode(bytes, 14 + 12, 3, 1usize << bits, bits)
        } else {
            Mode::Rgb
        });
    }
    let bits = le_u16(bytes, 28)?;
    let compression = le_u32(bytes, 30)?;
    if bits <= 8 {
        let used = le_u32(bytes, 46)? as usize;
        let colors = if used == 0 { 1usize << bits } else { used };
        let mut start = 14 + header;
        if header == 40 && compression == 3 {
            start += 12;
        }
        return Some(bmp_palette_mode(bytes, start, 4, colors, bits));
    }
    if bits == 32 && (compression == 3 || compression == 6) {
        // Bit masks follow the 40-byte BITMAPINFOHEADER part (inside V4/V5 headers too).
        let masks_at = 14 + 40;
        let r = le_u32(bytes, masks_at)?;
        let g = le_u32(bytes, masks_at + 4)?;
        let b = le_u32(bytes, masks_at + 8)?;
        let a = if header >= 56 || compression == 6 {
            le_u32(bytes, masks_at + 12).unwrap_or(0)
        } else {
            0
        };
        let all_zero = r == 0 && g == 0 && b == 0 && a == 0;
        return Some(if a != 0 || all_zero {
            Mode::Rgba
        } else {
            Mode::Rgb
        });
    }
    Some(Mode::Rgb)
}

fn bmp_palette_mode(bytes: &[u8], start: usize, entry: usize, colors: usize, _bits: u16) -> Mode {
    let grey = if colors == 2 {
        [0u8, 255].iter().enumerate().all(|(i, &v)| {
            bytes
                .get(start + i * entry..start + i * entry + 3)
                .is_some_and(|e| e == [v, v, v])
        })
    } else {
        (0..colors).all(|i| {
            bytes
                .get(start + i * entry..start + i * entry + 3)
                .is_some_and(|e| e.iter().all(|&c| usize::from(c) == i))
        })
    };
    match (grey, colors <= 2) {
        (true, true) => Mode::One,
        (true, false) => Mode::L,
        (false, _) => Mode::P,
    }
}

fn decode_bmp(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    let mode = bmp_mode(bytes).ok_or_else(|| PreprocessError::Truncated {
        id: id.to_owned(),
        format: "BMP",
    })?;
    let img = load_with_image(bytes, id, Format::Bmp)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (samples, have) = samples_u8(img);
    let px = take_channels(id, Format::Bmp, mode, samples, have)?;
    Ok(DecodedImage::new(mode, w, h, Pixels::U8(px)))
}

// ---------------------------------------------------------------------------------------------
// GIF through `gif` (indexed output, so the palette decides the mode as in Pillow)

/// Pillow's `GifImageFile._is_palette_needed`: a palette that is the identity grey ramp is
/// dropped and the image opens as `L`.
fn palette_needed(p: &[u8]) -> bool {
    p.chunks(3)
        .enumerate()
        .any(|(i, e)| !(e.len() == 3 && e.iter().all(|&c| usize::from(c) == i)))
}

fn decode_gif(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    let fail = |e: gif::DecodingError| {
        let s = e.to_string();
        if s.to_ascii_lowercase().contains("eof") || s.to_ascii_lowercase().contains("end of") {
            PreprocessError::Truncated {
                id: id.to_owned(),
                format: "GIF",
            }
        } else {
            PreprocessError::Decode {
                id: id.to_owned(),
                format: "GIF",
                reason: s,
            }
        }
    };
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    let mut dec = opts.read_info(io::Cursor::new(bytes)).map_err(fail)?;
    let (sw, sh) = (usize::from(dec.width()), usize::from(dec.height()));
    let global = dec
        .global_palette()
        .filter(|p| palette_needed(p))
        .map(<[u8]>::to_vec);
    let frame = dec
        .read_next_frame()
        .map_err(fail)?
        .ok_or_else(|| PreprocessError::Decode {
            id: id.to_owned(),
            format: "GIF",
            reason: "no image frame".to_owned(),
        })?;
    let (fl, ft) = (usize::from(frame.left), usize::from(frame.top));
    let (fw, fh) = (usize::from(frame.width), usize::from(frame.height));
    // Pillow grows the canvas when the first frame extends past the logical screen.
    let (w, h) = (sw.max(fl + fw), sh.max(ft + fh));
    check_size(id, Format::Gif, w as u64, h as u64)?;
    let palette = match &frame.palette {
        Some(local) if palette_needed(local) => Some(local.clone()),
        Some(_) => None,
        None => global,
    };
    // The canvas starts as the transparency index (or 0) and the frame is pasted into it.
    let fill = frame.transparent.unwrap_or(0);
    let mut idx = vec![fill; w * h];
    if frame.buffer.len() < fw * fh {
        return Err(PreprocessError::Truncated {
            id: id.to_owned(),
            format: "GIF",
        });
    }
    for y in 0..fh {
        let row = &frame.buffer[y * fw..(y + 1) * fw];
        idx[(ft + y) * w + fl..(ft + y) * w + fl + fw].copy_from_slice(row);
    }
    Ok(match palette {
        Some(p) => {
            let mut rgb = Vec::with_capacity(w * h * 3);
            for &i in &idx {
                let at = usize::from(i) * 3;
                match p.get(at..at + 3) {
                    Some(e) => rgb.extend_from_slice(e),
                    None => rgb.extend_from_slice(&[0, 0, 0]),
                }
            }
            DecodedImage::new(Mode::P, w, h, Pixels::U8(rgb))
        }
        None => DecodedImage::new(Mode::L, w, h, Pixels::U8(idx)),
    })
}

// ---------------------------------------------------------------------------------------------
// TIFF through `tiff` (the first page, as Pillow's `open`)

/// Unpacks `bits`-bit samples (1, 2 or 4; rows padded to a byte, most significant bits first)
/// into one byte each.
fn unpack_bits(packed: &[u8], w: usize, h: usize, bits: usize) -> Option<Vec<u8>> {
    let row_bytes = (w * bits).div_ceil(8);
    let per_byte = 8 / bits;
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(w * h);
    for row in packed.chunks(row_bytes).take(h) {
        for x in 0..w {
            let byte = *row.get(x / per_byte)?;
            let shift = 8 - bits * (x % per_byte + 1);
            out.push((byte >> shift) & mask);
        }
    }
    (out.len() == w * h).then_some(out)
}

/// Pillow's `RGBa` unpacker (associated alpha): `c * 255 / a` with integer division, clipped;
/// black where `a` is 0.
fn unpremultiply_rgba(px: &mut [u8]) {
    for p in px.chunks_exact_mut(4) {
        let a = u32::from(p[3]);
        for c in &mut p[..3] {
            *c = match a {
                0 => 0,
                255 => *c,
                a => (u32::from(*c) * 255 / a).min(255) as u8,
            };
        }
    }
}

/// A copy of a classic (not Big) TIFF whose first directory's PhotometricInterpretation is
/// changed from RGB palette (3) to BlackIsZero (1), so the indices decode as grayscale.
fn palette_as_gray(bytes: &[u8]) -> Option<Vec<u8>> {
    let little = bytes.starts_with(b"II");
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let ifd = if little {
        le_u32(bytes, 4)?
    } else {
        be_u32(bytes, 4)?
    } as usize;
    let entries = usize::from(u16_at(ifd)?);
    let mut out = bytes.to_vec();
    for e in 0..entries {
        let at = ifd + 2 + e * 12;
        // Tag 262, type SHORT (3), count 1: the value sits in the entry's first two value bytes.
        if u16_at(at)? == 262 && u16_at(at + 2)? == 3 && u16_at(at + 8)? == 3 {
            let one = if little {
                1u16.to_le_bytes()
            } else {
                1u16.to_be_bytes()
            };
            out.get_mut(at + 8..at + 10)?.copy_from_slice(&one);
            return Some(out);
        }
    }
    None
}

/// A TIFF's size from its first directory, without decoding: what the pixel limit is checked
/// against (the `image` crate's TIFF reader refuses palette images, which Pillow and
/// [`decode_named`] read, before it reports their size).
pub fn tiff_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    tiff::decoder::Decoder::new(io::Cursor::new(bytes))
        .and_then(|mut d| d.dimensions())
        .map_err(|e| e.to_string())
}

fn decode_tiff(bytes: &[u8], id: &str) -> Result<DecodedImage, PreprocessError> {
    use tiff::ColorType as C;
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::tags::Tag;

    let fail = |e: tiff::TiffError| match e {
        tiff::TiffError::IoError(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            PreprocessError::Truncated {
                id: id.to_owned(),
                format: "TIFF",
            }
        }
        tiff::TiffError::UnsupportedError(u) => PreprocessError::Unsupported {
            id: id.to_owned(),
            format: "TIFF",
            reason: u.to_string(),
        },
        other => PreprocessError::Decode {
            id: id.to_owned(),
            format: "TIFF",
            reason: other.to_string(),
        },
    };
    let unsupported = |reason: String| PreprocessError::Unsupported {
        id: id.to_owned(),
        format: "TIFF",
        reason,
    };
    let open = |data: &[u8]| -> Result<Decoder<io::Cursor<Vec<u8>>>, PreprocessError> {
        let mut limits = tiff::decoder::Limits::default();
        limits.decoding_buffer_size = usize::try_from(MAX_DECODE_BYTES).unwrap_or(usize::MAX);
        limits.intermediate_buffer_size = limits.decoding_buffer_size;
        Ok(Decoder::new(io::Cursor::new(data.to_vec()))
            .map_err(fail)?
            .with_limits(limits))
    };
    let mut dec = open(bytes)?;
    let (w32, h32) = dec.dimensions().map_err(fail)?;
    check_size(id, Format::Tiff, u64::from(w32), u64::from(h32))?;
    let (w, h) = (w32 as usize, h32 as usize);
    let photometric: Option<u16> = dec
        .find_tag_unsigned(Tag::PhotometricInterpretation)
        .map_err(fail)?;
    // The `tiff` crate does not decode palette images: read the ColorMap here, then decode the
    // indices as grayscale from a copy whose PhotometricInterpretation says BlackIsZero.
    let mut colour_map: Option<Vec<u16>> = None;
    if photometric == Some(3) {
        colour_map = Some(
            dec.find_tag_unsigned_vec(Tag::ColorMap)
                .map_err(fail)?
                .ok_or_else(|| unsupported("palette image without a ColorMap".to_owned()))?,
        );
        let patched = palette_as_gray(bytes)
            .ok_or_else(|| unsupported("palette image whose header cannot be read".to_owned()))?;
        dec = open(&patched)?;
    }
    let colour = match (dec.colortype().map_err(fail)?, &colour_map) {
        (C::Gray(bits), Some(_)) => C::Palette(bits),
        (c, _) => c,
    };
    let planar: Option<u16> = dec
        .find_tag_unsigned(Tag::PlanarConfiguration)
        .map_err(fail)?;
    if planar == Some(2) && !matches!(colour, C::Gray(_) | C::Palette(_)) {
        return Err(unsupported(
            "planar (separate-plane) sample layout".to_owned(),
        ));
    }
    let extra: Vec<u16> = dec
        .find_tag_unsigned_vec(Tag::ExtraSamples)
        .map_err(fail)?
        .unwrap_or_default();
    let decoded = dec.read_image().map_err(fail)?;
    let n = w * h;
    let truncated = || PreprocessError::Truncated {
        id: id.to_owned(),
        format: "TIFF",
    };
    // 16-bit samples keep their high byte, as Pillow's `*;16L`/`*;16B` unpackers do.
    let to_u8 = |d: DecodingResult| -> Result<Vec<u8>, PreprocessError> {
        match d {
            DecodingResult::U8(v) => Ok(v),
            DecodingResult::U16(v) => Ok(v.into_iter().map(|s| (s >> 8) as u8).collect()),
            _ => Err(unsupported(format!("{colour:?} samples"))),
        }
    };
    // The decoder sizes its buffer from the header; a short one is a file that ends early.
    let make = |mode: Mode, px: Vec<u8>| {
        if px.len() == n * mode.channels() {
            Ok(DecodedImage::new(mode, w, h, Pixels::U8(px)))
        } else {
            Err(truncated())
        }
    };
    let image = match colour {
        C::Gray(1) | C::Gray(2) | C::Gray(4) => {
            let DecodingResult::U8(packed) = decoded else {
                return Err(unsupported(format!("{colour:?} samples")));
            };
            let bits = match colour {
                C::Gray(b) => usize::from(b),
                _ => 1,
            };
            let levels = unpack_bits(&packed, w, h, bits).ok_or_else(truncated)?;
            if bits == 1 {
                let px = levels.into_iter().map(|v| v * 255).collect();
                make(Mode::One, px)?
            } else {
                // Pillow's `L;2`/`L;4` unpackers scale to 0..255.
                let scale = 255 / ((1u8 << bits) - 1);
                let px = levels.into_iter().map(|v| v * scale).collect();
                make(Mode::L, px)?
            }
        }
        C::Gray(8) => make(Mode::L, to_u8(decoded)?)?,
        C::Gray(16) => {
            let DecodingResult::U16(px) = decoded else {
                return Err(unsupported(format!("{colour:?} samples")));
            };
            if px.len() != n {
                return Err(truncated());
            }
            DecodedImage::new(Mode::I16, w, h, Pixels::U16(px))
        }
        C::Palette(bits @ (1 | 2 | 4 | 8)) => {
            let map = colour_map.unwrap_or_default();
            let entries = map.len() / 3;
            let idx = if bits == 8 {
                to_u8(decoded)?
            } else {
                let DecodingResult::U8(packed) = decoded else {
                    return Err(unsupported(format!("{colour:?} samples")));
                };
                unpack_bits(&packed, w, h, usize::from(bits)).ok_or_else(truncated)?
            };
            // The ColorMap holds all reds, then all greens, then all blues, 16 bits each;
            // Pillow keeps the high byte.
            let mut rgb = Vec::with_capacity(n * 3);
            for &i in &idx {
                let i = usize::from(i);
                for plane in 0..3 {
                    let v = if i < entries {
                        map[plane * entries + i]
                    } else {
                        0
                    };
                    rgb.push((v >> 8) as u8);
                }
            }
            make(Mode::P, rgb)?
        }
        C::Multiband {
            bit_depth: 8 | 16,
            num_samples: 2,
        } => {
            // Grayscale with an extra sample: Pillow's `LA` (alpha) or `L` (unspecified).
            let px = to_u8(decoded)?;
            if extra.first() == Some(&0) {
                let px = take_channels(id, Format::Tiff, Mode::L, px, 2)?;
                make(Mode::L, px)?
            } else {
                make(Mode::La, px)?
            }
        }
        C::RGB(8 | 16) | C::RGBA(8 | 16) => {
            let depth_is_8 = matches!(colour, C::RGB(8) | C::RGBA(8));
            let mut px = to_u8(decoded)?;
            let have = px.len() / n.max(1);
            match (have, extra.first()) {
                (3, _) => make(Mode::Rgb, px)?,
                // An unspecified extra sample: Pillow opens it as RGB (rawmode `RGBX`).
                (4, Some(0)) => {
                    let px = take_channels(id, Format::Tiff, Mode::Rgb, px, 4)?;
                    make(Mode::Rgb, px)?
                }
                (4, Some(1)) if depth_is_8 => {
                    unpremultiply_rgba(&mut px);
                    make(Mode::Rgba, px)?
                }
                (4, Some(1)) => {
                    return Err(unsupported("16-bit RGB with associated alpha".to_owned()));
                }
                (4, _) => make(Mode::Rgba, px)?,
                _ => {
                    return Err(unsupported(format!(
                        "{have} samples per pixel for {colour:?}"
                    )));
                }
            }
        }
        // Pillow's TIFF CMYK is not inverted (rawmode `CMYK`), unlike Adobe JPEGs.
        C::CMYK(8 | 16) => {
            let px = to_u8(decoded)?;
            make(Mode::Cmyk, px)?
        }
        other => {
            return Err(unsupported(format!(
                "colour type {other:?} (Pillow's common TIFF kinds are supported: 1/2/4/8/16-bit \
                 grayscale, palette, RGB, RGBA, CMYK)"
            )));
        }
    };
    Ok(image)
}
