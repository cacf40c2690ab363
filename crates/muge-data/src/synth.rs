//! Mini-MUGE: a deterministic stand-in for the MUGE dataset, so the whole pipeline (LMDB,
//! fine-tuning, soup, prediction, scoring) runs for real where MUGE and pretrained weights cannot
//! be downloaded.
//!
//! Every product is a combination of a colour, a fill pattern and a shape; the shape names the
//! product (`圆形抱枕`, `心形靠垫`, …). A query describes one combination, e.g. `红色条纹圆形抱枕`;
//! solid fills leave the pattern word out (`蓝色星形贴纸`). Images are rendered product photos of
//! that combination: the object at a random position, size and rotation, with a small dark outline
//! and a drop shadow, on a varied background (plain, gradient or mottled texture), with colour jitter
//! and sensor noise, saved as JPEG like MUGE's.
//!
//! Splits follow MUGE's structure: the *combinations* are partitioned, so train, valid and test
//! queries never overlap (a model must compose attributes it saw in other combinations), and each
//! valid/test query has several images. Ids are integers unique across splits. Unlike MUGE's real
//! test split, `test_texts.jsonl` carries its `image_ids`, so a submission can be scored.
//!
//! The same [`MiniMugeConfig`] always writes byte-identical files: each image's randomness comes
//! from its own ChaCha stream keyed by `(seed, image id)`.

use crate::base64;
use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, RgbImage};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Colour names and their base RGB.
pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("红色", [214, 32, 38]),
    ("橙色", [244, 134, 22]),
    ("黄色", [240, 214, 30]),
    ("绿色", [36, 160, 62]),
    ("蓝色", [30, 86, 214]),
    ("紫色", [128, 52, 180]),
    ("粉色", [246, 146, 190]),
    ("黑色", [28, 28, 30]),
    ("白色", [246, 246, 242]),
    ("棕色", [126, 78, 40]),
];

/// Fill patterns; the empty word is the solid fill.
pub const PATTERNS: [&str; 4] = ["", "条纹", "格子", "波点"];

/// Shapes and the product each one is.
pub const SHAPES: [(&str, &str); 6] = [
    ("圆形", "抱枕"),
    ("方形", "地毯"),
    ("三角形", "挂旗"),
    ("星形", "贴纸"),
    ("心形", "靠垫"),
    ("菱形", "杯垫"),
];

/// Number of distinct products (queries) the generator can describe.
pub const COMBINATIONS: usize = COLOURS.len() * PATTERNS.len() * SHAPES.len();

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct MiniMugeConfig {
    pub seed: u64,
    /// Side of the square JPEGs in pixels.
    pub image_size: u32,
    /// Queries (combinations) in valid and in test; the rest of the combinations, up to
    /// `train_queries`, go to train.
    pub valid_queries: usize,
    pub test_queries: usize,
    /// At most [`COMBINATIONS`] − valid − test.
    pub train_queries: usize,
    pub train_images_per_query: usize,
    pub eval_images_per_query: usize,
    pub jpeg_quality: u8,
}

impl Default for MiniMugeConfig {
    /// The demo's size: 180 train queries × 6 images, 30 valid and 30 test queries × 4 images.
    fn default() -> Self {
        Self {
            seed: 2022,
            image_size: 64,
            valid_queries: 30,
            test_queries: 30,
            train_queries: COMBINATIONS - 60,
            train_images_per_query: 6,
            eval_images_per_query: 4,
            jpeg_quality: 90,
        }
    }
}

/// One query of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthQuery {
    pub text_id: i64,
    pub text: String,
    pub image_ids: Vec<i64>,
}

/// What was written for one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFiles {
    pub split: String,
    pub images_tsv: PathBuf,
    pub texts_jsonl: PathBuf,
    pub queries: usize,
    pub images: usize,
    /// Expected text→image Recall@1/5/10 (in %) of a model that ranks at random, and their mean:
    /// the floor the demo's scores are compared with.
    pub chance_recall: [f64; 4],
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("mini-MUGE config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: JPEG encoding failed: {source}")]
    Encode {
        path: PathBuf,
        source: image::ImageError,
    },
}

/// The query text of combination `index` (colour-major order).
pub fn combination_text(index: usize) -> String {
    let (colour, pattern, shape) = combination(index);
    let (shape_word, noun) = SHAPES[shape];
    format!(
        "{}{}{}{}",
        COLOURS[colour].0, PATTERNS[pattern], shape_word, noun
    )
}

fn combination(index: usize) -> (usize, usize, usize) {
    let shape = index % SHAPES.len();
    let pattern = (index / SHAPES.len()) % PATTERNS.len();
    let colour = index / (SHAPES.len() * PATTERNS.len()) % COLOURS.len();
    (colour, pattern, shape)
}

