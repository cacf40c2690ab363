//! Image preprocessing against cn_clip 1.6.0 / Pillow 13.0.0 outputs recorded by
//! `tests/fixtures/make_preprocess_fixtures.py` (no Python at run time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cnclip_model::preprocess::{
    DecodedImage, Mode, PreprocessError, Preprocessor, decode, decode_named, resize_bicubic,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

struct Case {
    name: String,
    input: String,
    mode: String,
    size: usize,
    rgb: String,
    tensor: Option<String>,
}

/// Cases of `manifest.tsv` and of `tiff_manifest.tsv` (by `make_tiff_fixtures.py`).
fn cases() -> Vec<Case> {
    let mut text = std::fs::read_to_string(fixtures().join("manifest.tsv")).unwrap();
    text += &std::fs::read_to_string(fixtures().join("tiff_manifest.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "bad manifest line {l:?}");
            Case {
                name: f[0].to_owned(),
                input: f[1].to_owned(),
                mode: f[2].to_owned(),
                size: f[3].parse().unwrap(),
                rgb: f[4].to_owned(),
                tensor: (f[5] != "-").then(|| f[5].to_owned()),
            }
        })
        .collect()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

/// Lossy WebP goes through image-webp, not libwebp: not bit-exact (see docs/PREPROCESSING.md).
fn is_inexact(input: &str) -> bool {
    input.starts_with("webp_lossy")
}

#[test]
fn pixels_match_pillow_for_every_fixture() {
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for c in cases() {
        let bytes = read(&c.input);
        let img: DecodedImage = decode_named(&bytes, &c.input).unwrap();
        if img.mode().name() != c.mode {
            failures.push(format!(
                "{} opens as {} in Pillow, we say {}",
                c.input,
                c.mode,
                img.mode().name()
            ));
            continue;
        }
        let ours = img.resize_rgb(c.size, c.size).unwrap();
        let want = read(&c.rgb);
        assert_eq!(ours.as_raw().len(), want.len(), "{}", c.name);
        let diffs: Vec<u32> = ours
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(&a, &b)| u32::from(a.abs_diff(b)))
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let differing = diffs.iter().filter(|&&d| d > 0).count();
        report.push(format!(
            "{:<34} {:<4} S={:<3} max|d|={max} mean|d|={mean:.4} differing={differing}/{}",
            c.input,
            c.mode,
            c.size,
            diffs.len()
        ));
        if is_inexact(&c.input) {
            // Measured: image-webp's lossy decode is within a few levels of libwebp's.
            if max > 8 || mean > 1.0 {
                failures.push(format!("{} S={}: max {max} mean {mean}", c.input, c.size));
            }
        } else if max != 0 {
            failures.push(format!(
                "{} S={}: {differing} bytes differ, max {max}, mean {mean:.4}",
                c.input, c.size
            ));
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let tiffs = report.iter().filter(|r| r.starts_with("tiff_")).count();
    assert!(tiffs >= 20, "only {tiffs} TIFF cases");
}

#[test]
fn normalised_tensor_matches_cn_clip_image_transform() {
    let mut checked = 0;
    for c in cases() {
        let Some(tensor_file) = &c.tensor else {
            continue;
        };
        let want: Vec<f32> = read(tensor_file)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let p = Preprocessor::new(c.size as u32).unwrap();
        let t = p.preprocess_bytes(&read(&c.input), &c.input).unwrap();
        assert_eq!(t.size(), vec![3, c.size as i64, c.size as i64]);
        assert_eq!(t.kind(), tch::Kind::Float);
        let ours = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(ours.len(), want.len());
        let max = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bit_exact = ours
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "{} S={}: max|d|={max:e} bit-exact={bit_exact}",
            c.input, c.size
        );
        assert!(max <= 1e-6, "{} S={}: max |d| {max}", c.input, c.size);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} tensor fixtures");
}

#[test]
fn modes_are_pillows() {
    let expect = [
        ("rgba_50x40.png", Mode::Rgba),
        ("la_40x30.png", Mode::La),
        ("one_41x29.png", Mode::One),
        ("i16_30x20.png", Mode::I16),
        ("jpeg_cmyk_40x30.jpg", Mode::Cmyk),
        ("jpeg_gray_64x48.jpg", Mode::L),
        ("p_trns_29x35.png", Mode::P),
    ];
    for (file, mode) in expect {
        assert_eq!(decode(&read(file)).unwrap().mode(), mode, "{file}");
    }
}

fn err_of(bytes: &[u8], id: &str) -> PreprocessError {
    Preprocessor::new(32)
        .unwrap()
        .rgb_from_bytes(bytes, id)
        .unwrap_err()
}

#[test]
fn bad_inputs_give_precise_errors() {
    let jpeg = read("jpeg_420_300x200.jpg");
    let prog = read("jpeg_prog_120x90.jpg");
    let png = read("rgb_300x200.png");

    let e = err_of(&[], "products/1.jpg");
    assert_eq!(e.to_string(), "image products/1.jpg is empty (0 bytes)");

    let e = err_of(b"<html>not found</html>", "products/2.jpg");
    assert!(matches!(e, PreprocessError::UnknownFormat { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("image products/2.jpg is not a JPEG, PNG"),
        "{e}"
    );

    // Pillow: "image file is truncated" for any JPEG that ends before EOI, even by 2 bytes.
    for (data, cut) in [
        (&jpeg, jpeg.len() / 2),
        (&jpeg, jpeg.len() - 2),
        (&prog, prog.len() / 3),
        (&jpeg, 3),
    ] {
        let e = err_of(&data[..cut], "products/3.jpg");
        assert!(
            matches!(
                e,
                PreprocessError::Truncated { .. } | PreprocessError::Decode { .. }
            ),
            "cut {cut}: {e}"
        );
        assert!(e.to_string().starts_with("image products/3.jpg "), "{e}");
    }
    let e = err_of(&jpeg[..jpeg.len() / 2], "products/3.jpg");
    assert_eq!(
        e.to_string(),
        "image products/3.jpg is truncated: its JPEG data ends before the image is complete"
    );

    // Corrupt JPEG header: libjpeg's fatal error unwinds and is caught.
    let mut bad = jpeg.clone();
    for b in &mut bad[2..40] {
        *b = 0xFF;
    }
    bad[40] = 0x01;
    let e = err_of(&bad, "products/4.jpg");
    assert!(e.to_string().starts_with("image products/4.jpg "), "{e}");
    // Garbage after the SOI marker.
    let mut bad = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x03, 0x08];
    bad.extend(std::iter::repeat_n(0x55, 100));
    let e = err_of(&bad, "products/5.jpg");
    assert!(
        matches!(
            e,
            PreprocessError::Decode { .. } | PreprocessError::Truncated { .. }
        ),
        "{e}"
    );

    let e = err_of(&png[..png.len() / 2], "products/6.png");
    assert!(e.to_string().starts_with("image products/6.png "), "{e}");
    let e = err_of(&png[..20], "products/7.png");
    assert!(
        matches!(e, PreprocessError::Truncated { format: "PNG", .. }),
        "{e}"
    );
    let mut bad = png.clone();
    for b in &mut bad[40..200] {
        *b ^= 0x5A;
    }
    let e = err_of(&bad, "products/8.png");
    assert!(
        matches!(
            e,
            PreprocessError::Decode { .. } | PreprocessError::Truncated { .. }
        ),
        "{e}"
    );

    for f in [
        "gif_35x25.gif",
        "bmp_rgb_30x20.bmp",
        "webp_lossy_40x30.webp",
    ] {
        let b = read(f);
        let e = err_of(&b[..b.len() / 2], f);
        assert!(e.to_string().starts_with(&format!("image {f} ")), "{e}");
    }

    // Every prefix of a small JPEG and PNG: errors, never a panic.
    let small = read("jpeg_444_77x51.jpg");
    for cut in (0..small.len()).step_by(97) {
        assert!(
            err_of(&small[..cut], "prefix")
                .to_string()
                .contains("prefix")
        );
    }
    let small = read("p_33x27.png");
    for cut in (0..small.len()).step_by(53) {
        let _ = Preprocessor::new(32)
            .unwrap()
            .rgb_from_bytes(&small[..cut], "prefix");
    }

    let p = Preprocessor::new(32).unwrap();
    let e = p
        .preprocess_file("/nonexistent/products/9.jpg")
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("image /nonexistent/products/9.jpg cannot be read"),
        "{e}"
    );
}

#[test]
fn parallel_batch_equals_sequential() {
    let files: Vec<String> = cases()
        .into_iter()
        .map(|c| c.input)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let p = Preprocessor::new(48).unwrap();
    let items: Vec<(String, Vec<u8>)> = files.iter().map(|f| (f.clone(), read(f))).collect();
    let batch = p.preprocess_batch(&items).unwrap();
    assert_eq!(batch.size(), vec![items.len() as i64, 3, 48, 48]);
    let seq = tch::Tensor::stack(
        &items
            .iter()
            .map(|(id, b)| p.preprocess_bytes(b, id).unwrap())
            .collect::<Vec<_>>(),
        0,
    );
    assert!(batch.equal(&seq), "batch differs from sequential");
    let paths: Vec<PathBuf> = files.iter().map(|f| fixtures().join(f)).collect();
    assert!(p.preprocess_files(&paths).unwrap().equal(&seq));

    // The first failing item (in input order) is reported.
    let mut broken = items.clone();
    broken[3].1.truncate(10);
    broken[7].1.clear();
    let e = p.preprocess_batch(&broken).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("image {} ", broken[3].0)),
        "{e}"
    );

    let empty: Vec<(String, Vec<u8>)> = Vec::new();
    assert_eq!(
        p.preprocess_batch(&empty).unwrap().size(),
        vec![0, 3, 48, 48]
    );
}

