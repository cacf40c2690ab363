//! Throughput of cn_clip's training transform on one core: decode a 224×224 JPEG, augment
//! (random resized crop + bicubic resize, flip, AutoAugment 'original'), ToTensor + Normalize.
//!
//! `cargo bench -p muge-data --bench augment` (release). The Python anchor is cn_clip's
//! `LMDBDataset` with `--use-augment`: about 375 samples/s on one core for the same work.
//! Keys vary per iteration, so the mix of sub-policies is the real one.

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use cnclip_model::preprocess::{RgbImage, decode_named};
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use muge_data::SampleKey;
use muge_data::augment::{TrainTransform, ops};

/// One augmentation op applied to an image, as timed below.
type OpFn<'a> = dyn Fn(&RgbImage) -> RgbImage + 'a;

/// A 224×224 photo-like test image (smooth colour fields plus texture), JPEG quality 95.
fn test_jpeg() -> Vec<u8> {
    let (w, h) = (224u32, 224u32);
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3u32 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let base =
                    ((x as f32 / 17.0 + c as f32).sin() * (y as f32 / 23.0).cos() + 1.0) * 110.0;
                px.push((base + (state % 24) as f32) as u8);
            }
        }
    }
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 95)
        .encode(&px, w, h, ExtendedColorType::Rgb8)
        .expect("encoding the benchmark image");
    out
}

fn run(name: &str, budget: Duration, mut f: impl FnMut(u64)) {
    // Warm-up.
    for i in 0..20 {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        f(n);
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<44} {:>8.3} ms/sample  {:>8.1} samples/s  ({n} samples)",
        secs * 1e3 / n as f64,
        n as f64 / secs
    );
}

fn main() {
    let jpeg = test_jpeg();
    let t = TrainTransform::new(224, 0).expect("valid size");
    let key = |i: u64| SampleKey {
        seed: 1,
        epoch: 0,
        index: i,
    };
    let budget = Duration::from_secs(3);
    let decoded = decode_named(&jpeg, "bench.jpg").expect("decodes");
    let mut buf = vec![0f32; 3 * 224 * 224];

    println!(
        "single thread, 224x224 JPEG ({} bytes) -> 224x224",
        jpeg.len()
    );
    run("decode only", budget, |_| {
        black_box(decode_named(black_box(&jpeg), "bench.jpg").expect("decodes"));
    });
    run("augment only (decoded input)", budget, |i| {
        black_box(t.apply(black_box(&decoded), key(i)).expect("augments"));
    });
    run(
        "eval transform: decode + resize + normalise",
        budget,
        |_| {
            let img = decode_named(black_box(&jpeg), "bench.jpg").expect("decodes");
            let rgb: RgbImage = img.resize_rgb(224, 224).expect("resizes");
            rgb.normalize_into(&mut buf);
            black_box(&buf);
        },
    );
    let rgb = decoded.resize_rgb(224, 224).expect("resizes");
    let short = Duration::from_millis(700);
    let fill = ops::FILL_COLOR;
    let per_op: [(&str, &OpFn<'_>); 10] = [
        ("op posterize(6)", &|i| ops::posterize(i, 6)),
        ("op solarize(128)", &|i| ops::solarize(i, 128)),
        ("op autocontrast", &ops::autocontrast),
        ("op equalize", &ops::equalize),
        ("op invert", &ops::invert),
        ("op color(0.82)", &|i| ops::color(i, 0.82)),
        ("op contrast(1.54)", &|i| ops::contrast(i, 1.54)),
        ("op sharpness(1.36)", &|i| ops::sharpness(i, 1.36)),
        ("op rotate(27)", &|i| ops::rotate(i, 27.0, fill)),
        ("op shear_x(0.15)", &|i| ops::shear_x(i, 0.15, fill)),
    ];
    for (name, f) in per_op {
        run(name, short, |_| {
            black_box(f(black_box(&rgb)));
        });
    }
    run(
        "train transform: decode + augment + normalise",
        budget,
        |i| {
            let img = decode_named(black_box(&jpeg), "bench.jpg").expect("decodes");
            let rgb = t.apply(&img, key(i)).expect("augments");
            rgb.normalize_into(&mut buf);
            black_box(&buf);
        },
    );
}