/// Writes `{train,valid,test}_imgs.tsv` and `{split}_texts.jsonl` into `dir` (created if needed).
pub fn write_mini_muge(dir: &Path, config: &MiniMugeConfig) -> Result<Vec<SplitFiles>, SynthError> {
    let evals = config.valid_queries + config.test_queries;
    if config.image_size < 16 {
        return Err(SynthError::Config(format!(
            "image_size {} is below 16 pixels",
            config.image_size
        )));
    }
    if evals + config.train_queries > COMBINATIONS || config.train_queries == 0 {
        return Err(SynthError::Config(format!(
            "{} train + {} valid + {} test queries: need at least one train query and at most {COMBINATIONS} in all",
            config.train_queries, config.valid_queries, config.test_queries
        )));
    }
    if config.train_images_per_query == 0 || config.eval_images_per_query == 0 {
        return Err(SynthError::Config(
            "images per query must be at least 1".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| SynthError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    // A seeded shuffle of the combinations decides the splits, so every split sees every colour,
    // pattern and shape in some combination (with overwhelming probability at these sizes).
    let mut order: Vec<usize> = (0..COMBINATIONS).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5EED_5EED);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let (valid, rest) = order.split_at(config.valid_queries);
    let (test, rest) = rest.split_at(config.test_queries);
    let train = &rest[..config.train_queries];
    let splits = [
        ("train", train, config.train_images_per_query, 1_000_000),
        ("valid", valid, config.eval_images_per_query, 2_000_000),
        ("test", test, config.eval_images_per_query, 3_000_000),
    ];
    splits
        .iter()
        .map(|(split, combos, per_query, base)| {
            write_split(dir, split, combos, *per_query, *base, config)
        })
        .collect()
}

fn write_split(
    dir: &Path,
    split: &str,
    combos: &[usize],
    per_query: usize,
    id_base: i64,
    config: &MiniMugeConfig,
) -> Result<SplitFiles, SynthError> {
    let images_tsv = dir.join(format!("{split}_imgs.tsv"));
    let texts_jsonl = dir.join(format!("{split}_texts.jsonl"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let mut tsv = BufWriter::new(File::create(&images_tsv).map_err(io(&images_tsv))?);
    let mut jsonl = BufWriter::new(File::create(&texts_jsonl).map_err(io(&texts_jsonl))?);
    let mut images = 0usize;
    for (q, &combo) in combos.iter().enumerate() {
        let text_id = id_base + q as i64;
        let mut image_ids = Vec::with_capacity(per_query);
        for k in 0..per_query {
            let image_id = id_base + 500_000 + (q * per_query + k) as i64;
            let picture = render_product(combo, config.seed, image_id, config.image_size);
            let mut jpeg = Vec::new();
            JpegEncoder::new_with_quality(&mut jpeg, config.jpeg_quality)
                .encode(
                    picture.as_raw(),
                    config.image_size,
                    config.image_size,
                    ExtendedColorType::Rgb8,
                )
                .map_err(|source| SynthError::Encode {
                    path: images_tsv.clone(),
                    source,
                })?;
            writeln!(tsv, "{image_id}\t{}", base64::encode(&jpeg)).map_err(io(&images_tsv))?;
            image_ids.push(image_id);
            images += 1;
        }
        let line = serde_json::json!({
            "text_id": text_id,
            "text": combination_text(combo),
            "image_ids": image_ids,
        });
        writeln!(jsonl, "{line}").map_err(io(&texts_jsonl))?;
    }
    tsv.flush().map_err(io(&images_tsv))?;
    jsonl.flush().map_err(io(&texts_jsonl))?;
    Ok(SplitFiles {
        split: split.to_string(),
        images_tsv,
        texts_jsonl,
        queries: combos.len(),
        images,
        chance_recall: chance_recall(images, per_query),
    })
}

/// Expected Recall@1/5/10 (%) and their mean when `relevant` of `gallery` images are hits and the
/// ranking is random: `1 − C(gallery − relevant, k) / C(gallery, k)`.
pub fn chance_recall(gallery: usize, relevant: usize) -> [f64; 4] {
    let at = |k: usize| {
        let k = k.min(gallery);
        let mut miss = 1.0;
        for i in 0..k {
            let left = gallery.saturating_sub(relevant + i) as f64;
            miss *= left / (gallery - i) as f64;
        }
        100.0 * (1.0 - miss)
    };
    let (r1, r5, r10) = (at(1), at(5), at(10));
    [r1, r5, r10, (r1 + r5 + r10) / 3.0]
}

/// Uniform `[0, 1)` draws from a ChaCha stream.
struct Draw(ChaCha8Rng);

impl Draw {
    fn unit(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.0.next_u32() as usize) % n
    }
}

/// Renders one photo of combination `combo`; `image_id` keys its randomness.
pub fn render_product(combo: usize, seed: u64, image_id: i64, size: u32) -> RgbImage {
    let (colour, pattern, shape) = combination(combo);
    let mut draw = Draw(ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ image_id as u64,
    ));
    let s = size as f32;
    let base = jitter(COLOURS[colour].1, &mut draw, 14.0);
    let background = Background::draw(&mut draw, base);
    let cx = s * draw.range(0.38, 0.62);
    let cy = s * draw.range(0.38, 0.62);
    let radius = s * draw.range(0.26, 0.38);
    let angle = draw.range(-0.6, 0.6);
    let (sin, cos) = angle.sin_cos();
    let period = draw.range(0.28, 0.4);
    let accent = accent_colour(base);
    let shadow = (s * 0.03).max(1.0);
    let mut image = RgbImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let at = |ox: f32, oy: f32| {
                let (dx, dy) = ((px - ox) / radius, (py - oy) / radius);
                (cos * dx + sin * dy, -sin * dx + cos * dy)
            };
            let (u, v) = at(cx, cy);
            let inside = shape_distance(shape, u, v);
            let mut rgb = background.at(px / s, py / s);
            // Drop shadow: the shape shifted down-right darkens the backdrop.
            let (su, sv) = at(cx + shadow, cy + shadow);
            if inside > 0.0 && shape_distance(shape, su, sv) <= 0.0 {
                rgb = rgb.map(|c| c * 0.72);
            }
            if inside <= 0.0 {
                rgb = if inside > -0.06 {
                    [40.0, 40.0, 44.0]
                } else {
                    fill(pattern, base, accent, u, v, period)
                };
            }
            let noise = draw.range(-7.0, 7.0);
            let pixel = rgb.map(|c| (c + noise).clamp(0.0, 255.0) as u8);
            image.put_pixel(x, y, image::Rgb(pixel));
        }
    }
    image
}