#[test]
fn general_resize_and_crop() {
    let img = decode(&read("rgb_300x200.png")).unwrap();
    let out = img.resize_rgb(17, 91).unwrap();
    assert_eq!(
        (out.width(), out.height(), out.as_raw().len()),
        (17, 91, 17 * 91 * 3)
    );
    assert!(img.resize_rgb(0, 5).is_err());
    let crop = img.crop(10, 20, 30, 40).unwrap();
    assert_eq!((crop.width(), crop.height()), (30, 40));
    let full = img.to_rgb();
    assert_eq!(
        &crop.to_rgb().as_raw()[..3],
        &full.as_raw()[(20 * 300 + 10) * 3..(20 * 300 + 10) * 3 + 3]
    );
    assert!(img.crop(290, 0, 20, 10).is_none());
}

#[test]
fn general_non_square_resizes_match_pillow() {
    let text = std::fs::read_to_string(fixtures().join("sweep.tsv")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let (w, h): (usize, usize) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        let img = decode(&read(f[0])).unwrap();
        let ours = img.resize_rgb(w, h).unwrap();
        assert_eq!(ours.as_raw(), read(f[3]).as_slice(), "{} -> {w}x{h}", f[0]);
        // The free function on raw pixels gives the same bytes.
        let raw = img.samples_u8().unwrap();
        let direct = resize_bicubic(raw, img.width(), img.height(), 3, w, h);
        assert_eq!(direct, ours.as_raw(), "resize_bicubic {w}x{h}");
        n += 1;
    }
    assert!(n >= 10);
}

#[test]
fn damaged_tiffs_are_errors_naming_the_image() {
    let good = read("tiff_rgb_lzw_30x20.tif");
    for cut in [8, good.len() / 2, good.len() - 3] {
        let e = err_of(&good[..cut], "scans/7.tif");
        assert!(e.to_string().starts_with("image scans/7.tif "), "{e}");
    }
    assert_eq!(decode(&read("tiff_p_30x20.tif")).unwrap().mode(), Mode::P);
}