fn jitter(rgb: [u8; 3], draw: &mut Draw, amount: f32) -> [f32; 3] {
    rgb.map(|c| (c as f32 + draw.range(-amount, amount)).clamp(0.0, 255.0))
}

/// The pattern's second colour: white on dark products, a darker shade on light ones.
fn accent_colour(base: [f32; 3]) -> [f32; 3] {
    let luma = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2];
    if luma < 150.0 {
        [245.0, 245.0, 240.0]
    } else {
        base.map(|c| c * 0.45)
    }
}

/// ≤ 0 inside the shape (scaled so the boundary is near radius 1), > 0 outside.
fn shape_distance(shape: usize, u: f32, v: f32) -> f32 {
    match shape {
        0 => (u * u + v * v).sqrt() - 1.0,
        1 => u.abs().max(v.abs()) - 0.82,
        2 => {
            // Equilateral triangle, apex up, centroid at the origin.
            let k = 3f32.sqrt();
            let d1 = v - 0.55;
            let d2 = (-k * u - v) / 2.0 - 0.55;
            let d3 = (k * u - v) / 2.0 - 0.55;
            d1.max(d2).max(d3) * 1.2
        }
        3 => {
            // Five-pointed star in polar form: the radius swings between 0.45 and 1.05.
            let r = (u * u + v * v).sqrt();
            let phi = v.atan2(u) + std::f32::consts::FRAC_PI_2;
            let sector = (phi * 5.0 / (2.0 * std::f32::consts::PI)).rem_euclid(1.0);
            let tip = (sector - 0.5).abs() * 2.0;
            r - (0.45 + 0.6 * tip)
        }
        4 => {
            // Heart curve (x² + y² − 1)³ − x² y³ ≤ 0, point up-side down to sit upright.
            let (x, y) = (u * 1.15, -v * 1.15 + 0.15);
            let a = x * x + y * y - 1.0;
            (a * a * a - x * x * y * y * y).cbrt()
        }
        _ => u.abs() / 0.72 + v.abs() - 1.0,
    }
}

fn fill(pattern: usize, base: [f32; 3], accent: [f32; 3], u: f32, v: f32, period: f32) -> [f32; 3] {
    let band = |t: f32| ((t / period).floor() as i64).rem_euclid(2) == 0;
    let use_accent = match pattern {
        0 => false,
        1 => !band(u),
        2 => band(u) ^ band(v),
        _ => {
            let (fu, fv) = (
                (u / period).rem_euclid(1.0) - 0.5,
                (v / period).rem_euclid(1.0) - 0.5,
            );
            fu * fu + fv * fv < 0.07
        }
    };
    if use_accent { accent } else { base }
}

/// A product-photo backdrop whose colour never matches the product's closely.
enum Background {
    Plain([f32; 3]),
    Gradient([f32; 3], [f32; 3], bool),
    Mottled([f32; 3], [f32; 4]),
}

impl Background {
    fn draw(draw: &mut Draw, product: [f32; 3]) -> Self {
        let luma = 0.299 * product[0] + 0.587 * product[1] + 0.114 * product[2];
        // Light products go on mid/dark backdrops, dark ones on light backdrops.
        let (lo, hi) = if luma > 170.0 {
            (70.0, 140.0)
        } else {
            (175.0, 235.0)
        };
        let grey = |draw: &mut Draw| {
            let level = draw.range(lo, hi);
            let tint = [
                draw.range(-10.0, 10.0),
                draw.range(-10.0, 10.0),
                draw.range(-10.0, 10.0),
            ];
            [level + tint[0], level + tint[1], level + tint[2]]
        };
        match draw.pick(3) {
            0 => Background::Plain(grey(draw)),
            1 => {
                let (a, b) = (grey(draw), grey(draw));
                Background::Gradient(a, b, draw.pick(2) == 0)
            }
            _ => {
                let colour = grey(draw);
                let waves = [
                    draw.range(4.0, 12.0),
                    draw.range(4.0, 12.0),
                    draw.range(0.0, 6.3),
                    draw.range(6.0, 16.0),
                ];
                Background::Mottled(colour, waves)
            }
        }
    }

    fn at(&self, x: f32, y: f32) -> [f32; 3] {
        match self {
            Background::Plain(c) => *c,
            Background::Gradient(a, b, vertical) => {
                let t = if *vertical { y } else { x };
                [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
            }
            Background::Mottled(c, w) => {
                let m = ((x * w[0] + w[2]).sin() * (y * w[1]).cos()) * w[3];
                c.map(|v| v + m)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn texts_name_every_attribute() {
        assert_eq!(COMBINATIONS, 240);
        let texts: std::collections::HashSet<String> =
            (0..COMBINATIONS).map(combination_text).collect();
        assert_eq!(
            texts.len(),
            COMBINATIONS,
            "every combination has its own query"
        );
        assert!(texts.contains("红色条纹圆形抱枕"));
        assert!(texts.contains("蓝色星形贴纸"));
    }

    #[test]
    fn splits_are_disjoint_deterministic_and_decodable() {
        let config = MiniMugeConfig {
            train_queries: 20,
            valid_queries: 5,
            test_queries: 5,
            train_images_per_query: 2,
            eval_images_per_query: 3,
            image_size: 32,
            ..MiniMugeConfig::default()
        };
        let a = tempdir("synth-a");
        let b = tempdir("synth-b");
        let files = write_mini_muge(&a, &config).unwrap();
        write_mini_muge(&b, &config).unwrap();
        let mut texts = std::collections::HashSet::new();
        for split in &files {
            let jsonl = std::fs::read_to_string(&split.texts_jsonl).unwrap();
            let tsv = std::fs::read(&split.images_tsv).unwrap();
            let name = split.images_tsv.file_name().unwrap();
            assert_eq!(
                tsv,
                std::fs::read(b.join(name)).unwrap(),
                "same config, same bytes"
            );
            for line in jsonl.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(
                    texts.insert(v["text"].as_str().unwrap().to_string()),
                    "query in two splits"
                );
            }
            let first = std::str::from_utf8(&tsv).unwrap().lines().next().unwrap();
            let b64 = first.split('\t').nth(1).unwrap();
            let jpeg = base64::decode_cn_clip(b64.as_bytes()).unwrap();
            let img = image::load_from_memory(&jpeg).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
        }
        assert_eq!(files[0].images, 40);
        assert_eq!(files[1].images, 15);
        assert_eq!(texts.len(), 30);
    }

    #[test]
    fn colours_are_visible_in_the_pixels() {
        // The mean colour inside the object region of a solid red product is reddish.
        let red = render_product(0, 1, 7, 64);
        let centre = red.get_pixel(32, 32).0;
        assert!(
            centre[0] as i32 > centre[1] as i32 + 60,
            "red product's centre {centre:?}"
        );
    }

    #[test]
    fn chance_matches_the_closed_form() {
        let [r1, _, r10, _] = chance_recall(120, 4);
        assert!((r1 - 100.0 * 4.0 / 120.0).abs() < 1e-9);
        assert!(r10 > 29.0 && r10 < 30.5, "{r10}");
        assert_eq!(chance_recall(5, 1)[2], 100.0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tempdir("synth-bad");
        let config = MiniMugeConfig {
            train_queries: COMBINATIONS,
            ..MiniMugeConfig::default()
        };
        assert!(matches!(
            write_mini_muge(&dir, &config),
            Err(SynthError::Config(_))
        ));
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
